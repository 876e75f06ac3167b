//! `outbox topology`: declare, delete and empty an app's listener queues
//! and the events exchange over AMQP, without the app's code (RabbitMQ's
//! own tools cannot delete an exchange).
//!
//! The queues are the worker's (`outbox::consumer::topology`): per listener
//! `<app>.<listener>`, one `<app>.<listener>.retry.<delay>` per distinct
//! retry delay, and `<app>.<listener>.dead`. AMQP cannot list queues, so
//! retry queues are found by their delays: `--retry-delays` names them
//! (declare: default 30s,1m, the defaults of `ListenerOptions`; delete:
//! default the delays of both presets and of the webhook delivery
//! listener). `delete` also reads the listener registry (`outbox_listeners`,
//! where every worker records its listeners and their exact queues) when
//! the database is reachable: without `--listener` it deletes every
//! listener registered for the app, and it removes the registry rows of
//! the listeners it deleted.
//!
//! `--json`: `declare` prints `{exchange, listeners: [{listener, queue,
//! event_types, retry_queues: [{queue, delay_ms}], dead_queue,
//! delivery_limit, single_active_consumer}]}`; `delete` prints `{exchange:
//! {name, deleted} | null, listeners: [{listener, queues: [{queue, kind,
//! messages, deleted}]}]}` with `kind` one of `main`, `retry`, `dead` and
//! `messages` null for a queue that does not exist; `purge-dead` prints
//! `[{listener, queue, purged}]` with `purged` null when the queue does not
//! exist.

use std::time::Duration;

use anyhow::{Context, bail};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions, QueuePurgeOptions};
use outbox::ListenerOptions;
use outbox::consumer::topology::{self, ListenerQueues};
use serde::Serialize;

use crate::duration::parse_duration;

/// Subcommands of `outbox topology`.
#[derive(Debug, clap::Subcommand)]
pub enum TopologyCommand {
    /// Declare the exchange and listeners' queues, retry queues, dead-letter
    /// queues and bindings, exactly as their worker would (idempotent).
    ///
    /// Run it before the relays start, so that no event is published before
    /// its listeners' queues are bound (it would be kept as unroutable).
    /// Every --listener gets the same --event-type bindings and options;
    /// declare listeners that differ in separate runs. The options must
    /// match the listener's ListenerOptions, or the worker's own declare
    /// fails with PRECONDITION_FAILED (then delete the queues and declare
    /// again).
    ///
    /// Example: outbox topology declare --app chom --listener send_notification --event-type site.provisioning_failed --event-type backup.failed
    Declare(DeclareArgs),
    /// Delete listeners' queues (main, retry and dead-letter), and with
    /// --delete-exchange the exchange.
    ///
    /// Without --listener, every listener the app's workers registered in
    /// the database (outbox_listeners) is deleted, with the exact retry
    /// queues they declared; with --delete-exchange and no listener found,
    /// only the exchange. Stop the listeners' workers first (a running
    /// worker declares its queues again when it reconnects). Queues holding
    /// messages are not deleted without --force (nothing is deleted then);
    /// the exchange is deleted only when no queue is bound to it any more,
    /// unless --force. --dry-run prints the plan, which queues hold
    /// messages, and deletes nothing.
    ///
    /// Example: outbox topology delete --app chom --delete-exchange --dry-run
    Delete(DeleteArgs),
    /// Empty listeners' dead-letter queues.
    ///
    /// A dead-letter queue keeps a copy of each message that failed for
    /// good, for inspection; `outbox failed retry` and `forget` act on the
    /// failed_jobs rows and leave the copy. The rows keep each job's
    /// payload; a message the broker dead-lettered by itself (past its
    /// delivery limit) has no row. Asks for confirmation on a terminal;
    /// without one, --yes is required.
    ///
    /// Example: outbox topology purge-dead --app chom --listener send_notification --yes
    PurgeDead(PurgeDeadArgs),
}

