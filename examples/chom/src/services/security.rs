//! Security: VPS credentials and API tokens (generated, shown once, stored
//! as SHA-256, rotated), and the failed-login detector. Events:
//! `security.vps_credentials_rotated`, `security.api_token_rotated`,
//! `security.suspicious_activity_detected`.
//!
//! No secret leaves this module except inside a [`Secret`] returned to the
//! caller: events, rows other than the hash column, errors and logs carry
//! ids, names and times only.

use std::net::IpAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::dsl::{exists, now};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Timestamptz};
use outbox::{Metadata, Outbox};
use serde::Serialize;

use crate::error::{ChomError, Result};
use crate::events::{ApiTokenRotated, SuspiciousActivityDetected, VpsCredentialsRotated};
use crate::events::{
    SECURITY_API_TOKEN_ROTATED, SECURITY_SUSPICIOUS_ACTIVITY_DETECTED, SECURITY_VPS_CREDENTIALS_ROTATED,
};
use crate::models::{ApiToken, SecurityIncident, User, VpsServer};
use crate::schema::{
    api_tokens, failed_logins, security_incidents, tenants, users, vps_credentials, vps_servers,
};
use crate::secret::{API_TOKEN_PREFIX, Secret, VPS_CREDENTIAL_PREFIX};
use crate::services::sites::normalize_domain;
use crate::services::tenants::display_name;
use crate::services::{Recorded, is_unique_violation};

/// A rotation's result: what was recorded, and the new secret, to show
/// once. `Debug` prints the secret as `Secret(***)`.
#[derive(Debug, Clone)]
pub struct Rotated<T> {
    /// The row and the recorded event.
    pub recorded: Recorded<T>,
    /// The new secret. CHOM keeps only its hash.
    pub secret: Secret,
}

/// Adds a tenant's VPS (host name rules as for site domains) with a first
/// credential, returned once. No event: the seed has none for it.
pub fn add_vps(conn: &mut PgConnection, tenant_id: i64, hostname: &str) -> Result<(VpsServer, Secret)> {
    let hostname = normalize_domain(hostname)
        .map_err(|_| ChomError::invalid("hostname", "must be a host name such as vps1.example.com"))?;
    conn.transaction(|conn| {
        key_share_tenant(conn, tenant_id)?;
        let server = diesel::insert_into(vps_servers::table)
            .values((
                vps_servers::tenant_id.eq(tenant_id),
                vps_servers::hostname.eq(&hostname),
            ))
            .returning(VpsServer::as_returning())
            .get_result::<VpsServer>(conn)
            .map_err(|error| {
                if is_unique_violation(&error, "vps_servers_hostname_unique") {
                    ChomError::Conflict(format!("a VPS named {hostname} already exists"))
                } else {
                    error.into()
                }
            })?;
        let secret = Secret::generate(VPS_CREDENTIAL_PREFIX);
        insert_credential(conn, server.id, &secret)?;
        Ok((server, secret))
    })
}

/// Rotates a VPS's credential: revokes the current one, stores the hash of
/// a new one, and records `security.vps_credentials_rotated` with the ids
/// of both credentials (never a secret or a hash). Returns the new secret.
pub fn rotate_vps_credentials(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    vps_id: i64,
) -> Result<Rotated<VpsServer>> {
    outbox.transaction_with(conn, metadata, |tx| {
        let server = vps_servers::table
            .find(vps_id)
            .select(VpsServer::as_select())
            .for_no_key_update()
            .first::<VpsServer>(tx.conn())
            .optional()?
            .ok_or(ChomError::NotFound {
                what: "vps",
                id: vps_id,
            })?;
        let previous = diesel::update(
            vps_credentials::table
                .filter(vps_credentials::vps_id.eq(vps_id))
                .filter(vps_credentials::revoked_at.is_null()),
        )
        .set(vps_credentials::revoked_at.eq(now))
        .returning(vps_credentials::id)
        .get_result::<i64>(tx.conn())
        .optional()?;
        let secret = Secret::generate(VPS_CREDENTIAL_PREFIX);
        let (credential_id, rotated_at) = insert_credential(tx.conn(), vps_id, &secret)?;
        let event_id = tx.record(&VpsCredentialsRotated {
            vps_id,
            tenant_id: server.tenant_id,
            hostname: server.hostname.clone(),
            credential_id,
            previous_credential_id: previous,
            rotated_at,
        })?;
        Ok(Rotated {
            recorded: Recorded::one(server, event_id, SECURITY_VPS_CREDENTIALS_ROTATED),
            secret,
        })
    })
}

