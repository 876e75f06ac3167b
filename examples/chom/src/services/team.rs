//! A tenant's team: its members and their roles (one owner, admins,
//! members). Events: `team.member_role_changed`, `team.member_removed`,
//! `team.ownership_transferred`.
//!
//! Every team change locks the tenant's row first
//! (`FOR NO KEY UPDATE`), so one tenant's team events commit in
//! the order they were recorded and two transfers cannot both win. A user
//! joins the team when [`create_user`](super::tenants::create_user) creates
//! it: as the owner if the team has none, else as a member.

use diesel::dsl::{exists, now};
use diesel::prelude::*;
use outbox::{Metadata, Outbox};

use crate::error::{ChomError, Result};
use crate::events::{OwnershipTransferred, TeamMemberRemoved, TeamMemberRoleChanged};
use crate::events::{TEAM_MEMBER_REMOVED, TEAM_MEMBER_ROLE_CHANGED, TEAM_OWNERSHIP_TRANSFERRED};
use crate::models::{Role, TeamMember};
use crate::schema::{team_members, users};
use crate::services::{Recorded, lock_tenant_for_team_change};

/// The current members of `tenant_id`'s team, the owner first, then by
/// when they joined.
pub fn list_members(conn: &mut PgConnection, tenant_id: i64) -> Result<Vec<TeamMember>> {
    let mut members: Vec<TeamMember> = members_query()
        .filter(team_members::tenant_id.eq(tenant_id))
        .order(team_members::user_id)
        .load(conn)?;
    members.sort_by_key(|m| m.role != Role::Owner);
    Ok(members)
}

/// The membership of `user_id`; [`ChomError::NotFound`] (`team member`) if
/// the user is in no team.
pub fn get_member(conn: &mut PgConnection, user_id: i64) -> Result<TeamMember> {
    members_query()
        .filter(team_members::user_id.eq(user_id))
        .first(conn)
        .optional()?
        .ok_or(ChomError::NotFound {
            what: "team member",
            id: user_id,
        })
}

/// Makes a member an `admin` or a `member` and records
/// `team.member_role_changed` with the role before and after.
///
/// The owner's role changes only by [`transfer_ownership`]
/// ([`ChomError::InvalidState`]); asking for `owner` is
/// [`ChomError::InvalidInput`]; asking for the role it has is a
/// [`ChomError::Conflict`].
pub fn change_role(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    user_id: i64,
    role: Role,
) -> Result<Recorded<TeamMember>> {
    if role == Role::Owner {
        return Err(ChomError::invalid(
            "role",
            "a team gets a new owner by a transfer of ownership, not a role change",
        ));
    }
    outbox.transaction_with(conn, metadata, |tx| {
        let member = locked_member(tx.conn(), user_id)?;
        if member.role == Role::Owner {
            return Err(ChomError::InvalidState {
                what: "team member",
                id: user_id,
                status: member.role.to_string(),
                action: "change the role of",
            });
        }
        if member.role == role {
            return Err(ChomError::Conflict(format!(
                "team member {user_id} is already {role}"
            )));
        }
        diesel::update(team_members::table.find(user_id))
            .set((team_members::role.eq(role), team_members::updated_at.eq(now)))
            .execute(tx.conn())?;
        let changed = get_member(tx.conn(), user_id)?;
        let event_id = tx.record(&TeamMemberRoleChanged {
            tenant_id: changed.tenant_id,
            user_id,
            email: changed.email.clone(),
            previous_role: member.role.to_string(),
            role: role.to_string(),
        })?;
        Ok(Recorded::one(changed, event_id, TEAM_MEMBER_ROLE_CHANGED))
    })
}

/// Removes a member from its team and records `team.member_removed`
/// (returning the membership as it was). The owner cannot be removed
/// ([`ChomError::InvalidState`]): transfer the ownership first.
pub fn remove_member(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    user_id: i64,
) -> Result<Recorded<TeamMember>> {
    outbox.transaction_with(conn, metadata, |tx| {
        let member = locked_member(tx.conn(), user_id)?;
        if member.role == Role::Owner {
            return Err(ChomError::InvalidState {
                what: "team member",
                id: user_id,
                status: member.role.to_string(),
                action: "remove",
            });
        }
        diesel::delete(team_members::table.find(user_id)).execute(tx.conn())?;
        let event_id = tx.record(&TeamMemberRemoved {
            tenant_id: member.tenant_id,
            user_id,
            email: member.email.clone(),
            role: member.role.to_string(),
        })?;
        Ok(Recorded::one(member, event_id, TEAM_MEMBER_REMOVED))
    })
}

