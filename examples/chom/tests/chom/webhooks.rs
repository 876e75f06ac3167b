//! `chom work` with webhooks: an outside receiver subscribed to `site.*`
//! gets every site event of a lifecycle, signed (checked with the
//! `standardwebhooks` crate), and no backup event.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use chom::services::{backups, sites};
use outbox::Metadata;
use outbox::webhooks::{NewEndpoint, OutboundPolicy, WebhookConfig};

use crate::pipeline::{Background, Pipeline, stopped, wait_for_consumers};
use crate::support::tenant_with_user;

type Got = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_gets_the_site_events_it_asked_for_signed_and_only_those() {
    let mut p = Pipeline::start(false).await;
    let got: Got = Arc::default();
    let sink = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/chom",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let sink = Arc::clone(&sink);
            async move {
                sink.lock().unwrap().push((headers, body.to_vec()));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let policy = OutboundPolicy::allowing("127.0.0.1").unwrap();
    let (_, secret) = outbox::webhooks::add(
        &mut p.conn,
        &NewEndpoint {
            url: format!("http://{address}/chom"),
            description: "site dashboard of a partner".into(),
            event_types: vec!["site.*".into()],
            oauth: None,
            ..NewEndpoint::default()
        },
        &policy,
    )
    .unwrap();
    let mut config = p.work_config();
    config.webhooks = Some(WebhookConfig {
        policy: Arc::new(policy),
        backoff: vec![Duration::from_millis(100)],
        ..WebhookConfig::default()
    });
    let registry = chom::work::registry(&config).unwrap();
    let queues = outbox::consumer::topology::plan(&config.app, &registry).unwrap();
    let names: Vec<String> = queues
        .iter()
        .flat_map(|q| q.all_queues())
        .map(str::to_owned)
        .collect();
    let _cleanup = Cleanup(names);
    let worker = chom::work::worker(&config).unwrap();
    worker.declare_topology().await.unwrap();
    let running = Background::spawn(move |rx| async move { worker.run(stopped(rx)).await });
    for queue in &queues {
        wait_for_consumers(&queue.queue, 1).await;
    }

    let (tenant, _) = tenant_with_user(&mut p.conn, "Partner Co");
    let site = sites::create_site(
        &p.outbox,
        &mut p.conn,
        Metadata::system(),
        tenant.id,
        "partner.test",
    )
    .unwrap()
    .value;
    sites::provision_site(&p.outbox, &mut p.conn, Metadata::system(), site.id, Ok(())).unwrap();
    backups::create_backup(&p.outbox, &mut p.conn, Metadata::system(), site.id).unwrap();
    sites::delete_site(&p.outbox, &mut p.conn, Metadata::system(), site.id).unwrap();
    let expected = outbox::testing::count(
        &mut p.conn,
        "SELECT count(*) AS n FROM outbox_events WHERE event_type LIKE 'site.%'",
    );
    assert!(expected >= 3, "created, provisioned, deleted");
    outbox::testing::eventually("every site event delivered", Duration::from_secs(30), || {
        got.lock().unwrap().len() as i64 >= expected
    })
    .await;
    let verifier = standardwebhooks::Webhook::new(secret.expose()).unwrap();
    let seen = got.lock().unwrap().clone();
    let mut types: Vec<String> = Vec::new();
    for (headers, body) in &seen {
        verifier.verify(body, headers).expect("the signature verifies");
        let document: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            headers["webhook-id"].to_str().unwrap(),
            document["id"].as_str().unwrap()
        );
        types.push(document["type"].as_str().unwrap().to_owned());
    }
    types.sort();
    assert_eq!(
        types,
        vec!["site.created", "site.deleted", "site.provisioned"],
        "the site events, once each, no backup event"
    );
    running.stop().await;
    p.stop().await;
}

/// Deletes the webhook listeners' queues (the pipeline deletes CHOM's own).
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        outbox::testing::delete_broker_objects(&crate::pipeline::amqp_url(), &self.0, &[]);
    }
}
