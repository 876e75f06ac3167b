//! Tenants and users: plain writes, no events.

use chom::ChomError;
use chom::services::tenants::{create_tenant, create_user, get_tenant, list_users};

use crate::support::{event_count, setup};

#[test]
fn tenants_and_users_record_no_events() {
    let (_db, mut conn) = setup();
    let tenant = create_tenant(&mut conn, "  Acme  ").unwrap();
    assert_eq!(tenant.name, "Acme");
    assert_eq!(get_tenant(&mut conn, tenant.id).unwrap(), tenant);
    let user = create_user(&mut conn, tenant.id, "Ann@Acme.Test", "Ann").unwrap();
    assert_eq!(user.email, "ann@acme.test");
    assert_eq!(list_users(&mut conn, tenant.id).unwrap(), [user]);
    assert_eq!(event_count(&mut conn), 0);
}

#[test]
fn user_errors() {
    let (_db, mut conn) = setup();
    let tenant = create_tenant(&mut conn, "Acme").unwrap();
    create_user(&mut conn, tenant.id, "ann@acme.test", "Ann").unwrap();

    let duplicate = create_user(&mut conn, tenant.id, "ANN@acme.test", "Ann again");
    assert!(matches!(duplicate, Err(ChomError::Conflict(_))), "{duplicate:?}");
    let unknown = create_user(&mut conn, 999, "bob@acme.test", "Bob");
    assert!(
        matches!(
            unknown,
            Err(ChomError::NotFound {
                what: "tenant",
                id: 999
            })
        ),
        "{unknown:?}"
    );
    let invalid = create_user(&mut conn, tenant.id, "not an email", "Bob");
    assert!(
        matches!(invalid, Err(ChomError::InvalidInput { field: "email", .. })),
        "{invalid:?}"
    );
    let nameless = create_tenant(&mut conn, " ");
    assert!(
        matches!(nameless, Err(ChomError::InvalidInput { field: "name", .. })),
        "{nameless:?}"
    );
    assert_eq!(list_users(&mut conn, tenant.id).unwrap().len(), 1);
}
