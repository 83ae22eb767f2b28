//! The embedded SQLite store: WAL, one writer thread with group commit, separate readers.
//!
//! Every write is a command sent to the writer thread over a bounded channel. The writer opens a
//! `BEGIN IMMEDIATE` transaction for the first command and runs in it every command that is
//! waiting or arrives while it runs (up to [`MAX_BATCH`]) — each inside its own savepoint, so one
//! failing command does not undo the others — commits once, and only then answers them. Under
//! load, one commit (and fsync) covers hundreds of writes; when idle, a single write commits at
//! once. Reads (`get`, `list`, `stats`, `next_wakeup`) use a fixed pool of [`READERS`] read
//! connections on the blocking thread pool (a read waits for a free one) and never wait for the
//! writer.
//!
//! Durability: `synchronous = FULL` by default (a commit survives power loss); `NORMAL` survives
//! a process crash but may lose the last commits on power loss.
//!
//! **Invariant:** a command's reply is sent only after the transaction holding it committed.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gantry_runtime::retry::RetryPolicy;
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Row, ToSql, Transaction, params, params_from_iter,
};
use tokio::sync::oneshot;

use super::{FireReport, ScheduleError, ScheduleFilter};
use crate::schedule::{NewSchedule, Schedule, ScheduleChange};

mod schedules;

use super::{
    AckResults, ClaimRequest, Enqueued, JobError, ListFilter, ListOrder, QueueLimits, Stats, Store,
    StoreError,
};
use crate::machine::{self, AckEffect, CancelEffect};
use crate::model::{
    Ack, Job, JobOptions, MAX_PRIORITY, Millis, NewJob, Status, backoff_name, parse_backoff,
};

/// Most commands committed in one transaction.
pub const MAX_BATCH: usize = 512;
/// Commands that may wait for the writer before senders feel backpressure.
const QUEUE: usize = 4096;
/// Read connections (and reads at once).
const READERS: usize = 4;
/// Page cache of the writer connection, KiB.
const WRITER_CACHE_KIB: i64 = 4096;
/// Page cache of each read connection, KiB.
const READER_CACHE_KIB: i64 = 1024;

/// How hard commits are pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sync {
    /// fsync at every commit: survives power loss.
    #[default]
    Full,
    /// fsync at checkpoints only: survives a process crash, not power loss.
    Normal,
}

/// Options of a [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The database file (created if missing).
    pub path: PathBuf,
    /// Commit durability.
    pub sync: Sync,
}

impl SqliteOptions {
    /// Defaults for the database at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            sync: Sync::Full,
        }
    }
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    Enqueue(Vec<NewJob>, Millis, Reply<Vec<Enqueued>>),
    Claim(Vec<ClaimRequest>, QueueLimits, Millis, Reply<Vec<Vec<Job>>>),
    Ack(Vec<Ack>, Millis, Reply<AckResults>),
    Abandon(
        Vec<(String, u32)>,
        String,
        Millis,
        Reply<Vec<(Job, AckEffect)>>,
    ),
    Expire(Millis, Reply<Vec<(Job, AckEffect)>>),
    Heartbeat(
        Vec<(String, Option<u32>)>,
        Option<Duration>,
        Millis,
        Reply<Vec<Result<Millis, JobError>>>,
    ),
    Cancel(String, Millis, Reply<Result<(Job, CancelEffect), JobError>>),
    Retry(String, Millis, Reply<Result<Job, JobError>>),
    Purge(Millis, Vec<Status>, Reply<u64>),
    CreateSchedule(NewSchedule, Millis, Reply<Result<Schedule, ScheduleError>>),
    ChangeSchedule(
        String,
        ScheduleChange,
        Millis,
        Reply<Result<Schedule, ScheduleError>>,
    ),
    FireSchedules(Millis, usize, Reply<FireReport>),
}

