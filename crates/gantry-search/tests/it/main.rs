//! Integration tests of gantry-search through its HTTP API on loopback.

mod scenarios;
mod server;
