//! The `gantry` binary as a user runs it: real child processes, real loopback ports, real signals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bench;
mod cli;
mod fleet;
mod fleet_api;
mod fleet_ssh;
mod jobs;
mod observer;
mod observer_actions;
mod search;
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

/// A fresh directory for one test.
pub fn temp_dir(label: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "gantry-it-{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
