//! `outbox failed list|show|forget|flush|prune|retry` against real
//! Postgres and RabbitMQ.

use std::time::Duration;

use chrono::Utc;
use diesel::PgConnection;
use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use outbox::TestDatabase;
use outbox::failed_jobs::{self, AttemptError, NewFailedJob};
use outbox::testing::{TEST_AMQP_PREFIX, TestExchange};
use uuid::Uuid;

use crate::support::{count, run_outbox};

/// Inserts a failed job of `listener` for a fresh `event_type` event.
pub fn failed_job(conn: &mut PgConnection, queue: &str, listener: &str, event_type: &str) -> (i64, Uuid) {
    let event_id = Uuid::now_v7();
    let payload = serde_json::json!({
        "specversion": "1.0", "id": event_id, "type": event_type, "source": "/test",
        "subject": "site-1", "time": Utc::now(), "data": {"site_id": "site-1"}
    });
    let errors = [
        AttemptError {
            attempt: 1,
            at: Utc::now(),
            error: "first: connection refused".into(),
        },
        AttemptError {
            attempt: 2,
            at: Utc::now(),
            error: "second: timed out".into(),
        },
    ];
    let (id, inserted) = failed_jobs::insert(
        conn,
        &NewFailedJob {
            queue,
            listener,
            event_id: Some(event_id),
            event_type: Some(event_type),
            payload: &payload,
            exception: "second: timed out\nstack line",
            attempts: 2,
            errors: &errors,
            uuid: None,
        },
    )
    .unwrap();
    assert!(inserted);
    (id, event_id)
}

fn failed_job_count(conn: &mut PgConnection) -> i64 {
    count(conn, "SELECT count(*) AS n FROM failed_jobs")
}

#[test]
fn list_show_forget_flush_and_prune() {
    let db = TestDatabase::create().unwrap();
    let env = [("DATABASE_URL", db.url())];
    let mut conn = db.connect().unwrap();
    let (audit, audit_event) = failed_job(
        &mut conn,
        "chom.record_audit_log",
        "record_audit_log",
        "site.created",
    );
    let (notify, _) = failed_job(&mut conn, "chom.notify", "notify", "backup.failed");
    let (old, _) = failed_job(&mut conn, "chom.notify", "notify", "site.deleted");
    diesel::RunQueryDsl::execute(
        diesel::sql_query(format!(
            "UPDATE failed_jobs SET failed_at = now() - interval '3 days' WHERE id = {old}"
        )),
        &mut conn,
    )
    .unwrap();

    // The table: newest first, aligned, one line per job.
    let (status, stdout, stderr) = run_outbox(&["failed", "list"], &env);
    assert_eq!(status, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("LISTENER"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(&notify.to_string()),
        "newest first: {stdout}"
    );
    assert!(lines[3].starts_with(&old.to_string()), "{stdout}");
    let column = lines[0].find("LISTENER").unwrap();
    assert!(
        lines
            .iter()
            .skip(1)
            .all(|l| l[column..].starts_with("record_audit_log") || l[column..].starts_with("notify")),
        "{stdout}"
    );

    // JSON with filters.
    let (status, stdout, stderr) = run_outbox(
        &[
            "failed",
            "list",
            "--listener",
            "notify",
            "--since",
            "1d",
            "--json",
        ],
        &env,
    );
    assert_eq!(status, 0, "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{stdout}");
    assert_eq!(rows[0]["id"], notify);
    assert_eq!(rows[0]["event_type"], "backup.failed");
    for field in [
        "uuid",
        "queue",
        "listener",
        "event_id",
        "exception",
        "attempts",
        "failed_at",
    ] {
        assert!(rows[0].get(field).is_some(), "{field} missing: {stdout}");
    }
    let (_, stdout, _) = run_outbox(
        &["failed", "list", "--event-type", "site.created", "--json"],
        &env,
    );
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    let (_, stdout, _) = run_outbox(
        &["failed", "list", "--until", "2d", "--limit", "5", "--json"],
        &env,
    );
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows[0]["id"], old, "{stdout}");
    let (status, _, stderr) = run_outbox(&["failed", "list", "--since", "last tuesday"], &env);
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.contains("RFC 3339"), "{stderr}");

    // Show: everything about one job.
    let (status, stdout, stderr) = run_outbox(&["failed", "show", &audit.to_string()], &env);
    assert_eq!(status, 0, "{stderr}");
    for needle in [
        "record_audit_log",
        "first: connection refused",
        "#2 at",
        "stack line",
        "site-1",
        &audit_event.to_string(),
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
    let (status, stdout, _) = run_outbox(&["failed", "show", &audit.to_string(), "--json"], &env);
    assert_eq!(status, 0);
    let job: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(job["errors"].as_array().unwrap().len(), 2);
    assert_eq!(job["payload"]["data"]["site_id"], "site-1");
    let (status, _, stderr) = run_outbox(&["failed", "show", "999999"], &env);
    assert_eq!(status, 1);
    assert!(stderr.contains("no failed job with id 999999"), "{stderr}");

    // Forget: known ids go, an unknown one is named.
    let (status, _, stderr) = run_outbox(&["failed", "forget", &audit.to_string(), "424242"], &env);
    assert_eq!(status, 1);
    assert!(stderr.contains("424242"), "{stderr}");
    assert_eq!(failed_job_count(&mut conn), 2);

    // Prune: only the 3-day-old job.
    let (status, stdout, stderr) = run_outbox(&["failed", "prune", "--hours", "48"], &env);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("deleted 1"), "{stdout}");
    assert_eq!(failed_job_count(&mut conn), 1);

    // Flush: refused without a terminal and without --yes.
    let (status, _, stderr) = run_outbox(&["failed", "flush"], &env);
    assert_eq!(status, 1);
    assert!(stderr.contains("--yes"), "{stderr}");
    assert_eq!(failed_job_count(&mut conn), 1);
    let (status, stdout, _) = run_outbox(&["failed", "flush", "--older-than", "1h", "--yes"], &env);
    assert_eq!(status, 0);
    assert!(stdout.contains("deleted 0"), "{stdout}");
    let (status, stdout, _) = run_outbox(&["failed", "flush", "--yes"], &env);
    assert_eq!(status, 0);
    assert!(stdout.contains("deleted 1"), "{stdout}");
    assert_eq!(failed_job_count(&mut conn), 0);
    let (status, stdout, _) = run_outbox(&["failed", "list"], &env);
    assert_eq!(status, 0);
    assert!(stdout.contains("no failed jobs"), "{stdout}");
}

