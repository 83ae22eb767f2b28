//! The PostgreSQL store: several gantry servers sharing one database.
//!
//! It owns the `jobs` table of one PostgreSQL schema (`gantry_jobs` unless told otherwise), its
//! migrations, and a small pool of connections. It does not own the database, TLS (connections
//! are plain TCP or Unix sockets), or deciding when to claim: that is the dispatcher's.
//!
//! Schema and migrations: [`PostgresStore::connect`] creates the schema if missing and applies
//! the versioned migrations it lacks, recording each in `<schema>.schema_migrations`, all in one
//! transaction holding `pg_advisory_xact_lock` on a key derived from the schema name. Servers that
//! start together therefore migrate one after another, and the later ones find nothing to do.
//!
//! Rows have SQLite's shape and meaning: ids are UUIDv7 text (collation `"C"`, so they sort by
//! creation), times are [`Millis`], statuses are [`Status::code`]. Enqueue order is id order:
//! "priority, then run time, then enqueue order" is `ORDER BY priority, run_at, id`, served by
//! partial indexes on the pending rows (`status = 1`).
//!
//! Locking: every status change loads its rows `FOR UPDATE`, applies the pure function from
//! [`crate::machine`], and writes the rows back, in one transaction (READ COMMITTED). Claiming and
//! lease expiry select `FOR UPDATE SKIP LOCKED`, so they never wait and never see a row another
//! transaction holds. Acks, heartbeats and abandons lock their rows in id order (`ORDER BY id`),
//! cancel and retry lock one row, purge skips locked rows, and batch enqueues insert their keyed
//! rows in `(name, idempotency_key)` order; so no two transactions wait for each other in a cycle.
//! Idempotent enqueue is `INSERT … ON CONFLICT (name, idempotency_key) DO NOTHING`, then a read
//! of the winner's id, so two servers enqueueing the same key at once create one job.
//!
//! Batch calls (enqueue of many jobs, acks, heartbeats, several claim requests) are each one
//! transaction and a handful of round trips: rows are read and written with `= ANY($1)` and
//! `unnest($1, …)` arrays. A job that is missing or refuses its transition gets its own
//! [`JobError`] and does not abort the others; a database error fails the whole call.
//!
//! PostgreSQL text cannot hold NUL bytes. Error messages, abandon reasons and worker ids have
//! NULs replaced with U+FFFD; ids and names containing NUL match no row; a new job whose name,
//! queue or idempotency key contains NUL fails the enqueue call.
//!
//! Connections: a pool of at most [`PostgresOptions::pool_size`], opened on demand; a broken one
//! is dropped and replaced on the next call. Each connection's driver task is spawned on the
//! runtime that opened it and ends when its client is dropped (with the store) or the server
//! closes it. A call cancelled mid-transaction rolls back (the transaction's drop queues a
//! `ROLLBACK` ahead of anything the connection's next user sends).
//!
//! **Invariant:** two servers never run one attempt at once: a job is claimed by one server at a
//! time. A job leaves PENDING only in a claim that holds its row lock, re-checks `status = 1` on
//! the locked row (PostgreSQL re-evaluates the `WHERE` on the newest row version) and commits
//! RUNNING with the next attempt number. Every later ack, heartbeat and abandon is applied under
//! the same row lock and, when it names an attempt, only to that attempt (a worker still running
//! after its lease expired is the at-least-once case; its fenced ack is rejected as stale).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use gantry_runtime::retry::RetryPolicy;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, NoTls, Row, Statement, Transaction};

use super::{
    ClaimRequest, Enqueued, JobError, ListFilter, ListOrder, QueueLimits, Stats, Store, StoreError,
};
use super::{FireReport, ScheduleError, ScheduleFilter};
use crate::machine::{self, AckEffect, CancelEffect};
use crate::schedule::{NewSchedule, Schedule, ScheduleChange};

mod schedules;
use crate::model::{
    Ack, Job, JobOptions, MAX_PRIORITY, Millis, NewJob, Outcome, Status, backoff_name,
    parse_backoff,
};

/// The schema used when none is configured.
pub const DEFAULT_SCHEMA: &str = "gantry_jobs";
/// Connections a store opens at most, unless configured.
pub const DEFAULT_POOL_SIZE: usize = 8;
/// Most running jobs one [`Store::expire_leases`] call fails (the rest on the next call).
const EXPIRE_BATCH: i64 = 1000;
/// First key of the migration advisory lock (`"gjob"`); the second is a hash of the schema name.
const MIGRATION_LOCK: i32 = 0x676a_6f62;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of a [`PostgresStore`].
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// A libpq-style URL or key/value string, e.g. `postgres://gantry@db:5432/gantry`.
    pub url: String,
    /// The schema holding the tables: lowercase ASCII letters, digits and `_`, not starting with a
    /// digit, at most 63 bytes.
    pub schema: String,
    /// Most connections open at once (at least 1).
    pub pool_size: usize,
}

impl PostgresOptions {
    /// Defaults for the database at `url` and the schema `schema`.
    pub fn new(url: impl Into<String>, schema: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: schema.into(),
            pool_size: DEFAULT_POOL_SIZE,
        }
    }
}

/// Leaves the URL out: it may hold a password.
impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// The PostgreSQL job store. Cloning shares its connection pool.
///
/// ```no_run
/// use gantry_jobs::store::postgres::{DEFAULT_SCHEMA, PostgresStore};
/// use gantry_jobs::store::Store;
///
/// # async fn demo() -> Result<(), gantry_jobs::store::StoreError> {
/// let store = PostgresStore::connect("postgres://gantry@127.0.0.1:5432/gantry", DEFAULT_SCHEMA).await?;
/// let stats = store.stats().await?;
/// println!("{stats:?}");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    config: tokio_postgres::Config,
    /// The schema name, quoted for SQL.
    schema: String,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

fn db_err(e: tokio_postgres::Error) -> StoreError {
    use std::error::Error as _;
    StoreError::Database(match (e.as_db_error(), e.source()) {
        (Some(db), _) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    })
}

/// The statements a connection prepares once and keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Q {
    Insert,
    FindKeys,
    Get,
    LockOne,
    LockMany,
    Save,
    ClaimAny,
    ClaimNamed,
    Expire,
    Count,
    List { run_at: bool, ascending: bool },
    Stats,
    Purge,
    NextWakeup,
}

