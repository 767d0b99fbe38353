//! Paged listings (additions to the contract): `GET /v1/batches?limit=&after=&before=&status=&label=`
//! pages an owner's batches newest first, and
//! `GET /v1/batches/{id}/jobs?limit=&after=&before=&status=&custom_id=` pages a batch's jobs
//! with their results. Both answer `{"object": "list", "data": [...], "has_more": bool}`; the
//! next page starts `after` the last id of this one, the previous page `before` its first id
//! (answered in the same order; `has_more` then says whether more lie further that way).

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use volley_db::listing::{BatchFilter, Cursor, JobFilter};
use volley_domain::{BatchStatus, CUSTOM_ID_RULE, FieldError, JobStatus, is_custom_id};

use crate::Shared;
use crate::error::{ApiError, ErrorBody};
use crate::routes::{links, owner, parse_id};
use crate::views;

/// Batches per page unless asked (the contract's listing: up to 50).
const BATCHES_DEFAULT: i64 = 50;
const BATCHES_MAX: i64 = 100;
/// Jobs per page unless asked; a batch holds at most 256, so the maximum is one page.
const JOBS_DEFAULT: i64 = 100;
const JOBS_MAX: i64 = 256;

/// Query parameters as text, checked here so a bad one gets the contract's 400 naming it.
#[derive(Deserialize)]
struct PageQuery {
    limit: Option<String>,
    after: Option<String>,
    before: Option<String>,
    status: Option<String>,
    label: Option<String>,
    custom_id: Option<String>,
}

/// The longest label a batch can have (the validator's `max_label_chars`).
const LABEL_MAX_CHARS: usize = 256;

pub(crate) fn bad(field: &str, message: String) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("{field}: {message}"),
        errors: vec![FieldError {
            index: None,
            field: field.to_owned(),
            message,
        }],
    }
}

fn number(raw: Option<&str>, field: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    raw.parse::<i64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .map(Some)
        .ok_or_else(|| bad(field, format!("must be an integer from {min} to {max}")))
}

impl PageQuery {
    /// Parsed by hand, so that even undecodable query text gets the contract's error shape.
    fn parse(req: &HttpRequest) -> Result<PageQuery, ApiError> {
        web::Query::<PageQuery>::from_query(req.query_string())
            .map(web::Query::into_inner)
            .map_err(|e| ApiError::invalid(format!("the query string is malformed: {e}")))
    }

    fn limit(&self, default: i64, max: i64) -> Result<i64, ApiError> {
        Ok(number(self.limit.as_deref(), "limit", 1, max)?.unwrap_or(default))
    }

    fn cursor(&self) -> Result<Cursor, ApiError> {
        let after = number(self.after.as_deref(), "after", 1, i64::MAX)?;
        let before = number(self.before.as_deref(), "before", 1, i64::MAX)?;
        match (after, before) {
            (None, None) => Ok(Cursor::First),
            (Some(a), None) => Ok(Cursor::After(a)),
            (None, Some(b)) => Ok(Cursor::Before(b)),
            (Some(_), Some(_)) => Err(bad(
                "before",
                "give either `after` or `before`, not both".into(),
            )),
        }
    }

    fn batch_filter(&self) -> Result<BatchFilter, ApiError> {
        const ALL: [BatchStatus; 3] = [
            BatchStatus::Pending,
            BatchStatus::Processing,
            BatchStatus::Done,
        ];
        let status = match self.status.as_deref() {
            None | Some("") => None,
            Some(s) => {
                let s = s.to_ascii_uppercase();
                Some(ALL.into_iter().find(|b| b.as_str() == s).ok_or_else(|| {
                    let all: Vec<&str> = ALL.iter().map(|s| s.as_str()).collect();
                    bad("status", format!("must be one of {}", all.join(", ")))
                })?)
            }
        };
        let label = match self.label.as_deref() {
            None | Some("") => None,
            // PostgreSQL cannot hold U+0000 in text: a 400, not a failed statement.
            Some(l) if l.contains('\0') => {
                return Err(bad(
                    "label",
                    "must not contain the NUL character (U+0000)".into(),
                ));
            }
            Some(l) if l.chars().count() > LABEL_MAX_CHARS => {
                return Err(bad(
                    "label",
                    format!("at most {LABEL_MAX_CHARS} characters"),
                ));
            }
            Some(l) => Some(l.to_owned()),
        };
        Ok(BatchFilter { status, label })
    }

