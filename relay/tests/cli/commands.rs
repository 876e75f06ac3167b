use std::time::Duration;

use outbox::TestDatabase;

use crate::support::{RelayChild, eventually, run_outbox};

#[test]
fn bad_relay_configuration_is_refused_with_a_clear_error() {
    let cases: [(&[&str], i32, &str); 15] = [
        (&["relay", "--batch-size", "0"], 1, "batch size"),
        (&["relay", "--batch-size=-1"], 2, "invalid value"),
        (
            &["relay", "--batch-size", "99999999999999999999999"],
            2,
            "--batch-size",
        ),
        (&["relay", "--max-in-flight", "0"], 1, "max in flight"),
        (&["relay", "--max-attempts", "0"], 1, "max attempts"),
        (&["relay", "--confirm-timeout", "0s"], 1, "confirm timeout"),
        (&["relay", "--lease=-5s"], 2, "--lease"),
        (
            &["relay", "--poll-min", "50ms", "--poll-max", "10ms"],
            1,
            "poll bounds",
        ),
        (&["relay", "--exchange", "it's"], 1, "exchange name"),
        (&["relay", "--exchange", "amq.topic"], 1, "reserved"),
        (&["relay", "--lease", "100ms"], 1, "lease"),
        (
            &["relay", "--exchange", "orders\";drop table x;--"],
            1,
            "exchange name",
        ),
        (&["relay", "--amqp-url", "http://127.0.0.1/"], 1, "AMQP URL"),
        (&["relay", "--lease", "soon"], 2, "not a duration"),
        (&["relay", "--metrics-addr", "everywhere"], 1, "--metrics-addr"),
    ];
    for (args, code, needle) in cases {
        let (status, _, stderr) = run_outbox(
            args,
            &[("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/unused")],
        );
        assert_eq!(status, code, "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_logs_or_errors() {
    const AMQP_SECRET: &str = "amqp-hunter2-secret";
    const PG_SECRET: &str = "pg-hunter2-secret";
    let db = TestDatabase::create().unwrap();
    let database_url = db.url().replace("postgres@", &format!("postgres:{PG_SECRET}@"));
    let amqp_url = format!("amqp://guest:{AMQP_SECRET}@127.0.0.1:5672/%2f");
    let mut relay = RelayChild::spawn(&database_url, &amqp_url, "outbox_test.never_declared", &[]);
    eventually("the broker refusal logged", Duration::from_secs(30), || {
        relay.logs().contains("cannot reach the broker")
    })
    .await;
    relay.terminate();
    let logs = relay.logs();
    assert!(logs.contains("guest:***@"), "the URL is shown redacted:\n{logs}");
    assert!(!logs.contains(AMQP_SECRET) && !logs.contains(PG_SECRET), "{logs}");

    // Connection failures of the other commands, too.
    let bad_db = format!("postgres://nobody:{PG_SECRET}@127.0.0.1:5432/nothing");
    for args in [vec!["migrate"], vec!["pause"], vec!["resume"]] {
        let mut full = args.clone();
        full.extend(["--database-url", &bad_db]);
        let (status, stdout, stderr) = run_outbox(&full, &[]);
        assert_eq!(status, 1, "{full:?}");
        assert!(
            !stdout.contains(PG_SECRET) && !stderr.contains(PG_SECRET),
            "{full:?}: {stderr}"
        );
        assert!(stderr.contains("nobody:***@"), "{full:?}: {stderr}");
    }
    let (_, help, _) = run_outbox(&["relay", "--help"], &[("AMQP_URL", &amqp_url)]);
    assert!(
        !help.contains(AMQP_SECRET),
        "--help must not echo the environment: {help}"
    );
}

/// The README says to run as many relays as you like: a second one on the
/// same host with default settings must not exit because the first holds
/// the default metrics port. An address given explicitly must be free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_with_defaults_serves_metrics_on_a_free_port() {
    let db = TestDatabase::create().unwrap();
    // No broker answers here, so nothing is declared on the real one.
    let no_broker = "amqp://guest:guest@127.0.0.1:1/%2f";
    // The first relay's port: held by this test, or already by someone.
    let _first = std::net::TcpListener::bind("127.0.0.1:9187");
    let mut second = RelayChild::spawn_command(db.url(), no_broker, &["relay"], &[]);
    eventually(
        "the second relay serving metrics",
        Duration::from_secs(30),
        || second.logs().contains("serving /metrics and /health"),
    )
    .await;
    assert!(second.child.try_wait().unwrap().is_none(), "{}", second.logs());
    let logs = second.logs();
    assert!(logs.contains("the default metrics address is in use"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "no terminal colours in a log file: {logs:?}"
    );
    let serving = logs
        .lines()
        .find(|line| line.contains("serving /metrics and /health"))
        .unwrap();
    let addr = serving
        .split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {serving:?}"));
    assert_ne!(addr, "127.0.0.1:9187", "{serving}");
    std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr} does not answer: {e}"));
    assert!(second.terminate().success());

    let (code, _, err) = run_outbox(
        &["relay", "--metrics-addr", "127.0.0.1:9187"],
        &[("DATABASE_URL", db.url()), ("AMQP_URL", no_broker)],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot listen on 127.0.0.1:9187"), "{err}");
}

#[test]
fn migrate_pause_and_resume() {
    let db = TestDatabase::create_empty().unwrap();
    let url = db.url().to_owned();
    let (status, stdout, stderr) = run_outbox(&["migrate", "--database-url", &url], &[]);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("applied"), "{stdout}");
    let (status, stdout, _) = run_outbox(&["migrate", "--database-url", &url], &[]);
    assert_eq!(status, 0);
    assert!(stdout.contains("up to date"), "{stdout}");

    let mut conn = db.connect().unwrap();
    let (status, _, stderr) = run_outbox(&["pause", "--reason", "incident 42"], &[("DATABASE_URL", &url)]);
    assert_eq!(status, 0, "{stderr}");
    assert!(outbox::control::is_paused(&mut conn).unwrap());
    let (status, _, stderr) = run_outbox(&["resume"], &[("DATABASE_URL", &url)]);
    assert_eq!(status, 0, "{stderr}");
    assert!(!outbox::control::is_paused(&mut conn).unwrap());

    let (status, _, stderr) = run_outbox(&["no-such-command"], &[]);
    assert_eq!(status, 2, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_settings_pass_through_and_fail_clearly_without_the_password() {
    const SECRET: &str = "tls-hunter2-secret";
    let db = TestDatabase::create().unwrap();
    // Postgres: libpq's own reason for refusing verify-full without a CA.
    let verify = format!(
        "{}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        db.url().replace("postgres@", &format!("postgres:{SECRET}@"))
    );
    let (status, stdout, stderr) = run_outbox(&["status", "--database-url", &verify], &[]);
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("root certificate file"), "{stderr}");
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET), "{stderr}");
    // RabbitMQ: amqps:// to the plain AMQP port fails the TLS handshake;
    // the relay logs it and keeps retrying.
    let amqps = format!("amqps://guest:{SECRET}@127.0.0.1:5672/%2f");
    let mut relay = RelayChild::spawn(db.url(), &amqps, "outbox_test.never_declared", &[]);
    eventually("the TLS failure logged", Duration::from_secs(30), || {
        relay.logs().contains("cannot reach the broker")
    })
    .await;
    relay.terminate();
    let logs = relay.logs();
    assert!(logs.contains("amqps://guest:***@"), "{logs}");
    assert!(logs.contains("InvalidContentType"), "rustls' reason: {logs}");
    assert!(!logs.contains(SECRET), "{logs}");
}