/// The SQLite job store. Cloning shares it.
#[derive(Clone)]
pub struct SqliteStore {
    writer: SyncSender<Command>,
    readers: Arc<Mutex<Vec<Connection>>>,
    reader_permits: Arc<tokio::sync::Semaphore>,
    path: Arc<PathBuf>,
}

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    name             TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    priority         INTEGER NOT NULL,
    args             BLOB    NOT NULL,
    max_attempts     INTEGER NOT NULL,
    backoff          TEXT    NOT NULL,
    initial_delay_ms INTEGER NOT NULL,
    max_delay_ms     INTEGER NOT NULL,
    multiplier       REAL    NOT NULL,
    jitter           REAL    NOT NULL,
    timeout_ms       INTEGER NOT NULL,
    idempotency_key  TEXT,
    status           INTEGER NOT NULL,
    attempt          INTEGER NOT NULL,
    error            TEXT,
    result           BLOB,
    created_at       INTEGER NOT NULL,
    run_at           INTEGER NOT NULL,
    started_at       INTEGER,
    completed_at     INTEGER,
    lease_until      INTEGER,
    worker_id        TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (name, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_due_by_name ON jobs (name, priority, run_at, seq) WHERE status = 1;
CREATE INDEX jobs_due ON jobs (priority, run_at, seq) WHERE status = 1;
CREATE INDEX jobs_leases ON jobs (lease_until) WHERE status = 2;
CREATE INDEX jobs_created ON jobs (created_at);
CREATE INDEX jobs_finished ON jobs (completed_at) WHERE completed_at IS NOT NULL;
CREATE INDEX jobs_status_name ON jobs (status, name);
"#,
    r#"
ALTER TABLE jobs ADD COLUMN attempt_base INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
CREATE TABLE schedules (
    seq              INTEGER PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    name             TEXT    NOT NULL,
    cron             TEXT    NOT NULL,
    timezone         TEXT    NOT NULL,
    misfire          TEXT    NOT NULL,
    status           INTEGER NOT NULL,
    args             BLOB    NOT NULL,
    max_attempts     INTEGER NOT NULL,
    backoff          TEXT    NOT NULL,
    initial_delay_ms INTEGER NOT NULL,
    max_delay_ms     INTEGER NOT NULL,
    multiplier       REAL    NOT NULL,
    jitter           REAL    NOT NULL,
    timeout_ms       INTEGER NOT NULL,
    next_run_at      INTEGER,
    last_run_at      INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);
CREATE UNIQUE INDEX schedules_name ON schedules (name) WHERE status <> 3;
CREATE INDEX schedules_due ON schedules (next_run_at) WHERE status = 1;
"#,
    // No `IS NOT NULL` partial indexes on `jobs`: to decide whether such an index can serve a
    // query, SQLite's planner inspects the values bound to `column = ?` terms and marks those
    // parameters, and every later re-bind then expires the cached statement, so each execution
    // re-parses and re-plans it (it was a third of the server's CPU under load). A UNIQUE index
    // already lets NULL keys repeat.
    r#"
DROP INDEX jobs_idempotency;
CREATE UNIQUE INDEX jobs_idempotency ON jobs (name, idempotency_key);
DROP INDEX jobs_finished;
CREATE INDEX jobs_finished ON jobs (completed_at);
"#,
];

