use chrono::Utc;
use diesel::prelude::*;
use outbox::{Error, Metadata, Outbox};

use outbox::DEFAULT_MAX_PAYLOAD_BYTES;

use crate::support::{Blob, WidgetCreated, count, database, insert_widget, stored_rows};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn rolled_back_domain_write_leaves_no_event() {
    let (_db, mut conn) = database();
    let outcome = conn.transaction::<(), Error, _>(|conn| {
        let id = insert_widget(conn, "doomed")?;
        outbox::record(
            conn,
            &WidgetCreated {
                widget_id: id,
                name: "doomed".into(),
                tenant: None,
            },
        )?;
        // The domain decides to fail after recording.
        Err(Error::InvalidEvent("business rule says no".into()))
    });
    assert!(outcome.is_err());
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM widgets"), 0);
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 0);
}

#[test]
fn failed_commit_leaves_no_event() {
    let (_db, mut conn) = database();
    // A deferred constraint fails at COMMIT, after record() succeeded.
    diesel::sql_query(
        "ALTER TABLE widgets ADD CONSTRAINT no_dupes UNIQUE (name) DEFERRABLE INITIALLY DEFERRED",
    )
    .execute(&mut conn)
    .unwrap();
    insert_widget(&mut conn, "taken").unwrap();
    let outbox = Outbox::new();
    let outcome = outbox.transaction::<_, Error, _>(&mut conn, |tx| {
        let id = insert_widget(tx.conn(), "taken")?;
        tx.record(&WidgetCreated {
            widget_id: id,
            name: "taken".into(),
            tenant: None,
        })
    });
    assert!(matches!(outcome, Err(Error::Database(_))), "{outcome:?}");
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 0);
}

#[test]
fn committed_write_leaves_one_row_with_every_contract_field() {
    let (_db, mut conn) = database();
    let before = Utc::now();
    let metadata = Metadata::by("user:42")
        .correlation_id("req-7")
        .causation_id("cmd-9")
        .traceparent(TRACEPARENT);
    let (widget_id, event_id) = conn
        .transaction::<_, Error, _>(|conn| {
            let id = insert_widget(conn, "anvil")?;
            let event = WidgetCreated {
                widget_id: id,
                name: "anvil".into(),
                tenant: Some("t-1".into()),
            };
            Ok((id, outbox::record_with(conn, &event, &metadata)?))
        })
        .unwrap();

    let rows = stored_rows(&mut conn);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.event_id, event_id);
    assert_eq!(row.event_id.get_version_num(), 7, "event ids are UUIDv7");
    assert_eq!(row.event_type, "widget.created");
    assert_eq!(row.aggregate_type, "widget");
    assert_eq!(row.aggregate_id, widget_id.to_string());
    assert_eq!(row.tenant_id.as_deref(), Some("t-1"));
    assert_eq!(row.actor.as_deref(), Some("user:42"));
    assert_eq!(row.correlation_id.as_deref(), Some("req-7"));
    assert_eq!(row.causation_id.as_deref(), Some("cmd-9"));
    assert_eq!(row.traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(row.schema_version, 2);
    assert!(row.occurred_at >= before - chrono::Duration::seconds(1) && row.occurred_at <= Utc::now());
    assert_eq!(
        row.payload,
        serde_json::json!({"widget_id": widget_id, "name": "anvil", "tenant": "t-1"})
    );
    // Relay state starts clean.
    assert_eq!(row.published_at, None);
    assert_eq!(row.attempts, 0);
    assert_eq!(row.failed_at, None);
}

#[test]
fn system_action_has_no_actor() {
    let (_db, mut conn) = database();
    conn.transaction::<_, Error, _>(|conn| {
        outbox::record(
            conn,
            &WidgetCreated {
                widget_id: 1,
                name: "cron".into(),
                tenant: None,
            },
        )
    })
    .unwrap();
    let row = &stored_rows(&mut conn)[0];
    assert_eq!(row.actor, None);
    assert_eq!(row.tenant_id, None);
    assert_eq!(row.correlation_id, None);
}

#[test]
fn record_works_in_a_diesel_native_transaction_and_keeps_the_outbox_error() {
    let (_db, mut conn) = database();
    // diesel's own error type: outbox::Error converts into it.
    let id = conn
        .transaction::<_, diesel::result::Error, _>(|conn| {
            let id = insert_widget(conn, "native")?;
            outbox::record(
                conn,
                &WidgetCreated {
                    widget_id: id,
                    name: "native".into(),
                    tenant: None,
                },
            )?;
            Ok(id)
        })
        .unwrap();
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 1);
    assert_eq!(
        count(
            &mut conn,
            &format!("SELECT count(*) AS n FROM outbox_events WHERE aggregate_id = '{id}'")
        ),
        1
    );

    // An outbox failure rolls the transaction back, and the outbox error
    // is still there to branch on.
    let outcome = conn.transaction::<(), diesel::result::Error, _>(|conn| {
        insert_widget(conn, "too big")?;
        outbox::record(conn, &Blob::of_serialized_len(DEFAULT_MAX_PAYLOAD_BYTES + 1))?;
        Ok(())
    });
    match outcome {
        Err(diesel::result::Error::QueryBuilderError(inner)) => assert!(
            matches!(inner.downcast_ref::<Error>(), Some(Error::PayloadTooLarge { .. })),
            "{inner:?}"
        ),
        other => panic!("expected the outbox error inside QueryBuilderError, got {other:?}"),
    }
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM widgets WHERE name = 'too big'"
        ),
        0
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 1);

    // The outbox's database errors come back as the diesel error they were.
    let converted: diesel::result::Error = Error::Database(diesel::result::Error::NotFound).into();
    assert!(
        matches!(converted, diesel::result::Error::NotFound),
        "{converted:?}"
    );
}

