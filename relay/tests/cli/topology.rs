//! `outbox topology declare | delete | purge-dead` against the real broker,
//! with names of their own, removed at the end even when a test fails.

use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use outbox::consumer::{HandlerContext, ListenerError, QueuedListener, ReceivedEvent};
use outbox::testing::TEST_AMQP_PREFIX;
use outbox::{DEFAULT_AMQP_URL, ListenerOptions, Registry, TestDatabase, Worker, WorkerConfig};
use uuid::Uuid;

use crate::support::run_outbox;

/// An app prefix and exchange of one test; dropping it deletes every
/// queue the test may have made, and the exchange.
struct Names {
    app: String,
    exchange: String,
    extra_queues: Vec<String>,
}

impl Names {
    fn new() -> Self {
        let id = Uuid::now_v7().simple();
        Self {
            app: format!("{TEST_AMQP_PREFIX}t{id}"),
            exchange: format!("{TEST_AMQP_PREFIX}{id}.events"),
            extra_queues: Vec::new(),
        }
    }

    /// `outbox topology declare` of `listeners` on this app and exchange,
    /// bound to `event_types`, with `extra` flags.
    fn declare(&self, listeners: &[&str], event_types: &[&str], extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            "topology",
            "declare",
            "--app",
            &self.app,
            "--exchange",
            &self.exchange,
        ];
        args.extend(listeners.iter().flat_map(|l| ["--listener", l]));
        args.extend(event_types.iter().flat_map(|t| ["--event-type", t]));
        args.extend(extra);
        args.into_iter().map(str::to_owned).collect()
    }

    fn queue(&self, listener: &str) -> String {
        format!("{}.{listener}", self.app)
    }

    /// Every queue of `listener` with the development delays.
    fn queues_of(&self, listener: &str) -> Vec<String> {
        let queue = self.queue(listener);
        vec![
            format!("{queue}.retry.1s"),
            format!("{queue}.retry.2s"),
            format!("{queue}.dead"),
            queue,
        ]
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        let mut queues = self.extra_queues.clone();
        for listener in ["alpha", "beta"] {
            queues.extend(self.queues_of(listener));
        }
        outbox::testing::delete_broker_objects(
            DEFAULT_AMQP_URL,
            &queues,
            std::slice::from_ref(&self.exchange),
        );
    }
}

async fn connect() -> Connection {
    outbox::amqp::connect(DEFAULT_AMQP_URL, "topology test")
        .await
        .unwrap()
}

async fn depth(connection: &Connection, queue: &str) -> Option<u32> {
    outbox::amqp::queue_depth(connection, queue).await.unwrap()
}

