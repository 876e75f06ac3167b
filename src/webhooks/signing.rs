//! Signing by the Standard Webhooks specification: `webhook-id`,
//! `webhook-timestamp` and `webhook-signature`, the last `v1,` + base64
//! HMAC-SHA256 of `id.timestamp.body` under the secret (`whsec_` + base64
//! key). With two secrets (a rotation) both sign, space-separated.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use ring::signature::{Ed25519KeyPair, KeyPair};
use sha2::Sha256;

use crate::error::{Error, Result};

/// The prefix of every HMAC (`v1`) secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// The prefix of an ed25519 (`v1a`) secret key: base64 of its 32-byte seed
/// (or of the 64-byte seed and public key).
pub const ED25519_SECRET_PREFIX: &str = "whsk_";
/// The prefix of an ed25519 public key: base64 of its 32 bytes.
pub const PUBLIC_KEY_PREFIX: &str = "whpk_";

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

/// A new random ed25519 secret key: `whsk_` + base64 of a 32-byte seed.
pub fn new_ed25519_secret() -> Secret {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    Secret(format!("{ED25519_SECRET_PREFIX}{}", STANDARD.encode(seed)))
}

/// Whether `secret` is an ed25519 (`v1a`) secret key.
pub fn is_ed25519(secret: &Secret) -> bool {
    secret.0.starts_with(ED25519_SECRET_PREFIX)
}

/// Checks a secret's shape (`whsec_` + base64 of 24 to 64 bytes, or
/// `whsk_` + base64 of an ed25519 seed or key pair).
pub fn validate_secret(secret: &Secret) -> Result<()> {
    if is_ed25519(secret) {
        return key_pair_of(secret).map(|_| ());
    }
    key_of(secret).map(|_| ())
}

/// The public key (`whpk_` + base64) of an ed25519 secret key, for the
/// subscriber; `None` for an HMAC secret.
pub fn public_key(secret: &Secret) -> Result<Option<String>> {
    if !is_ed25519(secret) {
        return Ok(None);
    }
    let pair = key_pair_of(secret)?;
    Ok(Some(format!(
        "{PUBLIC_KEY_PREFIX}{}",
        STANDARD.encode(pair.public_key().as_ref())
    )))
}

fn key_pair_of(secret: &Secret) -> Result<Ed25519KeyPair> {
    let bad =
        || Error::InvalidInput("an ed25519 secret key is whsk_ followed by base64 of 32 or 64 bytes".into());
    let encoded = secret.0.strip_prefix(ED25519_SECRET_PREFIX).ok_or_else(bad)?;
    let key = STANDARD.decode(encoded).map_err(|_| bad())?;
    match key.len() {
        32 => Ed25519KeyPair::from_seed_unchecked(&key).map_err(|_| bad()),
        64 => Ed25519KeyPair::from_seed_and_public_key(&key[..32], &key[32..]).map_err(|_| bad()),
        _ => Err(bad()),
    }
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

/// `v1,<base64 signature>` of `id.timestamp.body` under an HMAC `secret`,
/// or `v1a,<base64 ed25519 signature>` under an ed25519 secret key.
pub fn sign(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> Result<String> {
    if is_ed25519(secret) {
        let pair = key_pair_of(secret)?;
        let mut message = Vec::with_capacity(id.len() + body.len() + 24);
        message.extend_from_slice(id.as_bytes());
        message.push(b'.');
        message.extend_from_slice(timestamp.to_string().as_bytes());
        message.push(b'.');
        message.extend_from_slice(body);
        return Ok(format!("v1a,{}", STANDARD.encode(pair.sign(&message).as_ref())));
    }
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

    #[test]
    fn ed25519_signs_the_specifications_example_and_verifies_with_the_public_key() {
        // The asymmetric signing example of the Standard Webhooks
        // reference libraries' tests (the seed is base64 of 32 bytes).
        let secret = Secret::new("whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=");
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).ok();
        assert_eq!(
            signature.as_deref(),
            Some(
                "v1a,tQ9V2XOqn7jL/DQenEFpqIugdBVtiMmER5mhSkXBNwM0mkATuDe6KYYUuxqtaiHeYGb7KaaBRdM5WqyeFiL8Ag=="
            )
        );
        // A fresh key: the signature verifies with its public key only.
        let secret = new_ed25519_secret();
        assert!(validate_secret(&secret).is_ok());
        let public = public_key(&secret).ok().flatten().unwrap_or_default();
        let public = STANDARD
            .decode(public.strip_prefix(PUBLIC_KEY_PREFIX).unwrap_or_default())
            .unwrap_or_default();
        let signature = sign(&secret, "msg_1", 1700000000, b"{}").unwrap_or_default();
        let raw = STANDARD
            .decode(signature.strip_prefix("v1a,").unwrap_or_default())
            .unwrap_or_default();
        let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public);
        assert!(key.verify(b"msg_1.1700000000.{}", &raw).is_ok());
        assert!(key.verify(b"msg_1.1700000001.{}", &raw).is_err());
        assert_eq!(public_key(&new_secret()).ok().flatten(), None);
        assert!(validate_secret(&Secret::new("whsk_AAAA")).is_err());
        assert!(!format!("{secret:?}").contains(&secret.expose()[5..]));
    }
}
