//! Faults of the shared services themselves: RabbitMQ stopped and started,
//! its node killed hard, Postgres restarted. Only this test binary runs
//! while they happen (cargo runs test binaries one after another).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Waits until RabbitMQ accepts AMQP connections again (bounded).
pub async fn wait_for_rabbitmq(limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if port_open(5672)
            && let Ok(connection) = outbox::amqp::connect(outbox::DEFAULT_AMQP_URL, "chaos probe").await
        {
            let _ = connection.close(200, "ok".into()).await;
            return;
        }
        assert!(
            Instant::now() < deadline,
            "RabbitMQ did not come back within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `rabbitmqctl stop_app`: the node stays, the broker inside it stops.
pub fn stop_rabbitmq_app() {
    assert!(run("rabbitmqctl", &["stop_app"]), "rabbitmqctl stop_app failed");
}

pub fn start_rabbitmq_app() {
    assert!(run("rabbitmqctl", &["start_app"]), "rabbitmqctl start_app failed");
}

/// SIGKILL of the Erlang VM (no shutdown at all); returns once the port
/// is closed.
pub async fn kill_rabbitmq_node() {
    let pids = Command::new("pgrep")
        .args(["-f", "beam.smp.*rabbit"])
        .output()
        .expect("pgrep");
    let pids = String::from_utf8_lossy(&pids.stdout).into_owned();
    assert!(!pids.trim().is_empty(), "no RabbitMQ node to kill");
    for pid in pids.split_whitespace() {
        run("kill", &["-KILL", pid]);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while port_open(5672) {
        assert!(
            Instant::now() < deadline,
            "RabbitMQ still listening after SIGKILL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a fresh node after [`kill_rabbitmq_node`] (the machine's own
/// start command); [`wait_for_rabbitmq`] tells when it is up.
pub fn start_rabbitmq_node() {
    assert!(
        run("rabbitmq-server", &["-detached"]),
        "rabbitmq-server -detached failed"
    );
}

/// A fast restart of the Postgres cluster: every connection is dropped.
pub async fn restart_postgres() {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .min()
        .expect("a Postgres cluster");
    assert!(
        run(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                &version,
                "main",
                "restart",
                "-m",
                "fast"
            ]
        ),
        "pg_ctlcluster restart failed"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run("pg_isready", &["-h", "127.0.0.1", "-q"]) {
        assert!(
            Instant::now() < deadline,
            "Postgres did not come back within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Brings RabbitMQ and Postgres back if the run ends (or fails) while one
/// of them is stopped, so no later test or CI step finds them down.
pub struct RestoreServices;

impl Drop for RestoreServices {
    fn drop(&mut self) {
        if !port_open(5672) && !run("rabbitmqctl", &["start_app"]) {
            run("rabbitmq-server", &["-detached"]);
        }
        if !run("pg_isready", &["-h", "127.0.0.1", "-q"]) {
            let version = std::fs::read_dir("/etc/postgresql")
                .ok()
                .and_then(|dir| dir.filter_map(|e| e.ok()?.file_name().into_string().ok()).min());
            if let Some(version) = version {
                run(
                    "pg_ctlcluster",
                    &["--skip-systemctl-redirect", &version, "main", "start"],
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while !(port_open(5672) && run("pg_isready", &["-h", "127.0.0.1", "-q"])) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The run's queues as the broker sees them (`name ready/unacked
/// consumers`, those holding messages or with no consumer), for the
/// drain's reports.
pub fn queue_report(app: &str) -> String {
    let output = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "--timeout",
            "10",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let Ok(output) = output else {
        return "rabbitmqctl did not run".to_owned();
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<String> = text
        .lines()
        .filter(|line| line.starts_with(app))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, ready, unacked, consumers] = fields[..] else {
                return None;
            };
            let retry_or_dead = name.contains(".retry.") || name.ends_with(".dead");
            let interesting = ready != "0" || unacked != "0" || (consumers == "0" && !retry_or_dead);
            interesting.then(|| format!("{} {ready}/{unacked} {consumers}", &name[app.len()..]))
        })
        .collect();
    if lines.is_empty() {
        "all empty".to_owned()
    } else {
        lines.join(", ")
    }
}
