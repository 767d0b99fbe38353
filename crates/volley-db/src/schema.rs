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

diesel::joinable!(jobs -> batches (batch_id));
diesel::joinable!(idempotency_keys -> batches (batch_id));
diesel::allow_tables_to_appear_in_same_query!(api_keys, batches, jobs, idempotency_keys);
