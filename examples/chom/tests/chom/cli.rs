//! The `chom` binary, run as a user would.

use std::process::{Command, Output};

use diesel::prelude::*;
use diesel::sql_types::{Bool, Text};
use outbox::TestDatabase;
use outbox::schema::outbox_events;

use crate::support::events;

fn chom(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chom"))
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .output()
        .expect("run chom")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "chom failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn tenant_and_site_create_record_one_site_created() {
    let db = TestDatabase::create_empty().unwrap();
    stdout(&chom(db.url(), &["migrate"]));

    let tenant = stdout(&chom(db.url(), &["tenant", "create", "--name", "Acme"]));
    let tenant_id: i64 = tenant.trim_end().parse().expect("the id alone on stdout");
    let site = stdout(&chom(
        db.url(),
        &[
            "site",
            "create",
            "--tenant",
            &tenant_id.to_string(),
            "--domain",
            "cli.example.com",
            "--actor",
            "user:9",
        ],
    ));
    let site_id: i64 = site.trim_end().parse().expect("the id alone on stdout");

    let mut conn = db.connect().unwrap();
    let rows = events(&mut conn);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let row = &rows[0];
    assert_eq!(row.event_type, "site.created");
    assert_eq!(row.aggregate_id, site_id.to_string());
    assert_eq!(row.tenant_id, Some(tenant_id.to_string()));
    assert_eq!(row.actor.as_deref(), Some("user:9"));

    // The listing shows it, as JSON too.
    let listed = stdout(&chom(db.url(), &["site", "list", "--json"]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["id"], site_id);
    assert_eq!(listed[0]["status"], "pending");
}

#[test]
fn lifecycle_commands_print_event_ids() {
    let db = TestDatabase::create_empty().unwrap();
    stdout(&chom(db.url(), &["migrate"]));
    let tenant = stdout(&chom(db.url(), &["tenant", "create", "--name", "Acme"]));
    let site = stdout(&chom(
        db.url(),
        &["site", "create", "--tenant", tenant.trim(), "--domain", "a.test"],
    ));
    let site = site.trim();
    let provisioned = stdout(&chom(db.url(), &["site", "provision", site]));
    let backup = stdout(&chom(db.url(), &["backup", "create", "--site", site]));
    let failed = stdout(&chom(
        db.url(),
        &["backup", "fail", backup.trim(), "--error", "bucket unreachable"],
    ));
    let deleted = stdout(&chom(db.url(), &["site", "delete", site, "--json"]));
    let deleted: serde_json::Value = serde_json::from_str(&deleted).unwrap();

    let mut conn = db.connect().unwrap();
    let rows = events(&mut conn);
    let summary: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.event_type.clone(), r.event_id.to_string()))
        .collect();
    assert_eq!(
        summary[1],
        ("site.provisioned".into(), provisioned.trim().to_owned())
    );
    assert_eq!(summary[3], ("backup.failed".into(), failed.trim().to_owned()));
    assert_eq!(deleted["event_type"], "site.deleted");
    assert_eq!(deleted["event_id"], summary[4].1.as_str());
    assert_eq!(rows[3].payload["error"], "bucket unreachable");
    assert!(
        rows.iter().all(|r| r.actor.is_none()),
        "no --actor: system actions"
    );
}

#[test]
fn errors_exit_1_and_usage_errors_exit_2() {
    let db = TestDatabase::create_empty().unwrap();
    stdout(&chom(db.url(), &["migrate"]));

    let missing = chom(db.url(), &["site", "provision", "999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(missing.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("site 999 not found"), "{stderr}");

    let usage = chom(db.url(), &["site", "create", "--domain", "a.test"]);
    assert_eq!(
        usage.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&usage.stderr)
    );

    let mut conn = db.connect().unwrap();
    let count: i64 = outbox_events::table.count().get_result(&mut conn).unwrap();
    assert_eq!(count, 0);
}

#[test]
fn unmigrated_database_gets_a_hint() {
    let db = TestDatabase::create_empty().unwrap();
    let output = chom(db.url(), &["tenant", "create", "--name", "Acme"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("chom migrate"), "{stderr}");
}

#[test]
fn passwords_are_never_printed() {
    // Nothing listens on port 1: the connection fails and is reported.
    let url = "postgres://chom:s3cret-pw@127.0.0.1:1/chom";
    for args in [
        &["site", "list"][..],
        &["migrate"][..],
        &["simulate", "--tenants", "1", "--sites", "1"][..],
        &["team", "list", "--tenant", "1"][..],
        &["ssl", "check"][..],
        &["security", "token", "list", "--json"][..],
        &["quota", "show", "--tenant", "1"][..],
    ] {
        let output = chom(url, args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!all.contains("s3cret-pw"), "{args:?} printed the password: {all}");
    }
    let help = chom(url, &["--help"]);
    assert!(!String::from_utf8_lossy(&help.stdout).contains("s3cret-pw"));
}

#[test]
fn the_worker_logs_no_password_when_the_broker_refuses_it() {
    // RabbitMQ checks this password (ACCESS_REFUSED); Postgres here trusts
    // local connections, so its password is only carried, and must not be
    // shown either.
    const AMQP_SECRET: &str = "amqp-wrong-hunter2";
    const PG_SECRET: &str = "pg-hunter2-secret";
    let log = std::env::temp_dir().join(format!("chom-work-{}.log", uuid::Uuid::now_v7().simple()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_chom"))
        .args([
            "work",
            "--metrics-addr",
            "off",
            "--exchange",
            "outbox_test.never_declared",
        ])
        .env(
            "DATABASE_URL",
            format!("postgres://postgres:{PG_SECRET}@127.0.0.1:5432/unused"),
        )
        .env(
            "AMQP_URL",
            format!("amqp://guest:{AMQP_SECRET}@127.0.0.1:5672/%2f"),
        )
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let logs = loop {
        let logs = std::fs::read_to_string(&log).unwrap_or_default();
        if logs.matches("cannot set up its broker session").count() >= 2
            || std::time::Instant::now() > deadline
        {
            break logs;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&log);
    assert!(
        logs.contains("cannot set up its broker session"),
        "refusal logged:\n{logs}"
    );
    assert!(logs.contains("guest:***@"), "the URL is shown redacted:\n{logs}");
    assert!(!logs.contains(AMQP_SECRET) && !logs.contains(PG_SECRET), "{logs}");
}

/// Drops the database `migrate` created, even if the test fails.
struct DropDatabase {
    admin: String,
    name: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&self.admin) {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name))
                .execute(&mut conn);
        }
    }
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = Bool)]
    exists: bool,
}

#[test]
fn migrate_creates_a_missing_database() {
    // Borrow a test database's server URL; the prefix lets the CI sweep
    // catch the new database if this process dies.
    let server = TestDatabase::create_empty().unwrap();
    let name = format!("outbox_test_{}", uuid::Uuid::now_v7().simple());
    let url = server.url().replace(server.name(), &name);
    let admin = server.url().replace(server.name(), "postgres");
    let _guard = DropDatabase {
        admin: admin.clone(),
        name: name.clone(),
    };

    let output = stdout(&chom(&url, &["migrate"]));
    assert!(output.contains("created the database of"), "{output}");
    assert!(output.contains("applied"), "{output}");
    let again = stdout(&chom(&url, &["migrate"]));
    assert!(again.contains("up to date"), "{again}");

    let mut conn = PgConnection::establish(&admin).unwrap();
    let found: Exists =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS exists")
            .bind::<Text, _>(&name)
            .get_result(&mut conn)
            .unwrap();
    assert!(found.exists);
}
