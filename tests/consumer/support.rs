//! Shared helpers: databases, counting, waiting with deadlines.

use std::sync::{Arc, Mutex, OnceLock};

use diesel::prelude::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
pub use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;
use outbox::TestDatabase;
use outbox::telemetry::Telemetry;
pub use outbox::testing::count;
use prost::Message as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The value of `series` (a metric name with its labels as rendered, or
/// none) in this process's metrics, 0 while it does not exist.
pub fn metric(handle: &metrics_exporter_prometheus::PrometheusHandle, series: &str) -> u64 {
    let prefix = format!("{series} ");
    handle
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(&prefix).and_then(|n| n.trim().parse().ok()))
        .unwrap_or(0)
}

/// A migrated database of the test's own.
pub fn database() -> (TestDatabase, PgConnection) {
    let db = TestDatabase::create().expect("create test database");
    let conn = db.connect().expect("connect");
    (db, conn)
}

/// Logs to the test output when `RUST_LOG` is set, and exports spans to
/// this test binary's OTLP receiver ([`otlp`]): one global subscriber for
/// the whole binary, whichever test installs it first.
pub fn init_tracing() {
    otlp();
}

/// Spans received over OTLP/HTTP by this test binary's own collector.
pub struct Collector {
    spans: Arc<Mutex<Vec<ProtoSpan>>>,
    telemetry: Telemetry,
}

impl Collector {
    /// Exports every finished span now (the exporter's thread sends them;
    /// this waits for it, so call it off the async threads).
    pub fn flush(&self) {
        self.telemetry.force_flush();
    }

    /// The spans of `trace_id` received so far.
    pub fn trace(&self, trace_id: &[u8]) -> Vec<ProtoSpan> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|span| span.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// The binary's OTLP/HTTP receiver (an axum server on 127.0.0.1, on a
/// thread and runtime of its own, decoding `ExportTraceServiceRequest`)
/// and the global subscriber exporting to it, started once.
pub fn otlp() -> &'static Collector {
    static COLLECTOR: OnceLock<Collector> = OnceLock::new();
    COLLECTOR.get_or_init(|| {
        let spans: Arc<Mutex<Vec<ProtoSpan>>> = Arc::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the OTLP receiver");
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let received = Arc::clone(&spans);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = axum::Router::new()
                    .route("/v1/traces", axum::routing::post(receive))
                    .with_state(received);
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        let telemetry = Telemetry::otlp_http("outbox-consumer-tests", &format!("http://{address}/v1/traces"))
            .expect("build the OTLP exporter");
        let logs = std::env::var("RUST_LOG").is_ok().then(|| {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(tracing_subscriber::EnvFilter::from_default_env())
        });
        let _ = tracing_subscriber::registry()
            .with(telemetry.layer().with_filter(outbox::telemetry::span_filter()))
            .with(logs)
            .try_init();
        Collector { spans, telemetry }
    })
}

async fn receive(
    axum::extract::State(spans): axum::extract::State<Arc<Mutex<Vec<ProtoSpan>>>>,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return axum::http::StatusCode::BAD_REQUEST;
    };
    let mut spans = spans.lock().unwrap();
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            spans.extend(scope.spans);
        }
    }
    axum::http::StatusCode::OK
}
