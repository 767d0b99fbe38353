//! Volley's database layer.
//!
//! Every public call is `async` and runs its diesel work on tokio's blocking pool: diesel and
//! r2d2 block, including `pool.get()`, and must never run on the executor.

mod batches;
mod keys;
pub mod ops;
mod schema;
mod state;
pub mod status;
pub mod testing;
pub mod usage;

use diesel::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

pub use batches::{BatchView, JobDispatch, JobSummary, JobView, NewJob};
pub use keys::{ApiKey, CreatedKey, hash_key};
pub use state::{Claim, Event, Outcome, SweepReport, Usage};

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

type PgPool = Pool<ConnectionManager<PgConnection>>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database pool: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("database: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("migrations: {0}")]
    Migration(String),
    #[error("database task: {0}")]
    Task(String),
}

/// A handle on the pool; cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: PgPool,
}

impl Db {
    /// Builds the pool without connecting yet, so that a service can start (and report
    /// not-ready) while PostgreSQL is still coming up.
    pub fn new(url: &str, size: u32) -> Result<Db, DbError> {
        let manager = ConnectionManager::<PgConnection>::new(url);
        let pool = Pool::builder()
            .max_size(size)
            .min_idle(Some(0))
            .connection_timeout(std::time::Duration::from_secs(5))
            // A pooled connection outlives a PostgreSQL restart but is dead, and diesel only
            // notices when a query on it fails: without this ping each one would fail one
            // request after every restart (the fault-injection suite saw those 500s).
            .test_on_check_out(true)
            .build_unchecked(manager);
        Ok(Db { pool })
    }

    /// Runs `f` with a pooled connection on the blocking pool.
    pub async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PooledConnection<ConnectionManager<PgConnection>>) -> Result<T, DbError>
            + Send
            + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            f(&mut conn)
        })
        .await
        .map_err(|e| DbError::Task(e.to_string()))?
    }

    /// Applies pending migrations; returns the versions applied.
    pub async fn migrate(&self) -> Result<Vec<String>, DbError> {
        self.run(|conn| {
            let done = conn
                .run_pending_migrations(MIGRATIONS)
                .map_err(|e| DbError::Migration(e.to_string()))?;
            Ok(done.iter().map(|v| v.to_string()).collect())
        })
        .await
    }

    /// Whether a connection can be had and answers.
    pub async fn ping(&self) -> bool {
        use diesel::RunQueryDsl;
        self.run(|conn| {
            diesel::sql_query("SELECT 1").execute(&mut **conn)?;
            Ok(())
        })
        .await
        .is_ok()
    }
}
