//! Reading back what a subject holds in its stream, in order.
//!
//! Used to rebuild a turn after a worker died and to replay frames to a client
//! that resumes. An ordered consumer is cheap and ephemeral; it is created per
//! replay, never per socket on the live path.

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt as _;

/// Every message stored on `subject` in `stream`, oldest first, as raw payloads.
///
/// # Errors
/// When the stream is missing or the server does not answer.
pub async fn payloads(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> anyhow::Result<Vec<bytes::Bytes>> {
    Ok(messages(js, stream, subject)
        .await?
        .into_iter()
        .map(|m| m.payload)
        .collect())
}

/// One stored message.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its stream sequence.
    pub sequence: u64,
    /// When the server stored it.
    pub stored_at: std::time::SystemTime,
    /// Its payload.
    pub payload: bytes::Bytes,
}

/// Like [`payloads`], each with its stream sequence: a writer that goes on
/// from the last one publishes with it as the expected last subject
/// sequence, so it cannot interleave with another writer.
///
/// # Errors
/// When the stream is missing or the server does not answer.
pub async fn messages(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> anyhow::Result<Vec<Stored>> {
    let stream = js.get_stream(stream).await?;
    let pending = match stream.get_last_raw_message_by_subject(subject).await {
        Ok(last) => last.sequence,
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e.into()),
    };
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message?;
        let info = message.info().map_err(|e| anyhow::anyhow!(e))?;
        let sequence = info.stream_sequence;
        out.push(Stored {
            sequence,
            stored_at: info.published.into(),
            payload: message.payload.clone(),
        });
        if sequence >= pending {
            break;
        }
    }
    Ok(out)
}
