//! Hostile input at a worker, against the real RabbitMQ and Postgres: each
//! bad message ends as exactly one failed_jobs row with a clear error and a
//! dead-letter copy (or, for forged headers on a good event, is handled
//! normally), the worker never crashes or loops, and a good event published
//! after the bad ones is still handled.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use outbox::Registry;
use outbox::consumer::MAX_BODY_BYTES;
use outbox::failed_jobs::{self, Filter};
use serde_json::json;
use uuid::Uuid;

use crate::broker::{TestBroker, TestEvent};
use crate::harness::{Running, Scripted, database, effect, eventually, fast};
use crate::support::count;

const LIMIT: Duration = Duration::from_secs(30);

/// A CloudEvents document with `data` spliced in as raw text.
fn document_with(event_type: &str, data: &str) -> Vec<u8> {
    format!(
        r#"{{"specversion":"1.0","id":"{}","type":"{event_type}","source":"/test","subject":"1","aggregatetype":"widget","time":"2026-01-01T00:00:00Z","data":{data}}}"#,
        Uuid::now_v7()
    )
    .into_bytes()
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// (label, body, text the failed job's exception must contain)
fn bad_bodies() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let id = Uuid::now_v7();
    vec![
        ("truncated_json", b"{\"specversion\": \"1.0\", this is not json".to_vec(), "not a CloudEvents"),
        ("empty_body", Vec::new(), "EOF while parsing"),
        ("not_utf8", vec![0xff, 0xfe, 0x00, 0x7b, 0xc3, 0x28], "not a CloudEvents"),
        ("json_array", b"[1,2,3]".to_vec(), "not a CloudEvents"),
        ("json_string", b"\"site.created\"".to_vec(), "not a CloudEvents"),
        ("unrelated_object", br#"{"hello":"world"}"#.to_vec(), "missing field"),
        (
            "id_wrong_type",
            br#"{"specversion":"1.0","id":42,"type":"widget.created","source":"/s","data":{}}"#.to_vec(),
            "invalid type",
        ),
        (
            "id_not_uuid",
            br#"{"specversion":"1.0","id":"42","type":"widget.created","source":"/s","data":{}}"#.to_vec(),
            "id attribute",
        ),
        (
            "missing_time",
            format!(
                r#"{{"specversion":"1.0","id":"{id}","type":"widget.created","source":"/s","subject":"1","aggregatetype":"w","data":{{}}}}"#
            )
            .into_bytes(),
            "invalid time attribute: missing",
        ),
        (
            "time_not_a_date",
            format!(
                r#"{{"specversion":"1.0","id":"{id}","type":"widget.created","source":"/s","subject":"1","aggregatetype":"w","time":"yesterday","data":{{}}}}"#
            )
            .into_bytes(),
            "not a CloudEvents",
        ),
        (
            "negative_schema_version",
            format!(
                r#"{{"specversion":"1.0","id":"{id}","type":"widget.created","source":"/s","subject":"1","aggregatetype":"w","time":"2026-01-01T00:00:00Z","schemaversion":-1,"data":{{}}}}"#
            )
            .into_bytes(),
            "schemaversion",
        ),
        (
            "specversion_0_3",
            br#"{"specversion":"0.3","id":"x","type":"widget.created","source":"/s"}"#.to_vec(),
            "specversion",
        ),
        ("nested_100k_in_data", document_with("widget.created", &nested(100_000)), "deeper than 128"),
        (
            "nested_100k_objects",
            format!("{}{}", "{\"a\":".repeat(100_000), "}".repeat(100_000)).into_bytes(),
            "deeper than 128",
        ),
        ("over_the_body_cap", {
            let mut body = document_with("widget.created", &format!("\"{}\"", "x".repeat(MAX_BODY_BYTES)));
            body.truncate(MAX_BODY_BYTES + 10);
            body
        }, "over the cap"),
        ("unknown_event_type", document_with("gadget.exploded", "{}"), "does not handle gadget.exploded"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_bodies_each_end_as_one_failed_job_and_the_queue_keeps_flowing() {
    let started = Instant::now();
    let (db, mut conn, broker, listener, worker) = recording_worker().await;
    let queues = worker.queue("audit").clone();

    let cases = bad_bodies();
    for (label, body, _) in &cases {
        // The AMQP type names the case (a malformed job takes its type
        // from there); a decodable body names its own.
        let properties = BasicProperties::default().with_type(format!("bad.{label}").into());
        broker.publish_to_queue(&queues.queue, body, properties).await;
    }
    let good = TestEvent::new("widget.created", json!({"ok": true}));
    broker.publish_event(&good).await;
    // A good event whose payload is as large as the database allows (the
    // relay's side is tests/relay/oversized.rs) is decoded and handled.
    let big = TestEvent::new("widget.created", json!({"filler": "x".repeat(1_048_000)}));
    broker.publish_event(&big).await;

    broker.wait_ready(&queues.dead, cases.len() as u32, LIMIT).await;
    let effects = || count(&mut database_conn(&db), "SELECT count(*) AS n FROM effects");
    eventually("the good events' effects", LIMIT, || effects() == 2).await;
    // Nothing loops: a short window in which no further failed job,
    // dead-letter copy or retry appears (proving an absence needs one).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(worker.health.is_healthy(), "the worker stayed up");
    worker.stop().await;

    let mut called: Vec<_> = listener.calls().iter().map(|c| c.event_id).collect();
    called.sort();
    let mut expected = vec![good.event_id, big.event_id];
    expected.sort();
    assert_eq!(
        called, expected,
        "only the good events reached the listener, once each"
    );
    for queue in std::iter::once(queues.queue.as_str()).chain(queues.retries.iter().map(|(_, q)| q.as_str()))
    {
        assert_eq!(broker.ready(queue).await, 0, "{queue} is empty");
    }
    assert_eq!(broker.ready(&queues.dead).await, cases.len() as u32);
    let jobs = failed_jobs::list(&mut conn, &Filter::default()).unwrap();
    assert_eq!(
        jobs.len(),
        cases.len(),
        "one failed job per bad message: {jobs:#?}"
    );
    for (label, _, expected) in &cases {
        let tag = format!("bad.{label}");
        let job = if *label == "unknown_event_type" {
            jobs.iter()
                .find(|j| j.event_type.as_deref() == Some("gadget.exploded"))
        } else {
            jobs.iter()
                .find(|j| j.event_type.as_deref() == Some(tag.as_str()))
        };
        let job = job.unwrap_or_else(|| panic!("no failed job for {label}: {jobs:#?}"));
        assert!(job.exception.contains(expected), "{label}: {}", job.exception);
        assert!(job.exception.len() < 1024, "{label}: error bounded");
        assert_eq!(job.attempts, 1, "{label}: failed at once, never retried");
    }
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM listener_attempts"),
        0,
        "no retry state left behind"
    );
    eprintln!("bad bodies: {} cases in {:?}", cases.len(), started.elapsed());
}

/// A worker whose one listener, `audit`, writes an effect per event.
async fn recording_worker() -> (
    outbox::TestDatabase,
    diesel::PgConnection,
    TestBroker,
    Scripted,
    Running,
) {
    let (db, conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("audit", |event, ctx, _| effect(ctx, "audit", event));
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(3, &[50]))
        .unwrap();
    // The non-UTF-8 header case drops the connection about ten times in a
    // row: keep the reconnect backoff short so that stays well inside the
    // waits below on a loaded machine.
    let worker = Running::start_with(&db, &mut broker, &registry, |config| {
        config.reconnect_max = Duration::from_millis(500);
    })
    .await;
    (db, conn, broker, listener, worker)
}

fn database_conn(db: &outbox::TestDatabase) -> diesel::PgConnection {
    db.connect().unwrap()
}

/// A header table of exactly `bytes` bytes on the wire (at least 17).
fn bulky_headers(bytes: usize) -> FieldTable {
    // Each entry: key length (1) + 11-byte key + type (1) + length (4) + value.
    const OVERHEAD: usize = 17;
    let mut headers = FieldTable::default();
    let mut left = bytes;
    let mut i = 0;
    while left >= OVERHEAD {
        let value = if left >= 2000 { 990 } else { left - OVERHEAD };
        headers.insert(
            format!("x-bulk-{i:04}").into(),
            AMQPValue::LongString("v".repeat(value).as_str().into()),
        );
        left -= OVERHEAD + value;
        i += 1;
    }
    headers
}

fn forged_headers() -> Vec<(&'static str, FieldTable)> {
    let mut cases = Vec::new();
    let mut table = |label, entries: Vec<(&str, AMQPValue)>| {
        let mut headers = FieldTable::default();
        for (key, value) in entries {
            headers.insert(key.into(), value);
        }
        cases.push((label, headers));
    };
    table(
        "negative_counts",
        vec![
            ("x-outbox-retry", AMQPValue::LongInt(-5)),
            ("x-delivery-count", AMQPValue::LongLongInt(i64::MIN)),
            ("x-outbox-failed-job", AMQPValue::LongLongInt(-1)),
        ],
    );
    table(
        "giant_counts",
        vec![
            ("x-outbox-retry", AMQPValue::LongLongInt(i64::MAX)),
            ("x-delivery-count", AMQPValue::LongUInt(u32::MAX)),
            ("x-outbox-failed-job", AMQPValue::LongLongInt(i64::MAX)),
        ],
    );
    table(
        "wrong_types",
        vec![
            ("x-outbox-retry", AMQPValue::LongString("three".into())),
            ("x-delivery-count", AMQPValue::Double(-1e308)),
            ("x-outbox-failed-job", AMQPValue::Boolean(true)),
            ("x-death", AMQPValue::LongString("not a table".into())),
            ("traceparent", AMQPValue::FieldArray(FieldArray::default())),
        ],
    );
    table(
        "non_utf8_values",
        vec![
            (
                "x-outbox-error",
                AMQPValue::LongString(LongString::from(vec![0xff, 0xfe, 0x00, 0xc3])),
            ),
            ("aggregate_id", AMQPValue::ByteArray(vec![0xff; 64].into())),
        ],
    );
    table("nested_tables", {
        let mut value = AMQPValue::Boolean(true);
        for _ in 0..64 {
            let mut inner = FieldTable::default();
            inner.insert("n".into(), value);
            value = AMQPValue::FieldTable(inner);
        }
        vec![("x-nested", value)]
    });
    cases.push(("huge_table_100k", bulky_headers(100_000)));
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_forged_headers_on_a_good_event_are_ignored() {
    let (db, mut conn, broker, listener, worker) = recording_worker().await;
    let queues = worker.queue("audit").clone();
    let mut events = Vec::new();
    for (label, forged) in forged_headers() {
        let event = TestEvent::new("widget.created", json!({ "case": label }));
        let (body, properties) = event.encode();
        let mut headers = properties.headers().clone().unwrap_or_default();
        for (key, value) in forged.inner() {
            headers.insert(key.clone(), value.clone());
        }
        broker
            .publish(&event.event_type, &body, properties.with_headers(headers))
            .await;
        events.push((label, event));
    }
    let effects = || count(&mut database_conn(&db), "SELECT count(*) AS n FROM effects");
    eventually("every forged-header event handled", LIMIT, || {
        effects() == events.len() as i64
    })
    .await;
    worker.stop().await;
    for (label, event) in &events {
        let calls = listener.calls_for(event.event_id);
        assert_eq!(calls.len(), 1, "{label}: handled once");
        assert_eq!(calls[0].attempt, 1, "{label}: forged counts are not trusted");
    }
    assert!(
        failed_jobs::list(&mut conn, &Filter::default())
            .unwrap()
            .is_empty()
    );
    for queue in queues.all_queues() {
        assert_eq!(broker.ready(queue).await, 0, "{queue} is empty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_huge_headers_on_a_failing_message_still_dead_letter() {
    // The dead-letter and retry copies add the worker's own headers to the
    // message's: a header table that only just fit the broker's frame
    // (frame_max 128 KiB) must not make those copies unpublishable (which
    // would hold the message and loop on redelivery).
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("audit", |_, _, before| {
        if before == 0 {
            Err(outbox::consumer::ListenerError::transient("first try fails"))
        } else {
            Err(outbox::consumer::ListenerError::permanent(
                "second try fails for good",
            ))
        }
    });
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(3, &[50]))
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;
    let queues = worker.queue("audit").clone();

    // The broker's limit for a frame's payload is 131,064 bytes; these
    // messages come within about 100 bytes of it.
    broker
        .publish_to_queue(
            &queues.queue,
            b"not json at all",
            BasicProperties::default()
                .with_type("bad.huge_headers".into())
                .with_headers(bulky_headers(131_000)),
        )
        .await;
    let event = TestEvent::new("widget.created", json!({}));
    let (body, properties) = event.encode();
    let mut all = properties.headers().clone().unwrap_or_default();
    for (key, value) in bulky_headers(130_850).inner() {
        all.insert(key.clone(), value.clone());
    }
    broker
        .publish_to_queue(&queues.queue, &body, properties.with_headers(all))
        .await;

    broker.wait_ready(&queues.dead, 2, LIMIT).await;
    worker.stop().await;
    let jobs = failed_jobs::list(&mut conn, &Filter::default()).unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:#?}");
    let malformed = jobs.iter().find(|j| j.event_id.is_none()).unwrap();
    assert!(
        malformed.exception.contains("cannot decode"),
        "{}",
        malformed.exception
    );
    let failed = jobs.iter().find(|j| j.event_id == Some(event.event_id)).unwrap();
    assert_eq!(
        failed.attempts, 2,
        "one retry through the retry queue, then failed"
    );
    assert_eq!(listener.calls_for(event.event_id).len(), 2);
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM failed_jobs WHERE attempts = 1 AND event_id IS NULL"
        ),
        1,
        "the malformed message was handled once (no redelivery loop)"
    );
    for _ in 0..2 {
        let (properties, _) = broker.take(&queues.dead).await.unwrap();
        let headers = properties.headers().clone().unwrap_or_default();
        assert!(
            headers.contains_key("x-outbox-failed-job"),
            "{:?}",
            headers.inner().keys()
        );
        assert!(
            headers.contains_key("x-outbox-headers-dropped"),
            "the bulk was cut"
        );
    }
}

/// Publishes to `queue` from inside the broker (`rabbitmqctl eval`), with
/// headers no AMQP client library here will encode. `headers` is an Erlang
/// term for the header list; `Deep` in it is a header array nested
/// `depth` levels.
fn forge(queue: &str, headers: &str, depth: usize, body: &[u8]) {
    let body: String = body.iter().map(|b| format!("{b},")).collect();
    let expr = format!(
        "{{array, Deep}} = lists:foldl(fun(_, Acc) -> {{array, [Acc]}} end, {{bool, true}}, lists:seq(1, {depth})), \
         rabbit_basic:publish(rabbit_misc:r(<<\"/\">>, exchange, <<\"\">>), <<\"{queue}\">>, \
         {{'P_basic', undefined, undefined, {headers}, 2, undefined, undefined, undefined, undefined, \
         undefined, undefined, <<\"bad.forged\">>, undefined, undefined, undefined}}, <<{}>>).",
        body.trim_end_matches(',')
    );
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", &expr])
        .output()
        .expect("rabbitmqctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("ok"),
        "forging failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_non_utf8_header_names_end_in_the_dead_letter_queue() {
    // lapin refuses a header name that is not UTF-8 when parsing the
    // delivery and drops the connection; the worker reconnects, and the
    // queue's x-delivery-limit (set from max_unacked_deliveries) has the
    // broker dead-letter the message after a bounded number of tries,
    // without a failed_jobs row (the worker never saw it). Header arrays
    // nested 200 deep are parsed and ignored. (Nesting in the tens of
    // thousands, which fits a 128 KiB frame, overflows the stack of
    // lapin's I/O thread: see the README's note on who may publish.)
    let (db, mut conn, broker, listener, worker) = recording_worker().await;
    let queues = worker.queue("audit").clone();
    let non_utf8 = TestEvent::new("widget.created", json!({"case": "non_utf8_key"}));
    forge(
        &queues.queue,
        "[{<<255,254,\"key\">>, longstr, <<\"v\">>}]",
        1,
        &non_utf8.encode().0,
    );
    // The next messages go in only once the broker has dead-lettered this
    // one: published together, they would share its prefetch window and
    // be returned (and counted) with it at every dropped connection.
    broker.wait_ready(&queues.dead, 1, Duration::from_secs(60)).await;
    let nested = TestEvent::new("widget.created", json!({"case": "nested_200"}));
    forge(
        &queues.queue,
        "[{<<\"x-deep\">>, array, Deep}]",
        10,
        &nested.encode().0,
    );
    let good = TestEvent::new("widget.created", json!({"ok": true}));
    broker.publish_event(&good).await;
    let effects = || count(&mut database_conn(&db), "SELECT count(*) AS n FROM effects");
    eventually("the good and the nested event's effects", LIMIT, || {
        effects() == 2
    })
    .await;
    eventually("the worker reconnected", LIMIT, || worker.health.is_healthy()).await;
    worker.stop().await;
    assert!(listener.calls_for(non_utf8.event_id).is_empty());
    assert_eq!(listener.calls_for(nested.event_id).len(), 1);
    assert_eq!(listener.calls_for(good.event_id).len(), 1);
    assert!(
        failed_jobs::list(&mut conn, &Filter::default())
            .unwrap()
            .is_empty()
    );
    // (Not taken back out to look at: this client cannot parse it either.)
    assert_eq!(broker.ready(&queues.dead).await, 1);
    for queue in std::iter::once(queues.queue.as_str()).chain(queues.retries.iter().map(|(_, q)| q.as_str()))
    {
        assert_eq!(broker.ready(queue).await, 0, "{queue} is empty");
    }
}

#[test]
fn bad_input_hostile_names_and_sizes_are_refused_with_typed_errors() {
    use outbox::consumer::ListenerOptions;
    use outbox::{Error, RelayConfig, WorkerConfig};
    let refused = |what: &str, outcome: outbox::Result<()>, needle: &str| match outcome {
        Err(Error::Config(message)) => assert!(message.contains(needle), "{what}: {message}"),
        other => panic!("{what}: expected a configuration error, got {other:?}"),
    };
    let registered = |name: &str, events: &[&str], options: ListenerOptions| {
        Registry::new()
            .queued_listener_with(events, Scripted::new(name, |_, _, _| Ok(())), options)
            .map(|_| ())
    };
    let worker = |change: fn(&mut WorkerConfig)| {
        let mut config = WorkerConfig::default();
        change(&mut config);
        config.validate()
    };
    let relay = |change: fn(&mut RelayConfig)| {
        let mut config = RelayConfig::default();
        change(&mut config);
        config.validate()
    };
    refused(
        "app",
        worker(|c| c.app = "chom';DROP TABLE sites;--".into()),
        "app name",
    );
    refused(
        "exchange",
        worker(|c| c.exchange = "ev\"ents".into()),
        "exchange name",
    );
    refused("pool", worker(|c| c.pool_size = Some(0)), "pool size");
    refused(
        "confirm",
        worker(|c| c.confirm_timeout = Duration::ZERO),
        "confirm timeout",
    );
    refused(
        "listener name",
        registered("audit\";--", &["a.b"], ListenerOptions::default()),
        "listener name",
    );
    refused(
        "event type",
        registered("audit", &["a.b';--"], ListenerOptions::default()),
        "event type",
    );
    let zero_tries = ListenerOptions::default().retries(0, &[Duration::from_secs(1)]);
    refused("tries", registered("audit", &["a.b"], zero_tries), "tries");
    let no_concurrency = ListenerOptions {
        concurrency: 0,
        ..ListenerOptions::default()
    };
    refused(
        "concurrency",
        registered("audit", &["a.b"], no_concurrency),
        "concurrency",
    );
    refused("exchange", relay(|c| c.exchange = "x;y".into()), "exchange name");
    refused("batch", relay(|c| c.batch_size = 0), "batch size");
    refused("lease", relay(|c| c.lease = Duration::from_millis(100)), "lease");
    refused(
        "database URL",
        relay(|c| c.database_url = "mysql://u:hunter2@h/db".into()),
        "database URL",
    );
    let leaked = relay(|c| c.database_url = "mysql://u:hunter2@h/db".into());
    assert!(!format!("{leaked:?}").contains("hunter2"), "{leaked:?}");
}