/// Whether `presented` is the current credential of `vps_id`.
pub fn verify_vps_credential(conn: &mut PgConnection, vps_id: i64, presented: &Secret) -> Result<bool> {
    Ok(diesel::select(exists(
        vps_credentials::table
            .filter(vps_credentials::vps_id.eq(vps_id))
            .filter(vps_credentials::revoked_at.is_null())
            .filter(vps_credentials::secret_sha256.eq(presented.sha256_hex())),
    ))
    .get_result(conn)?)
}

/// A tenant's servers, oldest first.
pub fn list_vps(conn: &mut PgConnection, tenant_id: Option<i64>) -> Result<Vec<VpsServer>> {
    let mut query = vps_servers::table
        .order(vps_servers::id)
        .select(VpsServer::as_select())
        .into_boxed();
    if let Some(tenant_id) = tenant_id {
        query = query.filter(vps_servers::tenant_id.eq(tenant_id));
    }
    Ok(query.load(conn)?)
}

/// Creates a named API token of a tenant (names unique per tenant) and
/// returns it once. No event: the seed has none for it.
pub fn create_api_token(conn: &mut PgConnection, tenant_id: i64, name: &str) -> Result<(ApiToken, Secret)> {
    let name = display_name("name", name)?;
    conn.transaction(|conn| {
        key_share_tenant(conn, tenant_id)?;
        let secret = Secret::generate(API_TOKEN_PREFIX);
        let token = diesel::insert_into(api_tokens::table)
            .values((
                api_tokens::tenant_id.eq(tenant_id),
                api_tokens::name.eq(name),
                api_tokens::token_sha256.eq(secret.sha256_hex()),
            ))
            .returning(ApiToken::as_returning())
            .get_result::<ApiToken>(conn)
            .map_err(|error| {
                if is_unique_violation(&error, "api_tokens_name_unique") {
                    ChomError::Conflict(format!("tenant {tenant_id} already has a token named {name:?}"))
                } else {
                    error.into()
                }
            })?;
        Ok((token, secret))
    })
}

/// Rotates an API token: a new secret replaces the old one's hash (the old
/// token stops verifying at commit) and `security.api_token_rotated` is
/// recorded with the token's id and name. Returns the new secret.
pub fn rotate_api_token(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    token_id: i64,
) -> Result<Rotated<ApiToken>> {
    outbox.transaction_with(conn, metadata, |tx| {
        let secret = Secret::generate(API_TOKEN_PREFIX);
        // rotated_at was just set, so it is not NULL in the returned row.
        let (token, rotated_at) = diesel::update(api_tokens::table.find(token_id))
            .set((
                api_tokens::token_sha256.eq(secret.sha256_hex()),
                api_tokens::rotated_at.eq(now),
            ))
            .returning((ApiToken::as_returning(), api_tokens::rotated_at.assume_not_null()))
            .get_result::<(ApiToken, DateTime<Utc>)>(tx.conn())
            .optional()?
            .ok_or(ChomError::NotFound {
                what: "api token",
                id: token_id,
            })?;
        let event_id = tx.record(&ApiTokenRotated {
            token_id,
            tenant_id: token.tenant_id,
            name: token.name.clone(),
            rotated_at,
        })?;
        Ok(Rotated {
            recorded: Recorded::one(token, event_id, SECURITY_API_TOKEN_ROTATED),
            secret,
        })
    })
}

