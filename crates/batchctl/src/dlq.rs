//! Dead letters: reading `<queue>.dlq`, describing each message, and replaying the chosen ones
//! to the queue they came from.
//!
//! Messages are fetched with `basic.get` and held unacknowledged while the command runs, so
//! each is seen once. A replayed message is acknowledged on the dead-letter queue only after
//! the broker confirmed its copy on the work queue; everything else is returned (`nack` with
//! requeue). Returning a message to a quorum queue counts as a delivery, but dead-letter
//! queues have no delivery limit, so listing never loses anything.

use std::collections::HashMap;
use std::fmt;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde_json::{Value, json};
use volley_amqp::Names;
use volley_domain::InferenceType;
use volley_proto::{JobEvent, JobMessage, Message, job_event};

/// The reasons RabbitMQ records in `x-death` when it dead-letters a message.
pub const REASONS: [&str; 4] = ["rejected", "delivery_limit", "expired", "maxlen"];

/// Resolves what an operator typed (`llm`, `events`, `jobs.llm`, `volley.jobs.llm`,
/// `volley.jobs.llm.dlq`) to a work queue of this stack.
pub fn resolve_queue(names: &Names, input: &str) -> Result<String, String> {
    let work = names.work_queues();
    let s = input.trim();
    let s = s.strip_suffix(".dlq").unwrap_or(s);
    let candidates = [
        s.to_owned(),
        format!("{}.{s}", names.prefix()),
        format!("{}.jobs.{s}", names.prefix()),
    ];
    if let Some(q) = candidates.iter().find(|c| work.contains(c)) {
        return Ok(q.clone());
    }
    let short: Vec<&str> = InferenceType::ALL
        .iter()
        .map(|t| t.key())
        .chain(["events"])
        .collect();
    Err(format!(
        "unknown queue {input:?}: expected one of {} (or a full name such as {})",
        short.join(", "),
        names.job_queue(InferenceType::Llm)
    ))
}

/// What a dead-lettered message holds, as far as it can be decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Job {
        job_id: i64,
        batch_id: i64,
    },
    Event {
        job_id: i64,
        attempt: i32,
        outcome: &'static str,
    },
    /// Not a message Volley can act on; `why` says what is wrong.
    Undecodable {
        why: String,
    },
}

impl Content {
    pub fn job_id(&self) -> Option<i64> {
        match self {
            Content::Job { job_id, .. } | Content::Event { job_id, .. } => Some(*job_id),
            Content::Undecodable { .. } => None,
        }
    }
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Job { .. } => f.write_str("job message"),
            Content::Event {
                attempt, outcome, ..
            } => write!(f, "event: attempt {attempt} {outcome}"),
            Content::Undecodable { why } => write!(f, "undecodable: {why}"),
        }
    }
}

