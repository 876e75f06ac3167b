//! `outbox pause` and `outbox resume`.

use anyhow::Context;

/// Options of `outbox pause`.
#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    /// Who is pausing and why, shown by `outbox status`.
    #[arg(long)]
    reason: Option<String>,
}

/// Pauses every relay on this database.
pub fn pause(database_url: &str, args: &PauseArgs) -> anyhow::Result<()> {
    let mut conn = outbox::connect(database_url).context("cannot open the outbox database")?;
    let by = args
        .reason
        .clone()
        .or_else(|| std::env::var("USER").ok().map(|user| format!("paused by {user}")));
    outbox::control::pause(&mut conn, by.as_deref()).context("cannot pause")?;
    println!("paused: relays stop claiming within one poll interval");
    Ok(())
}

/// Lets every relay claim again.
pub fn resume(database_url: &str) -> anyhow::Result<()> {
    let mut conn = outbox::connect(database_url).context("cannot open the outbox database")?;
    outbox::control::resume(&mut conn).context("cannot resume")?;
    println!("resumed");
    Ok(())
}
