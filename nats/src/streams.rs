//! JetStream stream and consumer definitions, loaded from the JSON files under
//! `nats/streams/` and `nats/consumers/`.
//!
//! The files are in the format `nats stream add --config FILE` and
//! `nats consumer add STREAM --config FILE` accept, so an operator and the
//! services build exactly the same streams. They are compiled in, so a binary
//! never depends on the working directory.

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, stream};

/// Stream of chat turn requests.
pub const CHAT_REQ: &str = "CHAT_REQ";
/// Stream of chat token frames (the resume window).
pub const CHAT_TOK: &str = "CHAT_TOK";
/// Stream of completed turn records.
pub const CHAT_DONE: &str = "CHAT_DONE";
/// Stream of scan requests.
pub const SCAN_REQ: &str = "SCAN_REQ";
/// Stream of scan events (the SSE replay source).
pub const SCAN_EVT: &str = "SCAN_EVT";
/// Stream of completed scan records.
pub const SCAN_DONE: &str = "SCAN_DONE";
/// Stream of dead letters.
pub const DLQ: &str = "DLQ";
/// Stream of max-deliveries advisories of the streamer's work consumers.
pub const MAX_DELIVERIES: &str = "MAX_DELIVERIES";
/// Stream of character grants (`reward.grant.<scan>`).
pub const REWARDS: &str = "REWARDS";
/// Work queue of the Postgres parts of erasures (`erase.pg.<user key>`).
pub const ERASE: &str = "ERASE";

const STREAM_FILES: &[(&str, &str)] = &[
    (CHAT_REQ, include_str!("../streams/CHAT_REQ.json")),
    (CHAT_TOK, include_str!("../streams/CHAT_TOK.json")),
    (CHAT_DONE, include_str!("../streams/CHAT_DONE.json")),
    (SCAN_REQ, include_str!("../streams/SCAN_REQ.json")),
    (SCAN_EVT, include_str!("../streams/SCAN_EVT.json")),
    (SCAN_DONE, include_str!("../streams/SCAN_DONE.json")),
    (DLQ, include_str!("../streams/DLQ.json")),
    (
        MAX_DELIVERIES,
        include_str!("../streams/MAX_DELIVERIES.json"),
    ),
    (REWARDS, include_str!("../streams/REWARDS.json")),
    (ERASE, include_str!("../streams/ERASE.json")),
];

/// A durable consumer: the stream it reads and its definition file.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerDef {
    /// The stream the consumer reads.
    pub stream: &'static str,
    /// The consumer's JSON definition.
    json: &'static str,
}

/// The streamer's chat workers.
pub const STREAMER_CHAT: ConsumerDef = ConsumerDef {
    stream: CHAT_REQ,
    json: include_str!("../consumers/CHAT_REQ.streamer-chat.json"),
};
/// The streamer's scan workers.
pub const STREAMER_SCAN: ConsumerDef = ConsumerDef {
    stream: SCAN_REQ,
    json: include_str!("../consumers/SCAN_REQ.streamer-scan.json"),
};
/// The persister's turn ingest.
pub const PERSISTER_TURNS: ConsumerDef = ConsumerDef {
    stream: CHAT_DONE,
    json: include_str!("../consumers/CHAT_DONE.persister-turns.json"),
};
/// The persister's scan ingest.
pub const PERSISTER_SCANS: ConsumerDef = ConsumerDef {
    stream: SCAN_DONE,
    json: include_str!("../consumers/SCAN_DONE.persister-scans.json"),
};

/// The persister's batched writer of character grants.
pub const PERSISTER_REWARDS: ConsumerDef = ConsumerDef {
    stream: REWARDS,
    json: include_str!("../consumers/REWARDS.persister-rewards.json"),
};

/// The persisters' eraser of a user's Postgres rows (`DELETE /v1/me`).
pub const PERSISTER_ERASE: ConsumerDef = ConsumerDef {
    stream: ERASE,
    json: include_str!("../consumers/ERASE.persister-erase.json"),
};

/// The streamer's closer of turns and scans whose deliveries ran out.
pub const STREAMER_EXHAUSTED: ConsumerDef = ConsumerDef {
    stream: MAX_DELIVERIES,
    json: include_str!("../consumers/MAX_DELIVERIES.streamer-exhausted.json"),
};

/// Failed scans waiting for a reprocess pass.
pub const STREAMER_DLQ_SCAN: ConsumerDef = ConsumerDef {
    stream: DLQ,
    json: include_str!("../consumers/DLQ.streamer-dlq-scan.json"),
};

/// KV bucket: conversation id -> owner (`ConversationOwner`), for ownership checks.
pub const KV_CONVERSATIONS: &str = "conversations";
/// KV bucket: turn id -> `TurnIndex`, for idempotent sends, resume and cancel.
pub const KV_TURNS: &str = "chat_turns";

