//! OpenTelemetry traces end to end: a write recorded inside a span, the
//! relay's `publish` span, the worker's `handle <listener>` spans, all
//! exported over OTLP/HTTP to a receiver in this test binary (decoding the
//! protobuf `ExportTraceServiceRequest`): one trace, the parent chain
//! write -> publish -> handle, every try of a retried handling its own span,
//! a failed job's handling an error, and no payload value in any attribute.

use std::time::Duration;

use diesel::prelude::*;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use outbox::consumer::ListenerError;
use outbox::{DomainEvent, Registry};
use serde::Serialize;

use crate::broker::TestBroker;
use crate::harness::{RelayRunning, Running, database, effect, eventually, fast};
use crate::support::{ProtoSpan, count, otlp};

const LIMIT: Duration = Duration::from_secs(15);

/// A payload value that must never appear in a span.
const SECRET: &str = "s3cret-payload-value-9f1c";

#[derive(Serialize)]
struct WidgetCreated {
    widget_id: i64,
    api_key: &'static str,
}

impl DomainEvent for WidgetCreated {
    fn event_type(&self) -> &'static str {
        "widget.created"
    }
    fn aggregate_type(&self) -> &'static str {
        "widget"
    }
    fn aggregate_id(&self) -> String {
        self.widget_id.to_string()
    }
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attribute(span: &ProtoSpan, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| text(&kv.value))
}

fn every_attribute(span: &ProtoSpan) -> impl Iterator<Item = &KeyValue> {
    span.attributes
        .iter()
        .chain(span.events.iter().flat_map(|e| e.attributes.iter()))
}

fn is_error(span: &ProtoSpan) -> bool {
    span.status
        .as_ref()
        .is_some_and(|s| s.code == StatusCode::Error as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_from_the_write_to_each_try_of_each_listener() {
    let collector = otlp();
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let flaky = crate::harness::Scripted::new("flaky", |event, ctx, before| {
        if before == 0 {
            return Err(ListenerError::transient("service unavailable"));
        }
        effect(ctx, "flaky", event)
    });
    let doomed =
        crate::harness::Scripted::new("doomed", |_, _, _| Err(ListenerError::transient("still down")));
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], flaky.clone(), fast(3, &[50]))
        .unwrap()
        .queued_listener_with(&["widget.created"], doomed.clone(), fast(2, &[50]))
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;
    let relay = RelayRunning::start(&db, &broker);

    // The write: a span of the test's around the transaction that records.
    let write = tracing::info_span!("write widget");
    let event_id = write.in_scope(|| {
        conn.transaction::<_, outbox::Error, _>(|conn| {
            outbox::record(
                conn,
                &WidgetCreated {
                    widget_id: 7,
                    api_key: SECRET,
                },
            )
        })
        .unwrap()
    });
    let traceparent = outbox::telemetry::traceparent_of(&write).expect("the write span has a context");
    drop(write);
    let stored: Option<String> =
        diesel::sql_query("SELECT traceparent FROM outbox_events WHERE event_id = $1")
            .bind::<diesel::sql_types::Uuid, _>(event_id)
            .get_result::<Traceparent>(&mut conn)
            .map(|row| row.traceparent)
            .unwrap_or_default();
    assert_eq!(
        stored.as_deref(),
        Some(traceparent.as_str()),
        "record took the current span's context"
    );

    eventually(
        "flaky's retry to succeed and doomed to fail for good",
        LIMIT,
        || {
            count(&mut conn, "SELECT count(*) AS n FROM effects") == 1
                && count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 1
        },
    )
    .await;
    worker.stop().await;
    relay.stop().await;

    let trace_id = hex(&traceparent[3..35]);
    let write_span_id = hex(&traceparent[36..52]);
    let mut spans = Vec::new();
    for _ in 0..50 {
        tokio::task::spawn_blocking(|| otlp().flush()).await.unwrap();
        spans = collector.trace(&trace_id);
        if spans.len() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let named = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();

    let writes = named("write widget");
    assert_eq!(writes.len(), 1, "{names:?}");
    assert_eq!(writes[0].span_id, write_span_id);

    let publishes = named("publish");
    assert_eq!(publishes.len(), 1, "{names:?}");
    let publish = publishes[0];
    assert_eq!(
        publish.parent_span_id, write_span_id,
        "publish is the write's child"
    );
    assert_eq!(
        attribute(publish, "messaging.message.id"),
        Some(event_id.to_string())
    );
    assert_eq!(
        attribute(publish, "outbox.event_type").as_deref(),
        Some("widget.created")
    );
    assert_eq!(
        attribute(publish, "outbox.aggregate_type").as_deref(),
        Some("widget")
    );
    let waited: i64 = attribute(publish, "outbox.waited_ms").unwrap().parse().unwrap();
    assert!(
        (0..LIMIT.as_millis() as i64).contains(&waited),
        "waited {waited} ms"
    );

    for (listener, tries) in [("flaky", 2), ("doomed", 2)] {
        let mut handled = named(&format!("handle {listener}"));
        handled.sort_by_key(|s| attribute(s, "outbox.attempt"));
        assert_eq!(handled.len(), tries, "each try is a span: {names:?}");
        for (n, span) in handled.iter().enumerate() {
            assert_eq!(span.parent_span_id, publish.span_id, "handle is publish's child");
            assert_eq!(attribute(span, "outbox.attempt"), Some((n + 1).to_string()));
            assert_eq!(attribute(span, "outbox.listener").as_deref(), Some(listener));
        }
        assert_eq!(attribute(handled[0], "outbox.outcome").as_deref(), Some("retry"));
        let last = handled[tries - 1];
        if listener == "doomed" {
            assert_eq!(attribute(last, "outbox.outcome").as_deref(), Some("failed"));
            assert!(is_error(last), "a failed job's handling is an error");
        } else {
            assert_eq!(attribute(last, "outbox.outcome").as_deref(), Some("success"));
            assert!(!is_error(last));
        }
    }

    for span in &spans {
        for kv in every_attribute(span) {
            let value = text(&kv.value);
            assert!(
                !value.contains(SECRET),
                "{} carries the payload: {}={value}",
                span.name,
                kv.key
            );
            assert!(
                !value.contains("widget_id"),
                "{} carries the payload: {}={value}",
                span.name,
                kv.key
            );
        }
    }
}

#[derive(QueryableByName)]
struct Traceparent {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    traceparent: Option<String>,
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}
