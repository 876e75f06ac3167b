//! CHOM's rows as Rust values, and the statuses sites, backups and
//! certificates move through. Rows holding a secret's hash (VPS
//! credentials, API tokens) have no field for it: the hash is written and
//! compared in SQL, never loaded into a value that could be printed.

use std::fmt;
use std::io::Write;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::Text;
use diesel::{AsExpression, FromSqlRow, Insertable, Queryable, Selectable};
use serde::{Deserialize, Serialize};

use crate::schema::{
    api_tokens, backups, quota_breaches, security_incidents, sites, ssl_certificates, tenant_quotas, tenants,
    users, vps_servers,
};

/// Implements text conversions (Display, FromStr, diesel Text) for a status
/// enum, so the column's CHECK constraint and the enum name the same words.
macro_rules! text_status {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// Every status, in lifecycle order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The status as stored in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($ty::$variant),)+
                    other => Err(format!("unknown {} {other:?}", stringify!($ty))),
                }
            }
        }

        impl ToSql<Text, Pg> for $ty {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
                out.write_all(self.as_str().as_bytes())?;
                Ok(IsNull::No)
            }
        }

        impl FromSql<Text, Pg> for $ty {
            fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
                let text = <String as FromSql<Text, Pg>>::from_sql(bytes)?;
                text.parse().map_err(Into::into)
            }
        }
    };
}

/// Where a site is in its lifecycle. Soft deletion is separate
/// ([`Site::deleted_at`]), so a deleted site keeps its last status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AsExpression, FromSqlRow)]
#[diesel(sql_type = Text)]
#[serde(rename_all = "snake_case")]
pub enum SiteStatus {
    /// Created, not yet provisioned.
    Pending,
    /// A provisioning job is working on it.
    Provisioning,
    /// Provisioned and serving.
    Active,
    /// Provisioning failed; see [`Site::provision_error`].
    Failed,
}

text_status!(SiteStatus {
    Pending => "pending",
    Provisioning => "provisioning",
    Active => "active",
    Failed => "failed",
});

/// Where a backup is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AsExpression, FromSqlRow)]
#[diesel(sql_type = Text)]
#[serde(rename_all = "snake_case")]
pub enum BackupStatus {
    /// Queued, not started.
    Pending,
    /// The backup job is running.
    Running,
    /// Finished; size and duration are known.
    Completed,
    /// Finished with an error; see [`Backup::error`].
    Failed,
}

text_status!(BackupStatus {
    Pending => "pending",
    Running => "running",
    Completed => "completed",
    Failed => "failed",
});

/// A team member's role in its tenant. A tenant has at most one owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AsExpression, FromSqlRow)]
#[diesel(sql_type = Text)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Owns the tenant; changes only by a transfer of ownership.
    Owner,
    /// Manages the team and the sites.
    Admin,
    /// Works on the sites.
    Member,
}

text_status!(Role {
    Owner => "owner",
    Admin => "admin",
    Member => "member",
});

/// Where an SSL certificate is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AsExpression, FromSqlRow)]
#[diesel(sql_type = Text)]
#[serde(rename_all = "snake_case")]
pub enum CertificateStatus {
    /// Requested from the issuer, not issued yet.
    Requested,
    /// Issued and in use; the expiry check watches it.
    Issued,
    /// Replaced by a newer issued certificate of the same site.
    Superseded,
}

text_status!(CertificateStatus {
    Requested => "requested",
    Issued => "issued",
    Superseded => "superseded",
});

/// A customer account; owns users and sites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = tenants, check_for_backend(Pg))]
pub struct Tenant {
    /// Row id.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// When the tenant was created.
    pub created_at: DateTime<Utc>,
}

/// A person in a tenant; the recipient of notifications.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = users, check_for_backend(Pg))]
pub struct User {
    /// Row id.
    pub id: i64,
    /// The tenant the user belongs to.
    pub tenant_id: i64,
    /// Lower-cased email address, unique.
    pub email: String,
    /// Display name.
    pub name: String,
    /// When the user was created.
    pub created_at: DateTime<Utc>,
}

/// A hosted website.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = sites, check_for_backend(Pg))]
pub struct Site {
    /// Row id; also the `aggregate_id` of the site's events.
    pub id: i64,
    /// The owning tenant.
    pub tenant_id: i64,
    /// Lower-cased domain name, unique among live sites.
    pub domain: String,
    /// Lifecycle status.
    pub status: SiteStatus,
    /// Why the last provisioning failed.
    pub provision_error: Option<String>,
    /// Storage used, as measured by the last completed backup.
    pub storage_bytes: i64,
    /// When the site was created.
    pub created_at: DateTime<Utc>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
    /// When the site was soft-deleted; `None` while it is live.
    pub deleted_at: Option<DateTime<Utc>>,
}

