//! `outbox bench dashboard`: the dashboard's failed-jobs pages at a large
//! table (100,000 rows by default), the server's own time per request
//! (its `Server-Timing` header; medians and p95 over repeated requests),
//! next to the bare SQL of the same page timed in the same run, and an
//! OFFSET page at the same depth to show what the keyset cursor saves.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Timestamptz};
use serde::Serialize;

use super::stats::{median, percentile};
use super::{BenchTarget, Report};

/// Options of `outbox bench dashboard`.
#[derive(Debug, clap::Args)]
pub struct DashboardArgs {
    /// Failed jobs in the table.
    #[arg(long, default_value_t = 100_000)]
    rows: i64,
    /// Requests per page measured (after 3 warm-up requests).
    #[arg(long, default_value_t = 30)]
    requests: usize,
}

/// One page's figures.
#[derive(Debug, Serialize)]
pub struct PageTiming {
    /// What was asked.
    pub page: String,
    /// The path requested.
    pub path: String,
    /// Median server time, ms.
    pub p50_ms: f64,
    /// 95th percentile server time, ms.
    pub p95_ms: f64,
}

/// The dashboard figures.
#[derive(Debug, Serialize)]
pub struct DashboardReport {
    /// Failed jobs in the table.
    pub rows: i64,
    /// Requests per page.
    pub requests: usize,
    /// Each page.
    pub pages: Vec<PageTiming>,
    /// The first page's own SQL (51 rows by the keyset index) run bare
    /// over diesel: median ms.
    pub raw_first_page_sql_ms: f64,
    /// The same page at depth 90% with OFFSET instead of a cursor: median ms.
    pub raw_offset_page_sql_ms: f64,
}

impl Report for DashboardReport {
    fn table(&self) -> String {
        let mut out = format!(
            "dashboard: failed-jobs pages at {} rows, server time (Server-Timing), {} requests each\n{:<44} {:>9} {:>9}\n",
            self.rows, self.requests, "page", "p50 ms", "p95 ms"
        );
        for page in &self.pages {
            out.push_str(&format!(
                "{:<44} {:>9.2} {:>9.2}\n",
                page.page, page.p50_ms, page.p95_ms
            ));
        }
        out.push_str(&format!(
            "raw SQL of the first page {:.2} ms; the same depth by OFFSET {:.2} ms\n",
            self.raw_first_page_sql_ms, self.raw_offset_page_sql_ms
        ));
        out
    }
}

