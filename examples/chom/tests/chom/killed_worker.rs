//! A `chom work` process killed in the middle of a handler loses nothing
//! and duplicates no effect.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chom::services::sites;
use diesel::prelude::*;
use outbox::Metadata;

use crate::pipeline::{Pipeline, amqp_url, wait_for_consumers, wait_for_count};
use crate::support::{count, tenant_with_user};

/// Kills the child when dropped (the test failed before it could).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGTERM, then waits (bounded) for the worker to finish its work and exit.
async fn stop_gracefully(mut worker: ChildGuard) {
    let signalled = Command::new("kill")
        .args(["-TERM", &worker.0.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let mut status = None;
    outbox::testing::eventually("the worker to exit on SIGTERM", Duration::from_secs(30), || {
        status = worker.0.try_wait().unwrap();
        status.is_some()
    })
    .await;
    assert!(status.is_some_and(|s| s.success()), "graceful exit: {status:?}");
}

fn spawn_worker(p: &Pipeline) -> ChildGuard {
    spawn_worker_with(p, &amqp_url(), "off")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_handler_loses_nothing_and_duplicates_nothing() {
    let mut p = Pipeline::start(false).await;
    let (tenant, _) = tenant_with_user(&mut p.conn, "Acme");
    let mut worker = spawn_worker(&p);
    for queues in &p.broker.queues {
        wait_for_consumers(&queues.queue, 1).await;
    }

    // Hold RecordAuditLog inside its handler: inserts into audit_logs wait
    // for this lock.
    let mut blocker = p.db.connect().unwrap();
    diesel::sql_query("BEGIN").execute(&mut blocker).unwrap();
    diesel::sql_query("LOCK TABLE audit_logs IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut blocker)
        .unwrap();
    let created =
        sites::create_site(&p.outbox, &mut p.conn, Metadata::system(), tenant.id, "a.test").unwrap();
    wait_for_count(
        &mut p.conn,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO %audit_logs%'",
        1,
    )
    .await;

    // SIGKILL: no shutdown, no ack, no commit.
    worker.0.kill().unwrap();
    worker.0.wait().unwrap();
    diesel::sql_query("COMMIT").execute(&mut blocker).unwrap();
    assert_eq!(count(&mut p.conn, "SELECT count(*) AS n FROM audit_logs"), 0);

    // Another worker takes the message over.
    let replacement = spawn_worker(&p);
    let sql = format!(
        "SELECT count(*) AS n FROM audit_logs WHERE event_id = '{}'",
        created.event_id
    );
    wait_for_count(&mut p.conn, &sql, 1).await;
    wait_for_count(
        &mut p.conn,
        &format!(
            "SELECT count(*) AS n FROM processed_events WHERE listener = 'record_audit_log' AND event_id = '{}'",
            created.event_id
        ),
        1,
    )
    .await;
    // Let the replacement drain everything, then stop it gracefully: it
    // finishes and acks whatever it still holds (a redelivery in flight is
    // not in the queue's ready count), so the counts below are final.
    let queue = p.broker.queue("record_audit_log").queue.clone();
    crate::pipeline::wait_for_messages(&queue, 0).await;
    stop_gracefully(replacement).await;
    p.stop().await;
    let mut conn = p.db.connect().unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM audit_logs"),
        1,
        "one effect"
    );
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"),
        0,
        "nothing failed"
    );
}

/// Like [`spawn_worker`], with its broker URL and metrics address.
fn spawn_worker_with(p: &Pipeline, amqp: &str, metrics_addr: &str) -> ChildGuard {
    let child = Command::new(env!("CARGO_BIN_EXE_chom"))
        .args([
            "work",
            "--exchange",
            &p.broker.exchange,
            "--app",
            &p.broker.app,
            "--metrics-addr",
            metrics_addr,
            "--tries",
            "3",
            "--backoff",
            "100ms,200ms",
        ])
        .env("DATABASE_URL", p.db.url())
        .env("AMQP_URL", amqp)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chom work");
    ChildGuard(child)
}

/// `outbox_listener_outcomes_total` of `listener` and `outcome` on the
/// worker's `/metrics` (0 while it does not answer yet).
fn outcomes(metrics_addr: &str, listener: &str, outcome: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(metrics_addr) else {
        return 0.0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return 0.0;
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.lines()
        .filter(|line| line.starts_with("outbox_listener_outcomes_total{"))
        .filter(|line| {
            line.contains(&format!("listener=\"{listener}\""))
                && line.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_between_a_batchs_commit_and_its_acks_applies_each_event_once() {
    let mut p = Pipeline::start(false).await;
    let (tenant, _) = tenant_with_user(&mut p.conn, "Acme");
    let proxy = outbox::testing::TcpProxy::start("127.0.0.1:5672").await.unwrap();
    let mut worker = spawn_worker_with(&p, &proxy.amqp_url(), "off");
    for queues in &p.broker.queues {
        wait_for_consumers(&queues.queue, 1).await;
    }

    // Every byte between the worker and the broker now takes 1.5 s: when a
    // batch's audit rows are committed, its acks are still on the way.
    proxy.set_fault(outbox::testing::Fault::Latency(Duration::from_millis(1500)));
    for i in 0..10 {
        sites::create_site(
            &p.outbox,
            &mut p.conn,
            Metadata::system(),
            tenant.id,
            &format!("s{i}.test"),
        )
        .unwrap();
    }
    wait_for_count(&mut p.conn, "SELECT count(*) AS n FROM audit_logs", 10).await;
    // SIGKILL after the commit, and the acks in flight are dropped with the
    // connection: the broker redelivers all ten.
    worker.0.kill().unwrap();
    worker.0.wait().unwrap();
    proxy.cut(true);

    let metrics_addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let replacement = spawn_worker_with(&p, &amqp_url(), &metrics_addr);
    let queue = p.broker.queue("record_audit_log").queue.clone();
    outbox::testing::eventually(
        "the redelivered messages acknowledged as duplicates",
        Duration::from_secs(30),
        || outcomes(&metrics_addr, "record_audit_log", "duplicate") >= 1.0,
    )
    .await;
    crate::pipeline::wait_for_messages(&queue, 0).await;
    drop(replacement);
    p.stop().await;
    let mut conn = p.db.connect().unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM audit_logs"),
        10,
        "one effect each"
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM processed_events WHERE listener = 'record_audit_log'"
        ),
        10
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
}
