//! Signing by the Standard Webhooks specification: `webhook-id`,
//! `webhook-timestamp` and `webhook-signature`, the last `v1,` + base64
//! HMAC-SHA256 of `id.timestamp.body` under the secret (`whsec_` + base64
//! key). With two secrets (a rotation) both sign, space-separated.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::error::{Error, Result};

/// The prefix of every secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A signing secret or another credential: `Debug` and `Display` never
/// show it; [`expose`](Self::expose) does, for the one place that needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `text`.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A new random signing secret: `whsec_` + base64 of 32 random bytes.
pub fn new_secret() -> Secret {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    Secret(format!("{SECRET_PREFIX}{}", STANDARD.encode(key)))
}

/// Checks a secret's shape (`whsec_` + base64 of 24 to 64 bytes).
pub fn validate_secret(secret: &Secret) -> Result<()> {
    key_of(secret).map(|_| ())
}

fn key_of(secret: &Secret) -> Result<Vec<u8>> {
    let encoded = secret
        .0
        .strip_prefix(SECRET_PREFIX)
        .ok_or_else(|| Error::InvalidInput(format!("a webhook secret starts with {SECRET_PREFIX}")))?;
    let key = STANDARD
        .decode(encoded)
        .map_err(|_| Error::InvalidInput("a webhook secret is whsec_ followed by base64".into()))?;
    if !(24..=64).contains(&key.len()) {
        return Err(Error::InvalidInput(
            "a webhook secret holds 24 to 64 bytes".into(),
        ));
    }
    Ok(key)
}

/// `v1,<base64 signature>` of `id.timestamp.body` under `secret`.
pub fn sign(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> Result<String> {
    let key = key_of(secret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key)
        .map_err(|_| Error::InvalidInput("a webhook secret cannot key HMAC-SHA256".into()))?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())))
}

/// The `webhook-signature` header: one signature per secret.
pub fn signature_header(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8]) -> Result<String> {
    let signatures: Result<Vec<String>> = secrets.iter().map(|s| sign(s, id, timestamp, body)).collect();
    Ok(signatures?.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specifications_example_signs_as_published() {
        // The example of the Standard Webhooks specification.
        let secret = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).ok();
        assert_eq!(
            signature.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        assert!(!format!("{secret:?}").contains("MfKQ"));
        assert!(validate_secret(&Secret::new("nope")).is_err());
        assert!(validate_secret(&new_secret()).is_ok());
    }
}
