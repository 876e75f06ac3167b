//! `outbox failed retry` with a real worker: a job one listener failed is
//! retried to that listener only; the other listener of the same event
//! never sees it again.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use diesel::RunQueryDsl;
use diesel::sql_types::{Text, Uuid as SqlUuid};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use outbox::consumer::{HandlerContext, ListenerError, ListenerOptions, QueuedListener, ReceivedEvent};
use outbox::testing::{TEST_AMQP_PREFIX, TestExchange};
use outbox::{DEFAULT_AMQP_URL, Registry, TestDatabase, Worker, WorkerConfig};
use uuid::Uuid;

use crate::support::{RelayChild, count, eventually, run_outbox};

/// Writes an `effects` row per call; fails permanently on the first call
/// when `fail_first` is set.
struct Counting {
    name: &'static str,
    fail_first: bool,
    calls: Arc<AtomicUsize>,
}

impl QueuedListener for Counting {
    fn name(&self) -> &str {
        self.name
    }

    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        let before = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_first && before == 0 {
            return Err(ListenerError::permanent("the first try always fails"));
        }
        diesel::sql_query("INSERT INTO effects (listener, event_id) VALUES ($1, $2)")
            .bind::<Text, _>(self.name)
            .bind::<SqlUuid, _>(event.event_id)
            .execute(ctx.conn()?)?;
        Ok(())
    }
}

/// Deletes the named queues when dropped, even during a panic.
struct DeleteQueues(Vec<String>);

impl Drop for DeleteQueues {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(connection) = outbox::amqp::connect(DEFAULT_AMQP_URL, "outbox test cleanup").await {
                    if let Ok(channel) = connection.create_channel().await {
                        for name in names {
                            let _ = channel
                                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                                .await;
                        }
                    }
                    let _ = connection.close(200, "bye".into()).await;
                }
            });
        })
        .join();
    }
}

fn effects(conn: &mut diesel::PgConnection, listener: &str) -> i64 {
    count(
        conn,
        &format!("SELECT count(*) AS n FROM effects WHERE listener = '{listener}'"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_reaches_only_the_listener_that_failed() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    diesel::sql_query("CREATE TABLE effects (listener TEXT NOT NULL, event_id UUID NOT NULL)")
        .execute(&mut conn)
        .unwrap();
    let exchange = TestExchange::new().await.unwrap();
    let app = format!("{TEST_AMQP_PREFIX}{}", Uuid::now_v7().simple());
    let (flaky_calls, steady_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // One at a time and without the inbox, so a duplicate would run the
    // handler again and would be handled before a later message.
    let options = ListenerOptions {
        tries: 1,
        prefetch: 1,
        concurrency: 1,
        inbox: false,
        ..ListenerOptions::default()
    };
    let registry = Registry::new()
        .queued_listener_with(
            &["counter.ticked"],
            Counting {
                name: "flaky",
                fail_first: true,
                calls: Arc::clone(&flaky_calls),
            },
            ListenerOptions {
                inbox: true,
                ..options.clone()
            },
        )
        .unwrap()
        .queued_listener_with(
            &["counter.ticked"],
            Counting {
                name: "steady",
                fail_first: false,
                calls: Arc::clone(&steady_calls),
            },
            options,
        )
        .unwrap();
    let plan = outbox::consumer::topology::plan(&app, &registry).unwrap();
    let _cleanup = DeleteQueues(
        plan.iter()
            .flat_map(|q| q.all_queues())
            .map(str::to_owned)
            .collect(),
    );
    outbox::consumer::topology::declare(&exchange.channel, &exchange.exchange, &app, &registry)
        .await
        .unwrap();
    let worker = Worker::new(
        WorkerConfig {
            database_url: db.url().to_owned(),
            exchange: exchange.exchange.clone(),
            app: app.clone(),
            shutdown_timeout: Duration::from_secs(10),
            ..WorkerConfig::default()
        },
        &registry,
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker_task = tokio::spawn(async move {
        worker
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    for queues in &plan {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let declared = exchange
                .channel
                .queue_declare(
                    queues.queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            if declared.consumer_count() > 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no consumer on {}",
                queues.queue
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let _relay = RelayChild::spawn(db.url(), DEFAULT_AMQP_URL, &exchange.exchange, &[]);
    let event = outbox::testing::record_ticks(&mut conn, "c1", 0..1).unwrap()[0];

    eventually(
        "steady's effect and flaky's failed job",
        Duration::from_secs(30),
        || {
            effects(&mut conn, "steady") == 1
                && count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 1
        },
    )
    .await;
    let job = outbox::failed_jobs::find_by_event(&mut conn, "flaky", event)
        .unwrap()
        .unwrap();
    assert_eq!(effects(&mut conn, "flaky"), 0);

    let (status, stdout, stderr) = run_outbox(
        &["failed", "retry", &job.id.to_string()],
        &[("DATABASE_URL", db.url())],
    );
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("retried 1 of 1"), "{stdout}");
    eventually("flaky's effect after the retry", Duration::from_secs(30), || {
        effects(&mut conn, "flaky") == 1
    })
    .await;
    assert!(outbox::failed_jobs::get(&mut conn, job.id).unwrap().is_none());

    // A later event reaches steady after anything the retry could have
    // put in its queue: once it is handled, steady has seen everything.
    outbox::testing::record_ticks(&mut conn, "c1", 1..2).unwrap();
    eventually("steady handles the later event", Duration::from_secs(30), || {
        effects(&mut conn, "steady") == 2
    })
    .await;
    assert_eq!(
        steady_calls.load(Ordering::SeqCst),
        2,
        "steady never got the retried message"
    );
    // flaky handles the later event on its own queue, concurrently.
    eventually("flaky handles the later event", Duration::from_secs(30), || {
        flaky_calls.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(
        flaky_calls.load(Ordering::SeqCst),
        3,
        "first try, retry, later event"
    );

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), worker_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
