//! What the `outbox` command shares with `outbox-bench`, the benchmarks'
//! own executable (package `outbox-bench` in bench/): duration arguments,
//! the log set-up, and finding one executable from the other. The command
//! is the product; this library is only its parts the bench needs too.

pub mod duration;
pub mod executable;
pub mod logging;

/// The options of every `outbox` command, global to its subcommands;
/// `outbox-bench` takes them too.
#[derive(Debug, clap::Args)]
pub struct GlobalArgs {
    /// Postgres URL of the service database that holds the outbox tables.
    #[arg(
        long,
        env = outbox::settings::DATABASE_URL_ENV,
        default_value = outbox::DEFAULT_DATABASE_URL,
        global = true,
        hide_env_values = true
    )]
    pub database_url: String,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = logging::LogFormat::Text, global = true)]
    pub log_format: logging::LogFormat,
}
