//! Structured logs on stderr, filtered by `RUST_LOG` (default `info,lapin=off`).

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

/// Installs the global subscriber.
pub fn init(format: LogFormat) {
    // lapin logs every channel the broker closes at ERROR, including the
    // expected ones (a passive declare of a missing queue); our own errors
    // carry lapin's reason, so its logs are opt-in (RUST_LOG=lapin=debug).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
