//! `chom team`, `chom ssl`, `chom security`, `chom quota`: the account events'
//! subcommands. Secrets are printed once, on stdout, by the commands that
//! create or rotate them, and appear nowhere else (not in errors, not in
//! logs, not in listings).

use chom::secret::Secret;
use chom::services::quotas::{self, Limits};
use chom::services::security::{self, FailedLoginPolicy, Rotated};
use chom::services::{ssl, team};

use super::*;

pub(crate) fn team_command(url: &str, outbox: &Outbox, command: TeamCommand) -> Result<()> {
    match command {
        TeamCommand::List { tenant, output } => {
            let members = team::list_members(&mut connect(url)?, tenant)
                .with_context(|| format!("listing tenant {tenant}'s team"))?;
            if output.json {
                return print_json(&members);
            }
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:>8}  {:<7}  {:<40}  name", "user", "role", "email")?;
            for m in members {
                writeln!(
                    out,
                    "{:>8}  {:<7}  {:<40}  {}",
                    m.user_id, m.role, m.email, m.name
                )?;
            }
            Ok(())
        }
        TeamCommand::SetRole {
            user,
            role,
            actor,
            output,
        } => {
            let recorded = team::change_role(outbox, &mut connect(url)?, actor.metadata(), user, role)
                .with_context(|| format!("making user {user} {role}"))?;
            print_event(&output, &recorded)
        }
        TeamCommand::Remove { user, actor, output } => {
            let recorded = team::remove_member(outbox, &mut connect(url)?, actor.metadata(), user)
                .with_context(|| format!("removing user {user} from its team"))?;
            print_event(&output, &recorded)
        }
        TeamCommand::Transfer {
            tenant,
            to,
            actor,
            output,
        } => {
            let recorded = team::transfer_ownership(outbox, &mut connect(url)?, actor.metadata(), tenant, to)
                .with_context(|| format!("transferring tenant {tenant} to user {to}"))?;
            print_event(&output, &recorded)
        }
    }
}

pub(crate) fn ssl_command(url: &str, outbox: &Outbox, command: SslCommand) -> Result<()> {
    match command {
        SslCommand::Request { site, actor, output } => {
            let recorded = ssl::request_certificate(outbox, &mut connect(url)?, actor.metadata(), site)
                .with_context(|| format!("requesting a certificate for site {site}"))?;
            print_id(&output, recorded.value.id, &recorded)
        }
        SslCommand::Issue {
            id,
            issuer,
            valid_for,
            actor,
            output,
        } => {
            let valid_for = chrono::Duration::from_std(valid_for).context("--valid-for is too long")?;
            let expires_at = chrono::Utc::now()
                .checked_add_signed(valid_for)
                .context("--valid-for is too long")?;
            let recorded = ssl::issue_certificate(
                outbox,
                &mut connect(url)?,
                actor.metadata(),
                id,
                &issuer,
                expires_at,
            )
            .with_context(|| format!("issuing certificate {id}"))?;
            print_event(&output, &recorded)
        }
        SslCommand::Check {
            within_days,
            actor,
            output,
        } => {
            let warned = ssl::check_expiring(outbox, &mut connect(url)?, actor.metadata(), within_days)
                .with_context(|| format!("checking certificates expiring within {within_days} days"))?;
            if output.json {
                return print_json(&warned);
            }
            let mut out = std::io::stdout().lock();
            if warned.is_empty() {
                writeln!(out, "no certificate newly expiring within {within_days} days")?;
            }
            for recorded in warned {
                let c = recorded.value;
                writeln!(
                    out,
                    "certificate {} of {} expires {}  (event {})",
                    c.id,
                    c.domain,
                    c.expires_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    recorded.event_id
                )?;
            }
            Ok(())
        }
        SslCommand::List { site, tenant, output } => {
            let list =
                ssl::list_certificates(&mut connect(url)?, site, tenant).context("listing certificates")?;
            if output.json {
                return print_json(&list);
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:>8}  {:>8}  {:<40}  {:<10}  expires",
                "id", "site", "domain", "status"
            )?;
            for c in list {
                writeln!(
                    out,
                    "{:>8}  {:>8}  {:<40}  {:<10}  {}",
                    c.id,
                    c.site_id,
                    c.domain,
                    c.status,
                    c.expires_at
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "-".into())
                )?;
            }
            Ok(())
        }
    }
}