/// KV bucket: user key -> the user's turns in flight, for the per-user
/// limit across gateway nodes.
pub const KV_USER_TURNS: &str = "user_turns";

/// KV bucket: persister instance -> heartbeat, so history askers know how
/// many persisters to wait for.
pub const KV_PERSISTERS: &str = "persisters";

/// KV bucket: conversation id -> `ConversationContext`, the newest turns a
/// prompt carries; kept [`CONTEXT_RETENTION`] after a conversation's last turn.
pub const KV_CONTEXT: &str = "chat_context";
/// How long a conversation's context stays after its last turn: as long as
/// its requests and records stay in `CHAT_REQ` and `CHAT_DONE`. A
/// conversation idle for longer is read from the persisters once, then kept
/// here again.
pub const CONTEXT_RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// Largest `chat_context` value. The streamer keeps 32 KiB of text in one
/// (JSON escapes at most sextuple that, plus 50 turns' ids and times), well
/// under the server's max payload.
pub const CONTEXT_MAX_VALUE: i32 = 256 * 1024;

/// KV bucket: scan id -> owner (`ScanOwner`), 30 days, for ownership checks.
pub const KV_SCANS: &str = "scans";
/// KV bucket: perceptual hash -> cached `ScanRecord`, 7 days.
pub const KV_SCAN_CACHE: &str = "scan_cache";
/// Object store bucket: the uploaded images, 30 days.
pub const OBJ_SCAN_IMAGES: &str = "scan_images";
/// How long uploaded images and scan ownership are kept.
pub const SCAN_RETENTION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// KV bucket: character id -> `Character`, the reward catalogue. Seeded
/// from `streamer/rules/characters.json` by the first streamer that finds
/// it never written; the admin API writes it; every streamer watches it.
pub const KV_CHARACTERS: &str = "characters";
/// KV bucket: `<user key>.<character id>` -> the id of the scan that first
/// earned that character for that user, written create-only: whoever
/// creates the key earned the character first (`new: true`).
pub const KV_CHARACTER_OWNERS: &str = "character_owners";

/// KV bucket: user key (`subject::user_key`) -> `ErasureMark`, the erasure
/// register: when each user was erased (`DELETE /v1/me`), written by the
/// gateway before anything else is erased. Persisters and streamers read it
/// so that nothing the user made before the erasure is stored again later
/// (a persister that was down, a turn in flight, a grant still queued).
pub const KV_ERASURES: &str = "erasures";
/// How long the register remembers an erasure: longer than anything that
/// can still bring the user's older data back (`CHAT_DONE`, `SCAN_DONE`
/// and `REWARDS` keep records 7 days; a persister down for weeks).
pub const ERASURE_REGISTER_KEEP: std::time::Duration =
    std::time::Duration::from_secs(30 * 24 * 3600);

