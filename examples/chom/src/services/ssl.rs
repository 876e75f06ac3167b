//! SSL certificates of sites: requested, issued (simulated: the caller
//! says by whom and until when), and watched for expiry. Events:
//! `ssl.certificate_requested`, `ssl.certificate_issued`,
//! `ssl.certificate_expiring`.

use chrono::{DateTime, SubsecRound, Utc};
use diesel::dsl::{exists, now};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Timestamptz};
use outbox::{Metadata, Outbox};

use crate::error::{ChomError, Result};
use crate::events::{SSL_CERTIFICATE_EXPIRING, SSL_CERTIFICATE_ISSUED, SSL_CERTIFICATE_REQUESTED};
use crate::events::{SslCertificateExpiring, SslCertificateIssued, SslCertificateRequested};
use crate::models::{CertificateStatus, Site, SslCertificate};
use crate::schema::{sites, ssl_certificates, ssl_expiry_warnings};
use crate::services::tenants::display_name;
use crate::services::{Recorded, is_unique_violation};

/// Longest expiry warning window, in days.
pub const MAX_WINDOW_DAYS: u32 = 365;

/// Requests a certificate for a live site: inserts a `requested`
/// certificate for the site's domain and records
/// `ssl.certificate_requested`. A site has at most one open request
/// ([`ChomError::Conflict`]).
pub fn request_certificate(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    site_id: i64,
) -> Result<Recorded<SslCertificate>> {
    outbox.transaction_with(conn, metadata, |tx| {
        let site = share_live_site(tx.conn(), site_id)?;
        let certificate = diesel::insert_into(ssl_certificates::table)
            .values((
                ssl_certificates::site_id.eq(site.id),
                ssl_certificates::tenant_id.eq(site.tenant_id),
                ssl_certificates::domain.eq(&site.domain),
            ))
            .returning(SslCertificate::as_returning())
            .get_result::<SslCertificate>(tx.conn())
            .map_err(|error| {
                if is_unique_violation(&error, "ssl_certificates_one_request") {
                    ChomError::Conflict(format!("site {site_id} already has a certificate request open"))
                } else {
                    error.into()
                }
            })?;
        let event_id = tx.record(&SslCertificateRequested {
            certificate_id: certificate.id,
            site_id: site.id,
            tenant_id: site.tenant_id,
            domain: site.domain,
        })?;
        Ok(Recorded::one(certificate, event_id, SSL_CERTIFICATE_REQUESTED))
    })
}

/// Issues a `requested` certificate (simulated: `issuer` and `expires_at`
/// are arguments), supersedes the site's older issued certificates, and
/// records `ssl.certificate_issued`. `expires_at` must be in the future.
pub fn issue_certificate(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    certificate_id: i64,
    issuer: &str,
    expires_at: DateTime<Utc>,
) -> Result<Recorded<SslCertificate>> {
    let issuer = display_name("issuer", issuer)?.to_owned();
    if expires_at <= Utc::now() {
        return Err(ChomError::invalid("expires_at", "must be in the future"));
    }
    // Postgres keeps microseconds: the event carries the stored time.
    let expires_at = expires_at.trunc_subsecs(6);
    outbox.transaction_with(conn, metadata, |tx| {
        let certificate = lock_certificate(tx.conn(), certificate_id)?;
        if certificate.status != CertificateStatus::Requested {
            return Err(ChomError::InvalidState {
                what: "certificate",
                id: certificate_id,
                status: certificate.status.to_string(),
                action: "issue",
            });
        }
        share_live_site(tx.conn(), certificate.site_id)?;
        diesel::update(
            ssl_certificates::table
                .filter(ssl_certificates::site_id.eq(certificate.site_id))
                .filter(ssl_certificates::status.eq(CertificateStatus::Issued)),
        )
        .set(ssl_certificates::status.eq(CertificateStatus::Superseded))
        .execute(tx.conn())?;
        // issued_at was just set, so it is not NULL in the returned row.
        let (issued, issued_at) = diesel::update(ssl_certificates::table.find(certificate_id))
            .set((
                ssl_certificates::status.eq(CertificateStatus::Issued),
                ssl_certificates::issuer.eq(&issuer),
                ssl_certificates::issued_at.eq(now),
                ssl_certificates::expires_at.eq(expires_at),
            ))
            .returning((
                SslCertificate::as_returning(),
                ssl_certificates::issued_at.assume_not_null(),
            ))
            .get_result::<(SslCertificate, DateTime<Utc>)>(tx.conn())?;
        let event_id = tx.record(&SslCertificateIssued {
            certificate_id,
            site_id: issued.site_id,
            tenant_id: issued.tenant_id,
            domain: issued.domain.clone(),
            issuer,
            issued_at,
            expires_at,
        })?;
        Ok(Recorded::one(issued, event_id, SSL_CERTIFICATE_ISSUED))
    })
}

