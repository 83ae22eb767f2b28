//! Rollouts on disk and the orchestrator that runs them.
//!
//! A rollout is created from an artifact, a target [`Filter`] and a [`RolloutSpec`]; its targets
//! are fixed at creation (the matching devices in id order). Running it drives the pure
//! [`Rollout`] state machine: every [`Change`] it returns is appended to `rollout_events` and
//! committed (`synchronous = FULL`) *before* the orchestrator acts on it, so after a crash
//! [`Rollout::replay`] of the trail says exactly where it stood — devices that succeeded are
//! never pushed again, and devices that were in flight are first asked their version.
//!
//! Pause, resume and abort are requests written to the rollout's row by any process (the CLI);
//! the running orchestrator applies them between pushes, so new pushes stop at once while the
//! ones in flight finish and are recorded. A paused rollout's orchestrator returns when nothing
//! is in flight; `run` again continues it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::delivery::{self, PushOptions};
use crate::metrics::FleetMetrics;
use crate::registry::{Artifact, FilterSpec, Health, Registry, RegistryError, now_ms};
use crate::rollout::{Change, DeviceState, Outcome, Phase, Rollout, Work};
use crate::waves::{Canary, Growth, WavePlan};
use crate::window::{Window, WindowSpec};

/// How a rollout proceeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// Canary size: a count, or a percentage when `canary_percent` is set.
    pub canary: u32,
    /// Read `canary` as a percentage.
    pub canary_percent: bool,
    /// Fixed wave size after the canary (when `growth` is 0).
    pub batch: u32,
    /// Exponential growth factor after the canary (> 1), instead of `batch`.
    pub growth: f64,
    /// Abort when a wave's failures exceed this percentage.
    pub threshold_percent: f64,
    /// Pushes in flight at once.
    pub concurrency: u32,
    /// Push attempts per device (transient failures).
    pub attempts: u32,
    /// First retry delay, ms (doubling).
    pub retry_delay_ms: u64,
    /// Timeout of each request, ms.
    pub timeout_ms: u64,
    /// Health-gate timeout, ms.
    pub gate_timeout_ms: u64,
    /// Start no push before this time (ms since the epoch).
    #[serde(default)]
    pub start_at_ms: Option<i64>,
    /// Start pushes only inside this maintenance window (in-flight pushes finish).
    #[serde(default)]
    pub window: Option<WindowSpec>,
    /// How `ssh` devices are reached; required when the targets include one.
    #[serde(default)]
    pub ssh: Option<crate::ssh::SshSpec>,
    /// Which devices it targets.
    #[serde(default)]
    pub filter: FilterSpec,
    /// Takes in devices matching the filter that are registered (or come to match) after
    /// creation, until closed; it completes only once closed.
    #[serde(default)]
    pub dynamic: bool,
}

impl RolloutSpec {
    /// The wave plan.
    pub fn plan(&self) -> WavePlan {
        WavePlan {
            canary: if self.canary_percent {
                Canary::Percent(f64::from(self.canary))
            } else {
                Canary::Count(self.canary)
            },
            growth: if self.growth > 0.0 {
                Growth::Exponential(self.growth)
            } else {
                Growth::Fixed(self.batch)
            },
        }
    }

    fn push_options(&self) -> Result<PushOptions, String> {
        let retry = gantry_runtime::retry::RetryPolicy::builder()
            .max_attempts(self.attempts.max(1))
            .initial_delay(Duration::from_millis(self.retry_delay_ms))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(PushOptions {
            request_timeout: Duration::from_millis(self.timeout_ms),
            retry,
            gate_timeout: Duration::from_millis(self.gate_timeout_ms),
            ..PushOptions::default()
        })
    }
}

/// A rollout's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutInfo {
    /// Its id.
    pub id: String,
    /// The artifact version it installs.
    pub artifact: String,
    /// How it proceeds.
    pub spec: RolloutSpec,
    /// How many target devices.
    pub targets: u64,
    /// Its phase as last recorded (`created` before it first runs).
    pub phase: String,
    /// A pause, resume or abort asked for and not yet applied.
    pub requested: Option<String>,
    /// Device counts by state.
    pub devices: DeviceCounts,
}

