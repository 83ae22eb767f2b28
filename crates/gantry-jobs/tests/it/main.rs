//! The jobs crate through its public interfaces: stores against real databases, the gRPC server
//! on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod grpc;
mod schedules;
mod store;
mod work;
