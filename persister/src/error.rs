//! Errors a caller branches on. Startup failures use `anyhow` with context
//! instead: they end the process with one actionable line.

/// A failure of the local SQLite buffer.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// SQLite refused the statement or the commit (disk full, corrupt file, I/O error).
    #[error("local buffer write failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row could not be turned back into a record (a bug or a hand-edited file).
    #[error("local buffer holds an unreadable row {id:?}: {reason}")]
    BadRow {
        /// The row's key (a turn or scan id).
        id: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The SQLite thread has stopped (it panicked); nothing more can be written.
    #[error("local buffer thread has stopped")]
    Closed,
}
