//! The consumer backlog gauges ([`bus::ops::watch_consumers`]) against a real
//! nats-server: what they report is what JetStream holds for the consumer.

use std::time::Duration;

use async_nats::jetstream;
use bus::streams;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// The value of `series` (name and labels, as rendered) on the process's
/// `/metrics` text, if listed.
fn sample(series: &str) -> Option<String> {
    bus::ops::metrics_handle()
        .render()
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')
                .map(str::to_owned)
        })
}

#[tokio::test]
async fn consumer_gauges_follow_what_the_consumer_has_not_delivered_or_not_acked() {
    let nats = testkit::NatsServer::start().await.unwrap();
    let js = jetstream::new(nats.client().await.unwrap());
    streams::ensure_all(&js, 1).await.unwrap();
    let consumer = streams::STREAMER_CHAT.ensure(&js).await.unwrap();
    for conversation in ["c1", "c2", "c3"] {
        js.publish(format!("chat.req.{conversation}"), "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let shutdown = CancellationToken::new();
    // Names of this test's own: the recorder is shared by the process.
    let task = bus::ops::watch_consumers(
        js.clone(),
        &[streams::STREAMER_CHAT],
        "test_consumer_pending",
        "test_consumer_ack_pending",
        Duration::from_millis(50),
        shutdown.clone(),
    );
    let labels = r#"{stream="CHAT_REQ",consumer="streamer-chat"}"#;
    let pending = format!("test_consumer_pending{labels}");
    let ack_pending = format!("test_consumer_ack_pending{labels}");
    testkit::wait_for("3 pending", Duration::from_secs(5), || async {
        (sample(&pending)? == "3" && sample(&ack_pending)? == "0").then_some(())
    })
    .await
    .unwrap();

    // One delivered and not acked: it moves from pending to ack pending.
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    let delivered = batch.next().await.unwrap().unwrap();
    testkit::wait_for("2 pending, 1 unacked", Duration::from_secs(5), || async {
        (sample(&pending)? == "2" && sample(&ack_pending)? == "1").then_some(())
    })
    .await
    .unwrap();

    delivered.ack().await.unwrap();
    testkit::wait_for("2 pending, 0 unacked", Duration::from_secs(5), || async {
        (sample(&pending)? == "2" && sample(&ack_pending)? == "0").then_some(())
    })
    .await
    .unwrap();

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the watch stops with shutdown")
        .unwrap();
}
