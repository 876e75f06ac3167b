//! The load generator: 16 concurrent writers lose nothing, events of one
//! aggregate keep their order, a seed reproduces the mix, and the account events
//! records each of its twelve event types for every tenant.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chom::ChomError;
use chom::schema::sites;
use chom::simulate::{SimulateConfig, run};
use diesel::prelude::*;
use outbox::Outbox;
use outbox::schema::outbox_events;
use uuid::Uuid;

use crate::support::{events, setup};

#[test]
fn sixteen_writers_lose_nothing() {
    let (db, mut conn) = setup();
    let pool = db.pool(16).unwrap();
    let config = SimulateConfig {
        tenants: 4,
        sites: 200,
        writers: 16,
        seed: 42,
        // The seed's lifecycles only: this test counts them exactly.
        account_events: false,
        ..SimulateConfig::default()
    };

    let report = run(&pool, &Outbox::new(), &config).unwrap();

    assert!(report.verified, "{report:#?}");
    assert_eq!(report.missing_events, 0);
    assert_eq!(report.writers, 16);
    let count = |t: &str| report.events[t];
    assert_eq!(count("site.created"), 200);
    assert_eq!(count("site.provisioned") + count("site.provisioning_failed"), 200);
    assert_eq!(
        count("backup.created"),
        count("backup.completed") + count("backup.failed")
    );
    assert!(
        count("site.provisioning_failed") > 0 && count("backup.failed") > 0,
        "{report:#?}"
    );
    assert!(
        count("site.deleted") > 20 && count("site.deleted") < 120,
        "about a third: {report:#?}"
    );
    assert_eq!(report.transactions, report.events.values().sum::<u64>());

    // Every event id a service returned is in the table exactly once, and
    // the table holds nothing else (the database is this test's own).
    let rows = events(&mut conn);
    assert_eq!(rows.len(), report.event_ids.len());
    let returned: HashSet<Uuid> = report.event_ids.iter().copied().collect();
    assert_eq!(returned.len(), report.event_ids.len(), "no id returned twice");
    let stored: HashSet<Uuid> = rows.iter().map(|r| r.event_id).collect();
    assert_eq!(stored, returned);
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    for row in &rows {
        *by_type.entry(row.event_type.clone()).or_default() += 1;
    }
    by_type.retain(|_, n| *n > 0);
    let mut reported = report.database_events.clone();
    reported.retain(|_, n| *n > 0);
    assert_eq!(by_type, reported);

    // Per-aggregate order: each site's events follow its lifecycle in seq
    // order; each backup is created before it finishes.
    let mut per_aggregate: BTreeMap<(String, String), Vec<&str>> = BTreeMap::new();
    for row in &rows {
        per_aggregate
            .entry((row.aggregate_type.clone(), row.aggregate_id.clone()))
            .or_default()
            .push(&row.event_type);
    }
    for ((kind, id), types) in &per_aggregate {
        let ok = match kind.as_str() {
            "site" => matches!(
                types.as_slice(),
                ["site.created", "site.provisioned" | "site.provisioning_failed"]
                    | [
                        "site.created",
                        "site.provisioned" | "site.provisioning_failed",
                        "site.deleted"
                    ]
            ),
            "backup" => matches!(
                types.as_slice(),
                ["backup.created", "backup.completed" | "backup.failed"]
            ),
            _ => false,
        };
        assert!(ok, "{kind} {id}: {types:?}");
    }

    // The domain rows agree with the events.
    let deleted: i64 = sites::table
        .filter(sites::deleted_at.is_not_null())
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(deleted.unsigned_abs(), count("site.deleted"));
}

#[test]
fn a_seed_reproduces_the_mix() {
    let (db, mut conn) = setup();
    let pool = db.pool(4).unwrap();
    let config = SimulateConfig {
        tenants: 2,
        sites: 30,
        writers: 4,
        failure_rate: 0.3,
        seed: 7,
        ..SimulateConfig::default()
    };

    // Two runs in one database: names are unique per run.
    let first = run(&pool, &Outbox::new(), &config).unwrap();
    let second = run(&pool, &Outbox::new(), &config).unwrap();

    assert!(first.verified && second.verified);
    assert_eq!(first.events, second.events);
    assert_eq!(first.transactions, second.transactions);
    let total: i64 = outbox_events::table.count().get_result(&mut conn).unwrap();
    let recorded: u64 = first.events.values().sum();
    assert_eq!(total.unsigned_abs(), recorded * 2);
}

