//! Who is looking and who may act: logins (a token, compared in constant
//! time, giving a [`Role`]), sessions kept in Postgres (a random id in an
//! `HttpOnly`, `SameSite=Strict` cookie; the table holds only its SHA-256,
//! so logins survive a restart and logout deletes the row), the CSRF token
//! every form carries, and [`audit`], which every action goes through.
//!
//! Pages are open to anyone who can reach the address (bound to loopback
//! unless credentials are set); every mutation needs an [`Operator`]: a
//! live session, the session's CSRF token in the form, and a role that
//! allows it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::Form;
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use diesel::dsl;
use diesel::prelude::*;
use diesel::sql_types::{Bytea, Double, Text};
use maud::html;
use outbox::schema::dashboard_sessions;
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::Entry;
use crate::config::checked_operator;
use crate::error::{DashboardError, Result};
use crate::layout;
pub(crate) use crate::operator::{Operator, Viewer};
use crate::role::Role;
use crate::state::AppState;

/// The session cookie.
pub(crate) const SESSION_COOKIE: &str = "outbox_session";
/// The login form's double-submit cookie (CSRF on the login itself).
const LOGIN_COOKIE: &str = "outbox_login";

/// A live login, as `dashboard_sessions` keeps it.
struct Session {
    operator: String,
    role: Role,
    csrf: String,
}

/// SHA-256 of a session id: what the table keys sessions by, so the table
/// alone logs no one in.
fn session_key(id: &str) -> Vec<u8> {
    Sha256::digest(id.as_bytes()).to_vec()
}

/// Opens a session of `ttl` (and deletes expired ones); returns its id and
/// CSRF token.
fn open_session(
    conn: &mut PgConnection,
    operator: &str,
    role: Role,
    ttl: Duration,
) -> outbox::Result<(String, String)> {
    let id = random_token();
    let csrf = random_token();
    diesel::delete(dashboard_sessions::table.filter(dashboard_sessions::expires_at.le(dsl::now)))
        .execute(conn)?;
    diesel::sql_query(
        "INSERT INTO dashboard_sessions (id_sha256, operator, role, csrf, expires_at) \
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
    )
    .bind::<Bytea, _>(session_key(&id))
    .bind::<Text, _>(operator)
    .bind::<Text, _>(role.as_str())
    .bind::<Text, _>(&csrf)
    .bind::<Double, _>(ttl.as_secs_f64())
    .execute(conn)?;
    Ok((id, csrf))
}

/// The unexpired session of cookie value `id`.
fn find_session(conn: &mut PgConnection, id: &str) -> outbox::Result<Option<Session>> {
    let row: Option<(String, String, String)> = dashboard_sessions::table
        .filter(dashboard_sessions::id_sha256.eq(session_key(id)))
        .filter(dashboard_sessions::expires_at.gt(dsl::now))
        .select((
            dashboard_sessions::operator,
            dashboard_sessions::role,
            dashboard_sessions::csrf,
        ))
        .first(conn)
        .optional()?;
    Ok(row.map(|(operator, role, csrf)| Session {
        operator,
        // A role this release does not know reads as the least one.
        role: role.parse().unwrap_or(Role::Viewer),
        csrf,
    }))
}

fn close_session(conn: &mut PgConnection, id: &str) -> outbox::Result<()> {
    diesel::delete(dashboard_sessions::table.filter(dashboard_sessions::id_sha256.eq(session_key(id))))
        .execute(conn)?;
    Ok(())
}

/// 32 random bytes, hex.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

impl Operator {
    /// Refuses (a 403 naming both roles) unless this operator's role is at
    /// least `needed` for `action`.
    pub(crate) fn require(&self, needed: Role, action: &str) -> Result<()> {
        if self.role >= needed {
            return Ok(());
        }
        tracing::warn!(target: "outbox_dashboard::audit", operator = %self.name, role = %self.role, action, needed = %needed, "action refused: role too low");
        Err(DashboardError::RoleRequired {
            action: action.to_owned(),
            needed,
            held: self.role,
        })
    }

    /// Refuses a form whose CSRF token is not this session's.
    pub(crate) fn check_csrf(&self, given: &str) -> Result<()> {
        if same(&self.csrf, given) {
            Ok(())
        } else {
            tracing::warn!(target: "outbox_dashboard::audit", operator = %self.name, "form refused: bad CSRF token");
            Err(DashboardError::Forbidden(
                "this form's CSRF token is missing or stale: reload the page and try again".into(),
            ))
        }
    }
}

async fn operator_of(parts: &Parts, state: &AppState) -> Result<Option<Operator>> {
    let jar = CookieJar::from_headers(&parts.headers);
    let Some(id) = jar.get(SESSION_COOKIE).map(|c| c.value().to_owned()) else {
        return Ok(None);
    };
    // Only ids of our own shape reach the database.
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let lookup = id.clone();
    let session = state.db(move |conn| find_session(conn, &lookup)).await?;
    Ok(session.map(|session| Operator {
        name: session.operator,
        role: session.role,
        csrf: session.csrf,
        session: id,
    }))
}

