//! The jobs engine's Prometheus metrics, registered on the process registry.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every metric the engine updates.
#[derive(Clone)]
pub struct JobsMetrics {
    /// `gantry_jobs_enqueued_total{name}`: jobs created (deduplicated enqueues not counted).
    pub enqueued: IntCounterVec,
    /// `gantry_jobs_started_total{name}`: attempts handed to a worker.
    pub started: IntCounterVec,
    /// `gantry_jobs_succeeded_total{name}`.
    pub succeeded: IntCounterVec,
    /// `gantry_jobs_failed_total{name}`: failed attempts (retried or not).
    pub failed: IntCounterVec,
    /// `gantry_jobs_dead_total{name}`: jobs that went to the dead-letter queue.
    pub dead: IntCounterVec,
    /// `gantry_jobs_cancelled_total{name}`.
    pub cancelled: IntCounterVec,
    /// `gantry_jobs_queue_depth{status}`: jobs by status, refreshed periodically.
    pub depth: IntGaugeVec,
    /// `gantry_jobs_workers`: connected worker streams.
    pub workers: IntGauge,
    /// `gantry_jobs_start_delay_seconds`: from due (enqueue or run time) to handed to a worker.
    pub start_delay_seconds: Histogram,
    /// `gantry_jobs_run_seconds`: from attempt start to its outcome.
    pub run_seconds: Histogram,
    /// `gantry_jobs_ack_seconds`: time to commit an ack.
    pub ack_seconds: Histogram,
    /// `gantry_jobs_schedule_fired_total{schedule}`: jobs enqueued by cron schedules.
    pub schedule_fired: IntCounterVec,
    /// `gantry_jobs_schedule_late_total{schedule}`: due checks that found ticks missed (the
    /// server was down or stalled): coalesced into one job, or dropped under misfire `skip`.
    pub schedule_late: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

impl JobsMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), &["name"])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram = |name: &str, help: &str| -> Result<Histogram, prometheus::Error> {
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let depth = IntGaugeVec::new(
            Opts::new("gantry_jobs_queue_depth", "Jobs by status."),
            &["status"],
        )?;
        registry.register(Box::new(depth.clone()))?;
        let workers = IntGauge::new("gantry_jobs_workers", "Connected worker streams.")?;
        registry.register(Box::new(workers.clone()))?;
        let per_schedule = |name: &str, help: &str| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), &["schedule"])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let schedule_fired = per_schedule(
            "gantry_jobs_schedule_fired_total",
            "Jobs enqueued by cron schedules.",
        )?;
        let schedule_late = per_schedule(
            "gantry_jobs_schedule_late_total",
            "Schedule checks that found ticks missed.",
        )?;
        Ok(Self {
            enqueued: counter("gantry_jobs_enqueued_total", "Jobs created.")?,
            started: counter("gantry_jobs_started_total", "Attempts handed to workers.")?,
            succeeded: counter("gantry_jobs_succeeded_total", "Jobs that succeeded.")?,
            failed: counter("gantry_jobs_failed_total", "Failed attempts.")?,
            dead: counter(
                "gantry_jobs_dead_total",
                "Jobs moved to the dead-letter queue.",
            )?,
            cancelled: counter("gantry_jobs_cancelled_total", "Jobs cancelled.")?,
            depth,
            workers,
            start_delay_seconds: histogram(
                "gantry_jobs_start_delay_seconds",
                "From due to handed to a worker.",
            )?,
            run_seconds: histogram("gantry_jobs_run_seconds", "From attempt start to outcome.")?,
            ack_seconds: histogram("gantry_jobs_ack_seconds", "Time to commit an ack.")?,
            schedule_fired,
            schedule_late,
        })
    }

    /// Metrics on a private registry, for tests and tools that export nothing.
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        Self::register(&Registry::new())
    }
}
