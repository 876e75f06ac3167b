//! Headers on every response: a strict Content-Security-Policy (nothing
//! but this origin's stylesheet; no script at all), no framing, no
//! sniffing, no referrer, and no caching of pages (they hold payloads).
//! `Server-Timing: app;dur=<ms>` gives the time the server spent on the
//! request (what `outbox bench dashboard` reports).

use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

/// The policy: pages use only `/assets/style.css`; inline SVG charts are
/// markup, not script.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Adds the headers.
pub(crate) async fn headers(request: Request, next: Next) -> Response {
    let is_asset = request.uri().path().starts_with("/assets/");
    let started = std::time::Instant::now();
    let mut response = next.run(request).await;
    let spent = started.elapsed().as_secs_f64() * 1000.0;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if is_asset {
            "public, max-age=3600"
        } else {
            "no-store"
        }),
    );
    if let Ok(timing) = HeaderValue::from_str(&format!("app;dur={spent:.3}")) {
        headers.insert("server-timing", timing);
    }
    response
}
