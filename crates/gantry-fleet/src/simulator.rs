//! The device simulator: N devices speaking the device protocol, each on its own loopback
//! address (127.x.y.z, one port), so each is a separate connection and the local port range is
//! not the limit.
//!
//! One socket listens for them all (the port on every address; connections to anything but a
//! live device's loopback address are closed at once), and the address a connection arrived
//! at says which device answers it — so a fleet of 100 000 devices costs open files only for
//! the connections in use, not one listening socket per device.
//!
//! The protocol (the seed's): `POST /update` with the artifact as the body and headers
//! `X-Device-ID`, `X-Artifact-Version`, `X-Artifact-SHA256`, `X-Artifact-Signature`; a device
//! checks the id, the SHA-256 of the body and (when it has the fleet's public key) the Ed25519
//! signature of that digest, then runs the new version: `200 {"success":true,"version":…}`, or
//! `4xx {"success":false,"error":…}` when it refuses. `GET /version` answers
//! `{"version","updated_at","device_id"}`, `GET /health` 200 `{"status":"ok"}`.
//!
//! Failure injection, chosen per device or per request from a seeded generator: `dead` devices
//! close every connection at once; `reject` devices refuse every update with 409; `flaky` devices answer 503 to
//! their first two update attempts; `fail_rate` makes any update answer 500; `latency` delays
//! every answer.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use axum::{Json, Router};
use ed25519_dalek::VerifyingKey;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::artifact::unhex;
use crate::registry::now_ms;

/// How the simulated fleet behaves.
#[derive(Debug, Clone)]
pub struct SimSpec {
    /// How many devices.
    pub devices: u32,
    /// The port every device listens on (each at its own address).
    pub port: u16,
    /// The version every device starts at.
    pub initial_version: String,
    /// The fleet's public key; without it devices check only the SHA-256.
    pub public_key: Option<VerifyingKey>,
    /// Share of update requests answered 500 (transient).
    pub fail_rate: f64,
    /// Delay before every answer.
    pub latency: Duration,
    /// Share of devices that answer 503 to their first two update attempts.
    pub flaky: f64,
    /// Share of devices that never listen.
    pub dead: f64,
    /// Share of devices that refuse every update (409).
    pub reject: f64,
    /// Seed of the random choices.
    pub seed: u64,
}

/// The address of device `index`: 127.1.0.1 onwards (skipping .0 and .255 host bytes).
pub fn device_ip(index: u32) -> Ipv4Addr {
    // 254 usable host bytes per /24, from 127.1.0.x up.
    let block = index / 254;
    let host = u8::try_from(index % 254 + 1).unwrap_or(1);
    let b = u8::try_from(1 + block / 256).unwrap_or(255);
    let c = u8::try_from(block % 256).unwrap_or(0);
    Ipv4Addr::new(127, b, c, host)
}

/// The index of the device at `ip` (the inverse of [`device_ip`]), if it is one's address.
pub fn device_index(ip: Ipv4Addr) -> Option<u32> {
    let [a, b, c, host] = ip.octets();
    if a != 127 || b == 0 || host == 0 || host == 255 {
        return None;
    }
    let block = (u32::from(b) - 1) * 256 + u32::from(c);
    Some(block * 254 + u32::from(host) - 1)
}

/// The id of device `index`.
pub fn device_id(index: u32) -> String {
    format!("sim-{index:06}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Healthy,
    Dead,
    Reject,
    Flaky,
}

struct Device {
    id: String,
    kind: Kind,
    version: Mutex<(String, i64)>,
    attempts: AtomicU32,
}

struct Shared {
    spec: SimSpec,
    /// Every device, dead ones included, by index.
    devices: Vec<Arc<Device>>,
    rng: Mutex<StdRng>,
    /// Updates applied, across devices.
    applied: AtomicU64,
}

/// Counters of a running simulation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Devices listening.
    pub listening: u32,
    /// Devices that are dead (not listening).
    pub dead: u32,
    /// Updates applied so far.
    pub applied: u64,
}

/// A running simulated fleet.
pub struct Simulation {
    shared: Arc<Shared>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    listening: u32,
    dead: u32,
    /// (device id, address) of every device, dead ones included.
    pub devices: Vec<(String, SocketAddr)>,
}