/// The KV buckets of the contract. Kept in code rather than JSON because
/// the JetStream CLI's `nats kv add` takes flags, not a config file.
pub fn key_value_buckets() -> Vec<jetstream::kv::Config> {
    let week = std::time::Duration::from_secs(7 * 24 * 3600);
    vec![
        jetstream::kv::Config {
            bucket: KV_PERSISTERS.into(),
            description: "Persister instance -> heartbeat (expires when it stops).".into(),
            history: 1,
            max_age: crate::history::HEARTBEAT_STALE,
            // File, not memory: a memory bucket is gone after a nats-server
            // restart, and with it every persister's heartbeat.
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
        jetstream::kv::Config {
            bucket: KV_CONVERSATIONS.into(),
            description: "Conversation id -> owning user id.".into(),
            history: 1,
            max_value_size: 4096,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
        jetstream::kv::Config {
            bucket: KV_TURNS.into(),
            description: "Turn id -> owner, conversation and request; a week, for idempotent sends, resume and cancel.".into(),
            history: 1,
            max_age: week,
            max_value_size: 4096,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
        jetstream::kv::Config {
            bucket: KV_USER_TURNS.into(),
            description: "User key -> the user's turns in flight (the per-user limit across gateways).".into(),
            history: 1,
            max_age: std::time::Duration::from_secs(3600),
            max_value_size: 64 * 1024,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
        jetstream::kv::Config {
            bucket: KV_CONTEXT.into(),
            description: "Conversation id -> its newest turns' text, cut to the prompt budget (the streamer's context, a week after the last turn).".into(),
            history: 1,
            max_age: CONTEXT_RETENTION,
            max_value_size: CONTEXT_MAX_VALUE,
            // File: a cache, but losing it on a restart would send every
            // conversation's next turn to the persisters at once.
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
        jetstream::kv::Config {
            bucket: KV_SCANS.into(),
            description: "Scan id -> owning user id, for ownership checks.".into(),
            history: 1,
            max_age: SCAN_RETENTION,
            max_value_size: 4096,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
        jetstream::kv::Config {
            bucket: KV_CHARACTERS.into(),
            description: "Character id -> catalogue entry (names, descriptions, categories, priority).".into(),
            // A few revisions, so an operator can see what an admin changed.
            history: 5,
            max_value_size: 16 * 1024,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
        jetstream::kv::Config {
            bucket: KV_CHARACTER_OWNERS.into(),
            description: "<user key>.<character id> -> the scan that first earned it (create-only; decides `new`).".into(),
            history: 1,
            max_value_size: 1024,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
        jetstream::kv::Config {
            bucket: KV_ERASURES.into(),
            description: "User key -> when the user was erased (the erasure register).".into(),
            history: 1,
            max_age: ERASURE_REGISTER_KEEP,
            max_value_size: 1024,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
        jetstream::kv::Config {
            bucket: KV_SCAN_CACHE.into(),
            description: "Perceptual hash -> cached scan result, a week.".into(),
            history: 1,
            max_age: week,
            max_value_size: 256 * 1024,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
    ]
}

/// The object store of the contract: uploaded images.
pub fn object_store() -> jetstream::object_store::Config {
    jetstream::object_store::Config {
        bucket: OBJ_SCAN_IMAGES.into(),
        description: Some("Uploaded scan images, kept 30 days.".into()),
        max_age: SCAN_RETENTION,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Every stream definition of the contract.
///
/// # Errors
/// When a compiled-in definition is not valid JSON for a stream config.
pub fn definitions() -> anyhow::Result<Vec<stream::Config>> {
    STREAM_FILES
        .iter()
        .map(|(name, json)| {
            serde_json::from_str(json)
                .with_context(|| format!("stream definition {name} is invalid"))
        })
        .collect()
}

impl ConsumerDef {
    /// The consumer's configuration.
    ///
    /// # Errors
    /// When the compiled-in definition is not valid JSON for a pull consumer.
    pub fn config(&self) -> anyhow::Result<pull::Config> {
        serde_json::from_str(self.json)
            .with_context(|| format!("consumer definition for {} is invalid", self.stream))
    }

    /// Creates the durable consumer, or updates it to the definition, and returns it.
    ///
    /// # Errors
    /// When the stream is missing or the server refuses the definition.
    pub async fn ensure(
        &self,
        js: &jetstream::Context,
    ) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        self.ensure_with(js, self.config()?).await
    }

    /// Like [`Self::ensure`], with the definition adjusted by the caller
    /// (for example a shorter ack wait in tests).
    ///
    /// # Errors
    /// When the stream is missing or the server refuses the definition.
    pub async fn ensure_with(
        &self,
        js: &jetstream::Context,
        config: pull::Config,
    ) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        let name = config.durable_name.clone().unwrap_or_default();
        let stream = js
            .get_stream(self.stream)
            .await
            .with_context(|| format!("stream {} is missing", self.stream))?;
        stream
            .create_consumer(config)
            .await
            .with_context(|| format!("cannot create consumer {name} on {}", self.stream))
    }
}

/// Creates every stream, KV bucket and object store of the contract, or
/// updates it to its definition, each with `replicas` replicas (raised or
/// lowered on an existing deployment). Safe to call from every service at
/// every start.
///
/// # Errors
/// When the server refuses a definition (for example JetStream is disabled,
/// or the cluster has fewer nodes than `replicas`).
pub async fn ensure_all(js: &jetstream::Context, replicas: u8) -> anyhow::Result<()> {
    // A cluster that is still electing its leaders (every service starting
    // at once, or a node restarting) times out or has no peers to place a
    // replica on for a while: wait that out, fail at once on anything else.
    let deadline = tokio::time::Instant::now() + ENSURE_PATIENCE;
    let mut attempt = 0;
    loop {
        match ensure_all_once(js, replicas).await {
            Ok(()) => return Ok(()),
            Err(error) if is_transient(&error) && tokio::time::Instant::now() < deadline => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "JetStream is not ready for the streams yet; retrying."
                );
                tokio::time::sleep(crate::backoff::delay(
                    std::time::Duration::from_millis(250),
                    attempt,
                    std::time::Duration::from_secs(5),
                ))
                .await;
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// How long [`ensure_all`] waits for a cluster that is not ready yet.
const ENSURE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(90);

/// True for the failures a forming or recovering cluster gives.
fn is_transient(error: &anyhow::Error) -> bool {
    let text = format!("{error:#}").to_lowercase();
    // Not "no responders": a server without JetStream says that, for good.
    ["timed out", "no suitable peers", "temporarily unavailable"]
        .iter()
        .any(|sign| text.contains(sign))
}

async fn ensure_all_once(js: &jetstream::Context, replicas: u8) -> anyhow::Result<()> {
    let replicas = usize::from(replicas.max(1));
    for mut config in definitions()? {
        config.num_replicas = replicas;
        let name = config.name.clone();
        js.create_or_update_stream(config).await.with_context(|| {
            format!(
                "cannot create or update stream {name} with {replicas} replica(s) (is JetStream enabled on the server, on enough nodes?)"
            )
        })?;
    }
    for config in key_value_buckets() {
        ensure_bucket(js, config, replicas as u8).await?;
    }
    let mut objects = object_store();
    objects.num_replicas = replicas;
    let stream = format!("OBJ_{}", objects.bucket);
    if js.get_object_store(&objects.bucket).await.is_err() {
        let bucket = objects.bucket.clone();
        js.create_object_store(objects)
            .await
            .with_context(|| format!("cannot create object store {bucket}"))?;
    }
    shape(js, &stream, replicas).await
}

/// Creates the KV bucket `config` describes with `replicas` replicas unless
/// it exists, and gives an existing one that many.
///
/// # Errors
/// When the server refuses to create or update it.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    mut config: jetstream::kv::Config,
    replicas: u8,
) -> anyhow::Result<jetstream::kv::Store> {
    let replicas = usize::from(replicas.max(1));
    let bucket = config.bucket.clone();
    if js.get_key_value(&bucket).await.is_err() {
        config.num_replicas = replicas;
        js.create_key_value(config)
            .await
            .with_context(|| format!("cannot create KV bucket {bucket}"))?;
    }
    shape(js, &format!("KV_{bucket}"), replicas).await?;
    // Opened after shaping: a store keeps the stream's settings it was
    // opened with, and reads by them.
    js.get_key_value(&bucket)
        .await
        .with_context(|| format!("cannot open KV bucket {bucket}"))
}

/// Gives the stream under a KV bucket or object store `replicas` replicas
/// (the bucket APIs only set them at creation) and has reads answered by
/// its leader. The bucket APIs turn on "direct get", which any replica
/// answers, one that has not applied the latest write included; every
/// service here reads what another has just written (a gateway stores an
/// image, a streamer reads it 30 ms later), and the chaos run saw such an
/// image reported missing. The leader has every acknowledged write.
async fn shape(js: &jetstream::Context, stream: &str, replicas: usize) -> anyhow::Result<()> {
    let found = js
        .get_stream(stream)
        .await
        .with_context(|| format!("stream {stream} is missing"))?;
    let config = &found.cached_info().config;
    if config.num_replicas == replicas && !config.allow_direct {
        return Ok(());
    }
    let mut config = config.clone();
    config.num_replicas = replicas;
    config.allow_direct = false;
    js.update_stream(config)
        .await
        .with_context(|| format!("cannot give stream {stream} {replicas} replica(s)"))?;
    Ok(())
}

/// The definition of the contract's KV bucket `name`.
pub fn bucket(name: &str) -> Option<jetstream::kv::Config> {
    key_value_buckets().into_iter().find(|c| c.bucket == name)
}

/// True when every stream of the contract exists on the server.
pub async fn all_exist(js: &jetstream::Context) -> bool {
    for (name, _) in STREAM_FILES {
        if js.get_stream(*name).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forming_cluster_is_waited_for_and_a_server_without_jetstream_is_not() {
        let transient = anyhow::anyhow!("jetstream request timed out")
            .context("cannot create or update stream CHAT_REQ");
        assert!(is_transient(&transient));
        assert!(is_transient(&anyhow::anyhow!(
            "insufficient resources: no suitable peers for placement"
        )));
        assert!(!is_transient(&anyhow::anyhow!("no responders")));
        assert!(!is_transient(&anyhow::anyhow!(
            "stream name already in use"
        )));
    }

    #[test]
    fn every_definition_parses_and_names_its_file() {
        let defs = definitions().unwrap();
        assert_eq!(defs.len(), STREAM_FILES.len());
        for (def, (name, _)) in defs.iter().zip(STREAM_FILES) {
            assert_eq!(&def.name, name);
            assert!(!def.subjects.is_empty());
            assert!(def.duplicate_window <= def.max_age);
        }
        for c in [
            STREAMER_CHAT,
            STREAMER_SCAN,
            PERSISTER_TURNS,
            PERSISTER_SCANS,
            STREAMER_DLQ_SCAN,
            STREAMER_EXHAUSTED,
        ] {
            let config = c.config().unwrap();
            assert!(config.durable_name.is_some());
            assert_eq!(config.ack_policy, jetstream::consumer::AckPolicy::Explicit);
        }
    }
}
