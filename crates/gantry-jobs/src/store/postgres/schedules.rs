//! Schedules in PostgreSQL: the `schedules` table (migration 3 of [`super::MIGRATIONS`]).
//!
//! Locking: a change locks its schedule row (`FOR UPDATE`); a due check selects due rows
//! `FOR UPDATE SKIP LOCKED`, so two servers never check one schedule at once, and commits the
//! job it enqueues together with the new `next_run_at`. A server that then selects the row
//! re-evaluates `next_run_at <= now` on the committed version and skips it: each tick fires on
//! one server, once. The job's idempotency key (`schedule:<id>:<tick>`, `ON CONFLICT DO
//! NOTHING`) would absorb a repeat all the same.
//!
//! Statements here are not in the per-connection cache of [`super::Q`]: they run rarely (a due
//! check per tick or per poll, not per job).

use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Row, Transaction};

use super::{Prepared, db_err, enqueue, get, storable, to_i64};
use crate::model::Millis;
use crate::schedule::{
    self, Misfire, NewSchedule, Schedule, ScheduleChange, ScheduleRejection, ScheduleStatus,
};
use crate::store::{
    FireReport, Fired, ScheduleError, ScheduleFilter, StoreError, option_columns,
    options_from_columns,
};

const COLUMNS: &str = "id, name, cron, timezone, misfire, status, args, max_attempts, backoff, \
    initial_delay_ms, max_delay_ms, multiplier, jitter, timeout_ms, next_run_at, last_run_at, \
    created_at, updated_at";

/// Migration 3 of the PostgreSQL store; `{schema}` is replaced by the quoted schema name.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE {schema}.schedules (
    id               TEXT COLLATE "C" PRIMARY KEY,
    name             TEXT    NOT NULL,
    cron             TEXT    NOT NULL,
    timezone         TEXT    NOT NULL,
    misfire          TEXT    NOT NULL,
    status           INTEGER NOT NULL,
    args             BYTEA   NOT NULL,
    max_attempts     BIGINT  NOT NULL,
    backoff          TEXT    NOT NULL,
    initial_delay_ms BIGINT  NOT NULL,
    max_delay_ms     BIGINT  NOT NULL,
    multiplier       DOUBLE PRECISION NOT NULL,
    jitter           DOUBLE PRECISION NOT NULL,
    timeout_ms       BIGINT  NOT NULL,
    next_run_at      BIGINT,
    last_run_at      BIGINT,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL
);
CREATE UNIQUE INDEX schedules_name ON {schema}.schedules (name) WHERE status <> 3;
CREATE INDEX schedules_due ON {schema}.schedules (next_run_at) WHERE status = 1;
"#;

const DELETED: i32 = 3;

fn row_to_schedule(r: &Row) -> Result<Schedule, StoreError> {
    let id: String = get(r, 0)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        id: id.clone(),
        reason,
    };
    let misfire: String = get(r, 4)?;
    let misfire = Misfire::from_name(&misfire)
        .ok_or_else(|| corrupt(format!("unknown misfire policy {misfire}")))?;
    let status: i32 = get(r, 5)?;
    let status = ScheduleStatus::from_code(status)
        .ok_or_else(|| corrupt(format!("unknown status {status}")))?;
    let backoff: String = get(r, 8)?;
    let options = options_from_columns(
        get(r, 7)?,
        &backoff,
        get(r, 9)?,
        get(r, 10)?,
        get(r, 11)?,
        get(r, 12)?,
        get(r, 13)?,
    )
    .map_err(corrupt)?;
    Ok(Schedule {
        name: get(r, 1)?,
        cron: get(r, 2)?,
        timezone: get(r, 3)?,
        misfire,
        status,
        args: get(r, 6)?,
        options,
        next_run_at: get(r, 14)?,
        last_run_at: get(r, 15)?,
        created_at: get(r, 16)?,
        updated_at: get(r, 17)?,
        id,
    })
}

