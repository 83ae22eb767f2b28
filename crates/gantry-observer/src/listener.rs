//! The listener: one leader per observer set reads the change log and hands matches to the
//! jobs store; any number of standbys wait to take over.
//!
//! Leadership is a PostgreSQL session advisory lock on a key derived from the schema and the
//! observer set, held by the leader's connection: when the leader dies (or its connection
//! does), PostgreSQL releases it and a standby's next try wins. The new leader then
//! [acquires](crate::capture::Capture::acquire) the checkpoint, which bumps its fencing epoch,
//! so a deposed leader that is still running can no longer save a position or hand anything
//! over ([`Error::Fenced`]); it goes back to standby. The leader `LISTEN`s on the schema's
//! channel (the install's statement triggers `NOTIFY` it) and reads the change log when woken,
//! at once after a full batch, and at least every `poll` (a notification is only a hint: one
//! missed is caught by the next poll); it prunes what every set has passed.

use std::time::Duration;

use gantry_jobs::store::postgres::PostgresStore;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::capture::Capture;
use crate::dispatch::{Matcher, hand_off};
use crate::metrics::ObserverMetrics;

/// How a listener runs.
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    /// The watched database.
    pub database: String,
    /// The observer's schema in it.
    pub schema: String,
    /// The observer set (one leader per set).
    pub set: String,
    /// The jobs store's schema in the same database.
    pub jobs_schema: String,
    /// Events per batch.
    pub batch: i64,
    /// Pause between polls when there is nothing new.
    pub poll: Duration,
    /// How often the leader prunes the change log.
    pub prune_every: Duration,
}

/// Something a listener reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// This process leads the set now, under this epoch.
    Leader(i64),
    /// Another process leads; this one waits.
    Standby,
    /// A batch was handed over: events, jobs enqueued.
    Handed(usize, usize),
    /// Leadership was lost (fenced, or the connection broke).
    Lost(String),
}

/// Connects; notifications on the connection (LISTEN) wake `wake`.
async fn connect(url: &str, wake: Arc<Notify>) -> Result<Client, Error> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        // Drives the connection and watches for NOTIFY; ends when the connection does.
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    Ok(client)
}

/// Runs until `stop`: stands by, leads when it can, and reports what it does.
pub async fn run(
    options: ListenerOptions,
    matchers: Vec<Matcher>,
    metrics: ObserverMetrics,
    stop: CancellationToken,
    mut report: impl FnMut(Report),
) -> Result<(), Error> {
    let store = PostgresStore::connect(&options.database, &options.jobs_schema).await?;
    let capture = Capture::new(&options.schema, &options.set);
    let lock_key = format!("gantry-observer-leader:{}:{}", options.schema, options.set);
    let mut standing_by = false;
    while !stop.is_cancelled() {
        let wake = Arc::new(Notify::new());
        let mut client = match connect(&options.database, Arc::clone(&wake)).await {
            Ok(c) => c,
            Err(e) => {
                report(Report::Lost(format!("cannot connect: {e}")));
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(options.poll.max(Duration::from_millis(500))) => continue,
                }
            }
        };
        let leader: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                &[&lock_key],
            )
            .await?
            .get(0);
        if !leader {
            if !standing_by {
                report(Report::Standby);
                standing_by = true;
            }
            drop(client);
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(options.poll.max(Duration::from_millis(200))) => continue,
            }
        }
        standing_by = false;
        // The install's statement triggers NOTIFY on the schema's channel: a change wakes the
        // leader at once instead of at its next poll.
        client
            .batch_execute(&format!("LISTEN {}", crate::ident(&options.schema)))
            .await?;
        let held = capture.acquire(&client).await?;
        report(Report::Leader(held.epoch));
        metrics.leader.set(1);
        let why = lead(
            &Leading {
                options: &options,
                store: &store,
                capture: &capture,
                matchers: &matchers,
                metrics: &metrics,
            },
            &mut client,
            held,
            &wake,
            &stop,
            &mut report,
        )
        .await;
        metrics.leader.set(0);
        metrics.lag_seconds.set(0.0);
        match why {
            Ok(()) => break,
            Err(e) => report(Report::Lost(e.to_string())),
        }
        // Dropping the connection releases the lock, if it still holds it.
        drop(client);
    }
    Ok(())
}

/// What a leader works with.
struct Leading<'a> {
    options: &'a ListenerOptions,
    store: &'a PostgresStore,
    capture: &'a Capture,
    matchers: &'a [Matcher],
    metrics: &'a ObserverMetrics,
}

async fn lead(
    l: &Leading<'_>,
    client: &mut Client,
    held: crate::capture::Checkpoint,
    wake: &Notify,
    stop: &CancellationToken,
    report: &mut impl FnMut(Report),
) -> Result<(), Error> {
    let Leading {
        options,
        store,
        capture,
        matchers,
        metrics,
    } = *l;
    let mut position = held.position;
    let mut last_prune = tokio::time::Instant::now();
    let mut last_lag: Option<tokio::time::Instant> = None;
    // The pause before reading again while committed changes are held back behind the cut.
    let mut recheck = RECHECK_FIRST;
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let (events, next) = capture.read(client, position, options.batch).await?;
        let full = events.len() as i64 >= options.batch;
        if next != position || !events.is_empty() {
            let handed = hand_off(
                store,
                capture,
                matchers,
                &events,
                next,
                held.epoch,
                gantry_jobs::model::now_millis(),
            )
            .await?;
            for (id, observer, e) in &handed.condition_errors {
                metrics
                    .condition_errors
                    .with_label_values(&[observer])
                    .inc();
                tracing::warn!(event = id, observer = %observer, error = %e, "condition not evaluated");
            }
            metrics.captured.inc_by(events.len() as u64);
            for (observer, n) in &handed.matched {
                metrics.matched.with_label_values(&[observer]).inc_by(*n);
            }
            if !events.is_empty() {
                report(Report::Handed(handed.events, handed.jobs));
            }
            position = next;
        }
        if last_lag.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_lag = Some(tokio::time::Instant::now());
            let lag = capture.lag_ms(client, position).await?;
            #[allow(clippy::cast_precision_loss)]
            metrics.lag_seconds.set(lag as f64 / 1000.0);
        }
        if last_prune.elapsed() >= options.prune_every {
            let pruned = capture.prune(client, 10_000).await?;
            if pruned > 0 {
                tracing::debug!(pruned, "change log pruned");
            }
            last_prune = tokio::time::Instant::now();
        }
        if !full {
            let pause = if capture.held_back(client, position).await? {
                let pause = recheck.min(options.poll);
                recheck = (recheck * 2).min(RECHECK_MAX);
                pause
            } else {
                recheck = RECHECK_FIRST;
                options.poll
            };
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// First and longest pause before reading again while changes are held back behind the cut.
const RECHECK_FIRST: Duration = Duration::from_millis(20);
const RECHECK_MAX: Duration = Duration::from_millis(500);
