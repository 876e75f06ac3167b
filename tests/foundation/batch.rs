use diesel::prelude::*;
use outbox::{Error, Metadata, Outbox};

use crate::support::{Blob, WidgetCreated, count, database, stored_rows};

#[test]
fn batch_inserts_many_events_in_order() {
    let (_db, mut conn) = database();
    let outbox = Outbox::new();
    let metadata = Metadata::by("user:1");
    let envelopes: Vec<_> = (0..2500)
        .map(|n| {
            outbox
                .envelope(
                    &WidgetCreated {
                        widget_id: n % 10,
                        name: format!("w{n}"),
                        tenant: None,
                    },
                    &metadata,
                )
                .unwrap()
        })
        .collect();
    let expected: Vec<_> = envelopes.iter().map(|e| e.event_id).collect();
    conn.transaction::<_, Error, _>(|conn| outbox::record_batch(conn, &envelopes))
        .unwrap();
    let stored: Vec<_> = stored_rows(&mut conn).into_iter().map(|r| r.event_id).collect();
    assert_eq!(
        stored, expected,
        "all 2,500 rows, in the order given (chunked past 1,000)"
    );
}

#[test]
fn record_batch_in_a_transaction() {
    let (_db, mut conn) = database();
    let outbox = Outbox::new();
    let events: Vec<_> = (0..50)
        .map(|n| WidgetCreated {
            widget_id: n,
            name: format!("w{n}"),
            tenant: None,
        })
        .collect();
    let ids = outbox
        .transaction::<_, Error, _>(&mut conn, |tx| tx.record_batch(&events))
        .unwrap();
    assert_eq!(ids.len(), 50);
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 50);
}

#[test]
fn one_bad_envelope_fails_the_whole_batch_before_sql() {
    let (_db, mut conn) = database();
    let outbox = Outbox::new();
    let good = outbox
        .envelope(
            &WidgetCreated {
                widget_id: 1,
                name: "ok".into(),
                tenant: None,
            },
            &Metadata::default(),
        )
        .unwrap();
    let mut bad = good.clone();
    bad.event_type = "Not A Type".into();
    let outcome = conn.transaction::<_, Error, _>(|conn| outbox::record_batch(conn, &[good.clone(), bad]));
    assert!(matches!(outcome, Err(Error::InvalidEvent(_))), "{outcome:?}");

    // An envelope built under a larger cap is re-checked against the batch's.
    let small = Outbox::builder().max_payload_bytes(100).build().unwrap();
    let big = outbox
        .envelope(&Blob::of_serialized_len(500), &Metadata::default())
        .unwrap();
    let outcome = conn.transaction::<_, Error, _>(|conn| small.record_batch(conn, &[good, big]));
    assert!(
        matches!(outcome, Err(Error::PayloadTooLarge { .. })),
        "{outcome:?}"
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 0);
}

#[test]
fn batch_outside_a_transaction_is_refused() {
    let (_db, mut conn) = database();
    let envelope = Outbox::new()
        .envelope(
            &WidgetCreated {
                widget_id: 1,
                name: "ok".into(),
                tenant: None,
            },
            &Metadata::default(),
        )
        .unwrap();
    let outcome = outbox::record_batch(&mut conn, &[envelope]);
    assert!(matches!(outcome, Err(Error::NoTransaction)), "{outcome:?}");
}
