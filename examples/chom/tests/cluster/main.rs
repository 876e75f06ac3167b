//! CHOM on a three-node RabbitMQ cluster of the test's own
//! (`fixture.rs`), with quorum queues replicated on all three nodes,
//! through node failures under steady CHOM traffic (`traffic.rs`: site
//! lifecycles through CHOM's services, CHOM's listeners as `chom work`
//! runs them): the node the relay is connected to SIGKILLed, the quorum
//! leader of a listener's queue SIGKILLed, and a rolling restart of the
//! three nodes. After each, nothing committed is missing at the
//! listeners (an audit row, an activity line, a notification where one
//! is due, a probe effect), no effect is applied twice (the inbox probe),
//! per-aggregate order holds at the ordered listener (single active
//! consumer), and the figures are printed. Then a Postgres standby is
//! promoted under the same traffic (`standby.rs`).
//!
//! One test function runs the phases on one cluster: starting a cluster
//! costs ~20 s of the CI's budget.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;
mod postgres;
mod standby;
mod traffic;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use diesel::prelude::*;
use outbox::consumer::topology;
use outbox::testing::{DeliveryReport, count, eventually};
use outbox::{Relay, RelayConfig, TestDatabase, Worker, WorkerConfig};

use fixture::RabbitCluster;
use traffic::{Figures, Ordered, Writer};

/// Runs blocking fixture work (rabbitmqctl calls take a second) off the
/// async workers, which the relay and the worker need meanwhile.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A relay and a worker, each running on its own task until stopped.
pub(crate) struct Pipeline {
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<outbox::Result<()>>)>,
}

impl Pipeline {
    pub(crate) fn start(relay: Relay, worker: Worker) -> Self {
        let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
        let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(async move {
            relay
                .run(async {
                    let _ = relay_stopped.await;
                })
                .await
        });
        let worker = tokio::spawn(async move {
            worker
                .run(async {
                    let _ = worker_stopped.await;
                })
                .await
        });
        Self {
            stop: vec![stop_relay, stop_worker],
            tasks: vec![("relay", relay), ("worker", worker)],
        }
    }

    /// Stops both and waits (30 s each); what went wrong, if anything.
    pub(crate) async fn stop(self) -> Vec<String> {
        for stop in self.stop {
            let _ = stop.send(());
        }
        let mut problems = Vec::new();
        for (what, task) in self.tasks {
            match tokio::time::timeout(Duration::from_secs(30), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => problems.push(format!("{what}: {}", outbox::error_chain(&error))),
                Ok(Err(join)) => problems.push(format!("{what} task: {join}")),
                Err(_) => problems.push(format!("{what} did not stop within 30 s")),
            }
        }
        problems
    }
}

/// Waits until every event recorded more than a second ago has its effect.
async fn caught_up(conn: &mut PgConnection, limit: Duration, what: &str) {
    eventually(what, limit, || {
        traffic::undelivered_older_than(conn, Duration::from_secs(1)) == 0
    })
    .await;
}

/// Runs `fault`, waits until delivery has caught up again, then runs
/// `restore` and waits for a steady state; returns the figures of the
/// window from the fault to the catch-up.
async fn phase<F, Fut>(
    name: &str,
    conn: &mut PgConnection,
    ordered: &Ordered,
    fault: F,
    restore: impl FnOnce() + Send + 'static,
) -> Figures
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    caught_up(conn, Duration::from_secs(30), &format!("steady before {name}")).await;
    let republished_before = traffic::republished(conn);
    let started = Utc::now();
    let clock = Instant::now();
    fault().await;
    // At least two seconds, so the window holds the outage.
    eventually(
        &format!("delivery caught up after {name}"),
        Duration::from_secs(90),
        || {
            clock.elapsed() > Duration::from_secs(2)
                && traffic::undelivered_older_than(conn, Duration::from_secs(1)) == 0
        },
    )
    .await;
    let recovered = Utc::now();
    blocking(restore).await;
    caught_up(
        conn,
        Duration::from_secs(60),
        &format!("steady after restoring from {name}"),
    )
    .await;
    let republished = traffic::republished(conn) - republished_before;
    let figures = traffic::figures(conn, name, started, recovered, &ordered.snapshot(), republished);
    println!("{figures:?}");
    figures
}

/// One test, so that one cluster serves both parts: the RabbitMQ
/// failovers, then the Postgres promotions (whose broker is the same
/// cluster, so that they depend on nothing the machine's own broker went
/// through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_lose_nothing() {
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let cluster = Arc::new(blocking(|| RabbitCluster::start(3)).await);
    broker_failovers(&cluster).await;
    standby_promotions(&cluster).await;
    // Dropping the last handle kills the nodes and removes their files.
    drop(cluster);
}

