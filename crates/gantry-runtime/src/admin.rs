//! The admin HTTP server: `/health`, `/ready` and `/metrics`.
//!
//! - `GET /health` is liveness: 200 `{"status":"ok"}` while the process serves requests at all.
//! - `GET /ready` is readiness: each registered subsystem's state as JSON; 200 when every one is
//!   ready, 503 otherwise (so a load balancer sends no traffic to a node still opening its storage).
//! - `GET /metrics` is the Prometheus text exposition of [`Metrics`].
//!
//! Subsystems report readiness through a [`ReadyHandle`] they get from [`Readiness::register`].
//! This module serves no system's API; systems mount their own listeners.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// The readiness of every registered subsystem.
///
/// ```
/// use gantry_runtime::admin::Readiness;
///
/// let readiness = Readiness::default();
/// let jobs = readiness.register("jobs");
/// assert!(!readiness.report().ready);
/// jobs.set_ready();
/// assert!(readiness.report().ready);
/// ```
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<Mutex<BTreeMap<String, SubsystemState>>>,
}

/// One subsystem's readiness as `/ready` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubsystemState {
    /// Whether it serves.
    pub ready: bool,
    /// Why not, when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The body of `/ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadinessReport {
    /// True when every subsystem is ready.
    pub ready: bool,
    /// Each subsystem by name.
    pub subsystems: BTreeMap<String, SubsystemState>,
}

/// A subsystem's handle on its own readiness entry.
#[derive(Clone)]
pub struct ReadyHandle {
    name: String,
    readiness: Readiness,
}

impl Readiness {
    /// Adds a subsystem, not ready (`starting`) until its handle says so.
    pub fn register(&self, name: &str) -> ReadyHandle {
        self.set(
            name,
            SubsystemState {
                ready: false,
                reason: Some("starting".to_owned()),
            },
        );
        ReadyHandle {
            name: name.to_owned(),
            readiness: self.clone(),
        }
    }

    /// Every subsystem's state, and whether all are ready.
    pub fn report(&self) -> ReadinessReport {
        let subsystems = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        ReadinessReport {
            ready: subsystems.values().all(|s| s.ready),
            subsystems,
        }
    }

    fn set(&self, name: &str, state: SubsystemState) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), state);
    }
}

impl ReadyHandle {
    /// Marks the subsystem ready.
    pub fn set_ready(&self) {
        self.readiness.set(
            &self.name,
            SubsystemState {
                ready: true,
                reason: None,
            },
        );
    }

    /// Marks the subsystem not ready, saying why (`draining`, `database unreachable`).
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.readiness.set(
            &self.name,
            SubsystemState {
                ready: false,
                reason: Some(reason.into()),
            },
        );
    }
}

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// Rendered by `/metrics`.
    pub metrics: Metrics,
    /// Reported by `/ready`.
    pub readiness: Readiness,
}

/// The admin routes, for serving or for mounting beside other routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves the admin routes on `listener` until `shutdown` is cancelled, then finishes in-flight
/// requests and returns.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    let report = state.readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
