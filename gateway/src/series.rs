//! The gateway's metric series, in one place: each is described and
//! registered at zero at startup ([`bus::ops::register`]), so a fresh
//! gateway's `/metrics` lists them all. A test checks that every metric name
//! the code mentions is listed here.

use bus::ops::{Kind, Series};

/// Every series the gateway emits.
pub const SERIES: &[Series] = &[
    Series {
        name: "gateway_turns_accepted_total",
        kind: Kind::Counter,
        help: "Chat turns accepted (WebSocket and OpenAI endpoint).",
        labels: &[],
    },
    Series {
        name: "gateway_turns_refused_total",
        kind: Kind::Counter,
        help: "Turns refused because their user had the most turns in flight (across nodes).",
        labels: &[],
    },
    Series {
        name: "gateway_cancels_total",
        kind: Kind::Counter,
        help: "Cancel requests forwarded to the worker generating a turn.",
        labels: &[],
    },
    Series {
        name: "gateway_resumes_total",
        kind: Kind::Counter,
        help: "WebSocket resume frames handled.",
        labels: &[],
    },
    Series {
        name: "gateway_replayed_frames_total",
        kind: Kind::Counter,
        help: "Frames replayed from JetStream to a client that resumed or joined late.",
        labels: &[],
    },
    Series {
        name: "gateway_accept_seconds",
        kind: Kind::Histogram,
        help: "From a new turn's frame or request to its acceptance: the claims and the request's publish on the bus.",
        labels: &[],
    },
    Series {
        name: "gateway_ttft_seconds",
        kind: Kind::Histogram,
        help: "From accepting a turn to relaying its first token.",
        labels: &[],
    },
    Series {
        name: "gateway_ws_open",
        kind: Kind::Gauge,
        help: "WebSocket sessions open on this node.",
        labels: &[],
    },
    Series {
        name: "gateway_ws_frames_sent_total",
        kind: Kind::Counter,
        help: "Frames queued to WebSocket clients.",
        labels: &[],
    },
    Series {
        name: "gateway_ws_slow_closes_total",
        kind: Kind::Counter,
        help: "WebSockets closed with 4008 because the client fell behind.",
        labels: &[],
    },
    Series {
        name: "gateway_ws_streams_refused_total",
        kind: Kind::Counter,
        help: "Sends and resumes refused because a socket already follows the most turns it may.",
        labels: &[],
    },
    Series {
        name: "gateway_relay_rechecks_total",
        kind: Kind::Counter,
        help: "Silent relays that re-read the turn's last stored frame.",
        labels: &[],
    },
    Series {
        name: "gateway_relays_stalled_total",
        kind: Kind::Counter,
        help: "Relays ended with turn_stalled after hearing nothing past the bound.",
        labels: &[],
    },
    Series {
        name: "gateway_replays_failed_total",
        kind: Kind::Counter,
        help: "Relays ended with replay_failed because JetStream could not be read.",
        labels: &[],
    },
    Series {
        name: "gateway_completion_timeouts_total",
        kind: Kind::Counter,
        help: "Non-stream OpenAI completions that hit their deadline.",
        labels: &[],
    },
    Series {
        name: "gateway_openai_restarts_total",
        kind: Kind::Counter,
        help: "OpenAI streams ended with answer_restarted (a reset after text was sent).",
        labels: &[],
    },
    Series {
        name: "gateway_scans_accepted_total",
        kind: Kind::Counter,
        help: "Scan uploads accepted (202).",
        labels: &[],
    },
    Series {
        name: "gateway_scan_streams_total",
        kind: Kind::Counter,
        help: "SSE scan event streams opened.",
        labels: &[],
    },
    Series {
        name: "gateway_character_changes_total",
        kind: Kind::Counter,
        help: "Changes an admin made to the character catalogue, by operation.",
        labels: &[&[("op", "put")], &[("op", "delete")]],
    },
    Series {
        name: "gateway_erasures_total",
        kind: Kind::Counter,
        help: "DELETE /v1/me erasures answered, by whether Postgres was erased in time (done) or queued (pending).",
        labels: &[&[("postgres", "done")], &[("postgres", "pending")]],
    },
];

/// Describes and registers [`SERIES`] at zero.
pub fn register() {
    bus::ops::register(SERIES);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_lists_exactly_the_metrics_the_code_emits() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mismatches = bus::ops::catalogue_mismatches(SERIES, &src, "gateway_").unwrap();
        assert!(mismatches.is_empty(), "{mismatches:#?}");
    }
}