#[test]
fn record_outside_a_transaction_is_refused() {
    let (_db, mut conn) = database();
    let outcome = outbox::record(
        &mut conn,
        &WidgetCreated {
            widget_id: 1,
            name: "x".into(),
            tenant: None,
        },
    );
    assert!(matches!(outcome, Err(Error::NoTransaction)), "{outcome:?}");
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 0);
}

#[test]
fn contract_violations_are_typed_errors_before_sql() {
    let (_db, mut conn) = database();
    let bad_trace = Metadata::default().traceparent("not-a-trace");
    let outcome = conn.transaction::<_, Error, _>(|conn| {
        outbox::record_with(
            conn,
            &WidgetCreated {
                widget_id: 1,
                name: "x".into(),
                tenant: None,
            },
            &bad_trace,
        )
    });
    assert!(matches!(outcome, Err(Error::InvalidEvent(_))), "{outcome:?}");

    let nul = WidgetCreated {
        widget_id: 1,
        name: "nul\0byte".into(),
        tenant: None,
    };
    let outcome = conn.transaction::<_, Error, _>(|conn| outbox::record(conn, &nul));
    assert!(
        matches!(&outcome, Err(Error::InvalidEvent(m)) if m.contains("NUL")),
        "{outcome:?}"
    );

    let empty_tenant = WidgetCreated {
        widget_id: 1,
        name: "x".into(),
        tenant: Some(String::new()),
    };
    let outcome = conn.transaction::<_, Error, _>(|conn| outbox::record(conn, &empty_tenant));
    assert!(matches!(outcome, Err(Error::InvalidEvent(_))), "{outcome:?}");
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 0);
}

#[test]
fn events_of_one_transaction_keep_their_order() {
    let (_db, mut conn) = database();
    let outbox = Outbox::new();
    let ids = outbox
        .transaction::<_, Error, _>(&mut conn, |tx| {
            (1..=5)
                .map(|n| {
                    tx.record(&WidgetCreated {
                        widget_id: 9,
                        name: format!("v{n}"),
                        tenant: None,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
    let stored: Vec<_> = stored_rows(&mut conn).into_iter().map(|r| r.event_id).collect();
    assert_eq!(stored, ids);
}

#[test]
fn savepoint_rollback_forgets_its_events() {
    let (_db, mut conn) = database();
    let outbox = Outbox::new();
    let recorded = outbox
        .transaction::<_, Error, _>(&mut conn, |tx| {
            tx.record(&WidgetCreated {
                widget_id: 1,
                name: "kept".into(),
                tenant: None,
            })?;
            let inner: Result<(), Error> = tx.savepoint(|tx| {
                tx.record(&WidgetCreated {
                    widget_id: 2,
                    name: "dropped".into(),
                    tenant: None,
                })?;
                Err(Error::InvalidEvent("inner step fails".into()))
            });
            assert!(inner.is_err());
            Ok(tx.recorded().len())
        })
        .unwrap();
    assert_eq!(recorded, 1);
    let rows = stored_rows(&mut conn);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].payload["name"], "kept");
}

#[test]
fn fake_outbox_sees_committed_events_only() {
    let (_db, mut conn) = database();
    let (outbox, fake) = Outbox::fake();
    outbox
        .transaction::<_, Error, _>(&mut conn, |tx| {
            let id = insert_widget(tx.conn(), "kept")?;
            tx.record(&WidgetCreated {
                widget_id: id,
                name: "kept".into(),
                tenant: None,
            })
        })
        .unwrap();
    let _ = outbox.transaction::<(), Error, _>(&mut conn, |tx| {
        tx.record(&WidgetCreated {
            widget_id: 2,
            name: "rolled back".into(),
            tenant: None,
        })?;
        Err(Error::InvalidEvent("no".into()))
    });
    fake.assert_recorded_times("widget.created", 1);
    fake.assert_not_recorded("widget.deleted");
    let payloads: Vec<WidgetCreated> = fake.payloads("widget.created");
    assert_eq!(payloads[0].name, "kept");
    // The fake writes nothing to the outbox table.
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 0);
    fake.clear();
    fake.assert_nothing_recorded();
}

#[test]
#[should_panic(expected = "expected 2 widget.created event(s), found 0")]
fn fake_assertions_fail_loudly() {
    let (_outbox, fake) = Outbox::fake();
    fake.assert_recorded_times("widget.created", 2);
}
