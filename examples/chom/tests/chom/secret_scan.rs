//! The secret scan: a CHOM flow that creates and rotates VPS credentials
//! and API tokens runs through the relay, RabbitMQ and a worker; then every
//! recorded payload and envelope, every message as published, the audit
//! and notification rows, and every log line of the run are searched for
//! the secrets handed out and their hashes. None may hold one.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::Text;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tracing::Dispatch;

use crate::accounts::flow;
use crate::pipeline::{Pipeline, amqp_url, wait_for_count};

/// Log lines, as the subscriber wrote them.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

#[derive(QueryableByName)]
struct Json {
    #[diesel(sql_type = Text)]
    row: String,
}

/// Every row of `table` as JSON text.
fn rows_of(conn: &mut PgConnection, table: &str) -> Vec<String> {
    diesel::sql_query(format!("SELECT row_to_json(t)::text AS row FROM {table} t"))
        .load::<Json>(conn)
        .unwrap()
        .into_iter()
        .map(|j| j.row)
        .collect()
}

#[test]
fn no_secret_reaches_an_event_a_message_a_row_or_a_log_line() {
    // Everything this test's threads log, at every level, into a buffer:
    // the test thread and every thread of the runtime running the relay and
    // the worker (their blocking pools included).
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "trace,lapin=debug,amq_protocol=info,amq_protocol_types=info,pinky_swear=info,async_io=info,polling=info,rustls=info,reqwest=info,hyper=info,hyper_util=info",
        ))
        .finish();
    let dispatch = Dispatch::new(subscriber);
    let _test_thread = tracing::dispatcher::set_default(&dispatch);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start({
            let dispatch = dispatch.clone();
            move || std::mem::forget(tracing::dispatcher::set_default(&dispatch))
        })
        .build()
        .unwrap();

    let (flow, mut texts) = runtime.block_on(async {
        let mut p = Pipeline::start(true).await;
        // A tap on the exchange: every message exactly as the relay
        // published it. Exclusive: gone when its connection closes.
        let tap_connection = outbox::amqp::connect(&amqp_url(), "chom secret scan")
            .await
            .unwrap();
        let tap = tap_connection.create_channel().await.unwrap();
        let tap_queue = format!("{}.secret_scan_tap", p.broker.app);
        tap.queue_declare(
            tap_queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        tap.queue_bind(
            tap_queue.as_str().into(),
            p.broker.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

        let flow = flow(&p.outbox, &mut p.conn);
        let events = flow.event_ids.len() as i64;
        wait_for_count(&mut p.conn, "SELECT count(*) AS n FROM audit_logs", events).await;
        // Two current members, six notified events.
        wait_for_count(&mut p.conn, "SELECT count(*) AS n FROM notifications", 12).await;
        let mut texts = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut published = 0;
        while published < events {
            match tap
                .basic_get(tap_queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                Some(message) => {
                    published += 1;
                    texts.push(String::from_utf8_lossy(&message.delivery.data).into_owned());
                    texts.push(format!("{:?}", message.delivery.properties));
                }
                None => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{published} of {events} messages published"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let _ = tap_connection.close(200, "scanned".into()).await;
        p.stop().await;
        for table in [
            "outbox_events",
            "audit_logs",
            "notifications",
            "failed_jobs",
            "processed_events",
            "security_incidents",
            "vps_servers",
            "quota_breaches",
        ] {
            texts.extend(rows_of(&mut p.conn, table));
        }
        // The hashes are where they belong, so the scan below would find one
        // that strayed.
        let stored = rows_of(&mut p.conn, "api_tokens").join("\n")
            + &rows_of(&mut p.conn, "vps_credentials").join("\n");
        // Both VPS credentials (the old one revoked) and the current token
        // (a rotation replaces the token's hash).
        for secret in [&flow.secrets[0], &flow.secrets[1], &flow.secrets[3]] {
            assert!(stored.contains(&secret.sha256_hex()), "the hash is stored");
        }
        (flow, texts)
    });
    drop(runtime);

    let logs = logs.text();
    // Per-callsite interest is cached process-wide by tracing, and other
    // tests of this binary run beside this one with other subscribers, so
    // which lines reach this buffer varies from run to run; some of the
    // relay's and the worker's always do.
    assert!(
        logs.contains("outbox::relay") && logs.contains("outbox::consumer"),
        "the relay's and the worker's log lines were captured:\n{logs}"
    );
    texts.push(logs);
    assert_eq!(flow.secrets.len(), 4);
    let events = texts
        .iter()
        .filter(|t| {
            t.contains("security.vps_credentials_rotated") || t.contains("security.api_token_rotated")
        })
        .count();
    assert!(
        events >= 4,
        "the rotations' events, messages and audit rows were scanned"
    );
    for secret in &flow.secrets {
        let text = secret.expose();
        // The random part alone, in case a prefix was stripped.
        let random = &text[text.len() - 64..];
        let hash = secret.sha256_hex();
        for needle in [
            random.to_owned(),
            random.to_uppercase(),
            hash.clone(),
            hash.to_uppercase(),
        ] {
            if let Some(line) = texts
                .iter()
                .flat_map(|t| t.lines())
                .find(|line| line.contains(&needle))
            {
                panic!("a secret or its hash leaked into: {line}");
            }
        }
    }
}
