//! How `chom` prints: tables, JSON, the demo and simulation reports.

use super::*;

pub(crate) fn print_demo(report: &chom::demo::DemoReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n== events (this run) ==")?;
    writeln!(out, "{:<38} {:>9} {:>10}", "event type", "recorded", "published")?;
    for (event_type, count) in &report.events {
        writeln!(
            out,
            "{event_type:<38} {:>9} {:>10}",
            count.recorded, count.published
        )?;
    }
    let recorded: u64 = report.events.values().map(|c| c.recorded).sum();
    let published: u64 = report.events.values().map(|c| c.published).sum();
    writeln!(out, "{:<38} {recorded:>9} {published:>10}", "total")?;

    writeln!(out, "\n== listener outcomes ==  ({})", report.retry_policy)?;
    writeln!(
        out,
        "{:<22} {:<7} {:>8} {:>10} {:>8} {:>7} {:>8}",
        "listener", "kind", "success", "duplicate", "retried", "failed", "foreign"
    )?;
    for l in &report.listeners {
        writeln!(
            out,
            "{:<22} {:<7} {:>8} {:>10} {:>8} {:>7} {:>8}",
            l.listener, l.kind, l.success, l.duplicate, l.retried, l.failed, l.foreign
        )?;
    }

    writeln!(out, "\n== audit log ==")?;
    writeln!(
        out,
        "{} rows for {} events ({} system actions without an actor)",
        report.audit_rows, recorded, report.audit_system_actions
    )?;
    writeln!(out, "{} notifications stored", report.notifications)?;

    writeln!(out, "\n== tenant stats (UpdateTenantMetrics) ==")?;
    writeln!(
        out,
        "{:>6}  {:<40} {:>6} {:>7} {:>14} {:>8} {:>7}",
        "tenant", "name", "sites", "active", "storage_bytes", "backups", "failed"
    )?;
    for t in &report.tenants {
        writeln!(
            out,
            "{:>6}  {:<40} {:>6} {:>7} {:>14} {:>8} {:>7}",
            t.tenant_id, t.name, t.sites, t.active_sites, t.storage_bytes, t.backups, t.failed_backups
        )?;
    }

    writeln!(out, "\n== failed jobs ==")?;
    if report.failed_jobs.is_empty() {
        writeln!(out, "none")?;
    }
    for job in &report.failed_jobs {
        writeln!(
            out,
            "#{:<5} {:<20} {:<38} {} tries  {}",
            job.id,
            job.listener,
            job.event_type.as_deref().unwrap_or("-"),
            job.attempts,
            job.exception
        )?;
    }
    for (queue, depth) in &report.dead_lettered {
        writeln!(out, "dead-letter queue {queue}: {depth} message(s)")?;
    }

    writeln!(out, "\n== RecordMetrics counters ==")?;
    for (name, value) in &report.metrics {
        writeln!(out, "{name} {value}")?;
    }
    writeln!(
        out,
        "\nfinished in {:.1} s{}",
        report.elapsed_seconds,
        if report.settled {
            ""
        } else {
            " (NOT settled: some events were still being handled)"
        }
    )?;
    Ok(())
}

pub(crate) fn print_id<T: Serialize>(output: &Output, id: i64, value: &T) -> Result<()> {
    if output.json {
        print_json(value)
    } else {
        writeln!(std::io::stdout(), "{id}")?;
        Ok(())
    }
}

pub(crate) fn print_event<T: Serialize>(output: &Output, recorded: &Recorded<T>) -> Result<()> {
    if output.json {
        print_json(recorded)
    } else {
        writeln!(std::io::stdout(), "{}", recorded.event_id)?;
        Ok(())
    }
}

pub(crate) fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, value).context("writing JSON")?;
    writeln!(stdout)?;
    Ok(())
}

pub(crate) fn print_site_table(list: &[Site]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>8}  {:>8}  {:<40}  {:<12}  {:>14}  created",
        "id", "tenant", "domain", "status", "storage_bytes"
    )?;
    for site in list {
        writeln!(
            out,
            "{:>8}  {:>8}  {:<40}  {:<12}  {:>14}  {}",
            site.id,
            site.tenant_id,
            site.domain,
            site.status,
            site.storage_bytes,
            site.created_at.format("%Y-%m-%d %H:%M:%S")
        )?;
    }
    Ok(())
}

pub(crate) fn print_report(report: &SimulateReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<38} {:>10} {:>10}", "event type", "recorded", "in outbox")?;
    for event_type in chom::events::EVENT_TYPES {
        let recorded = report.events.get(event_type).copied().unwrap_or(0);
        let stored = report.database_events.get(event_type).copied().unwrap_or(0);
        writeln!(out, "{event_type:<38} {recorded:>10} {stored:>10}")?;
    }
    writeln!(
        out,
        "{:<38} {:>10} {:>10}",
        "total",
        report.events.values().sum::<u64>(),
        report.database_events.values().sum::<u64>()
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{} transactions in {:.2} s: {:.1} transactions/s ({} writers, {} tenants, {} sites, seed {})",
        report.transactions,
        report.elapsed_seconds,
        report.transactions_per_second,
        report.writers,
        report.tenants,
        report.sites,
        report.seed
    )?;
    if report.verified {
        writeln!(
            out,
            "verified: every recorded event is in outbox_events exactly once"
        )?;
    }
    Ok(())
}
