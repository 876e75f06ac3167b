//! `outbox webhooks ...`: the endpoints outside systems subscribe with,
//! their deliveries, retries and replays (the library's
//! `outbox::webhooks`).
//!
//! `list --json` prints an array of endpoints (`id`, `url`, `description`,
//! `event_types`, `status` (`active` or `disabled`, then `reason` and
//! `at`), `oauth` (`token_url`, `client_id`, `scope`; never the secret),
//! `failed_deliveries`, `failing_since`, `created_at`); `show --json` one
//! of them; `deliveries --json` an array of tries (`id`, `endpoint_id`,
//! `event_id`, `event_type`, `attempt`, `at`, `status_code`,
//! `duration_ms`, `delivered`, `excerpt`, `error`). Signing secrets are
//! printed once, by `add` and `rotate-secret`, and never listed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use outbox::webhooks::{
    self, Endpoint, EndpointStatus, NewEndpoint, OAuthSettings, OutboundPolicy, Secret, WebhookConfig,
};

use crate::duration::{parse_duration, parse_time};
use crate::failed_cmd::table;

/// Environment variable holding an endpoint's OAuth2 client secret for
/// `add` (never a flag: flags show in `ps`).
pub const CLIENT_SECRET_ENV: &str = "OUTBOX_WEBHOOK_CLIENT_SECRET";

/// Subcommands of `outbox webhooks`.
#[derive(Debug, clap::Subcommand)]
pub enum WebhooksCommand {
    /// Subscribe an endpoint; prints its signing secret once.
    ///
    /// Only https:// URLs with public addresses, unless the host is in
    /// OUTBOX_WEBHOOK_ALLOW (local development and tests).
    ///
    /// Example: outbox webhooks add --url https://hooks.example.com/chom --event-type 'site.*' --event-type backup.failed
    Add(AddArgs),
    /// List the endpoints.
    ///
    /// Example: outbox webhooks list --json
    List(JsonArgs),
    /// Show one endpoint.
    ///
    /// Example: outbox webhooks show 3
    Show(IdJsonArgs),
    /// Let a disabled endpoint get deliveries again (its failure count reset).
    ///
    /// Example: outbox webhooks enable 3
    Enable(IdArgs),
    /// Stop deliveries to an endpoint.
    ///
    /// Example: outbox webhooks disable 3 --reason "receiver migrating"
    Disable(DisableArgs),
    /// Start a secret rotation: a new secret signs from now on, the old one
    /// keeps signing beside it for --overlap; prints the new secret once.
    ///
    /// Example: outbox webhooks rotate-secret 3 --overlap 24h
    RotateSecret(RotateArgs),
    /// Change an endpoint's settings.
    ///
    /// Example: outbox webhooks update 3 --rate-limit 50
    Update(UpdateArgs),
    /// Delete an endpoint and its secrets.
    ///
    /// Example: outbox webhooks remove 3
    Remove(IdArgs),
    /// The newest delivery tries, of one endpoint or all.
    ///
    /// Example: outbox webhooks deliveries --endpoint 3 --limit 20
    Deliveries(DeliveriesArgs),
    /// Retry an endpoint's deliveries that failed for good.
    ///
    /// Example: outbox webhooks retry --endpoint 3
    Retry(RetryArgs),
    /// Send stored events since a time again to one endpoint (same ids).
    ///
    /// Example: outbox webhooks replay --endpoint 3 --since 2h
    Replay(ReplayArgs),
    /// Send a signed `webhook.test` event to an endpoint now and show the answer.
    ///
    /// Example: outbox webhooks test 3
    Test(IdJsonArgs),
    /// Delete logged delivery tries older than --older-than.
    ///
    /// Example: outbox webhooks prune --older-than 30d
    Prune(PruneArgs),
}