/// SIGKILL the relay's node, SIGKILL the queue leader, restart the three
/// nodes one at a time, under steady traffic.
async fn broker_failovers(cluster: &Arc<RabbitCluster>) {
    let begun = Instant::now();
    let db = TestDatabase::create_empty().unwrap();
    let mut conn = db.connect().unwrap();
    chom::migrate(&mut conn).unwrap();
    diesel::sql_query(traffic::EFFECTS_TABLE)
        .execute(&mut conn)
        .unwrap();

    let id = uuid::Uuid::now_v7().simple().to_string();
    let exchange = format!("outbox_test.{id}");
    let app = format!("outbox_test.k{}", &id[16..]);
    let ordered = Ordered::default();
    let registry = traffic::registry(&ordered);
    let pid = std::process::id();
    let worker = Worker::new(
        WorkerConfig {
            database_url: db.url().to_owned(),
            // The worker starts on the second node, the relay on the first.
            amqp_url: cluster.url_list(&[1, 2, 0]),
            exchange: exchange.clone(),
            app: app.clone(),
            worker_id: format!("cluster-worker-{pid}"),
            quorum_initial_group_size: Some(3),
            shutdown_timeout: Duration::from_secs(10),
            ..WorkerConfig::default()
        },
        &registry,
    )
    .unwrap();
    let queues = worker.queues();
    let audit_queue = queues
        .iter()
        .find(|q| q.listener == chom::listeners::RECORD_AUDIT_LOG)
        .unwrap()
        .queue
        .clone();

    // The topology, declared over the third node: the queues' leaders
    // are placed there (client-local), away from the relay's and the
    // worker's nodes, so the first fault hits the relay alone.
    {
        let connection = outbox::amqp::connect(&cluster.nodes[2].amqp_url(), "cluster test")
            .await
            .unwrap();
        let channel = outbox::amqp::open_channel(&connection, false).await.unwrap();
        outbox::amqp::declare_exchange(&channel, &exchange).await.unwrap();
        for listener in &queues {
            topology::declare_listener(&channel, &exchange, listener)
                .await
                .unwrap();
        }
        // The group size is a queue argument like the others: declaring
        // a queue again with another one (or none) is refused, so it must
        // be chosen before the queues are created (docs/cluster.md).
        let other = queues[0].clone().with_quorum_initial_group_size(None);
        let refused = topology::declare_listener(&channel, &exchange, &other).await;
        let message = format!("{:?}", refused.err());
        assert!(
            message.contains("inequivalent arg 'x-quorum-initial-group-size'"),
            "{message}"
        );
        let _ = connection.close(200, "declared".into()).await;
    }
    let (leader, online) = {
        let (cluster, queue) = (Arc::clone(cluster), audit_queue.clone());
        blocking(move || cluster.queue_leader(&queue)).await.unwrap()
    };
    println!("{audit_queue}: leader {leader}, online members {online:?}");
    assert_eq!(online.len(), 3, "replicated on the three nodes");
    assert_eq!(leader, cluster.nodes[2].name, "declared from the third node");

    let relay_id = format!("cluster-relay-{pid}");
    let relay = Relay::new(RelayConfig {
        database_url: db.url().to_owned(),
        amqp_url: cluster.url_list(&[0, 1, 2]),
        exchange: exchange.clone(),
        relay_id: relay_id.clone(),
        ..RelayConfig::default()
    })
    .unwrap();
    let pipeline = Pipeline::start(relay, worker);

    // Steady traffic: 50 events a second over ten sites at a time.
    let mut writer = Writer::start(db.url(), Duration::from_millis(20));
    caught_up(&mut conn, Duration::from_secs(60), "the first events delivered").await;
    let relay_connection = format!("outbox-relay {relay_id}");
    let mut all = Vec::new();

    // 1. SIGKILL the node the relay is connected to.
    let relay_node = {
        let (cluster, name) = (Arc::clone(cluster), relay_connection.clone());
        blocking(move || cluster.node_of_connection(&name).cloned())
            .await
            .unwrap()
    };
    println!("relay connected to {}", relay_node.name);
    let (kill, restore) = (Arc::clone(cluster), Arc::clone(cluster));
    let node = relay_node.clone();
    let restored = relay_node.clone();
    all.push(
        phase(
            &format!("SIGKILL the relay's node ({})", relay_node.short()),
            &mut conn,
            &ordered,
            || async move { blocking(move || kill.kill(&node)).await },
            move || restart(&restore, &restored),
        )
        .await,
    );

    // 2. SIGKILL the quorum leader of the inbox listener's queue.
    let leader = {
        let (cluster, queue) = (Arc::clone(cluster), audit_queue.clone());
        blocking(move || cluster.queue_leader(&queue)).await.unwrap().0
    };
    let leader_node = cluster.node(&leader).clone();
    let (kill, restore) = (Arc::clone(cluster), Arc::clone(cluster));
    let node = leader_node.clone();
    let restored = leader_node.clone();
    all.push(
        phase(
            &format!("SIGKILL the queue leader ({})", leader_node.short()),
            &mut conn,
            &ordered,
            || async move { blocking(move || kill.kill(&node)).await },
            move || restart(&restore, &restored),
        )
        .await,
    );

    // 3. Restart the three nodes one at a time, each once no quorum queue
    //    needs it for its majority.
    let rolling = Arc::clone(cluster);
    all.push(
        phase(
            "rolling restart of the three nodes",
            &mut conn,
            &ordered,
            || async move {
                blocking(move || {
                    for node in &rolling.nodes {
                        let deadline = Instant::now() + Duration::from_secs(60);
                        loop {
                            let (safe, said) = rolling.safe_to_stop(node);
                            if safe {
                                break;
                            }
                            assert!(
                                Instant::now() < deadline,
                                "{} stays quorum critical: {said}\nmembers: {:?}",
                                node.name,
                                rolling.queue_members()
                            );
                            std::thread::sleep(Duration::from_millis(500));
                        }
                        rolling.stop(node);
                        restart(&rolling, node);
                    }
                })
                .await
            },
            || {},
        )
        .await,
    );

    // Every event delivered, once in effect, in order.
    let recorded = writer.stop();
    let committed = count(&mut conn, "SELECT count(*) AS n FROM outbox_events");
    eventually(
        "every event delivered to every listener",
        Duration::from_secs(60),
        || {
            traffic::undelivered_older_than(&mut conn, Duration::ZERO) == 0
                && traffic::chom_backlog(&mut conn) == 0
                && traffic::first_arrival_order(&ordered.snapshot())
                    .values()
                    .map(Vec::len)
                    .sum::<usize>() as i64
                    == committed
        },
    )
    .await;
    // The report first, so a run that breaks a promise prints it too.
    let reports = traffic::delivery_reports(&mut conn, &ordered);
    for report in &reports {
        println!("{report}");
    }
    let broken: Vec<String> = reports.iter().flat_map(DeliveryReport::broken_promises).collect();
    assert!(broken.is_empty(), "broken promises: {broken:?}");
    // The writer counts the commits it saw; one cut off by a database
    // restart may have committed unseen, never the other way round.
    assert!(
        committed as u64 >= recorded,
        "{committed} committed, {recorded} seen"
    );
    assert_eq!(
        count(&mut conn, "SELECT count(DISTINCT event_id) AS n FROM effects"),
        committed,
        "nothing committed is missing"
    );
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM effects"),
        committed,
        "no effect applied twice"
    );
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM audit_logs"),
        committed,
        "one audit row per event (RecordAuditLog)"
    );
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"),
        0,
        "no listener gave up on an event"
    );
    let committed_order = traffic::committed_order(&mut conn);
    let arrived = traffic::first_arrival_order(&ordered.snapshot());
    assert_eq!(arrived.len(), committed_order.len(), "every aggregate delivered");
    for (aggregate, events) in arrived {
        assert_eq!(
            Some(&events),
            committed_order.get(&aggregate),
            "per-aggregate order at the ordered listener, {aggregate}"
        );
    }
    let deliveries = ordered.snapshot().len();
    traffic::print_figures(&all);
    println!(
        "{committed} events committed, all delivered; the listener without an inbox got {deliveries} deliveries ({} duplicates); {} rows published more than once; {:.0} s in all",
        deliveries as i64 - committed,
        traffic::republished(&mut conn),
        begun.elapsed().as_secs_f64()
    );

    let problems = pipeline.stop().await;
    assert!(problems.is_empty(), "{problems:?}");
    drop(conn);
    drop(db);
}

