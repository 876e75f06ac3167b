//! Upcasting end to end: payloads recorded at an old schema version reach a
//! listener written for the current one, through the relay and again
//! through `outbox replay`; a payload newer than the worker knows is a
//! failed job with a clear reason.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::prelude::*;
use outbox::consumer::{HandlerContext, ListenerError, ListenerOptions, QueuedListener, ReceivedEvent};
use outbox::replay::ReplayFilter;
use outbox::{DomainEvent, Registry, TestDatabase};
use serde::{Deserialize, Serialize};

use crate::broker::TestBroker;
use crate::harness::{RelayRunning, Running, eventually};

const LIMIT: Duration = Duration::from_secs(30);

/// `user.registered` as different releases of a service recorded it.
#[derive(Serialize)]
struct Registered {
    #[serde(skip)]
    version: i32,
    #[serde(skip)]
    user_id: i64,
    #[serde(flatten)]
    payload: serde_json::Value,
}

impl DomainEvent for Registered {
    fn event_type(&self) -> &'static str {
        "user.registered"
    }
    fn aggregate_type(&self) -> &'static str {
        "user"
    }
    fn aggregate_id(&self) -> String {
        self.user_id.to_string()
    }
    fn schema_version(&self) -> i32 {
        self.version
    }
}

/// The current shape (v3).
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct RegisteredV3 {
    first: String,
    last: String,
    email: Option<String>,
}

#[derive(Clone, Default)]
struct Greeter {
    seen: Arc<Mutex<Vec<(i32, RegisteredV3)>>>,
}

impl QueuedListener for Greeter {
    fn name(&self) -> &str {
        "greeter"
    }
    // No effect in the database, so no inbox: a replay reaches it again.
    fn options(&self) -> ListenerOptions {
        ListenerOptions {
            inbox: false,
            ..ListenerOptions::default()
        }
    }
    fn handle(&self, event: &ReceivedEvent, _ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        let user: RegisteredV3 = event.data_as()?;
        self.seen.lock().unwrap().push((event.schema_version, user));
        Ok(())
    }
}

fn registry(greeter: &Greeter) -> Registry {
    Registry::new()
        .queued_listener(&["user.registered"], greeter.clone())
        .unwrap()
        // Registered out of order on purpose: the chain runs by version.
        .upcaster("user.registered", 2, |mut v| {
            v["email"] = serde_json::Value::Null;
            Ok(v)
        })
        .unwrap()
        .upcaster("user.registered", 1, |v| {
            let name = v["name"].as_str().ok_or("v1 payload without a name")?;
            let (first, last) = name.split_once(' ').unwrap_or((name, ""));
            Ok(serde_json::json!({"first": first, "last": last}))
        })
        .unwrap()
}

fn record(conn: &mut PgConnection, user_id: i64, version: i32, payload: serde_json::Value) {
    conn.transaction::<_, outbox::Error, _>(|conn| {
        outbox::record(
            conn,
            &Registered {
                version,
                user_id,
                payload,
            },
        )
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_payloads_reach_the_listener_in_the_current_shape_live_and_in_replay() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let mut broker = TestBroker::new().await;
    // Stored before the listener's release: a v1, a v2 and a current v3.
    record(&mut conn, 1, 1, serde_json::json!({"name": "Ada Lovelace"}));
    record(
        &mut conn,
        2,
        2,
        serde_json::json!({"first": "Alan", "last": "Turing"}),
    );
    record(
        &mut conn,
        3,
        3,
        serde_json::json!({"first": "Grace", "last": "Hopper", "email": "grace@example.com"}),
    );
    // From a newer release than this worker knows.
    record(&mut conn, 4, 4, serde_json::json!({"given": "Edsger"}));
    let greeter = Greeter::default();
    let worker = Running::start(&db, &mut broker, &registry(&greeter)).await;
    let relay = RelayRunning::start(&db, &broker);

    let expected = vec![
        (
            3,
            RegisteredV3 {
                first: "Ada".into(),
                last: "Lovelace".into(),
                email: None,
            },
        ),
        (
            3,
            RegisteredV3 {
                first: "Alan".into(),
                last: "Turing".into(),
                email: None,
            },
        ),
        (
            3,
            RegisteredV3 {
                first: "Grace".into(),
                last: "Hopper".into(),
                email: Some("grace@example.com".into()),
            },
        ),
    ];
    eventually("the three known versions handled", LIMIT, || {
        greeter.seen.lock().unwrap().len() >= 3
    })
    .await;
    eventually("the v4 event a failed job", LIMIT, || {
        outbox::testing::count(
            &mut conn,
            "SELECT count(*) AS n FROM failed_jobs WHERE listener = 'greeter'",
        ) == 1
    })
    .await;
    let mut seen = greeter.seen.lock().unwrap().clone();
    seen.sort_by(|a, b| a.1.first.cmp(&b.1.first));
    assert_eq!(seen, expected);
    let (exception, attempts): (String, i32) =
        diesel::sql_query("SELECT exception, attempts FROM failed_jobs WHERE listener = 'greeter'")
            .get_result::<FailedRow>(&mut conn)
            .map(|row| (row.exception, row.attempts))
            .unwrap();
    assert!(
        exception.contains("user.registered schema version 4 is newer than this reader knows (version 3)"),
        "{exception}"
    );
    assert_eq!(attempts, 1, "permanent: not retried");

    // `outbox replay` of the stored events: the v1 row comes back as v3.
    // Replayable once the relay has marked it published.
    let replayable = |conn: &mut PgConnection| {
        outbox::replay::select(
            conn,
            &ReplayFilter {
                aggregate_id: Some("1".into()),
                limit: 10,
                ..ReplayFilter::default()
            },
        )
        .unwrap()
    };
    eventually("the v1 event published", LIMIT, || {
        !replayable(&mut conn).is_empty()
    })
    .await;
    let stored = replayable(&mut conn);
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].schema_version, 1, "stored as recorded");
    let queue = worker.queue("greeter").queue.clone();
    outbox::replay::publish_to_queue(
        &broker.channel,
        &queue,
        &stored,
        "/test",
        None,
        "test",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    eventually("the replayed v1 event handled", LIMIT, || {
        greeter.seen.lock().unwrap().len() >= 4
    })
    .await;
    assert_eq!(greeter.seen.lock().unwrap()[3], expected[0]);

    relay.stop().await;
    worker.stop().await;
}

#[derive(QueryableByName)]
struct FailedRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    exception: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    attempts: i32,
}
