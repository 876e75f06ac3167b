//! `outbox bench`: runs the benchmarks' own executable, `outbox-bench`
//! (package `outbox-bench`, bench/), with the same arguments. The bench
//! links the CHOM example and the library's test fixtures; keeping it out
//! of this binary keeps them out of the relay people deploy.

use std::ffi::OsString;
use std::process::Command;

use anyhow::Context;
use clap::ValueEnum;

use crate::logging::LogFormat;

/// The executable `outbox bench` runs.
const BENCH: &str = "outbox-bench";

/// Everything after `outbox bench`, handed to `outbox-bench` untouched.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A scenario and its options (`outbox bench --help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    args: Vec<OsString>,
}

/// Runs `outbox-bench` (beside this executable, else on `PATH`) in place of
/// this process, with `DATABASE_URL` set to `database_url` and the log
/// format ahead of `args` (where a later `--log-format` overrides it); it
/// returns only when that cannot be done.
pub fn run(database_url: &str, log_format: LogFormat, args: &BenchArgs) -> anyhow::Result<()> {
    let exe = outbox_relay::executable::beside_or_on_path(BENCH).with_context(|| {
        format!(
            "`outbox bench` runs `{BENCH}`, which is neither beside this executable nor on PATH; \
             build both with `cargo build --release -p outbox-relay -p outbox-bench`"
        )
    })?;
    let mut command = Command::new(&exe);
    let log_format = log_format
        .to_possible_value()
        .map(|value| value.get_name().to_owned());
    command
        .args(log_format.iter().flat_map(|name| ["--log-format", name]))
        .args(&args.args)
        .env("DATABASE_URL", database_url);
    Err(exec(command)).with_context(|| format!("cannot run {}", exe.display()))
}

/// Replaces this process with `command` (signals then reach the bench and
/// its exit status is the caller's); returns only the error.
#[cfg(unix)]
fn exec(mut command: Command) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    command.exec()
}

/// Runs `command` and exits with its status; returns only the error.
#[cfg(not(unix))]
fn exec(mut command: Command) -> std::io::Error {
    match command.status() {
        Ok(status) => std::process::exit(status.code().unwrap_or(1)),
        Err(error) => error,
    }
}