/// The token `presented` is, if it is one (compared by hash).
pub fn verify_api_token(conn: &mut PgConnection, presented: &Secret) -> Result<Option<ApiToken>> {
    Ok(api_tokens::table
        .filter(api_tokens::token_sha256.eq(presented.sha256_hex()))
        .select(ApiToken::as_select())
        .first(conn)
        .optional()?)
}

/// A tenant's API tokens (without their hashes), oldest first.
pub fn list_api_tokens(conn: &mut PgConnection, tenant_id: Option<i64>) -> Result<Vec<ApiToken>> {
    let mut query = api_tokens::table
        .order(api_tokens::id)
        .select(ApiToken::as_select())
        .into_boxed();
    if let Some(tenant_id) = tenant_id {
        query = query.filter(api_tokens::tenant_id.eq(tenant_id));
    }
    Ok(query.load(conn)?)
}

/// When failed sign-ins become suspicious: `threshold` failures of one user
/// within `window`. Default 5 in 15 minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedLoginPolicy {
    /// Failures that make an incident, at least 1.
    pub threshold: u32,
    /// The sliding window, 1 second to 1 day.
    pub window: Duration,
}

impl Default for FailedLoginPolicy {
    fn default() -> Self {
        Self {
            threshold: 5,
            window: Duration::from_secs(15 * 60),
        }
    }
}

impl FailedLoginPolicy {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if self.threshold == 0 || self.threshold > 10_000 {
            return Err(ChomError::invalid("threshold", "must be between 1 and 10000"));
        }
        if self.window < Duration::from_secs(1) || self.window > Duration::from_secs(86_400) {
            return Err(ChomError::invalid("window", "must be between 1 s and 1 day"));
        }
        Ok(())
    }

    fn window_seconds(&self) -> i32 {
        i32::try_from(self.window.as_secs()).unwrap_or(i32::MAX)
    }
}

/// What [`record_failed_login`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedLogin {
    /// The stored attempt's id.
    pub attempt_id: i64,
    /// The user's failures within the policy's window, this one included.
    pub failures_in_window: i64,
    /// The incident this attempt raised, if it reached the threshold and no
    /// incident of the user was raised within the window already.
    pub incident: Option<Recorded<SecurityIncident>>,
}