pub(crate) fn security_command(url: &str, outbox: &Outbox, command: SecurityCommand) -> Result<()> {
    match command {
        SecurityCommand::Vps(VpsCommand::Add {
            tenant,
            hostname,
            output,
        }) => {
            let (server, secret) = security::add_vps(&mut connect(url)?, tenant, &hostname)
                .with_context(|| format!("adding VPS {hostname}"))?;
            print_secret(
                &output,
                server.id,
                serde_json::json!({"vps": server, "credential": secret.expose()}),
                &secret,
                "credential",
            )
        }
        SecurityCommand::Vps(VpsCommand::Rotate { id, actor, output }) => {
            let rotated = security::rotate_vps_credentials(outbox, &mut connect(url)?, actor.metadata(), id)
                .with_context(|| format!("rotating the credential of VPS {id}"))?;
            print_rotated(&output, &rotated, "credential")
        }
        SecurityCommand::Vps(VpsCommand::List { tenant, output }) => {
            let list = security::list_vps(&mut connect(url)?, tenant).context("listing VPS servers")?;
            if output.json {
                return print_json(&list);
            }
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:>8}  {:>8}  hostname", "id", "tenant")?;
            for v in list {
                writeln!(out, "{:>8}  {:>8}  {}", v.id, v.tenant_id, v.hostname)?;
            }
            Ok(())
        }
        SecurityCommand::Token(TokenCommand::Create { tenant, name, output }) => {
            let (token, secret) = security::create_api_token(&mut connect(url)?, tenant, &name)
                .with_context(|| format!("creating API token {name:?}"))?;
            print_secret(
                &output,
                token.id,
                serde_json::json!({"token": token, "secret": secret.expose()}),
                &secret,
                "token",
            )
        }
        SecurityCommand::Token(TokenCommand::Rotate { id, actor, output }) => {
            let rotated = security::rotate_api_token(outbox, &mut connect(url)?, actor.metadata(), id)
                .with_context(|| format!("rotating API token {id}"))?;
            print_rotated(&output, &rotated, "token")
        }
        SecurityCommand::Token(TokenCommand::Verify { output }) => {
            let mut presented = String::new();
            std::io::stdin()
                .read_line(&mut presented)
                .context("reading the token from stdin")?;
            let presented = Secret::new(presented.trim());
            let token = security::verify_api_token(&mut connect(url)?, &presented)
                .context("verifying the token")?
                .context("not a valid API token")?;
            if output.json {
                return print_json(&token);
            }
            writeln!(std::io::stdout(), "{}  {}", token.id, token.name)?;
            Ok(())
        }
        SecurityCommand::Token(TokenCommand::List { tenant, output }) => {
            let list = security::list_api_tokens(&mut connect(url)?, tenant).context("listing API tokens")?;
            if output.json {
                return print_json(&list);
            }
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:>8}  {:>8}  {:<32}  rotated", "id", "tenant", "name")?;
            for t in list {
                writeln!(
                    out,
                    "{:>8}  {:>8}  {:<32}  {}",
                    t.id,
                    t.tenant_id,
                    t.name,
                    t.rotated_at
                        .map(|r| r.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "never".into())
                )?;
            }
            Ok(())
        }
        SecurityCommand::FailedLogin {
            user,
            ip,
            threshold,
            window,
            actor,
            output,
        } => {
            let policy = FailedLoginPolicy { threshold, window };
            let outcome = security::record_failed_login(
                outbox,
                &mut connect(url)?,
                actor.metadata(),
                user,
                &ip,
                &policy,
            )
            .with_context(|| format!("recording a failed sign-in of user {user}"))?;
            if output.json {
                return print_json(&outcome);
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "failed sign-in {} recorded: {} of {threshold} within {}",
                outcome.attempt_id,
                outcome.failures_in_window,
                humantime::format_duration(window)
            )?;
            if let Some(incident) = outcome.incident {
                writeln!(
                    out,
                    "suspicious activity: incident {} (event {})",
                    incident.value.id, incident.event_id
                )?;
            }
            Ok(())
        }
        SecurityCommand::Incidents { tenant, output } => {
            let list =
                security::list_incidents(&mut connect(url)?, tenant).context("listing security incidents")?;
            if output.json {
                return print_json(&list);
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:>8}  {:>8}  {:>8}  {:<14}  {:>8}  detected",
                "id", "tenant", "user", "kind", "attempts"
            )?;
            for i in list {
                writeln!(
                    out,
                    "{:>8}  {:>8}  {:>8}  {:<14}  {:>8}  {}",
                    i.id,
                    i.tenant_id,
                    i.user_id,
                    i.kind,
                    i.attempts,
                    i.detected_at.format("%Y-%m-%d %H:%M:%S")
                )?;
            }
            Ok(())
        }
    }
}