/// The broker and the listeners every subcommand works on.
#[derive(Debug, clap::Args)]
pub struct ListenerArgs {
    /// The application prefix of the queues (`<app>.<listener>`).
    #[arg(long)]
    app: String,
    /// A listener whose queues to work on; repeat for each (`delete`:
    /// default every listener registered for --app).
    #[arg(long = "listener")]
    listeners: Vec<String>,
    /// RabbitMQ URL (amqp:// or amqps://); several, comma separated, for the nodes of a cluster (the first that answers is used).
    #[arg(long, env = outbox::settings::AMQP_URL_ENV, default_value = outbox::DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Options of `outbox topology declare`.
#[derive(Debug, clap::Args)]
pub struct DeclareArgs {
    #[command(flatten)]
    target: ListenerArgs,
    /// The topic exchange the relay publishes to; declared durable if missing.
    #[arg(long, env = outbox::settings::EXCHANGE_ENV, default_value = outbox::DEFAULT_EXCHANGE, hide_env_values = true)]
    exchange: String,
    /// An event type the listeners' queues are bound to; repeat for each.
    #[arg(long = "event-type", required = true)]
    event_types: Vec<String>,
    /// The listeners' distinct retry delays, one retry queue each
    /// (ListenerOptions::development() has 1s,2s).
    #[arg(long, value_delimiter = ',', default_value = "30s,1m", value_parser = parse_duration)]
    retry_delays: Vec<Duration>,
    /// As ListenerOptions::max_unacked_deliveries; the queue's x-delivery-limit is this plus 3.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_unacked_deliveries: u32,
    /// As ListenerOptions::single_active_consumer.
    #[arg(long)]
    single_active_consumer: bool,
    /// On how many cluster nodes each queue is replicated (x-quorum-initial-group-size; a queue argument, so existing queues must have been declared with the same) [default: the broker's, 3 in RabbitMQ 3.10].
    #[arg(long, env = outbox::settings::QUORUM_INITIAL_GROUP_SIZE_ENV, value_parser = clap::value_parser!(u32).range(1..=255), hide_env_values = true)]
    quorum_initial_group_size: Option<u32>,
}

/// Options of `outbox topology delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    target: ListenerArgs,
    /// The retry delays whose retry queues to look for [default: 30s,1m,2m,1s,2s, the delays of
    /// ListenerOptions::default() and ::development()].
    #[arg(long, value_delimiter = ',', value_parser = parse_duration)]
    retry_delays: Vec<Duration>,
    /// Delete the exchange too (every app publishing to it loses it).
    #[arg(long)]
    delete_exchange: bool,
    /// Delete the exchange and no queue (implies --delete-exchange).
    #[arg(long, conflicts_with = "listeners")]
    exchange_only: bool,
    /// The exchange --delete-exchange deletes.
    #[arg(long, env = outbox::settings::EXCHANGE_ENV, default_value = outbox::DEFAULT_EXCHANGE, hide_env_values = true)]
    exchange: String,
    /// Delete queues holding messages (the messages are lost) and the
    /// exchange while queues are still bound to it.
    #[arg(long)]
    force: bool,
    /// Print what would be deleted, and delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// The outbox database, whose listener registry (outbox_listeners)
    /// names the app's listeners and their exact retry queues. Unreachable
    /// or unset: only --listener and --retry-delays are used.
    #[arg(long, env = outbox::settings::DATABASE_URL_ENV, hide_env_values = true)]
    database_url: Option<String>,
}

/// Options of `outbox topology purge-dead`.
#[derive(Debug, clap::Args)]
pub struct PurgeDeadArgs {
    #[command(flatten)]
    target: ListenerArgs,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

/// Runs an `outbox topology` subcommand.
pub fn run(command: &TopologyCommand) -> anyhow::Result<()> {
    let target = match command {
        TopologyCommand::Declare(args) => &args.target,
        TopologyCommand::Delete(args) => &args.target,
        TopologyCommand::PurgeDead(args) => &args.target,
    };
    outbox::amqp::validate_amqp_url(&target.amqp_url)?;
    if target.listeners.is_empty() && !matches!(command, TopologyCommand::Delete(_)) {
        bail!("name at least one --listener");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match command {
            TopologyCommand::Declare(args) => declare(args).await,
            TopologyCommand::Delete(args) => delete(args).await,
            TopologyCommand::PurgeDead(args) => purge_dead(args).await,
        }
    })
}

