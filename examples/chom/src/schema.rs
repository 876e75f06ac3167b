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

diesel::table! {
    team_members (user_id) {
        user_id -> Int8,
        tenant_id -> Int8,
        role -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    ssl_certificates (id) {
        id -> Int8,
        site_id -> Int8,
        tenant_id -> Int8,
        domain -> Text,
        status -> Text,
        issuer -> Nullable<Text>,
        requested_at -> Timestamptz,
        issued_at -> Nullable<Timestamptz>,
        expires_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    ssl_expiry_warnings (certificate_id, window_days) {
        certificate_id -> Int8,
        window_days -> Int4,
        event_id -> Uuid,
        warned_at -> Timestamptz,
    }
}

diesel::table! {
    vps_servers (id) {
        id -> Int8,
        tenant_id -> Int8,
        hostname -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    vps_credentials (id) {
        id -> Int8,
        vps_id -> Int8,
        secret_sha256 -> Text,
        created_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    api_tokens (id) {
        id -> Int8,
        tenant_id -> Int8,
        name -> Text,
        token_sha256 -> Text,
        created_at -> Timestamptz,
        rotated_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    failed_logins (id) {
        id -> Int8,
        user_id -> Int8,
        tenant_id -> Int8,
        source_ip -> Text,
        attempted_at -> Timestamptz,
    }
}

diesel::table! {
    security_incidents (id) {
        id -> Int8,
        tenant_id -> Int8,
        user_id -> Int8,
        kind -> Text,
        attempts -> Int4,
        window_seconds -> Int4,
        first_attempt_at -> Timestamptz,
        last_attempt_at -> Timestamptz,
        detected_at -> Timestamptz,
    }
}

diesel::table! {
    tenant_quotas (tenant_id) {
        tenant_id -> Int8,
        plan -> Text,
        max_sites -> Nullable<Int8>,
        max_storage_bytes -> Nullable<Int8>,
        monthly_bandwidth_bytes -> Nullable<Int8>,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    bandwidth_usage (site_id, month) {
        site_id -> Int8,
        tenant_id -> Int8,
        month -> Date,
        bytes -> Int8,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    quota_breaches (id) {
        id -> Int8,
        tenant_id -> Int8,
        quota -> Text,
        limit_value -> Int8,
        used -> Int8,
        site_id -> Nullable<Int8>,
        event_id -> Uuid,
        detected_at -> Timestamptz,
    }
}

diesel::joinable!(users -> tenants (tenant_id));
diesel::joinable!(sites -> tenants (tenant_id));
diesel::joinable!(backups -> sites (site_id));
diesel::joinable!(notifications -> users (user_id));
diesel::joinable!(tenant_stats -> tenants (tenant_id));
diesel::joinable!(team_members -> users (user_id));
diesel::joinable!(ssl_certificates -> sites (site_id));
diesel::joinable!(ssl_expiry_warnings -> ssl_certificates (certificate_id));
diesel::joinable!(vps_servers -> tenants (tenant_id));
diesel::joinable!(vps_credentials -> vps_servers (vps_id));
diesel::joinable!(api_tokens -> tenants (tenant_id));
diesel::joinable!(failed_logins -> users (user_id));
diesel::joinable!(security_incidents -> users (user_id));
diesel::joinable!(tenant_quotas -> tenants (tenant_id));
diesel::joinable!(bandwidth_usage -> sites (site_id));
diesel::joinable!(quota_breaches -> tenants (tenant_id));

diesel::allow_tables_to_appear_in_same_query!(
    tenants,
    users,
    sites,
    backups,
    audit_logs,
    notifications,
    tenant_stats,
    team_members,
    ssl_certificates,
    ssl_expiry_warnings,
    vps_servers,
    vps_credentials,
    api_tokens,
    failed_logins,
    security_incidents,
    tenant_quotas,
    bandwidth_usage,
    quota_breaches
);