const COLUMNS: &str = "id, name, queue, priority, args, max_attempts, backoff, initial_delay_ms, \
    max_delay_ms, multiplier, jitter, timeout_ms, idempotency_key, status, attempt, error, result, \
    created_at, run_at, started_at, completed_at, lease_until, worker_id, cancel_requested, \
    attempt_base";

const LIST_FILTER: &str = "(cardinality($1::int4[]) = 0 OR status = ANY($1::int4[])) \
    AND (cardinality($2::text[]) = 0 OR name = ANY($2::text[])) \
    AND ($3::text IS NULL OR queue = $3::text)";

fn sql(s: &str, q: Q) -> String {
    match q {
        Q::Insert => format!(
            "INSERT INTO {s}.jobs (id, name, queue, priority, args, max_attempts, backoff, \
             initial_delay_ms, max_delay_ms, multiplier, jitter, timeout_ms, idempotency_key, \
             status, attempt, created_at, run_at) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int2[], $5::bytea[], \
             $6::int8[], $7::text[], $8::int8[], $9::int8[], $10::float8[], $11::float8[], \
             $12::int8[], $13::text[], $14::int4[], $15::int8[], $16::int8[], $17::int8[]) \
             ON CONFLICT (name, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
             RETURNING id"
        ),
        Q::FindKeys => format!(
            "SELECT j.name, j.idempotency_key, j.id FROM {s}.jobs j \
             JOIN unnest($1::text[], $2::text[]) AS k(name, key) \
             ON j.name = k.name AND j.idempotency_key = k.key"
        ),
        Q::Get => format!("SELECT {COLUMNS} FROM {s}.jobs WHERE id = $1"),
        Q::LockOne => format!("SELECT {COLUMNS} FROM {s}.jobs WHERE id = $1 FOR UPDATE"),
        Q::LockMany => format!(
            "SELECT {COLUMNS} FROM {s}.jobs WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
        ),
        Q::Save => format!(
            "UPDATE {s}.jobs AS j SET status = u.status, attempt = u.attempt, error = u.error, \
             result = u.result, run_at = u.run_at, started_at = u.started_at, \
             completed_at = u.completed_at, lease_until = u.lease_until, worker_id = u.worker_id, \
             cancel_requested = u.cancel_requested, attempt_base = u.attempt_base \
             FROM unnest($1::text[], $2::int4[], $3::int8[], $4::text[], $5::bytea[], $6::int8[], \
             $7::int8[], $8::int8[], $9::int8[], $10::text[], $11::bool[], $12::int8[]) \
             AS u(id, status, attempt, error, result, run_at, started_at, completed_at, \
             lease_until, worker_id, cancel_requested, attempt_base) \
             WHERE j.id = u.id"
        ),
        Q::ClaimAny => format!(
            "SELECT {COLUMNS} FROM {s}.jobs WHERE status = 1 AND run_at <= $1 \
             AND NOT (queue = ANY($3::text[])) \
             ORDER BY priority, run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
        ),
        // Each name's own index range, in claim order, merged: a deep backlog of other names
        // costs nothing. The per-name scans lock up to `limit` rows each; rows locked but not
        // taken stay pending and are released at commit (other servers skip them meanwhile,
        // later requests of this claim may take them).
        Q::ClaimNamed => format!(
            "SELECT {COLUMNS} FROM {s}.jobs WHERE id IN ( \
               SELECT c.id FROM (SELECT DISTINCT unnest($2::text[]) AS name) AS n \
               CROSS JOIN LATERAL ( \
                 SELECT j.id, j.priority, j.run_at FROM {s}.jobs AS j \
                 WHERE j.status = 1 AND j.name = n.name AND j.run_at <= $1 \
                 AND NOT (j.queue = ANY($4::text[])) \
                 ORDER BY j.priority, j.run_at, j.id LIMIT $3 FOR UPDATE SKIP LOCKED) AS c \
               ORDER BY c.priority, c.run_at, c.id LIMIT $3) \
             ORDER BY priority, run_at, id FOR UPDATE"
        ),
        Q::Expire => format!(
            "SELECT {COLUMNS} FROM {s}.jobs WHERE status = 2 AND lease_until <= $1 \
             ORDER BY lease_until LIMIT {EXPIRE_BATCH} FOR UPDATE SKIP LOCKED"
        ),
        Q::Count => format!("SELECT COUNT(*) FROM {s}.jobs WHERE {LIST_FILTER}"),
        Q::List { run_at, ascending } => {
            let column = if run_at { "run_at" } else { "created_at" };
            let direction = if ascending { "ASC" } else { "DESC" };
            format!(
                "SELECT {COLUMNS} FROM {s}.jobs WHERE {LIST_FILTER} \
                 ORDER BY {column} {direction}, id {direction} LIMIT $4 OFFSET $5"
            )
        }
        Q::Stats => format!("SELECT status, COUNT(*) FROM {s}.jobs GROUP BY status"),
        Q::Purge => format!(
            "DELETE FROM {s}.jobs WHERE id IN (SELECT id FROM {s}.jobs \
             WHERE completed_at IS NOT NULL AND completed_at < $1 AND status = ANY($2::int4[]) \
             FOR UPDATE SKIP LOCKED)"
        ),
        // One index probe per priority level instead of a scan of every pending job.
        Q::NextWakeup => format!(
            "SELECT LEAST( \
               (SELECT MIN(lease_until) FROM {s}.jobs WHERE status = 2), \
               (SELECT MIN(p.at) FROM generate_series(0, {MAX_PRIORITY}) AS g(priority) \
                CROSS JOIN LATERAL (SELECT MIN(run_at) AS at FROM {s}.jobs \
                  WHERE status = 1 AND priority = g.priority AND run_at > $1) AS p), \
               (SELECT MIN(next_run_at) FROM {s}.schedules \
                WHERE status = 1 AND next_run_at > $1))"
        ),
    }
}

