// Mirrors migrations/; keep in step with them.

diesel::table! {
    api_keys (id) {
        id -> Int8,
        name -> Text,
        owner -> Text,
        key_hash -> Bytea,
        key_prefix -> Text,
        created_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
        admin -> Bool,
        webhook_secret -> Text,
        webhook_secret_previous -> Nullable<Text>,
        webhook_secret_rotated_at -> Nullable<Timestamptz>,
        max_active_jobs -> Nullable<Int4>,
        max_jobs_per_minute -> Nullable<Int4>,
        dispatch_weight -> Int4,
    }
}

diesel::table! {
    batches (id) {
        id -> Int8,
        owner -> Text,
        label -> Nullable<Text>,
        total -> Int4,
        created_at -> Timestamptz,
        published_at -> Nullable<Timestamptz>,
        metadata -> Jsonb,
        webhook_url -> Nullable<Text>,
        webhook_types -> Nullable<Array<Text>>,
        webhook_key_id -> Nullable<Int8>,
        webhook_pending -> Nullable<Int4>,
        api_key_id -> Nullable<Int8>,
        priority -> Int2,
    }
}

diesel::table! {
    jobs (id) {
        id -> Int8,
        batch_id -> Int8,
        owner -> Text,
        inference_type -> Text,
        endpoint -> Text,
        model -> Text,
        body -> Jsonb,
        status -> Text,
        attempt -> Int4,
        created_at -> Timestamptz,
        available_at -> Timestamptz,
        dispatched_at -> Nullable<Timestamptz>,
        started_at -> Nullable<Timestamptz>,
        lease_until -> Nullable<Timestamptz>,
        finished_at -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
        result -> Nullable<Jsonb>,
        error_type -> Nullable<Text>,
        error_message -> Nullable<Text>,
        last_error -> Nullable<Text>,
        prompt_tokens -> Nullable<Int8>,
        completion_tokens -> Nullable<Int8>,
        total_tokens -> Nullable<Int8>,
        outcomes -> Int4,
        attempt_base -> Int4,
        operator_retries -> Int4,
        media_keys -> Nullable<Array<Text>>,
        custom_id -> Nullable<Text>,
        webhook -> Bool,
        quota_key_id -> Nullable<Int8>,
        priority -> Int2,
    }
}

diesel::table! {
    idempotency_keys (api_key_id, idempotency_key) {
        api_key_id -> Int8,
        idempotency_key -> Text,
        request_hash -> Bytea,
        batch_id -> Int8,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    webhook_events (id) {
        id -> Int8,
        msg_id -> Text,
        batch_id -> Int8,
        job_id -> Nullable<Int8>,
        key_id -> Int8,
        owner -> Text,
        #[sql_name = "type"]
        event_type -> Text,
        url -> Text,
        created_at -> Timestamptz,
        status -> Text,
        attempts -> Int4,
        next_attempt_at -> Nullable<Timestamptz>,
        manual -> Bool,
        last_attempt_at -> Nullable<Timestamptz>,
        last_status_code -> Nullable<Int4>,
        last_error -> Nullable<Text>,
        last_response -> Nullable<Text>,
        delivered_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    webhook_endpoints (owner, url) {
        owner -> Text,
        url -> Text,
        paused_at -> Nullable<Timestamptz>,
        paused_reason -> Nullable<Text>,
    }
}

diesel::table! {
    dispatch_holds (batch_id, inference_type) {
        batch_id -> Int8,
        inference_type -> Text,
        owner -> Text,
        priority -> Int2,
        jobs -> Int4,
        created_at -> Timestamptz,
        released_at -> Nullable<Timestamptz>,
        released_upto -> Nullable<Int8>,
        released_jobs -> Int4,
        weight -> Int4,
    }
}

diesel::joinable!(jobs -> batches (batch_id));
diesel::joinable!(idempotency_keys -> batches (batch_id));
diesel::allow_tables_to_appear_in_same_query!(api_keys, batches, jobs, idempotency_keys);
