//! Integration tests against the real PostgreSQL named by `GANTRY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test installs into a schema of its own and
//! watches tables of its own, and drops them at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod capture;
mod dispatch;
mod runner;
