//! Every subject of the contract, spelled once.
//!
//! Ids are embedded as single subject tokens, so they are checked: an id that
//! would put `.`, `*`, `>` or whitespace into a subject is refused rather than
//! letting one user's id address another subject tree.

/// Wildcard for every chat request.
pub const CHAT_REQ_ALL: &str = "chat.req.>";
/// Wildcard for every token frame of every turn.
pub const CHAT_TOK_ALL: &str = "chat.tok.>";
/// Wildcard for every completed turn record.
pub const CHAT_DONE_ALL: &str = "chat.done.>";
/// Wildcard for every scan request.
pub const SCAN_REQ_ALL: &str = "scan.req.>";
/// Wildcard for every scan event.
pub const SCAN_EVT_ALL: &str = "scan.evt.>";
/// Wildcard for every completed scan record.
pub const SCAN_DONE_ALL: &str = "scan.done.>";
/// Wildcard for every dead letter.
pub const DLQ_ALL: &str = "dlq.>";
/// Wildcard for every character grant.
pub const REWARD_GRANT_ALL: &str = "reward.grant.>";
/// The dead-letter kind of grants the persister could not store.
pub const DLQ_REWARDS: &str = "rewards";

/// An id that cannot be used as a subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("id {0:?} is not a valid id (1 to 128 of the characters A-Z, a-z, 0-9, '-', '_' and '=')")]
pub struct BadId(pub String);

/// Checks that `id` is safe to embed as one subject token and as a KV key.
///
/// # Errors
/// [`BadId`] when the id is empty, longer than 128 bytes, or has a character
/// outside `[A-Za-z0-9_=-]`.
pub fn token(id: &str) -> Result<&str, BadId> {
    // A KV key's alphabet, less '.' and '/': every id keys a KV entry too
    // (owners, turn index), and a key the bucket refuses would surface as
    // an outage rather than as the client's mistake.
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'='));
    if ok {
        Ok(id)
    } else {
        Err(BadId(id.to_owned()))
    }
}

/// The subject token and KV key standing for a user id.
///
/// A user id is a JWT `sub`, any non-empty string (`auth0|alice@example.com`),
/// and is stored verbatim everywhere else; only a subject or a KV key needs
/// this form. It is `u` followed by the unpadded base64url SHA-256 of the id:
/// 44 characters from `[A-Za-z0-9_-]`, so valid as both, stable across
/// processes and releases, and it does not put an e-mail address into
/// subject names that monitoring shows. Different ids never share a key in
/// practice (a SHA-256 collision).
pub fn user_key(user_id: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(user_id.as_bytes());
    format!(
        "u{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
    )
}

/// `chat.req.<conversation>`: a turn request from the gateway to the streamer.
///
/// # Errors
/// [`BadId`] for an id that is not a single subject token.
pub fn chat_req(conversation_id: &str) -> Result<String, BadId> {
    Ok(format!("chat.req.{}", token(conversation_id)?))
}

/// `chat.tok.<conversation>.<turn>`: the frames of one turn, in `seq` order.
///
/// # Errors
/// [`BadId`] for an id that is not a single subject token.
pub fn chat_tok(conversation_id: &str, turn_id: &str) -> Result<String, BadId> {
    Ok(format!(
        "chat.tok.{}.{}",
        token(conversation_id)?,
        token(turn_id)?
    ))
}

/// `chat.done.<conversation>`: the completed turn record for the persister.
///
/// # Errors
/// [`BadId`] for an id that is not a single subject token.
pub fn chat_done(conversation_id: &str) -> Result<String, BadId> {
    Ok(format!("chat.done.{}", token(conversation_id)?))
}

/// `chat.cancel.<turn>`: core NATS, tells the worker generating the turn to stop.
///
/// # Errors
/// [`BadId`] for an id that is not a single subject token.
pub fn chat_cancel(turn_id: &str) -> Result<String, BadId> {
    Ok(format!("chat.cancel.{}", token(turn_id)?))
}

/// `scan.req.<scan>`: a scan job for the streamer's pipeline.
///
/// # Errors
/// [`BadId`] for an id that is not a single subject token.
pub fn scan_req(scan_id: &str) -> Result<String, BadId> {
    Ok(format!("scan.req.{}", token(scan_id)?))
}

/// `scan.evt.<scan>`: the SSE events of one scan, in `id` order.
///
/// # Errors
/// [`BadId`] for an id that is not a single subject token.
pub fn scan_evt(scan_id: &str) -> Result<String, BadId> {
    Ok(format!("scan.evt.{}", token(scan_id)?))
}

/// `live.<subject>`: where `CHAT_TOK` and `SCAN_EVT` republish each frame
/// or event once it is stored. Live followers subscribe here, not to the
/// subject itself: a publish that the stream refused (a writer fenced on
/// the expected last sequence) still reaches the subject's subscribers,
/// but never this one.
pub fn live(subject: &str) -> String {
    format!("live.{subject}")
}

/// `scan.done.<scan>`: the completed scan record for the persister.
///
/// # Errors
/// [`BadId`] for an id that is not a single subject token.
pub fn scan_done(scan_id: &str) -> Result<String, BadId> {
    Ok(format!("scan.done.{}", token(scan_id)?))
}

