//! The commit-safe cursor over the change log.
//!
//! Change-log ids are allocated when a row is written but become visible when its transaction
//! commits, so a plain `id > last` cursor skips a row whose transaction commits after a later id
//! was read. This cursor cuts the log by transaction instead, as PgQ does: every row carries
//! its writer's `xid8`, and at each cut the reader takes the oldest transaction id still running
//! (`pg_snapshot_xmin(pg_current_snapshot())`, the *horizon*). Every transaction below the
//! horizon has finished, so the rows written by transactions in `[previous horizon, horizon)`
//! form a closed set: nothing can be added to it later. The reader delivers that set in id order
//! (in pages of `limit`, tracked by `last_id`), then moves to the next range.
//!
//! A [`Position`] `(lo, hi, last_id)` says: every row with `xid < lo` is delivered, and of the
//! rows with `lo <= xid < hi` those with `id <= last_id` are. Saved in the same transaction as
//! whatever the batch was handed to, it makes delivery exactly once per observer set: a row is in
//! exactly one range and, within it, passed exactly once. Design note: `docs/observer-capture.md`.
//!
//! The price: a long-running transaction holds the horizon back, and every change committed
//! after it waits until it ends (or rolls back). [`Capture::lag`] measures it.

use tokio_postgres::{Client, GenericClient, IsolationLevel};

use crate::config::EventType;
use crate::{Error, ident};

/// One captured row change.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Its change-log id (unique, increasing in write order).
    pub id: i64,
    /// The writing transaction.
    pub xid: u64,
    /// The table (`orders`, or `schema.table` outside `public`).
    pub entity: String,
    /// The operation.
    pub op: EventType,
    /// The row before (UPDATE, DELETE).
    pub before: Option<serde_json::Value>,
    /// The row after (INSERT, UPDATE).
    pub after: Option<serde_json::Value>,
    /// When the row changed, milliseconds since the Unix epoch.
    pub changed_at_ms: i64,
}

impl Event {
    /// Its key, unique in the database cluster for good: `<xid>-<id>`. The change-log id alone
    /// starts over when the schema is reinstalled; a transaction id is never reused.
    pub fn key(&self) -> String {
        format!("{}-{}", self.xid, self.id)
    }
}

/// The columns [`row_event`] reads.
const EVENT_COLUMNS: &str = "id, xid::text, entity, op, before::text, after::text, \
     (extract(epoch FROM changed_at) * 1000)::bigint";

fn row_event(row: &tokio_postgres::Row) -> Result<Event, Error> {
    let op: String = row.get(3);
    let json = |i: usize| -> Result<Option<serde_json::Value>, Error> {
        row.get::<_, Option<String>>(i)
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| Error::Corrupt(format!("row image: {e}")))
    };
    Ok(Event {
        id: row.get(0),
        xid: xid(row.get(1))?,
        entity: row.get(2),
        op: EventType::parse(&op).ok_or_else(|| Error::Corrupt(format!("operation {op:?}")))?,
        before: json(4)?,
        after: json(5)?,
        changed_at_ms: row.get(6),
    })
}

/// The change-log row `id`, if it is still there (not pruned).
pub async fn event(
    client: &impl GenericClient,
    schema: &str,
    id: i64,
) -> Result<Option<Event>, Error> {
    let s = crate::ident(schema);
    client
        .query_opt(
            &format!("SELECT {EVENT_COLUMNS} FROM {s}.changes WHERE id = $1"),
            &[&id],
        )
        .await?
        .as_ref()
        .map(row_event)
        .transpose()
}

/// How far an observer set has read the change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Every row of a transaction below this is delivered.
    pub lo: u64,
    /// End of the range being delivered (`lo == hi`: none open).
    pub hi: u64,
    /// Within `[lo, hi)`, rows up to this id are delivered.
    pub last_id: i64,
}

impl Position {
    /// The start of the log.
    pub const START: Position = Position {
        lo: 0,
        hi: 0,
        last_id: 0,
    };
}

/// A checkpoint held by one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Where reading resumes.
    pub position: Position,
    /// The fencing epoch this process saves under.
    pub epoch: i64,
}

/// The change log of one installed schema, read for one observer set.
#[derive(Debug, Clone)]
pub struct Capture {
    schema: String,
    set: String,
}

fn xid(text: &str) -> Result<u64, Error> {
    text.parse()
        .map_err(|_| Error::Corrupt(format!("transaction id {text:?}")))
}

impl Capture {
    /// The observer set `set` over the change log in `schema`.
    pub fn new(schema: &str, set: &str) -> Self {
        Self {
            schema: ident(schema),
            set: set.to_owned(),
        }
    }