/// Options of `outbox webhooks add`.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// Where deliveries go.
    #[arg(long)]
    url: String,
    /// An event type it gets: exact (site.created), a prefix (site.*) or *; repeat for more.
    #[arg(long = "event-type", required = true)]
    event_types: Vec<String>,
    /// What it is for.
    #[arg(long, default_value = "")]
    description: String,
    /// OAuth2 token URL (client credentials); needs --oauth-client-id and
    /// the client secret in OUTBOX_WEBHOOK_CLIENT_SECRET or --oauth-client-secret-file.
    #[arg(long, requires = "oauth_client_id")]
    oauth_token_url: Option<String>,
    /// OAuth2 client id.
    #[arg(long, requires = "oauth_token_url")]
    oauth_client_id: Option<String>,
    /// File holding the OAuth2 client secret.
    #[arg(long)]
    oauth_client_secret_file: Option<PathBuf>,
    /// OAuth2 scope to ask for.
    #[arg(long)]
    oauth_scope: Option<String>,
    /// At most this many deliveries per second to it, from each worker
    /// process (1 to 1000000) [default: no limit].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(webhooks::MAX_RATE_LIMIT)))]
    rate_limit: Option<u32>,
    /// How deliveries are signed: hmac (v1, a shared whsec_ secret) or
    /// ed25519 (v1a: the subscriber gets the whpk_ public key only).
    #[arg(long, value_enum, default_value_t = SigningArg::Hmac)]
    signing: SigningArg,
    /// Print JSON (`endpoint`, `secret`) instead of text.
    #[arg(long)]
    json: bool,
}

/// `--signing` of `outbox webhooks add`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SigningArg {
    /// v1: HMAC-SHA256 under a shared whsec_ secret.
    Hmac,
    /// v1a: ed25519; the subscriber verifies with the whpk_ public key.
    Ed25519,
}

/// `--json` alone.
#[derive(Debug, clap::Args)]
pub struct JsonArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// An endpoint id.
#[derive(Debug, clap::Args)]
pub struct IdArgs {
    /// The endpoint's id.
    id: i64,
}

/// An endpoint id and `--json`.
#[derive(Debug, clap::Args)]
pub struct IdJsonArgs {
    /// The endpoint's id.
    id: i64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Options of `outbox webhooks disable`.
#[derive(Debug, clap::Args)]
pub struct DisableArgs {
    /// The endpoint's id.
    id: i64,
    /// Why (shown by list and show).
    #[arg(long)]
    reason: String,
}

/// Options of `outbox webhooks update`.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// The endpoint's id.
    id: i64,
    /// At most this many deliveries per second, from each worker process
    /// (1 to 1000000), or `none` to lift the limit.
    #[arg(long, value_parser = parse_rate_limit)]
    rate_limit: Option<RateLimitArg>,
}

/// A rate limit given on the command line: a number or `none`.
#[derive(Debug, Clone, Copy)]
struct RateLimitArg(Option<u32>);

fn parse_rate_limit(text: &str) -> Result<RateLimitArg, String> {
    if text == "none" {
        return Ok(RateLimitArg(None));
    }
    match text.parse::<u32>() {
        Ok(n) if (1..=webhooks::MAX_RATE_LIMIT).contains(&n) => Ok(RateLimitArg(Some(n))),
        _ => Err(format!(
            "a rate limit is 1 to {} deliveries per second, or none",
            webhooks::MAX_RATE_LIMIT
        )),
    }
}

/// Options of `outbox webhooks rotate-secret`.
#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// The endpoint's id.
    id: i64,
    /// How long the current secret keeps signing beside the new one.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    overlap: Duration,
}

/// Options of `outbox webhooks deliveries`.
#[derive(Debug, clap::Args)]
pub struct DeliveriesArgs {
    /// Only this endpoint's tries.
    #[arg(long)]
    endpoint: Option<i64>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    limit: i64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Options of `outbox webhooks retry`.
#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    /// The endpoint whose failed deliveries to retry.
    #[arg(long)]
    endpoint: i64,
    /// RabbitMQ URL; several, comma separated, for the nodes of a cluster.
    #[arg(long, env = outbox::settings::AMQP_URL_ENV, default_value = outbox::DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
}

