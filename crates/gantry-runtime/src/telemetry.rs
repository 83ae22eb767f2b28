//! Logs and metrics: the `tracing` subscriber and the Prometheus registry.
//!
//! Logs go to stderr (stdout belongs to command output), pretty or one JSON object per line.
//! [`Metrics`] owns the process-wide Prometheus registry: process metrics (resident memory, CPU
//! seconds, open and max file descriptors, start time, threads) and a `gantry_build_info` gauge.
//! Systems register their own collectors on [`Metrics::registry`]; the admin server renders it.

use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFilter, LogFormat};

/// What was built: reported by `gantry version` and the `gantry_build_info` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildInfo {
    /// The package version.
    pub version: &'static str,
    /// The git commit the binary was built from, or `unknown`.
    pub commit: &'static str,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A global subscriber was already installed.
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(String),
    /// A metric could not be registered.
    #[error("cannot register metric: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Installs the global `tracing` subscriber writing to stderr.
pub fn init_tracing(format: LogFormat, filter: &LogFilter) -> Result<(), TelemetryError> {
    let filter = EnvFilter::builder()
        .parse(filter.as_str())
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Pretty => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    result.map_err(|e| TelemetryError::Subscriber(e.to_string()))
}

/// The process-wide Prometheus registry.
///
/// ```
/// use gantry_runtime::telemetry::{BuildInfo, Metrics};
///
/// let metrics = Metrics::new(BuildInfo { version: "1.2.3", commit: "abc" }).unwrap();
/// let text = metrics.render();
/// assert!(text.contains(r#"gantry_build_info{commit="abc",version="1.2.3"} 1"#));
/// ```
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// A registry holding the process metrics and the build-info gauge.
    pub fn new(build: BuildInfo) -> Result<Self, TelemetryError> {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let info = IntGaugeVec::new(
            Opts::new(
                "gantry_build_info",
                "Build of the running gantry binary; the value is always 1.",
            ),
            &["version", "commit"],
        )?;
        info.with_label_values(&[build.version, build.commit])
            .set(1);
        registry.register(Box::new(info))?;
        Ok(Self { registry })
    }

    /// The registry systems add their collectors to.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec fails only on metric families that break the text format's rules,
        // which registration has already refused.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_process_metrics_and_build_info() {
        let m = Metrics::new(BuildInfo {
            version: "0.0.0",
            commit: "deadbeef",
        })
        .unwrap();
        let text = m.render();
        for name in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                text.contains(&format!("\n{name} ")),
                "{name} missing:\n{text}"
            );
        }
        assert!(text.contains(r#"gantry_build_info{commit="deadbeef",version="0.0.0"} 1"#));
    }
}