async fn wait_depth(connection: &Connection, queue: &str, wanted: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = depth(connection, queue).await;
        if now == Some(wanted) {
            return;
        }
        assert!(Instant::now() < deadline, "{queue} holds {now:?}, not {wanted}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn exchange_exists(connection: &Connection, exchange: &str) -> bool {
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    declared.is_ok()
}

/// Publishes one confirmed message; whether a queue took it.
async fn publish(connection: &Connection, exchange: &str, routing_key: &str) -> bool {
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirmation = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    confirmation == lapin::Confirmation::Ack(None)
}

struct Quiet(&'static str);

impl QueuedListener for Quiet {
    fn name(&self) -> &str {
        self.0
    }
    fn handle(&self, _: &ReceivedEvent, _: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_matches_the_worker_and_delete_removes_queues_then_the_exchange() {
    let names = Names::new();
    let (app, exchange) = (names.app.as_str(), names.exchange.as_str());
    let declare = names.declare(
        &["alpha", "beta"],
        &["thing.happened", "thing.done"],
        &["--retry-delays", "1s,2s"],
    );
    let declare: Vec<&str> = declare.iter().map(String::as_str).collect();
    let mut with_json = declare.to_vec();
    with_json.push("--json");
    let (status, stdout, stderr) = run_outbox(&with_json, &[]);
    assert_eq!(status, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["exchange"], exchange);
    assert_eq!(json["listeners"][0]["queue"], names.queue("alpha"));
    assert_eq!(
        json["listeners"][1]["retry_queues"][1]["queue"],
        format!("{}.retry.2s", names.queue("beta"))
    );
    assert_eq!(json["listeners"][0]["delivery_limit"], 8);

    let connection = connect().await;
    for listener in ["alpha", "beta"] {
        for queue in names.queues_of(listener) {
            assert_eq!(depth(&connection, &queue).await, Some(0), "{queue}");
        }
    }
    // Bound to both types: each listener's queue gets each event.
    assert!(publish(&connection, exchange, "thing.happened").await);
    assert!(publish(&connection, exchange, "thing.done").await);
    assert!(
        !publish(&connection, exchange, "thing.unknown").await,
        "not bound"
    );
    wait_depth(&connection, &names.queue("alpha"), 2).await;
    wait_depth(&connection, &names.queue("beta"), 2).await;

    // The worker of a listener with the same options declares the same
    // queues without PRECONDITION_FAILED; declaring again is fine too.
    let registry = Registry::new()
        .queued_listener_with(
            &["thing.happened", "thing.done"],
            Quiet("alpha"),
            ListenerOptions::development(),
        )
        .unwrap();
    let worker = Worker::new(
        WorkerConfig {
            app: app.to_owned(),
            exchange: exchange.to_owned(),
            ..WorkerConfig::default()
        },
        &registry,
    )
    .unwrap();
    worker.declare_topology().await.unwrap();
    let (status, stdout, stderr) = run_outbox(&declare, &[]);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("declared exchange {exchange}")) && stdout.contains("retry"),
        "{stdout}"
    );

    // Queues holding messages are kept without --force, all of them.
    let delete = [
        "topology",
        "delete",
        "--app",
        app,
        "--listener",
        "alpha",
        "--listener",
        "beta",
        "--exchange",
        exchange,
        "--delete-exchange",
    ];
    let (status, _, stderr) = run_outbox(&delete, &[]);
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr.contains("nothing deleted") && stderr.contains(&format!("{} holds 2", names.queue("alpha"))),
        "{stderr}"
    );
    let mut dry_run = delete.to_vec();
    dry_run.extend(["--force", "--dry-run", "--json"]);
    let (status, stdout, stderr) = run_outbox(&dry_run, &[]);
    assert_eq!(status, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let alpha = &json["listeners"][0]["queues"];
    assert_eq!(alpha[0]["queue"], names.queue("alpha"));
    assert_eq!(alpha[0]["kind"], "main");
    assert_eq!(alpha[0]["messages"], 2);
    assert_eq!(alpha[0]["deleted"], false);
    for listener in ["alpha", "beta"] {
        for queue in names.queues_of(listener) {
            assert!(depth(&connection, &queue).await.is_some(), "{queue} kept");
        }
    }

    // --force: every queue, found by the preset delays, then the exchange.
    let mut forced = delete.to_vec();
    forced.push("--force");
    let (status, stdout, stderr) = run_outbox(&forced, &[]);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("deleted exchange {exchange}")),
        "{stdout}"
    );
    for listener in ["alpha", "beta"] {
        for queue in names.queues_of(listener) {
            assert_eq!(depth(&connection, &queue).await, None, "{queue} deleted");
            assert!(stdout.contains(&format!("deleted {queue}")), "{queue}: {stdout}");
        }
    }
    assert!(!exchange_exists(&connection, exchange).await);

    // Again: nothing left, still a success.
    let (status, stdout, stderr) = run_outbox(&delete, &[]);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.contains("none of the listeners' queues exist")
            && stdout.contains(&format!("not found: exchange {exchange}")),
        "{stdout}"
    );

    // Bad usage and bad names.
    let (status, _, stderr) = run_outbox(&["topology", "declare", "--app", app, "--listener", "alpha"], &[]);
    assert_eq!(status, 2, "--event-type is required: {stderr}");
    let (status, _, stderr) = run_outbox(&["topology", "delete", "--app", app], &[]);
    assert_eq!(status, 1, "no --listener and nothing registered: {stderr}");
    assert!(stderr.contains("name them with --listener"), "{stderr}");
    let (status, _, stderr) = run_outbox(&["topology", "purge-dead", "--app", app, "--yes"], &[]);
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("name at least one --listener"), "{stderr}");
    let (status, _, stderr) = run_outbox(
        &["topology", "delete", "--app", app, "--listener", "Not-A-Listener"],
        &[],
    );
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("listener name"), "{stderr}");
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exchange_stays_while_other_queues_are_bound_to_it() {
    let mut names = Names::new();
    let other = format!("{}.other", names.app);
    names.extra_queues.push(other.clone());
    let (app, exchange) = (names.app.clone(), names.exchange.clone());
    let declare = names.declare(&["alpha"], &["thing.happened"], &[]);
    let (status, _, stderr) = run_outbox(&declare.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_eq!(status, 0, "{stderr}");
    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(other.as_str().into(), Default::default(), FieldTable::default())
        .await
        .unwrap();
    channel
        .queue_bind(
            other.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let delete = [
        "topology",
        "delete",
        "--app",
        &app,
        "--listener",
        "alpha",
        "--exchange",
        &exchange,
        "--delete-exchange",
    ];
    let (status, _, stderr) = run_outbox(&delete, &[]);
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("still bound"), "{stderr}");
    assert_eq!(depth(&connection, &names.queue("alpha")).await, None);
    assert!(exchange_exists(&connection, &exchange).await, "kept");

    let mut forced = delete.to_vec();
    forced.push("--force");
    let (status, _, stderr) = run_outbox(&forced, &[]);
    assert_eq!(status, 0, "{stderr}");
    assert!(!exchange_exists(&connection, &exchange).await);
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_explains_dead_copies_and_purge_dead_empties_them() {
    let names = Names::new();
    let app = names.app.as_str();
    let declare = names.declare(&["alpha"], &["thing.happened"], &["--retry-delays", "1s,2s"]);
    let (status, _, stderr) = run_outbox(&declare.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_eq!(status, 0, "{stderr}");
    let connection = connect().await;
    let dead = format!("{}.dead", names.queue("alpha"));
    assert!(publish(&connection, "", &dead).await);
    assert!(publish(&connection, "", &dead).await);
    wait_depth(&connection, &dead, 2).await;

    let db = TestDatabase::create().unwrap();
    let env = [("DATABASE_URL", db.url())];
    let (status, stdout, stderr) = run_outbox(
        &[
            "status",
            "--app",
            app,
            "--listener",
            "alpha",
            "--retry-delays",
            "1s,2s",
        ],
        &env,
    );
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.contains("DEAD counts the copies kept in <queue>.dead for inspection")
            && stdout.contains(&format!(
                "outbox topology purge-dead --app {app} --listener alpha"
            )),
        "{stdout}"
    );

    let purge = ["topology", "purge-dead", "--app", app, "--listener", "alpha"];
    let (status, _, stderr) = run_outbox(&purge, &[]);
    assert_eq!(status, 1, "no terminal, no --yes: {stderr}");
    assert!(stderr.contains("--yes"), "{stderr}");
    assert_eq!(depth(&connection, &dead).await, Some(2));

    let mut yes = purge.to_vec();
    yes.extend(["--yes", "--json"]);
    let (status, stdout, stderr) = run_outbox(&yes, &[]);
    assert_eq!(status, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json[0]["queue"], dead.as_str());
    assert_eq!(json[0]["purged"], 2);
    assert_eq!(depth(&connection, &dead).await, Some(0));
    assert_eq!(
        depth(&connection, &names.queue("alpha")).await,
        Some(0),
        "only .dead"
    );
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_finds_registered_listeners_and_their_retry_queues_and_dry_run_prints_the_plan() {
    let mut names = Names::new();
    let (app, exchange) = (names.app.clone(), names.exchange.clone());
    let queue = names.queue("alpha");
    // Delays no preset has: only the registry names these retry queues.
    let retries = [format!("{queue}.retry.3s"), format!("{queue}.retry.7s")];
    names.extra_queues.extend(retries.iter().cloned());
    let registry = Registry::new()
        .queued_listener_with(
            &["thing.happened"],
            Quiet("alpha"),
            ListenerOptions::default().retries(3, &[Duration::from_secs(3), Duration::from_secs(7)]),
        )
        .unwrap();
    let worker = Worker::new(
        WorkerConfig {
            app: app.clone(),
            exchange: exchange.clone(),
            ..WorkerConfig::default()
        },
        &registry,
    )
    .unwrap();
    worker.declare_topology().await.unwrap();
    let connection = connect().await;
    assert!(publish(&connection, &exchange, "thing.happened").await);
    wait_depth(&connection, &queue, 1).await;
    // What the worker records in the registry when it runs.
    let db = TestDatabase::create().unwrap();
    {
        use diesel::RunQueryDsl;
        let mut conn = db.connect().unwrap();
        diesel::sql_query(format!(
            "INSERT INTO outbox_listeners (app, listener, exchange, queue, retry_queues, dead_queue, event_types, worker_id)
             VALUES ('{app}', 'alpha', '{exchange}', '{queue}', ARRAY['{}', '{}'], '{queue}.dead', ARRAY['thing.happened'], 'w1')",
            retries[0], retries[1]
        ))
        .execute(&mut conn)
        .unwrap();
    }
    let env = [("DATABASE_URL", db.url())];
    let delete = [
        "topology",
        "delete",
        "--app",
        &app,
        "--exchange",
        &exchange,
        "--delete-exchange",
    ];

    // The plan: every queue, the one holding a message flagged, exit 0.
    let mut dry_run = delete.to_vec();
    dry_run.push("--dry-run");
    let (status, stdout, stderr) = run_outbox(&dry_run, &env);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("would delete {queue} (1 message(s)): needs --force")),
        "{stdout}"
    );
    for q in retries.iter().chain([&format!("{queue}.dead")]) {
        assert!(
            stdout.contains(&format!("would delete {q} (0 message(s))")),
            "{q}: {stdout}"
        );
    }
    assert!(
        stdout.contains(&format!("would delete exchange {exchange}")),
        "{stdout}"
    );
    assert_eq!(
        depth(&connection, &queue).await,
        Some(1),
        "a dry run deletes nothing"
    );
    assert!(exchange_exists(&connection, &exchange).await);

    // For real: the registry's queues, its row, the exchange.
    let mut forced = delete.to_vec();
    forced.push("--force");
    let (status, stdout, stderr) = run_outbox(&forced, &env);
    assert_eq!(status, 0, "{stderr}");
    for q in retries.iter().chain([&queue, &format!("{queue}.dead")]) {
        assert_eq!(depth(&connection, q).await, None, "{q} deleted: {stdout}");
    }
    assert!(!exchange_exists(&connection, &exchange).await);
    let mut conn = db.connect().unwrap();
    assert_eq!(
        outbox::testing::count(&mut conn, "SELECT count(*) AS n FROM outbox_listeners"),
        0,
        "the deleted listener left the registry"
    );

    // Only the exchange: a bound queue of another listener stays.
    let declare = names.declare(&["beta"], &["thing.happened"], &["--retry-delays", "1s,2s"]);
    let (status, _, stderr) = run_outbox(&declare.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_eq!(status, 0, "{stderr}");
    let (status, stdout, stderr) = run_outbox(
        &[
            "topology",
            "delete",
            "--app",
            &app,
            "--exchange",
            &exchange,
            "--exchange-only",
            "--force",
        ],
        &env,
    );
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("deleted exchange {exchange}")),
        "{stdout}"
    );
    assert!(!exchange_exists(&connection, &exchange).await);
    assert_eq!(
        depth(&connection, &names.queue("beta")).await,
        Some(0),
        "beta's queue kept"
    );
    let _ = connection.close(200, "done".into()).await;
}
