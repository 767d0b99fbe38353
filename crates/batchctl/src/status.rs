//! `batchctl status`: one screen answering "is each queue keeping up?": per inference type,
//! messages ready in RabbitMQ and its consumers, jobs QUEUED and PROCESSING (in flight) in
//! PostgreSQL, how long the oldest runnable job has waited, and the dead-letter queue's size.
//!
//! Each source is read on its own: with RabbitMQ or PostgreSQL down, the other's columns still
//! show, and the failure is named under the table (the exit code is then 1).

use std::fmt::Write as _;
use std::process::ExitCode;

use volley_amqp::Names;
use volley_amqp::depths::{QueueDepth, read_once};
use volley_config::Settings;
use volley_db::Db;
use volley_db::status::TypeStatus;
use volley_domain::InferenceType;

/// Everything the screen shows; `Err` holds why a source could not be read.
pub struct Status {
    pub queues: Result<Vec<QueueDepth>, String>,
    pub jobs: Result<Vec<TypeStatus>, String>,
    /// The webhook delivery backlog (from PostgreSQL).
    pub webhooks: Result<volley_db::webhooks::Backlog, String>,
}

async fn gather(settings: &Settings, db: &Db) -> Status {
    let names = Names::new(&settings.queue_prefix);
    let queues = read_once(&settings.amqp_url, &names, "batchctl-status");
    let (queues, jobs, webhooks) = tokio::join!(queues, db.status_by_type(), db.webhook_backlog());
    Status {
        queues: queues.map_err(|e| e.to_string()),
        jobs: jobs.map_err(|e| e.to_string()),
        webhooks: webhooks.map_err(|e| e.to_string()),
    }
}

