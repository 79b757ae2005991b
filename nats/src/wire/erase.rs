//! Wire types of `DELETE /v1/me` (erasing a user everywhere): the request
//! every persister and the `ERASE` work queue get, what each store reports
//! it erased, and the notice that tells every gateway to forget the user's
//! conversation owners.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One erasure: the `erase.local` request (each persister's SQLite file)
/// and the `erase.pg.<user key>` message (Postgres, `Nats-Msg-Id` = `erase_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EraseRequest {
    /// Names the erasure (a UUID); its `erase.done.<erase_id>` report and
    /// the Postgres audit row carry it.
    pub erase_id: String,
    /// Whose data goes (the JWT `sub`).
    pub user_id: String,
    /// When the gateway took the request: records of turns and scans the
    /// user started before it that reach a persister later are dropped.
    pub requested_at: DateTime<Utc>,
}

/// What one persister erased from its SQLite file (the `erase.local`
/// answer, inside a `HistoryReply`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SqliteErased {
    /// Turn rows deleted (synced or still waiting for Postgres).
    pub turns: u64,
    /// Scan rows deleted.
    pub scans: u64,
}

/// What the Postgres part of an erasure deleted, per table (the
/// `erase.done.<erase_id>` report).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PostgresErased {
    /// `conversations` rows.
    pub conversations: u64,
    /// `turns` rows.
    pub turns: u64,
    /// `scans` rows.
    pub scans: u64,
    /// `reward_grants` rows.
    pub reward_grants: u64,
    /// `character_ownership` rows.
    pub character_ownership: u64,
    /// `my_characters` rows.
    pub my_characters: u64,
}

/// What a streamer purged from the buckets only streamers write (the
/// `erase.streamer` answer, inside a `HistoryReply`): keys per bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamerErased {
    /// `chat_context` keys (the user's conversations' prompt context).
    pub chat_context: u64,
    /// `scan_cache` keys (cached results of the user's scans).
    pub scan_cache: u64,
    /// `character_owners` keys (`<user key>.<character>`).
    pub character_owners: u64,
}

/// `erase.notice`: every gateway forgets the conversation owners it
/// remembers for this user, so no node keeps accepting turns for an erased
/// conversation under a remembered owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EraseNotice {
    /// The erased user (the JWT `sub`).
    pub user_id: String,
}

/// A value of the erasure register (KV bucket `erasures`, key = the user
/// key): when the user was erased. What they made up to then stays erased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureMark {
    /// The erasure's `requested_at`.
    pub erased_at: DateTime<Utc>,
}
