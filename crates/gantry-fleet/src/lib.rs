//! Fleet: rolling software updates out to devices.
//!
//! - [`registry`]: the device registry (SQLite): devices, their tags, group, location, version,
//!   last-seen time and health; target filters; CSV and JSON import and export; artifacts.
//! - [`artifact`]: Ed25519 keys, hashing and signing of artifact files.
//! - [`delivery`]: HTTP push of an artifact to one device, retries of transient failures, and
//!   the health gate.
//! - [`waves`] (pure): cutting a rollout's targets into a canary and growing waves; the
//!   per-wave abort threshold.
//! - [`rollout`] (pure): the rollout state machine — what to push next, wave judging, pause,
//!   resume, abort, the audit trail and replay after a crash.
//! - [`orchestrator`]: rollouts on disk (targets fixed at creation, the audit trail written
//!   before it is acted on) and the loop that runs them with concurrent pushes.
//! - [`window`] (pure): maintenance windows (cron + duration + time zone).
//! - [`simulator`]: N devices speaking the device protocol on their own loopback addresses.
//! - [`ssh`]: SSH delivery to one device (OpenSSH's `scp` and `ssh`, key authentication, host
//!   keys checked against a known_hosts file).
//!
//! - [`api`]: the REST JSON API over the registry and rollouts, with a server-sent-events
//!   stream of a rollout's trail.
//! - [`metrics`]: `gantry_fleet_*` Prometheus metrics.

pub mod api;
pub mod artifact;
pub mod delivery;
pub mod metrics;
pub mod orchestrator;
pub mod registry;
pub mod rollout;
pub mod simulator;
pub mod ssh;
pub mod waves;
pub mod window;
