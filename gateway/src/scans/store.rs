//! Writing an image into the `scan_images` object store while it arrives.
//!
//! The layout is exactly async-nats' `ObjectStore::put`'s (chunks on
//! `$O.<bucket>.C.<nuid>`, then the object info on
//! `$O.<bucket>.M.<base64url(name)>` with a subject rollup), so any
//! object-store client, the streamer's included, reads it back. What the
//! library cannot do is keep an object invisible until someone decides it
//! is valid, or take it back: its `put` publishes the info as soon as the
//! reader ends, and a reader that fails halfway leaves its chunks behind
//! under a nuid the caller never learns. So [`ObjectWriter`] publishes
//! chunks as they fill, publishes the info only on [`ObjectWriter::commit`],
//! and purges its chunks on [`ObjectWriter::abort`] or when dropped
//! uncommitted. Until the info exists, no reader can see the chunks: they
//! are the object under a temporary name. Which bytes to write and when to
//! commit is the upload's.

use std::collections::VecDeque;

use async_nats::jetstream::{self, context::PublishAckFuture};
use axum::body::Bytes;
use bytes::BytesMut;
use sha2::Digest as _;

/// Chunk size in the object store. nats-server's cost of storing an image
/// is mostly per message: 512 KiB chunks take less of it than async-nats'
/// 128 KiB default (BENCHMARKS.md, the scan path), and stay well under the
/// server's max payload (1 MiB by default, 8 MB in our config).
const OBJECT_CHUNK: usize = 512 * 1024;
/// Chunks published and not yet acknowledged, at most. The library waits
/// for each ack before the next chunk (one round trip per chunk, most of a
/// large upload's latency); a window keeps the pipe full while bounding
/// what the client may hold unsent for one upload to `WINDOW` chunks
/// (2 MiB), and it stops reading the request when the store falls behind.
const WINDOW: usize = 4;

/// One object being written, invisible until committed.
pub(crate) struct ObjectWriter {
    /// Cloned from the app's context; publishes and purges go through it.
    js: jetstream::Context,
    bucket: String,
    /// The chunks' subject, `$O.<bucket>.C.<nuid>`: what a purge removes.
    chunk_subject: String,
    nuid: String,
    /// Bytes not yet published: less than one chunk.
    pending: BytesMut,
    /// Acks of published chunks, oldest first; at most [`WINDOW`].
    unacked: VecDeque<PublishAckFuture>,
    chunks: usize,
    size: usize,
    /// Of every byte published, in order: the object info's digest.
    sha256: sha2::Sha256,
    /// True while chunks may be in the stream without an info: dropping the
    /// writer then purges them.
    dirty: bool,
}

impl ObjectWriter {
    /// A writer for a new object in `bucket`.
    pub(crate) fn begin(js: &jetstream::Context, bucket: &str) -> Self {
        let nuid = uuid::Uuid::new_v4().simple().to_string();
        Self {
            js: js.clone(),
            bucket: bucket.to_owned(),
            chunk_subject: format!("$O.{bucket}.C.{nuid}"),
            nuid,
            pending: BytesMut::new(),
            unacked: VecDeque::with_capacity(WINDOW),
            chunks: 0,
            size: 0,
            sha256: sha2::Sha256::new(),
            dirty: false,
        }
    }

    /// Bytes written so far.
    pub(crate) fn size(&self) -> usize {
        self.size + self.pending.len()
    }

    /// Appends `data`, publishing every chunk it fills.
    ///
    /// # Errors
    /// When a chunk cannot be published or the stream refused one.
    pub(crate) async fn write(&mut self, mut data: Bytes) -> anyhow::Result<()> {
        while !data.is_empty() {
            if self.pending.is_empty() && data.len() >= OBJECT_CHUNK {
                // A whole chunk of the request's own buffer: no copy.
                let chunk = data.split_to(OBJECT_CHUNK);
                self.publish(chunk).await?;
                continue;
            }
            if self.pending.capacity() == 0 {
                self.pending.reserve(OBJECT_CHUNK);
            }
            let taken = data.split_to((OBJECT_CHUNK - self.pending.len()).min(data.len()));
            self.pending.extend_from_slice(&taken);
            if self.pending.len() == OBJECT_CHUNK {
                let chunk = self.pending.split().freeze();
                self.publish(chunk).await?;
            }
        }
        Ok(())
    }

