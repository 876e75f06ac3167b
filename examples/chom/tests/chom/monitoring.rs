//! The operators' monitoring against the real thing: a Prometheus server
//! (Debian's `prometheus`, started here on a loopback port with the
//! scrape jobs of `deploy/prometheus/prometheus.yml`) scrapes a relay and a
//! `chom work` worker during a CHOM run, its HTTP API returns the backlog
//! and the listener outcome series, and `promtool check metrics` accepts
//! both `/metrics` outputs.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chom::listeners::ListenerConfig;
use chom::simulate::SimulateConfig;

use crate::operate::{free_port, http_get};
use crate::pipeline::{Background, BrokerNames, amqp_url, stopped};

/// A child process killed (and waited for) when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn promtool_check_metrics(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

/// Prometheus's answer to `query` (instant query), as text.
fn query(port: u16, query: &str) -> String {
    http_get(port, &format!("/api/v1/query?query={query}"))
        .map(|(_, body)| body)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_relay_and_a_worker_during_a_chom_run() {
    let (db, _conn) = crate::support::setup();
    let broker = BrokerNames::new(&ListenerConfig::default());

    // The relay, in this process, serving /metrics as `outbox relay` does.
    let relay = outbox::Relay::new(outbox::RelayConfig {
        database_url: db.url().to_owned(),
        amqp_url: amqp_url(),
        exchange: broker.exchange.clone(),
        poll_max: Duration::from_millis(50),
        stats_interval: Duration::from_millis(200),
        ..outbox::RelayConfig::default()
    })
    .unwrap();
    let handle = outbox::metrics::install_recorder().unwrap();
    // This process also runs CHOM's sync listener (other tests): its
    // metrics get their help text, as `chom work` gives them.
    chom::listeners::describe_metrics();
    let health = relay.health();
    let check: outbox::metrics::HealthCheck = Arc::new(move || (health.is_healthy(), String::new()));
    let (relay_metrics, _served) = outbox::metrics::serve(
        "127.0.0.1:0".parse().unwrap(),
        handle,
        check,
        std::future::pending(),
    )
    .await
    .unwrap();
    let relay = Background::spawn(move |rx| async move { relay.run(stopped(rx)).await });

    // The worker, as operators run it.
    let worker_port = free_port();
    let _worker = Child(
        Command::new(env!("CARGO_BIN_EXE_chom"))
            .args([
                "work",
                "--exchange",
                &broker.exchange,
                "--app",
                &broker.app,
                "--no-webhooks",
                "--metrics-addr",
                &format!("127.0.0.1:{worker_port}"),
            ])
            .env("DATABASE_URL", db.url())
            .env("AMQP_URL", amqp_url())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // Prometheus with the deploy/ scrape jobs, pointed at these two.
    let dir = std::env::temp_dir().join(format!("outbox-prometheus-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = scopeguard(dir.clone());
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: outbox-relay\n    static_configs:\n      - targets: ['{relay_metrics}']\n  - job_name: outbox-worker\n    static_configs:\n      - targets: ['127.0.0.1:{worker_port}']\n",
            rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/prometheus/outbox-alerts.yml"),
        ),
    )
    .unwrap();
    let prometheus_port = free_port();
    let _prometheus = Child(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus; .ci/run installs it)"),
    );

    // CHOM traffic.
    let url = db.url().to_owned();
    tokio::task::spawn_blocking(move || {
        let pool = outbox::pool(&url, 4, Duration::from_secs(10)).unwrap();
        let config = SimulateConfig {
            tenants: 2,
            sites: 30,
            writers: 2,
            ..SimulateConfig::default()
        };
        chom::simulate::run(&pool, &outbox::Outbox::new(), &config).unwrap()
    })
    .await
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let backlog = query(prometheus_port, "outbox_backlog");
        let outcomes = query(prometheus_port, "outbox_listener_outcomes_total");
        if backlog.contains("\"job\":\"outbox-relay\"")
            && outcomes.contains("\"job\":\"outbox-worker\"")
            && outcomes.contains("\"listener\":\"record_audit_log\"")
            && outcomes.contains("\"outcome\":\"success\"")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had both series: backlog {backlog}; outcomes {outcomes}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let up = query(prometheus_port, "up");
    assert!(!up.contains("\"0\"]"), "a target down: {up}");

    for (what, port) in [("relay", relay_metrics.port()), ("worker", worker_port)] {
        let (status, text) = http_get(port, "/metrics").unwrap();
        assert_eq!(status, 200, "{what}");
        assert!(text.contains("outbox_"), "{what}: {text}");
        let (ok, said) = promtool_check_metrics(&text);
        assert!(ok, "promtool check metrics refuses the {what}'s /metrics: {said}");
    }
    relay.stop().await;
}

/// Removes `dir` when dropped.
fn scopeguard(dir: std::path::PathBuf) -> impl Drop {
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    Remove(dir)
}
