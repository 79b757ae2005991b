//! The batched form of a turn's frames on `chat.tok.<conv>.<turn>`.
//!
//! One bus message carries one or more frames, each the exact JSON the
//! WebSocket carries, separated by `\n` (JSON text never holds a raw
//! newline, so the separator is unambiguous). A message with one frame is
//! plain JSON. A reader splits on newlines:
//! `[json.loads(line) for line in msg.data.splitlines()]` in Python.
//!
//! Batching is what keeps the bus off the hot path: at high load a turn's
//! deltas queue while its previous publish waits for its ack, and they then
//! travel in one message instead of one each. The gateway forwards each
//! line's bytes as they came ([`RawFrame`]), reading only `type` and `seq`.

use bytes::Bytes;
use serde::Deserialize;

use crate::wire::ServerFrame;

/// Most bytes of frames put in one message, well under NATS's 1 MiB
/// default payload limit; a longer queue goes out in several messages.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// What kind of frame a line holds, read without decoding the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `token`.
    Token,
    /// `reset`.
    Reset,
    /// `done`: the turn's last frame.
    Done,
    /// `error`: carries no `seq`.
    Error,
    /// Anything else (never on `chat.tok`, but a reader skips it rather than fail).
    Other,
}

/// One frame as it travels: its bytes untouched, with the two fields a
/// relay needs to order it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The frame's JSON, as sent to the client.
    pub bytes: Bytes,
    /// Its kind.
    pub kind: Kind,
    /// Its `seq`, for the frames of the turn's ordered stream.
    pub seq: Option<u64>,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    seq: Option<u64>,
}

impl RawFrame {
    /// Reads the head of one frame's JSON; `None` when it is not a frame.
    pub fn parse(bytes: Bytes) -> Option<Self> {
        let head: Head<'_> = serde_json::from_slice(&bytes).ok()?;
        let kind = match head.kind {
            "token" => Kind::Token,
            "reset" => Kind::Reset,
            "done" => Kind::Done,
            "error" => Kind::Error,
            _ => Kind::Other,
        };
        let seq = head.seq.filter(|_| kind != Kind::Error);
        Some(Self { bytes, kind, seq })
    }

    /// The whole frame, for readers that look inside.
    pub fn decode(&self) -> Option<ServerFrame> {
        serde_json::from_slice(&self.bytes).ok()
    }

    /// True for the turn's last frame.
    pub fn is_done(&self) -> bool {
        self.kind == Kind::Done
    }
}

impl From<&ServerFrame> for RawFrame {
    fn from(frame: &ServerFrame) -> Self {
        let kind = match frame {
            ServerFrame::Token { .. } => Kind::Token,
            ServerFrame::Reset { .. } => Kind::Reset,
            ServerFrame::Done { .. } => Kind::Done,
            ServerFrame::Error { .. } => Kind::Error,
            _ => Kind::Other,
        };
        Self {
            bytes: serde_json::to_vec(frame).expect("frames serialize").into(),
            kind,
            seq: frame.seq(),
        }
    }
}

/// The frames of one message, in order, as slices of its payload (no copy).
/// Lines that are not frames are skipped.
pub fn split(payload: &Bytes) -> impl Iterator<Item = RawFrame> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        while start < payload.len() {
            let end = payload[start..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(payload.len(), |i| start + i);
            let line = payload.slice(start..end);
            start = end + 1;
            if line.is_empty() {
                continue;
            }
            if let Some(frame) = RawFrame::parse(line) {
                return Some(frame);
            }
        }
        None
    })
}

/// Every frame of one message, decoded.
pub fn decode(payload: &[u8]) -> Vec<ServerFrame> {
    payload
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect()
}

/// Appends one frame to a message being built.
pub fn push(message: &mut Vec<u8>, frame: &ServerFrame) {
    if !message.is_empty() {
        message.push(b'\n');
    }
    serde_json::to_writer(&mut *message, frame).expect("frames serialize");
}

/// The last frame of a message (what a turn's last stored message ends with).
pub fn last(payload: &Bytes) -> Option<RawFrame> {
    split(payload).last()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FinishReason, Usage};

    fn token(seq: u64, delta: &str) -> ServerFrame {
        ServerFrame::Token {
            turn_id: "t".into(),
            seq,
            delta: delta.into(),
        }
    }

    #[test]
    fn a_batch_splits_into_the_frames_it_was_built_from_byte_for_byte() {
        let frames = vec![
            token(1, "line\none \"quoted\""),
            token(2, "ünï"),
            ServerFrame::Reset {
                turn_id: "t".into(),
                seq: 3,
                reason: "retry".into(),
            },
            ServerFrame::error(Some("t".into()), "upstream_error", "x"),
            ServerFrame::Done {
                turn_id: "t".into(),
                seq: 4,
                finish_reason: FinishReason::Stop,
                usage: Usage::default(),
                sources: vec![],
            },
        ];
        let mut message = Vec::new();
        for frame in &frames {
            push(&mut message, frame);
        }
        let payload = Bytes::from(message);
        let raw: Vec<RawFrame> = split(&payload).collect();
        assert_eq!(raw.len(), frames.len());
        for (raw, frame) in raw.iter().zip(&frames) {
            assert_eq!(raw, &RawFrame::from(frame));
            assert_eq!(raw.decode().as_ref(), Some(frame));
        }
        assert_eq!(
            raw.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [Some(1), Some(2), Some(3), None, Some(4)]
        );
        assert!(last(&payload).unwrap().is_done());
        assert_eq!(decode(&payload), frames);
    }

    #[test]
    fn a_single_frame_message_is_plain_json_and_junk_lines_are_skipped() {
        let one = serde_json::to_vec(&token(1, "a")).unwrap();
        assert_eq!(decode(&one), vec![token(1, "a")]);
        let mixed = Bytes::from(format!(
            "not json\n\n{}\n",
            serde_json::to_string(&token(2, "b")).unwrap()
        ));
        assert_eq!(split(&mixed).map(|f| f.seq).collect::<Vec<_>>(), [Some(2)]);
    }
}
