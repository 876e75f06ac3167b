//! Who is looking and who may act: logins (a token, compared in constant
//! time), sessions in memory (a random id in an `HttpOnly`, `SameSite=Strict`
//! cookie), and the CSRF token every form carries.
//!
//! Pages are open to anyone who can reach the address (bound to loopback
//! unless credentials are set); every mutation needs an [`Operator`]: a
//! live session and the session's CSRF token in the form.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::Form;
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use maud::html;
use rand::RngCore;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::config::checked_operator;
use crate::error::{DashboardError, Result};
use crate::pages::layout;
use crate::state::AppState;

/// The session cookie.
pub(crate) const SESSION_COOKIE: &str = "outbox_session";
/// The login form's double-submit cookie (CSRF on the login itself).
const LOGIN_COOKIE: &str = "outbox_login";

/// Sessions by id.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    inner: Mutex<HashMap<String, Session>>,
}

#[derive(Debug, Clone)]
struct Session {
    operator: String,
    csrf: String,
    expires: Instant,
}

impl Sessions {
    fn open(&self, operator: String, ttl: Duration) -> (String, String) {
        let id = random_token();
        let csrf = random_token();
        let mut sessions = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(
            id.clone(),
            Session {
                operator,
                csrf: csrf.clone(),
                expires: now + ttl,
            },
        );
        (id, csrf)
    }

    fn find(&self, id: &str) -> Option<Session> {
        let sessions = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sessions.get(id).filter(|s| s.expires > Instant::now()).cloned()
    }

    fn close(&self, id: &str) {
        let mut sessions = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sessions.remove(id);
    }
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

/// Who is looking: an operator when logged in, and whether mutations are
/// possible at all.
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    /// The logged-in operator.
    pub(crate) operator: Option<Operator>,
    /// Credentials are configured (else the dashboard is read-only).
    pub(crate) can_log_in: bool,
}

/// A logged-in operator, extracted from the session cookie.
#[derive(Debug, Clone)]
pub(crate) struct Operator {
    /// Their name, logged with every action.
    pub(crate) name: String,
    /// The session's CSRF token, put in every form.
    pub(crate) csrf: String,
    session: String,
}

impl Operator {
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

fn operator_of(parts: &Parts, state: &AppState) -> Option<Operator> {
    let jar = CookieJar::from_headers(&parts.headers);
    let id = jar.get(SESSION_COOKIE)?.value().to_owned();
    let session = state.sessions.find(&id)?;
    Some(Operator {
        name: session.operator,
        csrf: session.csrf,
        session: id,
    })
}

impl FromRequestParts<Arc<AppState>> for Viewer {
    type Rejection = DashboardError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self> {
        Ok(Viewer {
            operator: operator_of(parts, state),
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
        operator_of(parts, state).ok_or(DashboardError::Unauthenticated)
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
    let operator = match credentials.verify(&form.token) {
        Some(Some(name)) => name,
        Some(None) => checked_operator(&form.operator)
            .map_err(|e| DashboardError::BadRequest(format!("operator: {e}")))?,
        None => {
            tracing::warn!(target: "outbox_dashboard::audit", "login refused: wrong token");
            return Err(DashboardError::Forbidden("wrong token".into()));
        }
    };
    let (id, _) = state.sessions.open(operator.clone(), state.config.session_ttl);
    tracing::info!(target: "outbox_dashboard::audit", operator = %operator, "operator logged in");
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
    state.sessions.close(&operator.session);
    tracing::info!(target: "outbox_dashboard::audit", operator = %operator.name, "operator logged out");
    Ok((
        jar.remove(Cookie::build(SESSION_COOKIE).path("/")),
        Redirect::to("/"),
    )
        .into_response())
}

/// Logs one mutation with who did it.
pub(crate) fn audit(operator: &Operator, action: &str, detail: &str) {
    tracing::info!(target: "outbox_dashboard::audit", operator = %operator.name, action, detail, "operator action");
}