impl Simulation {
    /// Binds the fleet's port and starts serving every live device.
    pub async fn start(spec: SimSpec) -> std::io::Result<Self> {
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let mut devices = Vec::with_capacity(spec.devices as usize);
        let mut all = Vec::with_capacity(spec.devices as usize);
        let (mut listening, mut dead) = (0, 0);
        for index in 0..spec.devices {
            let roll: f64 = rng.random();
            let kind = if roll < spec.dead {
                Kind::Dead
            } else if roll < spec.dead + spec.reject {
                Kind::Reject
            } else if roll < spec.dead + spec.reject + spec.flaky {
                Kind::Flaky
            } else {
                Kind::Healthy
            };
            let addr = SocketAddr::V4(SocketAddrV4::new(device_ip(index), spec.port));
            let id = device_id(index);
            all.push((id.clone(), addr));
            if kind == Kind::Dead {
                dead += 1;
            } else {
                listening += 1;
            }
            devices.push(Arc::new(Device {
                id,
                kind,
                version: Mutex::new((spec.initial_version.clone(), now_ms())),
                attempts: AtomicU32::new(0),
            }));
        }
        let shared = Arc::new(Shared {
            rng: Mutex::new(StdRng::seed_from_u64(spec.seed.wrapping_add(1))),
            spec: spec.clone(),
            devices,
            applied: AtomicU64::new(0),
        });
        let bind = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, spec.port));
        // Every device's connections queue on this one socket: a deep accept queue, so bursts
        // of connects are not dropped (and retried by the client a second later).
        let inner = (|| {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(bind)?;
            socket.listen(4096)
        })()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("the simulated fleet cannot listen on {bind}: {e}"),
            )
        })?;
        let listener = FleetListener {
            inner,
            shared: Arc::clone(&shared),
        };
        let app = Router::new()
            .route("/update", post(update))
            .route("/version", get(version))
            .route("/health", get(health))
            // Artifacts are firmware images: no 2 MiB default cap on the body.
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(Arc::clone(&shared));
        let stop = CancellationToken::new();
        let server = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let _ = axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<DeviceConn>(),
                )
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            })
        };
        Ok(Self {
            shared,
            stop,
            server,
            listening,
            dead,
            devices: all,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> SimStats {
        SimStats {
            listening: self.listening,
            dead: self.dead,
            applied: self.shared.applied.load(Ordering::Relaxed),
        }
    }

    /// The registry import file for this fleet (CSV; dead devices included, they are part of
    /// the fleet).
    pub fn registry_csv(&self) -> String {
        let mut out = String::from("id,address,delivery,tags,version\n");
        for (id, addr) in &self.devices {
            out.push_str(&format!(
                "{id},{addr},http,sim,{}\n",
                self.shared.spec.initial_version
            ));
        }
        out
    }

    /// Stops every device.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.server.await;
    }
}

/// The device a connection is for: the index of the loopback address it arrived at.
#[derive(Debug, Clone, Copy)]
struct DeviceConn(usize);

impl Connected<IncomingStream<'_, FleetListener>> for DeviceConn {
    fn connect_info(stream: IncomingStream<'_, FleetListener>) -> Self {
        *stream.remote_addr()
    }
}

/// The fleet's one listening socket: hands over connections to live devices' addresses and
/// closes the others.
struct FleetListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl Listener for FleetListener {
    type Io = TcpStream;
    type Addr = DeviceConn;

    async fn accept(&mut self) -> (TcpStream, DeviceConn) {
        loop {
            let stream = match self.inner.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of files or a connection reset before accept: try again shortly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let device = match stream.local_addr() {
                Ok(SocketAddr::V4(local)) => device_index(*local.ip())
                    .and_then(|i| usize::try_from(i).ok())
                    .filter(|&i| {
                        self.shared
                            .devices
                            .get(i)
                            .is_some_and(|d| d.kind != Kind::Dead)
                    }),
                _ => None,
            };
            if let Some(index) = device {
                let _ = stream.set_nodelay(true);
                return (stream, DeviceConn(index));
            }
            // Not a live device's address: closed at once.
        }
    }

