//! `gantry search serve` as a child process: acknowledged writes survive a SIGKILL.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::gantry;

/// A running `gantry search serve`, killed when dropped.
struct SearchServer {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl SearchServer {
    fn start(data: &Path) -> Self {
        let mut child = gantry()
            .args([
                "--log-format",
                "json",
                "search",
                "serve",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--data")
            .arg(data)
            .env("GANTRY_ADMIN_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut admin = None;
        loop {
            let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gantry search serve did not report listening");
            };
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if event["message"] == "admin server listening" {
                admin = event["addr"].as_str().and_then(|a| a.parse().ok());
            }
            if event["message"] == "search server listening" {
                let addr = event["addr"].as_str().unwrap().parse().unwrap();
                // Keep draining the log so the child never blocks on a full pipe.
                std::thread::spawn(move || for _ in rx {});
                let admin = admin.expect("the admin server starts first");
                return Self { child, addr, admin };
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn sigkill(mut self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL).unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for SearchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_documents_survive_sigkill() {
    let dir = crate::temp_dir("search-durability");
    let server = SearchServer::start(&dir);
    let client = reqwest::Client::new();

    let root: Value = client
        .get(server.url("/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(root["tagline"], "You Know, for Search");

    // No periodic refresh: nothing reaches a tantivy commit before the kill, so only the
    // translog can bring the documents back.
    let created = client
        .put(server.url("/ledger"))
        .json(&json!({
            "settings": {"number_of_shards": 2, "refresh_interval": "-1"},
            "mappings": {"properties": {"n": {"type": "long"}, "tag": {"type": "keyword"}}}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);

    // The ledger: every id whose write was acknowledged, with the version it was given.
    let mut acked: Vec<(String, u64)> = Vec::new();
    for n in 0..40 {
        let id = format!("single-{n}");
        let r = client
            .put(server.url(&format!("/ledger/_doc/{id}")))
            .json(&json!({"n": n, "tag": "single"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let body: Value = r.json().await.unwrap();
        acked.push((id, body["_version"].as_u64().unwrap()));
    }
    // Overwrites and an auto-created index with default settings.
    for n in 0..5 {
        let id = format!("single-{n}");
        let r = client
            .put(server.url(&format!("/ledger/_doc/{id}")))
            .json(&json!({"n": n + 1000, "tag": "rewritten"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let version = r.json::<Value>().await.unwrap()["_version"]
            .as_u64()
            .unwrap();
        acked.retain(|(i, _)| i != &id);
        acked.push((id, version));
    }
    let mut bulk = String::new();
    for n in 0..200 {
        bulk.push_str(&format!(
            "{{\"index\":{{\"_index\":\"ledger\",\"_id\":\"bulk-{n}\"}}}}\n"
        ));
        bulk.push_str(&format!("{{\"n\":{n},\"tag\":\"bulk\"}}\n"));
    }
    let r: Value = client
        .post(server.url("/_bulk"))
        .header("content-type", "application/x-ndjson")
        .body(bulk)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["errors"], false);
    for item in r["items"].as_array().unwrap() {
        acked.push((item["index"]["_id"].as_str().unwrap().to_owned(), 1));
    }
    let r = client
        .delete(server.url("/ledger/_doc/single-39"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    acked.retain(|(i, _)| i != "single-39");
    let r = client
        .put(server.url("/auto/_doc/a1"))
        .json(&json!({"msg": "auto-created before the kill"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // The admin server exposes the search metrics.
    let metrics = client
        .get(format!("http://{}/metrics", server.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"gantry_search_requests_total{endpoint="PUT /{index}/_doc/{id}",status="201"} 41"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("gantry_search_documents_indexed_total 246"),
        "{metrics}"
    );
    assert!(metrics.contains("gantry_search_request_duration_seconds_bucket"));
    // Shard refresh durations are exported too.
    assert!(metrics.contains("gantry_search_refresh_duration_seconds_count"));
    // Per-index gauges, refreshed every 5 s: documents, segments and size on disk.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = client
            .get(format!("http://{}/metrics", server.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let size = metrics
            .lines()
            .find(|l| l.starts_with(r#"gantry_search_index_size_bytes{index="auto"}"#))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok());
        if size.is_some_and(|s| s > 0)
            && metrics.contains(r#"gantry_search_index_documents{index="auto",kind="live"}"#)
            && metrics.contains(r#"gantry_search_index_segments{index="auto"}"#)
        {
            break;
        }
        assert!(Instant::now() < deadline, "no per-index gauges: {metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Writes still in flight when the process dies: their outcome is unknown, never checked.
    let in_flight_client = client.clone();
    let in_flight_url = server.url("/ledger/_doc/");
    let in_flight = tokio::spawn(async move {
        for n in 0.. {
            let sent = in_flight_client
                .put(format!("{in_flight_url}late-{n}"))
                .json(&json!({"n": n, "tag": "late"}))
                .send()
                .await;
            if sent.is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.sigkill();
    let _ = in_flight.await;

    let server = SearchServer::start(&dir);
    let count: Value = client
        .post(server.url("/ledger/_count"))
        .json(&json!({"query": {"bool": {"must_not": {"term": {"tag": "late"}}}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        count["count"].as_u64().unwrap(),
        acked.len() as u64,
        "{count}"
    );
    let ids: Vec<&str> = acked.iter().map(|(id, _)| id.as_str()).collect();
    let got: Value = client
        .post(server.url("/ledger/_mget"))
        .json(&json!({"ids": ids}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for ((id, version), doc) in acked.iter().zip(got["docs"].as_array().unwrap()) {
        assert_eq!(doc["found"], true, "{id} lost: {doc}");
        assert_eq!(doc["_version"].as_u64(), Some(*version), "{id}: {doc}");
    }
    let rewritten: Value = client
        .get(server.url("/ledger/_doc/single-3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rewritten["_source"], json!({"n": 1003, "tag": "rewritten"}));
    let deleted = client
        .get(server.url("/ledger/_doc/single-39"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 404);
    let searched: Value = client
        .post(server.url("/ledger/_search"))
        .json(&json!({"query": {"range": {"n": {"gte": 1000}}}, "sort": ["n"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hits: Vec<&str> = searched["hits"]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        hits,
        ["single-0", "single-1", "single-2", "single-3", "single-4"]
    );
    let auto = client
        .get(server.url("/auto/_doc/a1"))
        .send()
        .await
        .unwrap();
    assert_eq!(auto.status(), 200);
    // New writes continue the sequence after the replayed ones.
    let next: Value = client
        .put(server.url("/ledger/_doc/single-0"))
        .json(&json!({"n": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(next["_version"], 3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where `scripts/test` installs the official Python clients: one virtual environment each.
fn client_venvs() -> std::path::PathBuf {
    std::env::var_os("GANTRY_TEST_PYTHON_CLIENTS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/python-clients"),
        Into::into,
    )
}

#[test]
fn official_python_clients_work_unmodified() {
    let venvs = client_venvs();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../gantry-search/tests/clients/official_clients.py");
    let clients = [
        ("elasticsearch8", "elasticsearch"),
        ("elasticsearch9", "elasticsearch"),
        ("opensearch", "opensearch"),
    ];
    for (venv, _) in clients {
        let python = venvs.join(venv).join("bin/python");
        assert!(
            python.exists(),
            "{} is missing: ./scripts/test installs the official clients there \
             (or point GANTRY_TEST_PYTHON_CLIENTS at virtual environments named {:?})",
            python.display(),
            clients.map(|c| c.0)
        );
    }
    let dir = crate::temp_dir("search-clients");
    let server = SearchServer::start(&dir.join("data"));
    for (venv, flavor) in clients {
        let out = std::process::Command::new(venvs.join(venv).join("bin/python"))
            .arg(&script)
            .arg(flavor)
            .arg(server.url(""))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{venv}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("every step passed"));
    }
}
