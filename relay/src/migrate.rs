//! `outbox migrate`.

use anyhow::Context;

/// Options of `outbox migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Fail instead of creating the database when it does not exist.
    #[arg(long)]
    no_create_database: bool,
}

/// Creates the database if needed and applies pending migrations.
pub fn run(database_url: &str, args: &MigrateArgs) -> anyhow::Result<()> {
    let shown = outbox::redact_url(database_url);
    if !args.no_create_database
        && outbox::create_database_if_missing(database_url)
            .with_context(|| format!("cannot create the database of {shown}"))?
    {
        tracing::info!(database = %shown, "created database");
    }
    let mut conn = outbox::connect(database_url).context("cannot open the outbox database")?;
    let applied = outbox::migrate(&mut conn).with_context(|| format!("cannot migrate {shown}"))?;
    if applied.is_empty() {
        println!("outbox schema is up to date");
    } else {
        for version in &applied {
            println!("applied {version}");
        }
    }
    Ok(())
}
