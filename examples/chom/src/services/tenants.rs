//! Tenants and their users. The seed has no events for them, so these are
//! plain writes without the outbox. A new user joins its tenant's team
//! ([`team`](super::team)): as the owner if the team has none, else as a
//! member.

use diesel::prelude::*;

use crate::error::{ChomError, Result};
use crate::models::{NewUser, Tenant, User};
use crate::schema::{tenants, users};
use crate::services::is_unique_violation;

/// Creates a tenant named `name` (trimmed, 1 to 255 bytes).
pub fn create_tenant(conn: &mut PgConnection, name: &str) -> Result<Tenant> {
    let name = display_name("name", name)?;
    Ok(diesel::insert_into(tenants::table)
        .values(tenants::name.eq(name))
        .returning(Tenant::as_returning())
        .get_result(conn)?)
}

/// The tenant with id `tenant_id`.
pub fn get_tenant(conn: &mut PgConnection, tenant_id: i64) -> Result<Tenant> {
    tenants::table
        .find(tenant_id)
        .select(Tenant::as_select())
        .first(conn)
        .optional()?
        .ok_or(ChomError::NotFound {
            what: "tenant",
            id: tenant_id,
        })
}

/// Creates a user of `tenant_id` and adds it to the tenant's team (the
/// owner if the team has none, else a member). The email is lower-cased
/// and must be unused; [`ChomError::Conflict`] otherwise.
pub fn create_user(conn: &mut PgConnection, tenant_id: i64, email: &str, name: &str) -> Result<User> {
    let email = email.trim().to_lowercase();
    if email.len() < 3 || email.len() > 320 || !email.contains('@') || email.contains(char::is_whitespace) {
        return Err(ChomError::invalid(
            "email",
            format!("{email:?} is not an email address"),
        ));
    }
    let name = display_name("name", name)?;
    conn.transaction(|conn| {
        // Locks the tenant against other team changes (NotFound if it does
        // not exist): whether the new user becomes the owner depends on
        // the team as it is.
        crate::services::lock_tenant_for_team_change(conn, tenant_id)?;
        let user = diesel::insert_into(users::table)
            .values(NewUser {
                tenant_id,
                email: &email,
                name,
            })
            .returning(User::as_returning())
            .get_result(conn)
            .map_err(|error| {
                if is_unique_violation(&error, "users_email_unique") {
                    ChomError::Conflict(format!("email {email} is already in use"))
                } else {
                    error.into()
                }
            })?;
        crate::services::team::join(conn, tenant_id, user.id)?;
        Ok(user)
    })
}

/// The users of `tenant_id`, oldest first, members of its team or not
/// (notifications go to the current members:
/// [`team::list_members`](super::team::list_members)).
pub fn list_users(conn: &mut PgConnection, tenant_id: i64) -> Result<Vec<User>> {
    Ok(users::table
        .filter(users::tenant_id.eq(tenant_id))
        .order(users::id)
        .select(User::as_select())
        .load(conn)?)
}

/// A trimmed, non-empty name of at most 255 bytes.
pub(crate) fn display_name<'a>(field: &'static str, name: &'a str) -> Result<&'a str> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ChomError::invalid(field, "must not be empty"));
    }
    if name.len() > 255 {
        return Err(ChomError::invalid(field, "must be at most 255 bytes"));
    }
    if name.contains('\0') {
        return Err(ChomError::invalid(field, "must not contain NUL characters"));
    }
    Ok(name)
}