/// Options of `outbox webhooks replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The endpoint to send to.
    #[arg(long)]
    endpoint: i64,
    /// Events recorded at or after this time: RFC 3339 or a duration ago (2h).
    #[arg(long, value_parser = parse_time)]
    since: DateTime<Utc>,
    /// At most this many events.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..=outbox::replay::MAX_REPLAY_LIMIT))]
    limit: i64,
    /// The CloudEvents source of the bodies [default: /outbox/<database name>, as the relay's].
    #[arg(long)]
    source: Option<String>,
}

/// Options of `outbox webhooks prune`.
#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// Delete tries older than this.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    older_than: Duration,
}

/// Runs `outbox webhooks ...`.
pub fn run(database_url: &str, command: &WebhooksCommand) -> anyhow::Result<()> {
    let mut conn = outbox::connect(database_url).context("cannot open the outbox database")?;
    match command {
        WebhooksCommand::Add(args) => add(&mut conn, args),
        WebhooksCommand::List(args) => {
            let endpoints = webhooks::list(&mut conn).context("cannot list the endpoints")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&endpoints)?);
            } else {
                let rows: Vec<[String; 5]> = endpoints.iter().map(row).collect();
                print!(
                    "{}",
                    table(&["ID", "STATUS", "EVENT TYPES", "URL", "DESCRIPTION"], &rows)
                );
            }
            Ok(())
        }
        WebhooksCommand::Show(args) => {
            let endpoint = found(&mut conn, args.id)?;
            let public_keys =
                webhooks::public_keys(&mut conn, args.id).context("cannot read the public keys")?;
            if args.json {
                let mut value = serde_json::to_value(&endpoint)?;
                value["public_keys"] = serde_json::json!(public_keys);
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                show(&endpoint);
                for key in &public_keys {
                    println!("public key:    {key}");
                }
            }
            Ok(())
        }
        WebhooksCommand::Enable(args) => {
            webhooks::enable(&mut conn, args.id)
                .with_context(|| format!("cannot enable endpoint {}", args.id))?;
            println!("endpoint {} enabled", args.id);
            Ok(())
        }
        WebhooksCommand::Disable(args) => {
            webhooks::disable(&mut conn, args.id, &args.reason)
                .with_context(|| format!("cannot disable endpoint {}", args.id))?;
            println!("endpoint {} disabled: {}", args.id, args.reason);
            Ok(())
        }
        WebhooksCommand::RotateSecret(args) => {
            let secret = webhooks::rotate_secret(&mut conn, args.id, args.overlap)
                .with_context(|| format!("cannot rotate the secret of endpoint {}", args.id))?;
            println!(
                "new signing secret of endpoint {} (shown once): {}",
                args.id,
                secret.expose()
            );
            println!(
                "the previous secret signs beside it for {}",
                humantime::format_duration(args.overlap)
            );
            Ok(())
        }
        WebhooksCommand::Update(args) => {
            let Some(RateLimitArg(rate_limit)) = args.rate_limit else {
                bail!("nothing to change: give --rate-limit N or --rate-limit none");
            };
            webhooks::set_rate_limit(&mut conn, args.id, rate_limit)
                .with_context(|| format!("cannot update endpoint {}", args.id))?;
            match rate_limit {
                Some(n) => println!("endpoint {}: at most {n} deliveries per second", args.id),
                None => println!("endpoint {}: no rate limit", args.id),
            }
            Ok(())
        }
        WebhooksCommand::Remove(args) => {
            webhooks::remove(&mut conn, args.id)
                .with_context(|| format!("cannot remove endpoint {}", args.id))?;
            println!("endpoint {} removed", args.id);
            Ok(())
        }
        WebhooksCommand::Deliveries(args) => {
            let tries = webhooks::deliveries(&mut conn, args.endpoint, args.limit)
                .context("cannot read the deliveries")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&tries)?);
            } else {
                let rows: Vec<[String; 7]> = tries
                    .iter()
                    .map(|t| {
                        [
                            t.at.to_rfc3339_opts(SecondsFormat::Millis, true),
                            t.endpoint_id.to_string(),
                            t.event_id.to_string(),
                            t.attempt.to_string(),
                            t.status_code.map_or_else(|| "-".into(), |s| s.to_string()),
                            format!("{:.0}", t.duration_ms),
                            if t.delivered {
                                "delivered".into()
                            } else {
                                t.error.clone().unwrap_or_default()
                            },
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &["AT", "ENDPOINT", "EVENT", "TRY", "STATUS", "MS", "OUTCOME"],
                        &rows
                    )
                );
            }
            Ok(())
        }
        WebhooksCommand::Retry(args) => retry(&mut conn, database_url, args),
        WebhooksCommand::Replay(args) => {
            let source = args
                .source
                .clone()
                .unwrap_or_else(|| outbox::relay::default_source(database_url));
            let requested = webhooks::replay(&mut conn, args.endpoint, args.since, args.limit, &source)
                .with_context(|| format!("cannot replay to endpoint {}", args.endpoint))?;
            println!(
                "{requested} deliveries recorded for endpoint {} (the relay and the workers send them)",
                args.endpoint
            );
            Ok(())
        }
        WebhooksCommand::Test(args) => test(conn, args),
        WebhooksCommand::Prune(args) => {
            let mut total = 0;
            loop {
                let deleted =
                    webhooks::prune_deliveries(&mut conn, args.older_than, 5_000).context("cannot prune")?;
                total += deleted;
                if deleted < 5_000 {
                    break;
                }
            }
            println!("deleted {total} delivery tries");
            Ok(())
        }
    }
}

