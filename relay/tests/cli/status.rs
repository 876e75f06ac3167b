//! `outbox status` against real Postgres and RabbitMQ.

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use outbox::TestDatabase;
use outbox::testing::{TEST_AMQP_PREFIX, TestExchange};
use uuid::Uuid;

use crate::failed::{expiring_queue, failed_job};
use crate::support::run_outbox;

async fn publish(channel: &lapin::Channel, queue: &str, count: usize) {
    for _ in 0..count {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// Declares `<app>.audit`, its dead-letter queue and the retry queue
/// `retry_suffix` names (expiring, so a crashed test leaves nothing), with
/// the channel in confirm mode; returns (queue, dead, retry).
async fn audit_queues(channel: &lapin::Channel, app: &str, retry_suffix: &str) -> (String, String, String) {
    let queue = format!("{app}.audit");
    let (dead, retry) = (format!("{queue}.dead"), format!("{queue}.{retry_suffix}"));
    for name in [&queue, &dead, &retry] {
        expiring_queue(channel, name).await;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (queue, dead, retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_backlog_pause_queue_depths_and_failed_jobs() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    outbox::testing::record_ticks(&mut conn, "a1", 0..3).unwrap();
    outbox::control::pause(&mut conn, Some("incident 7")).unwrap();
    let exchange = TestExchange::new().await.unwrap();
    let channel = &exchange.channel;
    let app = format!("{TEST_AMQP_PREFIX}{}", Uuid::now_v7().simple());
    let (queue, dead, retry) = audit_queues(channel, &app, "retry.30s").await;
    publish(channel, &queue, 2).await;
    publish(channel, &retry, 3).await;
    publish(channel, &dead, 1).await;
    failed_job(&mut conn, &queue, "audit", "counter.ticked");
    let env = [("DATABASE_URL", db.url())];

    // Database only: says how to get the queues.
    let (status, stdout, stderr) = run_outbox(&["status"], &env);
    assert_eq!(status, 0, "{stderr}");
    for needle in [
        "PAUSED (incident 7)",
        "3 unpublished",
        "counter.ticked",
        "--listener",
        &queue,
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }

    // With the broker part, as JSON.
    let args = [
        "status",
        "--app",
        &app,
        "--listener",
        "audit",
        "--listener",
        "nobody",
        "--json",
    ];
    let (status, stdout, stderr) = run_outbox(&args, &env);
    assert_eq!(status, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["database"]["backlog"], 3, "{stdout}");
    assert_eq!(json["database"]["paused"], true);
    assert_eq!(
        json["database"]["by_event_type"][0]["event_type"],
        "counter.ticked"
    );
    assert_eq!(json["database"]["by_event_type"][0]["backlog"], 3);
    let audit = &json["listeners"][0];
    assert_eq!(audit["queue"], queue.as_str());
    assert_eq!(audit["depth"], 2, "{stdout}");
    assert_eq!(audit["retry_depth"], 3, "{stdout}");
    assert_eq!(audit["dead_depth"], 1, "{stdout}");
    assert_eq!(audit["failed_jobs"], 1, "{stdout}");
    assert!(
        json["listeners"][1]["depth"].is_null(),
        "a missing queue: {stdout}"
    );

    // Text form, and a broker that cannot be reached.
    let (status, stdout, _) = run_outbox(&args[..args.len() - 1], &env);
    assert_eq!(status, 0);
    assert!(stdout.contains("READY") && stdout.contains("missing"), "{stdout}");
    let (status, _, stderr) = run_outbox(
        &[
            "status",
            "--app",
            &app,
            "--listener",
            "audit",
            "--amqp-url",
            "amqp://guest:pw-s3cret@127.0.0.1:1/%2f",
        ],
        &env,
    );
    assert_eq!(status, 1);
    assert!(
        stderr.contains("cannot reach the broker") && !stderr.contains("pw-s3cret"),
        "{stderr}"
    );
    let (status, _, _) = run_outbox(&["status", "--listener", "audit"], &env);
    assert_eq!(status, 2, "--listener needs --app");

    for name in [&queue, &dead, &retry] {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_without_flags_measures_the_listeners_workers_registered() {
    use diesel::RunQueryDsl;
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let exchange = TestExchange::new().await.unwrap();
    let channel = &exchange.channel;
    let app = format!("{TEST_AMQP_PREFIX}{}", Uuid::now_v7().simple());
    let (queue, dead, retry) = audit_queues(channel, &app, "retry.1s").await;
    publish(channel, &queue, 2).await;
    publish(channel, &retry, 1).await;
    // What a worker of `app` records when it starts (tests/consumer covers
    // the worker side).
    diesel::sql_query(format!(
        "INSERT INTO outbox_listeners (app, listener, exchange, queue, retry_queues, dead_queue, event_types, worker_id)
         VALUES ('{app}', 'audit', '{}', '{queue}', ARRAY['{retry}'], '{dead}', ARRAY['counter.ticked'], 'worker-1')",
        exchange.exchange
    ))
    .execute(&mut conn)
    .unwrap();
    let env = [("DATABASE_URL", db.url())];

    let (status, stdout, stderr) = run_outbox(&["status", "--json"], &env);
    assert_eq!(status, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let audit = &json["listeners"][0];
    assert_eq!(audit["app"], app.as_str(), "{stdout}");
    assert_eq!(audit["queue"], queue.as_str());
    assert_eq!(audit["depth"], 2, "{stdout}");
    assert_eq!(audit["retry_depth"], 1, "{stdout}");
    assert_eq!(audit["dead_depth"], 0, "{stdout}");

    let (status, stdout, _) = run_outbox(&["status"], &env);
    assert_eq!(status, 0);
    assert!(stdout.contains("READY") && stdout.contains(&queue), "{stdout}");

    for name in [&queue, &dead, &retry] {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}