/// The expiry check: records `ssl.certificate_expiring` for every issued
/// certificate of a live site that expires within `within_days` days (and
/// has not expired yet), once per certificate and window. Run it with 30,
/// then with 7: a certificate gets one warning per window. Each warning
/// commits in its own transaction with its `ssl_expiry_warnings` row.
/// Returns the certificates warned about, soonest expiry first.
pub fn check_expiring(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    within_days: u32,
) -> Result<Vec<Recorded<SslCertificate>>> {
    if within_days == 0 || within_days > MAX_WINDOW_DAYS {
        return Err(ChomError::invalid(
            "within_days",
            format!("must be between 1 and {MAX_WINDOW_DAYS}"),
        ));
    }
    let window = i32::try_from(within_days).unwrap_or(i32::MAX);
    #[derive(QueryableByName)]
    struct Candidate {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let candidates: Vec<Candidate> = diesel::sql_query(
        "SELECT c.id FROM ssl_certificates c
         JOIN sites s ON s.id = c.site_id AND s.deleted_at IS NULL
         WHERE c.status = 'issued'
           AND c.expires_at > now()
           AND c.expires_at <= now() + make_interval(days => $1)
           AND NOT EXISTS (SELECT 1 FROM ssl_expiry_warnings w
                           WHERE w.certificate_id = c.id AND w.window_days = $1)
         ORDER BY c.expires_at, c.id",
    )
    .bind::<Integer, _>(window)
    .load(conn)?;
    let mut warned = Vec::new();
    for candidate in candidates {
        if let Some(recorded) = warn_once(outbox, conn, metadata.clone(), candidate.id, window)? {
            warned.push(recorded);
        }
    }
    Ok(warned)
}

/// One certificate's warning: checked again under the certificate's lock,
/// since another check may have warned about it meanwhile.
fn warn_once(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    certificate_id: i64,
    window_days: i32,
) -> Result<Option<Recorded<SslCertificate>>> {
    outbox.transaction_with(conn, metadata, |tx| {
        let certificate = lock_certificate(tx.conn(), certificate_id)?;
        let Some(expires_at) = certificate.expires_at else {
            return Ok(None);
        };
        let checked_at: DateTime<Utc> =
            diesel::select(now.into_sql::<Timestamptz>()).get_result(tx.conn())?;
        let site_live: bool = diesel::select(exists(
            sites::table
                .find(certificate.site_id)
                .filter(sites::deleted_at.is_null()),
        ))
        .get_result(tx.conn())?;
        let warned: bool = diesel::select(exists(
            ssl_expiry_warnings::table.find((certificate_id, window_days)),
        ))
        .get_result(tx.conn())?;
        let in_window = expires_at > checked_at
            && expires_at <= checked_at + chrono::Duration::days(i64::from(window_days));
        if certificate.status != CertificateStatus::Issued || !site_live || warned || !in_window {
            return Ok(None);
        }
        let event_id = tx.record(&SslCertificateExpiring {
            certificate_id,
            site_id: certificate.site_id,
            tenant_id: certificate.tenant_id,
            domain: certificate.domain.clone(),
            expires_at,
            days_remaining: (expires_at - checked_at).num_days(),
            window_days,
        })?;
        diesel::insert_into(ssl_expiry_warnings::table)
            .values((
                ssl_expiry_warnings::certificate_id.eq(certificate_id),
                ssl_expiry_warnings::window_days.eq(window_days),
                ssl_expiry_warnings::event_id.eq(event_id),
            ))
            .execute(tx.conn())?;
        Ok(Some(Recorded::one(
            certificate,
            event_id,
            SSL_CERTIFICATE_EXPIRING,
        )))
    })
}

/// The certificate with id `certificate_id`.
pub fn get_certificate(conn: &mut PgConnection, certificate_id: i64) -> Result<SslCertificate> {
    ssl_certificates::table
        .find(certificate_id)
        .select(SslCertificate::as_select())
        .first(conn)
        .optional()?
        .ok_or(ChomError::NotFound {
            what: "certificate",
            id: certificate_id,
        })
}

/// Certificates, oldest first, of one site, of one tenant, or of all.
pub fn list_certificates(
    conn: &mut PgConnection,
    site_id: Option<i64>,
    tenant_id: Option<i64>,
) -> Result<Vec<SslCertificate>> {
    let mut query = ssl_certificates::table
        .order(ssl_certificates::id)
        .select(SslCertificate::as_select())
        .into_boxed();
    if let Some(site_id) = site_id {
        query = query.filter(ssl_certificates::site_id.eq(site_id));
    }
    if let Some(tenant_id) = tenant_id {
        query = query.filter(ssl_certificates::tenant_id.eq(tenant_id));
    }
    Ok(query.load(conn)?)
}

fn lock_certificate(conn: &mut PgConnection, certificate_id: i64) -> Result<SslCertificate> {
    ssl_certificates::table
        .find(certificate_id)
        .select(SslCertificate::as_select())
        .for_update()
        .first(conn)
        .optional()?
        .ok_or(ChomError::NotFound {
            what: "certificate",
            id: certificate_id,
        })
}

/// A live site, share-locked: it cannot be deleted until this transaction
/// ends.
fn share_live_site(conn: &mut PgConnection, site_id: i64) -> Result<Site> {
    sites::table
        .find(site_id)
        .filter(sites::deleted_at.is_null())
        .select(Site::as_select())
        .for_share()
        .first(conn)
        .optional()?
        .ok_or(ChomError::NotFound {
            what: "site",
            id: site_id,
        })
}
