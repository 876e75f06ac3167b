//! `chom topology` and `chom work` as an operator runs them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chom::listeners::ListenerConfig;
use outbox::TestDatabase;

use crate::pipeline::{BrokerNames, amqp_url, queue_state};

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_declares_every_listeners_queues() {
    let broker = BrokerNames::new(&ListenerConfig::default());
    let output = Command::new(env!("CARGO_BIN_EXE_chom"))
        .args([
            "topology",
            "--exchange",
            &broker.exchange,
            "--app",
            &broker.app,
            "--json",
        ])
        .env("AMQP_URL", amqp_url())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listed["declared"], true);
    // CHOM's four (two of them projections), webhook_fanout and webhook_delivery.
    assert_eq!(listed["listeners"].as_array().unwrap().len(), 6);
    assert_eq!(broker.queues.len() + broker.webhook_queues.len(), 6);
    for queues in broker.queues.iter().chain(&broker.webhook_queues) {
        for queue in queues.all_queues() {
            assert_eq!(queue_state(queue).await, (0, 0), "{queue} exists, empty");
        }
    }
    let notify = broker.queue("send_notification");
    let mut expected = chom::listeners::NOTIFIED_EVENT_TYPES.to_vec();
    expected.sort_unstable();
    assert_eq!(notify.event_types, expected, "bound to exactly its events");
    assert!(
        notify
            .event_types
            .contains(&"ssl.certificate_expiring".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_serves_health_and_metrics_and_stops_on_sigterm() {
    let db = TestDatabase::create_empty().unwrap();
    chom::migrate(&mut db.connect().unwrap()).unwrap();
    let broker = BrokerNames::new(&ListenerConfig::default());
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chom"))
        .args([
            "work",
            "--exchange",
            &broker.exchange,
            "--app",
            &broker.app,
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .env("DATABASE_URL", db.url())
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        if let Some((200, body)) = http_get(port, "/health") {
            break body;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chom work did not report healthy on /health");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(health.contains("\"broker\":true"), "{health}");
    // Prometheus text (empty until something is counted).
    let (status, _) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chom work did not stop on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "graceful exit: {status}");
    for queues in &broker.queues {
        assert_eq!(queue_state(&queues.queue).await.1, 0, "consumer gone");
    }
}
