//! The `chom` command line: subcommands, their arguments and parsers.

use super::*;

/// The CHOM hosting platform: tenants, sites and backups, with every change
/// recorded as a domain event in the transactional outbox.
#[derive(Debug, Parser)]
#[command(name = "chom", version)]
pub(crate) struct Cli {
    /// Postgres URL of CHOM's database.
    // hide_env_values: --help must not print a password taken from the
    // environment.
    #[arg(
        long,
        env = outbox::settings::DATABASE_URL_ENV,
        default_value = DEFAULT_DATABASE_URL,
        hide_env_values = true,
        global = true
    )]
    pub(crate) database_url: String,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create the database if it is missing, then run the outbox's and
    /// CHOM's migrations.
    Migrate(MigrateArgs),
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage users (the recipients of notifications).
    #[command(subcommand)]
    User(UserCommand),
    /// Manage sites.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Manage backups.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// A tenant's team: members, roles, ownership (team.* events).
    #[command(subcommand)]
    Team(TeamCommand),
    /// SSL certificates: request, issue, the expiry check (ssl.* events).
    #[command(subcommand)]
    Ssl(SslCommand),
    /// VPS credentials, API tokens, failed sign-ins (security.* events).
    /// Secrets are printed once, when created or rotated, and never again.
    #[command(subcommand)]
    Security(SecurityCommand),
    /// Plans, quotas and usage (quota.* events).
    #[command(subcommand)]
    Quota(QuotaCommand),
    /// Drive whole site lifecycles from concurrent writers, then the account events
    /// for each tenant (team, SSL, security, quota), and check that the
    /// outbox holds every event the services recorded.
    Simulate(SimulateArgs),
    /// Run the worker: CHOM's queued listeners (UpdateTenantMetrics,
    /// RecordAuditLog, SendNotification) from their queues, until SIGINT or
    /// SIGTERM.
    Work(WorkArgs),
    /// The whole platform in one process: create and migrate the database,
    /// run a relay and a worker, drive site and backup lifecycles (with
    /// failures and a notifier outage) and the account events (team, SSL, security,
    /// quota), then report what happened.
    Demo(DemoArgs),
    /// Declare the exchange and every listener's queues, retry queues and
    /// dead-letter queue ahead of a deploy (the worker also does it on
    /// start), and print them.
    Topology(TopologyArgs),
    /// CHOM's event contracts: export the JSON Schema of each event type
    /// and version, check them against a committed set.
    #[command(subcommand)]
    Schema(crate::contract::SchemaCommand),
    /// Print the AsyncAPI 3.0 document of CHOM's events: the exchange and
    /// routing keys, each listener's queue, retry and dead-letter queues,
    /// the CloudEvents messages with their schemas.
    ///
    /// Example: chom asyncapi --out asyncapi.json
    Asyncapi(crate::contract::AsyncapiArgs),
}

/// Where the broker is and how CHOM's queues are named.
#[derive(Debug, Args)]
pub(crate) struct BrokerArgs {
    /// RabbitMQ URL; several, comma separated, for the nodes of a cluster (the first that answers is used).
    #[arg(long, env = outbox::settings::AMQP_URL_ENV, default_value = outbox::DEFAULT_AMQP_URL, hide_env_values = true)]
    pub(crate) amqp_url: String,
    /// The topic exchange the relay publishes to.
    #[arg(long, env = outbox::settings::EXCHANGE_ENV, default_value = outbox::DEFAULT_EXCHANGE, hide_env_values = true)]
    pub(crate) exchange: String,
    /// Queue name prefix (`<app>.<listener>`).
    #[arg(long, default_value = chom::listeners::APP)]
    pub(crate) app: String,
}

/// How the queues are replicated on a RabbitMQ cluster.
#[derive(Debug, Args)]
pub(crate) struct ClusterArgs {
    /// On how many cluster nodes each queue is replicated (x-quorum-initial-group-size; a queue argument, so existing queues must have been declared with the same) [default: the broker's, 3 in RabbitMQ 3.10].
    #[arg(long, env = outbox::settings::QUORUM_INITIAL_GROUP_SIZE_ENV, value_parser = clap::value_parser!(u32).range(1..=255), hide_env_values = true)]
    pub(crate) quorum_initial_group_size: Option<u32>,
}