impl FromRequestParts<Arc<AppState>> for Viewer {
    type Rejection = DashboardError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self> {
        Ok(Viewer {
            operator: operator_of(parts, state).await?,
            can_log_in: state.config.credentials.is_some(),
        })
    }
}

impl FromRequestParts<Arc<AppState>> for Operator {
    type Rejection = DashboardError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self> {
        if state.config.credentials.is_none() {
            return Err(DashboardError::Forbidden(format!(
                "this dashboard is read-only: start it with {} or {} set to allow changes",
                crate::config::TOKEN_ENV,
                crate::config::TOKEN_FILE_ENV
            )));
        }
        operator_of(parts, state)
            .await?
            .ok_or(DashboardError::Unauthenticated)
    }
}

/// `GET /login`.
pub(crate) async fn login_form(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    jar: CookieJar,
) -> Result<Response> {
    let Some(credentials) = &state.config.credentials else {
        return Err(DashboardError::Forbidden(
            "this dashboard is read-only: there is nothing to log in to".into(),
        ));
    };
    let nonce = random_token();
    let cookie = Cookie::build((LOGIN_COOKIE, nonce.clone()))
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(state.config.cookie_secure)
        .path("/login")
        .build();
    let page = layout::page(
        "Log in",
        &viewer,
        None,
        html! {
            h1 { "Log in" }
            form.login method="post" action="/login" {
                input type="hidden" name="login_csrf" value=(nonce);
                @if credentials.has_shared() {
                    label { "Your name (logged with what you do)" input type="text" name="operator" maxlength="64" autocomplete="username"; }
                }
                label { "Token" input type="password" name="token" required autocomplete="current-password"; }
                button type="submit" { "Log in" }
            }
        },
    );
    Ok((jar.add(cookie), page).into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    login_csrf: String,
    #[serde(default)]
    operator: String,
    #[serde(default)]
    token: String,
}

/// `POST /login`.
pub(crate) async fn login(
    State(state): State<Arc<AppState>>,
    jar: CookieJar,
    Form(form): Form<LoginForm>,
) -> Result<Response> {
    let Some(credentials) = &state.config.credentials else {
        return Err(DashboardError::Forbidden(
            "this dashboard is read-only: there is nothing to log in to".into(),
        ));
    };
    let nonce = jar
        .get(LOGIN_COOKIE)
        .map(|c| c.value().to_owned())
        .unwrap_or_default();
    if nonce.is_empty() || !same(&nonce, &form.login_csrf) {
        return Err(DashboardError::Forbidden(
            "this login form is stale (its CSRF token does not match): open the login page again".into(),
        ));
    }
    let (operator, role) = match credentials.verify(&form.token) {
        Some((Some(name), role)) => (name, role),
        Some((None, role)) => (
            checked_operator(&form.operator)
                .map_err(|e| DashboardError::BadRequest(format!("operator: {e}")))?,
            role,
        ),
        None => {
            tracing::warn!(target: "outbox_dashboard::audit", "login refused: wrong token");
            return Err(DashboardError::Forbidden("wrong token".into()));
        }
    };
    let ttl = state.config.session_ttl;
    let name = operator.clone();
    let (id, csrf) = state.db(move |conn| open_session(conn, &name, role, ttl)).await?;
    let session = Operator {
        name: operator,
        role,
        csrf,
        session: id.clone(),
    };
    audit(&state, &session, Role::Viewer, Entry::new("log_in")).await?;
    let cookie = Cookie::build((SESSION_COOKIE, id))
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(state.config.cookie_secure)
        .path("/")
        .build();
    let jar = jar.remove(Cookie::build(LOGIN_COOKIE).path("/login")).add(cookie);
    Ok((jar, Redirect::to("/")).into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    pub(crate) csrf: String,
}

/// `POST /logout`.
pub(crate) async fn logout(
    State(state): State<Arc<AppState>>,
    operator: Operator,
    jar: CookieJar,
    Form(form): Form<CsrfForm>,
) -> Result<Response> {
    operator.check_csrf(&form.csrf)?;
    audit(&state, &operator, Role::Viewer, Entry::new("log_out")).await?;
    let id = operator.session.clone();
    state.db(move |conn| close_session(conn, &id)).await?;
    Ok((
        jar.remove(Cookie::build(SESSION_COOKIE).path("/")),
        Redirect::to("/"),
    )
        .into_response())
}

/// The one door of every action: refuses it unless `operator`'s role is at
/// least `needed`, logs it under the `outbox_dashboard::audit` target and
/// writes its row to the audit trail (see [`crate::audit`]). An action
/// whose row cannot be written is not done.
pub(crate) async fn audit(state: &AppState, operator: &Operator, needed: Role, entry: Entry) -> Result<()> {
    operator.require(needed, entry.action)?;
    tracing::info!(target: "outbox_dashboard::audit", operator = %operator.name, role = %operator.role, action = entry.action, detail = %entry.summary(), "operator action");
    let (name, role, retention) = (operator.name.clone(), operator.role, state.config.audit_retention);
    state
        .db(move |conn| crate::audit::write(conn, &name, role, &entry, retention))
        .await
}
