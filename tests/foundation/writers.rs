use std::collections::HashSet;
use std::thread;

use outbox::{Error, Outbox};
use uuid::Uuid;

use crate::support::{WidgetCreated, count, database, insert_widget, stored_rows};

#[test]
fn sixteen_concurrent_writers_lose_nothing() {
    const WRITERS: usize = 16;
    const TRANSACTIONS: usize = 60;
    let (db, mut conn) = database();
    let outbox = Outbox::new();
    let handles: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let url = db.url().to_owned();
            let outbox = outbox.clone();
            thread::spawn(move || -> Vec<Uuid> {
                let mut conn = outbox::connect(&url).unwrap();
                let mut committed = Vec::new();
                for n in 0..TRANSACTIONS {
                    // Every fifth transaction rolls back after recording.
                    let roll_back = n % 5 == 4;
                    let outcome = outbox.transaction::<_, Error, _>(&mut conn, |tx| {
                        let id = insert_widget(tx.conn(), &format!("w{writer}-{n}"))?;
                        let event_id = tx.record(&WidgetCreated {
                            widget_id: id,
                            name: format!("{writer}"),
                            tenant: None,
                        })?;
                        if roll_back {
                            return Err(Error::InvalidEvent("roll back".into()));
                        }
                        Ok(event_id)
                    });
                    if let Ok(id) = outcome {
                        committed.push(id);
                    }
                }
                committed
            })
        })
        .collect();
    let committed: Vec<Uuid> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert_eq!(committed.len(), WRITERS * TRANSACTIONS * 4 / 5);

    let stored: Vec<Uuid> = stored_rows(&mut conn).into_iter().map(|r| r.event_id).collect();
    let stored_set: HashSet<_> = stored.iter().copied().collect();
    assert_eq!(stored.len(), stored_set.len(), "no event stored twice");
    assert_eq!(
        stored_set,
        committed.iter().copied().collect::<HashSet<_>>(),
        "exactly the committed events"
    );
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM widgets") as usize,
        committed.len()
    );
    // Events reference the widgets of their own transaction.
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events e JOIN widgets w ON w.id::text = e.aggregate_id"
        ) as usize,
        committed.len()
    );
}
