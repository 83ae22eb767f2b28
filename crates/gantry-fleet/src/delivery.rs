//! HTTP delivery to one device: push the artifact, then the health gate.
//!
//! A push is `POST /update` with the artifact streamed from the registry's copy by a reader of
//! its own (every attempt opens the file again, so a retry never sends a half-consumed body) and
//! the headers `X-Device-ID`, `X-Artifact-Version`, `X-Artifact-SHA256`,
//! `X-Artifact-Signature`. One HTTP client per device, so the push and the gate's checks reuse
//! that device's connection and no other's.
//!
//! Outcomes, by what the device said:
//! - connection errors, timeouts, 5xx, 408 and 429 are transient: retried with the policy's backoff
//!   until its attempts run out ([`Outcome::Failed`]);
//! - any other 4xx is a refusal (wrong device, checksum or signature refused, the device will
//!   not update): never retried ([`Outcome::Rejected`]);
//! - 2xx is followed by the health gate: within the gate timeout the device must report the new
//!   version on `GET /version` and answer 200 on `GET /health` ([`Outcome::Delivered`], or
//!   [`Outcome::Unhealthy`]).

use std::time::{Duration, Instant};

use gantry_runtime::retry::RetryPolicy;

use crate::registry::Artifact;

/// How a push went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Pushed, and the device runs the new version and is healthy.
    Delivered {
        /// Push attempts made.
        attempts: u32,
        /// Time from the first attempt to the accepted push, ms.
        push_ms: u64,
        /// Time the health gate took, ms.
        verify_ms: u64,
    },
    /// The device refused the update (4xx); not retried.
    Rejected {
        /// Push attempts made.
        attempts: u32,
        /// The HTTP status.
        status: u16,
        /// What the device said.
        error: String,
    },
    /// Transient failures until the attempts ran out.
    Failed {
        /// Push attempts made.
        attempts: u32,
        /// The last failure.
        error: String,
    },
    /// Pushed, but the device did not report the new version and health in time.
    Unhealthy {
        /// Push attempts made.
        attempts: u32,
        /// What the gate saw last.
        reason: String,
    },
}

/// Push settings.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Timeout of connecting, and of each wait for the device (not of a whole upload).
    pub request_timeout: Duration,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// How long the device has to report the new version and health after a push.
    pub gate_timeout: Duration,
    /// Pause between the gate's checks.
    pub gate_interval: Duration,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            gate_timeout: Duration::from_secs(30),
            gate_interval: Duration::from_millis(200),
        }
    }
}

enum Attempt {
    Accepted,
    Transient(String),
    Refused(u16, String),
}