fn found(conn: &mut diesel::PgConnection, id: i64) -> anyhow::Result<Endpoint> {
    webhooks::get(conn, id)
        .context("cannot read the endpoint")?
        .with_context(|| format!("no webhook endpoint {id}"))
}

fn status_text(endpoint: &Endpoint) -> String {
    match &endpoint.status {
        EndpointStatus::Active => "active".into(),
        EndpointStatus::Disabled { reason, .. } => format!("disabled ({reason})"),
    }
}

fn row(endpoint: &Endpoint) -> [String; 5] {
    [
        endpoint.id.to_string(),
        status_text(endpoint),
        endpoint.event_types.join(","),
        endpoint.url.clone(),
        endpoint.description.clone(),
    ]
}

fn show(endpoint: &Endpoint) {
    println!("id:            {}", endpoint.id);
    println!("url:           {}", endpoint.url);
    println!("description:   {}", endpoint.description);
    println!("event types:   {}", endpoint.event_types.join(", "));
    println!("status:        {}", status_text(endpoint));
    if let Some(n) = endpoint.rate_limit {
        println!("rate limit:    {n} deliveries/s per worker process");
    }
    if let Some(oauth) = &endpoint.oauth {
        println!(
            "oauth2:        client {} at {} (scope {})",
            oauth.client_id,
            oauth.token_url,
            oauth.scope.as_deref().unwrap_or("-")
        );
    }
    println!("failed in a row: {}", endpoint.failed_deliveries);
    println!(
        "created:       {}",
        endpoint.created_at.to_rfc3339_opts(SecondsFormat::Secs, true)
    );
}