#[test]
fn phase_two_records_each_new_event_type_for_every_tenant() {
    let (db, mut conn) = setup();
    let pool = db.pool(4).unwrap();
    let config = SimulateConfig {
        tenants: 2,
        sites: 6,
        writers: 2,
        seed: 3,
        ..SimulateConfig::default()
    };

    let report = run(&pool, &Outbox::new(), &config).unwrap();

    assert!(report.verified, "{report:#?}");
    for event_type in chom::events::ACCOUNT_EVENT_TYPES {
        // Two certificates a tenant, one of them expiring within the window.
        let per_tenant = match event_type {
            "ssl.certificate_requested" | "ssl.certificate_issued" => 2,
            _ => 1,
        };
        assert_eq!(
            report.events[event_type],
            2 * per_tenant,
            "{event_type}: {report:#?}"
        );
    }
    assert_eq!(
        report.events.len(),
        chom::events::EVENT_TYPES.len(),
        "every type is reported"
    );
    // The quota events committed with their breaches, the expiry warnings
    // with theirs.
    assert_eq!(
        crate::support::count(&mut conn, "SELECT count(*) AS n FROM quota_breaches"),
        6
    );
    assert_eq!(
        crate::support::count(&mut conn, "SELECT count(*) AS n FROM ssl_expiry_warnings"),
        2
    );
    // Per-aggregate order holds for the account events' aggregates too.
    let rows = events(&mut conn);
    let mut certificates: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.aggregate_type == "ssl_certificate") {
        certificates
            .entry(row.aggregate_id.clone())
            .or_default()
            .push(&row.event_type);
    }
    for (id, types) in &certificates {
        assert!(
            matches!(
                types.as_slice(),
                ["ssl.certificate_requested", "ssl.certificate_issued"]
                    | [
                        "ssl.certificate_requested",
                        "ssl.certificate_issued",
                        "ssl.certificate_expiring"
                    ]
            ),
            "certificate {id}: {types:?}"
        );
    }
}

#[test]
fn rate_caps_transactions_per_second() {
    let (db, _conn) = setup();
    let pool = db.pool(4).unwrap();
    let config = SimulateConfig {
        tenants: 1,
        sites: 5,
        writers: 4,
        rate: Some(100.0),
        seed: 1,
        account_events: false,
        ..SimulateConfig::default()
    };

    let report = run(&pool, &Outbox::new(), &config).unwrap();

    // n transactions spaced 10 ms apart take at least (n - 1) * 10 ms.
    let floor = Duration::from_millis(10 * (report.transactions - 1));
    assert!(
        report.elapsed_seconds >= floor.as_secs_f64(),
        "{} transactions in {} s",
        report.transactions,
        report.elapsed_seconds
    );
    assert!(report.transactions_per_second <= 105.0, "{report:#?}");
}

#[test]
fn invalid_configuration_is_rejected() {
    let (db, _conn) = setup();
    let pool = db.pool(1).unwrap();
    for config in [
        SimulateConfig {
            tenants: 0,
            ..SimulateConfig::default()
        },
        SimulateConfig {
            failure_rate: 1.5,
            ..SimulateConfig::default()
        },
        SimulateConfig {
            rate: Some(f64::NAN),
            ..SimulateConfig::default()
        },
        SimulateConfig {
            writers: 0,
            ..SimulateConfig::default()
        },
    ] {
        let result = run(&pool, &Outbox::new(), &config);
        assert!(
            matches!(result, Err(ChomError::InvalidInput { .. })),
            "{config:?}"
        );
    }
}

#[test]
fn events_the_relay_moved_to_the_event_log_are_counted_too() {
    let (db, mut conn) = setup();
    let pool = db.pool(2).unwrap();
    let config = SimulateConfig {
        tenants: 1,
        sites: 10,
        writers: 2,
        seed: 7,
        account_events: false,
        ..SimulateConfig::default()
    };
    let report = run(&pool, &Outbox::new(), &config).unwrap();
    assert!(report.verified, "{report:#?}");

    // What a relay with the event log does once retention is over: mark
    // published, then move the rows out of outbox_events.
    diesel::sql_query("UPDATE outbox_events SET published_at = now() - interval '1 hour'")
        .execute(&mut conn)
        .unwrap();
    let moved = outbox::event_log::move_published(&mut conn, 0.0, 100_000).unwrap();
    assert_eq!(moved, report.event_ids.len());
    assert_eq!(
        outbox_events::table.count().get_result::<i64>(&mut conn).unwrap(),
        0
    );

    // Every event is still found, once, by type.
    let counted = chom::simulate::count_recorded(&mut conn, &report.event_ids).unwrap();
    let reported: BTreeMap<String, u64> = report
        .events
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(t, n)| (t.clone(), *n))
        .collect();
    assert_eq!(counted, reported);
}
