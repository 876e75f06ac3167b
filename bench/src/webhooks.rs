//! `outbox bench webhooks`: deliveries per second from a worker running
//! the webhook delivery listener to a receiver on loopback, next to a plain
//! HTTP client (reqwest, the same concurrency) posting the same bodies to
//! the same receiver in the same run.
//!
//! The deliveries are recorded up front (`webhook.delivery_requested`, one
//! per event, one endpoint) and the clock runs from the worker's start
//! until the receiver has them all, so the figure is the delivery stage:
//! the relay's publish, the listener's signing, the HTTP round trip and
//! its log row.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use outbox::webhooks::{DeliveryRequested, NewEndpoint, OutboundPolicy, WebhookConfig};
use serde::Serialize;
use uuid::Uuid;

use super::broker::BrokerCleanup;
use super::{BenchTarget, Report};

/// Options of `outbox bench webhooks`.
#[derive(Debug, clap::Args)]
pub struct WebhooksArgs {
    /// Deliveries.
    #[arg(long, default_value_t = 5_000)]
    deliveries: usize,
    /// Deliveries in flight at once (the listener's concurrency and the
    /// plain client's).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// The webhook figures.
#[derive(Debug, Serialize)]
pub struct WebhooksReport {
    /// Deliveries a round.
    pub deliveries: usize,
    /// In flight at once.
    pub concurrency: usize,
    /// Plain client posts/s, each round.
    pub raw_per_second: Vec<f64>,
    /// Worker deliveries/s, each round.
    pub outbox_per_second: Vec<f64>,
    /// Median of raw_per_second.
    pub raw_median: f64,
    /// Median of outbox_per_second.
    pub outbox_median: f64,
    /// outbox_median / raw_median (target 0.7).
    pub ratio: f64,
}

impl Report for WebhooksReport {
    fn table(&self) -> String {
        format!(
            "webhooks: {} deliveries to a loopback receiver, {} in flight (median of {} rounds)\n\
             {:<34} {:>10}\n{:<34} {:>10.0}\n{:<34} {:>10.0}\nratio {:.3} (target 0.7)\n",
            self.deliveries,
            self.concurrency,
            self.raw_per_second.len(),
            "",
            "per s",
            "plain HTTP client (reqwest)",
            self.raw_median,
            "worker's webhook_delivery",
            self.outbox_median,
            self.ratio
        )
    }
}

/// A receiver counting POSTs, answering 204.
async fn receiver() -> anyhow::Result<(std::net::SocketAddr, Arc<AtomicU64>)> {
    let count = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&count);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |_body: axum::body::Bytes| {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((address, count))
}

fn document(i: usize) -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0", "id": Uuid::now_v7().to_string(), "type": "site.created",
        "source": "/outbox/bench", "subject": i.to_string(), "aggregatetype": "site",
        "datacontenttype": "application/json",
        "data": {"site_id": i, "tenant_id": 1, "domain": format!("site{i}.example.com")},
    })
}

async fn raw_round(
    url: &str,
    deliveries: usize,
    concurrency: usize,
    count: &AtomicU64,
) -> anyhow::Result<f64> {
    let client = reqwest::Client::builder().build()?;
    let bodies: Vec<Vec<u8>> = (0..deliveries)
        .map(|i| serde_json::to_vec(&document(i)))
        .collect::<Result<_, _>>()?;
    let before = count.load(Ordering::Relaxed);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let bodies = Arc::new(bodies);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, bodies, url) = (
            client.clone(),
            Arc::clone(&next),
            Arc::clone(&bodies),
            url.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(body) = bodies.get(i) else { break };
                let response = client
                    .post(&url)
                    .header("content-type", "application/cloudevents+json")
                    .body(body.clone())
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "the receiver answered {}",
                    response.status()
                );
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let took = started.elapsed();
    anyhow::ensure!(
        count.load(Ordering::Relaxed) - before == deliveries as u64,
        "the receiver missed posts"
    );
    Ok(deliveries as f64 / took.as_secs_f64())
}

