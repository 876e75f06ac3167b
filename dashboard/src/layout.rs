//! The frame every page shares (head, navigation, who is logged in), the
//! error page, the stylesheet, and small renderers used across pages.

use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use crate::operator::{Operator, Viewer};

const STYLESHEET: &str = include_str!("../assets/style.css");

/// A page whose figures move may reload itself, but only once the viewer
/// asked (`?refresh=on`, a link on the page): a timed reload nobody chose
/// fails WCAG 2.2.1 (axe-core's `meta-refresh` rule) and moves a
/// screen reader's place.
#[derive(Debug, Clone)]
pub(crate) struct Refresh {
    every: Duration,
    on: bool,
    path: String,
    /// The query's pairs without `refresh`.
    pairs: Vec<(String, String)>,
}

impl Refresh {
    /// Every `every`, when `uri`'s query says `refresh=on`.
    pub(crate) fn of(every: Duration, uri: &axum::http::Uri) -> Self {
        let mut on = false;
        let pairs = url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .filter(|(key, value)| {
                if key == "refresh" {
                    on = value == "on";
                }
                // A notice belongs to the redirect that set it, not to
                // every reload.
                key != "refresh" && key != "notice"
            })
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        Self {
            every,
            on,
            path: uri.path().to_owned(),
            pairs,
        }
    }

    fn link(&self, on: bool) -> String {
        let mut pairs: Vec<(&str, Option<&str>)> = self
            .pairs
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_str())))
            .collect();
        if on {
            pairs.push(("refresh", Some("on")));
        }
        link(&self.path, &pairs)
    }

    fn control(&self) -> Markup {
        let every = humantime::format_duration(Duration::from_secs(self.every.as_secs().max(1)));
        html! {
            p.refresh #refresh {
                @if self.on {
                    "This page reloads every " (every) ". " a #refresh-off href=(self.link(false)) { "Stop reloading" }
                } @else {
                    a #refresh-on href=(self.link(true)) { "Reload this page every " (every) }
                }
            }
        }
    }
}

/// A whole page; `refresh` offers (and, once asked, does) a timed reload.
pub(crate) fn page(title: &str, viewer: &Viewer, refresh: Option<Refresh>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(refresh) = refresh.as_ref().filter(|r| r.on) {
                    meta http-equiv="refresh" content=(refresh.every.as_secs().max(1));
                }
                title { (title) " · outbox" }
                link rel="stylesheet" href="/assets/style.css";
            }
            body {
                header.top {
                    a.brand href="/" { "outbox" }
                    nav {
                        a href="/" { "Overview" }
                        a href="/listeners" { "Listeners" }
                        a href="/failed" { "Failed jobs" }
                        a href="/events" { "Where is my event?" }
                        a href="/audit" { "Audit" }
                    }
                    div.who {
                        @match (&viewer.operator, viewer.can_log_in) {
                            (Some(operator), _) => {
                                span.operator { (operator.name) }
                                " " span.role #role title="your role" { (operator.role) }
                                form.inline method="post" action="/logout" {
                                    (csrf_field(operator))
                                    button.link type="submit" { "Log out" }
                                }
                            }
                            (None, true) => { a href="/login" { "Log in" } }
                            (None, false) => { span.readonly title="no token configured" { "read-only" } }
                        }
                    }
                }
                main {
                    (body)
                    @if let Some(refresh) = &refresh { (refresh.control()) }
                }
            }
        }
    }
}

/// The hidden CSRF field of a form.
pub(crate) fn csrf_field(operator: &Operator) -> Markup {
    html! { input type="hidden" name="csrf" value=(operator.csrf); }
}

/// A failure's page.
pub(crate) fn error_page(status: StatusCode, message: &str) -> Markup {
    let viewer = Viewer {
        operator: None,
        can_log_in: false,
    };
    page(
        status.canonical_reason().unwrap_or("Error"),
        &viewer,
        None,
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
            p.error { (message) }
            @if status == StatusCode::UNAUTHORIZED { p { a href="/login" { "Log in" } } }
            p { a href="/" { "Back to the overview" } }
        },
    )
}

/// A notice above a page's content (from an action's redirect).
pub(crate) fn notice(text: Option<&str>) -> Markup {
    html! {
        @if let Some(text) = text.filter(|t| !t.is_empty()) {
            p.notice role="status" { (text) }
        }
    }
}

/// `GET /assets/style.css`, embedded in the binary.
pub(crate) async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLESHEET).into_response()
}

/// Unknown paths.
pub(crate) async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        error_page(StatusCode::NOT_FOUND, "there is no such page"),
    )
        .into_response()
}

/// A time as operators read it (UTC, to the second).
pub(crate) fn time(at: DateTime<Utc>) -> Markup {
    html! { time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M:%S UTC")) } }
}

/// A duration in seconds, short (`4m 12s`).
pub(crate) fn age(seconds: f64) -> String {
    if !seconds.is_finite() || seconds <= 0.0 {
        return "0s".into();
    }
    let whole = seconds.round() as u64;
    humantime::format_duration(Duration::from_secs(whole)).to_string()
}

/// `path?key=value&...` with the pairs whose value is set, encoded.
pub(crate) fn link(path: &str, pairs: &[(&str, Option<&str>)]) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (key, value) in pairs {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            query.append_pair(key, value);
            any = true;
        }
    }
    if any {
        format!("{path}?{}", query.finish())
    } else {
        path.to_owned()
    }
}
