use chrono::{DateTime, Utc};
use diesel::prelude::*;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::schema::api_keys;
use crate::{Db, DbError};

/// A listed key: never the key itself.
#[derive(Debug, Clone, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = api_keys)]
pub struct ApiKey {
    pub id: i64,
    pub name: String,
    pub owner: String,
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// May read the operator view (`GET /v1/admin/status`).
    pub admin: bool,
    /// Quotas (`None`: no limit); see `quotas.rs`.
    pub max_active_jobs: Option<i32>,
    pub max_jobs_per_minute: Option<i32>,
    /// Turns in a row its owner takes in fair dispatch.
    pub dispatch_weight: i32,
}

/// A key just made; `secret` is shown once and stored only as a hash.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub key: ApiKey,
    pub secret: String,
    /// The key's webhook signing secret (`whsec_...`), shown once too.
    pub webhook_secret: String,
}

pub fn hash_key(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

impl Db {
    /// Creates a key for `owner` (the name, unless given).
    pub async fn create_key(&self, name: &str, owner: Option<&str>) -> Result<CreatedKey, DbError> {
        let mut raw = [0u8; 24];
        rand::rng().fill_bytes(&mut raw);
        let secret = format!("vk_{}", hex::encode(raw));
        let hash = hash_key(&secret);
        let prefix: String = secret.chars().take(10).collect();
        let name = name.to_owned();
        let owner = owner.unwrap_or(&name).to_owned();
        let webhook_secret = crate::webhooks::new_webhook_secret();
        let whsec = webhook_secret.clone();
        let key = self
            .run(move |conn| {
                Ok(diesel::insert_into(api_keys::table)
                    .values((
                        api_keys::name.eq(&name),
                        api_keys::owner.eq(&owner),
                        api_keys::key_hash.eq(&hash),
                        api_keys::key_prefix.eq(&prefix),
                        api_keys::webhook_secret.eq(&whsec),
                    ))
                    .returning(ApiKey::as_returning())
                    .get_result(&mut **conn)?)
            })
            .await?;
        Ok(CreatedKey {
            key,
            secret,
            webhook_secret,
        })
    }

    pub async fn list_keys(&self) -> Result<Vec<ApiKey>, DbError> {
        self.run(|conn| {
            Ok(api_keys::table
                .order(api_keys::id)
                .select(ApiKey::as_select())
                .load(&mut **conn)?)
        })
        .await
    }

    /// Revokes a key by id or by name; returns how many keys were revoked.
    pub async fn revoke_key(&self, id_or_name: &str) -> Result<usize, DbError> {
        let target = id_or_name.to_owned();
        self.run(move |conn| {
            let q = diesel::update(api_keys::table)
                .filter(api_keys::revoked_at.is_null())
                .set(api_keys::revoked_at.eq(diesel::dsl::now));
            Ok(match target.parse::<i64>() {
                Ok(id) => q.filter(api_keys::id.eq(id)).execute(&mut **conn)?,
                Err(_) => q.filter(api_keys::name.eq(&target)).execute(&mut **conn)?,
            })
        })
        .await
    }

    /// The owner of a live key, if the secret is one.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<String>, DbError> {
        let hash = hash_key(secret);
        self.run(move |conn| {
            Ok(api_keys::table
                .filter(api_keys::key_hash.eq(&hash))
                .filter(api_keys::revoked_at.is_null())
                .select(api_keys::owner)
                .first(&mut **conn)
                .optional()?)
        })
        .await
    }
}