async fn outbox_round(
    target: &BenchTarget,
    url: &str,
    args: &WebhooksArgs,
    count: &AtomicU64,
) -> anyhow::Result<f64> {
    let db = super::scratch_database(&target.database_url, false).await?;
    let id = Uuid::now_v7().simple().to_string();
    let exchange = format!("outbox_bench.{id}");
    let app = format!("outbox_bench.w{}", &id[20..]);
    let mut cleanup = BrokerCleanup {
        amqp_url: target.amqp_url.clone(),
        exchange: exchange.clone(),
        queues: Vec::new(),
    };
    let outcome = async {
        let policy = OutboundPolicy::allowing("127.0.0.1")?;
        let (db_url, deliveries, hook) = (db.url().to_owned(), args.deliveries, url.to_owned());
        let endpoint_policy = policy.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut conn = outbox::connect(&db_url)?;
            let (endpoint, _) = outbox::webhooks::add(
                &mut conn,
                &NewEndpoint {
                    url: hook,
                    description: "bench receiver".into(),
                    event_types: vec!["*".into()],
                    oauth: None,
                    ..NewEndpoint::default()
                },
                &endpoint_policy,
            )?;
            let requests: Vec<DeliveryRequested> = (0..deliveries)
                .map(|i| {
                    let event = document(i);
                    DeliveryRequested {
                        endpoint_id: endpoint.id,
                        event_id: event["id"]
                            .as_str()
                            .and_then(|s| Uuid::parse_str(s).ok())
                            .unwrap_or_else(Uuid::now_v7),
                        event_type: "site.created".into(),
                        event,
                    }
                })
                .collect();
            for chunk in requests.chunks(1000) {
                use diesel::Connection;
                let envelopes = chunk
                    .iter()
                    .map(|r| {
                        outbox::EventEnvelope::new(
                            r,
                            &outbox::Metadata::default(),
                            outbox::DEFAULT_MAX_PAYLOAD_BYTES,
                        )
                    })
                    .collect::<outbox::Result<Vec<_>>>()?;
                conn.transaction::<_, outbox::Error, _>(|conn| {
                    outbox::record_batch(conn, &envelopes).map(|_| ())
                })?;
            }
            Ok(())
        })
        .await??;
        let config = WebhookConfig {
            policy: Arc::new(policy),
            concurrency: args.concurrency,
            ..WebhookConfig::default()
        };
        let delivery = outbox::webhooks::WebhookDelivery::new(config)?;
        let registry =
            outbox::Registry::new().queued_listener(&[outbox::webhooks::DELIVERY_REQUESTED], delivery)?;
        let worker = outbox::Worker::new(
            outbox::WorkerConfig {
                database_url: db.url().to_owned(),
                amqp_url: target.amqp_url.clone(),
                exchange: exchange.clone(),
                app: app.clone(),
                ..outbox::WorkerConfig::default()
            },
            &registry,
        )?;
        cleanup.queues = worker
            .queues()
            .iter()
            .flat_map(|q| q.all_queues())
            .map(str::to_owned)
            .collect();
        worker.declare_topology().await?;
        let relay = outbox::Relay::new(outbox::RelayConfig {
            database_url: db.url().to_owned(),
            amqp_url: target.amqp_url.clone(),
            exchange: exchange.clone(),
            ..outbox::RelayConfig::default()
        })?;
        let before = count.load(Ordering::Relaxed);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let mut relay_stop = stopped.clone();
        let relay_task = tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = relay_stop.wait_for(|s| *s).await;
                })
                .await
        });
        let mut worker_stop = stopped.clone();
        let worker_task = tokio::spawn(async move {
            worker
                .run(async move {
                    let _ = worker_stop.wait_for(|s| *s).await;
                })
                .await
        });
        let deadline = Instant::now() + Duration::from_secs(600);
        while count.load(Ordering::Relaxed) - before < args.deliveries as u64 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the deliveries did not all arrive within 10 min"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed();
        let _ = stop.send(true);
        relay_task.await.context("relay task")??;
        worker_task.await.context("worker task")??;
        Ok(args.deliveries as f64 / took.as_secs_f64())
    }
    .await;
    drop(cleanup);
    super::drop_database(db).await?;
    outcome
}

/// Runs the benchmark.
pub async fn run(target: &BenchTarget, args: &WebhooksArgs) -> anyhow::Result<WebhooksReport> {
    anyhow::ensure!(
        args.deliveries >= 1 && args.rounds >= 1,
        "--deliveries and --rounds must be positive"
    );
    anyhow::ensure!(
        (1..=256).contains(&args.concurrency),
        "--concurrency must be between 1 and 256"
    );
    let (address, count) = receiver().await?;
    let url = format!("http://{address}/hook");
    let mut raw = Vec::new();
    let mut ours = Vec::new();
    for round in 0..args.rounds {
        eprintln!("round {}: plain client", round + 1);
        raw.push(raw_round(&url, args.deliveries, args.concurrency, &count).await?);
        eprintln!("round {}: worker", round + 1);
        ours.push(outbox_round(target, &url, args, &count).await?);
    }
    let raw_median = super::stats::median(&raw);
    let outbox_median = super::stats::median(&ours);
    Ok(WebhooksReport {
        deliveries: args.deliveries,
        concurrency: args.concurrency,
        raw_per_second: raw,
        outbox_per_second: ours,
        raw_median,
        outbox_median,
        ratio: if raw_median > 0.0 {
            outbox_median / raw_median
        } else {
            0.0
        },
    })
}
