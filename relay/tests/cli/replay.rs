//! `outbox replay` against real Postgres and RabbitMQ.

use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use outbox::TestDatabase;
use outbox::testing::{TEST_AMQP_PREFIX, TestExchange};
use uuid::Uuid;

use crate::failed::{depth, expiring_queue};
use crate::support::run_outbox;

/// The next message of `queue`, taken off it.
async fn next_message(channel: &lapin::Channel, queue: &str) -> lapin::message::BasicGetMessage {
    channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a replayed message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_stored_events_to_one_listener_as_the_relay_encodes_them() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let a1 = outbox::testing::record_ticks(&mut conn, "a1", 0..3).unwrap();
    outbox::testing::record_ticks(&mut conn, "a2", 0..2).unwrap();
    let unpublished = outbox::testing::record_ticks(&mut conn, "a1", 3..4).unwrap();
    diesel::RunQueryDsl::execute(
        diesel::sql_query(format!(
            "UPDATE outbox_events SET published_at = now() WHERE event_id <> '{}'",
            unpublished[0]
        )),
        &mut conn,
    )
    .unwrap();
    let exchange = TestExchange::new().await.unwrap();
    let channel = &exchange.channel;
    let app = format!("{TEST_AMQP_PREFIX}{}", Uuid::now_v7().simple());
    let (audit, other) = (format!("{app}.audit"), format!("{app}.other"));
    for name in [&audit, &other] {
        expiring_queue(channel, name).await;
    }
    let env = [("DATABASE_URL", db.url())];
    let base = [
        "replay",
        "--aggregate",
        "a1",
        "--app",
        &app,
        "--to-listener",
        "audit",
    ];

    // Dry run: how many and which, nothing sent.
    let mut args = base.to_vec();
    args.push("--dry-run");
    let (status, stdout, stderr) = run_outbox(&args, &env);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("would replay 3 event(s)"), "{stdout}");
    assert!(a1.iter().all(|id| stdout.contains(&id.to_string())), "{stdout}");
    assert!(
        !stdout.contains(&unpublished[0].to_string()),
        "unpublished rows are not replayed"
    );
    assert_eq!(depth(channel, &audit).await, 0);

    // The real thing: three messages in the audit queue only, in order,
    // encoded as the relay does.
    let (status, stdout, stderr) = run_outbox(&base, &env);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("replayed 3 event(s)"), "{stdout}");
    for (n, id) in a1.iter().enumerate() {
        let message = next_message(channel, &audit).await;
        let body: serde_json::Value = serde_json::from_slice(&message.delivery.data).unwrap();
        assert_eq!(body["id"], id.to_string());
        assert_eq!(body["type"], "counter.ticked");
        assert_eq!(body["specversion"], "1.0");
        assert_eq!(body["source"], "/outbox");
        assert_eq!(body["subject"], "a1");
        assert_eq!(body["data"]["n"], n as i64);
        assert_eq!(body["dataschema"], "urn:outbox:schema:counter.ticked:v1");
        let properties = &message.delivery.properties;
        assert_eq!(
            properties.message_id().as_ref().map(|s| s.to_string()),
            Some(id.to_string())
        );
        assert_eq!(
            properties
                .content_type()
                .as_ref()
                .map(|s| s.to_string())
                .as_deref(),
            Some("application/cloudevents+json")
        );
        assert_eq!(*properties.delivery_mode(), Some(2));
    }
    // With the relay's --dataschema-base, the same base.
    let mut args = base.to_vec();
    args.extend(["--dataschema-base", "https://schemas.example.com/test/"]);
    let (status, stdout, stderr) = run_outbox(&args, &env);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("replayed 3 event(s)"), "{stdout}");
    for _ in &a1 {
        let message = next_message(channel, &audit).await;
        let body: serde_json::Value = serde_json::from_slice(&message.delivery.data).unwrap();
        assert_eq!(
            body["dataschema"],
            "https://schemas.example.com/test/counter.ticked.v1.schema.json"
        );
    }
    assert_eq!(depth(channel, &other).await, 0, "the other listener gets nothing");
    assert!(
        exchange.received().is_empty(),
        "replay bypasses the events exchange"
    );

    // A listener whose queue does not exist, a broker that cannot be
    // reached, no filter at all.
    let (status, _, stderr) = run_outbox(
        &[
            "replay",
            "--event-type",
            "counter.ticked",
            "--app",
            &app,
            "--to-listener",
            "nobody",
        ],
        &env,
    );
    assert_eq!(status, 1);
    assert!(
        stderr.contains(&format!("{app}.nobody does not exist")),
        "{stderr}"
    );
    let mut args = base.to_vec();
    args.extend(["--amqp-url", "amqp://guest:pw-s3cret@127.0.0.1:1/%2f"]);
    let (status, _, stderr) = run_outbox(&args, &env);
    assert_eq!(status, 1);
    assert!(
        stderr.contains("cannot reach the broker") && !stderr.contains("pw-s3cret"),
        "{stderr}"
    );
    let (status, _, _) = run_outbox(&["replay", "--app", &app, "--to-listener", "audit"], &env);
    assert_eq!(status, 2, "a filter is required");

    for name in [&audit, &other] {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}
