//! The observer's Prometheus metrics, `gantry_observer_*`.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every metric the observer updates. Cloning shares them.
#[derive(Clone)]
pub struct ObserverMetrics {
    /// `gantry_observer_events_captured_total`: change-log rows the leader read.
    pub captured: IntCounter,
    /// `gantry_observer_events_matched_total{observer}`: events an observer matched.
    pub matched: IntCounterVec,
    /// `gantry_observer_condition_errors_total{observer}`: conditions that could not be
    /// evaluated on an event (not a match; logged).
    pub condition_errors: IntCounterVec,
    /// `gantry_observer_actions_total{observer,action,outcome}`: attempts by outcome —
    /// `delivered`, `failed` (will retry), `dead_lettered` or `deferred` (an open breaker).
    pub actions: IntCounterVec,
    /// `gantry_observer_action_seconds{observer,action}`: one attempt, start to outcome.
    pub action_seconds: HistogramVec,
    /// `gantry_observer_delivery_seconds`: from the row's change to its action delivered.
    pub delivery_seconds: Histogram,
    /// `gantry_observer_lag_seconds`: now − change time of the oldest change not yet handed
    /// over (the leader's view; 0 on standbys).
    pub lag_seconds: prometheus::Gauge,
    /// `gantry_observer_leader`: 1 while this process leads its observer set.
    pub leader: IntGauge,
    /// `gantry_observer_dedup_total{result}`: action results found in Redis (`hit`: the
    /// action had already been delivered, so it is not repeated) or not (`miss`).
    pub dedup: IntCounterVec,
    /// `gantry_observer_redis_up`: 1 while Redis answers (0 when it does not, or is not
    /// configured).
    pub redis_up: IntGauge,
    /// `gantry_observer_breaker_state{endpoint}`: 0 closed, 1 half-open, 2 open.
    pub breaker_state: IntGaugeVec,
}

const ACTION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

const DELIVERY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
];

impl ObserverMetrics {
    /// Creates the metrics, unregistered.
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            captured: IntCounter::new(
                "gantry_observer_events_captured_total",
                "Change-log rows read by the leader.",
            )?,
            matched: IntCounterVec::new(
                Opts::new(
                    "gantry_observer_events_matched_total",
                    "Events an observer matched.",
                ),
                &["observer"],
            )?,
            condition_errors: IntCounterVec::new(
                Opts::new(
                    "gantry_observer_condition_errors_total",
                    "Conditions that could not be evaluated on an event.",
                ),
                &["observer"],
            )?,
            actions: IntCounterVec::new(
                Opts::new(
                    "gantry_observer_actions_total",
                    "Action attempts by outcome: delivered, failed (retried), dead_lettered or \
                     deferred (circuit open).",
                ),
                &["observer", "action", "outcome"],
            )?,
            action_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "gantry_observer_action_seconds",
                    "One action attempt, start to outcome.",
                )
                .buckets(ACTION_BUCKETS.to_vec()),
                &["observer", "action"],
            )?,
            delivery_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "gantry_observer_delivery_seconds",
                    "From the row's change to its action delivered.",
                )
                .buckets(DELIVERY_BUCKETS.to_vec()),
            )?,
            lag_seconds: prometheus::Gauge::new(
                "gantry_observer_lag_seconds",
                "Now minus the change time of the oldest change not yet handed over.",
            )?,
            leader: IntGauge::new(
                "gantry_observer_leader",
                "1 while this process leads its observer set.",
            )?,
            dedup: IntCounterVec::new(
                Opts::new(
                    "gantry_observer_dedup_total",
                    "Action results looked up in Redis before an attempt: hit (already \
                     delivered, not repeated) or miss.",
                ),
                &["result"],
            )?,
            redis_up: IntGauge::new("gantry_observer_redis_up", "1 while Redis answers.")?,
            breaker_state: IntGaugeVec::new(
                Opts::new(
                    "gantry_observer_breaker_state",
                    "Circuit breaker per endpoint: 0 closed, 1 half-open, 2 open.",
                ),
                &["endpoint"],
            )?,
        })
    }

    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::new()?;
        registry.register(Box::new(m.captured.clone()))?;
        registry.register(Box::new(m.matched.clone()))?;
        registry.register(Box::new(m.condition_errors.clone()))?;
        registry.register(Box::new(m.actions.clone()))?;
        registry.register(Box::new(m.action_seconds.clone()))?;
        registry.register(Box::new(m.delivery_seconds.clone()))?;
        registry.register(Box::new(m.lag_seconds.clone()))?;
        registry.register(Box::new(m.leader.clone()))?;
        registry.register(Box::new(m.dedup.clone()))?;
        registry.register(Box::new(m.redis_up.clone()))?;
        registry.register(Box::new(m.breaker_state.clone()))?;
        Ok(m)
    }
}

impl std::fmt::Debug for ObserverMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObserverMetrics").finish_non_exhaustive()
    }
}
