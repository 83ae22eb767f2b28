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
//! - [`simulator`]: N devices speaking the device protocol on their own loopback addresses.
//!
//! Not built yet: rollouts (waves, auto-abort, pause/resume, crash-safe resume), SSH delivery,
//! the REST API.

pub mod artifact;
pub mod delivery;
pub mod registry;
pub mod rollout;
pub mod simulator;
pub mod waves;
