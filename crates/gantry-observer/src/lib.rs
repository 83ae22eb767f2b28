//! The observer: PostgreSQL row changes turned into events, delivered exactly once per observer
//! set to what acts on them.
//!
//! - [`condition`]: the condition language observers filter events with.
//! - [`config`]: the observer file (which tables are watched, and by whom).
//! - [`dispatch`]: matching a batch against the observers and handing the matches to the jobs
//!   engine's PostgreSQL store, with the checkpoint, in one transaction.
//! - [`listener`]: leader election per observer set (advisory lock + fencing epoch), the poll
//!   loop that drives the hand-off, pruning.
//! - [`schema`]: `install` / `uninstall` of the change-log table, its triggers and the
//!   observer's own tables, idempotently.
//! - [`capture`]: the commit-safe cursor over the change log, checkpoints with a fencing epoch,
//!   and pruning of what every observer set has passed. Design note:
//!   `docs/observer-capture.md`.

pub mod action;
pub mod capture;
pub mod condition;
pub mod config;
pub mod dispatch;
pub mod listener;
pub mod metrics;
pub mod runner;
pub mod schema;
pub mod worker;

/// An observer failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused or failed a statement.
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// The configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// A stored value is not what the observer wrote.
    #[error("corrupt change log: {0}")]
    Corrupt(String),
    /// The jobs store failed.
    #[error("jobs store: {0}")]
    Jobs(#[from] gantry_jobs::store::StoreError),
    /// Another process holds this observer set's checkpoint now (a newer epoch).
    #[error("fenced out: observer set {set} has a newer leader (epoch {current}, ours {ours})")]
    Fenced {
        /// The observer set.
        set: String,
        /// The epoch stored.
        current: i64,
        /// Ours.
        ours: i64,
    },
}

/// Quotes an SQL identifier (`"` doubled).
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