pub(crate) fn quota_command(url: &str, outbox: &Outbox, command: QuotaCommand) -> Result<()> {
    match command {
        QuotaCommand::Set {
            tenant,
            plan,
            max_sites,
            max_storage_bytes,
            monthly_bandwidth_bytes,
            output,
        } => {
            let base = quotas::plan(&plan).map(|p| p.limits).unwrap_or_default();
            let limit = |flag: &str, value: Option<u64>, default: Option<i64>| -> Result<Option<i64>> {
                match value {
                    Some(v) => Ok(Some(
                        i64::try_from(v).with_context(|| format!("--{flag} {v} is too large"))?,
                    )),
                    None => Ok(default),
                }
            };
            let limits = Limits {
                max_sites: limit("max-sites", max_sites, base.max_sites)?,
                max_storage_bytes: limit("max-storage-bytes", max_storage_bytes, base.max_storage_bytes)?,
                monthly_bandwidth_bytes: limit(
                    "monthly-bandwidth-bytes",
                    monthly_bandwidth_bytes,
                    base.monthly_bandwidth_bytes,
                )?,
            };
            let quota = quotas::set_quota(&mut connect(url)?, tenant, &plan, &limits)
                .with_context(|| format!("setting tenant {tenant}'s quota"))?;
            if output.json {
                return print_json(&quota);
            }
            writeln!(
                std::io::stdout(),
                "tenant {} on plan {}: sites {}, storage {}, bandwidth {} a month",
                quota.tenant_id,
                quota.plan,
                shown(quota.max_sites),
                shown(quota.max_storage_bytes),
                shown(quota.monthly_bandwidth_bytes)
            )?;
            Ok(())
        }
        QuotaCommand::Show { tenant, output } => {
            let usage = quotas::usage(&mut connect(url)?, tenant, chrono::Utc::now())
                .with_context(|| format!("reading tenant {tenant}'s usage"))?;
            if output.json {
                return print_json(&usage);
            }
            let quota = usage.quota.as_ref();
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "tenant {} on plan {}",
                usage.tenant_id,
                quota.map_or("none (no limits)", |q| q.plan.as_str())
            )?;
            writeln!(
                out,
                "  sites      {:>16} of {}",
                usage.sites,
                shown(quota.and_then(|q| q.max_sites))
            )?;
            writeln!(
                out,
                "  storage    {:>16} of {} bytes",
                usage.storage_bytes,
                shown(quota.and_then(|q| q.max_storage_bytes))
            )?;
            writeln!(
                out,
                "  bandwidth  {:>16} of {} bytes in {}",
                usage.bandwidth_bytes,
                shown(quota.and_then(|q| q.monthly_bandwidth_bytes)),
                usage.month
            )?;
            Ok(())
        }
        QuotaCommand::ReportBandwidth {
            site,
            bytes,
            actor,
            output,
        } => {
            let bytes = i64::try_from(bytes).context("--bytes is too large")?;
            let report = quotas::report_bandwidth(
                outbox,
                &mut connect(url)?,
                actor.metadata(),
                site,
                bytes,
                chrono::Utc::now(),
            )
            .with_context(|| format!("reporting bandwidth of site {site}"))?;
            if output.json {
                return print_json(&report);
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "site {} served {} bytes in {} (tenant {}: {} bytes)",
                report.site_id, report.site_bytes, report.month, report.tenant_id, report.tenant_bytes
            )?;
            if let Some(event) = report.event {
                writeln!(out, "bandwidth limit reached (event {})", event.event_id)?;
            }
            Ok(())
        }
        QuotaCommand::Breaches { tenant, output } => {
            let list = quotas::list_breaches(&mut connect(url)?, tenant).context("listing quota breaches")?;
            if output.json {
                return print_json(&list);
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:>8}  {:>8}  {:<10}  {:>16}  {:>16}  detected",
                "id", "tenant", "quota", "used", "limit"
            )?;
            for b in list {
                writeln!(
                    out,
                    "{:>8}  {:>8}  {:<10}  {:>16}  {:>16}  {}",
                    b.id,
                    b.tenant_id,
                    b.quota,
                    b.used,
                    b.limit,
                    b.detected_at.format("%Y-%m-%d %H:%M:%S")
                )?;
            }
            Ok(())
        }
    }
}

fn shown(limit: Option<i64>) -> String {
    limit.map_or_else(|| "unlimited".into(), |l| l.to_string())
}

/// Prints a created row's id and its secret, each alone on a line (JSON:
/// `json`), with a reminder on stderr that it is shown once.
fn print_secret(
    output: &Output,
    id: i64,
    json: serde_json::Value,
    secret: &Secret,
    what: &str,
) -> Result<()> {
    if output.json {
        print_json(&json)?;
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{id}")?;
        writeln!(out, "{}", secret.expose())?;
    }
    eprintln!("the {what} is shown once: CHOM keeps only its SHA-256");
    Ok(())
}

/// Prints a rotation's event id and new secret, each alone on a line.
fn print_rotated<T: Serialize>(output: &Output, rotated: &Rotated<T>, what: &str) -> Result<()> {
    if output.json {
        print_json(&serde_json::json!({
            "event_id": rotated.recorded.event_id,
            "event_type": rotated.recorded.event_type,
            "value": rotated.recorded.value,
            what: rotated.secret.expose(),
        }))?;
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", rotated.recorded.event_id)?;
        writeln!(out, "{}", rotated.secret.expose())?;
    }
    eprintln!("the new {what} is shown once: CHOM keeps only its SHA-256");
    Ok(())
}
