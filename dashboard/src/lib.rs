//! # outbox-dashboard
//!
//! The operator's web dashboard of a transactional outbox, served by
//! `outbox dashboard` in a process of its own (relays stay lean). Pages are
//! rendered on the server with maud (every value escaped), work without
//! JavaScript (the policy forbids scripts), and reload themselves where
//! figures move once the viewer asks.
//!
//! ## Map of the crate
//!
//! | concern | file |
//! | --- | --- |
//! | settings, tokens | `config.rs`: [`DashboardConfig`], [`Credentials`] |
//! | logins, sessions (in Postgres), CSRF, the one door of every action | `auth.rs` |
//! | the roles and what each may do | `role.rs`: [`Role`] |
//! | who is looking: the viewer, the logged-in operator | `operator.rs` |
//! | the audit trail: rows, retention, the page's query, the retries a timeline shows | `audit.rs` |
//! | security headers (CSP, framing, caching) | `security.rs` |
//! | pool, broker link, settings shared by handlers | `state.rs` |
//! | failures as pages (400 says why; 500 details only in the log) | `error.rs`: [`DashboardError`] |
//! | the page frame, navigation, the opt-in reload, forms' common parts | `layout.rs` |
//! | overview: backlog, chart, relays, pause, relay-failed rows | `pages/overview.rs` |
//! | listeners: queues, retry and dead-letter depths, failures | `pages/listeners.rs` |
//! | failed jobs: filters, keyset pages, bulk actions, error groups | `pages/failed.rs` |
//! | one failed job: envelope, tries, edits; retry, forget, edit-and-retry | `pages/job.rs` |
//! | "where is my event?": search and an aggregate's timeline (retries by operators, listeners not running) | `pages/events.rs` |
//! | the audit trail, filterable | `pages/audit.rs` |
//! | reading filter and form input into 400s, not 500s | `pages/params.rs` |
//! | the published-per-minute chart (inline SVG) | `chart.rs` |
//! | the embedded stylesheet | `assets/style.css` |
//!
//! ## Security
//!
//! Mutations need a logged-in operator (a token from [`TOKEN_ENV`] or a
//! file named by [`TOKEN_FILE_ENV`], compared in constant time) and the
//! session's CSRF token, and a [`Role`] that allows the action (viewer,
//! operator, admin; a 403 names the role needed and the one held); without
//! credentials the dashboard is read-only and refuses to listen on anything
//! but loopback. Every action is logged with its operator under the
//! `outbox_dashboard::audit` target and written to the audit trail
//! (`dashboard_audit`, the `/audit` page). Sessions live in
//! `dashboard_sessions` (only a SHA-256 of each id), so a restart keeps
//! operators logged in.

#![warn(missing_docs)]
#![warn(unreachable_pub)]

mod audit;
mod auth;
mod chart;
mod config;
mod error;
mod layout;
mod operator;
mod pages;
mod role;
mod security;
mod state;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

pub use config::{
    Credentials, DEFAULT_BIND, DEFAULT_BULK_ADMIN_THRESHOLD, DashboardConfig, MIN_TOKEN_BYTES, Role,
    TOKEN_ENV, TOKEN_FILE_ENV,
};
pub use error::DashboardError;
pub use security::CONTENT_SECURITY_POLICY;

use state::AppState;

/// Serves the dashboard on `config.bind` until `shutdown` resolves.
/// `on_listening` is told the bound address (useful with port 0).
pub async fn serve(
    config: DashboardConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(std::net::SocketAddr),
) -> Result<(), DashboardError> {
    config.validate()?;
    let bind = config.bind;
    let state = Arc::new(AppState::new(config)?);
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| DashboardError::Start(format!("cannot listen on {bind}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| DashboardError::Start(format!("cannot read the bound address: {e}")))?;
    tracing::info!(
        address = %local,
        read_only = state.config.credentials.is_none(),
        database = %outbox::redact_url(&state.config.database_url),
        "dashboard listening"
    );
    if let Some(credentials) = &state.config.credentials
        && credentials.without_role() > 0
    {
        tracing::warn!(
            tokens = credentials.without_role(),
            role = %Role::DEFAULT,
            "dashboard tokens without a role get the default role; give each token a role (role=viewer|operator|admin) in the token file"
        );
    }
    on_listening(local);
    let app = router(Arc::clone(&state));
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    state.close().await;
    served.map_err(|e| DashboardError::Start(format!("the server stopped: {e}")))
}

fn router(state: Arc<AppState>) -> Router {
    use pages::{audit, events, failed, job, listeners, overview};
    Router::new()
        .route("/", get(overview::show))
        .route("/pause", post(overview::pause))
        .route("/resume", post(overview::resume))
        .route("/relay-failed/retry", post(overview::retry_relay_failed))
        .route("/listeners", get(listeners::show))
        .route("/failed", get(failed::list))
        .route("/failed/retry", post(failed::retry_selected))
        .route("/failed/forget", post(failed::forget_selected))
        .route(
            "/failed/retry-matching",
            get(failed::confirm_retry_matching).post(failed::retry_matching),
        )
        .route(
            "/failed/forget-matching",
            get(failed::confirm_forget_matching).post(failed::forget_matching),
        )
        .route("/failed/groups", get(failed::groups))
        .route("/failed/{id}", get(job::show))
        .route("/failed/{id}/retry", post(job::retry))
        .route("/failed/{id}/forget", post(job::forget))
        .route("/failed/{id}/edit", get(job::edit_form).post(job::edit_and_retry))
        .route("/events", get(events::search))
        .route("/timeline", get(events::timeline))
        .route("/audit", get(audit::show))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/assets/style.css", get(layout::stylesheet))
        .fallback(layout::not_found)
        .layer(axum::middleware::from_fn(security::headers))
        .with_state(state)
}
