//! What `batchctl status` reads from PostgreSQL: unfinished jobs per inference type.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Nullable, Text};

use crate::{Db, DbError};

/// Unfinished jobs of one inference type.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct TypeStatus {
    /// `LLM`, `IMAGE`, ...
    #[diesel(sql_type = Text)]
    pub inference_type: String,
    /// QUEUED jobs, including retries waiting out their backoff.
    #[diesel(sql_type = BigInt)]
    pub queued: i64,
    /// PROCESSING jobs: claimed by a worker and running (in flight).
    #[diesel(sql_type = BigInt)]
    pub processing: i64,
    /// How long the longest-waiting runnable QUEUED job has waited since it became runnable
    /// (accepted, or its retry came due), in seconds; `None` if nothing is waiting.
    #[diesel(sql_type = Nullable<Double>)]
    pub oldest_wait_secs: Option<f64>,
}

impl Db {
    /// Unfinished jobs per inference type (types with none are absent). One pass over the
    /// `(status, available_at)` index of unfinished jobs.
    pub async fn status_by_type(&self) -> Result<Vec<TypeStatus>, DbError> {
        self.run(|conn| {
            Ok(diesel::sql_query(
                "SELECT inference_type, \
                   count(*) FILTER (WHERE status = 'QUEUED') AS queued, \
                   count(*) FILTER (WHERE status = 'PROCESSING') AS processing, \
                   EXTRACT(EPOCH FROM now() - min(available_at) \
                     FILTER (WHERE status = 'QUEUED' AND available_at <= now()))::float8 \
                     AS oldest_wait_secs \
                 FROM jobs WHERE status IN ('QUEUED', 'PROCESSING') \
                 GROUP BY inference_type ORDER BY inference_type",
            )
            .load::<TypeStatus>(&mut **conn)?)
        })
        .await
    }
}
