//! Published messages read by someone else's code: the official
//! CloudEvents SDK for Python (PyPI `cloudevents`, pinned, installed with
//! pip into a venv under target/), through its RabbitMQ binding, finds
//! every required attribute, the extensions and `dataschema`. The relay
//! publishes structured content mode only, so that is the mode read here.
//! The test fails, never skips, when Python or PyPI is not there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use diesel::prelude::*;
use lapin::types::AMQPValue;
use outbox::testing::TestExchange;
use outbox::{Error, Metadata, RelayConfig, TestDatabase};
use serde_json::{Value, json};

use crate::support::{RunningRelay, Ticked, relay_config};

/// The SDK version the test reads with.
const CLOUDEVENTS_SDK: &str = "cloudevents==2.2.0";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A venv under target/ with the SDK, made once; its python.
fn sdk_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cloudevents-sdk-venv");
    let python = venv.join("bin/python");
    let has_sdk = |python: &Path| {
        Command::new(python)
            .args([
                "-c",
                "import importlib.metadata as m, sys; sys.exit(m.version('cloudevents') != '2.2.0')",
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_sdk(&python) {
        return python;
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 (this test needs Python 3 with venv): {e}"));
    assert!(
        made.status.success(),
        "python3 -m venv failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let pip = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            CLOUDEVENTS_SDK,
        ])
        .output()
        .unwrap();
    assert!(
        pip.status.success(),
        "pip install {CLOUDEVENTS_SDK} failed (is PyPI reachable?):\n{}{}",
        String::from_utf8_lossy(&pip.stdout),
        String::from_utf8_lossy(&pip.stderr)
    );
    assert!(has_sdk(&python), "{CLOUDEVENTS_SDK} installed but not importable");
    python
}

fn header_text(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => json!(s.to_string()),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongInt(n) => json!(n.to_string()),
        other => json!(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_cloudevents_sdk_reads_every_published_message() {
    let python = sdk_python();
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    let full = Metadata::by("user:42")
        .correlation_id("req-9")
        .causation_id("cmd-1")
        .traceparent(TRACEPARENT);
    let ids: Vec<_> = [full, Metadata::system()]
        .iter()
        .enumerate()
        .map(|(n, metadata)| {
            conn.transaction::<_, Error, _>(|conn| {
                outbox::record_with(
                    conn,
                    &Ticked {
                        aggregate: "c1".into(),
                        n: i64::try_from(n).unwrap(),
                    },
                    metadata,
                )
            })
            .unwrap()
        })
        .collect();
    let relay = RunningRelay::start(RelayConfig {
        dataschema_base: Some("https://schemas.example.com/test/".into()),
        ..relay_config(&db, &broker)
    });
    broker.wait_for_distinct(2, Duration::from_secs(20)).await;
    relay.stop().await;

    let messages: Vec<Value> = broker
        .received()
        .iter()
        .map(|m| {
            let headers: serde_json::Map<String, Value> = m
                .properties
                .headers()
                .as_ref()
                .map(|table| {
                    table
                        .inner()
                        .iter()
                        .map(|(k, v)| (k.to_string(), header_text(v)))
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "content_type": m.properties.content_type().as_ref().map(|s| s.to_string()).unwrap_or_default(),
                "headers": headers,
                "body": m.body.to_string(),
            })
        })
        .collect();
    let input = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cloudevents-{}.json", db.name()));
    std::fs::write(&input, serde_json::to_string(&messages).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/relay/cloudevents_sdk.py");
    let out = Command::new(&python).arg(script).arg(&input).output().unwrap();
    std::fs::remove_file(&input).unwrap();
    assert!(
        out.status.success(),
        "the CloudEvents SDK refused a message:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(read.len(), 2, "{read:?}");

    let first = &read[0];
    assert_eq!(first["mode"], "structured");
    let a = &first["attributes"];
    assert_eq!(a["specversion"], "1.0");
    assert_eq!(a["id"], ids[0].to_string());
    assert_eq!(a["type"], "counter.ticked");
    assert_eq!(a["source"], format!("/outbox/{}", db.name()));
    assert_eq!(a["subject"], "c1");
    assert!(a["time"].as_str().is_some_and(|t| t.starts_with("20")), "{a}");
    assert_eq!(a["datacontenttype"], "application/json");
    assert_eq!(
        a["dataschema"],
        "https://schemas.example.com/test/counter.ticked.v1.schema.json"
    );
    assert_eq!(a["aggregatetype"], "counter");
    assert_eq!(a["schemaversion"], 1);
    assert_eq!(a["tenantid"], "tenant-1");
    assert_eq!(a["actor"], "user:42");
    assert_eq!(a["correlationid"], "req-9");
    assert_eq!(a["causationid"], "cmd-1");
    assert_eq!(a["traceparent"], TRACEPARENT);
    assert_eq!(first["data"], json!({"aggregate": "c1", "n": 0}));

    let system = &read[1]["attributes"];
    assert_eq!(system["id"], ids[1].to_string());
    assert!(
        system.get("actor").is_none(),
        "a system action has no actor: {system}"
    );
}
