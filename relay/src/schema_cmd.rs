//! `outbox schema check`: the compatibility check on exported folders.
//!
//! The schemas come from a service's Rust types, which this command does
//! not link: the service exports them (`chom schema export DIR`, or
//! `outbox::contract::SchemaSet::export` from its own code), and this
//! command compares two such folders, the upcaster steps included (each
//! file lists its type's). The service's own command (`chom schema check`)
//! does the same from its registry without the export step.

use std::path::PathBuf;

use anyhow::{Context, bail};
use outbox::contract::{SchemaSet, compat};

/// Subcommands of `outbox schema`.
#[derive(Debug, clap::Subcommand)]
pub enum SchemaCommand {
    /// Compare a service's current schemas with a committed set and fail
    /// (exit 1) on a breaking change: a field removed or retyped, a new
    /// required field, an enum narrowed, a type removed. Additions pass;
    /// so does any change whose type's version was raised with an upcaster
    /// registered from the committed version.
    ///
    /// Example: chom schema export target/schemas && outbox schema check --against examples/chom/schemas --current target/schemas
    Check(CheckArgs),
}

/// Options of `outbox schema check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The committed folder (an earlier export).
    #[arg(long)]
    against: PathBuf,
    /// The folder the service's current code exported.
    #[arg(long)]
    current: PathBuf,
}

/// Runs `outbox schema ...`.
pub fn run(command: &SchemaCommand) -> anyhow::Result<()> {
    match command {
        SchemaCommand::Check(args) => {
            let read = |dir: &PathBuf, what: &str| {
                SchemaSet::read_dir(dir)
                    .with_context(|| format!("reading the {what} schemas in {}", dir.display()))
            };
            let committed = read(&args.against, "committed")?;
            let current = read(&args.current, "current")?;
            let report = compat::check(&current, &committed);
            print!("{report}");
            if !report.is_compatible() {
                bail!(
                    "breaking change in {} against {}",
                    report.breaking().join(", "),
                    args.against.display()
                );
            }
            Ok(())
        }
    }
}
