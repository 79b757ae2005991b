//! Starting a persister in-process against a real nats-server and a real
//! Postgres cluster, with a fresh SQLite file.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use async_nats::jetstream::{self, consumer::pull};
use bus::wire::{
    ConversationDetail, ConversationList, DeadLetter, FinishReason, HistoryGetRequest,
    HistoryListRequest, HistoryReply, TurnRecord, Usage,
};
use chrono::{DateTime, Utc};
use clap::Parser as _;
use sqlx::{Connection as _, Row as _, postgres::PgConnection};
use testkit::{NatsServer, Postgres};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::{CancellationToken, DropGuard};

/// How long a test waits for something it can observe.
pub const WAIT: Duration = Duration::from_secs(30);

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("persister-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The servers a persister talks to; they outlive a persister restart.
pub struct Servers {
    pub nats: NatsServer,
    pub pg: Postgres,
    pub database_url: String,
    pub dir: TempDir,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

/// A running persister. Dropping it cancels it.
pub struct TestPersister {
    pub servers: Servers,
    pub addr: SocketAddr,
    pub wal: persister::Wal,
    shutdown: CancellationToken,
    /// Cancels `shutdown` when the test drops the persister.
    _guard: DropGuard,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Servers {
    /// nats-server, a Postgres cluster with a fresh empty database, a temp dir.
    pub async fn start() -> Self {
        testkit::init_logs();
        let nats = NatsServer::start()
            .await
            .expect("nats-server (run scripts/setup.sh)");
        let pg = Postgres::start()
            .await
            .expect("postgres (run scripts/setup.sh)");
        let name = format!("persister_{}", uuid::Uuid::new_v4().simple());
        let database_url = pg.create_database(&name).unwrap();
        let client = nats.client().await.unwrap();
        let js = jetstream::new(client.clone());
        Self {
            nats,
            pg,
            database_url,
            dir: TempDir::new(),
            client,
            js,
        }
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.dir.0.join("persister.db")
    }

    pub fn config(&self) -> persister::Config {
        persister::Config::parse_from([
            "persister".into(),
            "--nats-url".into(),
            self.nats.url(),
            "--database-url".into(),
            self.database_url.clone(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--sqlite-path".into(),
            self.sqlite_path().to_string_lossy().into_owned(),
            "--sync-interval-ms".into(),
            "100".into(),
        ])
    }
}

impl TestPersister {
    /// Fresh servers and a persister on them.
    pub async fn start() -> Self {
        Self::on(Servers::start().await).await
    }

    /// A persister on `servers` (which may hold an earlier run's SQLite file).
    pub async fn on(servers: Servers) -> Self {
        let config = servers.config();
        Self::with_config(servers, config).await
    }

    /// A persister on `servers` with `config` (from [`Servers::config`], adjusted).
    pub async fn with_config(servers: Servers, config: persister::Config) -> Self {
        let app = persister::Persister::build(config)
            .await
            .expect("persister builds");
        let addr = app.local_addr().unwrap();
        let wal = app.wal();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run(shutdown.clone()));
        Self {
            servers,
            addr,
            wal,
            _guard: shutdown.clone().drop_guard(),
            shutdown,
            task,
        }
    }

    /// Shuts the persister down gracefully and hands back its servers.
    pub async fn stop(self) -> Servers {
        let Self {
            servers,
            shutdown,
            task,
            ..
        } = self;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("the persister drains within bus::shutdown::DRAIN")
            .unwrap()
            .expect("the persister stops cleanly");
        servers
    }

    /// Publishes a record on `chat.done.<conv>` with `msg_id` as its
    /// `Nats-Msg-Id`, returning its stream sequence.
    pub async fn publish(&self, record: &TurnRecord, msg_id: &str) -> u64 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        let subject = bus::subject::chat_done(&record.conversation_id).unwrap();
        self.servers
            .js
            .publish_with_headers(subject, headers, serde_json::to_vec(record).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    /// Publishes raw bytes on `subject`, returning the stream sequence.
    pub async fn publish_raw(&self, subject: &str, payload: &'static str) -> u64 {
        self.servers
            .js
            .publish(subject.to_owned(), payload.into())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    /// Waits until the persister's consumer has acked (or terminated) every
    /// message up to stream sequence `seq`.
    pub async fn wait_acked(&self, seq: u64) {
        self.wait_acked_on(bus::streams::PERSISTER_TURNS, seq).await;
    }

    /// [`Self::wait_acked`] for the consumer `def`.
    pub async fn wait_acked_on(&self, def: bus::streams::ConsumerDef, seq: u64) {
        let consumer = self.consumer(def).await;
        testkit::wait_for("the consumer's ack floor", WAIT, || {
            let consumer = &consumer;
            async move {
                let info = consumer.get_info().await.ok()?;
                (info.ack_floor.stream_sequence >= seq && info.num_ack_pending == 0).then_some(())
            }
        })
        .await
        .unwrap();
    }

    /// The persister's durable consumer `def`.
    pub async fn consumer(
        &self,
        def: bus::streams::ConsumerDef,
    ) -> jetstream::consumer::Consumer<pull::Config> {
        let name = def.config().unwrap().durable_name.unwrap();
        let stream = self.servers.js.get_stream(def.stream).await.unwrap();
        stream.get_consumer(&name).await.unwrap()
    }

    /// The consumer's ack floor (stream sequence).
    pub async fn ack_floor(&self) -> u64 {
        let stream = self
            .servers
            .js
            .get_stream(bus::streams::CHAT_DONE)
            .await
            .unwrap();
        let consumer: jetstream::consumer::Consumer<pull::Config> =
            stream.get_consumer("persister-turns").await.unwrap();
        consumer.get_info().await.unwrap().ack_floor.stream_sequence
    }

    /// Waits until the turn is in SQLite and returns it as stored.
    pub async fn wait_sqlite(&self, turn_id: &str) -> TurnRecord {
        testkit::wait_for("the turn in SQLite", WAIT, || async {
            self.wal.turn(turn_id).await.ok().flatten()
        })
        .await
        .unwrap()
    }

    pub async fn pg(&self) -> Option<PgConnection> {
        PgConnection::connect(&self.servers.database_url).await.ok()
    }

    /// The turn as stored in Postgres, if it is there.
    pub async fn pg_turn(&self, turn_id: &str) -> Option<TurnRecord> {
        let mut conn = self.pg().await?;
        let row = sqlx::query(
            "SELECT turn_id, conversation_id, user_id, request_id, model, finish_reason, \
             user_text, assistant_text, prompt_tokens, completion_tokens, error, \
             created_at, first_token_at, completed_at, sources FROM turns WHERE turn_id = $1",
        )
        .bind(turn_id)
        .fetch_optional(&mut conn)
        .await
        .ok()??;
        let finish: String = row.get("finish_reason");
        let prompt_tokens: i64 = row.get("prompt_tokens");
        let completion_tokens: i64 = row.get("completion_tokens");
        Some(TurnRecord {
            turn_id: row.get("turn_id"),
            conversation_id: row.get("conversation_id"),
            user_id: row.get("user_id"),
            request_id: row.get("request_id"),
            model: row.get("model"),
            finish_reason: serde_json::from_value(serde_json::Value::String(finish)).unwrap(),
            user_text: row.get("user_text"),
            assistant_text: row.get("assistant_text"),
            usage: Usage {
                prompt_tokens: prompt_tokens.try_into().unwrap(),
                completion_tokens: completion_tokens.try_into().unwrap(),
            },
            sources: row.get("sources"),
            error: row.get("error"),
            created_at: row.get("created_at"),
            first_token_at: row.get("first_token_at"),
            completed_at: row.get("completed_at"),
        })
    }

    /// Waits until the turn is in Postgres.
    pub async fn wait_pg(&self, turn_id: &str) -> TurnRecord {
        testkit::wait_for("the turn in Postgres", WAIT, || self.pg_turn(turn_id))
            .await
            .unwrap()
    }

    /// One value from Postgres (`count(*)` and the like).
    pub async fn pg_scalar(&self, sql: &'static str, bind: &str) -> Option<i64> {
        let mut conn = self.pg().await?;
        sqlx::query_scalar(sql)
            .bind(bind)
            .fetch_one(&mut conn)
            .await
            .ok()
    }

    /// The conversation row: owner, created_at, updated_at.
    pub async fn pg_conversation(
        &self,
        conversation_id: &str,
    ) -> Option<(String, DateTime<Utc>, DateTime<Utc>)> {
        let mut conn = self.pg().await?;
        sqlx::query_as(
            "SELECT user_id, created_at, updated_at FROM conversations WHERE conversation_id = $1",
        )
        .bind(conversation_id)
        .fetch_optional(&mut conn)
        .await
        .ok()?
    }

    /// `GET path` on the ops listener: status code and JSON body.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = self.get_raw(path).await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// `GET path` on the ops listener: the body as text.
    pub async fn get_text(&self, path: &str) -> String {
        self.get_raw(path).await.1
    }

    async fn get_raw(&self, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8(response).unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or("");
        (status, body.to_owned())
    }

    /// Waits until `/readyz` reports `status` and returns its code and body.
    pub async fn wait_ready_status(&self, status: &str) -> (u16, serde_json::Value) {
        self.wait_ready(&format!("/readyz status {status}"), |body| {
            body["status"] == status
        })
        .await
    }

    /// Waits until the `/readyz` body satisfies `check`.
    pub async fn wait_ready(
        &self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> (u16, serde_json::Value) {
        testkit::wait_for(what, WAIT, || async {
            let (code, body) = self.get("/readyz").await;
            check(&body).then_some((code, body))
        })
        .await
        .unwrap()
    }

    /// Asks the persister over core NATS request-reply, as the gateway does.
    pub async fn ask<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
        &self,
        subject: &'static str,
        query: &Q,
    ) -> HistoryReply<A> {
        let body = serde_json::to_vec(query).unwrap();
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            self.servers.client.request(subject, body.into()),
        )
        .await
        .expect("history answers within 5 s")
        .expect("a persister answers");
        serde_json::from_slice(&reply.payload).unwrap()
    }

    /// `history.get` as `user_id`.
    pub async fn history_get(
        &self,
        user_id: &str,
        conversation_id: &str,
    ) -> HistoryReply<ConversationDetail> {
        let query = HistoryGetRequest {
            user_id: user_id.into(),
            conversation_id: conversation_id.into(),
            ..Default::default()
        };
        self.ask(bus::subject::HISTORY_GET, &query).await
    }

    /// One `history.get` page straight from this persister, and the size of
    /// its reply in bytes.
    pub async fn history_page(
        &self,
        query: &HistoryGetRequest,
    ) -> (HistoryReply<ConversationDetail>, usize) {
        let body = serde_json::to_vec(query).unwrap();
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            self.servers
                .client
                .request(bus::subject::HISTORY_GET, body.into()),
        )
        .await
        .expect("history answers within 5 s")
        .expect("a persister answers");
        (
            serde_json::from_slice(&reply.payload).unwrap(),
            reply.payload.len(),
        )
    }

    /// `history.list` as `user_id`.
    pub async fn history_list(&self, user_id: &str) -> ConversationList {
        let query = HistoryListRequest {
            user_id: user_id.into(),
            limit: None,
        };
        match self.ask(bus::subject::HISTORY_LIST, &query).await {
            HistoryReply::Ok(list) => list,
            HistoryReply::Err(error) => panic!("history.list failed: {error:?}"),
        }
    }

    /// Every dead letter on `dlq.turns`, once there are at least `n`.
    pub async fn dead_letters(&self, n: usize) -> Vec<DeadLetter> {
        self.dead_letters_on("dlq.turns", n).await
    }

    /// Every dead letter on `subject`, once there are at least `n`.
    pub async fn dead_letters_on(&self, subject: &str, n: usize) -> Vec<DeadLetter> {
        testkit::wait_for("dead letters", WAIT, || async {
            let payloads = bus::replay::payloads(&self.servers.js, bus::streams::DLQ, subject)
                .await
                .ok()?;
            let letters: Vec<DeadLetter> = payloads
                .iter()
                .filter_map(|p| serde_json::from_slice(p).ok())
                .collect();
            (letters.len() >= n).then_some(letters)
        })
        .await
        .unwrap()
    }
}

/// A turn record with text that must survive byte for byte.
pub fn record(conversation_id: &str) -> TurnRecord {
    let created_at = Utc::now();
    let turn_id = uuid::Uuid::now_v7().to_string();
    TurnRecord {
        request_id: format!("req-{turn_id}"),
        turn_id,
        conversation_id: conversation_id.into(),
        user_id: "user-1".into(),
        model: "stand-in-1".into(),
        user_text: "  Where does a PET bottle go?\n\"라벨\" off, cap on? 🙂  ".into(),
        assistant_text: "Rinse it,\tremove the label;\r\nplastics bin. \\ ' \" % _".into(),
        finish_reason: FinishReason::Stop,
        usage: Usage {
            prompt_tokens: 7,
            completion_tokens: 4,
        },
        // Stored in order, in both stores, and returned by history.
        sources: vec!["pet_bottle".into(), "plastic".into()],
        error: None,
        created_at,
        first_token_at: Some(created_at + chrono::Duration::milliseconds(250)),
        completed_at: created_at + chrono::Duration::seconds(1),
    }
}

/// Every turn of a conversation, oldest first, read page by page through
/// `history` (newest page first, each page oldest first), and the pages'
/// sizes in turns.
pub async fn all_pages(
    history: &bus::history::HistoryClient,
    user_id: &str,
    conversation_id: &str,
    limit: u32,
) -> (Vec<TurnRecord>, Vec<usize>) {
    let mut pages: Vec<Vec<TurnRecord>> = Vec::new();
    let mut before = None;
    loop {
        let query = HistoryGetRequest {
            user_id: user_id.into(),
            conversation_id: conversation_id.into(),
            limit: Some(limit),
            before: before.take(),
            ..Default::default()
        };
        let detail = match history.get(&query, Duration::from_secs(5)).await {
            Ok(Some(HistoryReply::Ok(detail))) => detail,
            other => panic!("history.get page {} failed: {other:?}", pages.len() + 1),
        };
        assert!(pages.len() < 1000, "the cursor does not advance");
        pages.push(detail.turns);
        match (detail.has_more, detail.next_cursor) {
            (true, Some(cursor)) => before = Some(cursor),
            (false, None) => break,
            other => panic!("has_more and next_cursor disagree: {other:?}"),
        }
    }
    let sizes = pages.iter().map(Vec::len).collect();
    (pages.into_iter().rev().flatten().collect(), sizes)
}
