use std::fmt;
use std::str::FromStr;

use crate::types::ParseError;

/// A job's state. `PROCESSED`, `FAILED` and `CANCELLED` are terminal: nothing moves a job out
/// of them, which is what makes duplicate and late events harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Queued,
    Processing,
    Processed,
    Failed,
    Cancelled,
}

/// The kinds of state change; the database layer turns each into conditional updates whose
/// guards and targets it renders from [`Transition::rule`], so the SQL cannot drift from this
/// table (volley-db's `transitions` test runs every pair against PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// A worker claimed the job (attempt + 1).
    Claim,
    /// A retryable failure, or a lost worker with attempts left, hands the job back to the
    /// queue.
    Requeue,
    Succeed,
    /// A worker's failure, an outcome the database refused, or a worker lost on its last
    /// attempt.
    Fail,
    /// A job not started within the expiry window fails before it ever ran.
    Expire,
    Cancel,
    /// An operator re-runs a FAILED job (`batchctl batches retry-failed`): it goes back to
    /// QUEUED under the same id, and its attempt number keeps counting so that outcomes of
    /// earlier attempts stay fenced off.
    Retry,
}

/// Where a transition may start and where it leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub from: &'static [JobStatus],
    pub to: JobStatus,
}

impl Transition {
    pub const ALL: [Transition; 7] = [
        Transition::Claim,
        Transition::Requeue,
        Transition::Succeed,
        Transition::Fail,
        Transition::Expire,
        Transition::Cancel,
        Transition::Retry,
    ];

    /// The transition table: the one place that says which states a transition leaves from
    /// and which state it reaches.
    pub const fn rule(self) -> Rule {
        use JobStatus::*;
        let (from, to): (&'static [JobStatus], JobStatus) = match self {
            Transition::Claim => (&[Queued], Processing),
            // Outcomes come from the attempt that runs the job: PROCESSING only, so an
            // outcome arriving after a requeue (same attempt, QUEUED) changes nothing.
            Transition::Requeue => (&[Processing], Queued),
            Transition::Succeed => (&[Processing], Processed),
            Transition::Fail => (&[Processing], Failed),
            Transition::Expire => (&[Queued], Failed),
            Transition::Cancel => (&[Queued, Processing], Cancelled),
            // The only way out of a terminal state, and only by an operator's hand.
            Transition::Retry => (&[Failed], Queued),
        };
        Rule { from, to }
    }

    /// The state the transition leads to.
    pub const fn target(self) -> JobStatus {
        self.rule().to
    }
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Processing,
        JobStatus::Processed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "QUEUED",
            JobStatus::Processing => "PROCESSING",
            JobStatus::Processed => "PROCESSED",
            JobStatus::Failed => "FAILED",
            JobStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Processed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// The state a transition leads to from `self`, or `None` if it is not allowed from here.
    pub fn apply(self, t: Transition) -> Option<JobStatus> {
        let rule = t.rule();
        rule.from.contains(&self).then_some(rule.to)
    }

    /// The states a transition may start from; the database layer guards updates with this.
    pub fn sources(t: Transition) -> Vec<JobStatus> {
        t.rule().from.to_vec()
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ParseError {
                what: "job status",
                value: s.to_owned(),
            })
    }
}

/// A batch's status, always derived from its jobs' states, never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchStatus {
    Pending,
    Processing,
    Done,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Pending => "PENDING",
            BatchStatus::Processing => "PROCESSING",
            BatchStatus::Done => "DONE",
        }
    }
}

impl fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-status job counts of one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    pub queued: u64,
    pub processing: u64,
    pub processed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl BatchCounts {
    pub fn add(&mut self, status: JobStatus, n: u64) {
        match status {
            JobStatus::Queued => self.queued += n,
            JobStatus::Processing => self.processing += n,
            JobStatus::Processed => self.processed += n,
            JobStatus::Failed => self.failed += n,
            JobStatus::Cancelled => self.cancelled += n,
        }
    }

    pub fn total(&self) -> u64 {
        self.queued + self.processing + self.processed + self.failed + self.cancelled
    }

    /// PENDING: every job still queued; DONE: every job terminal; PROCESSING otherwise.
    pub fn status(&self) -> BatchStatus {
        let total = self.total();
        if self.queued + self.processing == 0 {
            BatchStatus::Done
        } else if self.queued == total {
            BatchStatus::Pending
        } else {
            BatchStatus::Processing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_never_move() {
        // Workers, events and sweeps never move a finished job; only an operator's Retry does.
        for s in JobStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for t in Transition::ALL
                .into_iter()
                .filter(|&t| t != Transition::Retry)
            {
                assert_eq!(s.apply(t), None, "{s} must not accept {t:?}");
            }
        }
    }

    #[test]
    fn the_happy_path_and_retry() {
        let s = JobStatus::Queued;
        let s = s.apply(Transition::Claim).unwrap();
        assert_eq!(s, JobStatus::Processing);
        assert_eq!(s.apply(Transition::Requeue), Some(JobStatus::Queued));
        assert_eq!(s.apply(Transition::Succeed), Some(JobStatus::Processed));
        assert_eq!(s.apply(Transition::Fail), Some(JobStatus::Failed));
        // A claim cannot be taken twice: the second claimer sees PROCESSING.
        assert_eq!(s.apply(Transition::Claim), None);
        assert_eq!(
            JobStatus::sources(Transition::Cancel),
            vec![JobStatus::Queued, JobStatus::Processing]
        );
    }

    #[test]
    fn all_lists_every_transition() {
        // A new variant fails to compile here until it is listed in `ALL` (and so reaches
        // the database's transition test).
        for t in Transition::ALL {
            match t {
                Transition::Claim
                | Transition::Requeue
                | Transition::Succeed
                | Transition::Fail
                | Transition::Expire
                | Transition::Cancel
                | Transition::Retry => {}
            }
        }
        assert_eq!(
            Transition::ALL.len(),
            Transition::ALL
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
        );
        // Queued jobs fail only by expiring; a late worker outcome cannot fail them.
        assert_eq!(JobStatus::Queued.apply(Transition::Fail), None);
        assert_eq!(
            JobStatus::Queued.apply(Transition::Expire),
            Some(JobStatus::Failed)
        );
    }

    #[test]
    fn operators_retry_failed_jobs_only() {
        assert_eq!(
            JobStatus::sources(Transition::Retry),
            vec![JobStatus::Failed]
        );
        assert_eq!(
            JobStatus::Failed.apply(Transition::Retry),
            Some(JobStatus::Queued)
        );
        for s in [JobStatus::Processed, JobStatus::Cancelled] {
            assert_eq!(s.apply(Transition::Retry), None, "{s} is final");
        }
    }

    #[test]
    fn status_parses() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>(), Ok(s));
        }
        assert!("DONE".parse::<JobStatus>().is_err());
    }

    #[test]
    fn batch_status_is_derived() {
        let mut c = BatchCounts::default();
        c.add(JobStatus::Queued, 3);
        assert_eq!(c.status(), BatchStatus::Pending);
        c.add(JobStatus::Processing, 1);
        assert_eq!(c.status(), BatchStatus::Processing);
        let mut d = BatchCounts::default();
        d.add(JobStatus::Processed, 2);
        d.add(JobStatus::Failed, 1);
        d.add(JobStatus::Cancelled, 1);
        assert_eq!(d.status(), BatchStatus::Done);
        assert_eq!(d.total(), 4);
        // A queued job beside a finished one is no longer "all queued".
        d.add(JobStatus::Queued, 1);
        assert_eq!(d.status(), BatchStatus::Processing);
    }
}
