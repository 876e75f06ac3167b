//! Structured logs on stderr, filtered by `RUST_LOG` (default `info,lapin=off`),
//! and OpenTelemetry traces over OTLP/HTTP when the standard `OTEL_*`
//! variables name a collector (`outbox::telemetry`).

use outbox::telemetry::Telemetry;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

/// Installs the global subscriber: the log lines, and the span exporter
/// when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set,
/// as `service_name` unless `OTEL_SERVICE_NAME` says otherwise. Keep the
/// returned guard until the process ends: dropping it flushes the spans.
#[must_use = "dropping the guard shuts the span exporter down"]
pub fn init(format: LogFormat, service_name: &str) -> Option<Telemetry> {
    // lapin logs every channel the broker closes at ERROR, including the
    // expected ones (a passive declare of a missing queue); our own errors
    // carry lapin's reason, so its logs are opt-in (RUST_LOG=lapin=debug).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=off"));
    init_with(format, filter, service_name)
}

/// [`init`] with a log filter of the caller's (the spans exported pass
/// `outbox::telemetry::span_filter`, whatever the log level).
#[must_use = "dropping the guard shuts the span exporter down"]
pub fn init_with(format: LogFormat, filter: EnvFilter, service_name: &str) -> Option<Telemetry> {
    let (telemetry, failed) = match Telemetry::from_env(service_name) {
        Ok(telemetry) => (telemetry, None),
        Err(error) => (None, Some(error)),
    };
    // Colours only for a terminal: logs sent to a file or a collector
    // carry no escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match &telemetry {
        // Not exporting: the plain log subscriber, the filter global
        // (callsites below its level stay disabled for good).
        None => {
            let plain = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(ansi)
                .with_writer(std::io::stderr);
            match format {
                LogFormat::Text => plain.init(),
                LogFormat::Json => plain.json().init(),
            }
        }
        // Exporting: spans pass their own filter, whatever the log level.
        Some(telemetry) => {
            let spans = telemetry.layer().with_filter(outbox::telemetry::span_filter());
            let registry = tracing_subscriber::registry().with(spans);
            let lines = tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr);
            match format {
                LogFormat::Text => registry.with(lines.with_filter(filter)).init(),
                LogFormat::Json => registry.with(lines.json().with_filter(filter)).init(),
            }
        }
    }
    if let Some(error) = failed {
        tracing::warn!(%error, "OpenTelemetry is configured but its exporter could not be built; no spans are exported");
    }
    telemetry
}
