//! The runtime's servers on real loopback ports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