#[derive(QueryableByName)]
struct CursorRow {
    #[diesel(sql_type = Timestamptz)]
    failed_at: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// Fills `failed_jobs` with `rows` jobs of four listeners and three event
/// types over a week, errors of three kinds, ~600-byte payloads.
fn seed(conn: &mut PgConnection, rows: i64) -> anyhow::Result<()> {
    diesel::sql_query(
        "INSERT INTO failed_jobs (uuid, queue, listener, event_id, event_type, payload, exception, attempts, errors, failed_at)
         SELECT gen_random_uuid(), 'bench.' || l.name, l.name, gen_random_uuid(),
                (ARRAY['site.created', 'backup.failed', 'site.provisioning_failed'])[1 + i % 3],
                jsonb_build_object('specversion', '1.0', 'id', gen_random_uuid(), 'type', 'site.created',
                                   'source', '/outbox/bench', 'subject', (i % 5000)::text, 'aggregatetype', 'site',
                                   'data', jsonb_build_object('site_id', i, 'domain', 'site' || i || '.example.com', 'note', repeat('x', 400))),
                (ARRAY['notifier unavailable: smtp timed out', 'deadlock detected while updating tenant_stats', 'listener rejected the event: unknown plan'])[1 + i % 3] || ' #' || i,
                3,
                jsonb_build_array(jsonb_build_object('attempt', 1, 'at', now(), 'error', 'first try failed')),
                now() - make_interval(secs => (i * 6)::float8)
         FROM generate_series(1, $1) AS i,
              LATERAL (SELECT (ARRAY['record_audit_log', 'send_notification', 'update_tenant_metrics', 'record_metrics'])[1 + i % 4] AS name) l",
    )
    .bind::<BigInt, _>(rows)
    .execute(conn)?;
    diesel::sql_query("ANALYZE failed_jobs").execute(conn)?;
    Ok(())
}

fn time_sql(conn: &mut PgConnection, sql: &str, times: usize) -> anyhow::Result<f64> {
    let mut took = Vec::with_capacity(times);
    for _ in 0..times + 3 {
        let started = Instant::now();
        diesel::sql_query(sql).execute(conn)?;
        took.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(&took[3..]))
}

/// Runs the benchmark.
pub async fn run(target: &BenchTarget, args: &DashboardArgs) -> anyhow::Result<DashboardReport> {
    anyhow::ensure!(args.rows >= 1000, "--rows must be at least 1000");
    anyhow::ensure!(args.requests >= 1, "--requests must be at least 1");
    let db = super::scratch_database(&target.database_url, false).await?;
    let outcome = measure(target, &db, args).await;
    super::drop_database(db).await?;
    outcome
}

async fn measure(
    target: &BenchTarget,
    db: &outbox::testing::TestDatabase,
    args: &DashboardArgs,
) -> anyhow::Result<DashboardReport> {
    let (url, rows, requests) = (db.url().to_owned(), args.rows, args.requests);
    eprintln!("seeding {rows} failed jobs");
    let (deep, some_id, raw_first, raw_offset) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut conn = outbox::connect(&url)?;
        seed(&mut conn, rows)?;
        let depth = rows * 9 / 10;
        let deep: CursorRow = diesel::sql_query(
            "SELECT failed_at, id FROM failed_jobs ORDER BY failed_at DESC, id DESC OFFSET $1 LIMIT 1",
        )
        .bind::<BigInt, _>(depth)
        .get_result(&mut conn)?;
        let raw_first = time_sql(
            &mut conn,
            "SELECT * FROM failed_jobs ORDER BY failed_at DESC, id DESC LIMIT 51",
            requests,
        )?;
        let raw_offset = time_sql(
            &mut conn,
            &format!("SELECT * FROM failed_jobs ORDER BY failed_at DESC, id DESC OFFSET {depth} LIMIT 51"),
            requests,
        )?;
        let some_id: i64 = diesel::sql_query("SELECT id FROM failed_jobs ORDER BY id LIMIT 1 OFFSET $1")
            .bind::<BigInt, _>(depth)
            .get_result::<IdRow>(&mut conn)?
            .id;
        Ok((
            outbox::failed_jobs::Cursor {
                failed_at: deep.failed_at,
                id: deep.id,
            },
            some_id,
            raw_first,
            raw_offset,
        ))
    })
    .await??;

    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut config = outbox_dashboard::DashboardConfig::new(db.url(), &target.amqp_url);
    config.bind = "127.0.0.1:0".parse()?;
    let server = tokio::spawn(outbox_dashboard::serve(
        config,
        async move {
            let _ = stop_rx.await;
        },
        move |address| {
            let _ = bound_tx.send(address);
        },
    ));
    let address = tokio::time::timeout(Duration::from_secs(10), bound_rx)
        .await
        .context("the dashboard did not start")??;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let pages = [
        ("first page (50 rows)", "/failed".to_owned()),
        (
            "page at 90% depth (keyset cursor)",
            format!("/failed?after={deep}"),
        ),
        (
            "one listener's first page",
            "/failed?listener=send_notification".to_owned(),
        ),
        (
            "one event type's first page",
            "/failed?event_type=backup.failed".to_owned(),
        ),
        ("error text, a third match", "/failed?error=deadlock".to_owned()),
        (
            "error text, nothing matches",
            "/failed?error=no-such-text".to_owned(),
        ),
        ("last week (time range)", "/failed?since=7d&until=1h".to_owned()),
        ("one job's page", format!("/failed/{some_id}")),
        (
            "retry-all confirmation (counts a listener)",
            "/failed/retry-matching?listener=send_notification".to_owned(),
        ),
    ];
    let mut timings = Vec::new();
    for (name, path) in pages {
        let mut took = Vec::with_capacity(requests);
        for round in 0..requests + 3 {
            let response = client.get(format!("http://{address}{path}")).send().await?;
            anyhow::ensure!(response.status().is_success(), "{path}: {}", response.status());
            let spent = response
                .headers()
                .get("server-timing")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("app;dur="))
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| anyhow!("{path}: no Server-Timing header"))?;
            let _ = response.bytes().await?;
            if round >= 3 {
                took.push(Duration::from_secs_f64(spent / 1000.0));
            }
        }
        let p50 = percentile(&mut took, 0.5).as_secs_f64() * 1000.0;
        let p95 = percentile(&mut took, 0.95).as_secs_f64() * 1000.0;
        timings.push(PageTiming {
            page: name.to_owned(),
            path,
            p50_ms: p50,
            p95_ms: p95,
        });
    }
    let _ = stop_tx.send(());
    server.await??;
    Ok(DashboardReport {
        rows,
        requests,
        pages: timings,
        raw_first_page_sql_ms: raw_first,
        raw_offset_page_sql_ms: raw_offset,
    })
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
}
