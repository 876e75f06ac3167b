//! Tenants and their users. The seed has no events for them, so these are
//! plain writes without the outbox.

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

/// Creates a user of `tenant_id`. The email is lower-cased and must be
/// unused; [`ChomError::Conflict`] otherwise.
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
        // FOR KEY SHARE: the tenant cannot be deleted under us, while other
        // writers for the same tenant are not blocked.
        let tenant = tenants::table
            .find(tenant_id)
            .select(tenants::id)
            .for_key_share()
            .first::<i64>(conn)
            .optional()?;
        if tenant.is_none() {
            return Err(ChomError::NotFound {
                what: "tenant",
                id: tenant_id,
            });
        }
        diesel::insert_into(users::table)
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
            })
    })
}

/// The users of `tenant_id`, oldest first: the recipients of the tenant's
/// notifications.
pub fn list_users(conn: &mut PgConnection, tenant_id: i64) -> Result<Vec<User>> {
    Ok(users::table
        .filter(users::tenant_id.eq(tenant_id))
        .order(users::id)
        .select(User::as_select())
        .load(conn)?)
}

/// A trimmed, non-empty name of at most 255 bytes.
fn display_name<'a>(field: &'static str, name: &'a str) -> Result<&'a str> {
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
