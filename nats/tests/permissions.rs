//! The shipped configuration's NATS permissions (`nats/auth.conf`): each
//! service may do its own work and nothing of another's.

use std::time::Duration;

use async_nats::jetstream;
use bus::streams;
use futures::StreamExt as _;

async fn stored(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// A JetStream publish as `js`'s user; true when the stream stored it.
async fn js_publish(js: &jetstream::Context, subject: &str) -> bool {
    match js.publish(subject.to_owned(), "{}".into()).await {
        Ok(ack) => tokio::time::timeout(Duration::from_secs(3), ack)
            .await
            .is_ok_and(|ack| ack.is_ok()),
        Err(_) => false,
    }
}

#[tokio::test]
async fn the_gateways_identity_cannot_write_frames_or_records_or_answer_history() {
    let nats = testkit::NatsServer::start_secured().await.unwrap();
    let admin = jetstream::new(nats.client().await.unwrap());
    streams::ensure_all(&admin, 1).await.unwrap();
    let gateway = nats.client_as("gateway").await.unwrap();
    let gateway_js = jetstream::new(gateway.clone());

    // What it may do: publish a chat request.
    assert!(js_publish(&gateway_js, "chat.req.c1").await);
    // What it may not: token frames, turn records, scan events, dead letters.
    let refused = ["chat.tok.c1.t1", "chat.done.c1", "scan.evt.s1", "dlq.chat"];
    let stored_any = futures::future::join_all(refused.map(|s| js_publish(&gateway_js, s))).await;
    assert_eq!(stored_any, [false; 4], "{refused:?}");
    gateway.flush().await.unwrap();
    assert_eq!(stored(&admin, streams::CHAT_TOK).await, 0);
    assert_eq!(stored(&admin, streams::CHAT_DONE).await, 0);
    assert_eq!(stored(&admin, streams::SCAN_EVT).await, 0);
    assert_eq!(stored(&admin, streams::DLQ).await, 0);
    // Nor drop or empty a stream.
    assert!(gateway_js.delete_stream(streams::CHAT_DONE).await.is_err());
    assert!(
        gateway_js
            .get_stream(streams::CHAT_REQ)
            .await
            .unwrap()
            .purge()
            .await
            .is_err()
    );
    assert_eq!(stored(&admin, streams::CHAT_REQ).await, 1);

    // It cannot answer history requests: its subscription gets nothing, so
    // the streamer's request finds no responder.
    let mut posing = gateway.subscribe(bus::subject::HISTORY_GET).await.unwrap();
    gateway.flush().await.unwrap();
    let streamer = nats.client_as("streamer").await.unwrap();
    let asked = streamer
        .request(bus::subject::HISTORY_GET, "{}".into())
        .await;
    assert!(asked.is_err(), "nobody may answer but a persister");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), posing.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn history_replies_reach_only_the_asker_and_strangers_are_refused() {
    let nats = testkit::NatsServer::start_secured().await.unwrap();
    let persister = nats.client_as("persister").await.unwrap();
    let mut requests = persister
        .subscribe(bus::subject::HISTORY_GET)
        .await
        .unwrap();
    persister.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            if let Some(reply) = request.reply {
                persister
                    .publish(reply, "the history".into())
                    .await
                    .unwrap();
            }
        }
    });

    // The streamer listens on every gateway inbox: the permissions refuse it.
    let streamer = nats.client_as("streamer").await.unwrap();
    let mut eavesdrop = streamer.subscribe("_INBOX_gateway.>").await.unwrap();
    streamer.flush().await.unwrap();
    let gateway = nats.client_as("gateway").await.unwrap();
    let answer = gateway
        .request(bus::subject::HISTORY_GET, "{}".into())
        .await
        .expect("the persister answers the gateway");
    assert_eq!(answer.payload, "the history");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), eavesdrop.next())
            .await
            .is_err(),
        "the streamer read a reply meant for the gateway"
    );
    // A persister's identity cannot publish frames either.
    let persister_js = jetstream::new(nats.client_as("persister").await.unwrap());
    assert!(!js_publish(&persister_js, "chat.tok.c1.t1").await);

    // No identity, no connection; a wrong password neither.
    assert!(async_nats::connect(nats.url()).await.is_err());
    assert!(
        async_nats::ConnectOptions::new()
            .user_and_password("gateway".into(), "guess".into())
            .connect(nats.url())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn only_the_streamer_grants_characters_and_records_owners_and_only_it_and_the_gateway_write_the_catalogue()
 {
    let nats = testkit::NatsServer::start_secured().await.unwrap();
    let admin = jetstream::new(nats.client().await.unwrap());
    streams::ensure_all(&admin, 1).await.unwrap();
    let js_of = |user: &'static str| {
        let nats = &nats;
        async move { jetstream::new(nats.client_as(user).await.unwrap()) }
    };
    let (gateway, streamer, persister) = (
        js_of("gateway").await,
        js_of("streamer").await,
        js_of("persister").await,
    );

    assert!(js_publish(&streamer, "reward.grant.s1").await);
    let (by_gateway, by_persister) = tokio::join!(
        js_publish(&gateway, "reward.grant.s2"),
        js_publish(&persister, "reward.grant.s3")
    );
    assert!(!by_gateway && !by_persister);
    assert_eq!(stored(&admin, streams::REWARDS).await, 1);

    let owners = format!("$KV.{}.u1.petty", streams::KV_CHARACTER_OWNERS);
    assert!(js_publish(&streamer, &owners).await);
    assert!(!js_publish(&gateway, &owners).await);

    let catalogue = format!("$KV.{}.petty", streams::KV_CHARACTERS);
    assert!(
        js_publish(&gateway, &catalogue).await,
        "the admin API writes it"
    );
    assert!(
        js_publish(&streamer, &catalogue).await,
        "the streamer seeds it"
    );
    assert!(!js_publish(&persister, &catalogue).await);

    // Nobody but an operator empties the grants or the catalogue (refusals
    // end in timeouts, so all at once).
    let mut purges = Vec::new();
    for js in [&gateway, &streamer, &persister] {
        for stream in [streams::REWARDS, "KV_characters", "KV_character_owners"] {
            purges.push(async move {
                let purged = js.get_stream(stream).await.unwrap().purge().await;
                (stream, purged.is_ok())
            });
        }
    }
    for (stream, purged) in futures::future::join_all(purges).await {
        assert!(!purged, "{stream} was purged");
    }
    assert_eq!(stored(&admin, streams::REWARDS).await, 1);
}

