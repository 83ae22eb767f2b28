//! The search system's Prometheus metrics (`gantry_search_*`), registered on the process registry.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
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
    /// `gantry_search_index_documents{index,kind}`: live (`kind="live"`) and deleted documents
    /// not yet merged away (`kind="deleted"`), as of the last refresh.
    pub index_documents: IntGaugeVec,
    /// `gantry_search_index_segments{index}`: searchable segments over the index's shards.
    pub index_segments: IntGaugeVec,
    /// `gantry_search_index_size_bytes{index}`: the index's files on disk (segments and translogs).
    pub index_size_bytes: IntGaugeVec,
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
        let index_documents = IntGaugeVec::new(
            Opts::new(
                "gantry_search_index_documents",
                "Documents per index as of its last refresh: live, or deleted and not merged away.",
            ),
            &["index", "kind"],
        )?;
        registry.register(Box::new(index_documents.clone()))?;
        let index_segments = IntGaugeVec::new(
            Opts::new(
                "gantry_search_index_segments",
                "Searchable segments per index, over its shards.",
            ),
            &["index"],
        )?;
        registry.register(Box::new(index_segments.clone()))?;
        let index_size_bytes = IntGaugeVec::new(
            Opts::new(
                "gantry_search_index_size_bytes",
                "Size of an index's files on disk (segments and translogs).",
            ),
            &["index"],
        )?;
        registry.register(Box::new(index_size_bytes.clone()))?;
        Ok(Self {
            requests,
            request_seconds,
            documents_indexed,
            refresh_seconds,
            index_documents,
            index_segments,
            index_size_bytes,
        })
    }

    /// Sets the per-index gauges from `node`'s indices (blocking: it reads directory sizes);
    /// indices deleted since the last call disappear.
    pub fn record_indices(&self, node: &crate::node::Node) {
        self.index_documents.reset();
        self.index_segments.reset();
        self.index_size_bytes.reset();
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for index in node.all() {
            let name = index.name.as_str();
            self.index_documents
                .with_label_values(&[name, "live"])
                .set(n(index.doc_count()));
            self.index_documents
                .with_label_values(&[name, "deleted"])
                .set(n(index.deleted_count()));
            let segments: usize = index
                .shards()
                .iter()
                .map(|s| s.searcher().segment_readers().len())
                .sum();
            self.index_segments
                .with_label_values(&[name])
                .set(i64::try_from(segments).unwrap_or(i64::MAX));
            self.index_size_bytes
                .with_label_values(&[name])
                .set(n(index.size_in_bytes()));
        }
    }

    /// Metrics on a private registry (tests, embedded use).
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        Self::register(&Registry::new())
    }
}
