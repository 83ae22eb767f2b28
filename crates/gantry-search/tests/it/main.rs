//! Integration tests of gantry-search through its HTTP API on loopback.

mod concurrency;
mod restart;
mod robustness;
mod scenarios;
mod server;