    /// Takes the set's checkpoint over: creates it at the start of the log if it is new, and
    /// bumps its epoch, so that saves by any earlier holder are refused from now on.
    pub async fn acquire(&self, client: &impl GenericClient) -> Result<Checkpoint, Error> {
        let s = &self.schema;
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO {s}.checkpoints (observer_set, lo, hi, last_id, epoch)
                     VALUES ($1, '0', '0', 0, 1)
                     ON CONFLICT (observer_set) DO UPDATE
                         SET epoch = {s}.checkpoints.epoch + 1, updated_at = now()
                     RETURNING lo::text, hi::text, last_id, epoch"
                ),
                &[&self.set],
            )
            .await?;
        Ok(Checkpoint {
            position: Position {
                lo: xid(row.get(0))?,
                hi: xid(row.get(1))?,
                last_id: row.get(2),
            },
            epoch: row.get(3),
        })
    }

    /// Reads the changes after `from`, at most `limit`, and the position after them. Empty when
    /// every finished transaction's changes are delivered.
    /// Whether committed changes wait beyond `at`'s cut: their transactions committed after the
    /// cut was taken, or while an older transaction (anywhere in the cluster) still runs, so
    /// the next [`Capture::read`] may take them as soon as that one ends. A leader that sees
    /// this reads again soon rather than at its next poll: the NOTIFY that announced them has
    /// been spent.
    pub async fn held_back(&self, client: &Client, at: Position) -> Result<bool, Error> {
        let s = &self.schema;
        Ok(client
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {s}.changes WHERE xid >= $1::text::xid8)"),
                &[&at.hi.to_string()],
            )
            .await?
            .get(0))
    }

    pub async fn read(
        &self,
        client: &mut Client,
        from: Position,
        limit: i64,
    ) -> Result<(Vec<Event>, Position), Error> {
        let s = &self.schema;
        // One snapshot for the horizon and the rows: every transaction below its xmin has
        // finished before it was taken, so their committed rows are all visible to it.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let (lo, hi) = if from.lo == from.hi {
            let horizon: String = tx
                .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
                .await?
                .get(0);
            (from.lo, xid(&horizon)?)
        } else {
            (from.lo, from.hi)
        };
        if hi <= lo {
            tx.commit().await?;
            return Ok((Vec::new(), from));
        }
        let rows = tx
            .query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM {s}.changes
                     WHERE xid >= $1::text::xid8 AND xid < $2::text::xid8 AND id > $3
                     ORDER BY id LIMIT $4"
                ),
                &[
                    &lo.to_string(),
                    &hi.to_string(),
                    &from.last_id,
                    &limit.max(1),
                ],
            )
            .await?;
        tx.commit().await?;
        let events = rows.iter().map(row_event).collect::<Result<Vec<_>, _>>()?;
        let next = match events.last() {
            Some(last) if events.len() as i64 >= limit.max(1) => Position {
                lo,
                hi,
                last_id: last.id,
            },
            // The range is exhausted: the next read cuts a new one.
            _ => Position {
                lo: hi,
                hi,
                last_id: 0,
            },
        };
        Ok((events, next))
    }

    /// Saves `position` under `epoch`, in the caller's transaction when it passes one. Refused
    /// with [`Error::Fenced`] when another process has acquired the checkpoint since.
    pub async fn save(
        &self,
        client: &impl GenericClient,
        position: Position,
        epoch: i64,
    ) -> Result<(), Error> {
        let s = &self.schema;
        let updated = client
            .execute(
                &format!(
                    "UPDATE {s}.checkpoints
                     SET lo = $2::text::xid8, hi = $3::text::xid8, last_id = $4, updated_at = now()
                     WHERE observer_set = $1 AND epoch = $5"
                ),
                &[
                    &self.set,
                    &position.lo.to_string(),
                    &position.hi.to_string(),
                    &position.last_id,
                    &epoch,
                ],
            )
            .await?;
        if updated == 1 {
            return Ok(());
        }
        let current: Option<i64> = client
            .query_opt(
                &format!("SELECT epoch FROM {s}.checkpoints WHERE observer_set = $1"),
                &[&self.set],
            )
            .await?
            .map(|r| r.get(0));
        Err(Error::Fenced {
            set: self.set.clone(),
            current: current.unwrap_or(0),
            ours: epoch,
        })
    }

    /// Deletes up to `limit` change-log rows that every observer set has passed. Returns how
    /// many. Nothing is deleted before some set has a checkpoint.
    pub async fn prune(&self, client: &impl GenericClient, limit: i64) -> Result<u64, Error> {
        let s = &self.schema;
        let deleted = client
            .execute(
                &format!(
                    "DELETE FROM {s}.changes WHERE id IN (
                         SELECT id FROM {s}.changes
                         WHERE xid < (SELECT min(lo) FROM {s}.checkpoints)
                         LIMIT $1)"
                ),
                &[&limit.max(1)],
            )
            .await?;
        Ok(deleted)
    }

    /// How far behind the set is: the change time of the oldest change it has not passed, in
    /// milliseconds before now (0 when it is caught up).
    pub async fn lag_ms(&self, client: &impl GenericClient, at: Position) -> Result<i64, Error> {
        let s = &self.schema;
        let row = client
            .query_one(
                &format!(
                    "SELECT COALESCE((extract(epoch FROM now() - min(changed_at)) * 1000)::bigint, 0)
                     FROM {s}.changes
                     WHERE xid >= $1::text::xid8 AND NOT (xid < $2::text::xid8 AND id <= $3)"
                ),
                &[&at.lo.to_string(), &at.hi.to_string(), &at.last_id],
            )
            .await?;
        Ok(row.get::<_, i64>(0).max(0))
    }
}