/// Device counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeviceCounts {
    /// Not started.
    pub pending: u64,
    /// In flight (or unknown after a crash).
    pub in_flight: u64,
    /// Succeeded.
    pub succeeded: u64,
    /// Failed.
    pub failed: u64,
    /// Rejected.
    pub rejected: u64,
}

/// One audit-trail entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Its position in the trail.
    pub seq: i64,
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// The change.
    pub change: Change,
    /// The device it concerns, if any.
    pub device: Option<String>,
    /// What happened (the push outcome, the error).
    pub detail: Option<String>,
}

fn corrupt(what: String) -> RegistryError {
    RegistryError::Invalid(format!("corrupt rollout data: {what}"))
}

/// The rollouts in a registry database.
pub struct Rollouts {
    conn: Connection,
    path: PathBuf,
    metrics: Option<std::sync::Arc<FleetMetrics>>,
}

/// What [`Rollouts::claim_run`] found.
pub enum Claimed {
    /// The rollout had completed or aborted: its state.
    Finished(RolloutInfo),
    /// The rollout is this value's to run.
    Run(Claim),
}

/// A claim on a rollout, held until [`Rollouts::run_claim`] ends.
pub struct Claim {
    id: String,
    me: String,
    info: RolloutInfo,
}

/// How long a runner's claim on a rollout lasts without renewal.
const LEASE: Duration = Duration::from_secs(15);
/// How often a dynamic rollout looks for devices to take in.
const JOIN_POLL: Duration = Duration::from_secs(1);