/// The queues of `--listener`s with `options`, as their worker names them.
fn plan(
    target: &ListenerArgs,
    event_types: &[String],
    options: &ListenerOptions,
) -> anyhow::Result<Vec<ListenerQueues>> {
    target
        .listeners
        .iter()
        .map(|listener| {
            options.validate(listener)?;
            Ok(topology::listener_queues(
                &target.app,
                listener,
                event_types,
                options,
            )?)
        })
        .collect()
}

/// Options whose distinct retry delays are `delays`.
fn with_delays(delays: &[Duration], base: ListenerOptions) -> ListenerOptions {
    let tries = u32::try_from(delays.len()).map_or(u32::MAX, |n| n.saturating_add(1));
    ListenerOptions {
        tries,
        backoff: delays.to_vec(),
        ..base
    }
}

async fn connect(target: &ListenerArgs, what: &str) -> anyhow::Result<lapin::Connection> {
    outbox::amqp::connect(&target.amqp_url, &format!("outbox topology {what}"))
        .await
        .with_context(|| {
            format!(
                "cannot reach the broker at {}",
                outbox::redact_url(&target.amqp_url)
            )
        })
}

async fn channel(connection: &lapin::Connection) -> anyhow::Result<lapin::Channel> {
    Ok(outbox::amqp::open_channel(connection, false).await?)
}

#[derive(Debug, Serialize)]
struct DeclaredRetry {
    queue: String,
    delay_ms: u128,
}

#[derive(Debug, Serialize)]
struct Declared<'a> {
    listener: &'a str,
    queue: &'a str,
    event_types: &'a [String],
    retry_queues: Vec<DeclaredRetry>,
    dead_queue: &'a str,
    delivery_limit: u32,
    single_active_consumer: bool,
}

