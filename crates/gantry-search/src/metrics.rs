//! The search system's Prometheus metrics (`gantry_search_*`), registered on the process registry.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric the search API and shards update.
#[derive(Clone, Debug)]
pub struct SearchMetrics {
    /// `gantry_search_requests_total{endpoint,status}`.
    pub requests: IntCounterVec,
    /// `gantry_search_request_duration_seconds{endpoint}`.
    pub request_seconds: HistogramVec,
    /// `gantry_search_documents_indexed_total`: index, create and update operations applied.
    pub documents_indexed: IntCounter,
    /// `gantry_search_refresh_duration_seconds`: every shard refresh (tantivy commit + reader
    /// reload), periodic or requested.
    pub refresh_seconds: Histogram,
}

impl SearchMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "gantry_search_requests_total",
                "HTTP requests by endpoint and status.",
            ),
            &["endpoint", "status"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "gantry_search_request_duration_seconds",
                "HTTP request latency by endpoint.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint"],
        )?;
        registry.register(Box::new(request_seconds.clone()))?;
        let documents_indexed = IntCounter::new(
            "gantry_search_documents_indexed_total",
            "Documents indexed (index, create, update).",
        )?;
        registry.register(Box::new(documents_indexed.clone()))?;
        let refresh_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "gantry_search_refresh_duration_seconds",
                "Shard refreshes, periodic or requested (tantivy commit plus reader reload).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(refresh_seconds.clone()))?;
        Ok(Self {
            requests,
            request_seconds,
            documents_indexed,
            refresh_seconds,
        })
    }

    /// Metrics on a private registry (tests, embedded use).
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        Self::register(&Registry::new())
    }
}