const COLUMNS: &str = "id, name, queue, priority, args, max_attempts, backoff, initial_delay_ms, \
    max_delay_ms, multiplier, jitter, timeout_ms, idempotency_key, status, attempt, error, result, \
    created_at, run_at, started_at, completed_at, lease_until, worker_id, cancel_requested, \
    attempt_base";

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database and starts the writer thread.
    pub fn open(options: SqliteOptions) -> Result<Self, StoreError> {
        if let Some(dir) = options.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Database(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let mut writer = open_connection(&options.path, false)?;
        let sync = match options.sync {
            Sync::Full => "FULL",
            Sync::Normal => "NORMAL",
        };
        writer
            .execute_batch(&format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA temp_store = MEMORY;"
            ))
            .map_err(db_err)?;
        migrate(&mut writer)?;
        let readers = (0..READERS)
            .map(|_| open_connection(&options.path, true))
            .collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("jobs-sqlite-writer".into())
            .spawn(move || writer_loop(writer, rx))
            .map_err(|e| StoreError::Database(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            writer: tx,
            readers: Arc::new(Mutex::new(readers)),
            reader_permits: Arc::new(tokio::sync::Semaphore::new(READERS)),
            path: Arc::new(options.path),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let writer = self.writer.clone();
        let command = make(tx);
        // A full queue blocks the sender: do that off the async runtime.
        match writer.try_send(command) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(command)) => {
                tokio::task::spawn_blocking(move || writer.send(command).map_err(|_| ()))
                    .await
                    .map_err(|_| StoreError::Closed)?
                    .map_err(|_| StoreError::Closed)?;
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return Err(StoreError::Closed),
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        // A permit guarantees a connection in the pool.
        let permit = Arc::clone(&self.reader_permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let readers = Arc::clone(&self.readers);
        let path = Arc::clone(&self.path);
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().unwrap_or_else(PoisonError::into_inner).pop();
            // None only if a read panicked and took its connection with it.
            let conn = match pooled {
                Some(c) => c,
                None => open_connection(&path, true)?,
            };
            let result = f(&conn);
            readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
            drop(permit);
            result
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }
}

fn open_connection(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Database(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(db_err)?;
    // Page caches bound the store's memory: the writer's holds the hot index pages every
    // transaction touches; readers do point reads and short scans.
    let cache_kib = if read_only {
        READER_CACHE_KIB
    } else {
        WRITER_CACHE_KIB
    };
    conn.pragma_update(None, "cache_size", -cache_kib)
        .map_err(db_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_err)?;
    if version > MIGRATIONS.len() {
        return Err(StoreError::Database(format!(
            "database schema version {version} is newer than this gantry ({}); upgrade gantry",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db_err)?;
        tx.execute_batch(sql).map_err(db_err)?;
        tx.pragma_update(None, "user_version", i + 1)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
    }
    Ok(())
}

/// A reply waiting for its transaction to commit.
type Pending = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;

fn writer_loop(mut conn: Connection, rx: Receiver<Command>) {
    // Blocks for the first command; ends when every sender is gone.
    while let Ok(first) = rx.recv() {
        let mut pending: Vec<Pending> = Vec::new();
        let mut next = Some(first);
        let commit = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db_err)
            .and_then(|mut tx| {
                // Commands that arrive while the transaction runs join it.
                while let Some(command) = next.take() {
                    pending.push(run_command(&mut tx, command));
                    // SQLite rolled the whole transaction back (disk full, I/O error): take no
                    // more commands, or each would commit on its own; the commit below fails
                    // and every command of this transaction is answered with the error.
                    if tx.is_autocommit() {
                        break;
                    }
                    if pending.len() >= MAX_BATCH {
                        break;
                    }
                    next = rx.try_recv().ok();
                }
                tx.commit().map_err(db_err)
            });
        // A command taken but not run (the transaction failed to begin) is answered too.
        if let Some(command) = next {
            pending.push(fail_command(command));
        }
        if let Err(e) = &commit {
            tracing::error!(error = %e, "job store commit failed");
        }
        for reply in pending {
            reply(commit.as_ref().map(|_| ()));
        }
    }
}

fn fail_command(command: Command) -> Pending {
    fn fail<T: Send + 'static>(tx: Reply<T>) -> Pending {
        Box::new(move |r: Result<(), &StoreError>| {
            let e = r
                .err()
                .map(|e| StoreError::Database(e.to_string()))
                .unwrap_or_else(|| StoreError::Database("transaction did not begin".into()));
            let _ = tx.send(Err(e));
        })
    }
    match command {
        Command::Enqueue(_, _, tx) => fail(tx),
        Command::Claim(_, _, _, tx) => fail(tx),
        Command::Ack(_, _, tx) => fail(tx),
        Command::Abandon(_, _, _, tx) => fail(tx),
        Command::Expire(_, tx) => fail(tx),
        Command::Heartbeat(_, _, _, tx) => fail(tx),
        Command::Cancel(_, _, tx) => fail(tx),
        Command::Retry(_, _, tx) => fail(tx),
        Command::Purge(_, _, tx) => fail(tx),
        Command::CreateSchedule(_, _, tx) => fail(tx),
        Command::ChangeSchedule(_, _, _, tx) => fail(tx),
        Command::FireSchedules(_, _, tx) => fail(tx),
    }
}

/// Runs `f` inside a savepoint: on error, what it wrote is rolled back and the rest of the
/// transaction stands. The savepoint statements are prepared once, not parsed per command.
fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let run = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map_err(db_err)
    };
    run("SAVEPOINT command")?;
    match f(conn) {
        Ok(v) => {
            run("RELEASE command")?;
            Ok(v)
        }
        Err(e) => {
            if let Err(undo) = run("ROLLBACK TO command").and_then(|_| run("RELEASE command")) {
                return Err(StoreError::Database(format!(
                    "{e}; then the rollback failed: {undo}"
                )));
            }
            Err(e)
        }
    }
}

/// Runs one command in its own savepoint and returns how to answer it once the commit is known.
fn run_command(tx: &mut Transaction<'_>, command: Command) -> Pending {
    fn answer<T: Send + 'static>(
        tx: &mut Transaction<'_>,
        reply: Reply<T>,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Pending {
        let result = in_savepoint(tx, f);
        Box::new(move |commit: Result<(), &StoreError>| {
            let result = match (result, commit) {
                (Ok(v), Ok(())) => Ok(v),
                (Err(e), _) => Err(e),
                (Ok(_), Err(e)) => Err(StoreError::Database(format!("commit failed: {e}"))),
            };
            let _ = reply.send(result);
        })
    }
    match command {
        Command::Enqueue(jobs, now, reply) => answer(tx, reply, |t| enqueue(t, jobs, now)),
        Command::Claim(reqs, limits, now, reply) => {
            answer(tx, reply, |t| claim(t, &reqs, &limits, now))
        }
        Command::Ack(acks, now, reply) => answer(tx, reply, |t| ack(t, acks, now)),
        Command::Abandon(attempts, reason, now, reply) => {
            answer(tx, reply, |t| abandon(t, attempts, &reason, now))
        }
        Command::Expire(now, reply) => answer(tx, reply, |t| expire(t, now)),
        Command::Heartbeat(beats, extend, now, reply) => {
            answer(tx, reply, |t| heartbeat(t, beats, extend, now))
        }
        Command::Cancel(id, now, reply) => answer(tx, reply, |t| {
            Ok(match load(t, &id)? {
                None => Err(JobError::NotFound(id)),
                Some(mut job) => {
                    let before = Saved::of(&job);
                    let effect = machine::cancel(&mut job, now);
                    save(t, &before, &job)?;
                    Ok((job, effect))
                }
            })
        }),
        Command::Retry(id, now, reply) => answer(tx, reply, |t| {
            Ok(match load(t, &id)? {
                None => Err(JobError::NotFound(id)),
                Some(mut job) => match (Saved::of(&job), machine::retry(&mut job, now)) {
                    (before, Ok(())) => {
                        save(t, &before, &job)?;
                        Ok(job)
                    }
                    (_, Err(r)) => Err(r.into()),
                },
            })
        }),
        Command::Purge(before, statuses, reply) => {
            answer(tx, reply, |t| purge(t, before, &statuses))
        }
        Command::CreateSchedule(new, now, reply) => {
            answer(tx, reply, |t| schedules::create(t, new, now))
        }
        Command::ChangeSchedule(key, change, now, reply) => {
            answer(tx, reply, |t| schedules::change(t, key, change, now))
        }
        Command::FireSchedules(now, limit, reply) => {
            answer(tx, reply, |t| schedules::fire_due(t, now, limit))
        }
    }
}

fn enqueue(tx: &Connection, jobs: Vec<NewJob>, now: Millis) -> Result<Vec<Enqueued>, StoreError> {
    let mut find = tx
        .prepare_cached("SELECT id FROM jobs WHERE name = ?1 AND idempotency_key = ?2")
        .map_err(db_err)?;
    let mut out = Vec::with_capacity(jobs.len());
    for new in jobs {
        if let Some(key) = &new.idempotency_key {
            let existing: Option<String> = find
                .query_row(params![new.name, key], |r| r.get(0))
                .optional()
                .map_err(db_err)?;
            if let Some(id) = existing {
                out.push(Enqueued {
                    id,
                    deduplicated: true,
                });
                continue;
            }
        }
        let id = uuid::Uuid::now_v7().to_string();
        let job = Job::create(id.clone(), new, now);
        insert(tx, &job)?;
        out.push(Enqueued {
            id,
            deduplicated: false,
        });
    }
    Ok(out)
}

fn insert(tx: &Connection, job: &Job) -> Result<(), StoreError> {
    let retry = &job.options.retry;
    tx.prepare_cached(&format!(
        "INSERT INTO jobs ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
         ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)"
    ))
    .map_err(db_err)?
    .execute(params![
        job.id,
        job.name,
        job.queue,
        job.priority,
        job.args,
        retry.max_attempts(),
        backoff_name(retry.backoff()),
        millis(retry.initial_delay()),
        millis(retry.max_delay()),
        retry.multiplier(),
        retry.jitter(),
        millis(job.options.timeout),
        job.idempotency_key,
        job.status.code(),
        job.attempt,
        job.error,
        job.result,
        job.created_at,
        job.run_at,
        job.started_at,
        job.completed_at,
        job.lease_until,
        job.worker_id,
        job.cancel_requested,
        job.attempt_base,
    ])
    .map_err(db_err)?;
    Ok(())
}

