//! A worker running as a RabbitMQ user limited to its own queues (the
//! permissions `docs/operating.md`'s "Least privilege and TLS" lists): it
//! consumes, retries and dead-letters as usual, but the broker refuses its
//! publishing to the events exchange (ACCESS_REFUSED).

use std::time::Duration;

use diesel::RunQueryDsl;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use outbox::Registry;
use outbox::consumer::ListenerError;
use outbox::failed_jobs::{self, Filter};
use outbox::testing::{TestBrokerUser, TestRoles, literal};
use serde_json::json;
use uuid::Uuid;

use crate::broker::{TestBroker, TestEvent};
use crate::harness::{Running, Scripted, database, effect, eventually, fast};
use crate::support::count;

const LIMIT: Duration = Duration::from_secs(30);

async fn worker_with_own_queues_only(declare_topology: bool) {
    let (db, mut conn) = database();
    // Postgres: the worker role of docs/least-privilege.sql, plus its
    // listener's table.
    let mut roles = TestRoles::new(db);
    let password = Uuid::now_v7().simple().to_string();
    let worker_role = roles.apply_least_privilege(&password).unwrap().worker;
    diesel::sql_query(format!("GRANT SELECT, INSERT ON effects TO \"{worker_role}\""))
        .execute(&mut conn)
        .unwrap();
    let database_url = roles.url_as(&worker_role, &password).unwrap();
    let mut broker = TestBroker::new().await;
    let app = literal(&broker.app);
    let exchange = literal(&broker.exchange);
    // The worker's queues are `<app>.<listener>`, `.retry.<delay>` and
    // `.dead`. Retry and dead-letter copies go through the default
    // exchange (write on amq.default). Declaring its topology itself also
    // needs configure on its queues and the exchange, write on its queues
    // and read on the exchange (queue.bind); never write on the exchange.
    let user = if declare_topology {
        TestBrokerUser::create(
            &format!("^({app}\\..*|{exchange})$"),
            &format!("^(amq\\.default|{app}\\..*)$"),
            &format!("^({app}\\..*|{exchange})$"),
        )
    } else {
        TestBrokerUser::create("^$", "^amq\\.default$", &format!("^{app}\\..*$"))
    }
    .unwrap();
    let listener = Scripted::new("audit", |event, ctx, before| {
        match event.data_value()["case"].as_str() {
            Some("retry_once") if before == 0 => Err(ListenerError::transient("first try fails")),
            Some("fail") => Err(ListenerError::permanent("never works")),
            _ => effect(ctx, "audit", event),
        }
    });
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(3, &[50]))
        .unwrap();
    let url = user.url();
    let worker = Running::start_with(roles.db(), &mut broker, &registry, |config| {
        config.database_url = database_url.clone();
        config.amqp_url = url;
        config.declare_topology = declare_topology;
    })
    .await;
    let queues = worker.queue("audit").clone();
    let events: Vec<_> = ["ok", "retry_once", "fail"]
        .iter()
        .map(|case| TestEvent::new("widget.created", json!({ "case": case })))
        .collect();
    for event in &events {
        broker.publish_event(event).await;
    }
    let effects = || {
        count(
            &mut roles.db().connect().unwrap(),
            "SELECT count(*) AS n FROM effects",
        )
    };
    eventually("two effects (one after a retry)", LIMIT, || effects() == 2).await;
    broker.wait_ready(&queues.dead, 1, LIMIT).await;
    assert!(worker.health.is_healthy());
    worker.stop().await;
    assert_eq!(
        listener.calls_for(events[1].event_id).len(),
        2,
        "retried through its retry queue"
    );
    let jobs = failed_jobs::list(&mut conn, &Filter::default()).unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].event_id, Some(events[2].event_id));
    let mut as_worker = outbox::connect(&database_url).unwrap();
    for sql in ["SELECT 1 FROM outbox_events", "DELETE FROM failed_jobs"] {
        let error = diesel::sql_query(sql)
            .execute(&mut as_worker)
            .expect_err(sql)
            .to_string();
        assert!(error.contains("permission denied"), "{sql}: {error}");
    }

    // The same user publishing to the events exchange is refused.
    let connection = outbox::amqp::connect(&user.url(), "least privilege probe")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let refused = tokio::time::timeout(LIMIT, async {
        let (body, properties) = TestEvent::new("widget.created", json!({})).encode();
        channel
            .basic_publish(
                broker.exchange.as_str().into(),
                "widget.created".into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?
            .await
    })
    .await
    .expect("the broker answers within the limit");
    let error = format!(
        "{:?}",
        refused.expect_err("publishing to the events exchange must be refused")
    );
    assert!(error.contains("ACCESS_REFUSED"), "{error}");
    assert!(error.contains(&broker.exchange), "{error}");
    if !declare_topology {
        // Nor may it declare anything.
        let channel = connection.create_channel().await.unwrap();
        let error = outbox::amqp::declare_exchange(&channel, &broker.exchange)
            .await
            .expect_err("declaring is refused");
        assert!(format!("{error:?}").contains("ACCESS_REFUSED"), "{error:?}");
    }
    let _ = connection.close(200, "done".into()).await;
    // Nothing the probe tried reached the queue.
    assert_eq!(broker.ready(&queues.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_privilege_worker_declaring_its_topology_cannot_publish_to_the_exchange() {
    worker_with_own_queues_only(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_privilege_worker_with_topology_declared_by_a_deploy_step_needs_less() {
    worker_with_own_queues_only(false).await;
}
