//! Secrets CHOM hands out (VPS credentials, API tokens): generated with the
//! operating system's random source, shown once to whoever asked, stored
//! only as their SHA-256.
//!
//! [`Secret`] has no `Display`, no `Serialize`, and a `Debug` that prints
//! `Secret(***)`, so a secret cannot reach a log line, an error or a JSON
//! document by accident; [`Secret::expose`] is the one way to the text.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Random bytes in a generated secret (256 bits).
pub const SECRET_BYTES: usize = 32;

/// Prefix of a VPS credential.
pub const VPS_CREDENTIAL_PREFIX: &str = "chomvps_";
/// Prefix of an API token.
pub const API_TOKEN_PREFIX: &str = "chomtok_";

/// A secret in memory. Dropped, it is gone: CHOM keeps only its hash.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A new secret: `prefix` and the lower-case hex of [`SECRET_BYTES`]
    /// random bytes.
    pub fn generate(prefix: &str) -> Self {
        let mut bytes = [0u8; SECRET_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        Self(format!("{prefix}{}", hex(&bytes)))
    }

    /// Wraps a secret someone presented (a token to verify).
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The secret itself: to show it once, or to hand it to the server it
    /// unlocks. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The lower-case hex SHA-256 of the secret: what the tables store.
    pub fn sha256_hex(&self) -> String {
        sha256_hex(&self.0)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The lower-case hex SHA-256 of `text`.
pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_shows_in_debug() {
        let secret = Secret::generate(API_TOKEN_PREFIX);
        assert!(secret.expose().starts_with(API_TOKEN_PREFIX));
        assert_eq!(secret.expose().len(), API_TOKEN_PREFIX.len() + 2 * SECRET_BYTES);
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        assert_eq!(format!("{:?}", Some(&secret)), "Some(Secret(***))");
        assert_ne!(Secret::generate(API_TOKEN_PREFIX), secret, "random");
    }

    #[test]
    fn the_hash_is_sha256_in_hex() {
        // The published SHA-256 of "abc".
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let secret = Secret::new("abc");
        assert_eq!(secret.sha256_hex(), sha256_hex("abc"));
    }
}
