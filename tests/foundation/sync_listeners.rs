use std::sync::{Arc, Mutex};

use outbox::{BoxError, Error, EventEnvelope, Metadata, Outbox, Registry, SyncListener};

use crate::support::{WidgetCreated, count, database, insert_widget};

/// Remembers what it saw and whether the transaction had committed by then.
#[derive(Clone, Default)]
struct Spy {
    seen: Arc<Mutex<Vec<(String, i64)>>>,
    db_url: String,
}

impl SyncListener for Spy {
    fn name(&self) -> &str {
        "spy"
    }
    fn handle(&self, event: &EventEnvelope) -> Result<(), BoxError> {
        // Look from another connection: the row is only visible once the
        // writer's transaction committed.
        let mut other = outbox::connect(&self.db_url)?;
        let visible = count(
            &mut other,
            &format!(
                "SELECT count(*) AS n FROM outbox_events WHERE event_id = '{}'",
                event.event_id
            ),
        );
        self.seen
            .lock()
            .unwrap()
            .push((event.event_type.clone(), visible));
        Ok(())
    }
}

struct Failing;

impl SyncListener for Failing {
    fn name(&self) -> &str {
        "failing"
    }
    fn handle(&self, _event: &EventEnvelope) -> Result<(), BoxError> {
        Err("metrics backend down".into())
    }
}

struct Panicking;

impl SyncListener for Panicking {
    fn name(&self) -> &str {
        "panicking"
    }
    fn handle(&self, _event: &EventEnvelope) -> Result<(), BoxError> {
        panic!("listener bug")
    }
}

fn outbox_with(spy: &Spy) -> Outbox {
    let registry = Registry::new()
        .sync_listener(&["widget.created"], Failing)
        .unwrap()
        .sync_listener(&["widget.created"], Panicking)
        .unwrap()
        .sync_listener(&["widget.created"], spy.clone())
        .unwrap();
    Outbox::builder().registry(registry).build().unwrap()
}

#[test]
fn sync_listeners_run_after_commit_for_that_transactions_events_only() {
    let (db, mut conn) = database();
    let spy = Spy {
        db_url: db.url().to_owned(),
        ..Spy::default()
    };
    let outbox = outbox_with(&spy);

    // An event recorded outside this transaction, committed earlier.
    diesel::Connection::transaction::<_, Error, _>(&mut conn, |conn| {
        outbox::record(
            conn,
            &WidgetCreated {
                widget_id: 99,
                name: "earlier".into(),
                tenant: None,
            },
        )
    })
    .unwrap();
    assert!(
        spy.seen.lock().unwrap().is_empty(),
        "plain record() runs no listener"
    );

    outbox
        .transaction_with::<_, Error, _>(&mut conn, Metadata::by("user:1"), |tx| {
            let id = insert_widget(tx.conn(), "a")?;
            tx.record(&WidgetCreated {
                widget_id: id,
                name: "a".into(),
                tenant: None,
            })?;
            // Not yet: the transaction is still open.
            assert!(spy.seen.lock().unwrap().is_empty());
            Ok(())
        })
        .unwrap();
    // Ran once, for this transaction's single event, and saw it committed;
    // the failing and panicking listeners did not stop it or the writer.
    assert_eq!(*spy.seen.lock().unwrap(), vec![("widget.created".to_owned(), 1)]);
}

#[test]
fn sync_listeners_never_run_for_a_rolled_back_transaction() {
    let (db, mut conn) = database();
    let spy = Spy {
        db_url: db.url().to_owned(),
        ..Spy::default()
    };
    let outbox = outbox_with(&spy);
    let outcome = outbox.transaction::<(), Error, _>(&mut conn, |tx| {
        tx.record(&WidgetCreated {
            widget_id: 1,
            name: "a".into(),
            tenant: None,
        })?;
        Err(Error::InvalidEvent("rolled back".into()))
    });
    assert!(outcome.is_err());
    assert!(spy.seen.lock().unwrap().is_empty());
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 0);
}

#[test]
fn registry_rejects_bad_registrations() {
    let bad_type = Registry::new().sync_listener(&["Widget Created"], Failing);
    assert!(matches!(bad_type, Err(Error::Config(_))));
    let twice = Registry::new()
        .sync_listener(&["widget.created"], Failing)
        .unwrap()
        .sync_listener(&["widget.deleted"], Failing);
    assert!(matches!(twice, Err(Error::Config(_))));
    let registry = Registry::new()
        .sync_listener(&["widget.created"], Failing)
        .unwrap();
    assert_eq!(registry.sync_listeners_for("widget.created").count(), 1);
    assert_eq!(registry.sync_listeners_for("widget.deleted").count(), 0);
}
