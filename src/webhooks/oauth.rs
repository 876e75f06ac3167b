//! OAuth2 client credentials for endpoints that want a bearer token: the
//! token is fetched from the endpoint's token URL (client id and secret by
//! HTTP Basic, RFC 6749 section 2.3.1) and cached by the delivery listener
//! until shortly before it expires. The client secret never appears in an
//! error or a log line.

use std::time::Duration;

use serde::Deserialize;

use super::endpoints::OAuthSettings;

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A token and how long it lives (an hour when the server does not say).
pub(crate) async fn fetch_token(
    client: &reqwest::Client,
    oauth: &OAuthSettings,
) -> Result<(String, Duration), String> {
    let mut form = vec![("grant_type", "client_credentials")];
    if let Some(scope) = oauth.scope.as_deref() {
        form.push(("scope", scope));
    }
    let response = client
        .post(&oauth.token_url)
        .basic_auth(&oauth.client_id, Some(oauth.client_secret.expose()))
        .form(&form)
        .send()
        .await
        .map_err(|e| {
            format!(
                "cannot reach the token URL {}: {}",
                oauth.token_url,
                super::describe(&e)
            )
        })?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!(
            "the token URL {} refused client {}: HTTP {}",
            oauth.token_url,
            oauth.client_id,
            status.as_u16()
        ));
    }
    let text = super::read_bounded(response, 64 * 1024).await;
    let token: TokenResponse = serde_json::from_str(&text)
        .map_err(|e| format!("the token URL {} answered no usable token: {e}", oauth.token_url))?;
    if token
        .token_type
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
    {
        return Err(format!(
            "the token URL {} gave a token that is not a bearer token",
            oauth.token_url
        ));
    }
    Ok((
        token.access_token,
        Duration::from_secs(token.expires_in.unwrap_or(3600)),
    ))
}
