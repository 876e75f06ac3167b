//! Diesel table definitions for CHOM's tables (see `migrations/`). The
//! outbox's own tables are in [`outbox::schema`].

#![allow(missing_docs)]

diesel::table! {
    tenants (id) {
        id -> Int8,
        name -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    users (id) {
        id -> Int8,
        tenant_id -> Int8,
        email -> Text,
        name -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    sites (id) {
        id -> Int8,
        tenant_id -> Int8,
        domain -> Text,
        status -> Text,
        provision_error -> Nullable<Text>,
        storage_bytes -> Int8,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        deleted_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    backups (id) {
        id -> Int8,
        site_id -> Int8,
        tenant_id -> Int8,
        status -> Text,
        size_bytes -> Nullable<Int8>,
        duration_ms -> Nullable<Int8>,
        error -> Nullable<Text>,
        created_at -> Timestamptz,
        completed_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    audit_logs (id) {
        id -> Int8,
        tenant_id -> Nullable<Int8>,
        actor -> Nullable<Text>,
        action -> Text,
        aggregate_type -> Text,
        aggregate_id -> Text,
        event_id -> Uuid,
        details -> Jsonb,
        occurred_at -> Timestamptz,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    notifications (id) {
        id -> Int8,
        tenant_id -> Int8,
        user_id -> Int8,
        kind -> Text,
        subject -> Text,
        body -> Text,
        event_id -> Uuid,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    tenant_stats (tenant_id) {
        tenant_id -> Int8,
        site_count -> Int8,
        active_site_count -> Int8,
        storage_bytes -> Int8,
        backup_count -> Int8,
        failed_backup_count -> Int8,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    tenant_activity (event_id) {
        event_id -> Uuid,
        tenant_id -> Int8,
        event_type -> Text,
        occurred_at -> Timestamptz,
        actor -> Nullable<Text>,
        subject -> Text,
        summary -> Text,
    }
}

diesel::joinable!(users -> tenants (tenant_id));
diesel::joinable!(sites -> tenants (tenant_id));
diesel::joinable!(backups -> sites (site_id));
diesel::joinable!(notifications -> users (user_id));
diesel::joinable!(tenant_stats -> tenants (tenant_id));

diesel::allow_tables_to_appear_in_same_query!(
    tenants,
    users,
    sites,
    backups,
    audit_logs,
    notifications,
    tenant_stats
);