/// One observer set's checkpoint as stored, for status reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SetStatus {
    /// The observer set.
    pub set: String,
    /// Where it stands.
    pub position: Position,
    /// Its fencing epoch (how many times it was taken over).
    pub epoch: i64,
    /// Changes it has not passed yet.
    pub pending: i64,
    /// Age of the oldest change it has not passed, milliseconds (0 when caught up).
    pub lag_ms: i64,
    /// When its checkpoint last moved, milliseconds since the Unix epoch.
    pub updated_at_ms: i64,
}

/// The state of an installed change log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogStatus {
    /// Rows in the change log (not yet pruned).
    pub changes: i64,
    /// Tables with the capture trigger.
    pub watched: Vec<String>,
    /// Every observer set's checkpoint.
    pub sets: Vec<SetStatus>,
    /// The circuit breakers running processes reported in the last 30 s, not closed:
    /// (process, endpoint, state).
    pub breakers: Vec<(String, String, String)>,
}

/// Replaces what `process` reported of its circuit breakers with `states` (endpoint, state).
pub async fn report_breakers(
    client: &mut tokio_postgres::Client,
    schema: &str,
    process: &str,
    states: &[(String, String)],
) -> Result<(), Error> {
    let s = ident(schema);
    let tx = client.transaction().await?;
    tx.execute(
        &format!("DELETE FROM {s}.breakers WHERE process = $1"),
        &[&process],
    )
    .await?;
    for (endpoint, state) in states {
        tx.execute(
            &format!("INSERT INTO {s}.breakers (process, endpoint, state) VALUES ($1, $2, $3)"),
            &[&process, endpoint, state],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Reads the state of the change log in `schema`; `None` when it is not installed.
pub async fn status(client: &impl GenericClient, schema: &str) -> Result<Option<LogStatus>, Error> {
    let installed: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{}.checkpoints", ident(schema))],
        )
        .await?
        .get(0);
    if !installed {
        return Ok(None);
    }
    let s = ident(schema);
    let changes: i64 = client
        .query_one(&format!("SELECT count(*) FROM {s}.changes"), &[])
        .await?
        .get(0);
    let watched = client
        .query(
            "SELECT DISTINCT n.nspname, c.relname FROM pg_trigger t
             JOIN pg_class c ON c.oid = t.tgrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE t.tgname = $1 ORDER BY 1, 2",
            &[&format!("{schema}_capture")],
        )
        .await?
        .iter()
        .map(|r| {
            crate::config::Entity {
                schema: r.get(0),
                table: r.get(1),
            }
            .name()
        })
        .collect();
    let rows = client
        .query(
            &format!(
                "SELECT observer_set, lo::text, hi::text, last_id, epoch,
                        (extract(epoch FROM updated_at) * 1000)::bigint
                 FROM {s}.checkpoints ORDER BY observer_set"
            ),
            &[],
        )
        .await?;
    let mut sets = Vec::with_capacity(rows.len());
    for r in rows {
        let set: String = r.get(0);
        let position = Position {
            lo: xid(r.get(1))?,
            hi: xid(r.get(2))?,
            last_id: r.get(3),
        };
        let pending: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {s}.changes
                     WHERE xid >= $1::text::xid8 AND NOT (xid < $2::text::xid8 AND id <= $3)"
                ),
                &[
                    &position.lo.to_string(),
                    &position.hi.to_string(),
                    &position.last_id,
                ],
            )
            .await?
            .get(0);
        let lag_ms = Capture::new(schema, &set).lag_ms(client, position).await?;
        sets.push(SetStatus {
            set,
            position,
            epoch: r.get(4),
            pending,
            lag_ms,
            updated_at_ms: r.get(5),
        });
    }
    let breakers = client
        .query(
            &format!(
                "SELECT process, endpoint, state FROM {s}.breakers
                 WHERE state <> 'closed' AND updated_at > now() - interval '30 seconds'
                 ORDER BY endpoint, process"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(Some(LogStatus {
        changes,
        watched,
        sets,
        breakers,
    }))
}
