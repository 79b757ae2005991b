//! Closing work whose deliveries ran out.
//!
//! When a `chat.req` or `scan.req` message uses up the `max_deliver` of its
//! consumer (its workers were killed, or failed on the bus, every time),
//! JetStream sends a max-deliveries advisory and never delivers it again.
//! The `MAX_DELIVERIES` stream captures those advisories, so one sent while
//! no streamer runs waits for the next; this consumer turns each into the
//! turn's or scan's terminal frame or event, its failed record and its dead
//! letter, so that no accepted work ends in silence.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bus::{streams, wire::MaxDeliveriesAdvisory};

use crate::{chat::Worker, scan::ScanWorker};

/// A third of the `streamer-exhausted` consumer's 30 s ack wait.
const LEASE_RENEWAL: Duration = Duration::from_secs(10);

/// Handles one captured advisory, acking it once the work it names is closed.
pub async fn handle(chat: &Worker, scan: &ScanWorker, message: jetstream::Message) {
    // Closing can wait on the bus; keep the advisory ours meanwhile, so a
    // second closer does not write the same terminal frames.
    let _lease = bus::lease::Lease::keep(&chat.client, &message, LEASE_RENEWAL);
    let advisory: MaxDeliveriesAdvisory = match serde_json::from_slice(&message.payload) {
        Ok(advisory) => advisory,
        Err(error) => {
            tracing::warn!(%error, "Undecodable max-deliveries advisory; dropping it.");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    let closed = match advisory.stream.as_str() {
        streams::CHAT_REQ => {
            chat.close_exhausted(advisory.stream_seq, advisory.deliveries)
                .await
        }
        streams::SCAN_REQ => {
            scan.close_exhausted(advisory.stream_seq, advisory.deliveries)
                .await
        }
        _ => Ok(()),
    };
    match closed {
        Ok(()) => {
            if let Err(error) = message.double_ack().await {
                tracing::warn!(%error, "Ack of an advisory failed; closing it again is harmless.");
            }
        }
        Err(error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                stream = advisory.stream,
                stream_seq = advisory.stream_seq,
                "Closing exhausted work failed; retrying."
            );
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                .await;
        }
    }
}
