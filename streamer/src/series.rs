//! The streamer's metric series, in one place: each is described and
//! registered at zero at startup ([`bus::ops::register`]), so a fresh
//! streamer's `/metrics` lists them all, with every label value. A test
//! checks that this list and the metric names the code mentions agree.

use bus::ops::{Kind, Series};

/// Every series the streamer emits.
pub const SERIES: &[Series] = &[
    Series {
        name: "streamer_consumer_pending",
        kind: Kind::Gauge,
        help: "Messages a durable consumer has not delivered yet, by stream and consumer (the same shared consumer in every process: take max).",
        labels: &[
            &[("stream", "CHAT_REQ"), ("consumer", "streamer-chat")],
            &[("stream", "SCAN_REQ"), ("consumer", "streamer-scan")],
            &[
                ("stream", "MAX_DELIVERIES"),
                ("consumer", "streamer-exhausted"),
            ],
            &[("stream", "DLQ"), ("consumer", "streamer-dlq-scan")],
        ],
    },
    Series {
        name: "streamer_consumer_ack_pending",
        kind: Kind::Gauge,
        help: "Messages a durable consumer delivered and nobody acknowledged yet, by stream and consumer.",
        labels: &[
            &[("stream", "CHAT_REQ"), ("consumer", "streamer-chat")],
            &[("stream", "SCAN_REQ"), ("consumer", "streamer-scan")],
            &[
                ("stream", "MAX_DELIVERIES"),
                ("consumer", "streamer-exhausted"),
            ],
            &[("stream", "DLQ"), ("consumer", "streamer-dlq-scan")],
        ],
    },
    Series {
        name: "streamer_turns_total",
        kind: Kind::Counter,
        help: "Chat turns finished, by finish reason.",
        labels: &[
            &[("finish_reason", "stop")],
            &[("finish_reason", "length")],
            &[("finish_reason", "cancelled")],
            &[("finish_reason", "error")],
        ],
    },
    Series {
        name: "streamer_tokens_total",
        kind: Kind::Counter,
        help: "Token frames published.",
        labels: &[],
    },
    Series {
        name: "streamer_token_frames_total",
        kind: Kind::Counter,
        help: "Token frames written to chat.tok, one per upstream delta.",
        labels: &[],
    },
    Series {
        name: "streamer_token_messages_total",
        kind: Kind::Counter,
        help: "Bus messages that carried token frames (several frames to a message under load).",
        labels: &[],
    },
    Series {
        name: "streamer_turns_fenced_total",
        kind: Kind::Counter,
        help: "Turns a stale worker stopped writing because another worker's frames came first.",
        labels: &[],
    },
    Series {
        name: "streamer_exhausted_total",
        kind: Kind::Counter,
        help: "Turns and scans closed as failed after their deliveries ran out, by kind.",
        labels: &[&[("kind", "chat")], &[("kind", "scan")]],
    },
    Series {
        name: "streamer_turn_resets_total",
        kind: Kind::Counter,
        help: "Turns restarted with a reset frame after a worker died.",
        labels: &[],
    },
    Series {
        name: "streamer_history_unavailable_total",
        kind: Kind::Counter,
        help: "Turns answered without context because history was unavailable.",
        labels: &[],
    },
    Series {
        name: "streamer_context_reads_total",
        kind: Kind::Counter,
        help: "Prompts' earlier turns, by where they came from: the conversation's context entry (kv), the persisters' history when it had none (persisters), or nowhere (none).",
        labels: &[
            &[("source", "kv")],
            &[("source", "persisters")],
            &[("source", "none")],
        ],
    },
    Series {
        name: "streamer_retrievals_total",
        kind: Kind::Counter,
        help: "Chat turns by whether retrieval found disposal rules for them (rules) or none applied (none).",
        labels: &[&[("found", "rules")], &[("found", "none")]],
    },
    Series {
        name: "streamer_retrieval_seconds",
        kind: Kind::Histogram,
        help: "Time to find a chat turn's disposal rules (query terms and scoring).",
        labels: &[],
    },
    Series {
        name: "streamer_context_write_failures_total",
        kind: Kind::Counter,
        help: "Concluded turns not added to their conversation's context entry (its next turn reads the persisters).",
        labels: &[],
    },
    Series {
        name: "streamer_context_erased_total",
        kind: Kind::Counter,
        help: "Concluded turns not kept in their conversation's context because their user was erased after they began.",
        labels: &[],
    },
    Series {
        name: "streamer_records_truncated_total",
        kind: Kind::Counter,
        help: "Turn records cut to fit the bus's message limit.",
        labels: &[],
    },
    Series {
        name: "streamer_upstream_ttft_seconds",
        kind: Kind::Histogram,
        help: "From the request to the provider to its first token.",
        labels: &[],
    },
    Series {
        name: "streamer_request_wait_seconds",
        kind: Kind::Histogram,
        help: "From the gateway accepting a turn to a worker taking its first delivery (bus and queueing).",
        labels: &[],
    },
    Series {
        name: "streamer_accept_to_first_token_seconds",
        kind: Kind::Histogram,
        help: "From the gateway accepting a turn to its first token (queueing plus the provider).",
        labels: &[],
    },
    Series {
        name: "streamer_inter_token_seconds",
        kind: Kind::Histogram,
        help: "Time between two tokens of one answer.",
        labels: &[],
    },
    Series {
        name: "streamer_upstream_requests_total",
        kind: Kind::Counter,
        help: "Requests sent to an LLM provider (every attempt: retries and fallbacks count).",
        labels: &[],
    },
    Series {
        name: "streamer_upstream_errors_total",
        kind: Kind::Counter,
        help: "Failed LLM requests, by kind and by the code clients see.",
        labels: &[
            &[("kind", "network"), ("code", "upstream_unavailable")],
            &[("kind", "timeout"), ("code", "upstream_timeout")],
            &[("kind", "rate_limited"), ("code", "upstream_rate_limited")],
            &[("kind", "status"), ("code", "upstream_unavailable")],
            &[("kind", "status"), ("code", "upstream_timeout")],
            &[("kind", "status"), ("code", "upstream_rejected")],
            &[("kind", "provider"), ("code", "upstream_interrupted")],
            &[("kind", "protocol"), ("code", "upstream_interrupted")],
            &[("kind", "truncated"), ("code", "upstream_interrupted")],
        ],
    },
    Series {
        name: "streamer_upstream_fallbacks_total",
        kind: Kind::Counter,
        help: "Times a failed provider handed over to the next one.",
        labels: &[],
    },
    Series {
        name: "streamer_scans_total",
        kind: Kind::Counter,
        help: "Scans finished, by status and whether the cache answered.",
        labels: &[
            &[("status", "done"), ("cached", "false")],
            &[("status", "done"), ("cached", "true")],
            &[("status", "failed"), ("cached", "false")],
        ],
    },
    Series {
        name: "streamer_scan_retries_total",
        kind: Kind::Counter,
        help: "Scan stage attempts retried, by stage.",
        labels: &[&[("stage", "vision")], &[("stage", "answer")]],
    },
    Series {
        name: "streamer_scan_vision_errors_total",
        kind: Kind::Counter,
        help: "Failed vision attempts, by code.",
        labels: &[
            &[("code", "upstream_unavailable")],
            &[("code", "upstream_timeout")],
            &[("code", "upstream_rate_limited")],
            &[("code", "upstream_rejected")],
            &[("code", "upstream_interrupted")],
            &[("code", "vision_internal")],
        ],
    },
    Series {
        name: "streamer_scan_vision_seconds",
        kind: Kind::Histogram,
        help: "Duration of one vision attempt.",
        labels: &[],
    },
    Series {
        name: "streamer_chat_dead_letters_total",
        kind: Kind::Counter,
        help: "Failed or undecodable turns sent to dlq.chat (a turn seen by several workers may count once per worker; the stream stores it once).",
        labels: &[],
    },
    Series {
        name: "streamer_scan_dead_letters_total",
        kind: Kind::Counter,
        help: "Failed scans sent to dlq.scan.",
        labels: &[],
    },
    Series {
        name: "streamer_rewards_total",
        kind: Kind::Counter,
        help: "Reward stages, by outcome: a character earned for the first time (new), earned again (repeat), none for the category (none), or the stage timed out (timeout).",
        labels: &[
            &[("outcome", "new")],
            &[("outcome", "repeat")],
            &[("outcome", "none")],
            &[("outcome", "timeout")],
        ],
    },
    Series {
        name: "streamer_scan_reward_seconds",
        kind: Kind::Histogram,
        help: "Duration of the reward stage (match, ownership, grant).",
        labels: &[],
    },
    Series {
        name: "streamer_character_cache_events_total",
        kind: Kind::Counter,
        help: "Changes applied to this streamer's character match cache from the characters KV watch, by kind.",
        labels: &[
            &[("kind", "full_refresh")],
            &[("kind", "upsert")],
            &[("kind", "delete")],
        ],
    },
    Series {
        name: "streamer_scan_panics_total",
        kind: Kind::Counter,
        help: "Scans failed because a pipeline stage panicked.",
        labels: &[],
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
        let mismatches = bus::ops::catalogue_mismatches(SERIES, &src, "streamer_").unwrap();
        assert!(mismatches.is_empty(), "{mismatches:#?}");
    }

    #[test]
    fn consumer_gauges_are_registered_for_each_consumer_it_watches() {
        let watched = [
            bus::streams::STREAMER_CHAT,
            bus::streams::STREAMER_SCAN,
            bus::streams::STREAMER_EXHAUSTED,
            bus::streams::STREAMER_DLQ_SCAN,
        ];
        for name in ["streamer_consumer_pending", "streamer_consumer_ack_pending"] {
            let series = SERIES.iter().find(|s| s.name == name).unwrap();
            let (registered, watched) = bus::ops::consumer_gauge_labels(series, &watched);
            assert_eq!(registered, watched, "{name}");
        }
    }
}