/// The columns a transition may change, as they were before it.
struct Saved {
    status: Status,
    attempt: u32,
    error: Option<String>,
    result: Option<Vec<u8>>,
    run_at: Millis,
    started_at: Option<Millis>,
    completed_at: Option<Millis>,
    lease_until: Option<Millis>,
    worker_id: Option<String>,
    cancel_requested: bool,
    attempt_base: u32,
}

impl Saved {
    fn of(job: &Job) -> Self {
        Self {
            status: job.status,
            attempt: job.attempt,
            error: job.error.clone(),
            result: job.result.clone(),
            run_at: job.run_at,
            started_at: job.started_at,
            completed_at: job.completed_at,
            lease_until: job.lease_until,
            worker_id: job.worker_id.clone(),
            cancel_requested: job.cancel_requested,
            attempt_base: job.attempt_base,
        }
    }
}

/// Writes back the columns a transition changed, and only those: an index none of whose
/// columns changed is left alone (a claim does not touch `jobs_finished`, for one).
fn save(tx: &Connection, before: &Saved, job: &Job) -> Result<(), StoreError> {
    let status = job.status.code();
    let columns: [(&str, bool, &dyn ToSql); 11] = [
        ("status", before.status != job.status, &status),
        ("attempt", before.attempt != job.attempt, &job.attempt),
        ("error", before.error != job.error, &job.error),
        ("result", before.result != job.result, &job.result),
        ("run_at", before.run_at != job.run_at, &job.run_at),
        (
            "started_at",
            before.started_at != job.started_at,
            &job.started_at,
        ),
        (
            "completed_at",
            before.completed_at != job.completed_at,
            &job.completed_at,
        ),
        (
            "lease_until",
            before.lease_until != job.lease_until,
            &job.lease_until,
        ),
        (
            "worker_id",
            before.worker_id != job.worker_id,
            &job.worker_id,
        ),
        (
            "cancel_requested",
            before.cancel_requested != job.cancel_requested,
            &job.cancel_requested,
        ),
        (
            "attempt_base",
            before.attempt_base != job.attempt_base,
            &job.attempt_base,
        ),
    ];
    let mut sql = String::from("UPDATE jobs SET ");
    let mut values: Vec<&dyn ToSql> = Vec::with_capacity(columns.len() + 1);
    for (name, changed, value) in columns {
        if changed {
            if !values.is_empty() {
                sql.push_str(", ");
            }
            values.push(value);
            let _ = write!(sql, "{name} = ?{}", values.len());
        }
    }
    if values.is_empty() {
        return Ok(());
    }
    values.push(&job.id);
    let _ = write!(sql, " WHERE id = ?{}", values.len());
    // One cached statement per set of changed columns; transitions produce only a handful.
    tx.prepare_cached(&sql)
        .map_err(db_err)?
        .execute(params_from_iter(values))
        .map_err(db_err)?;
    Ok(())
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn load(conn: &Connection, id: &str) -> Result<Option<Job>, StoreError> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"))
        .map_err(db_err)?
        .query_row([id], row_to_job)
        .optional()
        .map_err(db_err)?
        .transpose()
}

