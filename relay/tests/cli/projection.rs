//! `outbox projection status | rebuild` as an operator runs them (the
//! rebuild itself is a worker's: see tests/consumer/projections.rs).

use outbox::TestDatabase;

use crate::support::run_outbox;

#[test]
fn status_lists_projections_and_rebuild_records_a_request_once() {
    let db = TestDatabase::create().unwrap();
    let env = [("DATABASE_URL", db.url())];
    let (code, out, err) = run_outbox(&["projection", "status", "--json"], &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!([])
    );

    let (code, _, err) = run_outbox(&["projection", "rebuild", "tenant_stats"], &env);
    assert_eq!(code, 1);
    assert!(
        err.contains("no projection is registered in this database"),
        "{err}"
    );

    // A worker running it records its row when it starts.
    outbox::projection::ensure_row(&mut db.connect().unwrap(), "tenant_stats").unwrap();
    // A name nobody registered is refused with the names that are.
    let (code, _, err) = run_outbox(&["projection", "rebuild", "tenant_metrics"], &env);
    assert_eq!(code, 1);
    assert!(
        err.contains("projection tenant_metrics: not registered in this database; registered: tenant_stats"),
        "{err}"
    );
    let (code, out, err) = run_outbox(&["projection", "rebuild", "tenant_stats"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rebuild of tenant_stats requested"), "{out}");
    let (code, _, err) = run_outbox(&["projection", "rebuild", "tenant_stats"], &env);
    assert_eq!(code, 1);
    assert!(err.contains("is rebuild requested already"), "{err}");

    let (code, out, err) = run_outbox(&["projection", "status"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("tenant_stats") && out.contains("rebuild_requested"),
        "{out}"
    );

    // Events the relay has not moved into the log yet are counted, not
    // shown as "position 0 of 0" with nothing said.
    let mut conn = db.connect().unwrap();
    outbox::testing::record_ticks(&mut conn, "agg", 1..10).unwrap();
    let (code, out, err) = run_outbox(&["projection", "status", "--json"], &env);
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["log_head"], 0, "{out}");
    assert_eq!(rows[0]["not_yet_logged"], 9, "{out}");
    let (code, out, err) = run_outbox(&["projection", "status"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("NOT YET LOGGED") && out.contains("a rebuild applies them after the log"),
        "{out}"
    );
    let (code, _, err) = run_outbox(
        &[
            "projection",
            "rebuild",
            "tenant_stats",
            "--wait",
            "--timeout",
            "300ms",
        ],
        &env,
    );
    assert_eq!(code, 1, "nobody rebuilds it here");
    assert!(err.contains("is a worker running it?"), "{err}");
}

#[test]
fn help_names_a_projection_chom_registers() {
    let (code, out, err) = run_outbox(&["projection", "--help"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("tenant_stats"), "{out}");
    assert!(out.contains(chom_projection()), "{out}");
    let (code, out, err) = run_outbox(&["projection", "rebuild", "--help"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(chom_projection()), "{out}");
    assert!(!out.contains("tenant_stats"), "{out}");
}

/// The projection CHOM's worker registers: the name an operator types.
fn chom_projection() -> &'static str {
    chom::listeners::UPDATE_TENANT_METRICS
}