fn add(conn: &mut diesel::PgConnection, args: &AddArgs) -> anyhow::Result<()> {
    let policy = OutboundPolicy::from_env()?;
    let oauth = match (&args.oauth_token_url, &args.oauth_client_id) {
        (Some(token_url), Some(client_id)) => {
            let secret = match &args.oauth_client_secret_file {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .trim()
                    .to_owned(),
                None => std::env::var(CLIENT_SECRET_ENV).unwrap_or_default(),
            };
            if secret.is_empty() {
                bail!("OAuth2 needs the client secret in {CLIENT_SECRET_ENV} or --oauth-client-secret-file");
            }
            Some(OAuthSettings {
                token_url: token_url.clone(),
                client_id: client_id.clone(),
                client_secret: Secret::new(secret),
                scope: args.oauth_scope.clone(),
            })
        }
        _ => None,
    };
    let (endpoint, secret) = webhooks::add(
        conn,
        &NewEndpoint {
            url: args.url.clone(),
            description: args.description.clone(),
            event_types: args.event_types.clone(),
            oauth,
            rate_limit: args.rate_limit,
            signing: match args.signing {
                SigningArg::Hmac => webhooks::Signing::Hmac,
                SigningArg::Ed25519 => webhooks::Signing::Ed25519,
            },
        },
        &policy,
    )
    .context("cannot add the endpoint")?;
    let public_key = webhooks::public_key(&secret).context("cannot derive the public key")?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"endpoint": endpoint, "secret": secret.expose(), "public_key": public_key})
            )?
        );
    } else if let Some(public_key) = public_key {
        println!(
            "endpoint {} added: {} gets {} (signed v1a, ed25519)",
            endpoint.id,
            endpoint.url,
            endpoint.event_types.join(", ")
        );
        println!(
            "public key (give it to the receiver; `outbox webhooks show {}` shows it again): {public_key}",
            endpoint.id
        );
        println!(
            "secret key (shown once; rotate-secret makes a new pair): {}",
            secret.expose()
        );
    } else {
        println!(
            "endpoint {} added: {} gets {}",
            endpoint.id,
            endpoint.url,
            endpoint.event_types.join(", ")
        );
        println!(
            "signing secret (shown once; give it to the receiver): {}",
            secret.expose()
        );
    }
    Ok(())
}

fn retry(conn: &mut diesel::PgConnection, database_url: &str, args: &RetryArgs) -> anyhow::Result<()> {
    let ids =
        webhooks::failed_delivery_jobs(conn, args.endpoint).context("cannot read the failed deliveries")?;
    if ids.is_empty() {
        println!("endpoint {} has no failed delivery", args.endpoint);
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(async {
        let pool = outbox::pool(database_url, 2, Duration::from_secs(10))?;
        let connection = outbox::amqp::connect(&args.amqp_url, "outbox webhooks retry").await?;
        let channel = outbox::amqp::open_channel(&connection, true).await?;
        let outcome = outbox::failed_jobs::retry_many(&pool, &channel, &ids, Duration::from_secs(10)).await;
        let _ = connection.close(200, "done".into()).await;
        outcome
    })?;
    println!(
        "retried {} of {} failed deliveries of endpoint {}",
        outcome.retried.len(),
        ids.len(),
        args.endpoint
    );
    for (id, why) in &outcome.kept {
        eprintln!("failed job {id} kept: {why}");
    }
    if outcome.kept.is_empty() {
        Ok(())
    } else {
        bail!("{} failed deliveries could not be retried", outcome.kept.len())
    }
}

fn test(conn: diesel::PgConnection, args: &IdJsonArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let id = args.id;
    let outcome = runtime.block_on(async move {
        let delivery = webhooks::WebhookDelivery::new(WebhookConfig::from_env()?)?;
        tokio::task::spawn_blocking(move || {
            let mut conn = conn;
            delivery.send_test(&mut conn, id)
        })
        .await
        .map_err(|e| anyhow::anyhow!("the test delivery task failed: {e}"))?
        .map_err(anyhow::Error::from)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else if outcome.delivered {
        println!(
            "delivered: HTTP {} in {:.0} ms",
            outcome.status.unwrap_or_default(),
            outcome.duration_ms
        );
    } else {
        println!(
            "not delivered: {} ({:.0} ms){}",
            outcome
                .error
                .clone()
                .unwrap_or_else(|| format!("HTTP {}", outcome.status.unwrap_or_default())),
            outcome.duration_ms,
            outcome
                .excerpt
                .as_deref()
                .map(|e| format!("\n{e}"))
                .unwrap_or_default()
        );
    }
    if outcome.delivered {
        Ok(())
    } else {
        bail!("the test delivery to endpoint {id} failed")
    }
}
