//! Volley's database layer.
//!
//! Every public call is `async` and runs its diesel work on tokio's blocking pool: diesel and
//! r2d2 block, including `pool.get()`, and must never run on the executor.

mod batches;
mod columns;
mod dispatch;
mod execution;
mod guard;
mod idempotency;
mod keys;
pub mod listing;
pub mod ops;
pub mod progress;
mod quotas;
mod schema;
pub mod status;
pub mod testing;
pub mod webhooks;

use diesel::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use r2d2::ManageConnection;

pub use batches::{BatchView, JobSummary, JobView, NewJob};
pub use dispatch::{Held, Released, Turns};
pub use execution::{EachResult, Refusal, SweepReport};
pub use idempotency::Idempotent;
pub use keys::{ApiKey, CreatedKey, hash_key};
pub use quotas::{MAX_WEIGHT, OverQuota, QuotaChange, QuotaKind, Quotas, Submitter};
pub use webhooks::NewWebhook;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

type PgPool = Pool<Manager>;

/// A configured duration in milliseconds as a query parameter, saturating rather than wrapping.
pub(crate) fn millis(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// diesel's manager, with a liveness check on checkout that costs no round trip. A pooled
/// connection outlives a PostgreSQL restart (or `pg_terminate_backend`) but is dead, and diesel
/// only notices when a query on it fails: each one would fail one request after every restart
/// (the fault-injection suite saw those 500s). Pinging on checkout found them but cost every
/// request a round trip, which under load is a wake-up of the backend and of the caller. A
/// server that ends a session says so and closes the socket, so reading what arrived while
/// the connection sat idle (non-blocking) finds the same dead connections.
#[derive(Debug)]
pub struct Manager(ConnectionManager<PgConnection>);

impl ManageConnection for Manager {
    type Connection = PgConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<PgConnection, Self::Error> {
        self.0.connect()
    }

    fn is_valid(&self, conn: &mut PgConnection) -> Result<(), Self::Error> {
        // An error is a closed socket. The first read may only take the server's goodbye
        // (libpq hands it to the notice processor, as Volley never LISTENs); the second then
        // meets the end of the stream. On a live idle connection both find nothing.
        for _ in 0..2 {
            if let Some(Err(e)) = conn.notifications_iter().next() {
                return Err(diesel::r2d2::Error::QueryError(e));
            }
        }
        Ok(())
    }

    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        self.0.has_broken(conn)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database pool: {0}")]
    Pool(#[from] r2d2::Error),
    /// Shown with its causes: diesel's own message for a row it could not read names only the
    /// field, its cause the value.
    #[error("database: {}", with_causes(.0))]
    Query(#[from] diesel::result::Error),
    #[error("migrations: {0}")]
    Migration(String),
    #[error("database task: {0}")]
    Task(String),
}

/// An error's message followed by its causes'.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

impl DbError {
    /// Whether the database answered and refused the statement (a value it cannot store, a
    /// constraint): retrying the same statement cannot succeed. Connection and transaction
    /// failures (an outage, a restart) are not refusals.
    pub fn is_refusal(&self) -> bool {
        use diesel::result::{DatabaseErrorKind as K, Error as E};
        match self {
            DbError::Query(E::DatabaseError(
                K::ClosedConnection
                | K::UnableToSendCommand
                | K::SerializationFailure
                | K::ReadOnlyTransaction,
                _,
            )) => false,
            DbError::Query(E::DatabaseError(..) | E::SerializationError(_)) => true,
            _ => false,
        }
    }
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
        let manager = Manager(ConnectionManager::<PgConnection>::new(url));
        let pool = Pool::builder()
            .max_size(size)
            .min_idle(Some(0))
            .connection_timeout(std::time::Duration::from_secs(5))
            // See [`Manager::is_valid`]: no round trip.
            .test_on_check_out(true)
            .build_unchecked(manager);
        Ok(Db { pool })
    }

    /// Runs `f` with a pooled connection on the blocking pool.
    pub async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PooledConnection<Manager>) -> Result<T, DbError> + Send + 'static,
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