/// Writes back everything but the id, name, args and creation time.
async fn save(tx: &Transaction<'_>, schema: &str, s: &Schedule) -> Result<(), StoreError> {
    let (max_attempts, backoff, initial, max_delay, multiplier, jitter, timeout) =
        option_columns(&s.options);
    let max_attempts = i64::from(max_attempts);
    let params: [&(dyn ToSql + Sync); 15] = [
        &s.id,
        &s.cron,
        &s.timezone,
        &s.misfire.as_str(),
        &s.status.code(),
        &max_attempts,
        &backoff,
        &initial,
        &max_delay,
        &multiplier,
        &jitter,
        &timeout,
        &s.next_run_at,
        &s.last_run_at,
        &s.updated_at,
    ];
    tx.execute(
        &format!(
            "UPDATE {schema}.schedules SET cron = $2, timezone = $3, misfire = $4, status = $5, \
             max_attempts = $6, backoff = $7, initial_delay_ms = $8, max_delay_ms = $9, \
             multiplier = $10, jitter = $11, timeout_ms = $12, next_run_at = $13, \
             last_run_at = $14, updated_at = $15 WHERE id = $1"
        ),
        &params,
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

pub(super) async fn create(
    tx: &Transaction<'_>,
    schema: &str,
    new: NewSchedule,
    now: Millis,
) -> Result<Result<Schedule, ScheduleError>, StoreError> {
    if !storable(&new.name) {
        return Err(StoreError::Database(format!(
            "schedule name {:?} has a NUL byte, which PostgreSQL text cannot hold",
            new.name
        )));
    }
    let s = match Schedule::create(uuid::Uuid::now_v7().to_string(), new, now) {
        Ok(s) => s,
        Err(e) => return Ok(Err(ScheduleRejection::from(e).into())),
    };
    let (max_attempts, backoff, initial, max_delay, multiplier, jitter, timeout) =
        option_columns(&s.options);
    let max_attempts = i64::from(max_attempts);
    let params: [&(dyn ToSql + Sync); 18] = [
        &s.id,
        &s.name,
        &s.cron,
        &s.timezone,
        &s.misfire.as_str(),
        &s.status.code(),
        &s.args,
        &max_attempts,
        &backoff,
        &initial,
        &max_delay,
        &multiplier,
        &jitter,
        &timeout,
        &s.next_run_at,
        &s.last_run_at,
        &s.created_at,
        &s.updated_at,
    ];
    // Two servers creating one name at once: the unique index lets one in.
    let inserted = tx
        .query_opt(
            &format!(
                "INSERT INTO {schema}.schedules ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, \
                 $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
                 ON CONFLICT (name) WHERE status <> 3 DO NOTHING RETURNING id"
            ),
            &params,
        )
        .await
        .map_err(db_err)?;
    Ok(match inserted {
        Some(_) => Ok(s),
        None => Err(ScheduleError::NameTaken(s.name)),
    })
}

/// By id (any status), else by name among the schedules not deleted; `lock` takes the row lock.
pub(super) async fn load(
    client: &impl GenericClient,
    schema: &str,
    id_or_name: &str,
    lock: bool,
) -> Result<Option<Schedule>, StoreError> {
    if !storable(id_or_name) {
        return Ok(None);
    }
    let lock = if lock { "FOR UPDATE" } else { "" };
    let by_id = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM {schema}.schedules WHERE id = $1 {lock}"),
            &[&id_or_name],
        )
        .await
        .map_err(db_err)?;
    let row = match by_id {
        Some(row) => Some(row),
        None => client
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM {schema}.schedules \
                     WHERE name = $1 AND status <> {DELETED} {lock}"
                ),
                &[&id_or_name],
            )
            .await
            .map_err(db_err)?,
    };
    row.as_ref().map(row_to_schedule).transpose()
}

pub(super) async fn list(
    client: &impl GenericClient,
    schema: &str,
    filter: &ScheduleFilter,
) -> Result<(Vec<Schedule>, u64), StoreError> {
    let (clause, status) = match filter.status {
        Some(s) => ("status = $1", s.code()),
        None => ("status <> $1", DELETED),
    };
    let limit = to_i64(filter.limit);
    let offset = to_i64(filter.offset);
    let total: i64 = client
        .query_one(
            &format!("SELECT COUNT(*) FROM {schema}.schedules WHERE {clause}"),
            &[&status],
        )
        .await
        .map_err(db_err)?
        .try_get(0)
        .map_err(db_err)?;
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM {schema}.schedules WHERE {clause} \
                 ORDER BY next_run_at ASC NULLS LAST, id LIMIT $2 OFFSET $3"
            ),
            &[&status, &limit, &offset],
        )
        .await
        .map_err(db_err)?;
    let page = rows.iter().map(row_to_schedule).collect::<Result<_, _>>()?;
    Ok((page, u64::try_from(total).unwrap_or(0)))
}

pub(super) async fn change(
    tx: &Transaction<'_>,
    schema: &str,
    id_or_name: String,
    change: ScheduleChange,
    now: Millis,
) -> Result<Result<Schedule, ScheduleError>, StoreError> {
    let Some(mut s) = load(tx, schema, &id_or_name, true).await? else {
        return Ok(Err(ScheduleError::NotFound(id_or_name)));
    };
    if let Err(r) = schedule::change(&mut s, change, now) {
        return Ok(Err(r.into()));
    }
    save(tx, schema, &s).await?;
    Ok(Ok(s))
}

pub(super) async fn fire_due(
    tx: &Transaction<'_>,
    prepared: &mut Prepared<'_>,
    now: Millis,
    limit: usize,
) -> Result<FireReport, StoreError> {
    let schema = prepared.schema.to_owned();
    let rows = tx
        .query(
            &format!(
                "SELECT {COLUMNS} FROM {schema}.schedules WHERE status = 1 AND next_run_at <= $1 \
                 ORDER BY next_run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
            &[&now, &to_i64(limit)],
        )
        .await
        .map_err(db_err)?;
    let mut report = FireReport::default();
    for row in &rows {
        let mut s = match row_to_schedule(row) {
            Ok(s) => s,
            Err(e) => {
                // A row that cannot be read is stopped, not re-read on every pass.
                let id: String = row.try_get(0).map_err(db_err)?;
                tx.execute(
                    &format!(
                        "UPDATE {schema}.schedules SET next_run_at = NULL, updated_at = $2 \
                         WHERE id = $1"
                    ),
                    &[&id, &now],
                )
                .await
                .map_err(db_err)?;
                report.broken.push((id, e.to_string()));
                continue;
            }
        };
        match schedule::fire(&mut s, now) {
            Ok((decision, job)) => {
                let job = match job {
                    Some(job) => enqueue(tx, prepared, vec![job], now).await?.pop(),
                    None => None,
                };
                save(tx, &schema, &s).await?;
                report.fired.push(Fired {
                    schedule_id: s.id,
                    name: s.name,
                    tick: decision.fire,
                    job,
                    late: decision.late,
                });
            }
            Err(e) => {
                save(tx, &schema, &s).await?;
                report.broken.push((s.id, e.to_string()));
            }
        }
    }
    report.next_due = tx
        .query_one(
            &format!(
                "SELECT MIN(next_run_at) FROM {schema}.schedules \
                 WHERE status = 1 AND next_run_at > $1"
            ),
            &[&now],
        )
        .await
        .map_err(db_err)?
        .try_get(0)
        .map_err(db_err)?;
    Ok(report)
}
