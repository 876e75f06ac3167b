//! OpenTelemetry traces (feature `otel`): an OTLP/HTTP exporter built from
//! the standard `OTEL_*` variables, the `tracing` layer that feeds it, and
//! the W3C trace context the library carries from a writer's span to the
//! relay's `publish` span and on to the worker's `handle <listener>` span.
//!
//! [`Telemetry::from_env`] builds nothing unless `OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED`
//! is not `true`, `OTEL_TRACES_EXPORTER` not `none`). While no [`Telemetry`]
//! exists in the process, the relay and the worker make no spans of their
//! own and `record` reads no span context: [`is_active`] is one atomic load.
//!
//! Span attributes name events (id, type, aggregate type, listener,
//! attempt), never their payload, actor or tenant.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Span;
use tracing::subscriber::Subscriber;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::registry::LookupSpan;

/// Whether a [`Telemetry`] has been built in this process.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The instrumentation scope of the library's spans.
const SCOPE: &str = "outbox";

/// How long dropping a [`Telemetry`] waits for the last spans to leave.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter refused its configuration (a bad endpoint, say).
    #[error("cannot build the OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// A tracer provider exporting spans over OTLP/HTTP (protobuf) in batches.
/// Dropping it flushes what is buffered and shuts the exporter down.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// The exporter the standard variables ask for, or `None` when they
    /// ask for none (no endpoint set, the SDK disabled, or
    /// `OTEL_TRACES_EXPORTER=none`). The exporter itself reads the
    /// endpoint, headers, timeout and compression variables; the resource
    /// reads `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, with
    /// `default_service_name` when no service name is set.
    pub fn from_env(default_service_name: &str) -> Result<Option<Self>, TelemetryError> {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        let disabled = std::env::var("OTEL_SDK_DISABLED")
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
            || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim().eq_ignore_ascii_case("none"));
        if disabled || !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()?;
        let service = (!set("OTEL_SERVICE_NAME")).then_some(default_service_name);
        Ok(Some(Self::with_exporter(exporter, service)))
    }

    /// An exporter sending to `traces_endpoint` (the full URL, as
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: `http://host:4318/v1/traces`)
    /// as `service_name`, whatever the environment says.
    pub fn otlp_http(service_name: &str, traces_endpoint: &str) -> Result<Self, TelemetryError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_endpoint)
            .build()?;
        Ok(Self::with_exporter(exporter, Some(service_name)))
    }

    fn with_exporter(exporter: opentelemetry_otlp::SpanExporter, service_name: Option<&str>) -> Self {
        let mut resource = Resource::builder();
        if let Some(name) = service_name {
            resource = resource.with_service_name(name.to_owned());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        ACTIVE.store(true, Ordering::Release);
        Self { provider }
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans for
    /// this exporter; add it to the subscriber next to the log layer.
    pub fn layer<S>(&self) -> OpenTelemetryLayer<S, SdkTracer>
    where
        S: Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer(SCOPE))
    }

    /// Exports every finished span now (tests, and before a planned exit).
    pub fn force_flush(&self) {
        if let Err(error) = self.provider.force_flush() {
            tracing::warn!(%error, "could not flush trace spans");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(%error, "could not flush trace spans at shutdown");
        }
    }
}

/// The spans worth exporting, whatever the log level: INFO and above,
/// except the HTTP stack's own (the exporter's requests would otherwise
/// trace themselves) and the AMQP client's.
pub fn span_filter() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new()
        .with_default(tracing::Level::INFO)
        .with_target("hyper", tracing::level_filters::LevelFilter::OFF)
        .with_target("hyper_util", tracing::level_filters::LevelFilter::OFF)
        .with_target("h2", tracing::level_filters::LevelFilter::OFF)
        .with_target("reqwest", tracing::level_filters::LevelFilter::OFF)
        .with_target("tower", tracing::level_filters::LevelFilter::OFF)
        .with_target("opentelemetry", tracing::level_filters::LevelFilter::OFF)
        .with_target("opentelemetry_sdk", tracing::level_filters::LevelFilter::OFF)
        .with_target("opentelemetry_otlp", tracing::level_filters::LevelFilter::OFF)
        .with_target("lapin", tracing::level_filters::LevelFilter::OFF)
        .with_target("diesel", tracing::level_filters::LevelFilter::OFF)
}

/// Whether spans are being exported by this process (a [`Telemetry`] was
/// built). The library makes its spans only then.
pub fn is_active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

/// The W3C `traceparent` of `span`'s OpenTelemetry context, when it has
/// a valid one.
pub fn traceparent_of(span: &Span) -> Option<String> {
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    span_context.is_valid().then(|| {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    })
}

/// Records the trace and span ids of `span` in its `trace_id` and
/// `span_id` fields (so log lines inside it carry them) and returns its
/// traceparent.
pub(crate) fn record_ids(span: &Span) -> Option<String> {
    let traceparent = traceparent_of(span)?;
    if let (Some(trace_id), Some(span_id)) = (traceparent.get(3..35), traceparent.get(36..52)) {
        span.record("trace_id", trace_id);
        span.record("span_id", span_id);
    }
    Some(traceparent)
}

/// The `traceparent` of the current span, while exporting.
pub(crate) fn current_traceparent() -> Option<String> {
    if !is_active() {
        return None;
    }
    traceparent_of(&Span::current())
}

/// Makes `traceparent` (W3C trace context) the parent of `span`; an
/// invalid or missing value leaves `span` a root.
pub fn set_parent_from(span: &Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Marks `span` as failed (`otel.status_code = ERROR`) with a short,
/// payload-free description.
pub(crate) fn mark_error(span: &Span, description: &'static str) {
    span.set_status(opentelemetry::trace::Status::error(description));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_layer_spans_have_no_traceparent() {
        let span = tracing::info_span!("x");
        assert_eq!(traceparent_of(&span), None);
        set_parent_from(
            &span,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        set_parent_from(&span, Some("garbage"));
        set_parent_from(&span, None);
    }
}
