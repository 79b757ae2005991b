//! Giving up on a message: its dead letter on `dlq.<kind>`, then `Term`.
//!
//! Every consumer that meets a message it can never handle (undecodable,
//! bad ids) does the same thing, in the same order: store the dead letter,
//! and only once it is stored terminate the message, so nothing is dropped
//! when the DLQ publish fails (the message is handed back instead).

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use chrono::Utc;

use crate::wire::DeadLetter;

/// How many times `message` was delivered (at least 1).
pub fn deliveries(message: &jetstream::Message) -> u64 {
    message
        .info()
        .map(|i| i.delivered.max(1) as u64)
        .unwrap_or(1)
}

/// Stores `message` on `dlq.<kind>` with `reason`, then terminates it; if
/// the dead letter cannot be stored, naks it (5 s) instead. One dead letter
/// per stored message however often this runs for it: the publish carries
/// a message id made of the kind and the message's stream sequence.
pub async fn terminate(
    js: &jetstream::Context,
    kind: &str,
    message: &jetstream::Message,
    reason: &str,
) {
    tracing::warn!(kind, subject = %message.subject, error = reason, "Dead-lettering a message.");
    let letter = DeadLetter {
        subject: message.subject.to_string(),
        error: reason.to_owned(),
        deliveries: deliveries(message),
        payload: String::from_utf8_lossy(&message.payload).into_owned(),
        failed_at: Utc::now(),
    };
    let mut headers = async_nats::HeaderMap::new();
    if let Ok(info) = message.info() {
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{kind}:{}", info.stream_sequence).as_str(),
        );
    }
    let stored = match (crate::subject::dlq(kind), serde_json::to_vec(&letter)) {
        (Ok(subject), Ok(body)) => {
            match js.publish_with_headers(subject, headers, body.into()).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
        (Err(e), _) => Err(e.to_string()),
        (_, Err(e)) => Err(e.to_string()),
    };
    let ack = match stored {
        Ok(()) => AckKind::Term,
        Err(error) => {
            tracing::warn!(%error, "Dead letter not stored; handing the message back.");
            AckKind::Nak(Some(Duration::from_secs(5)))
        }
    };
    if let Err(error) = message.ack_with(ack).await {
        tracing::debug!(%error, "Term/nak failed; the message will be redelivered.");
    }
}
