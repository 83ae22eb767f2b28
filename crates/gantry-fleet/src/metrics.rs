//! Fleet's Prometheus metrics, `gantry_fleet_*`.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::delivery::Outcome;
use crate::orchestrator::RolloutInfo;

/// Every metric fleet updates. Cloning shares them.
#[derive(Clone)]
pub struct FleetMetrics {
    /// `gantry_fleet_devices{health}`: registered devices by health (refreshed by the server).
    pub devices: IntGaugeVec,
    /// `gantry_fleet_pushes_total{outcome}`: pushes by outcome — `delivered`, `rejected`,
    /// `failed` (transient failures until the attempts ran out) or `unhealthy` (the gate).
    pub pushes: IntCounterVec,
    /// `gantry_fleet_push_seconds{phase}`: `push` (first attempt to accepted upload) and
    /// `verify` (the health gate) of delivered pushes.
    pub push_seconds: HistogramVec,
    /// `gantry_fleet_rollout_devices{rollout,state}`: a running rollout's devices by state.
    pub rollout_devices: IntGaugeVec,
    /// `gantry_fleet_rollout_progress_ratio{rollout}`: devices with an outcome / targets.
    pub rollout_progress: GaugeVec,
}

const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl FleetMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            devices: IntGaugeVec::new(
                Opts::new("gantry_fleet_devices", "Registered devices by health."),
                &["health"],
            )?,
            pushes: IntCounterVec::new(
                Opts::new(
                    "gantry_fleet_pushes_total",
                    "Pushes by outcome: delivered, rejected, failed or unhealthy.",
                ),
                &["outcome"],
            )?,
            push_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "gantry_fleet_push_seconds",
                    "Delivered pushes: the upload (phase=push) and the health gate (phase=verify).",
                )
                .buckets(BUCKETS.to_vec()),
                &["phase"],
            )?,
            rollout_devices: IntGaugeVec::new(
                Opts::new(
                    "gantry_fleet_rollout_devices",
                    "A rollout's devices by state, as last seen by the orchestrator running it.",
                ),
                &["rollout", "state"],
            )?,
            rollout_progress: GaugeVec::new(
                Opts::new(
                    "gantry_fleet_rollout_progress_ratio",
                    "A rollout's devices with an outcome over its targets.",
                ),
                &["rollout"],
            )?,
        };
        registry.register(Box::new(m.devices.clone()))?;
        registry.register(Box::new(m.pushes.clone()))?;
        registry.register(Box::new(m.push_seconds.clone()))?;
        registry.register(Box::new(m.rollout_devices.clone()))?;
        registry.register(Box::new(m.rollout_progress.clone()))?;
        Ok(m)
    }

    /// Counts one push's outcome and, when delivered, its latencies.
    pub fn record_push(&self, outcome: &Outcome) {
        let name = match outcome {
            Outcome::Delivered {
                push_ms, verify_ms, ..
            } => {
                self.push_seconds
                    .with_label_values(&["push"])
                    .observe(*push_ms as f64 / 1000.0);
                self.push_seconds
                    .with_label_values(&["verify"])
                    .observe(*verify_ms as f64 / 1000.0);
                "delivered"
            }
            Outcome::Rejected { .. } => "rejected",
            Outcome::Failed { .. } => "failed",
            Outcome::Unhealthy { .. } => "unhealthy",
        };
        self.pushes.with_label_values(&[name]).inc();
    }

    /// Sets a rollout's device gauges and progress.
    pub fn record_progress(&self, info: &RolloutInfo) {
        let d = info.devices;
        for (state, n) in [
            ("pending", d.pending),
            ("in_flight", d.in_flight),
            ("succeeded", d.succeeded),
            ("failed", d.failed),
            ("rejected", d.rejected),
        ] {
            self.rollout_devices
                .with_label_values(&[info.id.as_str(), state])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let ended = d.succeeded + d.failed + d.rejected;
        let ratio = if info.targets == 0 {
            0.0
        } else {
            ended as f64 / info.targets as f64
        };
        self.rollout_progress
            .with_label_values(&[info.id.as_str()])
            .set(ratio);
    }

    /// Sets the registry gauges from counts by health.
    pub fn record_registry(&self, by_health: &[(String, u64)]) {
        self.devices.reset();
        for (health, n) in by_health {
            self.devices
                .with_label_values(&[health.as_str()])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }
}