    async fn publish(&mut self, chunk: Bytes) -> anyhow::Result<()> {
        if self.unacked.len() == WINDOW
            && let Some(oldest) = self.unacked.pop_front()
        {
            oldest.await?;
        }
        // Hashed here, a chunk at a time, on the request's task: 512 KiB is
        // about a millisecond, less than handing it to another thread.
        self.sha256.update(&chunk);
        self.size += chunk.len();
        self.chunks += 1;
        self.dirty = true;
        let ack = self.js.publish(self.chunk_subject.clone(), chunk).await?;
        self.unacked.push_back(ack);
        Ok(())
    }

    /// Publishes what is pending and waits until the stream holds every
    /// chunk; then makes the object visible as `name`.
    ///
    /// # Errors
    /// When a chunk or the info cannot be stored; the caller aborts.
    pub(crate) async fn commit(&mut self, name: &str) -> anyhow::Result<()> {
        use base64::Engine as _;
        use jetstream::object_store::{ObjectInfo, ObjectOptions};

        if !self.pending.is_empty() {
            let chunk = self.pending.split().freeze();
            self.publish(chunk).await?;
        }
        while let Some(ack) = self.unacked.pop_front() {
            ack.await?;
        }
        let digest = std::mem::take(&mut self.sha256).finalize();
        let info = ObjectInfo {
            name: name.to_owned(),
            description: None,
            metadata: Default::default(),
            headers: None,
            options: Some(ObjectOptions {
                link: None,
                max_chunk_size: Some(OBJECT_CHUNK),
            }),
            bucket: self.bucket.clone(),
            nuid: self.nuid.clone(),
            size: self.size,
            chunks: self.chunks,
            modified: None,
            digest: Some(format!(
                "SHA-256={}",
                base64::engine::general_purpose::URL_SAFE.encode(digest)
            )),
            deleted: false,
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        let meta_subject = format!(
            "$O.{}.M.{}",
            self.bucket,
            base64::engine::general_purpose::URL_SAFE.encode(name)
        );
        self.js
            .publish_with_headers(meta_subject, headers, serde_json::to_vec(&info)?.into())
            .await?
            .await?;
        self.dirty = false;
        Ok(())
    }

    /// Drops every chunk written, once the ones in flight have landed (a
    /// purge before them would leave them behind).
    pub(crate) async fn abort(mut self) {
        if self.dirty {
            self.dirty = false;
            purge(
                self.js.clone(),
                &self.bucket,
                &self.chunk_subject,
                std::mem::take(&mut self.unacked),
            )
            .await;
        }
    }
}

impl Drop for ObjectWriter {
    /// An upload whose request went away mid-body (the client hung up, the
    /// server is shutting down) never reaches `commit` or `abort`: its
    /// chunks, invisible but taking space until the bucket's max age, are
    /// purged in the background.
    fn drop(&mut self) {
        if !self.dirty {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let js = self.js.clone();
        let bucket = self.bucket.clone();
        let subject = std::mem::take(&mut self.chunk_subject);
        let unacked = std::mem::take(&mut self.unacked);
        runtime.spawn(async move { purge(js, &bucket, &subject, unacked).await });
    }
}

async fn purge(
    js: jetstream::Context,
    bucket: &str,
    chunk_subject: &str,
    unacked: VecDeque<PublishAckFuture>,
) {
    for ack in unacked {
        let _ = ack.await;
    }
    let purged = async {
        let stream = js.get_stream(format!("OBJ_{bucket}")).await?;
        stream.purge().filter(chunk_subject).await?;
        anyhow::Ok(())
    };
    if let Err(e) = purged.await {
        tracing::warn!(
            error = format!("{e:#}"),
            subject = chunk_subject,
            "Purging an unfinished image's chunks failed."
        );
    }
}