/// Reads a row in [`COLUMNS`] order. The outer error is SQLite's, the inner one a bad row.
fn row_to_job(r: &Row<'_>) -> rusqlite::Result<Result<Job, StoreError>> {
    let id: String = r.get(0)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        id: id.clone(),
        reason,
    };
    let backoff: String = r.get(6)?;
    let status: i32 = r.get(13)?;
    let Some(backoff) = parse_backoff(&backoff) else {
        return Ok(Err(corrupt(format!("unknown backoff {backoff}"))));
    };
    let Some(status) = Status::from_code(status) else {
        return Ok(Err(corrupt(format!("unknown status {status}"))));
    };
    let ms = |v: i64| Duration::from_millis(u64::try_from(v).unwrap_or(0));
    let retry = RetryPolicy::builder()
        .max_attempts(r.get(5)?)
        .backoff(backoff)
        .initial_delay(ms(r.get(7)?))
        .max_delay(ms(r.get(8)?))
        .multiplier(r.get(9)?)
        .jitter(r.get(10)?)
        .build();
    let retry = match retry {
        Ok(p) => p,
        Err(e) => return Ok(Err(corrupt(e.to_string()))),
    };
    Ok(Ok(Job {
        name: r.get(1)?,
        queue: r.get(2)?,
        priority: r.get(3)?,
        args: r.get(4)?,
        options: JobOptions {
            retry,
            timeout: ms(r.get(11)?),
        },
        idempotency_key: r.get(12)?,
        status,
        attempt: r.get(14)?,
        error: r.get(15)?,
        result: r.get(16)?,
        created_at: r.get(17)?,
        run_at: r.get(18)?,
        started_at: r.get(19)?,
        completed_at: r.get(20)?,
        lease_until: r.get(21)?,
        worker_id: r.get(22)?,
        cancel_requested: r.get(23)?,
        attempt_base: r.get(24)?,
        id,
    }))
}

fn query_jobs(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Job>, StoreError> {
    query_some_jobs(conn, sql, params, usize::MAX)
}

/// The first `max` rows of a query. Rows are produced as they are read, so stopping early costs
/// nothing. Hot queries take their limit this way rather than as a bound `LIMIT ?`: SQLite's
/// planner looks at a bound LIMIT's value, and re-binding it then expires the cached statement,
/// so every execution would be parsed and planned again.
fn query_some_jobs(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    max: usize,
) -> Result<Vec<Job>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let rows = stmt.query_map(params, row_to_job).map_err(db_err)?;
    let mut jobs = Vec::new();
    for row in rows.take(max) {
        jobs.push(row.map_err(db_err)??);
    }
    Ok(jobs)
}

