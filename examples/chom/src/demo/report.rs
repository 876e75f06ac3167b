//! What `chom demo` reports, and how it is read back from the database and
//! the metrics once every listener is done.

use super::*;

/// Events of one type: recorded by the services, published by the relay.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct EventCount {
    /// Recorded in this run.
    pub recorded: u64,
    /// Of those, published (confirmed by the broker).
    pub published: u64,
}

/// How one listener fared in this run.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ListenerOutcome {
    /// Listener name.
    pub listener: String,
    /// `queued` or `sync`.
    pub kind: &'static str,
    /// Deliveries handled successfully.
    pub success: u64,
    /// Duplicates acknowledged without running the handler.
    pub duplicate: u64,
    /// Tries that failed and were scheduled again.
    pub retried: u64,
    /// Messages that ended in failed_jobs.
    pub failed: u64,
    /// Events another database's relay left on the broker: set aside, not
    /// applied (the worker accepts only this database's source).
    pub foreign: u64,
}

/// A tenant's stats row.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, QueryableByName)]
pub struct TenantStats {
    /// Tenant id.
    #[diesel(sql_type = BigInt)]
    pub tenant_id: i64,
    /// Tenant name.
    #[diesel(sql_type = Text)]
    pub name: String,
    /// Live sites.
    #[diesel(sql_type = BigInt)]
    pub sites: i64,
    /// Active live sites.
    #[diesel(sql_type = BigInt)]
    pub active_sites: i64,
    /// Storage of live sites.
    #[diesel(sql_type = BigInt)]
    pub storage_bytes: i64,
    /// Backups.
    #[diesel(sql_type = BigInt)]
    pub backups: i64,
    /// Failed backups.
    #[diesel(sql_type = BigInt)]
    pub failed_backups: i64,
}

/// One failed job, as the report lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FailedJobLine {
    /// Row id.
    pub id: i64,
    /// Listener.
    pub listener: String,
    /// Event type.
    pub event_type: Option<String>,
    /// Tries made.
    pub attempts: i32,
    /// Final error.
    pub exception: String,
}

/// What the demo did.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Wall time.
    pub elapsed_seconds: f64,
    /// The retry policy in force, for the reader.
    pub retry_policy: String,
    /// Events of this run by type.
    pub events: BTreeMap<String, EventCount>,
    /// Listener outcomes.
    pub listeners: Vec<ListenerOutcome>,
    /// Audit rows written for this run's events.
    pub audit_rows: i64,
    /// Of those, system actions (no actor).
    pub audit_system_actions: i64,
    /// Notifications stored for this run's tenants.
    pub notifications: i64,
    /// Stats of this run's tenants.
    pub tenants: Vec<TenantStats>,
    /// Failed jobs of this run's events.
    pub failed_jobs: Vec<FailedJobLine>,
    /// Messages left in the dead-letter queues (all runs).
    pub dead_lettered: BTreeMap<String, u32>,
    /// CHOM's RecordMetrics counters.
    pub metrics: BTreeMap<String, f64>,
    /// Whether every listener finished with every event before the
    /// timeout.
    pub settled: bool,
}

