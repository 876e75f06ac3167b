//! Diesel table definitions for the library's own tables (see `migrations/`).

#![allow(missing_docs)]

diesel::table! {
    outbox_events (seq) {
        seq -> Int8,
        event_id -> Uuid,
        event_type -> Text,
        aggregate_type -> Text,
        aggregate_id -> Text,
        tenant_id -> Nullable<Text>,
        occurred_at -> Timestamptz,
        actor -> Nullable<Text>,
        correlation_id -> Nullable<Text>,
        causation_id -> Nullable<Text>,
        traceparent -> Nullable<Text>,
        schema_version -> Int4,
        payload -> Jsonb,
        recorded_at -> Timestamptz,
        published_at -> Nullable<Timestamptz>,
        attempts -> Int4,
        last_error -> Nullable<Text>,
        next_attempt_at -> Nullable<Timestamptz>,
        failed_at -> Nullable<Timestamptz>,
        unroutable_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    failed_jobs (id) {
        id -> Int8,
        uuid -> Uuid,
        queue -> Text,
        listener -> Text,
        event_id -> Nullable<Uuid>,
        event_type -> Nullable<Text>,
        payload -> Jsonb,
        exception -> Text,
        attempts -> Int4,
        errors -> Jsonb,
        failed_at -> Timestamptz,
    }
}

diesel::table! {
    processed_events (listener, event_id) {
        listener -> Text,
        event_id -> Uuid,
        processed_at -> Timestamptz,
    }
}

diesel::table! {
    outbox_leases (id) {
        id -> Int8,
        owner -> Text,
        expires_at -> Timestamptz,
        seqs -> Array<Int8>,
        created_at -> Timestamptz,
        aggregate_keys -> Nullable<Array<Int8>>,
    }
}

diesel::table! {
    outbox_control (id) {
        id -> Bool,
        paused -> Bool,
        paused_by -> Nullable<Text>,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    /// Queued listeners registered by the workers that run them.
    outbox_listeners (app, listener) {
        /// Queue-name prefix of the worker's app.
        app -> Text,
        /// The listener's name.
        listener -> Text,
        /// The exchange its queue is bound to.
        exchange -> Text,
        /// `<app>.<listener>`.
        queue -> Text,
        /// `<queue>.retry.<delay>`, one per distinct delay.
        retry_queues -> Array<Text>,
        /// `<queue>.dead`.
        dead_queue -> Text,
        /// The event types the queue is bound to.
        event_types -> Array<Text>,
        /// The worker that registered it last.
        worker_id -> Text,
        /// When.
        registered_at -> Timestamptz,
        /// Whether it keeps an inbox (`None`: registered by an earlier release).
        inbox -> Nullable<Bool>,
    }
}

diesel::table! {
    /// Relays alive: one row per running relay, heartbeated.
    outbox_relays (relay_id) {
        relay_id -> Text,
        hostname -> Text,
        pid -> Int4,
        version -> Text,
        started_at -> Timestamptz,
        heartbeat_at -> Timestamptz,
    }
}

diesel::table! {
    /// Payload edits of edit-and-retry: the original and the edit, who and when.
    failed_job_edits (id) {
        id -> Int8,
        failed_job_uuid -> Uuid,
        listener -> Text,
        queue -> Text,
        event_id -> Nullable<Uuid>,
        event_type -> Nullable<Text>,
        original -> Jsonb,
        edited -> Jsonb,
        edited_by -> Text,
        edited_at -> Timestamptz,
    }
}

diesel::table! {
    /// Webhook endpoints (feature `webhooks`).
    webhook_endpoints (id) {
        id -> Int8,
        url -> Text,
        description -> Text,
        event_types -> Array<Text>,
        status -> Text,
        disabled_reason -> Nullable<Text>,
        disabled_at -> Nullable<Timestamptz>,
        oauth_token_url -> Nullable<Text>,
        oauth_client_id -> Nullable<Text>,
        oauth_client_secret -> Nullable<Text>,
        oauth_scope -> Nullable<Text>,
        failed_deliveries -> Int4,
        failing_since -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        rate_limit -> Nullable<Int4>,
    }
}

diesel::table! {
    /// Webhook signing secrets.
    webhook_secrets (id) {
        id -> Int8,
        endpoint_id -> Int8,
        secret -> Text,
        created_at -> Timestamptz,
        retires_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    /// Every webhook delivery try.
    webhook_deliveries (id) {
        id -> Int8,
        endpoint_id -> Int8,
        event_id -> Uuid,
        event_type -> Text,
        attempt -> Int4,
        at -> Timestamptz,
        status_code -> Nullable<Int4>,
        duration_ms -> Float8,
        delivered -> Bool,
        excerpt -> Nullable<Text>,
        error -> Nullable<Text>,
    }
}

diesel::joinable!(webhook_secrets -> webhook_endpoints (endpoint_id));

diesel::allow_tables_to_appear_in_same_query!(
    outbox_events,
    outbox_leases,
    failed_jobs,
    processed_events,
    outbox_control,
    outbox_listeners,
    outbox_relays,
    failed_job_edits,
    webhook_endpoints,
    webhook_secrets,
    webhook_deliveries
);
