//! Fleet: rolling software updates out to devices.
//!
//! - [`registry`]: the device registry (SQLite): devices, their tags, group, location, version,
//!   last-seen time and health; target filters; CSV and JSON import and export.
//!
//! Not built yet: artifacts and signing, rollouts (waves, health gates, auto-abort), HTTP and SSH
//! delivery, the device simulator, the REST API.

pub mod registry;