/// Due pending jobs for one worker, most urgent first: each priority level in turn, and within
/// it each name's index range, merged by run time and enqueue order. Every query is an index
/// range scan, so a deep backlog of other names or future jobs costs nothing.
fn due(
    conn: &Connection,
    names: &[String],
    limit: usize,
    excluded: &[&str],
    now: Millis,
) -> Result<Vec<Job>, StoreError> {
    let mut out: Vec<Job> = Vec::new();
    // Queues at their concurrency limit; the values are bound after the fixed parameters.
    let not_in = if excluded.is_empty() {
        String::new()
    } else {
        format!(
            "AND queue NOT IN ({})",
            vec!["?"; excluded.len()].join(", ")
        )
    };
    // One query per distinct name: a name listed twice would return its jobs twice.
    let mut names: Vec<&String> = names.iter().collect();
    names.sort_unstable();
    names.dedup();
    for priority in 0..=MAX_PRIORITY {
        let remaining = limit - out.len();
        if remaining == 0 {
            break;
        }
        let mut level = if names.is_empty() {
            let mut values: Vec<rusqlite::types::Value> =
                vec![i64::from(priority).into(), now.into()];
            values.extend(excluded.iter().map(|q| q.to_string().into()));
            query_some_jobs(
                conn,
                &format!(
                    "SELECT {COLUMNS} FROM jobs WHERE status = 1 AND priority = ? AND run_at <= ? \
                     {not_in} ORDER BY run_at, seq"
                ),
                params_from_iter(values),
                limit,
            )?
        } else {
            let mut level = Vec::new();
            for &name in &names {
                let mut values: Vec<rusqlite::types::Value> =
                    vec![name.clone().into(), i64::from(priority).into(), now.into()];
                values.extend(excluded.iter().map(|q| q.to_string().into()));
                level.extend(query_some_jobs(
                    conn,
                    &format!(
                        "SELECT {COLUMNS} FROM jobs WHERE status = 1 AND name = ? AND priority = ? \
                         AND run_at <= ? {not_in} ORDER BY run_at, seq"
                    ),
                    params_from_iter(values),
                    limit,
                )?);
            }
            // Ids are UUIDv7: within one millisecond of run time they order by creation.
            level.sort_by(|a, b| a.run_at.cmp(&b.run_at).then_with(|| a.id.cmp(&b.id)));
            level
        };
        level.truncate(remaining);
        out.extend(level);
    }
    Ok(out)
}

fn claim(
    tx: &Connection,
    requests: &[ClaimRequest],
    limits: &QueueLimits,
    now: Millis,
) -> Result<Vec<Vec<Job>>, StoreError> {
    // Free slots of every queue with a concurrency limit.
    let mut free: BTreeMap<&str, u32> = BTreeMap::new();
    if !limits.is_empty() {
        let mut stmt = tx
            .prepare_cached("SELECT queue, COUNT(*) FROM jobs WHERE status = 2 GROUP BY queue")
            .map_err(db_err)?;
        let running: HashMap<String, i64> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db_err)?
            .collect::<Result<_, _>>()
            .map_err(db_err)?;
        for (queue, &limit) in limits.iter() {
            let used = running.get(queue).copied().unwrap_or(0);
            let used = u32::try_from(used).unwrap_or(u32::MAX);
            free.insert(queue.as_str(), limit.saturating_sub(used));
        }
    }
    let mut out = Vec::with_capacity(requests.len());
    for req in requests {
        let mut taken: Vec<Job> = Vec::new();
        // Candidates from a queue that fills up are skipped; look again without that queue
        // until the request is full or nothing more is due.
        while taken.len() < req.limit {
            let excluded: Vec<&str> = free
                .iter()
                .filter(|(_, n)| **n == 0)
                .map(|(q, _)| *q)
                .collect();
            let candidates = due(tx, &req.names, req.limit - taken.len(), &excluded, now)?;
            if candidates.is_empty() {
                break;
            }
            let mut skipped = false;
            for mut job in candidates {
                if let Some(n) = free.get_mut(job.queue.as_str()) {
                    if *n == 0 {
                        skipped = true;
                        continue;
                    }
                    *n -= 1;
                }
                let before = Saved::of(&job);
                machine::claim(&mut job, &req.worker_id, now).map_err(|e| {
                    StoreError::Database(format!("claim of a due job refused: {e}"))
                })?;
                save(tx, &before, &job)?;
                taken.push(job);
            }
            if !skipped {
                break;
            }
        }
        out.push(taken);
    }
    Ok(out)
}

fn ack(tx: &Connection, acks: Vec<Ack>, now: Millis) -> Result<AckResults, StoreError> {
    let mut out = Vec::with_capacity(acks.len());
    for a in acks {
        let Some(mut job) = load(tx, &a.job_id)? else {
            out.push(Err(JobError::NotFound(a.job_id)));
            continue;
        };
        let before = Saved::of(&job);
        match machine::ack(&mut job, a.attempt, a.outcome, now, rand::random::<f64>()) {
            Ok(effect) => {
                save(tx, &before, &job)?;
                out.push(Ok((job, effect)));
            }
            Err(r) => out.push(Err(r.into())),
        }
    }
    Ok(out)
}

