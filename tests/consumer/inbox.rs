//! The inbox: one row per (listener, event), duplicates detected.

use diesel::Connection;
use outbox::inbox;
use uuid::Uuid;

use crate::support::{count, database};

#[test]
fn claim_is_true_once_per_listener_and_event() {
    let (_db, mut conn) = database();
    let event = Uuid::now_v7();
    conn.transaction::<_, outbox::Error, _>(|conn| {
        assert!(inbox::claim(conn, "audit", event)?);
        assert!(!inbox::claim(conn, "audit", event)?, "a duplicate");
        assert!(
            inbox::claim(conn, "metrics", event)?,
            "another listener is independent"
        );
        Ok(())
    })
    .unwrap();
    assert!(inbox::is_processed(&mut conn, "audit", event).unwrap());
    assert!(!inbox::is_processed(&mut conn, "audit", Uuid::now_v7()).unwrap());
}

#[test]
fn a_rolled_back_claim_leaves_no_row() {
    let (_db, mut conn) = database();
    let event = Uuid::now_v7();
    let failed = conn.transaction::<(), outbox::Error, _>(|conn| {
        assert!(inbox::claim(conn, "audit", event)?);
        Err(outbox::Error::Config("the effect failed".into()))
    });
    assert!(failed.is_err());
    assert!(!inbox::is_processed(&mut conn, "audit", event).unwrap());
    conn.transaction::<_, outbox::Error, _>(|conn| {
        assert!(inbox::claim(conn, "audit", event)?, "the retry claims it");
        Ok(())
    })
    .unwrap();
}

#[test]
fn prune_deletes_old_rows_in_batches() {
    let (_db, mut conn) = database();
    use diesel::RunQueryDsl;
    diesel::sql_query(
        "INSERT INTO processed_events (listener, event_id, processed_at)
         SELECT 'audit', gen_random_uuid(), now() - interval '10 days' FROM generate_series(1, 5)",
    )
    .execute(&mut conn)
    .unwrap();
    conn.transaction::<_, outbox::Error, _>(|conn| inbox::claim(conn, "audit", Uuid::now_v7()))
        .unwrap();
    assert_eq!(inbox::prune(&mut conn, 24.0 * 7.0, 3).unwrap(), 3);
    assert_eq!(inbox::prune(&mut conn, 24.0 * 7.0, 3).unwrap(), 2);
    assert_eq!(inbox::prune(&mut conn, 24.0 * 7.0, 3).unwrap(), 0);
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM processed_events"), 1);
}