/// The HTTP client pushes share: one per rollout (or push command). Its pool keeps at most
/// one idle connection per device address, so a device's push, version and health requests
/// reuse one connection, and closes it soon after the device is done. Built once because
/// building a client (its TLS settings and root certificates) costs more than a push.
pub fn client(options: &PushOptions) -> Result<reqwest::Client, String> {
    // Per connect and per read, not per request: a large artifact's upload may take longer
    // than the timeout as long as it keeps moving.
    reqwest::Client::builder()
        .connect_timeout(options.request_timeout)
        .read_timeout(options.request_timeout)
        .pool_max_idle_per_host(1)
        .pool_idle_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

/// Pushes `artifact` to the device `device_id` at `address` (`host:port`) with `client`
/// (from [`client`]).
pub async fn push(
    client: &reqwest::Client,
    device_id: &str,
    address: &str,
    artifact: &Artifact,
    options: &PushOptions,
) -> Outcome {
    let base = if address.contains("://") {
        address.trim_end_matches('/').to_owned()
    } else {
        format!("http://{address}")
    };
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match attempt(client, &base, device_id, artifact).await {
            Attempt::Accepted => break,
            Attempt::Refused(status, error) => {
                return Outcome::Rejected {
                    attempts,
                    status,
                    error,
                };
            }
            Attempt::Transient(error) => match options.retry.next_delay(attempts) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Outcome::Failed { attempts, error },
            },
        }
    }
    let push_ms = millis(started.elapsed());
    let gate_started = Instant::now();
    let deadline = gate_started + options.gate_timeout;
    loop {
        let reason = match gate(client, &base, &artifact.version).await {
            Ok(()) => {
                return Outcome::Delivered {
                    attempts,
                    push_ms,
                    verify_ms: millis(gate_started.elapsed()),
                };
            }
            Err(reason) => reason,
        };
        if Instant::now() + options.gate_interval > deadline {
            return Outcome::Unhealthy { attempts, reason };
        }
        tokio::time::sleep(options.gate_interval).await;
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn attempt(
    client: &reqwest::Client,
    base: &str,
    device_id: &str,
    artifact: &Artifact,
) -> Attempt {
    let body = match artifact_body(artifact).await {
        Ok(b) => b,
        // The registry's own copy is unreadable: not the device's doing, so not a refusal.
        Err(e) => {
            return Attempt::Transient(format!(
                "cannot read the artifact {}: {e}",
                artifact.path.display()
            ));
        }
    };
    let sent = client
        .post(format!("{base}/update"))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Length", artifact.size)
        .header("X-Device-ID", device_id)
        .header("X-Artifact-Version", &artifact.version)
        .header("X-Artifact-SHA256", &artifact.sha256)
        .header("X-Artifact-Signature", &artifact.signature)
        .body(body)
        .send()
        .await;
    let response = match sent {
        Ok(r) => r,
        Err(e) => return Attempt::Transient(describe(&e)),
    };
    let status = response.status();
    if status.is_success() {
        return Attempt::Accepted;
    }
    let text = response.text().await.unwrap_or_default();
    let error = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or(text);
    let error = format!("{status}: {error}");
    if status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
    {
        Attempt::Transient(error)
    } else {
        Attempt::Refused(status.as_u16(), error)
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        format!("cannot connect: {e}")
    } else {
        e.to_string()
    }
}

/// How much of the artifact one read takes.
const CHUNK: usize = 64 * 1024;

/// A fresh reader of the artifact's file, as a request body. Opening it and reading the first
/// chunk is one trip to the blocking pool; an artifact that fits in it is sent from that
/// chunk, a larger one streams the rest from the same open file.
async fn artifact_body(artifact: &Artifact) -> std::io::Result<reqwest::Body> {
    use std::io::Read as _;
    use tokio_stream::StreamExt as _;
    let path = artifact.path.clone();
    let (file, first) = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let mut buf = vec![0u8; CHUNK];
        let mut filled = 0;
        while filled < CHUNK {
            match file.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        buf.truncate(filled);
        Ok::<_, std::io::Error>((file, buf))
    })
    .await
    .map_err(std::io::Error::other)??;
    if first.len() < CHUNK {
        return Ok(reqwest::Body::from(first));
    }
    let rest = tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), CHUNK);
    let head = tokio_stream::once(Ok::<_, std::io::Error>(axum::body::Bytes::from(first)));
    Ok(reqwest::Body::wrap_stream(head.chain(rest)))
}

async fn gate(client: &reqwest::Client, base: &str, version: &str) -> Result<(), String> {
    let reported = client
        .get(format!("{base}/version"))
        .send()
        .await
        .map_err(|e| format!("GET /version: {}", describe(&e)))?;
    if !reported.status().is_success() {
        return Err(format!("GET /version: {}", reported.status()));
    }
    let body: serde_json::Value = reported
        .json()
        .await
        .map_err(|e| format!("GET /version: not JSON: {e}"))?;
    if body["version"].as_str() != Some(version) {
        return Err(format!(
            "the device reports version {}, not {version}",
            body["version"]
        ));
    }
    // The device's last request: its connection is closed after it rather than kept idle in
    // the pool (100 000 idle connections would hold memory and files for nothing).
    let health = client
        .get(format!("{base}/health"))
        .header(reqwest::header::CONNECTION, "close")
        .send()
        .await
        .map_err(|e| format!("GET /health: {}", describe(&e)))?;
    if health.status() != reqwest::StatusCode::OK {
        return Err(format!("GET /health: {}", health.status()));
    }
    Ok(())
}
