use diesel::prelude::*;
use outbox::{DEFAULT_MAX_PAYLOAD_BYTES, Error, MAX_PAYLOAD_BYTES_LIMIT, Outbox};

use crate::support::{Blob, count, database};

#[test]
fn payload_at_the_default_cap_is_recorded_and_one_byte_over_is_refused() {
    let (_db, mut conn) = database();
    let at_cap = Blob::of_serialized_len(DEFAULT_MAX_PAYLOAD_BYTES);
    conn.transaction::<_, Error, _>(|conn| outbox::record(conn, &at_cap))
        .unwrap();

    let over = Blob::of_serialized_len(DEFAULT_MAX_PAYLOAD_BYTES + 1);
    let outcome = conn.transaction::<_, Error, _>(|conn| outbox::record(conn, &over));
    match outcome {
        Err(Error::PayloadTooLarge {
            event_type,
            size,
            limit,
        }) => {
            assert_eq!(event_type, "blob.stored");
            assert_eq!(size, DEFAULT_MAX_PAYLOAD_BYTES + 1);
            assert_eq!(limit, DEFAULT_MAX_PAYLOAD_BYTES);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 1);
}

#[test]
fn oversized_payload_fails_before_any_sql() {
    // No transaction is open: if record() reached the database it would
    // report NoTransaction; the cap check must come first.
    let (_db, mut conn) = database();
    let outcome = outbox::record(&mut conn, &Blob::of_serialized_len(DEFAULT_MAX_PAYLOAD_BYTES * 2));
    assert!(
        matches!(outcome, Err(Error::PayloadTooLarge { .. })),
        "{outcome:?}"
    );
}

#[test]
fn configured_cap_applies_and_is_bounded() {
    let (_db, mut conn) = database();
    let outbox = Outbox::builder().max_payload_bytes(1024).build().unwrap();
    let outcome =
        outbox.transaction::<_, Error, _>(&mut conn, |tx| tx.record(&Blob::of_serialized_len(1025)));
    assert!(
        matches!(outcome, Err(Error::PayloadTooLarge { limit: 1024, .. })),
        "{outcome:?}"
    );

    for bad in [0, MAX_PAYLOAD_BYTES_LIMIT + 1] {
        let built = Outbox::builder().max_payload_bytes(bad).build();
        assert!(matches!(built, Err(Error::Config(_))), "{bad}: {built:?}");
    }
    // The largest allowed cap still fits under the database backstop.
    let widest = Outbox::builder()
        .max_payload_bytes(MAX_PAYLOAD_BYTES_LIMIT)
        .build()
        .unwrap();
    widest
        .transaction::<_, Error, _>(&mut conn, |tx| {
            tx.record(&Blob::of_serialized_len(MAX_PAYLOAD_BYTES_LIMIT))
        })
        .unwrap();
}

#[test]
fn database_check_rejects_a_raw_oversized_insert() {
    let (_db, mut conn) = database();
    let outcome = diesel::sql_query(
        "INSERT INTO outbox_events (event_id, event_type, aggregate_type, aggregate_id, occurred_at, payload)
         VALUES (gen_random_uuid(), 'blob.stored', 'blob', '1', now(),
                 jsonb_build_object('filler', repeat('x', 2 * 1024 * 1024)))",
    )
    .execute(&mut conn);
    let message = outcome.expect_err("the CHECK must reject 2 MiB").to_string();
    assert!(message.contains("outbox_events_payload_size"), "{message}");
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 0);
}
