//! Text columns read as the domain's types at the row boundary: `jobs.status` as
//! [`JobStatus`], `jobs.inference_type` and `jobs.endpoint` as [`InferenceType`] and
//! [`Endpoint`]. A stored value outside the domain's names (the CHECK constraint allows none
//! for the status) is a deserialization error naming the value, never a row read as something
//! else or silently skipped.

use std::fmt::Display;
use std::str::FromStr;

use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::sql_types::Text;
use volley_domain::{Endpoint, InferenceType, JobStatus};

/// (Public only because the derived `Queryable` impls of public rows name it; the module is
/// private.) A column value parsed into `T` (`#[diesel(deserialize_as = Parsed<T>)]` on a `T` field,
/// or directly in a loaded tuple).
#[derive(Debug, Clone, Copy, PartialEq, Eq, diesel::deserialize::FromSqlRow)]
pub struct Parsed<T>(pub T);

/// A `jobs.status` value.
pub(crate) type DbStatus = Parsed<JobStatus>;

impl<T> FromSql<Text, Pg> for Parsed<T>
where
    T: FromStr,
    T::Err: Display,
{
    fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
        let text = <String as FromSql<Text, Pg>>::from_sql(bytes)?;
        text.parse::<T>()
            .map(Parsed)
            .map_err(|e| format!("a stored value the domain does not know: {e}").into())
    }
}

macro_rules! into_domain {
    ($($t:ty),*) => {$(
        impl From<Parsed<$t>> for $t {
            fn from(p: Parsed<$t>) -> $t {
                p.0
            }
        }
    )*};
}

into_domain!(JobStatus, InferenceType, Endpoint);