async fn declare(args: &DeclareArgs) -> anyhow::Result<()> {
    outbox::amqp::validate_amqp_name("exchange", &args.exchange)?;
    let options = with_delays(
        &args.retry_delays,
        ListenerOptions {
            max_unacked_deliveries: args.max_unacked_deliveries,
            single_active_consumer: args.single_active_consumer,
            ..ListenerOptions::default()
        },
    );
    let plan: Vec<ListenerQueues> = plan(&args.target, &args.event_types, &options)?
        .into_iter()
        .map(|queues| queues.with_quorum_initial_group_size(args.quorum_initial_group_size))
        .collect();
    let connection = connect(&args.target, "declare").await?;
    let declared = async {
        let channel = channel(&connection).await?;
        outbox::amqp::declare_exchange(&channel, &args.exchange).await?;
        for queues in &plan {
            topology::declare_listener(&channel, &args.exchange, queues).await?;
        }
        anyhow::Ok(())
    }
    .await;
    let _ = connection.close(200, "declared".into()).await;
    declared?;
    if args.target.json {
        let listeners: Vec<Declared<'_>> = plan
            .iter()
            .map(|q| Declared {
                listener: &q.listener,
                queue: &q.queue,
                event_types: &q.event_types,
                retry_queues: q
                    .retries
                    .iter()
                    .map(|(delay, queue)| DeclaredRetry {
                        queue: queue.clone(),
                        delay_ms: delay.as_millis(),
                    })
                    .collect(),
                dead_queue: &q.dead,
                delivery_limit: q.delivery_limit,
                single_active_consumer: q.single_active_consumer,
            })
            .collect();
        let out = serde_json::json!({ "exchange": args.exchange, "listeners": listeners });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("declared exchange {}", args.exchange);
    for q in &plan {
        println!("  {}  <- {}", q.queue, q.event_types.join(", "));
        for (delay, name) in &q.retries {
            println!(
                "    retry  {name}  (holds a failed message {}, then back to {})",
                humantime::format_duration(*delay),
                q.queue
            );
        }
        println!("    dead   {}", q.dead);
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct QueueOutcome {
    queue: String,
    kind: &'static str,
    messages: Option<u32>,
    deleted: bool,
}

#[derive(Debug, Serialize)]
struct ListenerOutcome {
    listener: String,
    queues: Vec<QueueOutcome>,
}

#[derive(Debug, Serialize)]
struct ExchangeOutcome {
    name: String,
    deleted: bool,
}

/// The retry delays `delete` looks for when none are named: those of both
/// presets and of the webhook delivery listener.
fn preset_delays() -> Vec<Duration> {
    let mut delays = Vec::new();
    for backoff in [
        ListenerOptions::default().backoff,
        ListenerOptions::development().backoff,
        outbox::webhooks::WebhookConfig::default().backoff,
    ] {
        for delay in backoff {
            if !delays.contains(&delay) {
                delays.push(delay);
            }
        }
    }
    delays
}

async fn delete(args: &DeleteArgs) -> anyhow::Result<()> {
    if args.delete_exchange || args.exchange_only {
        outbox::amqp::validate_amqp_name("exchange", &args.exchange)?;
    }
    let delays = if args.retry_delays.is_empty() {
        preset_delays()
    } else {
        args.retry_delays.clone()
    };
    let registered = if args.exchange_only {
        Vec::new()
    } else {
        registered_listeners(args).await
    };
    let mut target_listeners = args.target.listeners.clone();
    if target_listeners.is_empty() && !args.exchange_only {
        target_listeners = registered.iter().map(|r| r.listener.clone()).collect();
        if target_listeners.is_empty() && !args.delete_exchange {
            bail!(
                "no listener of app {} is registered in the database{}; name them with --listener",
                args.target.app,
                if args.database_url.is_none() {
                    " (no --database-url / DATABASE_URL given)"
                } else {
                    ""
                }
            );
        }
    }
    let options = with_delays(&delays, ListenerOptions::default());
    let plan: Vec<ListenerQueues> = target_listeners
        .iter()
        .map(|listener| {
            options.validate(listener)?;
            let mut queues = topology::listener_queues(&args.target.app, listener, &[], &options)?;
            // The registry's retry queues are the ones its worker declared,
            // whatever its delays; the guessed ones cover older workers.
            if let Some(row) = registered.iter().find(|r| &r.listener == listener) {
                for name in &row.retry_queues {
                    if !queues.retries.iter().any(|(_, q)| q == name) {
                        queues.retries.push((Duration::ZERO, name.clone()));
                    }
                }
            }
            anyhow::Ok(queues)
        })
        .collect::<anyhow::Result<_>>()?;
    let connection = connect(&args.target, "delete").await?;
    let outcome = delete_on(&connection, args, &plan).await;
    let _ = connection.close(200, "deleted".into()).await;
    let (listeners, exchange) = outcome?;
    if !args.dry_run {
        forget_registrations(args, &listeners).await;
    }
    if args.target.json {
        let out = serde_json::json!({ "exchange": exchange, "listeners": listeners });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let verb = if args.dry_run { "would delete" } else { "deleted" };
    let mut found = 0;
    for listener in &listeners {
        for q in &listener.queues {
            match q.messages {
                Some(messages) => {
                    found += 1;
                    let needs_force = if args.dry_run && messages > 0 && !args.force {
                        ": needs --force, its messages would be lost"
                    } else {
                        ""
                    };
                    println!("{verb} {} ({messages} message(s)){needs_force}", q.queue);
                }
                None if q.kind != "retry" => println!("not found: {}", q.queue),
                None => {}
            }
        }
    }
    if found == 0 && !listeners.is_empty() {
        println!("none of the listeners' queues exist (nothing to delete)");
    }
    if !listeners.is_empty() {
        println!(
            "retry queues looked for: {} and the registry's (name others with --retry-delays)",
            delays
                .iter()
                .map(|d| topology::delay_label(*d))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    match exchange {
        Some(exchange) if exchange.deleted || args.dry_run => println!("{verb} exchange {}", exchange.name),
        Some(exchange) => println!("not found: exchange {}", exchange.name),
        None => {}
    }
    Ok(())
}

async fn delete_on(
    connection: &lapin::Connection,
    args: &DeleteArgs,
    plan: &[ListenerQueues],
) -> anyhow::Result<(Vec<ListenerOutcome>, Option<ExchangeOutcome>)> {
    let mut listeners = Vec::new();
    for queues in plan {
        let mut named = vec![(queues.queue.clone(), "main")];
        named.extend(queues.retries.iter().map(|(_, name)| (name.clone(), "retry")));
        named.push((queues.dead.clone(), "dead"));
        let mut outcomes = Vec::new();
        for (queue, kind) in named {
            let messages = outbox::amqp::queue_depth(connection, &queue).await?;
            outcomes.push(QueueOutcome {
                queue,
                kind,
                messages,
                deleted: false,
            });
        }
        listeners.push(ListenerOutcome {
            listener: queues.listener.clone(),
            queues: outcomes,
        });
    }
    let holding: Vec<String> = listeners
        .iter()
        .flat_map(|l| &l.queues)
        .filter(|q| q.messages.unwrap_or(0) > 0)
        .map(|q| format!("{} holds {}", q.queue, q.messages.unwrap_or(0)))
        .collect();
    if !holding.is_empty() && !args.force && !args.dry_run {
        bail!(
            "nothing deleted: {} message(s); pass --force to delete them with their messages \
             (failed_jobs keeps each failed job's payload; `outbox topology purge-dead` empties the dead-letter queues)",
            holding.join(", ")
        );
    }
    if args.dry_run {
        let exchange = (args.delete_exchange || args.exchange_only).then(|| ExchangeOutcome {
            name: args.exchange.clone(),
            deleted: false,
        });
        return Ok((listeners, exchange));
    }
    for queue in listeners.iter_mut().flat_map(|l| l.queues.iter_mut()) {
        if queue.messages.is_none() {
            continue;
        }
        // A channel each: a refused delete closes its channel.
        let channel = channel(connection).await?;
        channel
            .queue_delete(queue.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .with_context(|| format!("cannot delete queue {}", queue.queue))?;
        let _ = channel.close(200, "deleted".into()).await;
        queue.deleted = true;
    }
    let mut exchange = None;
    if args.delete_exchange || args.exchange_only {
        if !exchange_exists(connection, &args.exchange).await? {
            return Ok((
                listeners,
                Some(ExchangeOutcome {
                    name: args.exchange.clone(),
                    deleted: false,
                }),
            ));
        }
        let channel = channel(connection).await?;
        let deleted = channel
            .exchange_delete(
                args.exchange.as_str().into(),
                ExchangeDeleteOptions {
                    if_unused: !args.force,
                    ..ExchangeDeleteOptions::default()
                },
            )
            .await;
        let deleted = match deleted {
            Ok(()) => true,
            Err(error) if protocol_error(&error) == Some(404) => false,
            Err(error) => {
                let refused = if protocol_error(&error) == Some(406) {
                    " (queues are still bound to it, of other apps or listeners; --force deletes it anyway)"
                } else {
                    ""
                };
                return Err(anyhow::Error::new(error).context(format!(
                    "deleted the listeners' queues, but not exchange {}{refused}",
                    args.exchange
                )));
            }
        };
        let _ = channel.close(200, "deleted".into()).await;
        exchange = Some(ExchangeOutcome {
            name: args.exchange.clone(),
            deleted,
        });
    }
    Ok((listeners, exchange))
}

/// The app's listeners in the registry; empty (with a warning) when the
/// database is not given or cannot be read.
async fn registered_listeners(args: &DeleteArgs) -> Vec<outbox::consumer::RegisteredListener> {
    let Some(url) = args.database_url.clone() else {
        return Vec::new();
    };
    let app = args.target.app.clone();
    let read = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut conn = outbox::connect(&url)?;
        Ok(outbox::consumer::registered_listeners(&mut conn)?
            .into_iter()
            .filter(|r| r.app == app)
            .collect::<Vec<_>>())
    })
    .await;
    match read {
        Ok(Ok(rows)) => rows,
        Ok(Err(error)) => {
            tracing::warn!(error = %format!("{error:#}"), "cannot read the listener registry; using --listener and --retry-delays only");
            Vec::new()
        }
        Err(error) => {
            tracing::warn!(%error, "cannot read the listener registry");
            Vec::new()
        }
    }
}

/// Removes the registry rows of the listeners whose queues are gone, so
/// `outbox status` stops listing them.
async fn forget_registrations(args: &DeleteArgs, listeners: &[ListenerOutcome]) {
    let Some(url) = args.database_url.clone() else {
        return;
    };
    let app = args.target.app.clone();
    let gone: Vec<String> = listeners
        .iter()
        .filter(|l| l.queues.iter().all(|q| q.deleted || q.messages.is_none()))
        .map(|l| l.listener.clone())
        .collect();
    if gone.is_empty() {
        return;
    }
    let removed = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
        let mut conn = outbox::connect(&url)?;
        Ok(outbox::consumer::forget_registered_listeners(
            &mut conn, &app, &gone,
        )?)
    })
    .await;
    match removed {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            tracing::warn!(error = %format!("{error:#}"), "deleted the queues, but cannot remove their listeners from the registry")
        }
        Err(error) => tracing::warn!(%error, "cannot remove the listeners from the registry"),
    }
}

/// Whether `exchange` exists (a passive declare, on a channel of its own:
/// the broker closes it when the exchange is missing).
async fn exchange_exists(connection: &lapin::Connection, exchange: &str) -> anyhow::Result<bool> {
    let channel = channel(connection).await?;
    let declared = channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..lapin::options::ExchangeDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    match declared {
        Ok(()) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(true)
        }
        Err(error) if protocol_error(&error) == Some(404) => Ok(false),
        Err(error) => Err(anyhow::Error::new(error).context(format!("cannot look up exchange {exchange}"))),
    }
}

/// The AMQP reply code of a channel or connection the broker closed.
fn protocol_error(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

#[derive(Debug, Serialize)]
struct Purged {
    listener: String,
    queue: String,
    purged: Option<u32>,
}

async fn purge_dead(args: &PurgeDeadArgs) -> anyhow::Result<()> {
    let plan = plan(&args.target, &[], &ListenerOptions::default())?;
    let connection = connect(&args.target, "purge-dead").await?;
    let outcome = purge_on(&connection, args, &plan).await;
    let _ = connection.close(200, "purged".into()).await;
    let Some(purged) = outcome? else {
        println!("nothing purged");
        return Ok(());
    };
    if args.target.json {
        println!("{}", serde_json::to_string_pretty(&purged)?);
        return Ok(());
    }
    for p in &purged {
        match p.purged {
            Some(count) => println!("purged {count} dead-letter copy(ies) from {}", p.queue),
            None => println!("not found: {}", p.queue),
        }
    }
    Ok(())
}

async fn purge_on(
    connection: &lapin::Connection,
    args: &PurgeDeadArgs,
    plan: &[ListenerQueues],
) -> anyhow::Result<Option<Vec<Purged>>> {
    let mut depths = Vec::new();
    for queues in plan {
        depths.push(outbox::amqp::queue_depth(connection, &queues.dead).await?);
    }
    let listed = plan
        .iter()
        .zip(&depths)
        .filter_map(|(q, depth)| depth.map(|d| format!("{} ({d})", q.dead)))
        .collect::<Vec<_>>();
    if !listed.is_empty()
        && !crate::failed_cmd::confirm(
            &format!("Empty the dead-letter queue(s) {}?", listed.join(", ")),
            args.yes,
        )?
    {
        return Ok(None);
    }
    let mut purged = Vec::new();
    for (queues, depth) in plan.iter().zip(depths) {
        let count = match depth {
            None => None,
            Some(_) => {
                let channel = channel(connection).await?;
                let count = channel
                    .queue_purge(queues.dead.as_str().into(), QueuePurgeOptions::default())
                    .await
                    .with_context(|| format!("cannot purge {}", queues.dead))?;
                let _ = channel.close(200, "purged".into()).await;
                Some(count)
            }
        };
        purged.push(Purged {
            listener: queues.listener.clone(),
            queue: queues.dead.clone(),
            purged: count,
        });
    }
    Ok(Some(purged))
}