fn abandon(
    tx: &Connection,
    attempts: Vec<(String, u32)>,
    reason: &str,
    now: Millis,
) -> Result<Vec<(Job, AckEffect)>, StoreError> {
    let mut out = Vec::new();
    for (id, attempt) in attempts {
        let Some(mut job) = load(tx, &id)? else {
            continue;
        };
        if job.status != Status::Running || job.attempt != attempt {
            continue;
        }
        let before = Saved::of(&job);
        if let Ok(effect) = machine::abandon(&mut job, reason, now) {
            save(tx, &before, &job)?;
            out.push((job, effect));
        }
    }
    Ok(out)
}

fn expire(tx: &Connection, now: Millis) -> Result<Vec<(Job, AckEffect)>, StoreError> {
    let jobs = query_jobs(
        tx,
        &format!(
            "SELECT {COLUMNS} FROM jobs WHERE status = 2 AND lease_until <= ?1 ORDER BY lease_until LIMIT 1000"
        ),
        [now],
    )?;
    let mut out = Vec::with_capacity(jobs.len());
    for mut job in jobs {
        let before = Saved::of(&job);
        if let Ok(effect) = machine::expire(&mut job, now, rand::random::<f64>()) {
            save(tx, &before, &job)?;
            out.push((job, effect));
        }
    }
    Ok(out)
}

fn heartbeat(
    tx: &Connection,
    beats: Vec<(String, Option<u32>)>,
    extend: Option<Duration>,
    now: Millis,
) -> Result<Vec<Result<Millis, JobError>>, StoreError> {
    let mut out = Vec::with_capacity(beats.len());
    for (id, attempt) in beats {
        let Some(mut job) = load(tx, &id)? else {
            out.push(Err(JobError::NotFound(id)));
            continue;
        };
        let before = Saved::of(&job);
        match machine::heartbeat(&mut job, attempt, extend, now) {
            Ok(until) => {
                save(tx, &before, &job)?;
                out.push(Ok(until));
            }
            Err(r) => out.push(Err(r.into())),
        }
    }
    Ok(out)
}

fn purge(tx: &Connection, before: Millis, statuses: &[Status]) -> Result<u64, StoreError> {
    let statuses: Vec<i32> = if statuses.is_empty() {
        Status::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.code())
            .collect()
    } else {
        statuses
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.code())
            .collect()
    };
    if statuses.is_empty() {
        return Ok(0);
    }
    let marks = vec!["?"; statuses.len()].join(", ");
    let sql = format!(
        "DELETE FROM jobs WHERE completed_at IS NOT NULL AND completed_at < ? AND status IN ({marks})"
    );
    let mut values: Vec<i64> = vec![before];
    values.extend(statuses.iter().map(|&s| i64::from(s)));
    let n = tx.execute(&sql, params_from_iter(values)).map_err(db_err)?;
    Ok(n as u64)
}

impl Store for SqliteStore {
    async fn enqueue(&self, jobs: Vec<NewJob>, now: Millis) -> Result<Vec<Enqueued>, StoreError> {
        self.write(|r| Command::Enqueue(jobs, now, r)).await
    }

    async fn claim(
        &self,
        requests: Vec<ClaimRequest>,
        limits: QueueLimits,
        now: Millis,
    ) -> Result<Vec<Vec<Job>>, StoreError> {
        self.write(|r| Command::Claim(requests, limits, now, r))
            .await
    }

    async fn ack(&self, acks: Vec<Ack>, now: Millis) -> Result<AckResults, StoreError> {
        self.write(|r| Command::Ack(acks, now, r)).await
    }

    async fn abandon(
        &self,
        attempts: Vec<(String, u32)>,
        reason: String,
        now: Millis,
    ) -> Result<Vec<(Job, AckEffect)>, StoreError> {
        self.write(|r| Command::Abandon(attempts, reason, now, r))
            .await
    }

    async fn expire_leases(&self, now: Millis) -> Result<Vec<(Job, AckEffect)>, StoreError> {
        self.write(|r| Command::Expire(now, r)).await
    }

    async fn heartbeat(
        &self,
        beats: Vec<(String, Option<u32>)>,
        extend: Option<Duration>,
        now: Millis,
    ) -> Result<Vec<Result<Millis, JobError>>, StoreError> {
        self.write(|r| Command::Heartbeat(beats, extend, now, r))
            .await
    }

    async fn cancel(
        &self,
        id: String,
        now: Millis,
    ) -> Result<Result<(Job, CancelEffect), JobError>, StoreError> {
        self.write(|r| Command::Cancel(id, now, r)).await
    }

    async fn retry(&self, id: String, now: Millis) -> Result<Result<Job, JobError>, StoreError> {
        self.write(|r| Command::Retry(id, now, r)).await
    }