    fn job_filter(&self) -> Result<JobFilter, ApiError> {
        let custom_id = match self.custom_id.as_deref() {
            None => None,
            Some(c) if is_custom_id(c) => Some(c.to_owned()),
            Some(_) => return Err(bad("custom_id", CUSTOM_ID_RULE.into())),
        };
        Ok(JobFilter {
            status: job_status(self.status.as_deref())?,
            custom_id,
        })
    }
}

/// A job status filter (any case); `None` for none or empty.
pub(crate) fn job_status(raw: Option<&str>) -> Result<Option<JobStatus>, ApiError> {
    match raw {
        None | Some("") => Ok(None),
        Some(s) => s
            .to_ascii_uppercase()
            .parse::<JobStatus>()
            .map(Some)
            .map_err(|_| {
                let all: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
                bad("status", format!("must be one of {}", all.join(", ")))
            }),
    }
}

/// Your batches, newest first, a page at a time.
#[utoipa::path(
    get, path = "/v1/batches", tag = "batches",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "Batches per page (default 50)"),
        ("after" = Option<i64>, Query, minimum = 1, maximum = 9223372036854775807_i64, description = "The last id of the previous page (not with `before`)"),
        ("before" = Option<i64>, Query, minimum = 1, maximum = 9223372036854775807_i64, description = "The first id of the next page, to page back (not with `after`)"),
        ("status" = Option<String>, Query, description = "Only batches in this status (any case; empty for all)"),
        ("label" = Option<String>, Query, max_length = 256, pattern = r"^[^\u0000]*$", description = "Only batches with this label"),
    ),
    responses(
        (status = 200, description = "A page of batches", body = views::BatchList),
        (status = 400, description = "A bad `limit`, `after`, `before`, `status` or `label`, or both `after` and `before`", body = ErrorBody),
        (status = 401, description = "No, malformed, unknown or revoked API key", body = ErrorBody),
        (status = 500, description = "Internal error (the cause is logged, not sent)", body = ErrorBody),
        (status = 503, description = "The database is unreachable; retry", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub(crate) async fn list_batches(
    req: HttpRequest,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let owner = owner(&req, &state).await?;
    let query = PageQuery::parse(&req)?;
    let limit = query.limit(BATCHES_DEFAULT, BATCHES_MAX)?;
    let (filter, cursor) = (query.batch_filter()?, query.cursor()?);
    let page = state
        .db
        .list_batches_page(&owner, filter, cursor, limit)
        .await?;
    Ok(HttpResponse::Ok().json(views::BatchList {
        data: page.items.iter().map(views::batch).collect(),
        has_more: page.has_more,
        object: "list",
    }))
}

/// A batch's jobs with their results, in order, a page at a time.
#[utoipa::path(
    get, path = "/v1/batches/{id}/jobs", tag = "jobs",
    params(
        ("id" = String, Path, description = "The batch id"),
        ("status" = Option<String>, Query, description = "Only jobs in this status (any case; empty for all)"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 256, description = "Jobs per page (default 100)"),
        ("after" = Option<i64>, Query, minimum = 1, maximum = 9223372036854775807_i64, description = "The last job id of the previous page (not with `before`)"),
        ("before" = Option<i64>, Query, minimum = 1, maximum = 9223372036854775807_i64, description = "The first job id of the next page, to page back (not with `after`)"),
        ("custom_id" = Option<String>, Query, pattern = "^[A-Za-z0-9_.:-]{1,64}$", description = "Only the job with this `custom_id`"),
    ),
    responses(
        (status = 200, description = "A page of jobs", body = views::JobList),
        (status = 400, description = "A bad `status`, `limit`, `after`, `before` or `custom_id`, or both `after` and `before`", body = ErrorBody),
        (status = 401, description = "No, malformed, unknown or revoked API key", body = ErrorBody),
        (status = 404, description = "No such batch for this key", body = ErrorBody),
        (status = 500, description = "Internal error (the cause is logged, not sent)", body = ErrorBody),
        (status = 503, description = "The database is unreachable; retry", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub(crate) async fn list_jobs(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let owner = owner(&req, &state).await?;
    let query = PageQuery::parse(&req)?;
    let id = parse_id(&path, "batch")?;
    let limit = query.limit(JOBS_DEFAULT, JOBS_MAX)?;
    let (filter, cursor) = (query.job_filter()?, query.cursor()?);
    let page = state
        .db
        .list_jobs(&owner, id, filter, cursor, limit)
        .await?
        .ok_or(ApiError::NotFound("batch"))?;
    let links = links(&state);
    Ok(HttpResponse::Ok().json(views::JobList {
        data: page.items.iter().map(|j| views::job(j, &links)).collect(),
        has_more: page.has_more,
        object: "list",
    }))
}
