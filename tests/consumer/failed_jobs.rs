//! The failed_jobs module: idempotent insert, listing with filters, get,
//! forget, flush, prune.

use chrono::{Duration as Days, Utc};
use diesel::RunQueryDsl;
use outbox::failed_jobs::{self, AttemptError, Filter, NewFailedJob};
use serde_json::json;
use uuid::Uuid;

use crate::support::{count, database};

fn job<'a>(
    listener: &'a str,
    event_id: Option<Uuid>,
    event_type: Option<&'a str>,
    payload: &'a serde_json::Value,
    errors: &'a [AttemptError],
) -> NewFailedJob<'a> {
    NewFailedJob {
        queue: "app.queue",
        listener,
        event_id,
        event_type,
        payload,
        exception: "boom",
        attempts: errors.len() as i32,
        errors,
        uuid: None,
    }
}

#[test]
fn insert_is_idempotent_per_listener_and_event() {
    let (_db, mut conn) = database();
    let event = Uuid::now_v7();
    let payload = json!({"id": event.to_string(), "data": {"site_id": 7}});
    let errors = vec![
        AttemptError {
            attempt: 1,
            at: Utc::now(),
            error: "first".into(),
        },
        AttemptError {
            attempt: 2,
            at: Utc::now(),
            error: "x".repeat(10_000),
        },
    ];
    let (id, inserted) = failed_jobs::insert(
        &mut conn,
        &job("audit", Some(event), Some("site.created"), &payload, &errors),
    )
    .unwrap();
    assert!(inserted);
    let (again, inserted_again) = failed_jobs::insert(
        &mut conn,
        &job("audit", Some(event), Some("site.created"), &payload, &errors),
    )
    .unwrap();
    assert!(!inserted_again, "a redelivery finds the row");
    assert_eq!(again, id);
    let (_, other) = failed_jobs::insert(
        &mut conn,
        &job("notify", Some(event), Some("site.created"), &payload, &errors),
    )
    .unwrap();
    assert!(other, "another listener has its own row");
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 2);

    let stored = failed_jobs::get(&mut conn, id).unwrap().unwrap();
    assert_eq!(stored.listener, "audit");
    assert_eq!(stored.queue, "app.queue");
    assert_eq!(stored.event_id, Some(event));
    assert_eq!(stored.event_type.as_deref(), Some("site.created"));
    assert_eq!(stored.payload, payload);
    assert_eq!(stored.exception, "boom");
    assert_eq!(stored.attempts, 2);
    assert_eq!(stored.errors.len(), 2);
    assert_eq!(stored.errors[0].error, "first");
    assert!(
        stored.errors[1].error.len() <= failed_jobs::MAX_ATTEMPT_ERROR_BYTES,
        "bounded"
    );
    assert_eq!(
        failed_jobs::find_by_event(&mut conn, "audit", event)
            .unwrap()
            .map(|j| j.id),
        Some(id)
    );
}

#[test]
fn malformed_messages_are_deduplicated_by_their_uuid() {
    let (_db, mut conn) = database();
    let body = b"\x00\xffnot an event";
    let payload = failed_jobs::payload_for_body(body);
    let uuid = failed_jobs::malformed_uuid("audit", body);
    let new = NewFailedJob {
        uuid: Some(uuid),
        ..job("audit", None, None, &payload, &[])
    };
    let (id, inserted) = failed_jobs::insert(&mut conn, &new).unwrap();
    assert!(inserted);
    let (again, inserted) = failed_jobs::insert(&mut conn, &new).unwrap();
    assert!(!inserted);
    assert_eq!(again, id);
    let stored = failed_jobs::get(&mut conn, id).unwrap().unwrap();
    assert_eq!(stored.payload["malformed"], true);
    assert_eq!(stored.event_id, None);
}

#[test]
fn exceptions_are_bounded_and_nul_free() {
    let (_db, mut conn) = database();
    let payload = json!({});
    let exception = format!("bad\0{}", "é".repeat(100_000));
    let new = NewFailedJob {
        exception: &exception,
        ..job("audit", Some(Uuid::now_v7()), None, &payload, &[])
    };
    let (id, _) = failed_jobs::insert(&mut conn, &new).unwrap();
    let stored = failed_jobs::get(&mut conn, id).unwrap().unwrap();
    assert!(stored.exception.len() <= failed_jobs::MAX_EXCEPTION_BYTES);
    assert!(stored.exception.starts_with("bad\u{fffd}"));
}

