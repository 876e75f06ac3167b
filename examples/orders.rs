// An "orders" service: records an event with each order, and runs its
// relay and its worker in this process. `cargo run --example orders`;
// settings from DATABASE_URL, AMQP_URL and OUTBOX_EXCHANGE.
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use outbox::{
    DomainEvent, HandlerContext, ListenerError, ListenerOptions, Metadata, QueuedListener, ReceivedEvent,
    Registry, Relay, RelayConfig, Settings, Worker, WorkerConfig,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

diesel::table! {
    orders (id) {
        id -> BigInt,
        customer -> Text,
        total_cents -> BigInt,
    }
}

diesel::table! {
    order_history (order_id) {
        order_id -> BigInt,
        note -> Text,
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: i64,
    customer: String,
    total_cents: i64,
}

impl DomainEvent for OrderPlaced {
    fn event_type(&self) -> &'static str {
        "order.placed" // also the routing key
    }
    fn aggregate_type(&self) -> &'static str {
        "order"
    }
    fn aggregate_id(&self) -> String {
        self.order_id.to_string()
    }
}

/// The domain write and its event in one transaction. diesel's own error
/// type works: an outbox error converts into it (and rolls back).
pub fn place_order(conn: &mut PgConnection, customer: &str, total_cents: i64) -> QueryResult<i64> {
    conn.transaction(|conn| {
        let order_id = diesel::insert_into(orders::table)
            .values((orders::customer.eq(customer), orders::total_cents.eq(total_cents)))
            .returning(orders::id)
            .get_result(conn)?;
        let event = OrderPlaced {
            order_id,
            customer: customer.to_owned(),
            total_cents,
        };
        outbox::record_with(conn, &event, &Metadata::by("user:42"))?;
        Ok(order_id)
    })
}

/// A database effect, exactly once: with the inbox (the default) the
/// framework runs `handle` in a transaction with the inbox row
/// (listener, event id), so a redelivered event adds no second row.
struct RecordHistory;

impl QueuedListener for RecordHistory {
    fn name(&self) -> &str {
        "record_history" // its queue: `<app>.record_history`
    }
    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        let order: OrderPlaced = event.data_as()?;
        diesel::insert_into(order_history::table)
            .values((
                order_history::order_id.eq(order.order_id),
                order_history::note.eq(format!("placed by {}", order.customer)),
            ))
            .execute(ctx.conn()?)?; // commits with the inbox row
        Ok(())
    }
}

/// An effect outside the database (a mail; here a channel), at least once:
/// no inbox. Its first try fails, so the worker tries it again.
struct SendConfirmation {
    mailer: mpsc::UnboundedSender<i64>,
}

impl QueuedListener for SendConfirmation {
    fn name(&self) -> &str {
        "send_confirmation"
    }
    fn options(&self) -> ListenerOptions {
        // A backoff of 1 s then 2 s while developing; the defaults (30 s,
        // 60 s) are for production.
        ListenerOptions {
            inbox: false,
            ..ListenerOptions::development()
        }
    }
    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        if ctx.attempt() == 1 {
            return Err(ListenerError::transient("mail server not answering yet"));
        }
        let order: OrderPlaced = event.data_as()?;
        self.mailer.send(order.order_id).map_err(ListenerError::permanent)
    }
}

/// Which listener handles which event types.
pub fn registry(mailer: mpsc::UnboundedSender<i64>) -> outbox::Result<Registry> {
    Registry::new()
        .queued_listener(&["order.placed"], RecordHistory)?
        .queued_listener(&["order.placed"], SendConfirmation { mailer })
}

/// Migrates, starts a relay and a worker, places one order, waits until
/// both listeners handled it, and stops them. Returns the order's id.
pub async fn run(settings: Settings, app: &str) -> anyhow::Result<i64> {
    // Diesel blocks: run it on tokio's blocking pool.
    let url = settings.database_url.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        outbox::create_database_if_missing(&url)?;
        let mut conn = outbox::connect(&url)?;
        outbox::migrate(&mut conn)?; // the outbox's tables
        conn.batch_execute(
            "CREATE TABLE IF NOT EXISTS orders (id BIGSERIAL PRIMARY KEY, customer TEXT NOT NULL, total_cents BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS order_history (order_id BIGINT PRIMARY KEY, note TEXT NOT NULL);",
        )?;
        Ok(())
    })
    .await??;

    let (mailer, mut mailbox) = mpsc::unbounded_channel();
    let worker = Worker::new(
        WorkerConfig {
            app: app.to_owned(),
            ..WorkerConfig::from_settings(&settings)
        },
        &registry(mailer)?,
    )?;
    // Queues and bindings before the relay's first publish: an event
    // published while no queue is bound to its type is kept as unroutable,
    // not delivered (`outbox replay` sends it on later).
    worker.declare_topology().await?;
    let relay = Relay::new(RelayConfig::from_settings(&settings))?;

    // One shutdown future each; a service would wait for SIGTERM instead.
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let relay_shutdown = until_stopped(stopped.clone());
    let relay = tokio::spawn(async move { relay.run(relay_shutdown).await });
    let worker_shutdown = until_stopped(stopped);
    let worker = tokio::spawn(async move { worker.run(worker_shutdown).await });

    let url = settings.database_url.clone();
    let order_id = tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
        let mut conn = outbox::connect(&url)?;
        Ok(place_order(&mut conn, "ada", 4200)?)
    })
    .await??;

    // The confirmation comes on the second try, a second later ...
    let mailed = tokio::time::timeout(Duration::from_secs(30), mailbox.recv()).await?;
    anyhow::ensure!(
        mailed == Some(order_id),
        "confirmed {mailed:?}, not order {order_id}"
    );
    // ... and the history row once its transaction committed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let url = settings.database_url.clone();
        let note = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<String>> {
            let mut conn = outbox::connect(&url)?;
            Ok(order_history::table
                .find(order_id)
                .select(order_history::note)
                .first(&mut conn)
                .optional()?)
        })
        .await??;
        if let Some(note) = note {
            tracing::info!(order_id, %note, "order confirmed and recorded");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no history row for order {order_id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Both stop taking work and finish what they hold.
    let _ = stop.send(true);
    relay.await??;
    worker.await??;
    Ok(order_id)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // lapin logs each message the broker returns (an event no queue is bound
    // to yet) at WARN, as a byte array; the outbox reports those itself.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let order_id = run(Settings::from_env()?, "orders").await?;
    println!("order {order_id} placed, confirmed and recorded");
    Ok(())
}
