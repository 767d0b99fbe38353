//! SQL fragments rendered from the domain's transition table ([`Transition::rule`]), so that
//! every guarded UPDATE takes its source and target states from `volley-domain` instead of
//! spelling them again. Statements are rendered once (see [`Sql`]) and keep the exact text they
//! had when the states were written by hand: same plans, same prepared statements.

use std::sync::LazyLock;

use volley_domain::{JobStatus, Transition};

/// A statement rendered once, on first use.
pub(crate) type Sql = LazyLock<String>;

/// A status as an SQL literal, `'QUEUED'`. Statuses are the domain's fixed upper-case names,
/// so quoting cannot be escaped from.
pub(crate) fn lit(s: JobStatus) -> String {
    format!("'{}'", s.as_str())
}

/// The state `t` leads to, as a literal.
pub(crate) fn to(t: Transition) -> String {
    lit(t.target())
}

/// `col` is one of the states `t` may start from: `col = 'QUEUED'` for one state (the form
/// partial indexes and the planner match best), `col IN ('QUEUED', 'PROCESSING')` for more.
pub(crate) fn from(col: &str, t: Transition) -> String {
    any_of(col, t.rule().from)
}

/// `col` is one of `states`.
pub(crate) fn any_of(col: &str, states: &[JobStatus]) -> String {
    match states {
        [one] => format!("{col} = {}", lit(*one)),
        many => {
            let list: Vec<String> = many.iter().map(|s| lit(*s)).collect();
            format!("{col} IN ({})", list.join(", "))
        }
    }
}

/// The guard of an outcome event (`Requeue`, `Succeed`, `Fail`) in one statement over many
/// events, where `target_col` holds each event's target state. While the three share their
/// source states (today: PROCESSING) this is the plain guard; should the domain give them
/// different sources, each row is checked against its own transition's.
pub(crate) fn outcome_from(col: &str, target_col: &str) -> String {
    let outcomes = [Transition::Requeue, Transition::Succeed, Transition::Fail];
    let first = outcomes[0].rule().from;
    if outcomes.iter().all(|t| t.rule().from == first) {
        return any_of(col, first);
    }
    let arms: Vec<String> = outcomes
        .iter()
        .map(|t| format!("WHEN {} THEN {}", to(*t), from(col, *t)))
        .collect();
    format!("CASE {target_col} {} ELSE false END", arms.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_render_the_domain_table() {
        assert_eq!(
            from("status || ''", Transition::Claim),
            "status || '' = 'QUEUED'"
        );
        assert_eq!(
            from("status", Transition::Cancel),
            "status IN ('QUEUED', 'PROCESSING')"
        );
        assert_eq!(to(Transition::Succeed), "'PROCESSED'");
        assert_eq!(
            outcome_from("j.status", "v.status"),
            "j.status = 'PROCESSING'"
        );
        for s in JobStatus::ALL {
            assert!(s.as_str().bytes().all(|b| b.is_ascii_uppercase()), "{s}");
        }
    }
}
