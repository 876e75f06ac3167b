//! `outbox webhooks ...` as an operator runs it: refusals, listings
//! without secrets, status changes, a test delivery to a real receiver.

use std::io::{Read, Write};

use outbox::TestDatabase;

use crate::support::run_outbox;

#[test]
fn endpoints_are_managed_and_secrets_shown_once() {
    let db = TestDatabase::create().unwrap();
    let url = db.url();
    let base = ["--database-url", url, "webhooks"];
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = base.to_vec();
        all.extend_from_slice(args);
        run_outbox(&all, env)
    };
    // Refused: plain http without the allow-list, a private address, a
    // bad filter.
    let (status, _, stderr) = run(
        &[
            "add",
            "--url",
            "http://hooks.example.com/x",
            "--event-type",
            "site.*",
        ],
        &[],
    );
    assert_eq!(status, 1);
    assert!(stderr.contains("plain http"), "{stderr}");
    let (status, _, stderr) = run(
        &["add", "--url", "https://10.0.0.1/x", "--event-type", "site.*"],
        &[],
    );
    assert_eq!(status, 1);
    assert!(stderr.contains("not a public address"), "{stderr}");
    let (status, _, stderr) = run(
        &[
            "add",
            "--url",
            "https://hooks.example.com/x",
            "--event-type",
            "Site",
        ],
        &[],
    );
    assert_eq!(status, 1, "{stderr}");
    let (status, _, _) = run(&["add", "--url", "https://hooks.example.com/x"], &[]);
    assert_eq!(status, 2, "an event type is required");

    // A local receiver that answers 204 to one request.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = vec![0u8; 65536];
        let n = stream.read(&mut request).unwrap();
        stream
            .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&request[..n]).into_owned()
    });
    let allow = [("OUTBOX_WEBHOOK_ALLOW", "127.0.0.1")];
    let hook = format!("http://127.0.0.1:{port}/hook");
    let (status, stdout, stderr) = run(
        &["add", "--url", &hook, "--event-type", "site.*", "--json"],
        &allow,
    );
    assert_eq!(status, 0, "{stderr}");
    let added: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let secret = added["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let id = added["endpoint"]["id"].as_i64().unwrap().to_string();
    let (status, stdout, _) = run(&["list", "--json"], &[]);
    assert_eq!(status, 0);
    assert!(!stdout.contains(&secret), "listings never show the secret");
    assert!(stdout.contains("\"status\": \"active\""));
    let (status, stdout, _) = run(&["show", &id], &[]);
    assert_eq!(status, 0);
    assert!(stdout.contains("site.*") && !stdout.contains(&secret));

    let (status, stdout, stderr) = run(&["test", &id], &allow);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(stdout.contains("delivered: HTTP 204"), "{stdout}");
    let request = receiver.join().unwrap().to_ascii_lowercase();
    assert!(
        request.contains("webhook-signature: v1,") && request.contains("webhook-id: "),
        "{request}"
    );
    let (status, stdout, _) = run(&["deliveries", "--endpoint", &id, "--json"], &[]);
    assert_eq!(status, 0);
    let tries: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(tries[0]["status_code"], 204);

    let (status, _, _) = run(&["disable", &id, "--reason", "receiver migrating"], &[]);
    assert_eq!(status, 0);
    let (_, stdout, _) = run(&["list"], &[]);
    assert!(stdout.contains("disabled (receiver migrating)"), "{stdout}");
    assert_eq!(run(&["enable", &id], &[]).0, 0);
    let (status, stdout, _) = run(&["rotate-secret", &id, "--overlap", "1h"], &[]);
    assert_eq!(status, 0);
    assert!(
        stdout.contains("whsec_") && !stdout.contains(&secret),
        "a new secret"
    );
    assert_eq!(
        run(&["retry", "--endpoint", &id], &[]).0,
        0,
        "nothing to retry is fine"
    );
    assert_eq!(run(&["remove", &id], &[]).0, 0);
    let (status, _, stderr) = run(&["show", &id], &[]);
    assert_eq!(status, 1);
    assert!(stderr.contains("no webhook endpoint"), "{stderr}");
}

#[test]
fn rate_limits_are_set_and_lifted_and_ed25519_endpoints_show_their_public_key() {
    let db = TestDatabase::create().unwrap();
    let url = db.url();
    let run = |args: &[&str]| {
        let mut all = vec!["--database-url", url, "webhooks"];
        all.extend_from_slice(args);
        run_outbox(&all, &[])
    };
    let add = [
        "add",
        "--url",
        "https://hooks.example.com/x",
        "--event-type",
        "*",
        "--rate-limit",
        "5",
        "--signing",
        "ed25519",
    ];
    let (status, stdout, stderr) = run(&add);
    assert_eq!(status, 0, "{stderr}");
    let public = stdout
        .split_whitespace()
        .find(|word| word.starts_with("whpk_"))
        .unwrap_or_else(|| panic!("a public key in {stdout}"))
        .to_owned();
    assert!(stdout.contains("whsk_"), "the secret key, once: {stdout}");
    let (status, stdout, _) = run(&["show", "1"]);
    assert_eq!(status, 0);
    assert!(stdout.contains("5 deliveries/s"), "{stdout}");
    assert!(stdout.contains(&public), "{stdout}");
    assert!(!stdout.contains("whsk_"), "no secret key in show: {stdout}");
    let (status, stdout, stderr) = run(&["update", "1", "--rate-limit", "none"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("no rate limit"), "{stdout}");
    let (_, stdout, _) = run(&["show", "1"]);
    assert!(!stdout.contains("deliveries/s"), "{stdout}");
    let (status, _, stderr) = run(&["update", "1", "--rate-limit", "0"]);
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.contains("1 to 1000000"), "{stderr}");
    let (status, _, stderr) = run(&["update", "9", "--rate-limit", "3"]);
    assert_eq!(status, 1, "{stderr}");
}
