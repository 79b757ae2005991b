//! Asking every live persister to erase a user from its SQLite file
//! (`erase.local`), the first part of `DELETE /v1/me`.
//!
//! Each persister holds its own SQLite file, so like history the request
//! goes to all of them (no queue group) and the asker counts the answers
//! against the live persisters' heartbeats. The Postgres part travels on the
//! `ERASE` work queue instead (durable: it must survive a Postgres outage);
//! the SQLite part cannot wait, because a persister whose SQLite still holds
//! the rows would copy them back into Postgres after they were erased there.

use std::time::Duration;

use crate::{
    history::HistoryClient,
    subject,
    wire::{EraseRequest, HistoryReply, SqliteErased},
};

/// How long [`HistoryClient::erase_local`] waits for the persisters.
pub const ERASE_LOCAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The persisters' answers to one `erase.local`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalErasure {
    /// How many persisters were live (from their heartbeats) when asked.
    pub expected: usize,
    /// How many erased their file and said so.
    pub answered: usize,
    /// Their counts, summed.
    pub erased: SqliteErased,
}

impl LocalErasure {
    /// True when every live persister erased its file.
    pub fn complete(&self) -> bool {
        self.answered >= self.expected
    }
}

impl HistoryClient {
    /// Asks every live persister to erase `request.user_id` from its SQLite
    /// file and sums what they report. An error answer counts as no answer.
    ///
    /// # Errors
    /// When the request cannot be sent.
    pub async fn erase_local(&self, request: &EraseRequest) -> anyhow::Result<LocalErasure> {
        let expected = self.expected();
        let replies = self
            .ask(
                subject::ERASE_LOCAL,
                serde_json::to_vec(request)?,
                ERASE_LOCAL_TIMEOUT,
            )
            .await?;
        let mut out = LocalErasure {
            expected,
            ..LocalErasure::default()
        };
        for reply in replies {
            match serde_json::from_slice::<HistoryReply<SqliteErased>>(&reply) {
                Ok(HistoryReply::Ok(erased)) => {
                    out.answered += 1;
                    out.erased.turns += erased.turns;
                    out.erased.scans += erased.scans;
                }
                Ok(HistoryReply::Err(body)) => tracing::warn!(
                    code = %body.error.code,
                    message = %body.error.message,
                    "A persister could not erase its SQLite file."
                ),
                Err(error) => tracing::warn!(%error, "An erase.local answer is not JSON."),
            }
        }
        Ok(out)
    }
}