#[test]
fn list_filters_newest_first_and_forget_flush_prune() {
    let (_db, mut conn) = database();
    let payload = json!({});
    let mut ids = Vec::new();
    for (listener, event_type) in [
        ("audit", "site.created"),
        ("audit", "backup.failed"),
        ("notify", "backup.failed"),
        ("audit", "site.deleted"),
    ] {
        let (id, _) = failed_jobs::insert(
            &mut conn,
            &job(listener, Some(Uuid::now_v7()), Some(event_type), &payload, &[]),
        )
        .unwrap();
        ids.push(id);
    }
    // Age the first two: 3 days and 2 days old.
    diesel::sql_query(format!(
        "UPDATE failed_jobs SET failed_at = now() - interval '3 days' WHERE id = {}",
        ids[0]
    ))
    .execute(&mut conn)
    .unwrap();
    diesel::sql_query(format!(
        "UPDATE failed_jobs SET failed_at = now() - interval '2 days' WHERE id = {}",
        ids[1]
    ))
    .execute(&mut conn)
    .unwrap();

    let all = failed_jobs::list(&mut conn, &Filter::default()).unwrap();
    let order: Vec<i64> = all.iter().map(|j| j.id).collect();
    assert_eq!(order, vec![ids[3], ids[2], ids[1], ids[0]], "newest first");

    let audit = failed_jobs::list(
        &mut conn,
        &Filter {
            listener: Some("audit".into()),
            ..Filter::default()
        },
    )
    .unwrap();
    assert_eq!(audit.len(), 3);
    let backups = failed_jobs::list(
        &mut conn,
        &Filter {
            event_type: Some("backup.failed".into()),
            limit: Some(1),
            ..Filter::default()
        },
    )
    .unwrap();
    assert_eq!(backups.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ids[2]]);
    let window = failed_jobs::list(
        &mut conn,
        &Filter {
            since: Some(Utc::now() - Days::days(4)),
            until: Some(Utc::now() - Days::days(1)),
            ..Filter::default()
        },
    )
    .unwrap();
    assert_eq!(
        window.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![ids[1], ids[0]]
    );
    assert!(
        failed_jobs::list(
            &mut conn,
            &Filter {
                limit: Some(0),
                ..Filter::default()
            }
        )
        .is_err()
    );

    assert!(failed_jobs::forget(&mut conn, ids[3]).unwrap());
    assert!(!failed_jobs::forget(&mut conn, ids[3]).unwrap());
    assert_eq!(
        failed_jobs::prune(&mut conn, 60.0).unwrap(),
        1,
        "the 3-day-old one"
    );
    assert_eq!(
        failed_jobs::flush(&mut conn, Some(24.0)).unwrap(),
        1,
        "the 2-day-old one"
    );
    assert!(failed_jobs::prune(&mut conn, -1.0).is_err());
    assert_eq!(failed_jobs::flush(&mut conn, None).unwrap(), 1);
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
}

/// Deletes the test's queues when dropped, even when the test panics.
struct DeletedOnDrop(Vec<String>);

impl Drop for DeletedOnDrop {
    fn drop(&mut self) {
        outbox::testing::delete_broker_objects(outbox::DEFAULT_AMQP_URL, &self.0, &[]);
    }
}

/// A failed job of `listener` at `queue` for the recorded tick `event_id`
/// of counter `aggregate`, whose message says it occurred at `time`.
fn failed_tick(
    conn: &mut diesel::PgConnection,
    queue: &str,
    listener: &str,
    (aggregate, n, event_id): &(String, i64, Uuid),
    time: chrono::DateTime<Utc>,
) -> i64 {
    let payload = json!({
        "specversion": "1.0", "id": event_id, "type": "counter.ticked", "source": "/outbox/test",
        "subject": aggregate, "aggregatetype": "counter", "time": time,
        "datacontenttype": "application/json", "data": {"aggregate": aggregate, "n": n},
    });
    let (id, inserted) = failed_jobs::insert(
        conn,
        &NewFailedJob {
            queue,
            listener,
            event_type: Some("counter.ticked"),
            ..job(listener, Some(*event_id), None, &payload, &[])
        },
    )
    .unwrap();
    assert!(inserted);
    id
}

/// Whether each aggregate's ticks in `arrived` come in increasing order.
fn in_order_per_aggregate(arrived: &[(String, i64)]) -> bool {
    let mut last: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    arrived.iter().all(|(aggregate, n)| {
        let before = last.insert(aggregate, *n);
        before.is_none_or(|before| before < *n)
    })
}

