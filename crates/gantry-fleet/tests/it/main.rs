//! The device registry on a real SQLite file, and pushes over loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod delivery;
mod registry;
