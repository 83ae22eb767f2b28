//! The REST JSON API (`gantry fleet serve`): devices, artifacts and rollouts, and a
//! server-sent-events stream of a rollout's audit trail.
//!
//! Every route reads and writes the same SQLite registry the CLI uses, so the CLI and the API
//! can be mixed freely. Rollouts started through the API run inside the server; one a server
//! was running when it stopped (or crashed) is continued when it starts again. Errors are
//! `{"error": {"type": ..., "message": ...}}` with 400 (bad input), 404 (unknown device,
//! artifact or rollout), 409 (taken id, finished rollout, rollout run elsewhere) or 500.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::FleetMetrics;
use crate::orchestrator::{Claimed, RolloutSpec, Rollouts};
use crate::registry::{Device, FilterSpec, Format, Registry, RegistryError, now_ms, parse_time};
use crate::window::WindowSpec;

/// What the API serves from.
pub struct ApiState {
    db: PathBuf,
    signing_key: Option<PathBuf>,
    metrics: Option<Arc<FleetMetrics>>,
    /// Rollouts this server runs, by id.
    running: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl ApiState {
    /// Serves the registry at `db`; artifacts uploaded through the API are signed with the
    /// key at `signing_key` (without one, uploads are refused).
    pub fn new(
        db: PathBuf,
        signing_key: Option<PathBuf>,
        metrics: Option<Arc<FleetMetrics>>,
    ) -> Self {
        Self {
            db,
            signing_key,
            metrics,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Continues the rollouts left running (phase `running`) whose orchestrator is gone;
    /// returns their ids.
    pub async fn resume_running(self: &Arc<Self>) -> Result<Vec<String>, ApiError> {
        let db = self.db.clone();
        let all = blocking(move || Rollouts::open(&db)?.list()).await?;
        let mut resumed = Vec::new();
        for info in all.into_iter().filter(|r| r.phase == "running") {
            match self.start(&info.id).await {
                Ok(()) => resumed.push(info.id),
                Err(e) => tracing::warn!(rollout = info.id, error = %e.message, "not resumed"),
            }
        }
        Ok(resumed)
    }

    /// Refreshes the registry gauges.
    pub async fn refresh_metrics(&self) -> Result<(), ApiError> {
        let Some(metrics) = self.metrics.clone() else {
            return Ok(());
        };
        let db = self.db.clone();
        let counts = blocking(move || Registry::open(&db)?.count_by_health()).await?;
        metrics.record_registry(&counts);
        Ok(())
    }

    /// Starts running `id` in this server: refused (409) while another orchestrator (here or
    /// elsewhere) runs it.
    async fn start(self: &Arc<Self>, id: &str) -> Result<(), ApiError> {
        if let Some(handle) = self.lock_running().get(id)
            && !handle.is_finished()
        {
            return Err(ApiError::conflict(format!(
                "rollout {id} is already running in this server"
            )));
        }
        let db = self.db.clone();
        let metrics = self.metrics.clone();
        let wanted = id.to_owned();
        // The claim is taken here, so a rollout run elsewhere is refused to the caller (409).
        let (mut rollouts, claimed) = blocking(move || {
            let mut r = Rollouts::open(&db)?;
            if let Some(m) = metrics {
                r = r.with_metrics(m);
            }
            let claimed = r.claim_run(&wanted)?;
            Ok((r, claimed))
        })
        .await?;
        let claim = match claimed {
            Claimed::Run(claim) => claim,
            Claimed::Finished(info) => {
                return Err(ApiError::conflict(format!(
                    "rollout {id} is {}; nothing to start",
                    info.phase
                )));
            }
        };
        let task_id = id.to_owned();
        let handle = tokio::spawn(async move {
            match rollouts.run_claim(claim, |_| {}).await {
                Ok(info) => {
                    tracing::info!(rollout = task_id, phase = info.phase, "rollout stopped");
                }
                Err(e) => tracing::warn!(rollout = task_id, error = %e, "rollout failed"),
            }
        });
        self.lock_running().insert(id.to_owned(), handle);
        Ok(())
    }

    fn lock_running(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::JoinHandle<()>>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops the rollouts this server runs (their claims run out; a restart continues them).
    pub fn stop_all(&self) {
        for (_, handle) in self.lock_running().drain() {
            handle.abort();
        }
    }
}

/// Serves the API on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// The routes, under `/v1`.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/devices", get(list_devices).post(add_device))
        .route("/v1/devices/import", post(import_devices))
        .route("/v1/devices/export", get(export_devices))
        .route("/v1/devices/{id}", get(get_device).delete(remove_device))
        .route("/v1/artifacts", get(list_artifacts).post(add_artifact))
        .route("/v1/artifacts/{version}", get(get_artifact))
        .route("/v1/rollouts", get(list_rollouts).post(create_rollout))
        .route("/v1/rollouts/{id}", get(get_rollout))
        .route("/v1/rollouts/{id}/events", get(rollout_events))
        .route("/v1/rollouts/{id}/events/stream", get(stream_events))
        .route("/v1/rollouts/{id}/{action}", post(rollout_action))
        .with_state(state)
}

/// An API error: its status, type and message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid",
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "not_found",
            message: message.into(),
        }
    }

    fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            kind: "conflict",
            message: message.into(),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        match e {
            RegistryError::Invalid(m)
                if m.starts_with("no rollout") || m.starts_with("no artifact") =>
            {
                Self::not_found(m)
            }
            RegistryError::Invalid(m)
                if m.contains(" is completed") || m.contains(" is aborted") =>
            {
                Self::conflict(m)
            }
            RegistryError::Invalid(m) => Self::bad(m),
            RegistryError::Exists(_) | RegistryError::Busy(_) => Self::conflict(message),
            RegistryError::Database(_) | RegistryError::Io(_) => Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                kind: "internal",
                message,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"type": self.kind, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs registry work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "internal",
            message: format!("registry task: {e}"),
        }),
    }
}

/// Filters as query parameters: `tag` (comma-separated, all must match), `group`,
/// `location`, `version` (a semver requirement), `seen_within` and `unseen_for` (durations
/// such as `1h`), and `offset` / `limit` for listings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterQuery {
    tag: Option<String>,
    group: Option<String>,
    location: Option<String>,
    version: Option<String>,
    seen_within: Option<String>,
    unseen_for: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
    format: Option<String>,
}

impl FilterQuery {
    fn spec(&self) -> ApiResult<FilterSpec> {
        let duration = |name: &str, v: &Option<String>| -> ApiResult<Option<u64>> {
            v.as_deref()
                .map(|s| {
                    humantime::parse_duration(s)
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                        .map_err(|e| ApiError::bad(format!("{name} {s:?}: {e}")))
                })
                .transpose()
        };
        Ok(FilterSpec {
            tags: self
                .tag
                .as_deref()
                .map(|t| t.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
            group: self.group.clone(),
            location: self.location.clone(),
            version: self.version.clone(),
            seen_within_ms: duration("seen_within", &self.seen_within)?,
            unseen_for_ms: duration("unseen_for", &self.unseen_for)?,
        })
    }
}

fn query<T: Default>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<T> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad(e.body_text()))
}