impl Rollouts {
    /// Opens the rollouts of the registry at `path` (migrating it).
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        drop(Registry::open(path)?);
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // The audit trail is committed before it is acted on: make commits survive power loss.
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
        Ok(Self {
            conn,
            path: path.to_owned(),
            metrics: None,
        })
    }

    /// Records pushes, outcomes and progress of the rollouts this value runs in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<FleetMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Creates a rollout of `artifact` to the devices matching `spec.filter`; returns it.
    /// A dynamic rollout may start with no device; any other needs one.
    pub fn create(
        &mut self,
        artifact: &str,
        spec: RolloutSpec,
    ) -> Result<RolloutInfo, RegistryError> {
        spec.plan()
            .check()
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        spec.push_options().map_err(RegistryError::Invalid)?;
        if let Some(w) = &spec.window {
            Window::parse(w).map_err(RegistryError::Invalid)?;
        }
        if !(0.0..=100.0).contains(&spec.threshold_percent) {
            return Err(RegistryError::Invalid(format!(
                "threshold {}% is not between 0 and 100",
                spec.threshold_percent
            )));
        }
        let registry = Registry::open(&self.path)?;
        if registry.artifact(artifact)?.is_none() {
            return Err(RegistryError::Invalid(format!("no artifact {artifact}")));
        }
        let filter = spec.filter.at(now_ms())?;
        let (targets, _) = registry.list(&filter, 0, usize::MAX)?;
        if targets.is_empty() && !spec.dynamic {
            return Err(RegistryError::Invalid(
                "no device matches the filter".into(),
            ));
        }
        if spec.ssh.is_none()
            && let Some(d) = targets
                .iter()
                .find(|d| d.delivery == crate::registry::Delivery::Ssh)
        {
            return Err(RegistryError::Invalid(format!(
                "device {} is delivered over ssh: the rollout needs SSH settings (identity, \
                 known_hosts, install command)",
                d.id
            )));
        }
        let id = format!("r-{}", uuid_like());
        let spec_json = serde_json::to_string(&spec).map_err(|e| corrupt(e.to_string()))?;
        let now = now_ms();
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO rollouts (id, artifact, spec, targets, phase, requested, created_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, 'created', NULL, ?5, ?5)",
            params![id, artifact, spec_json, targets.len() as i64, now],
        )?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO rollout_targets (rollout_id, idx, device_id) VALUES (?1, ?2, ?3)",
            )?;
            for (i, d) in targets.iter().enumerate() {
                insert.execute(params![id, i as i64, d.id])?;
            }
        }
        tx.commit()?;
        self.info(&id)?
            .ok_or_else(|| corrupt(format!("rollout {id} vanished")))
    }

    /// Every rollout, newest first.
    pub fn list(&self) -> Result<Vec<RolloutInfo>, RegistryError> {
        let ids: Vec<String> = self
            .conn
            .prepare("SELECT id FROM rollouts ORDER BY created_ms DESC, id")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(info) = self.info(&id)? {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// One rollout, with device counts from its trail.
    pub fn info(&self, id: &str) -> Result<Option<RolloutInfo>, RegistryError> {
        let row = self
            .conn
            .query_row(
                "SELECT artifact, spec, targets, phase, requested FROM rollouts WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<String>>(4)?,
                    ))
                },
            )
            .optional()?;
        let Some((artifact, spec, targets, phase, requested)) = row else {
            return Ok(None);
        };
        let spec: RolloutSpec =
            serde_json::from_str(&spec).map_err(|e| corrupt(format!("spec: {e}")))?;
        let targets = u64::try_from(targets).unwrap_or(0);
        let mut states = vec![DeviceState::Pending; usize::try_from(targets).unwrap_or(0)];
        for e in self.events(id)? {
            match e.change {
                Change::Device { index, state } => {
                    if let Some(s) = states.get_mut(index) {
                        *s = state;
                    }
                }
                Change::Started { indexes } => {
                    for index in indexes {
                        if let Some(s) = states.get_mut(index) {
                            *s = DeviceState::InFlight;
                        }
                    }
                }
                _ => {}
            }
        }
        let mut devices = DeviceCounts::default();
        for s in states {
            match s {
                DeviceState::Pending => devices.pending += 1,
                DeviceState::InFlight | DeviceState::Unknown => devices.in_flight += 1,
                DeviceState::Succeeded => devices.succeeded += 1,
                DeviceState::Failed => devices.failed += 1,
                DeviceState::Rejected => devices.rejected += 1,
            }
        }
        Ok(Some(RolloutInfo {
            id: id.to_owned(),
            artifact,
            spec,
            targets,
            phase,
            requested,
            devices,
        }))
    }

    /// The audit trail of `id`, in order.
    pub fn events(&self, id: &str) -> Result<Vec<Event>, RegistryError> {
        self.events_after(id, 0)
    }

    /// The audit-trail entries of `id` after the sequence number `after`, in order.
    pub fn events_after(&self, id: &str, after: i64) -> Result<Vec<Event>, RegistryError> {
        let mut stmt = self.conn.prepare(
            "SELECT e.seq, e.at_ms, e.change, e.detail, t.device_id
             FROM rollout_events e
             LEFT JOIN rollout_targets t
                 ON t.rollout_id = e.rollout_id
                AND t.idx = json_extract(e.change, '$.index')
             WHERE e.rollout_id = ?1 AND e.seq > ?2 ORDER BY e.seq",
        )?;
        let rows = stmt.query_map(params![id, after], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, at_ms, change, detail, device) = row?;
            let change: Change =
                serde_json::from_str(&change).map_err(|e| corrupt(format!("event {seq}: {e}")))?;
            out.push(Event {
                seq,
                at_ms,
                change,
                device,
                detail,
            });
        }
        Ok(out)
    }

    /// Asks the rollout to pause, resume or abort (applied by its running orchestrator, or at
    /// its next run). Refused when it has finished.
    pub fn request(&mut self, id: &str, what: &str) -> Result<(), RegistryError> {
        let info = self
            .info(id)?
            .ok_or_else(|| RegistryError::Invalid(format!("no rollout {id}")))?;
        if info.phase == "completed" || info.phase == "aborted" {
            return Err(RegistryError::Invalid(format!(
                "rollout {id} is {}; nothing to {what}",
                info.phase
            )));
        }
        if what == "close" && !info.spec.dynamic {
            return Err(RegistryError::Invalid(format!(
                "rollout {id} is not dynamic; nothing to close"
            )));
        }
        self.conn.execute(
            "UPDATE rollouts SET requested = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, what, now_ms()],
        )?;
        Ok(())
    }

    fn append(
        &mut self,
        id: &str,
        changes: &[Change],
        detail: Option<&str>,
        phase: Phase,
        seen: Option<(&str, Option<&str>, Health)>,
    ) -> Result<(), RegistryError> {
        let entry = Entry {
            changes: changes.to_vec(),
            detail: detail.map(str::to_owned),
            seen: seen.map(|(d, v, h)| (d.to_owned(), v.map(str::to_owned), h)),
        };
        self.append_many(id, std::slice::from_ref(&entry), phase)
    }

    /// Appends entries to the trail and records what they saw of devices, in one transaction.
    fn append_many(
        &mut self,
        id: &str,
        entries: &[Entry],
        phase: Phase,
    ) -> Result<(), RegistryError> {
        // IMMEDIATE: the write lock is taken (waiting out other writers) before the read of
        // the last sequence number, so the write cannot fail on a stale snapshot.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Statements are cached: this runs for every few outcomes of a rollout.
        let mut seq: i64 = tx
            .prepare_cached(
                "SELECT COALESCE(max(seq), 0) + 1 FROM rollout_events WHERE rollout_id = ?1",
            )?
            .query_row([id], |r| r.get(0))?;
        let now = now_ms();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO rollout_events (rollout_id, seq, at_ms, change, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut seen = tx.prepare_cached(
                "UPDATE devices SET version = COALESCE(?2, version), health = ?3, last_seen_ms = ?4
                 WHERE id = ?1",
            )?;
            for entry in entries {
                for change in &entry.changes {
                    let json = serde_json::to_string(change).map_err(|e| corrupt(e.to_string()))?;
                    insert.execute(params![id, seq, now, json, entry.detail])?;
                    seq += 1;
                }
                if let Some((device, version, health)) = &entry.seen {
                    seen.execute(params![device, version, health.as_str(), now])?;
                }
            }
        }
        tx.prepare_cached("UPDATE rollouts SET phase = ?2, updated_ms = ?3 WHERE id = ?1")?
            .execute(params![id, phase_name(phase), now])?;
        tx.commit()?;
        Ok(())
    }

    fn take_request(&mut self, id: &str) -> Result<Option<String>, RegistryError> {
        let requested: Option<String> = self
            .conn
            .prepare_cached("SELECT requested FROM rollouts WHERE id = ?1")?
            .query_row([id], |r| r.get(0))?;
        if requested.is_some() {
            self.conn
                .execute("UPDATE rollouts SET requested = NULL WHERE id = ?1", [id])?;
        }
        Ok(requested)
    }

    /// Claims `id` for the runner `me`: refused while another live runner holds it.
    fn claim(&mut self, id: &str, me: &str) -> Result<(), RegistryError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (runner, until): (Option<String>, Option<i64>) = tx
            .query_row(
                "SELECT runner, runner_until_ms FROM rollouts WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| RegistryError::Invalid(format!("no rollout {id}")))?;
        let now = now_ms();
        if let Some(runner) = runner
            && until.is_some_and(|u| u > now)
            && runner_alive(&runner)
        {
            return Err(RegistryError::Busy(format!(
                "rollout {id} is being run by another orchestrator (process {})",
                runner.split(':').next().unwrap_or("?")
            )));
        }
        tx.execute(
            "UPDATE rollouts SET runner = ?2, runner_until_ms = ?3 WHERE id = ?1",
            params![id, me, now + LEASE.as_millis() as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn renew(&mut self, id: &str, me: &str) -> Result<(), RegistryError> {
        let n = self.conn.execute(
            "UPDATE rollouts SET runner_until_ms = ?3 WHERE id = ?1 AND runner = ?2",
            params![id, me, now_ms() + LEASE.as_millis() as i64],
        )?;
        if n == 0 {
            return Err(RegistryError::Busy(format!(
                "rollout {id}: this orchestrator lost its claim (its lease ran out)"
            )));
        }
        Ok(())
    }

    fn release(&mut self, id: &str, me: &str) {
        let released = self.conn.execute(
            "UPDATE rollouts SET runner = NULL, runner_until_ms = NULL WHERE id = ?1 AND runner = ?2",
            params![id, me],
        );
        if let Err(e) = released {
            // The lease runs out on its own.
            tracing::warn!(rollout = id, error = %e, "cannot release the rollout's claim");
        }
    }

    /// Runs (or continues) the rollout `id` until it completes, aborts, or is paused with
    /// nothing in flight. `progress` is called after every recorded outcome. One orchestrator
    /// runs a rollout at a time: while another live one holds it, this fails with
    /// [`RegistryError::Busy`].
    pub async fn run(
        &mut self,
        id: &str,
        progress: impl FnMut(&RolloutInfo),
    ) -> Result<RolloutInfo, RegistryError> {
        match self.claim_run(id)? {
            Claimed::Finished(info) => Ok(info),
            Claimed::Run(claim) => self.run_claim(claim, progress).await,
        }
    }

    /// Claims `id` for running by this value (refused with [`RegistryError::Busy`] while
    /// another live orchestrator holds it); a finished rollout needs no claim.
    pub fn claim_run(&mut self, id: &str) -> Result<Claimed, RegistryError> {
        let info = self
            .info(id)?
            .ok_or_else(|| RegistryError::Invalid(format!("no rollout {id}")))?;
        if info.phase == "completed" || info.phase == "aborted" {
            return Ok(Claimed::Finished(info));
        }
        let me = format!("{}:{}", std::process::id(), uuid_like());
        self.claim(id, &me)?;
        Ok(Claimed::Run(Claim {
            id: id.to_owned(),
            me,
            info,
        }))
    }

    /// Runs a rollout claimed by [`Rollouts::claim_run`] as [`Rollouts::run`] does, then
    /// releases the claim.
    pub async fn run_claim(
        &mut self,
        claim: Claim,
        progress: impl FnMut(&RolloutInfo),
    ) -> Result<RolloutInfo, RegistryError> {
        let Claim { id, me, info } = claim;
        let result = self.run_claimed(&id, &me, info, progress).await;
        self.release(&id, &me);
        result
    }

    async fn run_claimed(
        &mut self,
        id: &str,
        me: &str,
        info: RolloutInfo,
        mut progress: impl FnMut(&RolloutInfo),
    ) -> Result<RolloutInfo, RegistryError> {
        let spec = info.spec.clone();
        // Shared by every push task, not copied into each.
        let options = std::sync::Arc::new(spec.push_options().map_err(RegistryError::Invalid)?);
        let ssh = spec
            .ssh
            .as_ref()
            .map(|s| std::sync::Arc::new(s.options(&options)));
        let client = delivery::client(&options).map_err(RegistryError::Io)?;
        let window = spec
            .window
            .as_ref()
            .map(Window::parse)
            .transpose()
            .map_err(RegistryError::Invalid)?;
        let registry = Registry::open(&self.path)?;
        let artifact: std::sync::Arc<Artifact> = registry
            .artifact(&info.artifact)?
            .ok_or_else(|| RegistryError::Invalid(format!("no artifact {}", info.artifact)))?
            .into();
        let mut targets: Vec<(String, String, crate::registry::Delivery)> = {
            let ids: Vec<String> = self
                .conn
                .prepare(
                    "SELECT device_id FROM rollout_targets WHERE rollout_id = ?1 ORDER BY idx",
                )?
                .query_map([id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut out = Vec::with_capacity(ids.len());
            for device in ids {
                // A device removed from the registry since creation cannot be reached.
                let (address, delivery) = registry
                    .get(&device)?
                    .map(|d| (d.address, d.delivery))
                    .unwrap_or_default();
                out.push((device, address, delivery));
            }
            out
        };
        drop(registry);
        let trail: Vec<Change> = self.events(id)?.into_iter().map(|e| e.change).collect();
        let concurrency = spec.concurrency.max(1) as usize;
        let mut rollout = if trail.is_empty() {
            let (r, changes) = Rollout::with_joining(
                targets.len(),
                spec.plan(),
                spec.threshold_percent,
                concurrency,
                spec.dynamic,
            )
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
            self.append(id, &changes, Some("started"), r.phase(), None)?;
            r
        } else {
            // The targets it was created with: those that joined later come from the trail.
            let joined: usize = trail
                .iter()
                .map(|c| match c {
                    Change::Joined { count } => *count,
                    _ => 0,
                })
                .sum();
            Rollout::replay_joining(
                targets.len().saturating_sub(joined),
                spec.plan(),
                spec.threshold_percent,
                concurrency,
                spec.dynamic,
                &trail,
            )
            .map_err(|e| RegistryError::Invalid(e.to_string()))?
        };
        let mut known: std::collections::HashSet<String> =
            targets.iter().map(|t| t.0.clone()).collect();
        let mut renewed = std::time::Instant::now();
        let mut polled: Option<std::time::Instant> = None;
        let mut in_flight: JoinSet<(usize, Outcome, String, Option<Health>)> = JoinSet::new();
        // Trail entries not written yet: outcomes, requests applied, devices started. They are
        // written together, in one transaction (one fsync), before any new push starts.
        let mut unwritten: Vec<Entry> = Vec::new();
        loop {
            if renewed.elapsed() >= LEASE / 3 {
                blocking(|| self.renew(id, me))?;
                renewed = std::time::Instant::now();
            }
            if rollout.is_open() && polled.is_none_or(|p| p.elapsed() >= JOIN_POLL) {
                polled = Some(std::time::Instant::now());
                let joined =
                    blocking(|| self.join_new(id, &spec.filter, &mut known, &mut rollout))?;
                targets.extend(joined);
            }
            if let Some(request) = self.take_request(id)? {
                let changes = match request.as_str() {
                    "pause" => rollout.pause(),
                    "resume" => rollout.resume(),
                    "close" => rollout.close(),
                    _ => rollout.abort("aborted by request"),
                };
                if let Ok(changes) = changes {
                    unwritten.push(Entry {
                        changes,
                        detail: Some(request),
                        seen: None,
                    });
                }
            }
            // Before the scheduled start, or outside the maintenance window, nothing new starts.
            let now = now_ms();
            let held_back = spec.start_at_ms.is_some_and(|t| now < t)
                || window.as_ref().is_some_and(|w| !w.is_open(now));
            let (work, changes) = if held_back {
                (Vec::new(), Vec::new())
            } else {
                rollout.take_work()
            };
            if !changes.is_empty() {
                unwritten.push(Entry {
                    changes,
                    detail: None,
                    seen: None,
                });
            }
            if !unwritten.is_empty() {
                // Written before any push starts.
                let phase = rollout.phase();
                blocking(|| self.append_many(id, &unwritten, phase))?;
                unwritten.clear();
                let now = RolloutInfo {
                    id: id.to_owned(),
                    artifact: info.artifact.clone(),
                    spec: spec.clone(),
                    targets: targets.len() as u64,
                    phase: phase_name(phase).to_owned(),
                    requested: None,
                    devices: counts(rollout.tally()),
                };
                if let Some(m) = &self.metrics {
                    m.record_progress(&now);
                }
                progress(&now);
            }
            if rollout.phase() == Phase::Paused && in_flight.is_empty() {
                // Nothing more will happen until a resume.
                if let Some(info) = self.info(id)? {
                    return Ok(info);
                }
            }
            for w in work {
                let (index, check) = match w {
                    Work::Push(i) => (i, false),
                    Work::Check(i) => (i, true),
                };
                let (device, address, kind) = targets[index].clone();
                let artifact = std::sync::Arc::clone(&artifact);
                let options = std::sync::Arc::clone(&options);
                let ssh = ssh.clone();
                let metrics = self.metrics.clone();
                let client = client.clone();
                in_flight.spawn(async move {
                    let ssh = match (kind, ssh) {
                        (crate::registry::Delivery::Ssh, Some(ssh)) => Some(ssh),
                        (crate::registry::Delivery::Ssh, None) => {
                            let detail = "an ssh device, and the rollout has no SSH settings";
                            return (index, Outcome::Rejected, detail.to_owned(), None);
                        }
                        (crate::registry::Delivery::Http, _) => None,
                    };
                    if check {
                        let (outcome, detail) = match &ssh {
                            Some(ssh) => check_ssh_device(&address, &artifact.version, ssh).await,
                            None => check_device(&client, &address, &artifact.version).await,
                        };
                        let health = (outcome == Outcome::Succeeded).then_some(Health::Healthy);
                        return (index, outcome, detail, health);
                    }
                    let result = match &ssh {
                        Some(ssh) => crate::ssh::push(&device, &address, &artifact, ssh).await,
                        None => {
                            delivery::push(&client, &device, &address, &artifact, &options).await
                        }
                    };
                    if let Some(m) = &metrics {
                        m.record_push(&result);
                    }
                    let detail = serde_json::to_string(&result).unwrap_or_default();
                    let (outcome, health) = match result {
                        delivery::Outcome::Delivered { .. } => {
                            (Outcome::Succeeded, Some(Health::Healthy))
                        }
                        delivery::Outcome::Rejected { .. } => (Outcome::Rejected, None),
                        delivery::Outcome::Failed { .. } => (Outcome::Failed, None),
                        delivery::Outcome::Unhealthy { .. } => {
                            (Outcome::Failed, Some(Health::Unhealthy))
                        }
                    };
                    (index, outcome, detail, health)
                });
            }
            if in_flight.is_empty() {
                if matches!(
                    rollout.phase(),
                    Phase::Completed | Phase::Aborted | Phase::Paused
                ) {
                    break;
                }
                // Running with nothing to do: wait for a request.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let joined = tokio::select! {
                joined = in_flight.join_next() => joined,
                () = tokio::time::sleep(Duration::from_millis(200)) => continue,
            };
            // Every outcome ready now is recorded in one transaction (one fsync).
            let mut ready = vec![joined];
            while let Some(more) = in_flight.try_join_next() {
                ready.push(Some(more));
            }
            for joined in ready {
                let Some(Ok((index, outcome, detail, health))) = joined else {
                    continue;
                };
                let changes = rollout
                    .finish(index, outcome)
                    .map_err(|e| RegistryError::Invalid(e.to_string()))?;
                let device = targets[index].0.clone();
                let version = (outcome == Outcome::Succeeded).then(|| artifact.version.clone());
                unwritten.push(Entry {
                    changes,
                    detail: Some(detail),
                    seen: health.map(|h| (device, version, h)),
                });
            }
        }
        self.info(id)?
            .ok_or_else(|| corrupt(format!("rollout {id} vanished")))
    }
}

impl Rollouts {
    /// Takes the devices now matching `filter` that are not targets yet into the dynamic
    /// rollout `id`: their target rows and the trail's `joined` entry in one transaction.
    fn join_new(
        &mut self,
        id: &str,
        filter: &FilterSpec,
        known: &mut std::collections::HashSet<String>,
        rollout: &mut Rollout,
    ) -> Result<Vec<(String, String, crate::registry::Delivery)>, RegistryError> {
        let registry = Registry::open(&self.path)?;
        let (matching, _) = registry.list(&filter.at(now_ms())?, 0, usize::MAX)?;
        drop(registry);
        let fresh: Vec<_> = matching
            .into_iter()
            .filter(|d| !known.contains(&d.id))
            .map(|d| (d.id, d.address, d.delivery))
            .collect();
        if fresh.is_empty() {
            return Ok(fresh);
        }
        let start = rollout.devices().len();
        let changes = rollout
            .join(fresh.len())
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO rollout_targets (rollout_id, idx, device_id) VALUES (?1, ?2, ?3)",
            )?;
            for (i, (device, ..)) in fresh.iter().enumerate() {
                insert.execute(params![id, (start + i) as i64, device])?;
            }
            let first: i64 = tx.query_row(
                "SELECT COALESCE(max(seq), 0) + 1 FROM rollout_events WHERE rollout_id = ?1",
                [id],
                |r| r.get(0),
            )?;
            let mut event = tx.prepare_cached(
                "INSERT INTO rollout_events (rollout_id, seq, at_ms, change, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let detail = format!("{} devices joined", fresh.len());
            for (seq, change) in (first..).zip(&changes) {
                let json = serde_json::to_string(change).map_err(|e| corrupt(e.to_string()))?;
                event.execute(params![id, seq, now_ms(), json, detail])?;
            }
        }
        tx.execute(
            "UPDATE rollouts SET targets = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, (start + fresh.len()) as i64, now_ms()],
        )?;
        tx.commit()?;
        for (device, ..) in &fresh {
            known.insert(device.clone());
        }
        Ok(fresh)
    }
}

/// Whether the runner `<pid>:<nonce>` may still be running: its process exists (a runner of
/// this process counts as live; a pid reused by another program holds until the lease ends).
fn runner_alive(runner: &str) -> bool {
    let Some(pid) = runner.split(':').next().and_then(|p| p.parse::<i32>().ok()) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// One outcome's trail entries and what it saw of its device.
struct Entry {
    changes: Vec<Change>,
    detail: Option<String>,
    seen: Option<(String, Option<String>, Health)>,
}

/// Runs blocking SQLite work without stalling the runtime's other tasks (on a multi-thread
/// runtime; a current-thread runtime just runs it).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn counts(t: crate::rollout::Tally) -> DeviceCounts {
    let n = |v: usize| v as u64;
    DeviceCounts {
        pending: n(t.pending),
        in_flight: n(t.in_flight + t.unknown),
        succeeded: n(t.succeeded),
        failed: n(t.failed),
        rejected: n(t.rejected),
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Running => "running",
        Phase::Paused => "paused",
        Phase::Aborted => "aborted",
        Phase::Completed => "completed",
    }
}

/// After a crash: does the device already run `version`?
/// After a crash: does this SSH device already run `version`? Without a version command it
/// cannot tell, and the device is pushed again (the install command must bear a repeat).
async fn check_ssh_device(
    address: &str,
    version: &str,
    ssh: &crate::ssh::SshOptions,
) -> (Outcome, String) {
    match crate::ssh::version(address, ssh).await {
        Ok(v) if v == version => (
            Outcome::Succeeded,
            "check: already runs the new version".into(),
        ),
        Ok(v) => (Outcome::NotYet, format!("check: runs {v:?}")),
        Err(e) => (Outcome::NotYet, format!("check: {e}")),
    }
}

async fn check_device(client: &reqwest::Client, address: &str, version: &str) -> (Outcome, String) {
    let url = format!("http://{address}/version");
    let answer = client
        .get(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    match answer {
        Ok(r) => match r.json::<serde_json::Value>().await {
            Ok(v) if v["version"].as_str() == Some(version) => (
                Outcome::Succeeded,
                "check: already runs the new version".into(),
            ),
            Ok(v) => (Outcome::NotYet, format!("check: runs {}", v["version"])),
            Err(e) => (Outcome::NotYet, format!("check: {e}")),
        },
        Err(e) => (Outcome::NotYet, format!("check: {e}")),
    }
}

fn uuid_like() -> String {
    let mut b = [0u8; 6];
    if getrandom::fill(&mut b).is_err() {
        return format!("{:x}", now_ms());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
