//! `chom team|ssl|security|quota`, run as a user would: what they print,
//! their JSON listings, their errors, and that a secret is printed once on
//! stdout and nowhere else (not on stderr with every log level on, not in
//! any listing, not in the recorded events).

use std::io::Write;
use std::process::{Command, Output, Stdio};

use outbox::TestDatabase;

use crate::support::events;

fn chom(url: &str, args: &[&str]) -> Output {
    chom_with_stdin(url, args, "")
}

fn chom_with_stdin(url: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chom"))
        .args(args)
        .env("DATABASE_URL", url)
        // Every log line the binary can write, so the scan below sees them.
        .env("RUST_LOG", "trace")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run chom");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "chom failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn failed(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn team_and_ssl_commands() {
    let db = TestDatabase::create_empty().unwrap();
    let url = db.url();
    ok(&chom(url, &["migrate"]));
    let tenant = ok(&chom(url, &["tenant", "create", "--name", "Acme"]));
    let tenant = tenant.trim();
    let owner = ok(&chom(
        url,
        &[
            "user",
            "create",
            "--tenant",
            tenant,
            "--email",
            "o@acme.test",
            "--name",
            "O",
        ],
    ));
    let owner = owner.trim();
    let second = ok(&chom(
        url,
        &[
            "user",
            "create",
            "--tenant",
            tenant,
            "--email",
            "s@acme.test",
            "--name",
            "S",
        ],
    ));
    let second = second.trim();

    let changed = ok(&chom(
        url,
        &[
            "team", "set-role", "--user", second, "--role", "admin", "--actor", "user:1",
        ],
    ));
    let transferred = ok(&chom(
        url,
        &["team", "transfer", "--tenant", tenant, "--to", second],
    ));
    let listed = json(&ok(&chom(url, &["team", "list", "--tenant", tenant, "--json"])));
    assert_eq!(listed[0]["user_id"].to_string(), second, "the owner first");
    assert_eq!(listed[0]["role"], "owner");
    assert_eq!(listed[1]["role"], "admin");
    let text = ok(&chom(url, &["team", "list", "--tenant", tenant]));
    assert!(text.contains("owner") && text.contains("s@acme.test"), "{text}");

    let bad_role = chom(url, &["team", "set-role", "--user", owner, "--role", "owner"]);
    assert_eq!(bad_role.status.code(), Some(2), "usage error");
    let of_owner = failed(&chom(url, &["team", "remove", "--user", second]));
    assert!(of_owner.contains("it is owner"), "{of_owner}");
    assert!(of_owner.contains("chom team transfer"), "a hint: {of_owner}");

    let site = ok(&chom(
        url,
        &["site", "create", "--tenant", tenant, "--domain", "a.test"],
    ));
    let site = site.trim();
    ok(&chom(url, &["site", "provision", site]));
    let certificate = ok(&chom(url, &["ssl", "request", "--site", site]));
    let certificate = certificate.trim();
    certificate.parse::<i64>().expect("the id alone on stdout");
    let issued = ok(&chom(url, &["ssl", "issue", certificate, "--valid-for", "5days"]));
    let checked = ok(&chom(url, &["ssl", "check", "--within-days", "7"]));
    assert!(checked.contains("a.test"), "{checked}");
    let again = ok(&chom(url, &["ssl", "check", "--within-days", "7", "--json"]));
    assert_eq!(json(&again), serde_json::json!([]), "once per window");
    let listed = json(&ok(&chom(url, &["ssl", "list", "--site", site, "--json"])));
    assert_eq!(listed[0]["status"], "issued");
    // A renewal: a new request while one is open is refused.
    let renewal = json(&ok(&chom(url, &["ssl", "request", "--site", site, "--json"])));
    assert_eq!(renewal["value"]["status"], "requested");
    let twice = failed(&chom(url, &["ssl", "request", "--site", site]));
    assert!(twice.contains("already has a certificate request"), "{twice:?}");

    let mut conn = db.connect().unwrap();
    let rows = events(&mut conn);
    let id_of = |event_type: &str| {
        rows.iter()
            .find(|r| r.event_type == event_type)
            .map(|r| r.event_id.to_string())
            .unwrap()
    };
    assert_eq!(changed.trim(), id_of("team.member_role_changed"));
    assert_eq!(transferred.trim(), id_of("team.ownership_transferred"));
    assert_eq!(issued.trim(), id_of("ssl.certificate_issued"));
    let role_change = rows
        .iter()
        .find(|r| r.event_type == "team.member_role_changed")
        .unwrap();
    assert_eq!(role_change.actor.as_deref(), Some("user:1"));
    assert!(rows.iter().any(|r| r.event_type == "ssl.certificate_expiring"));
}

#[test]
fn security_commands_print_each_secret_once_and_nowhere_else() {
    let db = TestDatabase::create_empty().unwrap();
    let url = db.url();
    ok(&chom(url, &["migrate"]));
    let tenant = ok(&chom(url, &["tenant", "create", "--name", "Acme"]));
    let tenant = tenant.trim();
    let user = ok(&chom(
        url,
        &[
            "user",
            "create",
            "--tenant",
            tenant,
            "--email",
            "o@acme.test",
            "--name",
            "O",
        ],
    ));
    let user = user.trim();
    let mut outputs = Vec::new();
    let mut secrets = Vec::new();
    let mut run = |args: &[&str], stdin: &str| {
        let output = chom_with_stdin(url, args, stdin);
        let stdout = if output.status.success() {
            ok(&output)
        } else {
            failed(&output)
        };
        outputs.push(output);
        stdout
    };

    let added = run(
        &[
            "security",
            "vps",
            "add",
            "--tenant",
            tenant,
            "--hostname",
            "vps1.acme.test",
        ],
        "",
    );
    let lines: Vec<&str> = added.lines().collect();
    assert_eq!(lines.len(), 2, "the id, then the credential: {added}");
    let vps = lines[0].to_owned();
    secrets.push(lines[1].to_owned());
    let rotated = json(&run(&["security", "vps", "rotate", &vps, "--json"], ""));
    assert_eq!(rotated["event_type"], "security.vps_credentials_rotated");
    secrets.push(rotated["credential"].as_str().unwrap().to_owned());

    let created = run(
        &[
            "security", "token", "create", "--tenant", tenant, "--name", "deploy",
        ],
        "",
    );
    let lines: Vec<&str> = created.lines().collect();
    let token = lines[0].to_owned();
    secrets.push(lines[1].to_owned());
    let verified = run(&["security", "token", "verify"], &format!("{}\n", secrets[2]));
    assert_eq!(verified.trim(), format!("{token}  deploy"));
    let rotated = run(&["security", "token", "rotate", &token], "");
    let lines: Vec<&str> = rotated.lines().collect();
    secrets.push(lines[1].to_owned());
    let old = run(&["security", "token", "verify"], &secrets[2]);
    assert!(
        old.contains("not a valid API token"),
        "the old token is dead: {old}"
    );
    let new = json(&run(&["security", "token", "verify", "--json"], &secrets[3]));
    assert_eq!(new["name"], "deploy");

    for _ in 0..2 {
        let text = run(
            &[
                "security",
                "failed-login",
                "--user",
                user,
                "--ip",
                "203.0.113.1",
                "--threshold",
                "2",
            ],
            "",
        );
        if text.contains("suspicious activity") {
            assert!(text.contains("incident"), "{text}");
        }
    }
    let incidents = json(&run(&["security", "incidents", "--json"], ""));
    assert_eq!(incidents.as_array().unwrap().len(), 1);
    for listing in [
        &["security", "vps", "list", "--json"][..],
        &["security", "vps", "list"][..],
        &["security", "token", "list", "--json"][..],
        &["security", "token", "list"][..],
        &["security", "incidents"][..],
    ] {
        run(listing, "");
    }
    let bad_ip = run(&["security", "failed-login", "--user", user, "--ip", "nope"], "");
    assert!(bad_ip.contains("source_ip"), "{bad_ip}");

    // Each secret: exactly once on the stdout of the command that made it,
    // never on any stderr, never in a listing, never in an event.
    let everything_else: String = outputs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    let stdouts: Vec<String> = outputs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    let mut conn = db.connect().unwrap();
    let recorded = format!("{:?}", events(&mut conn));
    for secret in &secrets {
        assert!(secret.starts_with("chom"), "{secret}");
        let hash = chom::secret::sha256_hex(secret);
        let printed = stdouts.iter().filter(|s| s.contains(secret.as_str())).count();
        assert_eq!(printed, 1, "printed once");
        for text in [&everything_else, &recorded] {
            assert!(!text.contains(secret.as_str()) && !text.contains(&hash));
        }
        assert!(stdouts.iter().all(|s| !s.contains(&hash)));
    }
    assert!(everything_else.contains("shown once"), "{everything_else}");
}

#[test]
fn quota_commands() {
    let db = TestDatabase::create_empty().unwrap();
    let url = db.url();
    ok(&chom(url, &["migrate"]));
    let tenant = ok(&chom(url, &["tenant", "create", "--name", "Acme"]));
    let tenant = tenant.trim();
    let site = ok(&chom(
        url,
        &["site", "create", "--tenant", tenant, "--domain", "a.test"],
    ));
    let site = site.trim();
    ok(&chom(url, &["site", "provision", site]));

    let set = json(&ok(&chom(
        url,
        &[
            "quota",
            "set",
            "--tenant",
            tenant,
            "--plan",
            "starter",
            "--max-sites",
            "1",
            "--max-storage-bytes",
            "1000",
            "--monthly-bandwidth-bytes",
            "1000",
            "--json",
        ],
    )));
    assert_eq!(set["plan"], "starter");
    assert_eq!(set["max_sites"], 1);
    let refused = failed(&chom(
        url,
        &["site", "create", "--tenant", tenant, "--domain", "b.test"],
    ));
    assert!(refused.contains("quota exceeded"), "{refused}");
    assert!(refused.contains("chom quota show"), "a hint: {refused}");

    let backup = ok(&chom(url, &["backup", "create", "--site", site]));
    let completed = json(&ok(&chom(
        url,
        &[
            "backup",
            "complete",
            backup.trim(),
            "--size-bytes",
            "5000",
            "--duration-ms",
            "9",
            "--json",
        ],
    )));
    assert_eq!(completed["also"][0]["event_type"], "quota.storage_quota_exceeded");
    let first = ok(&chom(
        url,
        &["quota", "report-bandwidth", "--site", site, "--bytes", "600"],
    ));
    assert!(!first.contains("limit reached"), "{first}");
    let second = ok(&chom(
        url,
        &["quota", "report-bandwidth", "--site", site, "--bytes", "600"],
    ));
    assert!(second.contains("bandwidth limit reached"), "{second}");

    let usage = json(&ok(&chom(url, &["quota", "show", "--tenant", tenant, "--json"])));
    assert_eq!(usage["sites"], 1);
    assert_eq!(usage["storage_bytes"], 5000);
    assert_eq!(usage["bandwidth_bytes"], 1200);
    let text = ok(&chom(url, &["quota", "show", "--tenant", tenant]));
    assert!(text.contains("plan starter"), "{text}");
    let breaches = json(&ok(&chom(
        url,
        &["quota", "breaches", "--tenant", tenant, "--json"],
    )));
    let quotas: Vec<&str> = breaches
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["quota"].as_str().unwrap())
        .collect();
    assert_eq!(quotas, ["bandwidth", "storage", "sites"], "newest first");
    let unknown = failed(&chom(url, &["quota", "show", "--tenant", "999"]));
    assert!(unknown.contains("tenant 999 not found"), "{unknown}");

    let mut conn = db.connect().unwrap();
    let types: Vec<String> = events(&mut conn)
        .into_iter()
        .map(|r| r.event_type)
        .filter(|t| t.starts_with("quota."))
        .collect();
    assert_eq!(
        types,
        [
            "quota.site_quota_exceeded",
            "quota.storage_quota_exceeded",
            "quota.bandwidth_limit_reached"
        ]
    );
}