/// Records a failed sign-in of `user_id` from `source_ip`. When the user's
/// failures within `policy.window` reach `policy.threshold` and no incident
/// of the user was raised within the window, inserts a security incident
/// and records `security.suspicious_activity_detected`: once per user and
/// window, whatever the number of failures after it.
///
/// Attempts of one user are serialized (a lock on the user's row), so a
/// burst of concurrent failures raises one incident.
pub fn record_failed_login(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    user_id: i64,
    source_ip: &str,
    policy: &FailedLoginPolicy,
) -> Result<FailedLogin> {
    policy.validate()?;
    let source_ip: IpAddr = source_ip
        .trim()
        .parse()
        .map_err(|_| ChomError::invalid("source_ip", "must be an IPv4 or IPv6 address"))?;
    let window_seconds = policy.window_seconds();
    outbox.transaction_with(conn, metadata, |tx| {
        let user = users::table
            .find(user_id)
            .select(User::as_select())
            .for_no_key_update()
            .first::<User>(tx.conn())
            .optional()?
            .ok_or(ChomError::NotFound {
                what: "user",
                id: user_id,
            })?;
        let attempt_id = diesel::insert_into(failed_logins::table)
            .values((
                failed_logins::user_id.eq(user.id),
                failed_logins::tenant_id.eq(user.tenant_id),
                failed_logins::source_ip.eq(source_ip.to_string()),
            ))
            .returning(failed_logins::id)
            .get_result::<i64>(tx.conn())?;
        #[derive(QueryableByName)]
        struct Window {
            #[diesel(sql_type = BigInt)]
            failures: i64,
            #[diesel(sql_type = Nullable<Timestamptz>)]
            first: Option<DateTime<Utc>>,
            #[diesel(sql_type = Nullable<Timestamptz>)]
            last: Option<DateTime<Utc>>,
            #[diesel(sql_type = BigInt)]
            recent_incidents: i64,
        }
        let window: Window = diesel::sql_query(
            "SELECT count(*) AS failures, min(attempted_at) AS first, max(attempted_at) AS last,
                    (SELECT count(*) FROM security_incidents
                     WHERE user_id = $1 AND kind = 'failed_logins'
                       AND detected_at > now() - make_interval(secs => $2)) AS recent_incidents
             FROM failed_logins
             WHERE user_id = $1 AND attempted_at > now() - make_interval(secs => $2)",
        )
        .bind::<BigInt, _>(user.id)
        .bind::<Integer, _>(window_seconds)
        .get_result(tx.conn())?;
        let reached = window.failures >= i64::from(policy.threshold);
        let (Some(first), Some(last), true, 0) =
            (window.first, window.last, reached, window.recent_incidents)
        else {
            return Ok(FailedLogin {
                attempt_id,
                failures_in_window: window.failures,
                incident: None,
            });
        };
        let attempts = i32::try_from(window.failures).unwrap_or(i32::MAX);
        let incident = diesel::insert_into(security_incidents::table)
            .values((
                security_incidents::tenant_id.eq(user.tenant_id),
                security_incidents::user_id.eq(user.id),
                security_incidents::kind.eq("failed_logins"),
                security_incidents::attempts.eq(attempts),
                security_incidents::window_seconds.eq(window_seconds),
                security_incidents::first_attempt_at.eq(first),
                security_incidents::last_attempt_at.eq(last),
            ))
            .returning(SecurityIncident::as_returning())
            .get_result::<SecurityIncident>(tx.conn())?;
        let event_id = tx.record(&SuspiciousActivityDetected {
            incident_id: incident.id,
            tenant_id: user.tenant_id,
            user_id: user.id,
            email: user.email,
            kind: incident.kind.clone(),
            attempts,
            window_seconds,
            first_attempt_at: first,
            last_attempt_at: last,
        })?;
        Ok(FailedLogin {
            attempt_id,
            failures_in_window: window.failures,
            incident: Some(Recorded::one(
                incident,
                event_id,
                SECURITY_SUSPICIOUS_ACTIVITY_DETECTED,
            )),
        })
    })
}

/// Security incidents, newest first, of one tenant or of all.
pub fn list_incidents(conn: &mut PgConnection, tenant_id: Option<i64>) -> Result<Vec<SecurityIncident>> {
    let mut query = security_incidents::table
        .order(security_incidents::id.desc())
        .select(SecurityIncident::as_select())
        .into_boxed();
    if let Some(tenant_id) = tenant_id {
        query = query.filter(security_incidents::tenant_id.eq(tenant_id));
    }
    Ok(query.load(conn)?)
}

/// Stores the hash of a new current credential of `vps_id`; returns its
/// id and creation time.
fn insert_credential(conn: &mut PgConnection, vps_id: i64, secret: &Secret) -> Result<(i64, DateTime<Utc>)> {
    Ok(diesel::insert_into(vps_credentials::table)
        .values((
            vps_credentials::vps_id.eq(vps_id),
            vps_credentials::secret_sha256.eq(secret.sha256_hex()),
        ))
        .returning((vps_credentials::id, vps_credentials::created_at))
        .get_result(conn)?)
}

/// Checks the tenant exists and keeps it from being deleted until commit.
fn key_share_tenant(conn: &mut PgConnection, tenant_id: i64) -> Result<()> {
    tenants::table
        .find(tenant_id)
        .select(tenants::id)
        .for_key_share()
        .first::<i64>(conn)
        .optional()?
        .map(|_| ())
        .ok_or(ChomError::NotFound {
            what: "tenant",
            id: tenant_id,
        })
}