/// Reads this run's results from the database.
pub(super) fn collect(pool: &PgPool, ids: &[Uuid]) -> Result<DemoReport> {
    let mut conn = pool.get().map_err(outbox::Error::Pool)?;
    #[derive(QueryableByName)]
    struct TypeCount {
        #[diesel(sql_type = Text)]
        event_type: String,
        #[diesel(sql_type = BigInt)]
        recorded: i64,
        #[diesel(sql_type = BigInt)]
        published: i64,
    }
    let by_type: Vec<TypeCount> = diesel::sql_query(
        "SELECT event_type, count(*) AS recorded, count(published_at) AS published
         FROM outbox_events WHERE event_id = ANY($1) GROUP BY event_type",
    )
    .bind::<Array<SqlUuid>, _>(ids)
    .load(&mut conn)?;
    let mut events: BTreeMap<String, EventCount> = crate::events::EVENT_TYPES
        .iter()
        .map(|t| ((*t).to_owned(), EventCount::default()))
        .collect();
    for row in by_type {
        events.insert(
            row.event_type,
            EventCount {
                recorded: row.recorded as u64,
                published: row.published as u64,
            },
        );
    }
    let audit_rows = count_ids(
        &mut conn,
        "SELECT count(*) AS n FROM audit_logs WHERE event_id = ANY($1)",
        ids,
    )?;
    let audit_system_actions = count_ids(
        &mut conn,
        "SELECT count(*) AS n FROM audit_logs WHERE event_id = ANY($1) AND actor IS NULL",
        ids,
    )?;
    let notifications = count_ids(
        &mut conn,
        "SELECT count(*) AS n FROM notifications WHERE event_id = ANY($1)",
        ids,
    )?;
    let tenants: Vec<TenantStats> = diesel::sql_query(
        "SELECT t.id AS tenant_id, t.name, s.site_count AS sites, s.active_site_count AS active_sites,
                s.storage_bytes, s.backup_count AS backups, s.failed_backup_count AS failed_backups
         FROM tenants t JOIN tenant_stats s ON s.tenant_id = t.id
         WHERE t.id IN (SELECT DISTINCT tenant_id::bigint FROM outbox_events WHERE event_id = ANY($1))
         ORDER BY t.id",
    )
    .bind::<Array<SqlUuid>, _>(ids)
    .load(&mut conn)?;
    let wanted: HashSet<Uuid> = ids.iter().copied().collect();
    let failed_jobs = outbox::failed_jobs::list(
        &mut conn,
        &outbox::failed_jobs::Filter {
            limit: Some(outbox::failed_jobs::MAX_LIST_LIMIT),
            ..outbox::failed_jobs::Filter::default()
        },
    )?
    .into_iter()
    .filter(|job| job.event_id.is_some_and(|id| wanted.contains(&id)))
    .map(|job| FailedJobLine {
        id: job.id,
        listener: job.listener,
        event_type: job.event_type,
        attempts: job.attempts,
        exception: job.exception,
    })
    .collect::<Vec<_>>();
    let mut failed_jobs = failed_jobs;
    failed_jobs.sort_by_key(|job| job.id);
    Ok(DemoReport {
        elapsed_seconds: 0.0,
        retry_policy: String::new(),
        events,
        listeners: Vec::new(),
        audit_rows,
        audit_system_actions,
        notifications,
        tenants,
        failed_jobs,
        dead_lettered: BTreeMap::new(),
        metrics: BTreeMap::new(),
        settled: false,
    })
}

/// `name{labels} value` lines of a Prometheus text rendering.
fn samples(rendered: &str) -> impl Iterator<Item = (&str, BTreeMap<&str, &str>, f64)> {
    rendered
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            Some((name, labels, value))
        })
}

pub(super) fn listener_outcomes(rendered: &str, report: &DemoReport) -> Vec<ListenerOutcome> {
    let mut outcomes: BTreeMap<String, ListenerOutcome> = BTreeMap::new();
    for (name, labels, value) in samples(rendered) {
        if name != outbox::metrics::LISTENER_OUTCOMES_TOTAL {
            continue;
        }
        let (Some(listener), Some(outcome)) = (labels.get("listener"), labels.get("outcome")) else {
            continue;
        };
        let entry = outcomes
            .entry((*listener).to_owned())
            .or_insert_with(|| ListenerOutcome {
                listener: (*listener).to_owned(),
                kind: "queued",
                ..ListenerOutcome::default()
            });
        let value = value as u64;
        match *outcome {
            "success" => entry.success += value,
            "duplicate" => entry.duplicate += value,
            "retry" => entry.retried += value,
            "failed" => entry.failed += value,
            "foreign" => entry.foreign += value,
            _ => {}
        }
    }
    let mut list: Vec<ListenerOutcome> = [
        listeners::UPDATE_TENANT_METRICS,
        listeners::RECORD_AUDIT_LOG,
        listeners::SEND_NOTIFICATION,
    ]
    .iter()
    .map(|name| {
        outcomes.remove(*name).unwrap_or_else(|| ListenerOutcome {
            listener: (*name).to_owned(),
            kind: "queued",
            ..ListenerOutcome::default()
        })
    })
    .collect();
    list.push(ListenerOutcome {
        listener: listeners::RECORD_METRICS.to_owned(),
        kind: "sync",
        success: report.events.values().map(|c| c.recorded).sum(),
        ..ListenerOutcome::default()
    });
    list
}

pub(super) fn chom_counters(rendered: &str) -> BTreeMap<String, f64> {
    samples(rendered)
        .filter(|(name, _, _)| name.starts_with("chom_") && name.ends_with("_total"))
        .map(|(name, _, value)| (name.to_owned(), value))
        .collect()
}