/// Versioned migrations; `{schema}` is replaced by the quoted schema name. Never edit one that
/// has shipped: append a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE {schema}.jobs (
    id               TEXT COLLATE "C" PRIMARY KEY,
    name             TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    priority         SMALLINT NOT NULL,
    args             BYTEA   NOT NULL,
    max_attempts     BIGINT  NOT NULL,
    backoff          TEXT    NOT NULL,
    initial_delay_ms BIGINT  NOT NULL,
    max_delay_ms     BIGINT  NOT NULL,
    multiplier       DOUBLE PRECISION NOT NULL,
    jitter           DOUBLE PRECISION NOT NULL,
    timeout_ms       BIGINT  NOT NULL,
    idempotency_key  TEXT,
    status           INTEGER NOT NULL,
    attempt          BIGINT  NOT NULL,
    error            TEXT,
    result           BYTEA,
    created_at       BIGINT  NOT NULL,
    run_at           BIGINT  NOT NULL,
    started_at       BIGINT,
    completed_at     BIGINT,
    lease_until      BIGINT,
    worker_id        TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE UNIQUE INDEX jobs_idempotency ON {schema}.jobs (name, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_due_by_name ON {schema}.jobs (name, priority, run_at, id) WHERE status = 1;
CREATE INDEX jobs_due ON {schema}.jobs (priority, run_at, id) WHERE status = 1;
CREATE INDEX jobs_leases ON {schema}.jobs (lease_until) WHERE status = 2;
CREATE INDEX jobs_created ON {schema}.jobs (created_at);
CREATE INDEX jobs_finished ON {schema}.jobs (completed_at) WHERE completed_at IS NOT NULL;
CREATE INDEX jobs_status_name ON {schema}.jobs (status, name);
"#,
    r#"
ALTER TABLE {schema}.jobs ADD COLUMN attempt_base BIGINT NOT NULL DEFAULT 0;
"#,
    schedules::MIGRATION,
];

/// One pooled connection and the statements it has prepared.
struct Conn {
    client: Client,
    statements: HashMap<Q, Statement>,
}

/// A connection on loan; it goes back to the pool when dropped, unless it broke.
struct Pooled<'a> {
    conn: Option<Conn>,
    inner: &'a Inner,
    _permit: SemaphorePermit<'a>,
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        // A transaction dropped unfinished has already queued its ROLLBACK on this connection,
        // ahead of anything the next borrower sends.
        if let Some(conn) = self.conn.take().filter(|c| !c.client.is_closed()) {
            self.inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
        }
    }
}

impl Pooled<'_> {
    /// The client and a statement preparer, borrowed separately so a transaction can use both.
    fn parts(&mut self) -> Result<(&mut Client, Prepared<'_>), StoreError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(StoreError::Closed);
        };
        Ok((
            &mut conn.client,
            Prepared {
                cache: &mut conn.statements,
                schema: &self.inner.schema,
            },
        ))
    }
}

/// Prepares each [`Q`] once per connection.
struct Prepared<'a> {
    cache: &'a mut HashMap<Q, Statement>,
    schema: &'a str,
}

impl Prepared<'_> {
    async fn get(&mut self, client: &impl GenericClient, q: Q) -> Result<Statement, StoreError> {
        if let Some(s) = self.cache.get(&q) {
            return Ok(s.clone());
        }
        let statement = client.prepare(&sql(self.schema, q)).await.map_err(db_err)?;
        self.cache.insert(q, statement.clone());
        Ok(statement)
    }
}

/// Checks a schema name and returns it quoted for SQL.
fn quote_schema(schema: &str) -> Result<String, StoreError> {
    let mut chars = schema.chars();
    let valid = schema.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(format!("\"{schema}\""))
    } else {
        Err(StoreError::Database(format!(
            "invalid schema name {schema:?}: use lowercase ASCII letters, digits and _, \
             not starting with a digit, at most 63 bytes"
        )))
    }
}

impl PostgresStore {
    /// Connects to the database at `url`, creating and migrating `schema` if needed, with a pool
    /// of [`DEFAULT_POOL_SIZE`] connections.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, StoreError> {
        Self::open(PostgresOptions::new(url, schema)).await
    }

    /// Connects with explicit options; see [`PostgresStore::connect`].
    pub async fn open(options: PostgresOptions) -> Result<Self, StoreError> {
        let schema = quote_schema(&options.schema)?;
        let mut config: tokio_postgres::Config = options
            .url
            .parse()
            .map_err(|e| StoreError::Database(format!("invalid postgres url: {e}")))?;
        if config.get_application_name().is_none() {
            config.application_name("gantry-jobs");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        let store = Self {
            inner: std::sync::Arc::new(Inner {
                config,
                schema,
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(options.pool_size.max(1)),
            }),
        };
        let mut conn = store.conn().await?;
        let (client, _) = conn.parts()?;
        migrate(client, &options.schema, &store.inner.schema).await?;
        drop(conn);
        Ok(store)
    }

    async fn conn(&self) -> Result<Pooled<'_>, StoreError> {
        let inner = &*self.inner;
        let permit = inner
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let idle = {
            let mut idle = inner.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.retain(|c| !c.client.is_closed());
            idle.pop()
        };
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let (client, connection) = inner.config.connect(NoTls).await.map_err(db_err)?;
                // The task ends when the client is dropped (the pool or the store goes away) or
                // the server closes the connection.
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!(error = %e, "postgres connection of the job store failed");
                    }
                });
                Conn {
                    client,
                    statements: HashMap::new(),
                }
            }
        };
        Ok(Pooled {
            conn: Some(conn),
            inner,
            _permit: permit,
        })
    }
}

async fn migrate(client: &mut Client, name: &str, schema: &str) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(db_err)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&MIGRATION_LOCK, &name],
    )
    .await
    .map_err(db_err)?;
    let exists = tx
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&name])
        .await
        .map_err(db_err)?
        .is_some();
    if !exists {
        tx.batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .map_err(db_err)?;
    }
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (\
           version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    ))
    .await
    .map_err(db_err)?;
    let version: i32 = tx
        .query_one(
            &format!("SELECT COALESCE(MAX(version), 0) FROM {schema}.schema_migrations"),
            &[],
        )
        .await
        .map_err(db_err)?
        .try_get(0)
        .map_err(db_err)?;
    let known = MIGRATIONS.len();
    let version = usize::try_from(version).unwrap_or(0);
    if version > known {
        return Err(StoreError::Database(format!(
            "schema {schema} is at version {version}, newer than this gantry ({known}); upgrade gantry"
        )));
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.batch_execute(&migration.replace("{schema}", schema))
            .await
            .map_err(db_err)?;
        let v = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute(
            &format!("INSERT INTO {schema}.schema_migrations (version) VALUES ($1)"),
            &[&v],
        )
        .await
        .map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)
}

