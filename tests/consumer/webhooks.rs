//! Webhooks end to end: events recorded in Postgres, relayed, fanned out
//! by the worker, delivered over HTTP to receivers on loopback that check
//! each signature with the `standardwebhooks` crate (an implementation
//! independent of ours), and what happens when receivers fail.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use diesel::prelude::*;
use outbox::webhooks::{self, NewEndpoint, OAuthSettings, OutboundPolicy, Secret, WebhookConfig};
use outbox::{DomainEvent, Registry, TestDatabase};
use serde::Serialize;

use crate::broker::TestBroker;
use crate::harness::{RelayRunning, Running, eventually};

const TYPES: [&str; 3] = ["site.created", "site.deleted", "backup.failed"];
const LIMIT: Duration = Duration::from_secs(30);

#[derive(Serialize)]
struct Happened {
    #[serde(skip)]
    kind: &'static str,
    site_id: i64,
}

impl DomainEvent for Happened {
    fn event_type(&self) -> &'static str {
        self.kind
    }
    fn aggregate_type(&self) -> &'static str {
        "site"
    }
    fn aggregate_id(&self) -> String {
        self.site_id.to_string()
    }
}

fn record(conn: &mut PgConnection, kind: &'static str, site_id: i64) -> uuid::Uuid {
    conn.transaction::<_, outbox::Error, _>(|conn| outbox::record(conn, &Happened { kind, site_id }))
        .unwrap()
}

/// How a receiver answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Ok,
    Fail,
    Hang,
    /// 200 after 300 ms (slow, within the timeout).
    Slow,
    /// 401 to the first token issued (`tok-1`, as if revoked), 200 to others.
    RevokedFirstToken,
    /// 410 Gone.
    Gone,
    /// 429 with `Retry-After: 2` to the first request, 204 after.
    TooManyFirst,
    /// 503 with `Retry-After` an HTTP date 3 s ahead to the first request,
    /// 204 after.
    UnavailableFirst,
}

#[derive(Clone, Debug)]
struct Received {
    headers: HeaderMap,
    body: Vec<u8>,
    at: Instant,
}

#[derive(Clone)]
struct Receiver {
    mode: Mode,
    got: Arc<Mutex<Vec<Received>>>,
}

async fn receive(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let first = {
        let mut got = receiver.got.lock().unwrap();
        got.push(Received {
            headers: headers.clone(),
            body: body.to_vec(),
            at: Instant::now(),
        });
        got.len() == 1
    };
    match receiver.mode {
        Mode::TooManyFirst if first => {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "2".to_owned())]).into_response()
        }
        Mode::UnavailableFirst if first => {
            let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3));
            (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", date)]).into_response()
        }
        mode => answer(mode, &headers).await.into_response(),
    }
}

async fn answer(mode: Mode, headers: &HeaderMap) -> StatusCode {
    match mode {
        Mode::Gone => StatusCode::GONE,
        Mode::TooManyFirst | Mode::UnavailableFirst => StatusCode::NO_CONTENT,
        Mode::Ok => StatusCode::NO_CONTENT,
        Mode::Fail => StatusCode::INTERNAL_SERVER_ERROR,
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            StatusCode::OK
        }
        Mode::Slow => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            StatusCode::OK
        }
        Mode::RevokedFirstToken => {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if auth.starts_with("Bearer ") && auth != "Bearer tok-1" {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            }
        }
    }
}

/// An HTTP receiver on a free loopback port.
async fn receiver(mode: Mode) -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route("/hook", post(receive))
        .with_state(Receiver {
            mode,
            got: Arc::clone(&got),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, got)
}

/// A token server counting its requests; `tok-1`, `tok-2`, ... for the
/// client secret `right-secret`, 401 otherwise.
async fn token_server() -> (SocketAddr, Arc<Mutex<u32>>) {
    token_server_answering_after(Duration::ZERO).await
}

