//! volley-amqp against the real RabbitMQ: the consumer loop's reconnects and what a control
//! broadcast does with a broker's nack. Each test uses a queue prefix of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use tokio_util::sync::CancellationToken;
use volley_amqp::{AmqpError, Broker, ConsumerConfig, Names, Source, connect, delete_topology};
use volley_proto::{CancelJobs, Control, JobEvent, control};

fn amqp_url() -> String {
    std::env::var("VOLLEY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn names(test: &str) -> Names {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    Names::new(&format!("t-amqp-{test}-{}-{nanos}", std::process::id()))
}

async fn cleanup(names: &Names) {
    let conn = connect(&amqp_url(), "volley-amqp-test-cleanup")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    delete_topology(&ch, names).await.unwrap();
    let _ = conn.close(200, "done".into()).await;
}

fn cancel(batch_id: i64) -> Control {
    Control {
        action: Some(control::Action::Cancel(CancelJobs {
            batch_id,
            job_ids: vec![],
        })),
    }
}

#[tokio::test]
async fn a_control_message_the_broker_refuses_is_an_error() {
    let names = names("nack");
    let broker = Broker::new(&amqp_url(), "volley-amqp-test", names.clone());
    // No worker listens: nothing to abort, and that is no error.
    broker.publish_control(&cancel(1)).await.unwrap();

    // A queue that refuses every message makes the broker nack the publish.
    let conn = connect(&amqp_url(), "volley-amqp-test-full").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    ch.queue_bind(
        q.name().clone(),
        names.control_exchange().as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let e = broker.publish_control(&cancel(2)).await.unwrap_err();
    assert!(matches!(e, AmqpError::Nacked), "{e}");
    // The channel is still good: the next broadcast goes through once nothing refuses it.
    let _ = conn.close(200, "done".into()).await;
    broker.publish_control(&cancel(3)).await.unwrap();
    broker.close().await;
    cleanup(&names).await;
}

#[tokio::test]
async fn a_failed_session_reconnects_and_gets_its_unsettled_messages_back() {
    let names = names("reconnect");
    let broker = Broker::new(&amqp_url(), "volley-amqp-test", names.clone());
    let event = JobEvent {
        job_id: 42,
        attempt: 1,
        ..Default::default()
    };
    assert!(broker.publish_events(&[event]).await.unwrap()[0].is_ok());

    let config = ConsumerConfig {
        url: amqp_url(),
        connection_name: "volley-amqp-test-consumer".into(),
        source: Source::Queue(names.events_queue()),
        names: names.clone(),
        prefetch: Some(4),
        tag: String::new(),
    };
    let stop = CancellationToken::new();
    let sessions = Arc::new(AtomicUsize::new(0));
    let ups = Arc::new(AtomicUsize::new(0));
    let run = tokio::spawn({
        let (stop, sessions, ups) = (stop.clone(), sessions.clone(), ups.clone());
        async move {
            volley_amqp::consumer::run(
                config,
                stop.clone(),
                |up| {
                    if up {
                        ups.fetch_add(1, Ordering::SeqCst);
                    }
                },
                |mut consumer| {
                    let (stop, sessions) = (stop.clone(), sessions.clone());
                    async move {
                        let d = consumer.next().await.unwrap()?;
                        let n = sessions.fetch_add(1, Ordering::SeqCst) + 1;
                        if n == 1 {
                            // Fails holding the message: it must come back on the next one.
                            return Err(AmqpError::Timeout);
                        }
                        assert!(d.redelivered, "the second session sees the same message");
                        consumer.ack_through(d.delivery_tag).await?;
                        stop.cancel();
                        consumer.close("done").await;
                        Ok(())
                    }
                },
            )
            .await;
        }
    });
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the consumer never got its message back")
        .unwrap();
    assert_eq!(sessions.load(Ordering::SeqCst), 2);
    assert_eq!(ups.load(Ordering::SeqCst), 2);
    let conn = connect(&amqp_url(), "volley-amqp-test-depth")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let (messages, _) = volley_amqp::queue_depth(&ch, &names.events_queue())
        .await
        .unwrap();
    assert_eq!(messages, 0, "acked once, after the reconnect");
    let _ = conn.close(200, "done".into()).await;
    broker.close().await;
    cleanup(&names).await;
}

#[tokio::test]
async fn a_fanout_consumer_hears_broadcasts_and_stops_when_told() {
    let names = names("fanout");
    let config = ConsumerConfig {
        url: amqp_url(),
        connection_name: "volley-amqp-test-control".into(),
        source: Source::Fanout(names.control_exchange()),
        names: names.clone(),
        prefetch: None,
        tag: String::new(),
    };
    let stop = CancellationToken::new();
    let (heard, mut heard_rx) = tokio::sync::mpsc::channel(4);
    let (ready, ready_rx) = tokio::sync::oneshot::channel();
    let ready = std::sync::Mutex::new(Some(ready));
    let run = tokio::spawn({
        let stop = stop.clone();
        async move {
            volley_amqp::consumer::run(
                config,
                stop.clone(),
                |up| {
                    if up && let Some(r) = ready.lock().unwrap().take() {
                        let _ = r.send(());
                    }
                },
                |mut consumer| {
                    let (stop, heard) = (stop.clone(), heard.clone());
                    async move {
                        loop {
                            tokio::select! {
                                _ = stop.cancelled() => {
                                    consumer.close("done").await;
                                    return Ok::<_, AmqpError>(());
                                }
                                d = consumer.next() => {
                                    let d = d.unwrap()?;
                                    heard.send(d.data).await.unwrap();
                                }
                            }
                        }
                    }
                },
            )
            .await;
        }
    });
    ready_rx.await.unwrap();
    let broker = Broker::new(&amqp_url(), "volley-amqp-test", names.clone());
    broker.publish_control(&cancel(9)).await.unwrap();
    let data = tokio::time::timeout(Duration::from_secs(10), heard_rx.recv())
        .await
        .unwrap()
        .unwrap();
    use prost::Message;
    assert_eq!(Control::decode(data.as_slice()).unwrap(), cancel(9));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the consumer did not stop")
        .unwrap();
    broker.close().await;
    cleanup(&names).await;
}
