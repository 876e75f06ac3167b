//! Team services: roles, removal, ownership transfer; the events they
//! record, and that a rolled-back change records none.

use chom::ChomError;
use chom::models::Role;
use chom::services::team::{change_role, get_member, list_members, remove_member, transfer_ownership};
use chom::services::tenants;
use diesel::prelude::*;
use outbox::{Metadata, Outbox};
use serde_json::json;

use crate::support::{assert_envelope, assert_rolled_back, event_count, events, failing_metadata, setup};

/// A tenant with an owner, an admin-to-be and a member.
fn team(conn: &mut PgConnection) -> (i64, [chom::User; 3]) {
    let tenant = tenants::create_tenant(conn, "Acme").unwrap();
    let owner = tenants::create_user(conn, tenant.id, "owner@acme.test", "Olive").unwrap();
    let second = tenants::create_user(conn, tenant.id, "ada@acme.test", "Ada").unwrap();
    let third = tenants::create_user(conn, tenant.id, "max@acme.test", "Max").unwrap();
    (tenant.id, [owner, second, third])
}

fn roles(conn: &mut PgConnection, tenant: i64) -> Vec<(i64, Role)> {
    list_members(conn, tenant)
        .unwrap()
        .into_iter()
        .map(|m| (m.user_id, m.role))
        .collect()
}

#[test]
fn the_first_user_owns_the_team_and_later_ones_are_members() {
    let (_db, mut conn) = setup();
    let (tenant, [owner, second, third]) = team(&mut conn);
    assert_eq!(
        roles(&mut conn, tenant),
        [
            (owner.id, Role::Owner),
            (second.id, Role::Member),
            (third.id, Role::Member)
        ]
    );
    let member = get_member(&mut conn, second.id).unwrap();
    assert_eq!(member.email, "ada@acme.test");
    assert_eq!(member.tenant_id, tenant);
    assert_eq!(event_count(&mut conn), 0, "joining records no event");
}

#[test]
fn change_role_records_member_role_changed() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, [owner, second, _]) = team(&mut conn);
    let actor = format!("user:{}", owner.id);

    let changed = change_role(&outbox, &mut conn, Metadata::by(&actor), second.id, Role::Admin).unwrap();

    assert_eq!(changed.value.role, Role::Admin);
    assert_eq!(changed.event_type, "team.member_role_changed");
    let rows = events(&mut conn);
    assert_eq!(rows.len(), 1);
    assert_envelope(
        &rows[0],
        changed.event_id,
        "team.member_role_changed",
        "team",
        tenant,
        tenant,
        Some(&actor),
    );
    assert_eq!(
        rows[0].payload,
        json!({
            "tenant_id": tenant,
            "user_id": second.id,
            "email": "ada@acme.test",
            "previous_role": "member",
            "role": "admin",
        })
    );
    assert_eq!(get_member(&mut conn, second.id).unwrap().role, Role::Admin);
}

#[test]
fn role_changes_that_do_not_apply_record_nothing() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (_, [owner, second, _]) = team(&mut conn);

    let of_owner = change_role(&outbox, &mut conn, Metadata::system(), owner.id, Role::Admin);
    assert!(
        matches!(&of_owner, Err(ChomError::InvalidState { status, .. }) if status == "owner"),
        "{of_owner:?}"
    );
    let to_owner = change_role(&outbox, &mut conn, Metadata::system(), second.id, Role::Owner);
    assert!(
        matches!(to_owner, Err(ChomError::InvalidInput { field: "role", .. })),
        "{to_owner:?}"
    );
    let same = change_role(&outbox, &mut conn, Metadata::system(), second.id, Role::Member);
    assert!(matches!(same, Err(ChomError::Conflict(_))), "{same:?}");
    let unknown = change_role(&outbox, &mut conn, Metadata::system(), 999, Role::Admin);
    assert!(
        matches!(
            unknown,
            Err(ChomError::NotFound {
                what: "team member",
                id: 999
            })
        ),
        "{unknown:?}"
    );
    assert_eq!(event_count(&mut conn), 0);
}