/// [`token_server`] answering each request after `delay`.
async fn token_server_answering_after(delay: Duration) -> (SocketAddr, Arc<Mutex<u32>>) {
    let issued = Arc::new(Mutex::new(0u32));
    let counter = Arc::clone(&issued);
    let app = axum::Router::new().route(
        "/token",
        post(move |headers: HeaderMap| {
            let counter = Arc::clone(&counter);
            async move {
                use base64::Engine;
                tokio::time::sleep(delay).await;
                let expected = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode("client-1:right-secret")
                );
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
                    return (
                        StatusCode::UNAUTHORIZED,
                        String::from("{\"error\":\"invalid_client\"}"),
                    );
                }
                let mut n = counter.lock().unwrap();
                *n += 1;
                (
                    StatusCode::OK,
                    format!("{{\"access_token\":\"tok-{n}\",\"token_type\":\"Bearer\",\"expires_in\":3600}}"),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, issued)
}

/// A database, a broker, a worker running the webhook listeners and a
/// relay.
struct Rig {
    /// Kept for their drop: the database and the queues go with the rig.
    _db: TestDatabase,
    conn: PgConnection,
    _broker: TestBroker,
    worker: Option<Running>,
    relay: Option<RelayRunning>,
    policy: OutboundPolicy,
}

impl Rig {
    async fn start(config: WebhookConfig) -> Self {
        let db = TestDatabase::create().unwrap();
        let conn = db.connect().unwrap();
        let mut broker = TestBroker::new().await;
        let policy = (*config.policy).clone();
        let registry = webhooks::register(Registry::new(), &TYPES, config).unwrap();
        let worker = Running::start(&db, &mut broker, &registry).await;
        let relay = RelayRunning::start(&db, &broker);
        Self {
            _db: db,
            conn,
            _broker: broker,
            worker: Some(worker),
            relay: Some(relay),
            policy,
        }
    }

    fn add(&mut self, url: &str, types: &[&str], oauth: Option<OAuthSettings>) -> (i64, Secret) {
        self.add_endpoint(NewEndpoint {
            url: url.to_owned(),
            description: "test receiver".into(),
            event_types: types.iter().map(|t| (*t).to_owned()).collect(),
            oauth,
            ..NewEndpoint::default()
        })
    }

    fn add_endpoint(&mut self, new: NewEndpoint) -> (i64, Secret) {
        let (endpoint, secret) = webhooks::add(&mut self.conn, &new, &self.policy).unwrap();
        (endpoint.id, secret)
    }

    async fn stop(mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop().await;
        }
        if let Some(relay) = self.relay.take() {
            relay.stop().await;
        }
    }
}

fn local() -> WebhookConfig {
    WebhookConfig {
        policy: Arc::new(OutboundPolicy::allowing("127.0.0.1").unwrap()),
        tries: 3,
        backoff: vec![Duration::from_millis(100), Duration::from_millis(200)],
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(1),
        circuit_after_failures: 100,
        ..WebhookConfig::default()
    }
}

fn verify(secret: &Secret, received: &Received) -> bool {
    standardwebhooks::Webhook::new(secret.expose())
        .unwrap()
        .verify(&received.body, &received.headers)
        .is_ok()
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    outbox::testing::count(conn, sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_their_events_signed_and_rotation_signs_with_both() {
    let mut rig = Rig::start(local()).await;
    let (a_addr, a_got) = receiver(Mode::Ok).await;
    let (b_addr, b_got) = receiver(Mode::Ok).await;
    let (a, a_secret) = rig.add(&format!("http://{a_addr}/hook"), &["site.*"], None);
    let (_b, b_secret) = rig.add(&format!("http://{b_addr}/hook"), &["backup.failed"], None);
    let created = record(&mut rig.conn, "site.created", 1);
    let deleted = record(&mut rig.conn, "site.deleted", 1);
    let failed = record(&mut rig.conn, "backup.failed", 2);
    eventually("A gets both site events", LIMIT, || {
        a_got.lock().unwrap().len() >= 2
    })
    .await;
    eventually("B gets the backup event", LIMIT, || {
        !b_got.lock().unwrap().is_empty()
    })
    .await;
    let a_seen: Vec<Received> = a_got.lock().unwrap().clone();
    let b_seen: Vec<Received> = b_got.lock().unwrap().clone();
    assert_eq!(a_seen.len(), 2, "only the subscribed types");
    assert_eq!(b_seen.len(), 1);
    for (seen, secret) in a_seen
        .iter()
        .map(|r| (r, &a_secret))
        .chain(b_seen.iter().map(|r| (r, &b_secret)))
    {
        assert!(verify(secret, seen), "signature verifies");
        assert!(!verify(
            if std::ptr::eq(secret, &a_secret) {
                &b_secret
            } else {
                &a_secret
            },
            seen
        ));
        let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(
            seen.headers["webhook-id"].to_str().unwrap(),
            body["id"].as_str().unwrap(),
            "webhook-id is the event id"
        );
        assert_eq!(body["specversion"], "1.0");
        assert_eq!(seen.headers["content-type"], outbox::cloudevents::CONTENT_TYPE);
    }
    let ids: Vec<String> = a_seen
        .iter()
        .map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned())
        .collect();
    assert!(ids.contains(&created.to_string()) && ids.contains(&deleted.to_string()));
    assert_eq!(
        b_seen[0].headers["webhook-id"].to_str().unwrap(),
        failed.to_string()
    );

    // Rotation: both secrets sign while the old one overlaps (from the
    // next read of the endpoint, within ENDPOINT_CACHE).
    let new_secret = webhooks::rotate_secret(&mut rig.conn, a, Duration::from_secs(3600)).unwrap();
    let signed_by_both = |r: &Received| {
        r.headers["webhook-signature"]
            .to_str()
            .unwrap()
            .split(' ')
            .count()
            == 2
    };
    let conn = &mut rig.conn;
    let mut site = 100;
    eventually("a delivery signed with both secrets", LIMIT, || {
        if a_got.lock().unwrap().iter().any(signed_by_both) {
            return true;
        }
        site += 1;
        record(conn, "site.created", site);
        false
    })
    .await;
    let last = a_got
        .lock()
        .unwrap()
        .iter()
        .find(|r| signed_by_both(r))
        .cloned()
        .unwrap();
    assert!(
        verify(&a_secret, &last) && verify(&new_secret, &last),
        "old and new secrets both verify"
    );
    assert!(!format!("{:?}", webhooks::get(&mut rig.conn, a).unwrap()).contains(new_secret.expose()));
    assert!(
        count(
            &mut rig.conn,
            "SELECT count(*) AS n FROM webhook_deliveries WHERE delivered"
        ) >= 4
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_retry_fail_for_good_and_are_disabled_without_slowing_the_healthy() {
    let mut rig = Rig::start(WebhookConfig {
        disable_after_failures: 2,
        ..local()
    })
    .await;
    let (dead_addr, dead_got) = receiver(Mode::Fail).await;
    let (hang_addr, _) = receiver(Mode::Hang).await;
    let (ok_addr, ok_got) = receiver(Mode::Ok).await;
    let (dead, _) = rig.add(&format!("http://{dead_addr}/hook"), &["*"], None);
    let (hang, _) = rig.add(&format!("http://{hang_addr}/hook"), &["*"], None);
    rig.add(&format!("http://{ok_addr}/hook"), &["*"], None);
    let mut recorded = Vec::new();
    for i in 0..2 {
        recorded.push((Instant::now(), record(&mut rig.conn, "site.created", i)));
    }
    eventually("the healthy endpoint gets both", LIMIT, || {
        ok_got.lock().unwrap().len() >= 2
    })
    .await;
    // The healthy one's deliveries came while the others were failing.
    let worst = ok_got
        .lock()
        .unwrap()
        .iter()
        .zip(&recorded)
        .map(|(r, (at, _))| r.at.duration_since(*at))
        .max()
        .unwrap();
    assert!(
        worst < Duration::from_secs(3),
        "healthy delivery took {worst:?} beside dead endpoints"
    );
    let conn = &mut rig.conn;
    eventually("each dead delivery ends as a failed job", LIMIT, || {
        count(
            conn,
            "SELECT count(*) AS n FROM failed_jobs WHERE listener = 'webhook_delivery'",
        ) >= 4
    })
    .await;
    assert_eq!(
        dead_got.lock().unwrap().len(),
        6,
        "3 tries of each of 2 deliveries"
    );
    let job = outbox::failed_jobs::list(
        &mut rig.conn,
        &outbox::failed_jobs::Filter {
            listener: Some("webhook_delivery".into()),
            error_contains: Some("HTTP 500".into()),
            ..outbox::failed_jobs::Filter::default()
        },
    )
    .unwrap();
    assert_eq!(job.len(), 2);
    assert_eq!(job[0].errors.len(), 3, "every try in the history");
    let timed_out = count(
        &mut rig.conn,
        &format!(
            "SELECT count(*) AS n FROM webhook_deliveries WHERE endpoint_id = {hang} AND error LIKE '%timed out%'"
        ),
    );
    assert_eq!(timed_out, 6, "the hanging endpoint's tries time out");
    // Two deliveries failed in a row: both failing endpoints are disabled,
    // each with its event recorded.
    for id in [dead, hang] {
        let endpoint = webhooks::get(&mut rig.conn, id).unwrap().unwrap();
        assert!(!endpoint.is_active(), "endpoint {id} disabled");
    }
    assert_eq!(
        count(
            &mut rig.conn,
            "SELECT count(*) AS n FROM outbox_events WHERE event_type = 'webhook.endpoint_disabled'"
        ),
        2
    );
    assert_eq!(
        webhooks::failed_delivery_jobs(&mut rig.conn, dead).unwrap().len(),
        2,
        "the dead endpoint's failed deliveries, for `outbox webhooks retry`"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_tokens_are_cached_refreshed_after_a_401_and_a_bad_secret_fails_clearly() {
    let mut rig = Rig::start(local()).await;
    let (tokens_addr, issued) = token_server().await;
    let (addr, got) = receiver(Mode::RevokedFirstToken).await;
    let oauth = |secret: &str| OAuthSettings {
        token_url: format!("http://{tokens_addr}/token"),
        client_id: "client-1".into(),
        client_secret: Secret::new(secret),
        scope: Some("webhooks".into()),
    };
    rig.add(
        &format!("http://{addr}/hook"),
        &["site.created"],
        Some(oauth("right-secret")),
    );
    // The first delivery fetches tok-1, is refused, fetches tok-2 once.
    record(&mut rig.conn, "site.created", 0);
    let conn = &mut rig.conn;
    eventually("the first delivery accepted", LIMIT, || {
        count(
            conn,
            "SELECT count(*) AS n FROM webhook_deliveries WHERE delivered",
        ) >= 1
    })
    .await;
    assert_eq!(*issued.lock().unwrap(), 2, "a new token once after the 401");
    for i in 1..3 {
        record(&mut rig.conn, "site.created", i);
    }
    let conn = &mut rig.conn;
    eventually("three deliveries accepted", LIMIT, || {
        count(
            conn,
            "SELECT count(*) AS n FROM webhook_deliveries WHERE delivered",
        ) >= 3
    })
    .await;
    assert_eq!(
        *issued.lock().unwrap(),
        2,
        "the refreshed token cached for the next deliveries"
    );
    assert!(
        got.lock()
            .unwrap()
            .iter()
            .any(|r| r.headers["authorization"] == "Bearer tok-1")
    );

    let (bad_addr, bad_got) = receiver(Mode::Ok).await;
    let (bad, _) = rig.add(
        &format!("http://{bad_addr}/hook"),
        &["site.deleted"],
        Some(oauth("wrong-secret-xyz")),
    );
    record(&mut rig.conn, "site.deleted", 9);
    let conn = &mut rig.conn;
    eventually("the bad secret's delivery fails for good", LIMIT, || {
        count(conn, &format!("SELECT count(*) AS n FROM failed_jobs WHERE listener = 'webhook_delivery' AND payload->'data'->>'endpoint_id' = '{bad}'")) == 1
    })
    .await;
    assert!(bad_got.lock().unwrap().is_empty(), "nothing sent without a token");
    let texts = count(
        &mut rig.conn,
        "SELECT count(*) AS n FROM webhook_deliveries WHERE error LIKE '%refused client client-1: HTTP 401%'",
    );
    assert_eq!(texts, 3, "a clear error on each try");
    let leaked = count(
        &mut rig.conn,
        "SELECT count(*) AS n FROM (SELECT error AS t FROM webhook_deliveries UNION ALL SELECT exception FROM failed_jobs UNION ALL SELECT errors::text FROM failed_jobs) x WHERE t LIKE '%wrong-secret-xyz%'",
    );
    assert_eq!(leaked, 0, "the client secret is in no stored text");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_urls_are_refused_and_a_name_resolving_to_loopback_is_not_called() {
    let strict = OutboundPolicy::strict();
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    for url in [
        "http://example.com/hook",
        "https://127.0.0.1/hook",
        "https://10.0.0.8/x",
        "https://[::1]/x",
        "https://169.254.169.254/",
    ] {
        let refused = webhooks::add(
            &mut conn,
            &NewEndpoint {
                url: url.into(),
                description: String::new(),
                event_types: vec!["*".into()],
                oauth: None,
                ..NewEndpoint::default()
            },
            &strict,
        );
        assert!(refused.is_err(), "{url} refused");
    }
    drop(conn);
    drop(db);
    // `localhost` is a name: accepted when added, refused when it resolves
    // to 127.0.0.1 at delivery.
    let mut rig = Rig::start(WebhookConfig {
        policy: Arc::new(OutboundPolicy::strict()),
        ..local()
    })
    .await;
    let (addr, got) = receiver(Mode::Ok).await;
    let (id, _) = rig.add(
        &format!("https://localhost:{}/hook", addr.port()),
        &["site.created"],
        None,
    );
    record(&mut rig.conn, "site.created", 1);
    let conn = &mut rig.conn;
    eventually("the try is logged as refused", LIMIT, || {
        count(conn, &format!("SELECT count(*) AS n FROM webhook_deliveries WHERE endpoint_id = {id} AND error LIKE '%not a public address%'")) >= 1
    })
    .await;
    assert!(got.lock().unwrap().is_empty(), "no request reached the receiver");
    rig.stop().await;
}

/// A receiver that accepts each connection and closes it at once, counting
/// them.
async fn closing_receiver() -> (SocketAddr, Arc<Mutex<u32>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(0u32));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            *counter.lock().unwrap() += 1;
            drop(stream);
        }
    });
    (address, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connections_fail_slow_answers_succeed_and_replays_resend_the_same_ids() {
    let mut rig = Rig::start(local()).await;
    let (closing_addr, accepted) = closing_receiver().await;
    let (slow_addr, slow_got) = receiver(Mode::Slow).await;
    let (closing, _) = rig.add(&format!("http://{closing_addr}/hook"), &["site.created"], None);
    let (slow, slow_secret) = rig.add(&format!("http://{slow_addr}/hook"), &["site.created"], None);
    let first = record(&mut rig.conn, "site.created", 1);
    let second = record(&mut rig.conn, "site.created", 2);
    let conn = &mut rig.conn;
    eventually("the closed connections end as failed jobs", LIMIT, || {
        count(
            conn,
            &format!("SELECT count(*) AS n FROM failed_jobs WHERE listener = 'webhook_delivery' AND payload->'data'->>'endpoint_id' = '{closing}'"),
        ) == 2
    })
    .await;
    assert!(
        *accepted.lock().unwrap() >= 6,
        "3 tries of each delivery reached the receiver"
    );
    assert_eq!(
        count(
            &mut rig.conn,
            &format!(
                "SELECT count(*) AS n FROM webhook_deliveries WHERE endpoint_id = {closing} AND NOT delivered AND status_code IS NULL AND error IS NOT NULL"
            ),
        ),
        6,
        "each try logged with the connection error"
    );
    eventually("the slow receiver got both", LIMIT, || {
        slow_got.lock().unwrap().len() >= 2
    })
    .await;
    assert_eq!(
        count(
            &mut rig.conn,
            &format!(
                "SELECT count(*) AS n FROM webhook_deliveries WHERE endpoint_id = {slow} AND delivered AND duration_ms >= 300"
            ),
        ),
        2,
        "slow answers within the timeout are deliveries"
    );

    // Replay: the stored events again, with the same ids. The relay marks
    // rows published a moment after the confirm; wait for both marks.
    let conn = &mut rig.conn;
    eventually("both events marked published", LIMIT, || {
        count(conn, "SELECT count(*) AS n FROM outbox_events WHERE event_type = 'site.created' AND published_at IS NOT NULL") == 2
    })
    .await;
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    let replayed = webhooks::replay(&mut rig.conn, slow, since, 100, "/outbox/test").unwrap();
    assert_eq!(replayed, 2);
    eventually("the replayed deliveries arrive", LIMIT, || {
        slow_got.lock().unwrap().len() >= 4
    })
    .await;
    let seen = slow_got.lock().unwrap().clone();
    let ids: Vec<String> = seen
        .iter()
        .map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned())
        .collect();
    for id in [first, second] {
        assert_eq!(
            ids.iter().filter(|i| **i == id.to_string()).count(),
            2,
            "{id} sent twice, same id"
        );
    }
    assert!(seen.iter().all(|r| verify(&slow_secret, r)));
    assert!(webhooks::replay(&mut rig.conn, 999_999, since, 100, "/outbox/test").is_err());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_running_webhook_delivery_prunes_the_delivery_log_past_its_retention() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let mut broker = TestBroker::new().await;
    let registry = webhooks::register(Registry::new(), &TYPES, local()).unwrap();
    let (endpoint, _) = webhooks::add(
        &mut conn,
        &NewEndpoint {
            url: "http://127.0.0.1:9/hook".into(),
            description: "log only".into(),
            event_types: vec!["*".into()],
            oauth: None,
            ..NewEndpoint::default()
        },
        &OutboundPolicy::allowing("127.0.0.1").unwrap(),
    )
    .unwrap();
    // Three tries two days old, one from a minute ago.
    diesel::sql_query(format!(
        "INSERT INTO webhook_deliveries (endpoint_id, event_id, event_type, attempt, at, duration_ms, delivered)
         SELECT {}, gen_random_uuid(), 'site.created', 1, now() - make_interval(days => d), 1.0, true
         FROM unnest(ARRAY[2, 2, 2]) AS d
         UNION ALL SELECT {0}, gen_random_uuid(), 'site.created', 1, now() - interval '1 minute', 1.0, true",
        endpoint.id
    ))
    .execute(&mut conn)
    .unwrap();
    let worker = Running::start_with(&db, &mut broker, &registry, |config| {
        config.prune_interval = Some(Duration::from_millis(100));
        config.webhook_log_retention = Duration::from_secs(24 * 3600);
    })
    .await;
    eventually("the old tries pruned", LIMIT, || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM webhook_deliveries WHERE at < now() - interval '1 day'",
        ) == 0
    })
    .await;
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM webhook_deliveries"),
        1,
        "the recent try is kept"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_410_is_disabled_at_once_with_the_event_recorded() {
    let mut rig = Rig::start(local()).await;
    let (gone_addr, gone_got) = receiver(Mode::Gone).await;
    let (gone, _) = rig.add(&format!("http://{gone_addr}/hook"), &["*"], None);
    record(&mut rig.conn, "site.created", 1);
    let conn = &mut rig.conn;
    eventually("the endpoint is disabled", LIMIT, || {
        webhooks::get(conn, gone).unwrap().is_some_and(|e| !e.is_active())
    })
    .await;
    eventually("the delivery is a failed job", LIMIT, || {
        !webhooks::failed_delivery_jobs(conn, gone).unwrap().is_empty()
    })
    .await;
    assert_eq!(gone_got.lock().unwrap().len(), 1, "one answer, no retry");
    assert_eq!(
        count(
            &mut rig.conn,
            "SELECT count(*) AS n FROM outbox_events WHERE event_type = 'webhook.endpoint_disabled' AND payload->>'reason' LIKE '%410 Gone%'"
        ),
        1,
        "the disabling is recorded with its reason"
    );
    let endpoint = webhooks::get(&mut rig.conn, gone).unwrap().unwrap();
    assert!(
        format!("{:?}", endpoint.status).contains("410"),
        "{:?}",
        endpoint.status
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_of_a_429_or_503_holds_the_next_try_back() {
    // The backoff is 100 ms and 200 ms: only Retry-After makes it wait.
    let mut rig = Rig::start(local()).await;
    let (busy_addr, busy_got) = receiver(Mode::TooManyFirst).await;
    let (down_addr, down_got) = receiver(Mode::UnavailableFirst).await;
    rig.add(&format!("http://{busy_addr}/hook"), &["site.created"], None);
    rig.add(&format!("http://{down_addr}/hook"), &["site.deleted"], None);
    record(&mut rig.conn, "site.created", 1);
    record(&mut rig.conn, "site.deleted", 1);
    for (name, got) in [("429", &busy_got), ("503", &down_got)] {
        eventually(&format!("the {name} endpoint gets its second try"), LIMIT, || {
            got.lock().unwrap().len() >= 2
        })
        .await;
        let got = got.lock().unwrap();
        let waited = got[1].at.duration_since(got[0].at);
        assert!(
            waited >= Duration::from_secs(2),
            "{name}: the second try came {waited:?} after the first"
        );
        assert_eq!(got.len(), 2, "{name}: delivered on the second try");
    }
    assert_eq!(
        count(
            &mut rig.conn,
            "SELECT count(*) AS n FROM webhook_deliveries WHERE error LIKE '%Retry-After%'"
        ),
        0,
        "held-back deliveries log no try"
    );
    assert_eq!(count(&mut rig.conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_endpoint_never_gets_more_than_its_limit_in_a_second_and_others_are_not_held() {
    const EVENTS: usize = 30;
    const LIMIT_PER_SECOND: u32 = 5;
    let mut rig = Rig::start(local()).await;
    let (limited_addr, limited_got) = receiver(Mode::Ok).await;
    let (free_addr, free_got) = receiver(Mode::Ok).await;
    let (limited, _) = rig.add_endpoint(NewEndpoint {
        url: format!("http://{limited_addr}/hook"),
        event_types: vec!["*".into()],
        rate_limit: Some(LIMIT_PER_SECOND),
        ..NewEndpoint::default()
    });
    rig.add(&format!("http://{free_addr}/hook"), &["*"], None);
    let started = Instant::now();
    for i in 0..EVENTS {
        record(&mut rig.conn, "site.created", i as i64);
    }
    eventually("the unlimited endpoint gets every event", LIMIT, || {
        free_got.lock().unwrap().len() >= EVENTS
    })
    .await;
    let free_took = started.elapsed();
    eventually("the limited endpoint gets every event", LIMIT, || {
        limited_got.lock().unwrap().len() >= EVENTS
    })
    .await;
    let times: Vec<Instant> = limited_got.lock().unwrap().iter().map(|r| r.at).collect();
    let busiest = times
        .iter()
        .map(|start| {
            times
                .iter()
                .filter(|t| **t >= *start && t.duration_since(*start) < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    let limited_took = times
        .iter()
        .max()
        .unwrap()
        .duration_since(*times.iter().min().unwrap());
    eprintln!(
        "limited: {busiest} in the busiest second, all in {limited_took:?}; unlimited: all {EVENTS} in {free_took:?}"
    );
    assert!(
        busiest <= LIMIT_PER_SECOND as usize,
        "{busiest} deliveries within one second at the limited endpoint"
    );
    assert!(
        limited_took >= Duration::from_secs(5),
        "30 at 5/s take 5 s at least: {limited_took:?}"
    );
    assert!(
        free_took < Duration::from_secs(5),
        "the unlimited endpoint took {free_took:?}"
    );
    assert_eq!(times.len(), EVENTS, "each delivered once");
    // Tries are logged in groups after their answers: wait for the last
    // group, then there must be exactly one a delivery.
    let logged = format!("SELECT count(*) AS n FROM webhook_deliveries WHERE endpoint_id = {limited}");
    eventually("every delivery's try logged", LIMIT, || {
        count(&mut rig.conn, &logged) >= EVENTS as i64
    })
    .await;
    assert_eq!(
        count(&mut rig.conn, &logged),
        EVENTS as i64,
        "one logged try each: held-back deliveries are not tries"
    );
    assert_eq!(count(&mut rig.conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
    // Lifted, the endpoint gets a burst at once.
    webhooks::set_rate_limit(&mut rig.conn, limited, None).unwrap();
    assert_eq!(
        webhooks::get(&mut rig.conn, limited).unwrap().unwrap().rate_limit,
        None
    );
    assert!(webhooks::set_rate_limit(&mut rig.conn, limited, Some(0)).is_err());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed25519_endpoints_get_v1a_signatures_that_their_public_key_verifies() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut rig = Rig::start(local()).await;
    let (addr, got) = receiver(Mode::Ok).await;
    let (id, secret) = rig.add_endpoint(NewEndpoint {
        url: format!("http://{addr}/hook"),
        event_types: vec!["*".into()],
        signing: webhooks::Signing::Ed25519,
        ..NewEndpoint::default()
    });
    assert!(secret.expose().starts_with("whsk_"));
    let public = webhooks::public_keys(&mut rig.conn, id).unwrap();
    assert_eq!(public.len(), 1);
    assert_eq!(Some(public[0].clone()), webhooks::public_key(&secret).unwrap());
    record(&mut rig.conn, "site.created", 1);
    eventually("the delivery arrives", LIMIT, || !got.lock().unwrap().is_empty()).await;
    let received = got.lock().unwrap()[0].clone();
    let header = |name: &str| received.headers[name].to_str().unwrap().to_owned();
    let signature = header("webhook-signature");
    let raw = b64
        .decode(signature.strip_prefix("v1a,").expect("a v1a signature"))
        .unwrap();
    let mut signed = format!("{}.{}.", header("webhook-id"), header("webhook-timestamp")).into_bytes();
    signed.extend_from_slice(&received.body);
    let key_bytes = b64.decode(public[0].strip_prefix("whpk_").unwrap()).unwrap();
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key_bytes);
    assert!(
        key.verify(&signed, &raw).is_ok(),
        "the public key verifies the delivery"
    );
    signed.push(b' ');
    assert!(key.verify(&signed, &raw).is_err(), "and nothing else");
    // A rotation keeps the scheme: a new key pair, both public keys listed.
    let rotated = webhooks::rotate_secret(&mut rig.conn, id, Duration::from_secs(60)).unwrap();
    assert!(rotated.expose().starts_with("whsk_"));
    assert_eq!(webhooks::public_keys(&mut rig.conn, id).unwrap().len(), 2);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_share_one_token_fetch() {
    let mut rig = Rig::start(local()).await;
    let (tokens_addr, issued) = token_server_answering_after(Duration::from_millis(300)).await;
    let (addr, got) = receiver(Mode::Ok).await;
    rig.add(
        &format!("http://{addr}/hook"),
        &["*"],
        Some(OAuthSettings {
            token_url: format!("http://{tokens_addr}/token"),
            client_id: "client-1".into(),
            client_secret: Secret::new("right-secret"),
            scope: None,
        }),
    );
    for i in 0..12 {
        record(&mut rig.conn, "site.created", i);
    }
    eventually("every delivery arrives", LIMIT, || {
        got.lock().unwrap().len() >= 12
    })
    .await;
    assert_eq!(
        *issued.lock().unwrap(),
        1,
        "one token fetch for concurrent deliveries"
    );
    assert!(
        got.lock()
            .unwrap()
            .iter()
            .all(|r| r.headers["authorization"] == "Bearer tok-1")
    );
    rig.stop().await;
}
