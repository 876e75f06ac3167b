//! A dashboard on a free loopback port over a test database, an HTTP
//! client that keeps cookies, and a queue of the test's own for retries.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use chrono::Utc;
use outbox::TestDatabase;
use outbox::failed_jobs::{AttemptError, NewFailedJob};
use outbox_dashboard::{Credentials, DashboardConfig};
use tokio::sync::oneshot;
use uuid::Uuid;

pub const TOKEN: &str = "test-token-0123456789abcdef";

/// Every log line of this test binary (all tests share one subscriber).
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

#[derive(Clone, Copy)]
struct LogBuffer;

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber (once per binary).
pub fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_writer(|| LogBuffer)
        .try_init();
}

/// What was logged so far.
pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
}

/// A running dashboard; stops when dropped.
pub struct Dashboard {
    pub address: SocketAddr,
    pub db: TestDatabase,
    config: DashboardConfig,
    server: Server,
}

/// The serving task; told to stop when dropped.
struct Server {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), outbox_dashboard::DashboardError>>>,
}

impl Server {
    async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Dashboard {
    /// With the shared test token when `auth`, read-only otherwise.
    pub async fn start(auth: bool) -> Result<Self> {
        let db = TestDatabase::create()?;
        Self::start_on(db, auth).await
    }

    pub async fn start_on(db: TestDatabase, auth: bool) -> Result<Self> {
        let credentials = if auth {
            Some(Credentials::shared(TOKEN)?)
        } else {
            None
        };
        Self::start_with(db, credentials, |_| {}).await
    }

    /// With `credentials`, and the settings `configure` changes.
    pub async fn start_with(
        db: TestDatabase,
        credentials: Option<Credentials>,
        configure: impl FnOnce(&mut DashboardConfig),
    ) -> Result<Self> {
        let mut config = DashboardConfig::new(db.url(), outbox::DEFAULT_AMQP_URL);
        config.bind = "127.0.0.1:0".parse()?;
        config.refresh = Duration::from_secs(60);
        config.credentials = credentials;
        configure(&mut config);
        Self::serve(db, config).await
    }

    async fn serve(db: TestDatabase, config: DashboardConfig) -> Result<Self> {
        capture_logs();
        let (stop, stopped) = oneshot::channel::<()>();
        let (bound_tx, bound_rx) = oneshot::channel();
        let task = tokio::spawn(outbox_dashboard::serve(
            config.clone(),
            async move {
                let _ = stopped.await;
            },
            move |address| {
                let _ = bound_tx.send(address);
            },
        ));
        let address = tokio::time::timeout(Duration::from_secs(10), bound_rx)
            .await
            .context("the dashboard did not start")??;
        Ok(Self {
            address,
            db,
            config,
            server: Server {
                stop: Some(stop),
                task: Some(task),
            },
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub async fn stop(self) -> Result<()> {
        self.server.stop().await
    }

    /// Stops this server and starts a new one with the same settings and
    /// database, on the same address.
    pub async fn restart(self) -> Result<Self> {
        let Dashboard {
            address,
            db,
            mut config,
            server,
        } = self;
        server.stop().await?;
        config.bind = address;
        Self::serve(db, config).await
    }
}

/// Credentials from a token file holding `lines` (the file is deleted once
/// read).
pub fn token_file(lines: &str) -> Result<Credentials> {
    let path = std::env::temp_dir().join(format!("outbox-dashboard-tokens-{}", Uuid::now_v7().simple()));
    std::fs::write(&path, lines)?;
    let credentials = Credentials::from_file(&path);
    std::fs::remove_file(&path)?;
    Ok(credentials?)
}

/// A client that keeps cookies and does not follow redirects.
pub fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// The value of `name="<field>" value="..."` in a page (hidden inputs).
pub fn hidden_value(page: &str, field: &str) -> Option<String> {
    let marker = format!("name=\"{field}\" value=\"");
    let start = page.find(&marker)? + marker.len();
    let end = page[start..].find('"')? + start;
    Some(page[start..end].to_owned())
}

/// The `href` of the link with id `id` in a page (entities decoded).
pub fn href_of(page: &str, id: &str) -> Option<String> {
    let marker = format!("id=\"{id}\" href=\"");
    let start = page.find(&marker)? + marker.len();
    let end = page[start..].find('"')? + start;
    Some(page[start..end].replace("&amp;", "&"))
}

/// Logs `client` in as `operator`; returns the session's CSRF token.
pub async fn log_in(dashboard: &Dashboard, client: &reqwest::Client, operator: &str) -> Result<String> {
    log_in_with(dashboard, client, operator, TOKEN).await
}

/// Logs `client` in with `token` (naming itself `operator` when the token
/// is shared); returns the session's CSRF token.
pub async fn log_in_with(
    dashboard: &Dashboard,
    client: &reqwest::Client,
    operator: &str,
    token: &str,
) -> Result<String> {
    Ok(log_in_session(dashboard, client, operator, token).await?.0)
}

/// Like [`log_in_with`], also returning the session cookie's value.
pub async fn log_in_session(
    dashboard: &Dashboard,
    client: &reqwest::Client,
    operator: &str,
    token: &str,
) -> Result<(String, String)> {
    let form = client.get(dashboard.url("/login")).send().await?.text().await?;
    let nonce = hidden_value(&form, "login_csrf").ok_or_else(|| anyhow!("no login_csrf in {form}"))?;
    let response = client
        .post(dashboard.url("/login"))
        .form(&[
            ("login_csrf", nonce.as_str()),
            ("operator", operator),
            ("token", token),
        ])
        .send()
        .await?;
    anyhow::ensure!(response.status() == 303, "login answered {}", response.status());
    let session = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("outbox_session="))
        .and_then(|c| c.split(';').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the login set no session cookie"))?;
    let page = client.get(dashboard.url("/")).send().await?.text().await?;
    let csrf = hidden_value(&page, "csrf").ok_or_else(|| anyhow!("no csrf field once logged in"))?;
    Ok((csrf, session))
}

/// A durable queue of the test's own (deleted on drop).
pub struct TestQueue {
    pub name: String,
    connection: lapin::Connection,
}

impl TestQueue {
    pub async fn declare() -> Result<Self> {
        let name = format!("outbox_test.{}.dashboard", Uuid::now_v7().simple());
        let connection = outbox::amqp::connect(outbox::DEFAULT_AMQP_URL, "dashboard tests").await?;
        let channel = connection.create_channel().await?;
        channel
            .queue_declare(
                name.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await?;
        Ok(Self { name, connection })
    }

    pub async fn depth(&self) -> Result<u32> {
        outbox::amqp::queue_depth(&self.connection, &self.name)
            .await?
            .ok_or_else(|| anyhow!("queue {} is gone", self.name))
    }

    /// The bodies of every message in the queue (taken off it).
    pub async fn drain(&self) -> Result<Vec<serde_json::Value>> {
        let channel = self.connection.create_channel().await?;
        let mut bodies = Vec::new();
        while let Some(message) = channel
            .basic_get(
                self.name.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await?
        {
            bodies.push(serde_json::from_slice(&message.delivery.data)?);
        }
        Ok(bodies)
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        outbox::testing::delete_broker_objects(
            outbox::DEFAULT_AMQP_URL,
            std::slice::from_ref(&self.name),
            &[],
        );
    }
}

/// Inserts a failed job of `listener` on `queue`; returns its id.
pub fn insert_failed(
    conn: &mut diesel::PgConnection,
    queue: &str,
    listener: &str,
    event_type: &str,
    error: &str,
    data: serde_json::Value,
) -> Result<i64> {
    let event_id = Uuid::now_v7();
    let payload = serde_json::json!({
        "specversion": "1.0", "id": event_id.to_string(), "type": event_type, "source": "/outbox/test",
        "subject": "7", "aggregatetype": "site", "data": data,
    });
    let errors = vec![AttemptError {
        attempt: 1,
        at: Utc::now(),
        error: error.to_owned(),
    }];
    let (id, _) = outbox::failed_jobs::insert(
        conn,
        &NewFailedJob {
            queue,
            listener,
            event_id: Some(event_id),
            event_type: Some(event_type),
            payload: &payload,
            exception: error,
            attempts: 1,
            errors: &errors,
            uuid: None,
        },
    )?;
    Ok(id)
}