#[tokio::test]
async fn only_the_gateway_writes_the_erasure_register_and_the_others_read_and_watch_it() {
    let nats = testkit::NatsServer::start_secured().await.unwrap();
    let admin = jetstream::new(nats.client().await.unwrap());
    streams::ensure_all(&admin, 1).await.unwrap();
    let js_of = |user: &'static str| {
        let nats = &nats;
        async move { jetstream::new(nats.client_as(user).await.unwrap()) }
    };
    let (gateway, streamer, persister) = (
        js_of("gateway").await,
        js_of("streamer").await,
        js_of("persister").await,
    );

    // The persister watches before the gateway writes: it sees the mark.
    let kv = bus::register::open(&persister).await.unwrap();
    let (_, mut updates) = bus::register::Register::load(&kv).await.unwrap();
    let at = chrono::Utc::now();
    bus::register::record(&gateway, "erin", at).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), updates.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen.key, bus::subject::user_key("erin"));
    for js in [&streamer, &persister] {
        let kv = bus::register::open(js).await.unwrap();
        assert_eq!(
            bus::register::erased_at(&kv, "erin").await.unwrap(),
            Some(at)
        );
    }

    let key = format!(
        "$KV.{}.{}",
        streams::KV_ERASURES,
        bus::subject::user_key("olga")
    );
    let (by_streamer, by_persister) =
        tokio::join!(js_publish(&streamer, &key), js_publish(&persister, &key));
    assert!(!by_streamer && !by_persister);
    let stream = format!("KV_{}", streams::KV_ERASURES);
    assert_eq!(stored(&admin, &stream).await, 1);
    let mut purges = Vec::new();
    for js in [&gateway, &streamer, &persister] {
        let stream = stream.clone();
        purges.push(async move { js.get_stream(&stream).await.unwrap().purge().await.is_ok() });
    }
    assert_eq!(futures::future::join_all(purges).await, [false; 3]);
    assert_eq!(stored(&admin, &stream).await, 1);
}