/// Declares a classic queue that the broker deletes by itself two minutes
/// after its last use, so a panicking test leaves nothing behind for long.
pub async fn expiring_queue(channel: &lapin::Channel, name: &str) {
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(120_000));
    channel
        .queue_declare(name.into(), QueueDeclareOptions::default(), arguments)
        .await
        .unwrap();
}

pub async fn depth(channel: &lapin::Channel, name: &str) -> u32 {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_goes_to_the_failed_listener_only_and_keeps_unconfirmed_rows() {
    let db = TestDatabase::create().unwrap();
    let exchange = TestExchange::new().await.unwrap();
    let channel = &exchange.channel;
    let prefix = format!("{TEST_AMQP_PREFIX}{}", Uuid::now_v7().simple());
    let (queue_a, queue_b) = (format!("{prefix}.audit"), format!("{prefix}.notify"));
    for queue in [&queue_a, &queue_b] {
        expiring_queue(channel, queue).await;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.exchange.as_str().into(),
                "site.created".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    let mut conn = db.connect().unwrap();
    let (job, event_id) = failed_job(&mut conn, &queue_a, "audit", "site.created");
    let (missing_queue_job, _) = failed_job(&mut conn, &format!("{prefix}.gone"), "gone", "site.created");
    let env = [("DATABASE_URL", db.url())];

    // Retry to the listener's own queue: the other listener gets nothing.
    let (status, stdout, stderr) = run_outbox(&["failed", "retry", &job.to_string()], &env);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("retried 1 of 1"), "{stdout}");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while depth(channel, &queue_a).await < 1 {
        assert!(
            std::time::Instant::now() < until,
            "the retried message never reached {queue_a}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        depth(channel, &queue_b).await,
        0,
        "the other listener must not get a duplicate"
    );
    assert!(
        exchange.received().is_empty(),
        "retry must not go through the events exchange"
    );
    assert!(
        failed_jobs::get(&mut conn, job).unwrap().is_none(),
        "row deleted after the confirm"
    );
    let _ = event_id;

    // A queue that does not exist: returned, not confirmed, the row stays.
    let (status, stdout, stderr) = run_outbox(&["failed", "retry", &missing_queue_job.to_string()], &env);
    assert_eq!(status, 1, "{stdout}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(failed_jobs::get(&mut conn, missing_queue_job).unwrap().is_some());

    // A broker that cannot be reached: exit 1, the row stays, no password shown.
    let (status, _, stderr) = run_outbox(
        &[
            "failed",
            "retry",
            "--all",
            "--amqp-url",
            "amqp://guest:s3cret-pw@127.0.0.1:1/%2f",
        ],
        &env,
    );
    assert_eq!(status, 1);
    assert!(stderr.contains("cannot reach the broker"), "{stderr}");
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
    assert!(failed_jobs::get(&mut conn, missing_queue_job).unwrap().is_some());

    // An unknown id is named.
    let (status, _, stderr) = run_outbox(&["failed", "retry", "777777"], &env);
    assert_eq!(status, 1);
    assert!(stderr.contains("no failed job with id 777777"), "{stderr}");

    // --all with a filter: only that listener's jobs.
    failed_job(&mut conn, &queue_a, "audit", "site.created");
    failed_job(&mut conn, &queue_a, "audit", "site.created");
    let (status, stdout, stderr) = run_outbox(&["failed", "retry", "--all", "--listener", "audit"], &env);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("retried 2 of 2"), "{stdout}");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while depth(channel, &queue_a).await < 3 {
        assert!(
            std::time::Instant::now() < until,
            "the retried messages never reached {queue_a}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(depth(channel, &queue_b).await, 0);
    assert!(
        failed_jobs::get(&mut conn, missing_queue_job).unwrap().is_some(),
        "other listeners' jobs stay"
    );

    for queue in [&queue_a, &queue_b] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

/// Runs `outbox ARGS` on a pseudo terminal (util-linux `script`), typing
/// `input`: (exit code, everything the terminal showed).
fn run_on_terminal(args: &str, input: &str, database_url: &str) -> (i32, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("script")
        .args(["-qec", &format!("{} {args}", crate::support::OUTBOX), "/dev/null"])
        .env("DATABASE_URL", database_url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn flush_asks_on_a_terminal() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    }
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    failed_job(&mut conn, "chom.notify", "notify", "backup.failed");
    let (status, shown) = run_on_terminal("failed flush", "n\n", db.url());
    assert_eq!(status, 0, "{shown}");
    assert!(
        shown.contains("[y/N]") && shown.contains("nothing deleted"),
        "{shown}"
    );
    assert_eq!(failed_job_count(&mut conn), 1);
    let (status, shown) = run_on_terminal("failed flush", "y\n", db.url());
    assert_eq!(status, 0, "{shown}");
    assert!(shown.contains("deleted 1"), "{shown}");
    assert_eq!(failed_job_count(&mut conn), 0);
}

/// `failed retry --all` listed jobs newest first and retried them in that
/// order, so an aggregate's later event overtook its earlier one (issue
/// 27). Named ids and `--all` now go back oldest event first per
/// aggregate, by the event's position in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_all_and_named_ids_keep_each_aggregates_order() {
    let db = TestDatabase::create().unwrap();
    let exchange = TestExchange::new().await.unwrap();
    let channel = &exchange.channel;
    let queue = format!("{TEST_AMQP_PREFIX}{}.ordered", Uuid::now_v7().simple());
    expiring_queue(channel, &queue).await;
    let mut conn = db.connect().unwrap();
    let mut ticks = Vec::new();
    for n in 0..3 {
        for aggregate in ["a", "b"] {
            let ids = outbox::testing::record_ticks(&mut conn, aggregate, n..n + 1).unwrap();
            ticks.push((aggregate, n, ids[0]));
        }
    }
    // Failed newest event first, as a listener working through a backlog
    // after an outage would leave them.
    let fail_all = |conn: &mut PgConnection| -> Vec<String> {
        ticks
            .iter()
            .rev()
            .map(|(aggregate, n, event_id)| {
                let payload = serde_json::json!({
                    "specversion": "1.0", "id": event_id, "type": "counter.ticked", "source": "/outbox/test",
                    "subject": aggregate, "aggregatetype": "counter", "time": Utc::now(),
                    "data": {"aggregate": aggregate, "n": n}
                });
                let (id, _) = failed_jobs::insert(
                    conn,
                    &NewFailedJob {
                        queue: &queue,
                        listener: "ordered",
                        event_id: Some(*event_id),
                        event_type: Some("counter.ticked"),
                        payload: &payload,
                        exception: "down",
                        attempts: 1,
                        errors: &[],
                        uuid: None,
                    },
                )
                .unwrap();
                id.to_string()
            })
            .collect()
    };
    let in_order = |arrived: &[(String, i64)]| {
        ["a", "b"].iter().all(|aggregate| {
            let ns: Vec<i64> = arrived
                .iter()
                .filter(|(a, _)| a == aggregate)
                .map(|(_, n)| *n)
                .collect();
            ns == vec![0, 1, 2]
        })
    };
    let env = [("DATABASE_URL", db.url())];

    let ids = fail_all(&mut conn);
    let (status, stdout, stderr) = run_outbox(&["failed", "retry", "--all", "--listener", "ordered"], &env);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("retried 6 of 6"), "{stdout}");
    let arrived = outbox::testing::take_ticks(channel, &queue, 6, Duration::from_secs(20)).await;
    assert!(
        in_order(&arrived),
        "--all reordered an aggregate: {arrived:?} (jobs {ids:?})"
    );

    let ids = fail_all(&mut conn);
    let mut args = vec!["failed", "retry"];
    args.extend(ids.iter().map(String::as_str));
    let (status, stdout, stderr) = run_outbox(&args, &env);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("retried 6 of 6"), "{stdout}");
    let arrived = outbox::testing::take_ticks(channel, &queue, 6, Duration::from_secs(20)).await;
    assert!(
        in_order(&arrived),
        "named ids reordered an aggregate: {arrived:?} (jobs {ids:?})"
    );
    assert_eq!(failed_job_count(&mut conn), 0);

    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
}
