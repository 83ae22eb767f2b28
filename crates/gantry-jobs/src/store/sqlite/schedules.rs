//! Schedules in SQLite: the `schedules` table (migration 3 of [`super::MIGRATIONS`]) and the
//! commands the writer thread runs for them. Every change runs on the writer, inside its
//! transaction, so a due check, the job it enqueues and the new `next_run_at` commit together:
//! a crash loses all three or none, and a restart finds the tick either fired or still due.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{db_err, enqueue};
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

const DELETED: i32 = 3;

/// Reads a row in [`COLUMNS`] order. The outer error is SQLite's, the inner one a bad row.
fn row_to_schedule(r: &Row<'_>) -> rusqlite::Result<Result<Schedule, StoreError>> {
    let id: String = r.get(0)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        id: id.clone(),
        reason,
    };
    let misfire: String = r.get(4)?;
    let Some(misfire) = Misfire::from_name(&misfire) else {
        return Ok(Err(corrupt(format!("unknown misfire policy {misfire}"))));
    };
    let status: i32 = r.get(5)?;
    let Some(status) = ScheduleStatus::from_code(status) else {
        return Ok(Err(corrupt(format!("unknown status {status}"))));
    };
    let backoff: String = r.get(8)?;
    let options = match options_from_columns(
        r.get(7)?,
        &backoff,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
    ) {
        Ok(o) => o,
        Err(e) => return Ok(Err(corrupt(e))),
    };
    Ok(Ok(Schedule {
        name: r.get(1)?,
        cron: r.get(2)?,
        timezone: r.get(3)?,
        misfire,
        status,
        args: r.get(6)?,
        options,
        next_run_at: r.get(14)?,
        last_run_at: r.get(15)?,
        created_at: r.get(16)?,
        updated_at: r.get(17)?,
        id,
    }))
}

fn query(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Schedule>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let rows = stmt.query_map(params, row_to_schedule).map_err(db_err)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row.map_err(db_err)??);
    }
    Ok(out)
}

fn insert(tx: &Connection, s: &Schedule) -> Result<(), StoreError> {
    let (max_attempts, backoff, initial, max_delay, multiplier, jitter, timeout) =
        option_columns(&s.options);
    tx.prepare_cached(&format!(
        "INSERT INTO schedules ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, \
         ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
    ))
    .map_err(db_err)?
    .execute(params![
        s.id,
        s.name,
        s.cron,
        s.timezone,
        s.misfire.as_str(),
        s.status.code(),
        s.args,
        max_attempts,
        backoff,
        initial,
        max_delay,
        multiplier,
        jitter,
        timeout,
        s.next_run_at,
        s.last_run_at,
        s.created_at,
        s.updated_at,
    ])
    .map_err(db_err)?;
    Ok(())
}

/// Writes back everything but the id, name, args and creation time.
fn save(tx: &Connection, s: &Schedule) -> Result<(), StoreError> {
    let (max_attempts, backoff, initial, max_delay, multiplier, jitter, timeout) =
        option_columns(&s.options);
    tx.prepare_cached(
        "UPDATE schedules SET cron = ?2, timezone = ?3, misfire = ?4, status = ?5, \
         max_attempts = ?6, backoff = ?7, initial_delay_ms = ?8, max_delay_ms = ?9, \
         multiplier = ?10, jitter = ?11, timeout_ms = ?12, next_run_at = ?13, last_run_at = ?14, \
         updated_at = ?15 WHERE id = ?1",
    )
    .map_err(db_err)?
    .execute(params![
        s.id,
        s.cron,
        s.timezone,
        s.misfire.as_str(),
        s.status.code(),
        max_attempts,
        backoff,
        initial,
        max_delay,
        multiplier,
        jitter,
        timeout,
        s.next_run_at,
        s.last_run_at,
        s.updated_at,
    ])
    .map_err(db_err)?;
    Ok(())
}

pub(super) fn create(
    tx: &Connection,
    new: NewSchedule,
    now: Millis,
) -> Result<Result<Schedule, ScheduleError>, StoreError> {
    let taken = tx
        .prepare_cached("SELECT 1 FROM schedules WHERE name = ?1 AND status <> 3")
        .map_err(db_err)?
        .exists([&new.name])
        .map_err(db_err)?;
    if taken {
        return Ok(Err(ScheduleError::NameTaken(new.name)));
    }
    let s = match Schedule::create(uuid::Uuid::now_v7().to_string(), new, now) {
        Ok(s) => s,
        Err(e) => return Ok(Err(ScheduleRejection::from(e).into())),
    };
    insert(tx, &s)?;
    Ok(Ok(s))
}