    fn local_addr(&self) -> std::io::Result<DeviceConn> {
        Err(std::io::Error::other(
            "the fleet's listener serves many device addresses, not one",
        ))
    }
}

type DeviceState = State<Arc<Shared>>;
type Conn = ConnectInfo<DeviceConn>;

impl Shared {
    fn device(&self, conn: DeviceConn) -> &Device {
        &self.devices[conn.0]
    }
}

fn refuse(status: StatusCode, error: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "success": false, "error": error.into() })),
    )
        .into_response()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn update(
    State(shared): DeviceState,
    ConnectInfo(conn): Conn,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let device = shared.device(conn);
    let spec = &shared.spec;
    if !spec.latency.is_zero() {
        tokio::time::sleep(spec.latency).await;
    }
    let attempt = device.attempts.fetch_add(1, Ordering::Relaxed);
    if header(&headers, "x-device-id") != Some(device.id.as_str()) {
        return refuse(StatusCode::BAD_REQUEST, "X-Device-ID is not this device");
    }
    let Some(version) = header(&headers, "x-artifact-version").filter(|v| !v.is_empty()) else {
        return refuse(StatusCode::BAD_REQUEST, "X-Artifact-Version is missing");
    };
    match device.kind {
        Kind::Reject => return refuse(StatusCode::CONFLICT, "this device refuses updates"),
        Kind::Flaky if attempt < 2 => {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "busy, try again");
        }
        _ => {}
    }
    let fail: f64 = shared
        .rng
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .random();
    if fail < spec.fail_rate {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "injected failure");
    }
    let digest = Sha256::digest(&body);
    let claimed = header(&headers, "x-artifact-sha256").and_then(unhex::<32>);
    if claimed.as_ref().map(<[u8; 32]>::as_slice) != Some(digest.as_slice()) {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "checksum mismatch: the body's SHA-256 is not X-Artifact-SHA256",
        );
    }
    if let Some(key) = &spec.public_key {
        let signature = header(&headers, "x-artifact-signature")
            .and_then(unhex::<64>)
            .map(|b| ed25519_dalek::Signature::from_bytes(&b));
        let verified = signature.is_some_and(|s| {
            use ed25519_dalek::Verifier as _;
            key.verify(digest.as_slice(), &s).is_ok()
        });
        if !verified {
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "signature refused: X-Artifact-Signature does not verify with the fleet key",
            );
        }
    }
    *device
        .version
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = (version.to_owned(), now_ms());
    shared.applied.fetch_add(1, Ordering::Relaxed);
    Json(json!({ "success": true, "device_id": device.id, "version": version })).into_response()
}

async fn version(State(shared): DeviceState, ConnectInfo(conn): Conn) -> Response {
    let device = shared.device(conn);
    if !shared.spec.latency.is_zero() {
        tokio::time::sleep(shared.spec.latency).await;
    }
    let (version, at) = device
        .version
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Json(json!({
        "version": version,
        "updated_at": crate::registry::format_time(at),
        "device_id": device.id,
    }))
    .into_response()
}

async fn health(State(shared): DeviceState) -> Response {
    if !shared.spec.latency.is_zero() {
        tokio::time::sleep(shared.spec.latency).await;
    }
    Json(json!({ "status": "ok" })).into_response()
}

/// Raises the open-file limit to its hard maximum (each connection is a file); returns
/// the limit now in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_addresses_are_distinct_and_skip_network_and_broadcast_bytes() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000 {
            let ip = device_ip(i);
            assert!(ip.is_loopback());
            let host = ip.octets()[3];
            assert!(host != 0 && host != 255, "{ip}");
            assert!(seen.insert(ip), "{ip} twice");
        }
        assert_eq!(device_ip(0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(device_ip(254), Ipv4Addr::new(127, 1, 1, 1));
        for i in [0, 1, 253, 254, 65_023, 65_024, 99_999, 1_000_000] {
            assert_eq!(device_index(device_ip(i)), Some(i));
        }
        assert_eq!(device_index(Ipv4Addr::new(127, 0, 0, 1)), None);
        assert_eq!(device_index(Ipv4Addr::new(10, 1, 0, 1)), None);
    }
}