/// One backup run of a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = backups, check_for_backend(Pg))]
pub struct Backup {
    /// Row id; also the `aggregate_id` of the backup's events.
    pub id: i64,
    /// The site backed up.
    pub site_id: i64,
    /// The site's tenant.
    pub tenant_id: i64,
    /// Lifecycle status.
    pub status: BackupStatus,
    /// Size of the finished backup.
    pub size_bytes: Option<i64>,
    /// How long the backup took.
    pub duration_ms: Option<i64>,
    /// Why the backup failed.
    pub error: Option<String>,
    /// When the backup started.
    pub created_at: DateTime<Utc>,
    /// When it completed or failed.
    pub completed_at: Option<DateTime<Utc>>,
}

/// A current member of a tenant's team: the user and its role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable)]
pub struct TeamMember {
    /// The user's id.
    pub user_id: i64,
    /// The tenant.
    pub tenant_id: i64,
    /// The user's email.
    pub email: String,
    /// The user's name.
    pub name: String,
    /// The member's role.
    pub role: Role,
    /// When the user joined the team.
    pub joined_at: DateTime<Utc>,
    /// When the role last changed.
    pub updated_at: DateTime<Utc>,
}

/// An SSL certificate of a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = ssl_certificates, check_for_backend(Pg))]
pub struct SslCertificate {
    /// Row id; also the `aggregate_id` of its events.
    pub id: i64,
    /// The site.
    pub site_id: i64,
    /// The site's tenant.
    pub tenant_id: i64,
    /// The domain it covers.
    pub domain: String,
    /// Lifecycle status.
    pub status: CertificateStatus,
    /// Who issued it, once issued.
    pub issuer: Option<String>,
    /// When it was requested.
    pub requested_at: DateTime<Utc>,
    /// When it was issued.
    pub issued_at: Option<DateTime<Utc>>,
    /// When it expires, once issued.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A tenant's virtual server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = vps_servers, check_for_backend(Pg))]
pub struct VpsServer {
    /// Row id; also the `aggregate_id` of its events.
    pub id: i64,
    /// The tenant.
    pub tenant_id: i64,
    /// Host name, unique.
    pub hostname: String,
    /// When it was added.
    pub created_at: DateTime<Utc>,
}

/// An API token, without its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = api_tokens, check_for_backend(Pg))]
pub struct ApiToken {
    /// Row id; also the `aggregate_id` of its events.
    pub id: i64,
    /// The tenant.
    pub tenant_id: i64,
    /// Name, unique within the tenant.
    pub name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was last rotated.
    pub rotated_at: Option<DateTime<Utc>>,
}

/// What the failed-login detector found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = security_incidents, check_for_backend(Pg))]
pub struct SecurityIncident {
    /// Row id; also the `aggregate_id` of its event.
    pub id: i64,
    /// The user's tenant.
    pub tenant_id: i64,
    /// The targeted user.
    pub user_id: i64,
    /// `failed_logins`.
    pub kind: String,
    /// Failed sign-ins within the window.
    pub attempts: i32,
    /// The window's length.
    pub window_seconds: i32,
    /// The first counted attempt.
    pub first_attempt_at: DateTime<Utc>,
    /// The last one.
    pub last_attempt_at: DateTime<Utc>,
    /// When it was detected.
    pub detected_at: DateTime<Utc>,
}

/// A tenant's plan limits; `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = tenant_quotas, check_for_backend(Pg))]
pub struct TenantQuota {
    /// The tenant.
    pub tenant_id: i64,
    /// The plan's name.
    pub plan: String,
    /// Live sites allowed.
    pub max_sites: Option<i64>,
    /// Storage allowed (live sites' measured storage).
    pub max_storage_bytes: Option<i64>,
    /// Bytes served a calendar month.
    pub monthly_bandwidth_bytes: Option<i64>,
    /// When the limits last changed.
    pub updated_at: DateTime<Utc>,
}

/// A quota that was exceeded, with the event recorded for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Queryable, Selectable)]
#[diesel(table_name = quota_breaches, check_for_backend(Pg))]
pub struct QuotaBreach {
    /// Row id.
    pub id: i64,
    /// The tenant.
    pub tenant_id: i64,
    /// `sites`, `storage` or `bandwidth`.
    pub quota: String,
    /// The limit.
    #[diesel(column_name = limit_value)]
    pub limit: i64,
    /// The usage that exceeded (or, for sites, met) it.
    pub used: i64,
    /// The site concerned, if any.
    pub site_id: Option<i64>,
    /// The `quota.*` event recorded with it.
    pub event_id: uuid::Uuid,
    /// When.
    pub detected_at: DateTime<Utc>,
}

#[derive(Insertable)]
#[diesel(table_name = sites)]
pub(crate) struct NewSite<'a> {
    pub tenant_id: i64,
    pub domain: &'a str,
    pub status: SiteStatus,
}

#[derive(Insertable)]
#[diesel(table_name = backups)]
pub(crate) struct NewBackup {
    pub site_id: i64,
    pub tenant_id: i64,
    pub status: BackupStatus,
}

#[derive(Insertable)]
#[diesel(table_name = users)]
pub(crate) struct NewUser<'a> {
    pub tenant_id: i64,
    pub email: &'a str,
    pub name: &'a str,
}