#[test]
fn a_role_change_that_cannot_be_recorded_rolls_back() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, [owner, second, third]) = team(&mut conn);
    let before = roles(&mut conn, tenant);

    assert_rolled_back(change_role(
        &outbox,
        &mut conn,
        failing_metadata(),
        second.id,
        Role::Admin,
    ));
    assert_rolled_back(remove_member(&outbox, &mut conn, failing_metadata(), third.id));
    assert_rolled_back(transfer_ownership(
        &outbox,
        &mut conn,
        failing_metadata(),
        tenant,
        second.id,
    ));

    assert_eq!(roles(&mut conn, tenant), before, "every change rolled back");
    assert_eq!(before[0], (owner.id, Role::Owner));
    assert_eq!(event_count(&mut conn), 0);
}

#[test]
fn remove_member_records_member_removed_and_the_owner_stays() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, [owner, second, third]) = team(&mut conn);

    let removed = remove_member(&outbox, &mut conn, Metadata::by("user:1"), third.id).unwrap();

    assert_eq!(removed.value.user_id, third.id);
    let rows = events(&mut conn);
    assert_eq!(rows.len(), 1);
    assert_envelope(
        &rows[0],
        removed.event_id,
        "team.member_removed",
        "team",
        tenant,
        tenant,
        Some("user:1"),
    );
    assert_eq!(
        rows[0].payload,
        json!({"tenant_id": tenant, "user_id": third.id, "email": "max@acme.test", "role": "member"})
    );
    assert_eq!(
        roles(&mut conn, tenant),
        [(owner.id, Role::Owner), (second.id, Role::Member)]
    );
    // The user row stays, out of the team.
    assert_eq!(tenants::list_users(&mut conn, tenant).unwrap().len(), 3);
    let again = remove_member(&outbox, &mut conn, Metadata::system(), third.id);
    assert!(matches!(again, Err(ChomError::NotFound { .. })), "{again:?}");
    let of_owner = remove_member(&outbox, &mut conn, Metadata::system(), owner.id);
    assert!(
        matches!(&of_owner, Err(ChomError::InvalidState { action: "remove", .. })),
        "{of_owner:?}"
    );
    assert_eq!(event_count(&mut conn), 1);
}

#[test]
fn transfer_ownership_records_ownership_transferred() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, [owner, second, third]) = team(&mut conn);
    let actor = format!("user:{}", owner.id);

    let moved = transfer_ownership(&outbox, &mut conn, Metadata::by(&actor), tenant, third.id).unwrap();

    assert_eq!(moved.value.user_id, third.id);
    assert_eq!(moved.value.role, Role::Owner);
    assert_eq!(
        roles(&mut conn, tenant),
        [
            (third.id, Role::Owner),
            (owner.id, Role::Admin),
            (second.id, Role::Member)
        ],
        "the previous owner is an admin"
    );
    let rows = events(&mut conn);
    assert_eq!(rows.len(), 1);
    assert_envelope(
        &rows[0],
        moved.event_id,
        "team.ownership_transferred",
        "team",
        tenant,
        tenant,
        Some(&actor),
    );
    assert_eq!(
        rows[0].payload,
        json!({
            "tenant_id": tenant,
            "previous_owner_id": owner.id,
            "previous_owner_email": "owner@acme.test",
            "new_owner_id": third.id,
            "new_owner_email": "max@acme.test",
        })
    );
}

#[test]
fn ownership_moves_only_to_another_member_of_the_team() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, [owner, _, _]) = team(&mut conn);
    let other = tenants::create_tenant(&mut conn, "Globex").unwrap();
    let stranger = tenants::create_user(&mut conn, other.id, "g@globex.test", "G").unwrap();

    let outside = transfer_ownership(&outbox, &mut conn, Metadata::system(), tenant, stranger.id);
    assert!(
        matches!(outside, Err(ChomError::InvalidInput { .. })),
        "{outside:?}"
    );
    let to_self = transfer_ownership(&outbox, &mut conn, Metadata::system(), tenant, owner.id);
    assert!(matches!(to_self, Err(ChomError::Conflict(_))), "{to_self:?}");
    let no_tenant = transfer_ownership(&outbox, &mut conn, Metadata::system(), 999, owner.id);
    assert!(
        matches!(no_tenant, Err(ChomError::NotFound { what: "tenant", .. })),
        "{no_tenant:?}"
    );
    assert_eq!(event_count(&mut conn), 0);
    assert_eq!(roles(&mut conn, other.id), [(stranger.id, Role::Owner)]);
}
