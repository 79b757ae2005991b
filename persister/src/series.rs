//! The persister's metric series, in one place: each is described and
//! registered at zero at startup ([`bus::ops::register`]), so a fresh
//! persister's `/metrics` lists them all, with every label value. A test
//! checks that this list and the metric names the code mentions agree.

use bus::ops::{Kind, Series};

/// Every series the persister emits.
pub const SERIES: &[Series] = &[
    Series {
        name: "persister_consumer_pending",
        kind: Kind::Gauge,
        help: "Messages a durable consumer has not delivered yet, by stream and consumer (the same shared consumer in every process: take max).",
        labels: &[
            &[("stream", "CHAT_DONE"), ("consumer", "persister-turns")],
            &[("stream", "SCAN_DONE"), ("consumer", "persister-scans")],
            &[("stream", "REWARDS"), ("consumer", "persister-rewards")],
        ],
    },
    Series {
        name: "persister_consumer_ack_pending",
        kind: Kind::Gauge,
        help: "Messages a durable consumer delivered and nobody acknowledged yet, by stream and consumer.",
        labels: &[
            &[("stream", "CHAT_DONE"), ("consumer", "persister-turns")],
            &[("stream", "SCAN_DONE"), ("consumer", "persister-scans")],
            &[("stream", "REWARDS"), ("consumer", "persister-rewards")],
        ],
    },
    Series {
        name: "persister_commits_total",
        kind: Kind::Counter,
        help: "SQLite commits of turn records.",
        labels: &[],
    },
    Series {
        name: "persister_commit_seconds",
        kind: Kind::Histogram,
        help: "Duration of one SQLite commit of turn records.",
        labels: &[],
    },
    Series {
        name: "persister_rows_ingested_total",
        kind: Kind::Counter,
        help: "Turn records written to SQLite.",
        labels: &[],
    },
    Series {
        name: "persister_rows_superseded_total",
        kind: Kind::Counter,
        help: "Turn records replaced by a later one.",
        labels: &[],
    },
    Series {
        name: "persister_duplicates_total",
        kind: Kind::Counter,
        help: "Turn records already stored (redeliveries).",
        labels: &[],
    },
    Series {
        name: "persister_commit_failures_total",
        kind: Kind::Counter,
        help: "Failed SQLite commits of turn records (an operator must act).",
        labels: &[],
    },
    Series {
        name: "persister_dead_letters_total",
        kind: Kind::Counter,
        help: "Turn records dead-lettered, by reason.",
        labels: &[&[("reason", "undecodable")], &[("reason", "sqlite")]],
    },
    Series {
        name: "persister_rows_synced_total",
        kind: Kind::Counter,
        help: "Turn rows copied to Postgres.",
        labels: &[],
    },
    Series {
        name: "persister_sync_seconds",
        kind: Kind::Histogram,
        help: "Duration of one Postgres sync batch of turn rows.",
        labels: &[],
    },
    Series {
        name: "persister_sync_lag_seconds",
        kind: Kind::Histogram,
        help: "From a turn's completion to its Postgres commit.",
        labels: &[],
    },
    Series {
        name: "persister_sync_rejected_total",
        kind: Kind::Counter,
        help: "Turn rows Postgres refused (kept in SQLite with the reason).",
        labels: &[],
    },
    Series {
        name: "persister_rows_pending_sync",
        kind: Kind::Gauge,
        help: "SQLite rows waiting for Postgres (turns and scans).",
        labels: &[],
    },
    Series {
        name: "persister_sync_oldest_pending_seconds",
        kind: Kind::Gauge,
        help: "Age of the oldest SQLite row waiting for Postgres (turns and scans); 0 when none waits. Grows during a Postgres outage.",
        labels: &[],
    },
    Series {
        name: "persister_rows_rejected_sync",
        kind: Kind::Gauge,
        help: "SQLite rows Postgres refused (turns and scans).",
        labels: &[],
    },
    Series {
        name: "persister_scan_commits_total",
        kind: Kind::Counter,
        help: "SQLite commits of scan records.",
        labels: &[],
    },
    Series {
        name: "persister_scan_commit_seconds",
        kind: Kind::Histogram,
        help: "Duration of one SQLite commit of scan records.",
        labels: &[],
    },
    Series {
        name: "persister_scan_rows_ingested_total",
        kind: Kind::Counter,
        help: "Scan records written to SQLite.",
        labels: &[],
    },
    Series {
        name: "persister_scan_rows_superseded_total",
        kind: Kind::Counter,
        help: "Scan records replaced by a later one.",
        labels: &[],
    },
    Series {
        name: "persister_scan_duplicates_total",
        kind: Kind::Counter,
        help: "Scan records already stored (redeliveries).",
        labels: &[],
    },
    Series {
        name: "persister_scan_commit_failures_total",
        kind: Kind::Counter,
        help: "Failed SQLite commits of scan records (an operator must act).",
        labels: &[],
    },
    Series {
        name: "persister_scan_dead_letters_total",
        kind: Kind::Counter,
        help: "Scan records dead-lettered, by reason.",
        labels: &[&[("reason", "undecodable")], &[("reason", "sqlite")]],
    },
    Series {
        name: "persister_scan_rows_synced_total",
        kind: Kind::Counter,
        help: "Scan rows copied to Postgres.",
        labels: &[],
    },
    Series {
        name: "persister_scan_sync_seconds",
        kind: Kind::Histogram,
        help: "Duration of one Postgres sync batch of scan rows.",
        labels: &[],
    },
    Series {
        name: "persister_scan_sync_lag_seconds",
        kind: Kind::Histogram,
        help: "From a scan's completion to its Postgres commit.",
        labels: &[],
    },
    Series {
        name: "persister_scan_sync_rejected_total",
        kind: Kind::Counter,
        help: "Scan rows Postgres refused (kept in SQLite with the reason).",
        labels: &[],
    },
    Series {
        name: "persister_scan_rows_pending_sync",
        kind: Kind::Gauge,
        help: "SQLite rows waiting for Postgres (scans).",
        labels: &[],
    },
    Series {
        name: "persister_scan_rows_rejected_sync",
        kind: Kind::Gauge,
        help: "SQLite rows Postgres refused (scans).",
        labels: &[],
    },
    Series {
        name: "persister_sync_failures_total",
        kind: Kind::Counter,
        help: "Postgres sync attempts that failed (Postgres unreachable).",
        labels: &[],
    },
    Series {
        name: "persister_sqlite_bytes",
        kind: Kind::Gauge,
        help: "Size of the SQLite file.",
        labels: &[],
    },
    Series {
        name: "persister_sqlite_wal_bytes",
        kind: Kind::Gauge,
        help: "Size of the SQLite WAL file.",
        labels: &[],
    },
    Series {
        name: "persister_reward_grants_total",
        kind: Kind::Counter,
        help: "Character grants committed to Postgres: new to it (stored) or already there (duplicate); or dropped, their user erased after they were granted (erased).",
        labels: &[
            &[("outcome", "stored")],
            &[("outcome", "duplicate")],
            &[("outcome", "erased")],
        ],
    },
    Series {
        name: "persister_reward_batches_total",
        kind: Kind::Counter,
        help: "Batches of grants written, by what closed them: full (size), the flush interval (time), or shutdown.",
        labels: &[
            &[("trigger", "size")],
            &[("trigger", "time")],
            &[("trigger", "shutdown")],
        ],
    },
    Series {
        name: "persister_reward_commit_seconds",
        kind: Kind::Histogram,
        help: "Duration of one Postgres commit of a batch of grants.",
        labels: &[],
    },
    Series {
        name: "persister_reward_commit_failures_total",
        kind: Kind::Counter,
        help: "Failed Postgres writes of a batch of grants (retried; the grants wait in JetStream).",
        labels: &[],
    },
    Series {
        name: "persister_reward_dead_letters_total",
        kind: Kind::Counter,
        help: "Grants sent to dlq.rewards: undecodable or invalid, or refused by Postgres for good.",
        labels: &[&[("reason", "undecodable")], &[("reason", "refused")]],
    },
    Series {
        name: "persister_erasures_total",
        kind: Kind::Counter,
        help: "User erasures (DELETE /v1/me) done, by store: sqlite (this persister's file, asked), postgres, or register (this persister's file, from the erasure register: rows it held of an erasure it missed).",
        labels: &[
            &[("store", "sqlite")],
            &[("store", "postgres")],
            &[("store", "register")],
        ],
    },
    Series {
        name: "persister_anonymised_rows_total",
        kind: Kind::Counter,
        help: "Postgres rows whose user id retention replaced with a keyed hash, by table.",
        labels: &[
            &[("table", "conversations")],
            &[("table", "turns")],
            &[("table", "scans")],
            &[("table", "reward_grants")],
            &[("table", "character_ownership")],
            &[("table", "my_characters")],
        ],
    },
    Series {
        name: "persister_retention_runs_total",
        kind: Kind::Counter,
        help: "Retention runs this persister did (held the lock and committed).",
        labels: &[],
    },
    Series {
        name: "persister_retention_failures_total",
        kind: Kind::Counter,
        help: "Retention runs that failed (Postgres down or refusing); tried again at the next interval.",
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
        let mismatches = bus::ops::catalogue_mismatches(SERIES, &src, "persister_").unwrap();
        assert!(mismatches.is_empty(), "{mismatches:#?}");
    }

    #[test]
    fn consumer_gauges_are_registered_for_each_consumer_it_watches() {
        let watched = [
            bus::streams::PERSISTER_TURNS,
            bus::streams::PERSISTER_SCANS,
            bus::streams::PERSISTER_REWARDS,
        ];
        for name in [
            "persister_consumer_pending",
            "persister_consumer_ack_pending",
        ] {
            let series = SERIES.iter().find(|s| s.name == name).unwrap();
            let (registered, watched) = bus::ops::consumer_gauge_labels(series, &watched);
            assert_eq!(registered, watched, "{name}");
        }
    }
}
