//! The results of one scenario run: the figures, the criteria, the table people read and the JSON
//! scripts read.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::criteria::{self, Check};
use super::ledger::KindFigures;
use crate::stats::{Summary, fmt_bytes, fmt_rate, fmt_us, group};

/// Everything a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The scenario.
    pub scenario: String,
    /// What was measured: `gantry (spawned)`, `reseolio (spawned)` or `external`.
    pub server: String,
    /// The address the harness talked to.
    pub target: String,
    /// Jobs the harness tried to enqueue.
    pub offered: u64,
    /// Distinct jobs whose enqueue returned OK.
    pub total: u64,
    /// Of those, finished (SUCCESS, DEAD or CANCELLED) at the end.
    pub completed: u64,
    /// SUCCESS at the end.
    pub succeeded: u64,
    /// DEAD at the end.
    pub dead: u64,
    /// Jobs that ended as their kind expects, over jobs offered.
    pub success_rate: f64,
    /// First enqueue to last finishing ack, seconds.
    pub elapsed_s: f64,
    /// Completed jobs per second over `elapsed_s` (end to end: enqueue, run, ack).
    pub throughput_per_s: f64,
    /// Acknowledged enqueues per second over the enqueue phase.
    pub enqueue_rate_per_s: f64,
    /// Enqueue → a worker received it.
    pub start_latency: Summary,
    /// Enqueue → the ack that finished it returned.
    pub done_latency: Summary,
    /// Jobs run twice at once, or again after a confirmed success.
    pub duplicates: u64,
    /// Of those, jobs that ran twice at once.
    pub concurrent_duplicates: u64,
    /// Of those, jobs run again after a confirmed success.
    pub reruns_after_success: u64,
    /// Acknowledged enqueues that did not finish.
    pub lost: u64,
    /// Of those, still PENDING or RUNNING at the end.
    pub lost_unfinished: u64,
    /// Of those, unknown to the server at the end.
    pub lost_missing: u64,
    /// A few lost job ids.
    pub lost_examples: Vec<String>,
    /// A few duplicated job ids.
    pub duplicate_examples: Vec<String>,
    /// Enqueues that failed for good.
    pub enqueue_errors: u64,
    /// Acks that could not be delivered.
    pub ack_errors: u64,
    /// Acks refused as stale (FAILED_PRECONDITION / NOT_FOUND).
    pub stale_acks: u64,
    /// Worker streams that broke (server gone) or could not be opened.
    pub stream_breaks: u64,
    /// Peak resident memory of the server, when its pid is known.
    pub peak_rss_bytes: Option<u64>,
    /// How the wait for the jobs ended: `all-done` or `stalled`.
    pub settled: String,
    /// Per job kind.
    pub kinds: Vec<KindFigures>,
    /// Scenario-specific figures.
    pub extra: BTreeMap<String, serde_json::Value>,
    /// The criteria, judged.
    pub checks: Vec<Check>,
    /// No criterion failed.
    pub passed: bool,
}

impl Report {
    /// Adds a scenario-specific figure.
    pub fn note(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.extra.insert(key.to_owned(), value.into());
    }

    /// Judges `checks` into the report.
    pub fn judge(&mut self, checks: Vec<Check>) {
        self.passed = criteria::passed(&checks);
        self.checks = checks;
    }

    /// The table for people.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "gantry bench jobs {} — {} at {}",
            self.scenario, self.server, self.target
        );
        let _ = writeln!(
            o,
            "  jobs        offered {}  acknowledged {}  completed {}  (success {}, dead {})",
            group(self.offered),
            group(self.total),
            group(self.completed),
            group(self.succeeded),
            group(self.dead)
        );
        let _ = writeln!(
            o,
            "  success     {:.3} % ended as expected",
            self.success_rate * 100.0
        );
        let _ = writeln!(
            o,
            "  throughput  {} end to end over {:.2} s  (enqueue {})",
            fmt_rate(self.throughput_per_s),
            self.elapsed_s,
            fmt_rate(self.enqueue_rate_per_s)
        );
        let _ = writeln!(
            o,
            "  latency                 p50        p95        p99        max"
        );
        latency_row(&mut o, "enqueue→start", &self.start_latency);
        latency_row(&mut o, "enqueue→done", &self.done_latency);
        if self.kinds.len() > 1 {
            for k in &self.kinds {
                latency_row(&mut o, &format!("{}: start", k.label), &k.start_latency);
            }
        }
        let _ = writeln!(
            o,
            "  duplicates  {}  (running twice at once {}, rerun after success {})",
            self.duplicates, self.concurrent_duplicates, self.reruns_after_success
        );
        let _ = writeln!(
            o,
            "  lost        {}  (pending or running at the end {}, unknown to the server {})",
            self.lost, self.lost_unfinished, self.lost_missing
        );
        if !self.lost_examples.is_empty() {
            let _ = writeln!(o, "    e.g. {}", self.lost_examples.join(", "));
        }
        if !self.duplicate_examples.is_empty() {
            let _ = writeln!(
                o,
                "    duplicated e.g. {}",
                self.duplicate_examples.join(", ")
            );
        }
        let _ = writeln!(
            o,
            "  errors      enqueue {}  ack {}  stale acks {}  stream breaks {}",
            self.enqueue_errors, self.ack_errors, self.stale_acks, self.stream_breaks
        );
        let _ = writeln!(
            o,
            "  server RSS  {}",
            self.peak_rss_bytes.map_or_else(
                || "unknown (no pid: --spawn or --server-pid)".to_owned(),
                |b| { format!("{} peak", fmt_bytes(b)) }
            )
        );
        for (key, value) in &self.extra {
            let _ = writeln!(o, "  {key}: {value}");
        }
        if self.settled != "all-done" {
            let _ = writeln!(
                o,
                "  (stopped waiting: no job finished within the stall timeout)"
            );
        }
        o.push_str(&criteria::render(&self.checks));
        let _ = writeln!(o, "{}", if self.passed { "PASSED" } else { "FAILED" });
        o
    }
}

fn latency_row(o: &mut String, label: &str, s: &Summary) {
    let _ = writeln!(
        o,
        "    {label:<20}{:>10} {:>10} {:>10} {:>10}",
        fmt_us(s.p50_us),
        fmt_us(s.p95_us),
        fmt_us(s.p99_us),
        fmt_us(s.max_us)
    );
}
