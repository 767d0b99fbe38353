//! Token usage summed per batch, from the per-job counts workers report.

use diesel::prelude::*;
use diesel::sql_types::BigInt;

use crate::DbError;
use crate::schema::jobs;

/// The tokens a batch's jobs used so far, and how many jobs reported usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchUsage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub jobs: i64,
}

/// The sum itself, on a connection the caller holds.
pub(crate) fn batch_usage_on(
    conn: &mut diesel::PgConnection,
    owner: &str,
    batch_id: i64,
) -> Result<BatchUsage, DbError> {
    // SUM over int8 is numeric in PostgreSQL; cast back, so no decimal type is needed.
    let (prompt_tokens, completion_tokens, total_tokens, jobs): (i64, i64, i64, i64) = jobs::table
        .filter(jobs::batch_id.eq(batch_id))
        .filter(jobs::owner.eq(owner))
        .filter(jobs::total_tokens.is_not_null())
        .select(diesel::dsl::sql::<(BigInt, BigInt, BigInt, BigInt)>(
            "COALESCE(SUM(prompt_tokens), 0)::int8, \
                 COALESCE(SUM(completion_tokens), 0)::int8, \
                 COALESCE(SUM(total_tokens), 0)::int8, \
                 COUNT(*)::int8",
        ))
        .get_result(conn)?;
    Ok(BatchUsage {
        prompt_tokens,
        completion_tokens,
        total_tokens,
        jobs,
    })
}