/// Retry settings of the queued listeners.
#[derive(Debug, Args)]
pub(crate) struct RetryArgs {
    /// Tries per message, the first included (default: the seed's 3).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) tries: Option<u32>,
    /// Delays between tries, comma-separated (default: 30s,60s,120s).
    #[arg(long, value_delimiter = ',', value_parser = parse_duration)]
    pub(crate) backoff: Vec<Duration>,
    /// Handlers of each listener at once (default 4).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) concurrency: Option<u32>,
}

impl RetryArgs {
    pub(crate) fn listener_config(&self) -> chom::listeners::ListenerConfig {
        let default = chom::listeners::ListenerConfig::default();
        let retries = if self.tries.is_none() && self.backoff.is_empty() {
            None
        } else {
            let base = outbox::ListenerOptions::default();
            Some((
                self.tries.unwrap_or(base.tries),
                if self.backoff.is_empty() {
                    base.backoff
                } else {
                    self.backoff.clone()
                },
            ))
        };
        chom::listeners::ListenerConfig {
            retries,
            concurrency: self.concurrency.map(|c| c as usize),
            ..default
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct WorkArgs {
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
    #[command(flatten)]
    pub(crate) retry: RetryArgs,
    /// Run only this queued listener (repeatable; default all).
    #[arg(long = "listener", value_name = "NAME")]
    pub(crate) listeners: Vec<String>,
    /// Serve /metrics and /health here; `off` to disable.
    #[arg(long, env = "CHOM_METRICS_ADDR", default_value = "127.0.0.1:9188")]
    pub(crate) metrics_addr: String,
    /// How long shutdown waits for handlers in flight.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(crate) shutdown_timeout: Duration,
    /// Apply only events of this CloudEvents source (repeatable) [default: /outbox/<this database>, the relay's default].
    #[arg(long = "accept-source", value_name = "SOURCE")]
    pub(crate) accept_sources: Vec<String>,
    #[command(flatten)]
    pub(crate) webhooks: WebhookArgs,
}

/// Whether the worker delivers webhooks.
#[derive(Debug, Args)]
pub(crate) struct WebhookArgs {
    /// Do not deliver webhooks. By default the worker runs webhook_fanout
    /// and webhook_delivery too: endpoints added with `outbox webhooks add`
    /// get the events they subscribe to (https on public addresses only;
    /// OUTBOX_WEBHOOK_ALLOW opens local http receivers).
    #[arg(long, env = "CHOM_NO_WEBHOOKS")]
    pub(crate) no_webhooks: bool,
    /// Deliver webhooks (the default; kept for scripts that pass it).
    #[arg(long, hide = true, conflicts_with = "no_webhooks")]
    pub(crate) webhooks: bool,
}

impl WebhookArgs {
    /// The webhook settings, `None` with --no-webhooks.
    pub(crate) fn config(&self) -> outbox::Result<Option<outbox::webhooks::WebhookConfig>> {
        if self.no_webhooks {
            return Ok(None);
        }
        outbox::webhooks::WebhookConfig::from_env().map(Some)
    }
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    /// Tenants of the normal traffic.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) tenants: u32,
    /// Site lifecycles of the normal traffic.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub(crate) sites: u64,
    /// Site lifecycles during the notifier outage.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    pub(crate) outage_sites: u64,
    /// Probability that a provisioning or a backup fails.
    #[arg(long, default_value_t = 0.2, value_parser = parse_probability)]
    pub(crate) failure_rate: f64,
    /// Seed of the lifecycle mix.
    #[arg(long, default_value_t = 7)]
    pub(crate) seed: u64,
    #[command(flatten)]
    pub(crate) output: Output,
}

#[derive(Debug, Args)]
pub(crate) struct TopologyArgs {
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
    #[command(flatten)]
    pub(crate) retry: RetryArgs,
    /// Only print what would be declared.
    #[arg(long)]
    pub(crate) dry_run: bool,
    #[command(flatten)]
    pub(crate) webhooks: WebhookArgs,
    #[command(flatten)]
    pub(crate) output: Output,
}

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// Fail instead of creating the database when it does not exist.
    #[arg(long)]
    pub(crate) no_create_database: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TenantCommand {
    /// Create a tenant; prints its id.
    Create {
        /// The tenant's name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum UserCommand {
    /// Create a user of a tenant; prints its id.
    Create {
        /// The tenant's id.
        #[arg(long)]
        tenant: i64,
        /// Email address (unique).
        #[arg(long)]
        email: String,
        /// Display name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SiteCommand {
    /// Create a site (site.created); prints its id.
    Create {
        /// The owning tenant's id.
        #[arg(long)]
        tenant: i64,
        /// The site's domain name.
        #[arg(long)]
        domain: String,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// Finish provisioning a site (simulated): site.provisioned, or
    /// site.provisioning_failed with --fail; prints the event id.
    Provision {
        /// The site's id.
        id: i64,
        /// Fail the provisioning with this error text.
        #[arg(long, value_name = "ERROR")]
        fail: Option<String>,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// Soft-delete a site (site.deleted); prints the event id.
    Delete {
        /// The site's id.
        id: i64,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// List live sites.
    List {
        /// Only this tenant's sites.
        #[arg(long)]
        tenant: Option<i64>,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum BackupCommand {
    /// Start a backup of an active site (backup.created); prints its id.
    Create {
        /// The site's id.
        #[arg(long)]
        site: i64,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// Complete a running backup (backup.completed); prints the event id.
    Complete {
        /// The backup's id.
        id: i64,
        /// Size of the backup in bytes.
        #[arg(long)]
        size_bytes: i64,
        /// How long the backup took, in milliseconds.
        #[arg(long)]
        duration_ms: i64,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// Fail a running backup (backup.failed); prints the event id.
    Fail {
        /// The backup's id.
        id: i64,
        /// What went wrong.
        #[arg(long)]
        error: String,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum TeamCommand {
    /// List a tenant's team, the owner first.
    List {
        /// The tenant's id.
        #[arg(long)]
        tenant: i64,
        #[command(flatten)]
        output: Output,
    },
    /// Make a member an admin or a member (team.member_role_changed);
    /// prints the event id.
    SetRole {
        /// The member's user id.
        #[arg(long)]
        user: i64,
        /// The new role: admin or member (the owner changes by `transfer`).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// Remove a member from its team (team.member_removed); prints the
    /// event id.
    Remove {
        /// The member's user id.
        #[arg(long)]
        user: i64,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// Give the tenant to another member of its team; the owner becomes an
    /// admin (team.ownership_transferred). Prints the event id.
    Transfer {
        /// The tenant's id.
        #[arg(long)]
        tenant: i64,
        /// The new owner's user id.
        #[arg(long = "to")]
        to: i64,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SslCommand {
    /// Request a certificate for a live site (ssl.certificate_requested);
    /// prints its id.
    Request {
        /// The site's id.
        #[arg(long)]
        site: i64,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// Issue a requested certificate (simulated; ssl.certificate_issued);
    /// prints the event id.
    Issue {
        /// The certificate's id.
        id: i64,
        /// Who issues it.
        #[arg(long, default_value = "Let's Encrypt (simulated)")]
        issuer: String,
        /// How long it is valid.
        #[arg(long, default_value = "90days", value_parser = parse_duration)]
        valid_for: Duration,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// The expiry check: ssl.certificate_expiring for each issued
    /// certificate expiring within --within-days, once per certificate and
    /// window. Prints the certificates warned about.
    Check {
        /// The warning window, in days (1 to 365).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=365))]
        within_days: u32,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// List certificates.
    List {
        /// Only this site's.
        #[arg(long)]
        site: Option<i64>,
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<i64>,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SecurityCommand {
    /// VPS servers and their credentials.
    #[command(subcommand)]
    Vps(VpsCommand),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Record a failed sign-in; enough of them within the window raise a
    /// security incident (security.suspicious_activity_detected).
    FailedLogin {
        /// The user whose sign-in failed.
        #[arg(long)]
        user: i64,
        /// Where the attempt came from (IPv4 or IPv6).
        #[arg(long)]
        ip: String,
        /// Failures within the window that make an incident.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        threshold: u32,
        /// The sliding window.
        #[arg(long, default_value = "15m", value_parser = parse_duration)]
        window: Duration,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// List security incidents, newest first.
    Incidents {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<i64>,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum VpsCommand {
    /// Add a VPS with a first credential; prints its id, then the
    /// credential (shown once).
    Add {
        /// The tenant's id.
        #[arg(long)]
        tenant: i64,
        /// The server's host name.
        #[arg(long)]
        hostname: String,
        #[command(flatten)]
        output: Output,
    },
    /// Rotate a VPS's credential (security.vps_credentials_rotated); prints
    /// the event id, then the new credential (shown once).
    Rotate {
        /// The server's id.
        id: i64,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// List servers (never their credentials).
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<i64>,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a named API token; prints its id, then the token (shown
    /// once).
    Create {
        /// The tenant's id.
        #[arg(long)]
        tenant: i64,
        /// The token's name, unique within the tenant.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        output: Output,
    },
    /// Rotate an API token (security.api_token_rotated); prints the event
    /// id, then the new token (shown once). The old token stops working.
    Rotate {
        /// The token's id.
        id: i64,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// Check a token read from stdin (never from the command line, where
    /// other users can see it); prints the token's id and name, or fails.
    Verify {
        #[command(flatten)]
        output: Output,
    },
    /// List tokens (never the tokens themselves).
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<i64>,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum QuotaCommand {
    /// Set a tenant's plan and limits. A known plan (starter, pro,
    /// business) gives the defaults; each --max-* flag overrides one.
    Set {
        /// The tenant's id.
        #[arg(long)]
        tenant: i64,
        /// The plan's name: starter, pro, business, or any other name for
        /// custom limits (unlimited unless given).
        #[arg(long, default_value = "custom")]
        plan: String,
        /// Live sites allowed.
        #[arg(long)]
        max_sites: Option<u64>,
        /// Storage allowed, in bytes.
        #[arg(long)]
        max_storage_bytes: Option<u64>,
        /// Bytes served a calendar month.
        #[arg(long)]
        monthly_bandwidth_bytes: Option<u64>,
        #[command(flatten)]
        output: Output,
    },
    /// A tenant's usage beside its limits this month.
    Show {
        /// The tenant's id.
        #[arg(long)]
        tenant: i64,
        #[command(flatten)]
        output: Output,
    },
    /// Report bytes a site served (quota.bandwidth_limit_reached when the
    /// tenant's month reaches its limit).
    ReportBandwidth {
        /// The site's id.
        #[arg(long)]
        site: i64,
        /// Bytes served.
        #[arg(long)]
        bytes: u64,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// List quota breaches, newest first.
    Breaches {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<i64>,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub(crate) struct SimulateArgs {
    /// Tenants to create, each with one user.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) tenants: u32,
    /// Site lifecycles to run.
    #[arg(long)]
    pub(crate) sites: u64,
    /// Cap on transactions per second over all writers (0: no cap).
    #[arg(long, value_parser = parse_rate)]
    pub(crate) rate: Option<f64>,
    /// Concurrent writers, each with its own connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) writers: u32,
    /// Probability that a provisioning or a backup fails.
    #[arg(long, default_value_t = 0.1, value_parser = parse_probability)]
    pub(crate) failure_rate: f64,
    /// Seed of the lifecycle mix, for a reproducible run (default: random).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Only the site and backup lifecycles: no account events (team, SSL,
    /// security, quota) pass after them. (`--no-phase2`, its old name, is
    /// still accepted.)
    #[arg(long, alias = "no-phase2")]
    pub(crate) no_account_events: bool,
    #[command(flatten)]
    pub(crate) output: Output,
}

/// Who performs an action.
#[derive(Debug, Args)]
pub(crate) struct Actor {
    /// Who performs the action (`user:42`); without it, a system action.
    #[arg(long, value_parser = parse_actor)]
    pub(crate) actor: Option<String>,
}

impl Actor {
    pub(crate) fn metadata(&self) -> Metadata {
        match &self.actor {
            Some(actor) => Metadata::by(actor.clone()),
            None => Metadata::system(),
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct Output {
    /// Print JSON instead of plain text.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value.trim()).map_err(|e| format!("{e} (try 30s, 500ms, 2m)"))
}

pub(crate) fn parse_metrics_addr(value: &str) -> Result<Option<std::net::SocketAddr>> {
    if value.eq_ignore_ascii_case("off") || value.is_empty() {
        return Ok(None);
    }
    Ok(Some(value.parse().with_context(|| {
        format!("--metrics-addr {value:?} is not host:port or off")
    })?))
}

pub(crate) fn parse_actor(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() || value.len() > 255 {
        return Err("must be 1 to 255 bytes, such as user:42".into());
    }
    Ok(value.to_owned())
}

pub(crate) fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err("must be a non-negative number of transactions per second".into()),
    }
}

pub(crate) fn parse_probability(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err("must be a number between 0 and 1".into()),
    }
}

pub(crate) fn parse_role(value: &str) -> Result<Role, String> {
    match value.trim().parse::<Role>() {
        Ok(Role::Owner) => Err("the owner changes by `chom team transfer`; use admin or member".into()),
        Ok(role) => Ok(role),
        Err(_) => Err("must be admin or member".into()),
    }
}