/// PostgreSQL text cannot hold NUL: free-form text gets U+FFFD instead.
fn pg_text(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{fffd}")
    } else {
        s
    }
}

/// True when `s` can be stored in (and so compared with) a text column.
fn storable(s: &str) -> bool {
    !s.contains('\0')
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Column `i` of a row, with the database error mapped.
fn get<'a, T: tokio_postgres::types::FromSql<'a>>(r: &'a Row, i: usize) -> Result<T, StoreError> {
    r.try_get(i).map_err(db_err)
}

fn row_to_job(r: &Row) -> Result<Job, StoreError> {
    let id: String = get(r, 0)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        id: id.clone(),
        reason,
    };
    let backoff: String = get(r, 6)?;
    let backoff =
        parse_backoff(&backoff).ok_or_else(|| corrupt(format!("unknown backoff {backoff}")))?;
    let status: i32 = get(r, 13)?;
    let status =
        Status::from_code(status).ok_or_else(|| corrupt(format!("unknown status {status}")))?;
    let priority: i16 = get(r, 3)?;
    let priority =
        u8::try_from(priority).map_err(|_| corrupt(format!("priority {priority} out of range")))?;
    let max_attempts: i64 = get(r, 5)?;
    let max_attempts = u32::try_from(max_attempts)
        .map_err(|_| corrupt(format!("max_attempts {max_attempts} out of range")))?;
    let attempt: i64 = get(r, 14)?;
    let attempt =
        u32::try_from(attempt).map_err(|_| corrupt(format!("attempt {attempt} out of range")))?;
    let ms = |v: i64| Duration::from_millis(u64::try_from(v).unwrap_or(0));
    let retry = RetryPolicy::builder()
        .max_attempts(max_attempts)
        .backoff(backoff)
        .initial_delay(ms(get(r, 7)?))
        .max_delay(ms(get(r, 8)?))
        .multiplier(get(r, 9)?)
        .jitter(get(r, 10)?)
        .build()
        .map_err(|e| corrupt(e.to_string()))?;
    Ok(Job {
        name: get(r, 1)?,
        queue: get(r, 2)?,
        priority,
        args: get(r, 4)?,
        options: JobOptions {
            retry,
            timeout: ms(get(r, 11)?),
        },
        idempotency_key: get(r, 12)?,
        status,
        attempt,
        error: get(r, 15)?,
        result: get(r, 16)?,
        created_at: get(r, 17)?,
        run_at: get(r, 18)?,
        started_at: get(r, 19)?,
        completed_at: get(r, 20)?,
        lease_until: get(r, 21)?,
        worker_id: get(r, 22)?,
        cancel_requested: get(r, 23)?,
        attempt_base: {
            let base: i64 = get(r, 24)?;
            u32::try_from(base).map_err(|_| corrupt(format!("attempt_base {base} out of range")))?
        },
        id,
    })
}

fn rows_to_jobs(rows: &[Row]) -> Result<Vec<Job>, StoreError> {
    rows.iter().map(row_to_job).collect()
}

/// Loads and locks the jobs with these ids, in id order, keyed by id.
async fn lock_many(
    tx: &Transaction<'_>,
    prepared: &mut Prepared<'_>,
    ids: impl IntoIterator<Item = &str>,
) -> Result<HashMap<String, Job>, StoreError> {
    let ids: Vec<&str> = ids.into_iter().filter(|id| storable(id)).collect();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let statement = prepared.get(tx, Q::LockMany).await?;
    let rows = tx.query(&statement, &[&ids]).await.map_err(db_err)?;
    rows.iter()
        .map(|r| row_to_job(r).map(|j| (j.id.clone(), j)))
        .collect()
}

async fn lock_one(
    tx: &Transaction<'_>,
    prepared: &mut Prepared<'_>,
    id: &str,
) -> Result<Option<Job>, StoreError> {
    if !storable(id) {
        return Ok(None);
    }
    let statement = prepared.get(tx, Q::LockOne).await?;
    tx.query_opt(&statement, &[&id])
        .await
        .map_err(db_err)?
        .as_ref()
        .map(row_to_job)
        .transpose()
}

/// Writes back the fields a transition may change, for every job in one statement.
async fn save(
    tx: &Transaction<'_>,
    prepared: &mut Prepared<'_>,
    jobs: &[&Job],
) -> Result<(), StoreError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let n = jobs.len();
    let mut id = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut attempt = Vec::with_capacity(n);
    let mut error = Vec::with_capacity(n);
    let mut result = Vec::with_capacity(n);
    let mut run_at = Vec::with_capacity(n);
    let mut started_at = Vec::with_capacity(n);
    let mut completed_at = Vec::with_capacity(n);
    let mut lease_until = Vec::with_capacity(n);
    let mut worker_id = Vec::with_capacity(n);
    let mut cancel_requested = Vec::with_capacity(n);
    let mut attempt_base = Vec::with_capacity(n);
    for job in jobs {
        id.push(job.id.as_str());
        status.push(job.status.code());
        attempt.push(i64::from(job.attempt));
        error.push(job.error.as_deref());
        result.push(job.result.as_deref());
        run_at.push(job.run_at);
        started_at.push(job.started_at);
        completed_at.push(job.completed_at);
        lease_until.push(job.lease_until);
        worker_id.push(job.worker_id.as_deref());
        cancel_requested.push(job.cancel_requested);
        attempt_base.push(i64::from(job.attempt_base));
    }
    let statement = prepared.get(tx, Q::Save).await?;
    let params: [&(dyn ToSql + Sync); 12] = [
        &id,
        &status,
        &attempt,
        &error,
        &result,
        &run_at,
        &started_at,
        &completed_at,
        &lease_until,
        &worker_id,
        &cancel_requested,
        &attempt_base,
    ];
    let updated = tx.execute(&statement, &params).await.map_err(db_err)?;
    if updated != n as u64 {
        return Err(StoreError::Database(format!(
            "saved {updated} of {n} locked jobs: rows vanished under a lock"
        )));
    }
    Ok(())
}

/// Tracks which loaded jobs a batch changed, in first-change order.
#[derive(Default)]
struct Changed {
    seen: HashSet<String>,
    order: Vec<String>,
}

impl Changed {
    fn mark(&mut self, id: &str) {
        if self.seen.insert(id.to_owned()) {
            self.order.push(id.to_owned());
        }
    }

