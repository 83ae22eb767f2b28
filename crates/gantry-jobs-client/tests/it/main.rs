//! The SDK against a real in-process jobs server on loopback with a temporary SQLite database.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client;
mod server;
mod worker;
