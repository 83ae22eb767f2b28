//! The `gantry` binary as a user runs it: real child processes, real loopback ports, real signals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod serve;

use std::process::Command;

/// A command running the `gantry` binary under test, with no `GANTRY_*` variables inherited.
pub fn gantry() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gantry"));
    for (key, _) in std::env::vars() {
        if key.starts_with("GANTRY_") {
            cmd.env_remove(key);
        }
    }
    cmd
}