    async fn save(
        &self,
        tx: &Transaction<'_>,
        prepared: &mut Prepared<'_>,
        jobs: &HashMap<String, Job>,
    ) -> Result<(), StoreError> {
        let jobs: Vec<&Job> = self.order.iter().filter_map(|id| jobs.get(id)).collect();
        save(tx, prepared, &jobs).await
    }
}

async fn enqueue(
    tx: &Transaction<'_>,
    prepared: &mut Prepared<'_>,
    jobs: Vec<NewJob>,
    now: Millis,
) -> Result<Vec<Enqueued>, StoreError> {
    let jobs: Vec<Job> = jobs
        .into_iter()
        .map(|new| Job::create(uuid::Uuid::now_v7().to_string(), new, now))
        .collect();
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    for job in &jobs {
        let bad = [
            Some(&job.name),
            Some(&job.queue),
            job.idempotency_key.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(|s| !storable(s));
        if bad {
            return Err(StoreError::Database(format!(
                "job {:?} has a NUL byte in its name, queue or idempotency key, which \
                 PostgreSQL text cannot hold",
                job.name
            )));
        }
    }
    // Keyed rows go in (name, key) order so that two batches with the same keys wait for each
    // other in one direction only; a stable sort keeps the first of a batch's duplicates first.
    // Claim order does not depend on this: it follows the ids, made in batch order.
    let mut order: Vec<&Job> = jobs.iter().collect();
    order.sort_by(|a, b| {
        (a.idempotency_key.is_some(), &a.name, &a.idempotency_key).cmp(&(
            b.idempotency_key.is_some(),
            &b.name,
            &b.idempotency_key,
        ))
    });
    let n = order.len();
    let mut c_id = Vec::with_capacity(n);
    let mut c_name = Vec::with_capacity(n);
    let mut c_queue = Vec::with_capacity(n);
    let mut c_priority = Vec::with_capacity(n);
    let mut c_args = Vec::with_capacity(n);
    let mut c_max_attempts = Vec::with_capacity(n);
    let mut c_backoff = Vec::with_capacity(n);
    let mut c_initial = Vec::with_capacity(n);
    let mut c_max_delay = Vec::with_capacity(n);
    let mut c_multiplier = Vec::with_capacity(n);
    let mut c_jitter = Vec::with_capacity(n);
    let mut c_timeout = Vec::with_capacity(n);
    let mut c_key = Vec::with_capacity(n);
    let mut c_status = Vec::with_capacity(n);
    let mut c_attempt = Vec::with_capacity(n);
    let mut c_created = Vec::with_capacity(n);
    let mut c_run_at = Vec::with_capacity(n);
    for job in &order {
        let retry = &job.options.retry;
        c_id.push(job.id.as_str());
        c_name.push(job.name.as_str());
        c_queue.push(job.queue.as_str());
        c_priority.push(i16::from(job.priority));
        c_args.push(job.args.as_slice());
        c_max_attempts.push(i64::from(retry.max_attempts()));
        c_backoff.push(backoff_name(retry.backoff()));
        c_initial.push(millis(retry.initial_delay()));
        c_max_delay.push(millis(retry.max_delay()));
        c_multiplier.push(retry.multiplier());
        c_jitter.push(retry.jitter());
        c_timeout.push(millis(job.options.timeout));
        c_key.push(job.idempotency_key.as_deref());
        c_status.push(job.status.code());
        c_attempt.push(i64::from(job.attempt));
        c_created.push(job.created_at);
        c_run_at.push(job.run_at);
    }
    let params: [&(dyn ToSql + Sync); 17] = [
        &c_id,
        &c_name,
        &c_queue,
        &c_priority,
        &c_args,
        &c_max_attempts,
        &c_backoff,
        &c_initial,
        &c_max_delay,
        &c_multiplier,
        &c_jitter,
        &c_timeout,
        &c_key,
        &c_status,
        &c_attempt,
        &c_created,
        &c_run_at,
    ];
    let statement = prepared.get(tx, Q::Insert).await?;
    let inserted: HashSet<String> = tx
        .query(&statement, &params)
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| r.try_get::<_, String>(0).map_err(db_err))
        .collect::<Result<_, _>>()?;
    // Every job not inserted lost to an existing (name, key): read the winners' ids. This
    // statement sees rows committed by others while we waited on the unique index.
    let (names, keys): (Vec<&str>, Vec<&str>) = jobs
        .iter()
        .filter(|j| !inserted.contains(&j.id))
        .filter_map(|j| Some((j.name.as_str(), j.idempotency_key.as_deref()?)))
        .unzip();
    let mut winners: HashMap<(String, String), String> = HashMap::new();
    if !names.is_empty() {
        let statement = prepared.get(tx, Q::FindKeys).await?;
        for row in tx
            .query(&statement, &[&names, &keys])
            .await
            .map_err(db_err)?
        {
            let name: String = row.try_get(0).map_err(db_err)?;
            let key: String = row.try_get(1).map_err(db_err)?;
            let id: String = row.try_get(2).map_err(db_err)?;
            winners.insert((name, key), id);
        }
    }
    jobs.into_iter()
        .map(|job| {
            if inserted.contains(&job.id) {
                return Ok(Enqueued {
                    id: job.id,
                    deduplicated: false,
                });
            }
            let winner = job
                .idempotency_key
                .and_then(|key| winners.get(&(job.name.clone(), key)).cloned());
            match winner {
                Some(id) => Ok(Enqueued {
                    id,
                    deduplicated: true,
                }),
                None => Err(StoreError::Database(format!(
                    "job {} was neither inserted nor deduplicated (its twin was deleted \
                     meanwhile); enqueue again",
                    job.id
                ))),
            }
        })
        .collect()
}