/// Decodes a payload the way the queue's consumer would.
pub fn decode(names: &Names, queue: &str, payload: &[u8]) -> Content {
    let bad = |why: String| Content::Undecodable { why };
    if queue == names.events_queue() {
        let e = match JobEvent::decode(payload) {
            Ok(e) => e,
            Err(e) => return bad(format!("not a JobEvent: {e}")),
        };
        let outcome = match e.outcome {
            Some(job_event::Outcome::Succeeded(_)) => "succeeded",
            Some(job_event::Outcome::Failed(_)) => "failed",
            Some(job_event::Outcome::Retry(_)) => "retry",
            None => return bad("an event without an outcome".into()),
        };
        if e.job_id <= 0 || e.attempt <= 0 {
            return bad(format!("bad job id {} or attempt {}", e.job_id, e.attempt));
        }
        return Content::Event {
            job_id: e.job_id,
            attempt: e.attempt,
            outcome,
        };
    }
    let Some(kind) = InferenceType::ALL
        .into_iter()
        .find(|t| names.job_queue(*t) == queue)
    else {
        return bad(format!("{queue} is not a queue of this stack"));
    };
    let m = match JobMessage::decode(payload) {
        Ok(m) => m,
        Err(e) => return bad(format!("not a JobMessage: {e}")),
    };
    if m.job_id <= 0 {
        return bad(format!("bad job id {}", m.job_id));
    }
    if m.inference_type != kind.as_str() {
        return bad(format!(
            "a {:?} job on the {} queue",
            m.inference_type,
            kind.key()
        ));
    }
    Content::Job {
        job_id: m.job_id,
        batch_id: m.batch_id,
    }
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn number(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

/// Where a message was dead-lettered from, why, and how many times, from the headers
/// RabbitMQ adds (`x-first-death-queue`, `x-first-death-reason`, `x-death`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Death {
    pub queue: Option<String>,
    pub reason: String,
    pub count: i64,
}

fn death(headers: Option<&FieldTable>) -> Death {
    let mut d = Death {
        queue: None,
        reason: "unknown".into(),
        count: 0,
    };
    let Some(h) = headers else { return d };
    let h = h.inner();
    let entries: Vec<&FieldTable> = match h.get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::FieldTable(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    d.count = entries
        .iter()
        .filter_map(|t| t.inner().get("count").and_then(number))
        .sum();
    let first = entries.last();
    d.queue = h
        .get("x-first-death-queue")
        .and_then(text)
        .or_else(|| first.and_then(|t| t.inner().get("queue")).and_then(text));
    if let Some(r) = h
        .get("x-first-death-reason")
        .and_then(text)
        .or_else(|| first.and_then(|t| t.inner().get("reason")).and_then(text))
    {
        d.reason = r;
    }
    d
}

/// One dead-lettered message, held unacknowledged on the reading channel.
pub struct DeadLetter {
    pub dlq: String,
    /// The work queue it came from and will be replayed to.
    pub queue: String,
    pub delivery_tag: u64,
    pub content: Content,
    /// The job's batch: from the job message, or looked up for events.
    pub batch_id: Option<i64>,
    pub reason: String,
    pub count: i64,
    pub payload: Vec<u8>,
    pub properties: BasicProperties,
}

impl DeadLetter {
    pub fn to_json(&self) -> Value {
        json!({
            "dlq": self.dlq,
            "queue": self.queue,
            "job_id": self.content.job_id(),
            "batch_id": self.batch_id,
            "reason": self.reason,
            "count": self.count,
            "content": self.content.to_string(),
            "bytes": self.payload.len(),
        })
    }
}

/// Which dead letters a replay takes.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub batch: Option<i64>,
    pub reason: Option<String>,
    pub include_undecodable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Replay,
    /// Left in the dead-letter queue: it does not match the filters.
    NotSelected,
    /// Left in the dead-letter queue: replaying it would only dead-letter it again.
    Undecodable,
}

impl Filter {
    pub fn verdict(&self, d: &DeadLetter) -> Verdict {
        if let Some(b) = self.batch
            && d.batch_id != Some(b)
        {
            return Verdict::NotSelected;
        }
        if let Some(r) = &self.reason
            && &d.reason != r
        {
            return Verdict::NotSelected;
        }
        if matches!(d.content, Content::Undecodable { .. }) && !self.include_undecodable {
            return Verdict::Undecodable;
        }
        Verdict::Replay
    }
}

/// Takes up to `limit` messages from each of these work queues' dead-letter queues. They stay
/// unacknowledged on `ch` until acked or returned (or the channel closes, which returns them).
pub async fn fetch(
    ch: &Channel,
    names: &Names,
    queues: &[String],
    limit: usize,
) -> anyhow::Result<(Vec<DeadLetter>, Vec<String>)> {
    let mut out = Vec::new();
    let mut truncated = Vec::new();
    for q in queues {
        let dlq = Names::dlq(q);
        let mut n = 0;
        loop {
            if n >= limit {
                truncated.push(dlq.clone());
                break;
            }
            let Some(m) = ch
                .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                .await?
            else {
                break;
            };
            n += 1;
            let d = m.delivery;
            let death = death(d.properties.headers().as_ref());
            // The queue it died in names where it goes back; a header naming a queue of
            // another stack (or none) falls back to the DLQ's own work queue.
            let queue = death
                .queue
                .filter(|x| names.work_queues().contains(x))
                .unwrap_or_else(|| q.clone());
            let content = decode(names, &queue, &d.data);
            let batch_id = match content {
                Content::Job { batch_id, .. } if batch_id > 0 => Some(batch_id),
                _ => None,
            };
            out.push(DeadLetter {
                dlq: dlq.clone(),
                queue,
                delivery_tag: d.delivery_tag,
                content,
                batch_id,
                reason: death.reason,
                count: death.count,
                payload: d.data,
                properties: d.properties,
            });
        }
    }
    Ok((out, truncated))
}

/// Fills in the batch of dead-lettered events from PostgreSQL (events carry only the job).
pub fn fill_batches(letters: &mut [DeadLetter], batches: &HashMap<i64, i64>) {
    for d in letters.iter_mut() {
        if d.batch_id.is_none()
            && let Content::Event { job_id, .. } = d.content
        {
            d.batch_id = batches.get(&job_id).copied();
        }
    }
}

pub async fn give_back(ch: &Channel, d: &DeadLetter) -> anyhow::Result<()> {
    ch.basic_nack(
        d.delivery_tag,
        BasicNackOptions {
            requeue: true,
            multiple: false,
        },
    )
    .await?;
    Ok(())
}

/// A channel with publisher confirms, for replays.
pub async fn confirm_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Publishes a copy of `d` to its work queue and waits for the broker's confirm; only then
/// acknowledges the dead-lettered original. Headers (with the `x-death` history) and the
/// message id travel with the copy.
pub async fn replay(get: &Channel, publish: &Channel, d: &DeadLetter) -> anyhow::Result<()> {
    let confirm = publish
        .basic_publish(
            "".into(),
            d.queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &d.payload,
            d.properties.clone().with_delivery_mode(2),
        )
        .await?;
    match tokio::time::timeout(std::time::Duration::from_secs(30), confirm).await {
        Err(_) => anyhow::bail!("no confirm from RabbitMQ within 30 s"),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(Confirmation::Ack(None))) => {}
        Ok(Ok(Confirmation::Ack(Some(_)))) => {
            anyhow::bail!("queue {} does not exist (message returned)", d.queue)
        }
        Ok(Ok(Confirmation::Nack(_))) => anyhow::bail!("RabbitMQ refused the copy (nack)"),
        Ok(Ok(Confirmation::NotRequested)) => anyhow::bail!("confirms are off"),
    }
    get.basic_ack(d.delivery_tag, BasicAckOptions::default())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString, ShortString};

    fn names() -> Names {
        Names::new("volley")
    }

    #[test]
    fn queue_names_resolve_or_say_what_is_valid() {
        let n = names();
        for (input, want) in [
            ("llm", "volley.jobs.llm"),
            (" tts ", "volley.jobs.tts"),
            ("events", "volley.events"),
            ("jobs.video", "volley.jobs.video"),
            ("volley.jobs.music", "volley.jobs.music"),
            ("volley.jobs.image.dlq", "volley.jobs.image"),
        ] {
            assert_eq!(resolve_queue(&n, input).unwrap(), want, "{input}");
        }
        let e = resolve_queue(&n, "audio").unwrap_err();
        assert!(e.contains("unknown queue \"audio\""), "{e}");
        assert!(e.contains("llm, image, video, music, tts, events"), "{e}");
        assert!(resolve_queue(&n, "other.jobs.llm").is_err());
        assert!(resolve_queue(&n, "").is_err());
    }

    #[test]
    fn payloads_decode_by_queue() {
        let n = names();
        let job = JobMessage {
            job_id: 7,
            batch_id: 3,
            inference_type: "LLM".into(),
            endpoint: "/v1/completions".into(),
            model: "m".into(),
            body_json: b"{}".to_vec(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(
            decode(&n, "volley.jobs.llm", &job),
            Content::Job {
                job_id: 7,
                batch_id: 3
            }
        );
        let wrong = decode(&n, "volley.jobs.image", &job);
        assert!(wrong.to_string().contains("\"LLM\" job on the image queue"));
        let junk = decode(&n, "volley.jobs.llm", b"not protobuf at all");
        assert!(
            junk.to_string()
                .starts_with("undecodable: not a JobMessage")
        );
        let event = JobEvent {
            job_id: 9,
            attempt: 2,
            outcome: Some(job_event::Outcome::Retry(volley_proto::Retry {
                error: "x".into(),
                delay_ms: 0,
            })),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(
            decode(&n, "volley.events", &event),
            Content::Event {
                job_id: 9,
                attempt: 2,
                outcome: "retry"
            }
        );
        assert!(matches!(
            decode(&n, "volley.events", &[0xff; 10]),
            Content::Undecodable { .. }
        ));
        let empty = decode(&n, "volley.events", &[]);
        assert!(empty.to_string().contains("without an outcome"), "{empty}");
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    #[test]
    fn death_headers() {
        assert_eq!(death(None).reason, "unknown");
        let mut entry = FieldTable::default();
        entry.insert(ShortString::from("count"), AMQPValue::LongLongInt(3));
        entry.insert(ShortString::from("reason"), long("delivery_limit"));
        entry.insert(ShortString::from("queue"), long("volley.jobs.llm"));
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from("x-death"),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(entry)])),
        );
        let d = death(Some(&h));
        assert_eq!(
            d,
            Death {
                queue: Some("volley.jobs.llm".into()),
                reason: "delivery_limit".into(),
                count: 3
            }
        );
        h.insert(ShortString::from("x-first-death-reason"), long("rejected"));
        assert_eq!(death(Some(&h)).reason, "rejected");
    }

    fn letter(content: Content, batch: Option<i64>, reason: &str) -> DeadLetter {
        DeadLetter {
            dlq: "volley.jobs.llm.dlq".into(),
            queue: "volley.jobs.llm".into(),
            delivery_tag: 1,
            content,
            batch_id: batch,
            reason: reason.into(),
            count: 1,
            payload: Vec::new(),
            properties: BasicProperties::default(),
        }
    }

    #[test]
    fn filters_choose_what_to_replay() {
        let job = letter(
            Content::Job {
                job_id: 1,
                batch_id: 5,
            },
            Some(5),
            "rejected",
        );
        let junk = letter(Content::Undecodable { why: "x".into() }, None, "rejected");
        let all = Filter::default();
        assert_eq!(all.verdict(&job), Verdict::Replay);
        assert_eq!(all.verdict(&junk), Verdict::Undecodable);
        let forced = Filter {
            include_undecodable: true,
            ..Default::default()
        };
        assert_eq!(forced.verdict(&junk), Verdict::Replay);
        let other_batch = Filter {
            batch: Some(6),
            ..Default::default()
        };
        assert_eq!(other_batch.verdict(&job), Verdict::NotSelected);
        let limit = Filter {
            reason: Some("delivery_limit".into()),
            ..Default::default()
        };
        assert_eq!(limit.verdict(&job), Verdict::NotSelected);
        let mut m = HashMap::new();
        m.insert(9, 5);
        let mut events = vec![letter(
            Content::Event {
                job_id: 9,
                attempt: 1,
                outcome: "succeeded",
            },
            None,
            "rejected",
        )];
        fill_batches(&mut events, &m);
        assert_eq!(events[0].batch_id, Some(5));
    }
}