/// `1h02m`, `3m05s`, `12s`.
fn age(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The screen. `?` marks what a failed source would have said.
fn render(status: &Status, names: &Names) -> String {
    let depth = |queue: &str| -> (String, String) {
        match &status.queues {
            Ok(all) => all
                .iter()
                .find(|d| d.queue == queue)
                .map(|d| (d.messages.to_string(), d.consumers.to_string()))
                .unwrap_or_else(|| ("-".into(), "-".into())),
            Err(_) => ("?".into(), "?".into()),
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:>8} {:>10} {:>8} {:>11} {:>12} {:>6}",
        "TYPE", "READY", "CONSUMERS", "QUEUED", "PROCESSING", "OLDEST WAIT", "DLQ"
    );
    let rows = InferenceType::ALL
        .into_iter()
        .map(|t| (t.key(), names.job_queue(t), Some(t.as_str())))
        .chain([("events", names.events_queue(), None)]);
    for (label, queue, db_type) in rows {
        let (ready, consumers) = depth(&queue);
        let (dlq, _) = depth(&Names::dlq(&queue));
        let (queued, processing, oldest) = match (&status.jobs, db_type) {
            (_, None) => ("-".into(), "-".into(), "-".into()),
            (Err(_), Some(_)) => ("?".into(), "?".into(), "?".into()),
            (Ok(jobs), Some(t)) => match jobs.iter().find(|j| j.inference_type == t) {
                Some(j) => (
                    j.queued.to_string(),
                    j.processing.to_string(),
                    j.oldest_wait_secs.map_or_else(|| "-".into(), age),
                ),
                None => ("0".into(), "0".into(), "-".into()),
            },
        };
        let _ = writeln!(
            out,
            "{label:<8} {ready:>8} {consumers:>10} {queued:>8} {processing:>11} {oldest:>12} {dlq:>6}"
        );
    }
    let _ = writeln!(
        out,
        "\nREADY: messages waiting in RabbitMQ. QUEUED: jobs not started (retries in backoff \
         included).\nPROCESSING: jobs running on a worker. OLDEST WAIT: the longest a runnable \
         job has waited.\nDLQ: dead-lettered messages (`batchctl dlq list`)."
    );
    match &status.webhooks {
        Ok(w) => {
            let _ = writeln!(
                out,
                "\nWEBHOOKS: {} pending ({} due now, oldest due {}), {} failed, {} paused \
                 endpoint(s).",
                w.pending,
                w.due,
                if w.due > 0 {
                    age(w.oldest_due_secs as f64)
                } else {
                    "-".into()
                },
                w.failed,
                w.paused_endpoints
            );
        }
        Err(_) => {
            let _ = writeln!(out, "\nWEBHOOKS: ?");
        }
    }
    if let Err(e) = &status.queues {
        let _ = writeln!(out, "RabbitMQ unreachable: {e}");
    }
    if let Err(e) = &status.jobs {
        let _ = writeln!(out, "PostgreSQL unreachable: {e}");
    }
    out
}

pub async fn run(settings: &Settings, db: &Db) -> anyhow::Result<ExitCode> {
    let status = gather(settings, db).await;
    print!("{}", render(&status, &Names::new(&settings.queue_prefix)));
    Ok(
        if status.queues.is_ok() && status.jobs.is_ok() && status.webhooks.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use volley_amqp::{Broker, connect};
    use volley_db::NewJob;
    use volley_db::testing::TestDatabase;
    use volley_proto::JobMessage;

    fn row<'a>(screen: &'a str, label: &str) -> Vec<&'a str> {
        screen
            .lines()
            .find(|l| l.starts_with(&format!("{label} ")))
            .unwrap()
            .split_whitespace()
            .collect()
    }

    #[test]
    fn ages() {
        assert_eq!(age(0.4), "0s");
        assert_eq!(age(59.0), "59s");
        assert_eq!(age(185.0), "3m05s");
        assert_eq!(age(3720.0), "1h02m");
    }

    #[test]
    fn a_source_down_still_shows_the_other() {
        let names = Names::new("volley");
        let s = Status {
            queues: Err("connection refused".into()),
            jobs: Ok(vec![TypeStatus {
                inference_type: "IMAGE".into(),
                queued: 3,
                processing: 1,
                oldest_wait_secs: Some(75.0),
            }]),
            webhooks: Ok(volley_db::webhooks::Backlog {
                pending: 4,
                due: 1,
                failed: 2,
                paused_endpoints: 1,
                oldest_due_secs: 65,
            }),
        };
        let screen = render(&s, &names);
        assert!(
            screen.contains(
                "WEBHOOKS: 4 pending (1 due now, oldest due 1m05s), 2 failed, 1 paused endpoint(s)."
            ),
            "{screen}"
        );
        assert_eq!(
            row(&screen, "image"),
            ["image", "?", "?", "3", "1", "1m15s", "?"]
        );
        assert_eq!(row(&screen, "llm"), ["llm", "?", "?", "0", "0", "-", "?"]);
        assert!(screen.contains("RabbitMQ unreachable: connection refused"));
    }

    /// Against the real RabbitMQ and PostgreSQL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shows_queues_jobs_and_dead_letters() {
        let (database, db) = TestDatabase::create().await.unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let settings = Settings {
            database_url: database.url.clone(),
            amqp_url: std::env::var("VOLLEY_TEST_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            queue_prefix: format!("t-status-{}-{nanos:x}", std::process::id()),
            ..Settings::default()
        };
        let names = Names::new(&settings.queue_prefix);

        let job = |t: InferenceType, endpoint: &str| NewJob {
            inference_type: t.as_str().into(),
            endpoint: endpoint.into(),
            model: "m".into(),
            body: serde_json::json!({"prompt": "p"}),
            custom_id: None,
        };
        let (_, jobs) = db
            .create_batch(
                "o",
                None,
                vec![
                    job(InferenceType::Image, "/v1/images/generations"),
                    job(InferenceType::Image, "/v1/images/generations"),
                    job(InferenceType::Llm, "/v1/completions"),
                ],
                0,
            )
            .await
            .unwrap();
        // One image job running, one image job's message waiting on its queue.
        db.claim(vec![jobs[0].id], 60_000, 0).await.unwrap();
        let broker = Broker::new(&settings.amqp_url, "batchctl-test", names.clone());
        let msg = JobMessage {
            job_id: jobs[1].id,
            batch_id: jobs[1].batch_id,
            inference_type: "IMAGE".into(),
            endpoint: "/v1/images/generations".into(),
            model: "m".into(),
            body_json: b"{}".to_vec(),
            accepted_at_ms: 0,
        };
        assert!(broker.publish_jobs(&[msg]).await.unwrap()[0].is_ok());
        // And one dead letter on the LLM queue.
        broker
            .publish_raw(
                &Names::dlq(&names.job_queue(InferenceType::Llm)),
                b"x".to_vec(),
                None,
            )
            .await
            .unwrap();

        let status = gather(&settings, &db).await;
        let screen = render(&status, &names);
        let image = row(&screen, "image");
        assert_eq!(
            image[..6],
            ["image", "1", "0", "1", "1", image[5]],
            "{screen}"
        );
        assert!(image[5].ends_with('s'), "an age: {screen}");
        assert_eq!(row(&screen, "image")[6], "0");
        assert_eq!(row(&screen, "llm")[3..5], ["1", "0"], "{screen}");
        assert_eq!(row(&screen, "llm")[6], "1", "{screen}");
        assert_eq!(row(&screen, "events")[3..5], ["-", "-"]);
        assert!(status.queues.is_ok() && status.jobs.is_ok());

        broker.close().await;
        let conn = connect(&settings.amqp_url, "batchctl-test").await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        volley_amqp::delete_topology(&ch, &names).await.unwrap();
        let _ = conn.close(200, "done".into()).await;
    }
}