async fn claim(
    tx: &Transaction<'_>,
    prepared: &mut Prepared<'_>,
    requests: Vec<ClaimRequest>,
    limits: &QueueLimits,
    now: Millis,
) -> Result<Vec<Vec<Job>>, StoreError> {
    let schema = prepared.schema.to_owned();
    // Free slots of every limited queue. Claims on limited queues are serialised across servers
    // by a transaction-scoped advisory lock per queue (taken in name order, so never in a cycle),
    // so two servers cannot both see the last free slot.
    let mut free: BTreeMap<String, u32> = BTreeMap::new();
    if !limits.is_empty() {
        let queues: Vec<&str> = limits.keys().map(String::as_str).collect();
        for queue in &queues {
            let key = format!("gantry_jobs_queue:{schema}:{queue}");
            tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&key])
                .await
                .map_err(db_err)?;
        }
        let rows = tx
            .query(
                &format!(
                    "SELECT queue, COUNT(*) FROM {schema}.jobs WHERE status = 2 \
                     AND queue = ANY($1::text[]) GROUP BY queue"
                ),
                &[&queues],
            )
            .await
            .map_err(db_err)?;
        let mut running: HashMap<String, i64> = HashMap::new();
        for row in rows {
            running.insert(
                row.try_get(0).map_err(db_err)?,
                row.try_get(1).map_err(db_err)?,
            );
        }
        for (queue, &limit) in limits.iter() {
            let used = u32::try_from(running.get(queue).copied().unwrap_or(0)).unwrap_or(u32::MAX);
            free.insert(queue.clone(), limit.saturating_sub(used));
        }
    }
    let mut out = Vec::with_capacity(requests.len());
    for req in requests {
        let names: Vec<&str> = req
            .names
            .iter()
            .map(String::as_str)
            .filter(|n| storable(n))
            .collect();
        // Names that cannot be stored match nothing; dropping all of them must not mean "any".
        if req.limit == 0 || (names.is_empty() && !req.names.is_empty()) {
            out.push(Vec::new());
            continue;
        }
        let worker = pg_text(req.worker_id);
        let mut taken: Vec<Job> = Vec::new();
        // Candidates from a queue that fills up are skipped; look again without that queue
        // until the request is full or nothing more is due.
        while taken.len() < req.limit {
            let excluded: Vec<&str> = free
                .iter()
                .filter(|(_, n)| **n == 0)
                .map(|(q, _)| q.as_str())
                .collect();
            let limit = to_i64(req.limit - taken.len());
            let rows = if names.is_empty() {
                let statement = prepared.get(tx, Q::ClaimAny).await?;
                tx.query(&statement, &[&now, &limit, &excluded]).await
            } else {
                let statement = prepared.get(tx, Q::ClaimNamed).await?;
                tx.query(&statement, &[&now, &names, &limit, &excluded])
                    .await
            }
            .map_err(db_err)?;
            let candidates = rows_to_jobs(&rows)?;
            if candidates.is_empty() {
                break;
            }
            let mut skipped = false;
            let mut jobs = Vec::with_capacity(candidates.len());
            for mut job in candidates {
                if let Some(n) = free.get_mut(&job.queue) {
                    if *n == 0 {
                        skipped = true;
                        continue;
                    }
                    *n -= 1;
                }
                machine::claim(&mut job, &worker, now).map_err(|e| {
                    StoreError::Database(format!("claim of a due job refused: {e}"))
                })?;
                jobs.push(job);
            }
            save(tx, prepared, &jobs.iter().collect::<Vec<_>>()).await?;
            taken.extend(jobs);
            if !skipped {
                break;
            }
        }
        out.push(taken);
    }
    Ok(out)
}

async fn ack(
    tx: &Transaction<'_>,
    prepared: &mut Prepared<'_>,
    acks: Vec<Ack>,
    now: Millis,
) -> Result<Vec<Result<(Job, AckEffect), JobError>>, StoreError> {
    let mut jobs = lock_many(tx, prepared, acks.iter().map(|a| a.job_id.as_str())).await?;
    let mut changed = Changed::default();
    let mut out = Vec::with_capacity(acks.len());
    for a in acks {
        let Some(job) = jobs.get_mut(&a.job_id) else {
            out.push(Err(JobError::NotFound(a.job_id)));
            continue;
        };
        let outcome = match a.outcome {
            Outcome::Failure { error, retry } => Outcome::Failure {
                error: pg_text(error),
                retry,
            },
            Outcome::RetryAfter { error, after_ms } => Outcome::RetryAfter {
                error: pg_text(error),
                after_ms,
            },
            Outcome::Defer { error, after_ms } => Outcome::Defer {
                error: pg_text(error),
                after_ms,
            },
            success => success,
        };
        match machine::ack(job, a.attempt, outcome, now, rand::random::<f64>()) {
            Ok(effect) => {
                changed.mark(&job.id);
                out.push(Ok((job.clone(), effect)));
            }
            Err(r) => out.push(Err(r.into())),
        }
    }
    changed.save(tx, prepared, &jobs).await?;
    Ok(out)
}

async fn abandon(
    tx: &Transaction<'_>,
    prepared: &mut Prepared<'_>,
    attempts: Vec<(String, u32)>,
    reason: &str,
    now: Millis,
) -> Result<Vec<(Job, AckEffect)>, StoreError> {
    let mut jobs = lock_many(tx, prepared, attempts.iter().map(|(id, _)| id.as_str())).await?;
    let mut changed = Changed::default();
    let mut out = Vec::new();
    for (id, attempt) in attempts {
        let Some(job) = jobs.get_mut(&id) else {
            continue;
        };
        if job.status != Status::Running || job.attempt != attempt {
            continue;
        }
        if let Ok(effect) = machine::abandon(job, reason, now) {
            changed.mark(&job.id);
            out.push((job.clone(), effect));
        }
    }
    changed.save(tx, prepared, &jobs).await?;
    Ok(out)
}

async fn expire(
    tx: &Transaction<'_>,
    prepared: &mut Prepared<'_>,
    now: Millis,
) -> Result<Vec<(Job, AckEffect)>, StoreError> {
    let statement = prepared.get(tx, Q::Expire).await?;
    let rows = tx.query(&statement, &[&now]).await.map_err(db_err)?;
    let mut out = Vec::with_capacity(rows.len());
    for mut job in rows_to_jobs(&rows)? {
        if let Ok(effect) = machine::expire(&mut job, now, rand::random::<f64>()) {
            out.push((job, effect));
        }
    }
    save(
        tx,
        prepared,
        &out.iter().map(|(j, _)| j).collect::<Vec<_>>(),
    )
    .await?;
    Ok(out)
}