    async fn get(&self, id: String) -> Result<Option<Job>, StoreError> {
        self.read(move |c| load(c, &id)).await
    }

    async fn list(&self, filter: ListFilter) -> Result<(Vec<Job>, u64), StoreError> {
        self.read(move |c| list(c, &filter)).await
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached("SELECT status, COUNT(*) FROM jobs GROUP BY status")
                .map_err(db_err)?;
            let counts: Vec<(i32, i64)> = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(db_err)?
                .collect::<Result<_, _>>()
                .map_err(db_err)?;
            Ok(Stats {
                by_status: Status::ALL
                    .iter()
                    .map(|&s| {
                        let n = counts.iter().find(|(c, _)| *c == s.code()).map(|(_, n)| *n);
                        (s, n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn purge(&self, before: Millis, statuses: Vec<Status>) -> Result<u64, StoreError> {
        self.write(|r| Command::Purge(before, statuses, r)).await
    }

    async fn next_wakeup(&self, now: Millis) -> Result<Option<Millis>, StoreError> {
        self.read(move |c| {
            let mut next: Option<Millis> = c
                .prepare_cached("SELECT MIN(lease_until) FROM jobs WHERE status = 2")
                .map_err(db_err)?
                .query_row([], |r| r.get(0))
                .map_err(db_err)?;
            let mut stmt = c
                .prepare_cached(
                    "SELECT MIN(run_at) FROM jobs WHERE status = 1 AND priority = ?1 AND run_at > ?2",
                )
                .map_err(db_err)?;
            for priority in 0..=MAX_PRIORITY {
                let at: Option<Millis> = stmt.query_row(params![priority, now], |r| r.get(0)).map_err(db_err)?;
                next = match (next, at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            let tick = schedules::next_due(c, now)?;
            Ok(match (next, tick) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            })
        })
        .await
    }

    async fn create_schedule(
        &self,
        new: NewSchedule,
        now: Millis,
    ) -> Result<Result<Schedule, ScheduleError>, StoreError> {
        self.write(|r| Command::CreateSchedule(new, now, r)).await
    }

    async fn get_schedule(&self, id_or_name: String) -> Result<Option<Schedule>, StoreError> {
        self.read(move |c| schedules::load(c, &id_or_name)).await
    }

    async fn list_schedules(
        &self,
        filter: ScheduleFilter,
    ) -> Result<(Vec<Schedule>, u64), StoreError> {
        self.read(move |c| schedules::list(c, &filter)).await
    }

    async fn change_schedule(
        &self,
        id_or_name: String,
        change: ScheduleChange,
        now: Millis,
    ) -> Result<Result<Schedule, ScheduleError>, StoreError> {
        self.write(|r| Command::ChangeSchedule(id_or_name, change, now, r))
            .await
    }

    async fn fire_due_schedules(
        &self,
        now: Millis,
        limit: usize,
    ) -> Result<FireReport, StoreError> {
        self.write(|r| Command::FireSchedules(now, limit, r)).await
    }
}

fn list(conn: &Connection, filter: &ListFilter) -> Result<(Vec<Job>, u64), StoreError> {
    let mut clauses = Vec::new();
    let mut values: Vec<rusqlite::types::Value> = Vec::new();
    if !filter.statuses.is_empty() {
        clauses.push(format!(
            "status IN ({})",
            vec!["?"; filter.statuses.len()].join(", ")
        ));
        values.extend(filter.statuses.iter().map(|s| i64::from(s.code()).into()));
    }
    if !filter.names.is_empty() {
        clauses.push(format!(
            "name IN ({})",
            vec!["?"; filter.names.len()].join(", ")
        ));
        values.extend(filter.names.iter().map(|n| n.clone().into()));
    }
    if let Some(queue) = &filter.queue {
        clauses.push("queue = ?".to_owned());
        values.push(queue.clone().into());
    }
    let filter_sql = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let total: i64 = conn
        .query_row(
            &format!("SELECT COUNT(*) FROM jobs {filter_sql}"),
            params_from_iter(values.iter()),
            |r| r.get(0),
        )
        .map_err(db_err)?;
    let column = match filter.order_by {
        ListOrder::CreatedAt => "created_at",
        ListOrder::RunAt => "run_at",
    };
    let direction = if filter.ascending { "ASC" } else { "DESC" };
    let sql = format!(
        "SELECT {COLUMNS} FROM jobs {filter_sql} ORDER BY {column} {direction}, seq {direction} LIMIT ? OFFSET ?"
    );
    values.push(i64::try_from(filter.limit).unwrap_or(i64::MAX).into());
    values.push(i64::try_from(filter.offset).unwrap_or(i64::MAX).into());
    let jobs = query_jobs(conn, &sql, params_from_iter(values.iter()))?;
    Ok((jobs, u64::try_from(total).unwrap_or(0)))
}
