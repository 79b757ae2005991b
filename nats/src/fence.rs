//! Settling a fenced publish whose outcome is unknown.
//!
//! Writers that publish with `Nats-Expected-Last-Subject-Sequence` (a turn's
//! frames, a scan's events) sometimes get no ack: the connection dropped,
//! or the process was frozen past the ack's timeout. The publish may have
//! landed or not, and another writer may have taken over meanwhile. The
//! subject's last stored message tells which.

use async_nats::jetstream;

/// What the subject holds after a publish whose ack was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Our message is the last one, at this stream sequence.
    Landed(u64),
    /// Somebody else wrote after the message we expected to follow.
    Fenced,
    /// Nothing new, or the stream could not be read: a real bus failure.
    Unknown,
}

/// Looks at `subject` in `stream`: was `payload`, published to follow the
/// message at `last_seq`, stored?
pub async fn settle(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    last_seq: u64,
    payload: &[u8],
) -> Settled {
    let Ok(stream) = js.get_stream(stream).await else {
        return Settled::Unknown;
    };
    let Ok(last) = stream.get_last_raw_message_by_subject(subject).await else {
        return Settled::Unknown;
    };
    if last.sequence == last_seq {
        Settled::Unknown
    } else if last.payload.as_ref() == payload {
        Settled::Landed(last.sequence)
    } else {
        Settled::Fenced
    }
}
