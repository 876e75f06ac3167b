//! The queries behind `outbox status` and `outbox replay`.

use chrono::{Duration as Span, Utc};
use diesel::RunQueryDsl;
use outbox::TestDatabase;
use outbox::replay::{self, ReplayFilter};

use crate::support::record_ticks;

/// A failed row waits for an operator and has its own gauge and alert:
/// the backlog age (`outbox_oldest_unpublished_age_seconds`, `outbox
/// status`) is the oldest row still moving, so one failed row an hour old
/// does not keep OutboxBacklogTooOld firing (issue 27).
#[test]
fn the_backlog_age_leaves_failed_rows_out() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "a", 0..2);
    diesel::sql_query(
        "UPDATE outbox_events SET recorded_at = now() - interval '1 hour', failed_at = now()
         WHERE seq = (SELECT min(seq) FROM outbox_events)",
    )
    .execute(&mut conn)
    .unwrap();
    diesel::sql_query(
        "UPDATE outbox_events SET recorded_at = now() - interval '10 seconds'
         WHERE seq = (SELECT max(seq) FROM outbox_events)",
    )
    .execute(&mut conn)
    .unwrap();
    let stats = outbox::relay::store::backlog_stats(&mut conn).unwrap();
    assert_eq!((stats.backlog, stats.failed), (2, 1));
    assert!(
        (9.0..600.0).contains(&stats.oldest_unpublished_age_seconds),
        "the failed row's hour is not the backlog's age: {}",
        stats.oldest_unpublished_age_seconds
    );
    diesel::sql_query("UPDATE outbox_events SET failed_at = now()")
        .execute(&mut conn)
        .unwrap();
    let stats = outbox::relay::store::backlog_stats(&mut conn).unwrap();
    assert_eq!(stats.failed, 2);
    assert_eq!(stats.oldest_unpublished_age_seconds, 0.0, "only failed rows wait");
}

#[test]
fn backlog_by_event_type_and_pause_reason() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    assert!(
        outbox::relay::store::backlog_by_event_type(&mut conn)
            .unwrap()
            .is_empty()
    );
    assert_eq!(outbox::control::paused_by(&mut conn).unwrap(), None);
    record_ticks(&mut conn, "a", 0..3);
    diesel::sql_query("UPDATE outbox_events SET event_type = 'other.thing', failed_at = now() WHERE seq = (SELECT max(seq) FROM outbox_events)")
        .execute(&mut conn)
        .unwrap();
    let backlog = outbox::relay::store::backlog_by_event_type(&mut conn).unwrap();
    let summary: Vec<(&str, i64, i64)> = backlog
        .iter()
        .map(|b| (b.event_type.as_str(), b.backlog, b.failed))
        .collect();
    assert_eq!(summary, vec![("counter.ticked", 2, 0), ("other.thing", 1, 1)]);
    assert!(backlog[0].oldest_unpublished_age_seconds >= 0.0);
    outbox::control::pause(&mut conn, Some("incident 9")).unwrap();
    assert_eq!(
        outbox::control::paused_by(&mut conn).unwrap().as_deref(),
        Some("incident 9")
    );
    outbox::control::resume(&mut conn).unwrap();
    assert_eq!(outbox::control::paused_by(&mut conn).unwrap(), None);
}

#[test]
fn replay_selects_published_rows_by_type_aggregate_and_time() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let a = record_ticks(&mut conn, "a", 0..3);
    let b = record_ticks(&mut conn, "b", 0..2);
    let late = record_ticks(&mut conn, "a", 3..4);
    diesel::sql_query(format!(
        "UPDATE outbox_events SET published_at = now() WHERE event_id <> '{}'",
        late[0]
    ))
    .execute(&mut conn)
    .unwrap();
    diesel::sql_query(format!(
        "UPDATE outbox_events SET recorded_at = now() - interval '2 hours' WHERE event_id = '{}'",
        a[0]
    ))
    .execute(&mut conn)
    .unwrap();
    let ids = |filter: ReplayFilter| -> Vec<uuid::Uuid> {
        replay::select(&mut db.connect().unwrap(), &filter)
            .unwrap()
            .into_iter()
            .map(|e| e.event_id)
            .collect()
    };
    let all = ReplayFilter {
        limit: 100,
        ..ReplayFilter::default()
    };
    assert_eq!(
        ids(all.clone()),
        [a.clone(), b.clone()].concat(),
        "published only, in seq order"
    );
    assert_eq!(
        ids(ReplayFilter {
            aggregate_id: Some("a".into()),
            ..all.clone()
        }),
        a
    );
    assert_eq!(
        ids(ReplayFilter {
            since: Some(Utc::now() - Span::hours(1)),
            ..all.clone()
        }),
        [&a[1..], &b[..]].concat()
    );
    assert_eq!(
        ids(ReplayFilter {
            until: Some(Utc::now() - Span::hours(1)),
            ..all.clone()
        }),
        vec![a[0]]
    );
    assert!(
        ids(ReplayFilter {
            event_type: Some("site.created".into()),
            ..all.clone()
        })
        .is_empty()
    );
    assert_eq!(
        ids(ReplayFilter {
            limit: 2,
            ..all.clone()
        })
        .len(),
        2
    );
    assert!(replay::select(&mut conn, &ReplayFilter { limit: 0, ..all }).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_reads_ready_messages_and_reports_missing_queues() {
    use lapin::options::{
        BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    let connection = outbox::amqp::connect(outbox::DEFAULT_AMQP_URL, "outbox test")
        .await
        .unwrap();
    let queue = format!(
        "{}{}.depth",
        outbox::testing::TEST_AMQP_PREFIX,
        uuid::Uuid::now_v7().simple()
    );
    assert_eq!(
        outbox::amqp::queue_depth(&connection, &queue).await.unwrap(),
        None
    );
    let channel = connection.create_channel().await.unwrap();
    // Gone by itself a minute after its last use, should the test panic.
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), arguments)
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for _ in 0..2 {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"{}",
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    assert_eq!(
        outbox::amqp::queue_depth(&connection, &queue).await.unwrap(),
        Some(2)
    );
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = connection.close(200, "bye".into()).await;
}