/// Starts `node` again and waits until it runs in the cluster and every
/// quorum queue has all its members online again.
fn restart(cluster: &RabbitCluster, node: &fixture::Node) {
    cluster.spawn(node);
    cluster.await_startup(node, Duration::from_secs(120));
    cluster.await_running(cluster.nodes.len(), Duration::from_secs(60));
    cluster.await_members(cluster.nodes.len(), Duration::from_secs(60));
}

/// A Postgres primary crashed with commits its standby lacks, the
/// standby promoted; without and with the phantom guard.
async fn standby_promotions(cluster: &Arc<RabbitCluster>) {
    let begun = Instant::now();
    let brokers = cluster.url_list(&[0, 1, 2]);
    let without = standby::promote_under_traffic(&brokers, false).await;
    println!("{without:?}");
    let with = standby::promote_under_traffic(&brokers, true).await;
    println!("{with:?}");
    println!(
        "{:<14} {:>12} {:>12} {:>20} {:>9} {:>13} {:>16} {:>10}",
        "phantom guard",
        "p50 latency",
        "p99 latency",
        "committed, unsynced",
        "phantoms",
        "lost commits",
        "standby rebuilt",
        "resumed"
    );
    for run in [&without, &with] {
        println!(
            "{:<14} {:>9.1} ms {:>9.1} ms {:>20} {:>9} {:>13} {:>13.0} ms {:>7.0} ms",
            if run.guard { "on" } else { "off" },
            run.p50_ms,
            run.p99_ms,
            run.committed_while_paused,
            run.phantoms,
            run.lost_commits,
            run.standby_rebuilt_ms,
            run.resumed_ms
        );
    }
    println!("{:.0} s in all", begun.elapsed().as_secs_f64());
    assert!(
        without.phantoms > 0,
        "without the guard, events the standby lacked should have been published (the test provokes phantoms)"
    );
    assert_eq!(
        with.phantoms, 0,
        "with the guard, no event the new primary lacks is delivered"
    );
}