async fn heartbeat(
    tx: &Transaction<'_>,
    prepared: &mut Prepared<'_>,
    beats: Vec<(String, Option<u32>)>,
    extend: Option<Duration>,
    now: Millis,
) -> Result<Vec<Result<Millis, JobError>>, StoreError> {
    let mut jobs = lock_many(tx, prepared, beats.iter().map(|(id, _)| id.as_str())).await?;
    let mut changed = Changed::default();
    let mut out = Vec::with_capacity(beats.len());
    for (id, attempt) in beats {
        let Some(job) = jobs.get_mut(&id) else {
            out.push(Err(JobError::NotFound(id)));
            continue;
        };
        match machine::heartbeat(job, attempt, extend, now) {
            Ok(until) => {
                changed.mark(&job.id);
                out.push(Ok(until));
            }
            Err(r) => out.push(Err(r.into())),
        }
    }
    changed.save(tx, prepared, &jobs).await?;
    Ok(out)
}

/// Runs `f` in one transaction on a pooled connection and commits if it succeeded.
macro_rules! in_transaction {
    ($store:expr, |$tx:ident, $prepared:ident| $body:expr) => {{
        let mut conn = $store.conn().await?;
        let (client, mut $prepared) = conn.parts()?;
        let $tx = client.transaction().await.map_err(db_err)?;
        let value = { $body }?;
        $tx.commit().await.map_err(db_err)?;
        Ok(value)
    }};
}

impl PostgresStore {
    /// Enqueues `jobs` and runs `also` in the same transaction: both commit, or neither does.
    /// This is how another system sharing the database hands work to the jobs engine exactly
    /// once — the observer enqueues the actions of a batch of events and advances its checkpoint
    /// in one commit. An error from `also` rolls the enqueue back.
    pub async fn enqueue_with<T, E: From<StoreError>>(
        &self,
        jobs: Vec<NewJob>,
        now: Millis,
        also: impl AsyncFnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<(Vec<Enqueued>, T), E> {
        let mut conn = self.conn().await?;
        let (client, mut prepared) = conn.parts()?;
        let tx = client.transaction().await.map_err(db_err)?;
        let enqueued = if jobs.is_empty() {
            Vec::new()
        } else {
            enqueue(&tx, &mut prepared, jobs, now).await?
        };
        let value = also(&tx).await?;
        tx.commit().await.map_err(db_err)?;
        Ok((enqueued, value))
    }

    /// Deletes a finished job (SUCCESS, DEAD or CANCELLED) and returns it; a job still
    /// PENDING or RUNNING is refused (cancel it first).
    pub async fn remove_finished(&self, id: String) -> Result<Result<Job, JobError>, StoreError> {
        if !storable(&id) {
            return Ok(Err(JobError::NotFound(id)));
        }
        let schema = self.inner.schema.clone();
        in_transaction!(self, |tx, prepared| {
            match lock_one(&tx, &mut prepared, &id).await? {
                None => Ok::<_, StoreError>(Err(JobError::NotFound(id))),
                Some(job) if !job.status.is_terminal() => Ok(Err(JobError::Rejected(
                    crate::machine::Rejection::WrongStatus {
                        status: job.status,
                        expected: "SUCCESS, DEAD or CANCELLED",
                    },
                ))),
                Some(job) => {
                    tx.execute(&format!("DELETE FROM {schema}.jobs WHERE id = $1"), &[&id])
                        .await
                        .map_err(db_err)?;
                    Ok(Ok(job))
                }
            }
        })
    }

    /// The job named `name` with idempotency key `key`, if there is one.
    pub async fn get_by_key(&self, name: &str, key: &str) -> Result<Option<Job>, StoreError> {
        if !storable(name) || !storable(key) {
            return Ok(None);
        }
        let mut conn = self.conn().await?;
        let (client, _) = conn.parts()?;
        client
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM {}.jobs WHERE name = $1 AND idempotency_key = $2",
                    self.inner.schema
                ),
                &[&name, &key],
            )
            .await
            .map_err(db_err)?
            .as_ref()
            .map(row_to_job)
            .transpose()
    }

    /// Jobs of `status` in `queue`, counted by name.
    pub async fn count_by_name(
        &self,
        queue: &str,
        status: Status,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let mut conn = self.conn().await?;
        let (client, _) = conn.parts()?;
        let rows = client
            .query(
                &format!(
                    "SELECT name, count(*) FROM {}.jobs WHERE queue = $1 AND status = $2 \
                     GROUP BY name ORDER BY name",
                    self.inner.schema
                ),
                &[&queue, &status.code()],
            )
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let n: i64 = r.try_get(1).map_err(db_err)?;
                Ok((r.try_get(0).map_err(db_err)?, u64::try_from(n).unwrap_or(0)))
            })
            .collect()
    }
}

