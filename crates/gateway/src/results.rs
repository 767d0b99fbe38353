//! Results in bulk (an addition to the contract): `GET /v1/batches/{id}/results[?status=]`
//! answers `application/x-ndjson`, one line per finished job in submission order, while the
//! batch runs too (the jobs finished so far).
//!
//! The body is a stream read from PostgreSQL a page at a time: the next page is read only when
//! the previous one has been written out, so the first line leaves before the last row is read
//! and a response holds one page however large the results are (an image job's `b64_json`
//! result can be megabytes). A database error mid-stream ends the response without its final
//! chunk, so the client sees a broken transfer instead of a short, well-formed one.

use std::future::Future;

use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use futures::{Stream, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use volley_db::JobView;
use volley_domain::JobStatus;

use crate::Shared;
use crate::browse::bad;
use crate::error::ApiError;
use crate::routes::{links, owner, parse_id};
use crate::views;

/// Rows read per page. Smaller than a batch on purpose: one row's result can be large, and a
/// page is what a response holds in memory at once.
const PAGE_ROWS: i64 = 64;

/// One line of the results: a finished job.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ResultLine {
    /// The job's id.
    pub id: String,
    pub batch_id: String,
    pub custom_id: Option<String>,
    pub endpoint: String,
    pub model: String,
    /// PROCESSED, FAILED or CANCELLED.
    #[schema(schema_with = crate::openapi::schema::job_status)]
    pub status: String,
    /// The provider's answer, media as signed links (as on `GET /v1/jobs/{id}`); `null`
    /// unless PROCESSED.
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    /// Why the job failed; `null` unless FAILED.
    pub error: Option<ResultError>,
    /// Tokens used (chat and completions); `null` otherwise.
    pub usage: Option<ResultUsage>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ResultError {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ResultUsage {
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
}

impl ResultLine {
    pub fn new(j: &JobView, links: &views::MediaLinks<'_>) -> ResultLine {
        let failed = j.status == JobStatus::Failed;
        ResultLine {
            id: j.id.to_string(),
            batch_id: j.batch_id.to_string(),
            custom_id: j.custom_id.clone(),
            endpoint: j.endpoint.clone(),
            model: j.model.clone(),
            status: j.status.as_str().to_owned(),
            result: views::signed_result(j, links),
            // The same defaults as the job object's `error`.
            error: failed.then(|| ResultError {
                kind: j
                    .error_type
                    .clone()
                    .unwrap_or_else(|| "provider_error".into()),
                message: j.error_message.clone().unwrap_or_default(),
            }),
            usage: j.total_tokens.is_some().then_some(ResultUsage {
                prompt_tokens: j.prompt_tokens,
                completion_tokens: j.completion_tokens,
                total_tokens: j.total_tokens,
            }),
        }
    }
}

#[derive(Deserialize)]
struct ResultsQuery {
    status: Option<String>,
}

/// `?status=` as a comma-separated list of terminal statuses, any case; empty means all.
fn statuses(raw: Option<&str>) -> Result<Vec<JobStatus>, ApiError> {
    let terminal: Vec<JobStatus> = JobStatus::ALL
        .into_iter()
        .filter(|s| s.is_terminal())
        .collect();
    let mut out = Vec::new();
    for part in raw.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
        let s = part
            .trim()
            .to_ascii_uppercase()
            .parse::<JobStatus>()
            .ok()
            .filter(|s| s.is_terminal())
            .ok_or_else(|| {
                let names: Vec<&str> = terminal.iter().map(|s| s.as_str()).collect();
                bad(
                    "status",
                    format!(
                        "must be finished statuses, comma-separated: {}",
                        names.join(", ")
                    ),
                )
            })?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Pages read on demand: `fetch(after)` reads the rows after the key `after` (none for the
/// first page); a page shorter than `page_rows` is the last. Nothing is read until the stream
/// is polled, and each page only once the previous page's rows have all been taken.
pub(crate) fn paged<T, E, F, Fut>(
    page_rows: i64,
    key: fn(&T) -> i64,
    fetch: F,
) -> impl Stream<Item = Result<T, E>>
where
    F: FnMut(Option<i64>) -> Fut,
    Fut: Future<Output = Result<Vec<T>, E>>,
{
    let page_rows = usize::try_from(page_rows).unwrap_or(usize::MAX);
    futures::stream::try_unfold(
        (fetch, Some(None::<i64>)),
        move |(mut fetch, next)| async move {
            // `None`: the last page was short, nothing follows.
            let Some(after) = next else {
                return Ok(None);
            };
            let rows = fetch(after).await?;
            if rows.is_empty() {
                return Ok(None);
            }
            let next = (rows.len() >= page_rows)
                .then(|| rows.last().map(key))
                .flatten()
                .map(Some);
            Ok(Some((
                futures::stream::iter(rows.into_iter().map(Ok::<T, E>)),
                (fetch, next),
            )))
        },
    )
    .try_flatten()
}

/// The batch's finished jobs as NDJSON, one `ResultLine` per line, in submission order.
#[utoipa::path(
    get, path = "/v1/batches/{id}/results", tag = "batches",
    params(
        ("id" = String, Path, description = "The batch id"),
        ("status" = Option<String>, Query,
            description = "Only these finished statuses, comma-separated, any case"),
    ),
    responses(
        (status = 200, description = "One JSON object (`ResultLine`) per line, one line per \
            finished job; the stream ends early (no final chunk) on a database error",
            body = String, content_type = "application/x-ndjson"),
        (status = 400, description = "A bad `status`", body = crate::error::ErrorBody),
        (status = 401, description = "No, malformed, unknown or revoked API key", body = crate::error::ErrorBody),
        (status = 404, description = "No such batch for this key", body = crate::error::ErrorBody),
        (status = 500, description = "Internal error (the cause is logged, not sent)", body = crate::error::ErrorBody),
        (status = 503, description = "The database is unreachable; retry", body = crate::error::ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub(crate) async fn batch_results(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    // Authenticated and owned exactly like `GET /v1/batches/{id}`: 401 first, then the same
    // 404 for a missing batch and for another owner's.
    let owner = owner(&req, &state).await?;
    let query = web::Query::<ResultsQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::invalid(format!("the query string is malformed: {e}")))?;
    let wanted = statuses(query.status.as_deref())?;
    let id = parse_id(&path, "batch")?;
    if !state.db.owns_batch(&owner, id).await? {
        return Err(ApiError::NotFound("batch"));
    }
    let db = state.db.clone();
    let rows = paged(
        PAGE_ROWS,
        |j: &JobView| j.id,
        move |after| {
            let (db, wanted) = (db.clone(), wanted.clone());
            async move { db.finished_jobs_page(id, wanted, after, PAGE_ROWS).await }
        },
    );
    let body = rows
        .map_ok(move |j| {
            let line = ResultLine::new(&j, &links(&state));
            let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
            bytes.push(b'\n');
            Bytes::from(bytes)
        })
        .inspect_err(move |e| {
            tracing::warn!(batch.id = id, error = %e, "results stream ended by a database error")
        });
    Ok(HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .streaming(body))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::StreamExt;

    use super::*;

    /// A fetcher over `0..n` that counts its reads.
    fn source(
        n: i64,
        page: i64,
        reads: Arc<AtomicUsize>,
    ) -> impl Stream<Item = Result<i64, std::convert::Infallible>> {
        paged(
            page,
            |x: &i64| *x,
            move |after: Option<i64>| {
                reads.fetch_add(1, Ordering::SeqCst);
                let from = after.map_or(0, |a| a + 1);
                let rows: Vec<i64> = (from..n).take(page as usize).collect();
                async move { Ok::<_, std::convert::Infallible>(rows) }
            },
        )
    }

    #[tokio::test]
    async fn pages_are_read_one_at_a_time_on_demand() {
        let reads = Arc::new(AtomicUsize::new(0));
        let s = source(10, 3, reads.clone());
        futures::pin_mut!(s);
        assert_eq!(
            reads.load(Ordering::SeqCst),
            0,
            "nothing read before polling"
        );
        assert_eq!(s.next().await, Some(Ok(0)));
        assert_eq!(
            reads.load(Ordering::SeqCst),
            1,
            "the first row needs one page"
        );
        assert_eq!(s.next().await, Some(Ok(1)));
        assert_eq!(s.next().await, Some(Ok(2)));
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert_eq!(s.next().await, Some(Ok(3)));
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        let rest: Vec<i64> = s.map(|r| r.unwrap()).collect().await;
        assert_eq!(rest, [4, 5, 6, 7, 8, 9]);
        // 3 + 3 + 3 + 1: the short page is the last, no read after it.
        assert_eq!(reads.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_full_last_page_costs_one_empty_read_and_nothing_is_repeated() {
        let reads = Arc::new(AtomicUsize::new(0));
        let all: Vec<i64> = source(9, 3, reads.clone())
            .map(|r| r.unwrap())
            .collect()
            .await;
        assert_eq!(all, (0..9).collect::<Vec<_>>());
        assert_eq!(reads.load(Ordering::SeqCst), 4);
        let reads = Arc::new(AtomicUsize::new(0));
        let none: Vec<_> = source(0, 3, reads.clone()).collect().await;
        assert!(none.is_empty());
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_error_ends_the_stream() {
        let s = paged(
            2,
            |x: &i64| *x,
            |after: Option<i64>| async move {
                match after {
                    None => Ok(vec![1, 2]),
                    Some(_) => Err("database gone"),
                }
            },
        );
        let got: Vec<Result<i64, &str>> = s.collect().await;
        assert_eq!(got, [Ok(1), Ok(2), Err("database gone")]);
    }

    #[test]
    fn status_filters_take_finished_statuses_only() {
        assert!(statuses(None).unwrap().is_empty());
        assert!(statuses(Some("")).unwrap().is_empty());
        assert_eq!(
            statuses(Some("processed,Failed,processed")).unwrap(),
            [JobStatus::Processed, JobStatus::Failed]
        );
        for bad in ["queued", "PROCESSING", "done", "x\u{0}", "processed;failed"] {
            assert!(statuses(Some(bad)).is_err(), "{bad}");
        }
    }
}