fn body<T>(b: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> ApiResult<T> {
    b.map(|Json(b)| b).map_err(|e| ApiError::bad(e.body_text()))
}

async fn list_devices(
    State(s): State<Arc<ApiState>>,
    q: Result<Query<FilterQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let q = query(q)?;
    let filter = q.spec()?.at(now_ms())?;
    let (offset, limit) = (q.offset.unwrap_or(0), q.limit.unwrap_or(100));
    let db = s.db.clone();
    let (devices, total) =
        blocking(move || Registry::open(&db)?.list(&filter, offset, limit)).await?;
    Ok(Json(json!({"total": total, "devices": devices})))
}

async fn add_device(
    State(s): State<Arc<ApiState>>,
    b: Result<Json<Device>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<Device>)> {
    let mut device = body(b)?;
    if device.name.is_empty() {
        device.name = device.id.clone();
    }
    device.check().map_err(ApiError::bad)?;
    let db = s.db.clone();
    let stored = device.clone();
    blocking(move || Registry::open(&db)?.add(&stored)).await?;
    Ok((StatusCode::CREATED, Json(device)))
}

async fn get_device(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Device>> {
    let db = s.db.clone();
    let wanted = id.clone();
    blocking(move || Registry::open(&db)?.get(&wanted))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no device {id}")))
}

async fn remove_device(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let db = s.db.clone();
    let wanted = id.clone();
    if blocking(move || Registry::open(&db)?.remove(&wanted)).await? {
        Ok(Json(json!({"removed": id})))
    } else {
        Err(ApiError::not_found(format!("no device {id}")))
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// `POST /v1/devices/import`: CSV (the export's columns), or a JSON array with
/// `Content-Type: application/json`. All records or none: a bad one is named with its line.
async fn import_devices(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    data: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let format = if is_json(&headers) {
        Format::Json
    } else {
        Format::Csv
    };
    let db = s.db.clone();
    let n = blocking(move || Registry::open(&db)?.import(&data[..], format)).await?;
    Ok(Json(json!({"imported": n})))
}

async fn export_devices(
    State(s): State<Arc<ApiState>>,
    q: Result<Query<FilterQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let filter = q.spec()?.at(now_ms())?;
    let (format, content_type) = match q.format.as_deref() {
        None | Some("csv") => (Format::Csv, "text/csv"),
        Some("json") => (Format::Json, "application/json"),
        Some(other) => return Err(ApiError::bad(format!("format {other:?}: csv or json"))),
    };
    let db = s.db.clone();
    let out = blocking(move || {
        let mut out = Vec::new();
        Registry::open(&db)?.export(&filter, format, &mut out)?;
        Ok(out)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, content_type)], out).into_response())
}

async fn list_artifacts(State(s): State<Arc<ApiState>>) -> ApiResult<Json<serde_json::Value>> {
    let db = s.db.clone();
    let all = blocking(move || Registry::open(&db)?.artifacts()).await?;
    Ok(Json(json!({"artifacts": all})))
}

async fn get_artifact(
    State(s): State<Arc<ApiState>>,
    Path(version): Path<String>,
) -> ApiResult<Json<crate::registry::Artifact>> {
    let db = s.db.clone();
    let wanted = version.clone();
    blocking(move || Registry::open(&db)?.artifact(&wanted))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no artifact {version}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    version: Option<String>,
}

/// `POST /v1/artifacts?version=V` with the file as the body: stored, hashed and signed with
/// the server's key.
async fn add_artifact(
    State(s): State<Arc<ApiState>>,
    q: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    data: Bytes,
) -> ApiResult<(StatusCode, Json<crate::registry::Artifact>)> {
    let version = query(q)?
        .version
        .ok_or_else(|| ApiError::bad("the query parameter version is missing"))?;
    let key_path = s.signing_key.clone().ok_or_else(|| {
        ApiError::bad("this server has no signing key (gantry fleet serve --signing-key)")
    })?;
    let db = s.db.clone();
    let artifact = blocking(move || {
        let key = crate::artifact::read_signing_key(&key_path)
            .map_err(|e| RegistryError::Io(e.to_string()))?;
        let mut registry = Registry::open(&db)?;
        // The upload goes through a file so registration copies and hashes it as for the CLI.
        let staging = db.with_extension(format!("upload-{}-{}", std::process::id(), now_ms()));
        std::fs::write(&staging, &data)
            .map_err(|e| RegistryError::Io(format!("cannot write {}: {e}", staging.display())))?;
        let result = registry.add_artifact(&version, &staging, &key);
        let _ = std::fs::remove_file(&staging);
        result
    })
    .await?;
    Ok((StatusCode::CREATED, Json(artifact)))
}

fn default_canary() -> u32 {
    1
}
fn default_batch() -> u32 {
    10
}
fn default_threshold() -> f64 {
    10.0
}
fn default_concurrency() -> u32 {
    50
}
fn default_attempts() -> u32 {
    3
}
fn default_retry_delay() -> u64 {
    1000
}
fn default_timeout() -> u64 {
    30_000
}

/// `POST /v1/rollouts`: the CLI's `rollout create` flags as JSON (durations in ms).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRollout {
    artifact: String,
    #[serde(default)]
    filter: FilterSpec,
    #[serde(default = "default_canary")]
    canary: u32,
    #[serde(default)]
    canary_percent: bool,
    #[serde(default = "default_batch")]
    batch: u32,
    #[serde(default)]
    growth: Option<f64>,
    #[serde(default = "default_threshold")]
    threshold_percent: f64,
    #[serde(default = "default_concurrency")]
    concurrency: u32,
    #[serde(default = "default_attempts")]
    attempts: u32,
    #[serde(default = "default_retry_delay")]
    retry_delay_ms: u64,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_timeout")]
    gate_timeout_ms: u64,
    /// RFC 3339.
    #[serde(default)]
    start_at: Option<String>,
    #[serde(default)]
    window: Option<WindowSpec>,
    #[serde(default)]
    ssh: Option<crate::ssh::SshSpec>,
    #[serde(default)]
    dynamic: bool,
    /// Start running it in this server at once.
    #[serde(default)]
    start: bool,
}

async fn create_rollout(
    State(s): State<Arc<ApiState>>,
    b: Result<Json<CreateRollout>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<crate::orchestrator::RolloutInfo>)> {
    let c = body(b)?;
    let start_at_ms = c
        .start_at
        .as_deref()
        .map(|t| parse_time(t).map_err(|e| ApiError::bad(format!("start_at: {e}"))))
        .transpose()?;
    let spec = RolloutSpec {
        canary: c.canary,
        canary_percent: c.canary_percent,
        batch: c.batch,
        growth: c.growth.unwrap_or(0.0),
        threshold_percent: c.threshold_percent,
        concurrency: c.concurrency,
        attempts: c.attempts,
        retry_delay_ms: c.retry_delay_ms,
        timeout_ms: c.timeout_ms,
        gate_timeout_ms: c.gate_timeout_ms,
        start_at_ms,
        window: c.window,
        ssh: c.ssh,
        filter: c.filter,
        dynamic: c.dynamic,
    };
    let db = s.db.clone();
    let artifact = c.artifact;
    let info = blocking(move || {
        Rollouts::open(&db)?
            .create(&artifact, spec)
            .map_err(|e| match e {
                // An unknown artifact in a body is bad input, not a missing resource.
                RegistryError::Invalid(m) if m.starts_with("no artifact") => {
                    RegistryError::Invalid(format!("unknown artifact: {m}"))
                }
                e => e,
            })
    })
    .await?;
    if c.start {
        s.start(&info.id).await?;
    }
    Ok((StatusCode::CREATED, Json(info)))
}

async fn list_rollouts(State(s): State<Arc<ApiState>>) -> ApiResult<Json<serde_json::Value>> {
    let db = s.db.clone();
    let all = blocking(move || Rollouts::open(&db)?.list()).await?;
    Ok(Json(json!({"rollouts": all})))
}

async fn get_rollout(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<crate::orchestrator::RolloutInfo>> {
    let db = s.db.clone();
    let wanted = id.clone();
    blocking(move || Rollouts::open(&db)?.info(&wanted))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no rollout {id}")))
}

/// `POST /v1/rollouts/{id}/start|pause|resume|abort|close`.
async fn rollout_action(
    State(s): State<Arc<ApiState>>,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    match action.as_str() {
        "start" => {
            s.start(&id).await?;
            Ok((StatusCode::ACCEPTED, Json(json!({"started": id}))))
        }
        "pause" | "resume" | "abort" | "close" => {
            let db = s.db.clone();
            let (wanted, what) = (id.clone(), action.clone());
            blocking(move || Rollouts::open(&db)?.request(&wanted, &what)).await?;
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"rollout": id, "requested": action})),
            ))
        }
        other => Err(ApiError::not_found(format!(
            "no rollout action {other:?} (start, pause, resume, abort or close)"
        ))),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Only entries after this sequence number.
    after: Option<i64>,
}