impl Store for PostgresStore {
    async fn enqueue(&self, jobs: Vec<NewJob>, now: Millis) -> Result<Vec<Enqueued>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        in_transaction!(self, |tx, prepared| enqueue(&tx, &mut prepared, jobs, now)
            .await)
    }

    async fn claim(
        &self,
        requests: Vec<ClaimRequest>,
        limits: QueueLimits,
        now: Millis,
    ) -> Result<Vec<Vec<Job>>, StoreError> {
        if requests.iter().all(|r| r.limit == 0) {
            return Ok(requests.iter().map(|_| Vec::new()).collect());
        }
        in_transaction!(self, |tx, prepared| claim(
            &tx,
            &mut prepared,
            requests,
            &limits,
            now
        )
        .await)
    }

    async fn ack(
        &self,
        acks: Vec<Ack>,
        now: Millis,
    ) -> Result<Vec<Result<(Job, AckEffect), JobError>>, StoreError> {
        in_transaction!(self, |tx, prepared| ack(&tx, &mut prepared, acks, now)
            .await)
    }

    async fn abandon(
        &self,
        attempts: Vec<(String, u32)>,
        reason: String,
        now: Millis,
    ) -> Result<Vec<(Job, AckEffect)>, StoreError> {
        let reason = pg_text(reason);
        in_transaction!(self, |tx, prepared| {
            abandon(&tx, &mut prepared, attempts, &reason, now).await
        })
    }

    async fn expire_leases(&self, now: Millis) -> Result<Vec<(Job, AckEffect)>, StoreError> {
        in_transaction!(self, |tx, prepared| expire(&tx, &mut prepared, now).await)
    }

    async fn heartbeat(
        &self,
        beats: Vec<(String, Option<u32>)>,
        extend: Option<Duration>,
        now: Millis,
    ) -> Result<Vec<Result<Millis, JobError>>, StoreError> {
        in_transaction!(self, |tx, prepared| {
            heartbeat(&tx, &mut prepared, beats, extend, now).await
        })
    }

    async fn cancel(
        &self,
        id: String,
        now: Millis,
    ) -> Result<Result<(Job, CancelEffect), JobError>, StoreError> {
        in_transaction!(self, |tx, prepared| {
            match lock_one(&tx, &mut prepared, &id).await? {
                None => Ok::<_, StoreError>(Err(JobError::NotFound(id))),
                Some(mut job) => {
                    let effect = machine::cancel(&mut job, now);
                    if !matches!(effect, CancelEffect::AlreadyFinished(_)) {
                        save(&tx, &mut prepared, &[&job]).await?;
                    }
                    Ok(Ok((job, effect)))
                }
            }
        })
    }

    async fn retry(&self, id: String, now: Millis) -> Result<Result<Job, JobError>, StoreError> {
        in_transaction!(self, |tx, prepared| {
            match lock_one(&tx, &mut prepared, &id).await? {
                None => Ok::<_, StoreError>(Err(JobError::NotFound(id))),
                Some(mut job) => match machine::retry(&mut job, now) {
                    Ok(()) => {
                        save(&tx, &mut prepared, &[&job]).await?;
                        Ok(Ok(job))
                    }
                    Err(r) => Ok(Err(r.into())),
                },
            }
        })
    }

    async fn get(&self, id: String) -> Result<Option<Job>, StoreError> {
        if !storable(&id) {
            return Ok(None);
        }
        let mut conn = self.conn().await?;
        let (client, mut prepared) = conn.parts()?;
        let statement = prepared.get(&*client, Q::Get).await?;
        client
            .query_opt(&statement, &[&id])
            .await
            .map_err(db_err)?
            .as_ref()
            .map(row_to_job)
            .transpose()
    }

    async fn list(&self, filter: ListFilter) -> Result<(Vec<Job>, u64), StoreError> {
        let statuses: Vec<i32> = filter.statuses.iter().map(|s| s.code()).collect();
        let names: Vec<&str> = filter
            .names
            .iter()
            .map(String::as_str)
            .filter(|n| storable(n))
            .collect();
        if names.is_empty() && !filter.names.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let mut conn = self.conn().await?;
        let (client, mut prepared) = conn.parts()?;
        let client = &*client;
        let count = prepared.get(client, Q::Count).await?;
        let page = prepared
            .get(
                client,
                Q::List {
                    run_at: filter.order_by == ListOrder::RunAt,
                    ascending: filter.ascending,
                },
            )
            .await?;
        let limit = to_i64(filter.limit);
        let offset = to_i64(filter.offset);
        // Both go out at once on the one connection (pipelined).
        let queue = filter.queue.as_deref();
        let count_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&statuses, &names, &queue];
        let page_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&statuses, &names, &queue, &limit, &offset];
        let (total, rows) = tokio::try_join!(
            client.query_one(&count, &count_params),
            client.query(&page, &page_params),
        )
        .map_err(db_err)?;
        let total: i64 = total.try_get(0).map_err(db_err)?;
        Ok((rows_to_jobs(&rows)?, u64::try_from(total).unwrap_or(0)))
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        let mut conn = self.conn().await?;
        let (client, mut prepared) = conn.parts()?;
        let statement = prepared.get(&*client, Q::Stats).await?;
        let mut counts: HashMap<i32, u64> = HashMap::new();
        for row in client.query(&statement, &[]).await.map_err(db_err)? {
            let status: i32 = row.try_get(0).map_err(db_err)?;
            let n: i64 = row.try_get(1).map_err(db_err)?;
            counts.insert(status, u64::try_from(n).unwrap_or(0));
        }
        Ok(Stats {
            by_status: Status::ALL
                .iter()
                .map(|&s| (s, counts.get(&s.code()).copied().unwrap_or(0)))
                .collect(),
        })
    }

    async fn purge(&self, before: Millis, statuses: Vec<Status>) -> Result<u64, StoreError> {
        let statuses: Vec<i32> = if statuses.is_empty() {
            Status::ALL.to_vec()
        } else {
            statuses
        }
        .into_iter()
        .filter(|s| s.is_terminal())
        .map(Status::code)
        .collect();
        if statuses.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        let (client, mut prepared) = conn.parts()?;
        let statement = prepared.get(&*client, Q::Purge).await?;
        client
            .execute(&statement, &[&before, &statuses])
            .await
            .map_err(db_err)
    }

    async fn next_wakeup(&self, now: Millis) -> Result<Option<Millis>, StoreError> {
        let mut conn = self.conn().await?;
        let (client, mut prepared) = conn.parts()?;
        let statement = prepared.get(&*client, Q::NextWakeup).await?;
        client
            .query_one(&statement, &[&now])
            .await
            .map_err(db_err)?
            .try_get(0)
            .map_err(db_err)
    }

    async fn create_schedule(
        &self,
        new: NewSchedule,
        now: Millis,
    ) -> Result<Result<Schedule, ScheduleError>, StoreError> {
        let schema = self.inner.schema.clone();
        in_transaction!(self, |tx, _prepared| {
            schedules::create(&tx, &schema, new, now).await
        })
    }

    async fn get_schedule(&self, id_or_name: String) -> Result<Option<Schedule>, StoreError> {
        let mut conn = self.conn().await?;
        let (client, _) = conn.parts()?;
        schedules::load(&*client, &self.inner.schema, &id_or_name, false).await
    }

    async fn list_schedules(
        &self,
        filter: ScheduleFilter,
    ) -> Result<(Vec<Schedule>, u64), StoreError> {
        let mut conn = self.conn().await?;
        let (client, _) = conn.parts()?;
        schedules::list(&*client, &self.inner.schema, &filter).await
    }

    async fn change_schedule(
        &self,
        id_or_name: String,
        change: ScheduleChange,
        now: Millis,
    ) -> Result<Result<Schedule, ScheduleError>, StoreError> {
        let schema = self.inner.schema.clone();
        in_transaction!(self, |tx, _prepared| {
            schedules::change(&tx, &schema, id_or_name, change, now).await
        })
    }

    async fn fire_due_schedules(
        &self,
        now: Millis,
        limit: usize,
    ) -> Result<FireReport, StoreError> {
        in_transaction!(self, |tx, prepared| {
            schedules::fire_due(&tx, &mut prepared, now, limit).await
        })
    }
}
