//! `gantry serve` as a child process: start, admin endpoints, and shutdown by signal.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::gantry;

/// A running `gantry serve`, killed if the test ends without stopping it.
pub struct Served {
    pub child: Child,
    pub admin: SocketAddr,
    /// The jobs server's address, when it runs on SQLite.
    pub jobs: Option<SocketAddr>,
    /// The jobs server's address, when it runs on PostgreSQL.
    pub jobs_pg: Option<SocketAddr>,
    /// The search server's address, when it runs.
    pub search: Option<SocketAddr>,
    /// The log lines, as they arrive.
    logs: mpsc::Receiver<String>,
}

impl Served {
    fn start(envs: &[(&str, &str)]) -> Self {
        let dir = crate::temp_dir("serve");
        let db = dir.join("jobs.db");
        let search = dir.join("search");
        let mut all = vec![
            ("GANTRY_JOBS_LISTEN", "127.0.0.1:0"),
            ("GANTRY_JOBS_DATABASE", db.to_str().unwrap()),
            ("GANTRY_SEARCH_LISTEN", "127.0.0.1:0"),
            ("GANTRY_SEARCH_DATA", search.to_str().unwrap()),
        ];
        all.extend_from_slice(envs);
        let mut listening = vec!["admin server listening"];
        if !envs.contains(&("GANTRY_JOBS_ENABLED", "false")) {
            listening.push("jobs server listening");
        }
        if !envs.contains(&("GANTRY_SEARCH_ENABLED", "false")) {
            listening.push("search server listening");
        }
        Self::start_with(&["serve"], &all, &listening)
    }

    /// Runs `gantry --log-format json ARGS` and waits for each of the `listening` log messages.
    pub fn start_with(args: &[&str], envs: &[(&str, &str)], listening: &[&str]) -> Self {
        let mut cmd = gantry();
        cmd.args(["--log-format", "json"])
            .args(args)
            .env("GANTRY_ADMIN_LISTEN", "127.0.0.1:0")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut found = std::collections::HashMap::new();
        while found.len() < listening.len() {
            let Ok(line) = logs.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                // Leave no stray server behind.
                let _ = child.kill();
                let _ = child.wait();
                panic!("gantry did not report {listening:?}; got {found:?}");
            };
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let message = event["message"].as_str().unwrap_or_default().to_owned();
            if listening.contains(&message.as_str()) {
                let addr: SocketAddr = event["addr"].as_str().unwrap().parse().unwrap();
                found.insert(message, addr);
            }
        }
        Self {
            child,
            admin: found["admin server listening"],
            jobs: found.get("jobs server listening").copied(),
            jobs_pg: found.get("jobs server listening (PostgreSQL)").copied(),
            search: found.get("search server listening").copied(),
            logs,
        }
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits up to `limit` for the process to exit; returns its exit code and how long it took.
    pub fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gantry serve still running {limit:?} after the signal");
    }

    fn saw_log(&self, message: &str) -> bool {
        self.logs.try_iter().any(|line| {
            serde_json::from_str::<serde_json::Value>(&line)
                .is_ok_and(|event| event["message"] == message)
        })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, content_type, resp.text().await.unwrap())
    })
}

#[test]
fn serve_answers_admin_endpoints_and_exits_0_on_sigterm() {
    let mut served = Served::start(&[]);

    let (status, _, body) = get(served.admin, "/health");
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"status":"ok"}"#);

    let (status, _, body) = get(served.admin, "/ready");
    assert_eq!(status, 200);
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["subsystems"]["jobs"]["ready"], true);
    assert_eq!(ready["subsystems"]["search"]["ready"], true);
    assert!(served.jobs.is_some());
    // The search server answers as Elasticsearch does.
    let search = served.search.expect("search server listening");
    let (status, _, body) = get(search, "/");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["tagline"],
        "You Know, for Search"
    );

    let (status, content_type, body) = get(served.admin, "/metrics");
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain; version=0.0.4"));
    for name in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
        "gantry_build_info",
        "gantry_jobs_queue_depth",
        "gantry_search_requests_total",
    ] {
        assert!(body.contains(&format!("\n{name}")), "{name} missing");
    }

    served.signal(Signal::SIGTERM);
    let (code, took) = served.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(0), "exit after SIGTERM took {took:?}");
    assert!(served.saw_log("shut down cleanly"));
}

#[test]
fn sigint_also_drains_cleanly() {
    let mut served = Served::start(&[]);
    served.signal(Signal::SIGINT);
    let (code, _) = served.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(0));
}

/// Opens a connection to the admin server and leaves a request half-sent, so the graceful drain
/// has an in-flight request to wait for.
fn half_sent_request(addr: SocketAddr) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: gantry\r\n")
        .unwrap();
    // Let the server take the connection before the signal arrives.
    std::thread::sleep(Duration::from_millis(200));
    stream
}

#[test]
fn drain_past_the_deadline_exits_1() {
    let mut served = Served::start(&[
        ("GANTRY_SHUTDOWN_DEADLINE", "500ms"),
        ("GANTRY_JOBS_ENABLED", "false"),
    ]);
    let _stuck = half_sent_request(served.admin);
    served.signal(Signal::SIGTERM);
    let (code, _) = served.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(1));
    assert!(served.saw_log("did not stop before the drain deadline; aborted"));
}

#[test]
fn second_signal_exits_at_once() {
    let mut served = Served::start(&[
        ("GANTRY_SHUTDOWN_DEADLINE", "10m"),
        ("GANTRY_JOBS_ENABLED", "false"),
    ]);
    let _stuck = half_sent_request(served.admin);
    served.signal(Signal::SIGTERM);
    // The drain is now waiting on the half-sent request, and would for ten minutes.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "drain ended early"
    );
    served.signal(Signal::SIGINT);
    let (code, _) = served.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(130));
}

#[test]
fn serve_fails_clearly_when_the_admin_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = gantry()
        .arg("serve")
        .env("GANTRY_ADMIN_LISTEN", &addr)
        .env("GANTRY_JOBS_ENABLED", "false")
        .env("GANTRY_SEARCH_ENABLED", "false")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!("cannot bind the admin server to {addr}")),
        "{stderr}"
    );
}