async fn rollout_events(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let after = query(q)?.after.unwrap_or(0);
    let db = s.db.clone();
    let wanted = id.clone();
    let events = blocking(move || {
        let rollouts = Rollouts::open(&db)?;
        if rollouts.info(&wanted)?.is_none() {
            return Ok(None);
        }
        rollouts.events_after(&wanted, after).map(Some)
    })
    .await?
    .ok_or_else(|| ApiError::not_found(format!("no rollout {id}")))?;
    Ok(Json(json!({"events": events})))
}

/// `GET /v1/rollouts/{id}/events/stream`: the trail as server-sent events (`event: change`,
/// `id:` its sequence number, `data:` the entry as JSON), from the start or after the
/// `Last-Event-ID` the client sends back on reconnecting; new entries as they are written,
/// by any process. The stream ends once the rollout has completed or aborted and every entry
/// has been sent.
async fn stream_events(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let mut after: i64 = match headers.get("last-event-id").map(|v| v.to_str()) {
        None => 0,
        Some(Ok(v)) => v
            .trim()
            .parse()
            .map_err(|_| ApiError::bad(format!("Last-Event-ID {v:?} is not a sequence number")))?,
        Some(Err(_)) => return Err(ApiError::bad("Last-Event-ID is not text")),
    };
    let db = s.db.clone();
    let rollouts = blocking(move || Rollouts::open(&db)).await?;
    let rollouts = Arc::new(Mutex::new(rollouts));
    let lookup = {
        let rollouts = rollouts.clone();
        let id = id.clone();
        move || -> Result<_, RegistryError> {
            let r = rollouts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Ok(r.info(&id)?.map(|i| i.phase))
        }
    };
    if blocking(lookup.clone()).await?.is_none() {
        return Err(ApiError::not_found(format!("no rollout {id}")));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            // The phase is read before the entries, so entries written up to a final phase are
            // all sent before the stream ends.
            let phase = match blocking(lookup.clone()).await {
                Ok(Some(p)) => p,
                _ => return,
            };
            let page = {
                let rollouts = rollouts.clone();
                let id = id.clone();
                blocking(move || {
                    rollouts
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .events_after(&id, after)
                })
                .await
            };
            let Ok(page) = page else { return };
            for e in &page {
                after = e.seq;
                let event = SseEvent::default()
                    .event("change")
                    .id(e.seq.to_string())
                    .json_data(e)
                    .unwrap_or_else(|_| SseEvent::default().comment("unserializable entry"));
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            if page.is_empty() && (phase == "completed" || phase == "aborted") {
                let end = SseEvent::default().event("end").data(phase);
                let _ = tx.send(Ok(end)).await;
                return;
            }
            if page.is_empty() {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    () = tx.closed() => return,
                }
            }
        }
    });
    let stream: ReceiverStream<Result<SseEvent, Infallible>> = ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