/// By id (any status), else by name among the schedules not deleted.
pub(super) fn load(conn: &Connection, id_or_name: &str) -> Result<Option<Schedule>, StoreError> {
    let by_id = conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM schedules WHERE id = ?1"))
        .map_err(db_err)?
        .query_row([id_or_name], row_to_schedule)
        .optional()
        .map_err(db_err)?;
    if let Some(s) = by_id {
        return s.map(Some);
    }
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM schedules WHERE name = ?1 AND status <> {DELETED}"
    ))
    .map_err(db_err)?
    .query_row([id_or_name], row_to_schedule)
    .optional()
    .map_err(db_err)?
    .transpose()
}

pub(super) fn list(
    conn: &Connection,
    filter: &ScheduleFilter,
) -> Result<(Vec<Schedule>, u64), StoreError> {
    let (clause, status) = match filter.status {
        Some(s) => ("status = ?1", s.code()),
        None => ("status <> ?1", DELETED),
    };
    let total: i64 = conn
        .prepare_cached(&format!("SELECT COUNT(*) FROM schedules WHERE {clause}"))
        .map_err(db_err)?
        .query_row([status], |r| r.get(0))
        .map_err(db_err)?;
    let page = query(
        conn,
        &format!(
            "SELECT {COLUMNS} FROM schedules WHERE {clause} \
             ORDER BY next_run_at IS NULL, next_run_at, seq LIMIT ?2 OFFSET ?3"
        ),
        params![
            status,
            i64::try_from(filter.limit).unwrap_or(i64::MAX),
            i64::try_from(filter.offset).unwrap_or(i64::MAX),
        ],
    )?;
    Ok((page, u64::try_from(total).unwrap_or(0)))
}

pub(super) fn change(
    tx: &Connection,
    id_or_name: String,
    change: ScheduleChange,
    now: Millis,
) -> Result<Result<Schedule, ScheduleError>, StoreError> {
    let Some(mut s) = load(tx, &id_or_name)? else {
        return Ok(Err(ScheduleError::NotFound(id_or_name)));
    };
    if let Err(r) = schedule::change(&mut s, change, now) {
        return Ok(Err(r.into()));
    }
    save(tx, &s)?;
    Ok(Ok(s))
}

pub(super) fn fire_due(
    tx: &Connection,
    now: Millis,
    limit: usize,
) -> Result<FireReport, StoreError> {
    let mut report = FireReport::default();
    let due: Vec<(String, Result<Schedule, StoreError>)> = {
        let mut stmt = tx
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM schedules WHERE status = 1 AND next_run_at <= ?1 \
                 ORDER BY next_run_at, seq LIMIT ?2"
            ))
            .map_err(db_err)?;
        stmt.query_map(
            params![now, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| Ok((r.get(0)?, row_to_schedule(r)?)),
        )
        .map_err(db_err)?
        .collect::<Result<_, _>>()
        .map_err(db_err)?
    };
    for (id, s) in due {
        let mut s = match s {
            Ok(s) => s,
            Err(e) => {
                // A row that cannot be read is stopped, not re-read on every pass.
                tx.execute(
                    "UPDATE schedules SET next_run_at = NULL, updated_at = ?2 WHERE id = ?1",
                    params![id, now],
                )
                .map_err(db_err)?;
                report.broken.push((id, e.to_string()));
                continue;
            }
        };
        match schedule::fire(&mut s, now) {
            Ok((decision, job)) => {
                let job = match job {
                    Some(job) => enqueue(tx, vec![job], now)?.pop(),
                    None => None,
                };
                save(tx, &s)?;
                report.fired.push(Fired {
                    schedule_id: s.id,
                    name: s.name,
                    tick: decision.fire,
                    job,
                    late: decision.late,
                });
            }
            Err(e) => {
                save(tx, &s)?;
                report.broken.push((s.id, e.to_string()));
            }
        }
    }
    report.next_due = next_due(tx, now)?;
    Ok(report)
}

/// The earliest `next_run_at` after `now` of an active schedule.
pub(super) fn next_due(conn: &Connection, now: Millis) -> Result<Option<Millis>, StoreError> {
    conn.prepare_cached(
        "SELECT MIN(next_run_at) FROM schedules WHERE status = 1 AND next_run_at > ?1",
    )
    .map_err(db_err)?
    .query_row([now], |r| r.get(0))
    .map_err(db_err)
}