/// `reward.grant.<scan>`: the character one scan earned, for the persister
/// (`Nats-Msg-Id` = the scan id, so a redelivered scan's grant is one).
///
/// # Errors
/// [`BadId`] for an id that is not a single subject token.
pub fn reward_grant(scan_id: &str) -> Result<String, BadId> {
    Ok(format!("reward.grant.{}", token(scan_id)?))
}

/// `dlq.<kind>`: a dead letter of the given kind (`chat`, `scan`, `turns`, ...).
///
/// # Errors
/// [`BadId`] for a kind that is not a single subject token.
pub fn dlq(kind: &str) -> Result<String, BadId> {
    Ok(format!("dlq.{}", token(kind)?))
}

/// History requests answered by the persister (core NATS request-reply).
pub const HISTORY_LIST: &str = "history.list";
/// One conversation's turns, answered by the persister.
pub const HISTORY_GET: &str = "history.get";
/// A user's completed scans, answered by the persister.
pub const HISTORY_SCANS: &str = "history.scans";
/// One completed scan by id, answered by the persister.
pub const HISTORY_SCAN: &str = "history.scan";
/// A user's characters (`character_ownership` and `my_characters`),
/// answered by the persister.
pub const HISTORY_CHARACTERS: &str = "history.characters";

/// `DELETE /v1/me`, part one: every live persister erases the user's rows
/// from its own SQLite file (core NATS request to all, like history).
pub const ERASE_LOCAL: &str = "erase.local";
/// `DELETE /v1/me`, the streamer's buckets: one streamer (queue group
/// `streamer`) purges the user's `chat_context`, `scan_cache` and
/// `character_owners` entries, which only streamers may write.
pub const ERASE_STREAMER: &str = "erase.streamer";
/// Wildcard of the `ERASE` stream: the Postgres parts of erasures.
pub const ERASE_PG_ALL: &str = "erase.pg.>";
/// Every gateway drops the conversation owners it remembers for an erased
/// user (core NATS broadcast, `EraseNotice`).
pub const ERASE_NOTICE: &str = "erase.notice";

/// `erase.pg.<user key>`: the Postgres part of one erasure, in the `ERASE`
/// work queue until a persister erased it.
pub fn erase_pg(user_id: &str) -> String {
    format!("erase.pg.{}", user_key(user_id))
}

/// `erase.done.<erase id>`: a persister's report of the Postgres part it
/// erased (core NATS; the gateway that asked waits on it for a while).
///
/// # Errors
/// [`BadId`] for an id that is not a single subject token.
pub fn erase_done(erase_id: &str) -> Result<String, BadId> {
    Ok(format!("erase.done.{}", token(erase_id)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_embed_ids_as_single_tokens() {
        assert_eq!(chat_req("c1").unwrap(), "chat.req.c1");
        assert_eq!(chat_tok("c1", "t1").unwrap(), "chat.tok.c1.t1");
        assert_eq!(chat_done("c1").unwrap(), "chat.done.c1");
        assert_eq!(chat_cancel("t1").unwrap(), "chat.cancel.t1");
        assert_eq!(scan_evt("s1").unwrap(), "scan.evt.s1");
        assert_eq!(dlq("chat").unwrap(), "dlq.chat");
    }

    #[test]
    fn ids_are_refused_unless_both_a_subject_token_and_a_kv_key() {
        for good in ["019ad0c4-1b2c-7def-8123-456789abcdef", "a_b=c", "x"] {
            assert!(token(good).is_ok(), "{good}");
        }
        let long = "a".repeat(129);
        // Schemathesis found the non-ASCII one: a valid subject token the
        // KV bucket refused, answered 503 instead of 400.
        for bad in [
            "",
            "a.b",
            "a*",
            ">",
            "a b",
            "a/b",
            "\u{61b5f}d",
            "é",
            long.as_str(),
        ] {
            assert!(token(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn any_user_id_maps_to_a_stable_subject_token_and_kv_key() {
        let ids = [
            "auth0|alice@example.com",
            "a.b",
            "*",
            ">",
            "a b",
            "김민지",
            "x",
        ];
        let keys: Vec<String> = ids.iter().map(|id| user_key(id)).collect();
        for key in &keys {
            assert_eq!(token(key), Ok(key.as_str()));
            assert_eq!(key.len(), 44);
            // What NATS accepts in a KV key.
            assert!(
                key.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=' | '/' | '.'))
            );
        }
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Stable: the same id gives the same key in every process, release
        // and node (a key written by one must be found by another).
        assert_eq!(
            user_key("auth0|alice@example.com"),
            "uB0cvuNFKwT4JqUK3JfQhoxisJWRkwdtgEbzBCIQMBqc"
        );
    }

    #[test]
    fn ids_that_would_change_the_subject_tree_are_refused() {
        for bad in ["", "a.b", "*", ">", "a b", "a\nb", &"x".repeat(129)] {
            assert!(chat_req(bad).is_err(), "{bad:?} accepted");
        }
    }
}