/// Makes `new_owner_id`, a member of `tenant_id`'s team, its owner; the
/// previous owner becomes an admin. Records `team.ownership_transferred`
/// and returns the new owner's membership.
///
/// A user outside the team is [`ChomError::InvalidInput`]; the owner itself
/// is a [`ChomError::Conflict`].
pub fn transfer_ownership(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    tenant_id: i64,
    new_owner_id: i64,
) -> Result<Recorded<TeamMember>> {
    outbox.transaction_with(conn, metadata, |tx| {
        lock_tenant_for_team_change(tx.conn(), tenant_id)?;
        let next = members_query()
            .filter(team_members::user_id.eq(new_owner_id))
            .filter(team_members::tenant_id.eq(tenant_id))
            .first::<TeamMember>(tx.conn())
            .optional()?
            .ok_or_else(|| {
                ChomError::invalid(
                    "new owner",
                    format!("user {new_owner_id} is not in tenant {tenant_id}'s team"),
                )
            })?;
        if next.role == Role::Owner {
            return Err(ChomError::Conflict(format!(
                "user {new_owner_id} already owns tenant {tenant_id}"
            )));
        }
        let previous = members_query()
            .filter(team_members::tenant_id.eq(tenant_id))
            .filter(team_members::role.eq(Role::Owner))
            .first::<TeamMember>(tx.conn())
            .optional()?;
        // Demote first: the unique index allows one owner at a time.
        if let Some(previous) = &previous {
            diesel::update(team_members::table.find(previous.user_id))
                .set((
                    team_members::role.eq(Role::Admin),
                    team_members::updated_at.eq(now),
                ))
                .execute(tx.conn())?;
        }
        diesel::update(team_members::table.find(new_owner_id))
            .set((
                team_members::role.eq(Role::Owner),
                team_members::updated_at.eq(now),
            ))
            .execute(tx.conn())?;
        let owner = get_member(tx.conn(), new_owner_id)?;
        let event_id = tx.record(&OwnershipTransferred {
            tenant_id,
            previous_owner_id: previous.as_ref().map(|p| p.user_id),
            previous_owner_email: previous.map(|p| p.email),
            new_owner_id,
            new_owner_email: owner.email.clone(),
        })?;
        Ok(Recorded::one(owner, event_id, TEAM_OWNERSHIP_TRANSFERRED))
    })
}

/// Adds a new user to its tenant's team: as the owner if the team has
/// none, else as a member. Runs in the caller's transaction, which has
/// locked the tenant ([`lock_tenant_for_team_change`]).
pub(crate) fn join(conn: &mut PgConnection, tenant_id: i64, user_id: i64) -> Result<Role> {
    let has_owner: bool = diesel::select(exists(
        team_members::table
            .filter(team_members::tenant_id.eq(tenant_id))
            .filter(team_members::role.eq(Role::Owner)),
    ))
    .get_result(conn)?;
    let role = if has_owner { Role::Member } else { Role::Owner };
    diesel::insert_into(team_members::table)
        .values((
            team_members::user_id.eq(user_id),
            team_members::tenant_id.eq(tenant_id),
            team_members::role.eq(role),
        ))
        .execute(conn)?;
    Ok(role)
}

/// The member `user_id` after locking its tenant against other team
/// changes; read again after the lock, since it may have changed while
/// this transaction waited.
fn locked_member(conn: &mut PgConnection, user_id: i64) -> Result<TeamMember> {
    let tenant_id = team_members::table
        .find(user_id)
        .select(team_members::tenant_id)
        .first::<i64>(conn)
        .optional()?
        .ok_or(ChomError::NotFound {
            what: "team member",
            id: user_id,
        })?;
    lock_tenant_for_team_change(conn, tenant_id)?;
    get_member(conn, user_id)
}

type MemberColumns = (
    team_members::user_id,
    team_members::tenant_id,
    users::email,
    users::name,
    team_members::role,
    team_members::created_at,
    team_members::updated_at,
);

const MEMBER_COLUMNS: MemberColumns = (
    team_members::user_id,
    team_members::tenant_id,
    users::email,
    users::name,
    team_members::role,
    team_members::created_at,
    team_members::updated_at,
);

fn members_query() -> diesel::dsl::IntoBoxed<
    'static,
    diesel::dsl::Select<diesel::dsl::InnerJoin<team_members::table, users::table>, MemberColumns>,
    diesel::pg::Pg,
> {
    team_members::table
        .inner_join(users::table)
        .select(MEMBER_COLUMNS)
        .into_boxed()
}
