//! A fresh, migrated database per test, dropped afterwards, so tests run in parallel.

use diesel::{Connection, PgConnection, RunQueryDsl};

use crate::{Db, DbError, NewJob};

/// The server tests use; `VOLLEY_TEST_DATABASE_URL` overrides it (its path names the
/// maintenance database, usually `postgres`).
fn server_url() -> String {
    std::env::var("VOLLEY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `n` completion jobs (`qwen3-8b`, prompts `p0`, `p1`, ...), the jobs of a test batch.
pub fn completions(n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob {
            inference_type: "LLM".into(),
            endpoint: "/v1/completions".into(),
            model: "qwen3-8b".into(),
            body: serde_json::json!({"model": "qwen3-8b", "prompt": format!("p{i}")}),
            custom_id: None,
        })
        .collect()
}

pub struct TestDatabase {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> Result<(TestDatabase, Db), DbError> {
        let admin_url = server_url();
        let name = format!("volley_test_{}", uuid::Uuid::new_v4().simple());
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b.to_owned())
            .unwrap_or_else(|| admin_url.clone());
        let url = format!("{base}/{name}");
        let (a, n) = (admin_url.clone(), name.clone());
        tokio::task::spawn_blocking(move || -> Result<(), DbError> {
            let mut c = PgConnection::establish(&a)
                .map_err(|e| DbError::Migration(format!("connect {a}: {e}")))?;
            diesel::sql_query(format!("CREATE DATABASE \"{n}\"")).execute(&mut c)?;
            Ok(())
        })
        .await
        .map_err(|e| DbError::Task(e.to_string()))??;
        let db = Db::new(&url, 8)?;
        db.migrate().await?;
        Ok((
            TestDatabase {
                name,
                url,
                admin_url,
            },
            db,
        ))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (a, n) = (self.admin_url.clone(), self.name.clone());
        // Drop may run inside or outside a runtime; a plain thread works in both.
        let _ = std::thread::spawn(move || {
            if let Ok(mut c) = PgConnection::establish(&a) {
                let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{n}\" WITH (FORCE)"))
                    .execute(&mut c);
            }
        })
        .join();
    }
}