/// The issue-27 bug: `failed retry --all` retried newest first, so an
/// aggregate's later event reached its listener before the earlier one.
/// Now a bulk retry orders each aggregate's jobs by the event's position
/// in the outbox, not by the order the jobs are named, listed or failed
/// in, nor by the time the event claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_retry_hands_each_aggregates_events_back_oldest_first() {
    let (_db, mut conn) = database();
    let pool = _db.pool(2).unwrap();
    // Four ticks of three counters, interleaved: seq order is tick order.
    let mut ticks = Vec::new();
    for n in 0..4 {
        for aggregate in ["a", "b", "c"] {
            let ids = outbox::testing::record_ticks(&mut conn, aggregate, n..n + 1).unwrap();
            ticks.push((aggregate.to_owned(), n, ids[0]));
        }
    }
    let prefix = format!("{}{}", outbox::testing::TEST_AMQP_PREFIX, Uuid::now_v7().simple());
    let (first, second) = (format!("{prefix}.first"), format!("{prefix}.second"));
    let _cleanup = DeletedOnDrop(vec![first.clone(), second.clone()]);
    let connection = outbox::amqp::connect(outbox::DEFAULT_AMQP_URL, "outbox tests")
        .await
        .unwrap();
    let channel = outbox::amqp::open_channel(&connection, true).await.unwrap();
    for queue in [&first, &second] {
        let mut arguments = lapin::types::FieldTable::default();
        arguments.insert("x-expires".into(), lapin::types::AMQPValue::LongInt(120_000));
        channel
            .queue_declare(queue.as_str().into(), Default::default(), arguments)
            .await
            .unwrap();
    }
    // The jobs fail newest event first (so ids and failed_at run against
    // the events' order), and each message claims an earlier time than
    // the one before it: only the position tells the order.
    let start = Utc::now();
    let mut first_ids = Vec::new();
    for (back, tick) in ticks.iter().rev().enumerate() {
        let claimed = start - Days::seconds(100 - back as i64);
        first_ids.push(failed_tick(&mut conn, &first, "first", tick, claimed));
        failed_tick(&mut conn, &second, "second", tick, claimed);
    }

    // Named ids, in an order of their own (newest job first, as listed).
    first_ids.reverse();
    first_ids.rotate_left(5);
    let outcome = failed_jobs::retry_many(&pool, &channel, &first_ids, std::time::Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(outcome.retried.len(), ticks.len(), "{outcome:?}");
    assert!(
        outcome.kept.is_empty() && outcome.missing.is_empty(),
        "{outcome:?}"
    );
    let arrived =
        outbox::testing::take_ticks(&channel, &first, ticks.len(), std::time::Duration::from_secs(20)).await;
    assert!(
        in_order_per_aggregate(&arrived),
        "retry_many reordered an aggregate: {arrived:?}"
    );

    // Everything a filter matches (the dashboard's "retry all matching").
    let outcome = failed_jobs::retry_matching(
        &pool,
        &channel,
        &Filter {
            listener: Some("second".into()),
            ..Filter::default()
        },
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(outcome.retried.len(), ticks.len(), "{outcome:?}");
    let arrived =
        outbox::testing::take_ticks(&channel, &second, ticks.len(), std::time::Duration::from_secs(20)).await;
    assert!(
        in_order_per_aggregate(&arrived),
        "retry_matching reordered an aggregate: {arrived:?}"
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);

    // A job whose event is gone from the outbox (pruned, no log) goes
    // before the aggregate's events still there, then by its time.
    diesel::sql_query(format!(
        "DELETE FROM outbox_events WHERE event_id = '{}'",
        ticks[0].2
    ))
    .execute(&mut conn)
    .unwrap();
    let mut ids = Vec::new();
    for tick in ticks.iter().filter(|(aggregate, _, _)| aggregate == "a").rev() {
        ids.push(failed_tick(&mut conn, &first, "first", tick, start));
    }
    let outcome = failed_jobs::retry_many(&pool, &channel, &ids, std::time::Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(outcome.retried.len(), 4, "{outcome:?}");
    let arrived = outbox::testing::take_ticks(&channel, &first, 4, std::time::Duration::from_secs(20)).await;
    assert_eq!(
        arrived.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        vec![0, 1, 2, 3],
        "{arrived:?}"
    );
    let _ = connection.close(200, "done".into()).await;
}
