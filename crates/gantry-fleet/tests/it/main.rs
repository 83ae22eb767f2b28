//! The device registry on a real SQLite file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod registry;
