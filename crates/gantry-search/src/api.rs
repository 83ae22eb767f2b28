//! The Elasticsearch 8.x REST API over a [`Node`]: routes, request parsing, response shapes.
//!
//! **Boundary:** the wire. Every response carries `X-Elastic-Product: Elasticsearch`; every error
//! is an [`EsError`] in ES's shape, 4xx for bad input (never a panic or a 500 on input); engine
//! failures log their detail and answer a generic 500. Blocking work (mapping persistence, index
//! creation, searches) runs on `spawn_blocking`; writes wait on the shard writer threads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use tantivy::TantivyDocument;
use tantivy::collector::Count;

use crate::error::{ErrorKind, EsError};
use crate::mapping::Mapping;
use crate::metrics::SearchMetrics;
use crate::node::{IndexHandle, IndexSettings, Node, short_uuid};
use crate::query::{self, Context};
use crate::search::{self, HitCollector, SearchRequest, SourceFilter, TrackTotal};
use crate::shard::{Conditions, PRIMARY_TERM, WriteOp, WriteOutcome, WriteResult};

/// The ES version this server reports.
pub const ES_VERSION: &str = "8.15.0";
/// Largest request body (ES's `http.max_content_length`).
const MAX_BODY: usize = 100 * 1024 * 1024;

/// Shared state of the API.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The node.
    pub node: Arc<Node>,
    /// Metrics.
    pub metrics: SearchMetrics,
}

type Params = Query<HashMap<String, String>>;
type ApiResult = Result<Response, EsError>;

impl IntoResponse for EsError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %self, "search request failed");
        }
        (status, axum::Json(self.to_json())).into_response()
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn ok(body: Value) -> ApiResult {
    Ok(reply(StatusCode::OK, body))
}

/// The router for the ES API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/_bulk", post(bulk_all).put(bulk_all))
        .route("/_search", get(search_all).post(search_all))
        .route("/_msearch", get(msearch_all).post(msearch_all))
        .route("/_mget", get(mget_all).post(mget_all))
        .route("/_count", get(count_all).post(count_all))
        .route("/_refresh", get(refresh_all).post(refresh_all))
        .route("/_flush", get(refresh_all).post(refresh_all))
        .route("/_mapping", get(get_mapping_all))
        .route("/_settings", get(get_settings_all))
        .route("/_cat/indices", get(cat_indices_all))
        .route("/_cat/indices/{index}", get(cat_indices))
        .route("/_cat/health", get(cat_health))
        .route("/_cluster/health", get(cluster_health))
        .route("/_cluster/health/{index}", get(cluster_health))
        .route(
            "/{index}",
            get(get_index).put(create_index).delete(delete_index),
        )
        .route(
            "/{index}/_mapping",
            get(get_mapping).put(put_mapping).post(put_mapping),
        )
        .route("/{index}/_settings", get(get_settings))
        .route("/{index}/_refresh", get(refresh).post(refresh))
        .route("/{index}/_flush", get(refresh).post(refresh))
        .route("/{index}/_doc", post(index_auto_id))
        .route(
            "/{index}/_doc/{id}",
            get(get_doc)
                .put(index_doc)
                .post(index_doc)
                .delete(delete_doc),
        )
        .route("/{index}/_create/{id}", put(create_doc).post(create_doc))
        .route("/{index}/_source/{id}", get(get_source))
        .route("/{index}/_update/{id}", post(update_doc))
        .route("/{index}/_mget", get(mget).post(mget))
        .route("/{index}/_bulk", post(bulk).put(bulk))
        .route("/{index}/_search", get(search_index).post(search_index))
        .route("/{index}/_msearch", get(msearch).post(msearch))
        .route("/{index}/_count", get(count).post(count))
        .route("/{index}/_delete_by_query", post(delete_by_query))
        .fallback(no_handler)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

fn put<H, T>(handler: H) -> axum::routing::MethodRouter<AppState>
where
    H: axum::handler::Handler<T, AppState>,
    T: 'static,
{
    axum::routing::put(handler)
}

/// Adds the product header and records request metrics.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().clone();
    let started = Instant::now();
    let mut response = next.run(request).await;
    let label = format!("{method} {endpoint}");
    state
        .metrics
        .request_seconds
        .with_label_values(&[label.as_str()])
        .observe(started.elapsed().as_secs_f64());
    state
        .metrics
        .requests
        .with_label_values(&[label.as_str(), response.status().as_str()])
        .inc();
    if response.status().is_client_error() && !is_json(&response) {
        response = es_shaped(response).await;
    }
    response.headers_mut().insert(
        "x-elastic-product",
        HeaderValue::from_static("Elasticsearch"),
    );
    response
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Rewrites a framework rejection (bad query string or path encoding, body over the limit,
/// method not allowed) into ES's error shape.
async fn es_shaped(response: Response) -> Response {
    let status = response.status();
    let (_, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let reason = if text.trim().is_empty() {
        status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_owned()
    } else {
        text
    };
    let kind = if status == StatusCode::METHOD_NOT_ALLOWED {
        "method_not_allowed_exception"
    } else {
        "illegal_argument_exception"
    };
    let cause = json!({ "type": kind, "reason": reason });
    let body = json!({
        "error": { "root_cause": [cause.clone()], "type": kind, "reason": cause["reason"] },
        "status": status.as_u16(),
    });
    (status, axum::Json(body)).into_response()
}

async fn no_handler(method: Method, uri: axum::http::Uri) -> EsError {
    EsError::new(
        ErrorKind::IllegalArgument,
        format!(
            "no handler found for uri [{}] and method [{method}]",
            uri.path()
        ),
    )
}

async fn blocking<T, F>(f: F) -> Result<T, EsError>
where
    F: FnOnce() -> Result<T, EsError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EsError::internal(format!("blocking task failed: {e}")))?
}

fn parse_json(body: &[u8], kind: ErrorKind) -> Result<Value, EsError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body)
        .map_err(|e| EsError::new(kind, format!("failed to parse request body: {e}")))
}

fn param_u64(params: &HashMap<String, String>, key: &str) -> Result<Option<u64>, EsError> {
    params
        .get(key)
        .map(|v| {
            v.parse().map_err(|_| {
                EsError::illegal_argument(format!(
                    "Failed to parse value [{v}] for parameter [{key}]"
                ))
            })
        })
        .transpose()
}

fn conditions(params: &HashMap<String, String>) -> Result<Conditions, EsError> {
    if params.contains_key("version") {
        return Err(EsError::illegal_argument(
            "internal versioning can not be used for optimistic concurrency control. Please use `if_seq_no` and `if_primary_term` instead",
        ));
    }
    Ok(Conditions {
        if_seq_no: param_u64(params, "if_seq_no")?,
        if_primary_term: param_u64(params, "if_primary_term")?,
    })
}

/// `refresh` parameter: `Some(true)` (`true` or empty) forces a refresh, `Some(false)`
/// (`wait_for`) waits until the write is searchable.
fn wants_refresh(params: &HashMap<String, String>) -> Result<Option<bool>, EsError> {
    match params.get("refresh").map(String::as_str) {
        None | Some("false") => Ok(None),
        Some("true" | "") => Ok(Some(true)),
        Some("wait_for") => Ok(Some(false)),
        Some(other) => Err(EsError::illegal_argument(format!(
            "Unknown value for refresh: [{other}]."
        ))),
    }
}

fn shards_block(index: &IndexHandle) -> Value {
    json!({ "total": 1 + index.settings().number_of_replicas, "successful": 1, "failed": 0 })
}

fn write_body(index: &IndexHandle, id: &str, outcome: &WriteOutcome) -> Value {
    json!({
        "_index": index.name,
        "_id": id,
        "_version": outcome.version,
        "result": outcome.result.as_str(),
        "_shards": shards_block(index),
        "_seq_no": outcome.seq_no,
        "_primary_term": PRIMARY_TERM,
    })
}

fn index_error(e: EsError, index: &str) -> EsError {
    if e.index.is_some() {
        e
    } else {
        e.with_index(index)
    }
}

/// Applies the `refresh` parameter after writes to `shard` whose highest `_seq_no` is `seq_no`.
async fn settle(
    index: &IndexHandle,
    shard: &crate::shard::Shard,
    seq_no: u64,
    refresh: Option<bool>,
) -> Result<(), EsError> {
    match refresh {
        None => Ok(()),
        Some(true) => force_refresh(index).await,
        Some(false) => shard.wait_for(seq_no).await,
    }
}

/// Forces a refresh of every shard of `index` (each shard observes its own duration).
async fn force_refresh(index: &IndexHandle) -> Result<(), EsError> {
    index.refresh().await
}

// ---------------------------------------------------------------------------------------------
// Cluster and index admin

async fn root(State(state): State<AppState>) -> ApiResult {
    ok(json!({
        "name": state.node.name,
        "cluster_name": "gantry",
        "cluster_uuid": state.node.cluster_uuid,
        "version": {
            "number": ES_VERSION,
            "build_flavor": "default",
            "build_type": "tar",
            "build_hash": "gantry",
            "build_date": "2024-08-05T10:05:34.233336849Z",
            "build_snapshot": false,
            "lucene_version": "9.11.1",
            "minimum_wire_compatibility_version": "7.17.0",
            "minimum_index_compatibility_version": "7.0.0",
        },
        "tagline": "You Know, for Search",
    }))
}

async fn create_index(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let body = parse_json(&body, ErrorKind::Parsing)?;
    let (settings, mapping) = match &body {
        Value::Null => (IndexSettings::default(), Mapping::default()),
        Value::Object(o) => {
            for key in o.keys() {
                if !matches!(key.as_str(), "settings" | "mappings" | "aliases") {
                    return Err(EsError::parsing(format!(
                        "unknown key [{key}] for create index"
                    )));
                }
            }
            let settings = match o.get("settings") {
                Some(s) => IndexSettings::from_json(s)?,
                None => IndexSettings::default(),
            };
            let mapping = match o.get("mappings") {
                Some(m) => Mapping::from_json(m)?,
                None => Mapping::default(),
            };
            (settings, mapping)
        }
        _ => return Err(EsError::parsing("request body must be an object")),
    };
    let node = state.node.clone();
    let index_name = name.clone();
    blocking(move || node.create(&index_name, settings, mapping).map(|_| ())).await?;
    ok(json!({ "acknowledged": true, "shards_acknowledged": true, "index": name }))
}

fn index_json(index: &IndexHandle) -> Value {
    json!({
        "aliases": {},
        "mappings": index.mapping().to_json(),
        "settings": index.settings().to_json(&index.name, &index.uuid, index.created),
    })
}

async fn get_index(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult {
    let indices = state.node.resolve(&name)?;
    let mut out = Map::new();
    for index in indices {
        out.insert(index.name.clone(), index_json(&index));
    }
    ok(Value::Object(out))
}

async fn delete_index(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult {
    if name.contains('*') || name == "_all" {
        return Err(EsError::illegal_argument(
            "Wildcard expressions or all indices are not allowed",
        ));
    }
    let names: Vec<String> = name.split(',').map(str::to_owned).collect();
    for n in &names {
        if state.node.get(n).is_none() {
            return Err(EsError::index_not_found(n));
        }
    }
    let node = state.node.clone();
    blocking(move || {
        for n in &names {
            node.delete(n)?;
        }
        Ok(())
    })
    .await?;
    ok(json!({ "acknowledged": true }))
}

async fn get_mapping_all(state: State<AppState>) -> ApiResult {
    get_mapping(state, Path("_all".to_owned())).await
}

async fn get_settings_all(state: State<AppState>) -> ApiResult {
    get_settings(state, Path("_all".to_owned())).await
}

async fn get_mapping(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult {
    let mut out = Map::new();
    for index in state.node.resolve(&name)? {
        out.insert(
            index.name.clone(),
            json!({ "mappings": index.mapping().to_json() }),
        );
    }
    ok(Value::Object(out))
}

async fn put_mapping(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let body = parse_json(&body, ErrorKind::Parsing)?;
    let update = Mapping::from_json(&body)?;
    let indices = state.node.resolve(&name)?;
    blocking(move || {
        for index in indices {
            index.put_mapping(&update)?;
        }
        Ok(())
    })
    .await?;
    ok(json!({ "acknowledged": true }))
}

async fn get_settings(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult {
    let mut out = Map::new();
    for index in state.node.resolve(&name)? {
        out.insert(
            index.name.clone(),
            json!({ "settings": index.settings().to_json(&index.name, &index.uuid, index.created) }),
        );
    }
    ok(Value::Object(out))
}

async fn refresh_indices(indices: Vec<Arc<IndexHandle>>) -> ApiResult {
    let mut shards = 0;
    for index in &indices {
        force_refresh(index).await?;
        shards += index.shards().len();
    }
    ok(json!({ "_shards": { "total": shards, "successful": shards, "failed": 0 } }))
}

async fn refresh(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult {
    let indices = state.node.resolve(&name)?;
    refresh_indices(indices).await
}

async fn refresh_all(State(state): State<AppState>) -> ApiResult {
    let indices = state.node.all();
    refresh_indices(indices).await
}

fn health_of(indices: &[Arc<IndexHandle>]) -> &'static str {
    if indices.iter().any(|i| i.settings().number_of_replicas > 0) {
        "yellow"
    } else {
        "green"
    }
}

async fn cluster_health(State(state): State<AppState>, index: Option<Path<String>>) -> ApiResult {
    let indices = match index {
        Some(Path(name)) => state.node.resolve(&name)?,
        None => state.node.all(),
    };
    let primaries: usize = indices.iter().map(|i| i.shards().len()).sum();
    let unassigned: usize = indices
        .iter()
        .map(|i| i.shards().len() * i.settings().number_of_replicas as usize)
        .sum();
    let percent = if primaries + unassigned == 0 {
        100.0
    } else {
        100.0 * primaries as f64 / (primaries + unassigned) as f64
    };
    ok(json!({
        "cluster_name": "gantry",
        "status": health_of(&indices),
        "timed_out": false,
        "number_of_nodes": 1,
        "number_of_data_nodes": 1,
        "active_primary_shards": primaries,
        "active_shards": primaries,
        "relocating_shards": 0,
        "initializing_shards": 0,
        "unassigned_shards": unassigned,
        "unassigned_primary_shards": 0,
        "delayed_unassigned_shards": 0,
        "number_of_pending_tasks": 0,
        "number_of_in_flight_fetch": 0,
        "task_max_waiting_in_queue_millis": 0,
        "active_shards_percent_as_number": percent,
    }))
}

/// Renders `_cat` rows as JSON (`format=json`) or aligned text (`v` adds the header).
fn cat(params: &HashMap<String, String>, columns: &[&str], rows: Vec<Vec<String>>) -> ApiResult {
    if params.get("format").map(String::as_str) == Some("json") {
        let out: Vec<Value> = rows
            .into_iter()
            .map(|r| {
                Value::Object(
                    columns
                        .iter()
                        .zip(r)
                        .map(|(c, v)| ((*c).to_owned(), Value::String(v)))
                        .collect(),
                )
            })
            .collect();
        return ok(Value::Array(out));
    }
    let verbose = params.contains_key("v");
    let mut table: Vec<Vec<String>> = Vec::new();
    if verbose {
        table.push(columns.iter().map(|c| (*c).to_owned()).collect());
    }
    table.extend(rows);
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            table
                .iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        text.push_str(line.join(" ").trim_end());
        text.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=UTF-8")], text).into_response())
}

async fn cat_indices_for(
    indices: Vec<Arc<IndexHandle>>,
    params: &HashMap<String, String>,
) -> ApiResult {
    let rows = blocking(move || {
        Ok(indices
            .iter()
            .map(|i| {
                let settings = i.settings();
                let size = i.size_in_bytes();
                vec![
                    health_of(std::slice::from_ref(i)).to_owned(),
                    "open".to_owned(),
                    i.name.clone(),
                    i.uuid.clone(),
                    settings.number_of_shards.to_string(),
                    settings.number_of_replicas.to_string(),
                    i.doc_count().to_string(),
                    i.deleted_count().to_string(),
                    format_bytes(size),
                    format_bytes(size),
                    format_bytes(size),
                ]
            })
            .collect::<Vec<_>>())
    })
    .await?;
    cat(
        params,
        &[
            "health",
            "status",
            "index",
            "uuid",
            "pri",
            "rep",
            "docs.count",
            "docs.deleted",
            "store.size",
            "pri.store.size",
            "dataset.size",
        ],
        rows,
    )
}

fn format_bytes(n: u64) -> String {
    let units = ["b", "kb", "mb", "gb", "tb"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}b")
    } else {
        format!("{v:.1}{}", units[u])
    }
}

async fn cat_indices_all(State(state): State<AppState>, Query(params): Params) -> ApiResult {
    let indices = state.node.all();
    cat_indices_for(indices, &params).await
}

async fn cat_indices(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Params,
) -> ApiResult {
    let indices = state.node.resolve(&name)?;
    cat_indices_for(indices, &params).await
}

async fn cat_health(State(state): State<AppState>, Query(params): Params) -> ApiResult {
    let indices = state.node.all();
    let shards: usize = indices.iter().map(|i| i.shards().len()).sum();
    let unassigned: usize = indices
        .iter()
        .map(|i| i.shards().len() * i.settings().number_of_replicas as usize)
        .sum();
    let now = chrono::Utc::now();
    let percent = if shards + unassigned == 0 {
        100.0
    } else {
        100.0 * shards as f64 / (shards + unassigned) as f64
    };
    cat(
        &params,
        &[
            "epoch",
            "timestamp",
            "cluster",
            "status",
            "node.total",
            "node.data",
            "shards",
            "pri",
            "relo",
            "init",
            "unassign",
            "unassign.pri",
            "pending_tasks",
            "max_task_wait_time",
            "active_shards_percent",
        ],
        vec![vec![
            now.timestamp().to_string(),
            now.format("%H:%M:%S").to_string(),
            "gantry".into(),
            health_of(&indices).into(),
            "1".into(),
            "1".into(),
            shards.to_string(),
            shards.to_string(),
            "0".into(),
            "0".into(),
            unassigned.to_string(),
            "0".into(),
            "0".into(),
            "-".into(),
            format!("{percent:.1}%"),
        ]],
    )
}

// ---------------------------------------------------------------------------------------------
// Documents

fn routing_key<'a>(params: &'a HashMap<String, String>, id: &'a str) -> &'a str {
    params.get("routing").map_or(id, String::as_str)
}

async fn write_one(
    state: &AppState,
    index_name: &str,
    id: String,
    params: &HashMap<String, String>,
    body: Bytes,
    create: bool,
) -> ApiResult {
    let cond = conditions(params)?;
    let refresh = wants_refresh(params)?;
    let create = create
        || match params.get("op_type").map(String::as_str) {
            None | Some("index") => false,
            Some("create") => true,
            Some(other) => {
                return Err(EsError::illegal_argument(format!(
                    "opType must be 'create' or 'index', found: [{other}]"
                )));
            }
        };
    let source = parse_json(&body, ErrorKind::MapperParsing)?;
    if !source.is_object() {
        return Err(
            EsError::mapper_parsing("failed to parse, document is empty or not an object")
                .with_index(index_name),
        );
    }
    let node = state.node.clone();
    let name = index_name.to_owned();
    let doc_id = id.clone();
    let (index, parsed) = blocking(move || {
        let index = node.get_or_create(&name)?;
        let parsed = index
            .prepare_document(&source, &doc_id)
            .map_err(|e| index_error(e, &name))?;
        Ok((index, (parsed, source.to_string())))
    })
    .await?;
    let (parsed, source_text) = parsed;
    let shard = index.shard_for(routing_key(params, &id));
    let op = WriteOp::Index {
        id: id.clone(),
        source: source_text,
        parsed,
        create,
        cond,
    };
    let outcome = shard
        .write(vec![op])
        .await?
        .pop()
        .ok_or_else(|| EsError::internal("shard returned no result"))?
        .map_err(|e| index_error(e, &index.name))?;
    state.metrics.documents_indexed.inc();
    let mut body = write_body(&index, &id, &outcome);
    settle(&index, shard, outcome.seq_no, refresh).await?;
    if refresh == Some(true) {
        body["forced_refresh"] = json!(true);
    }
    let status = if outcome.result == WriteResult::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(reply(status, body))
}

async fn index_doc(
    State(state): State<AppState>,
    Path((index, id)): Path<(String, String)>,
    Query(params): Params,
    body: Bytes,
) -> ApiResult {
    check_id(&id)?;
    write_one(&state, &index, id, &params, body, false).await
}

async fn create_doc(
    State(state): State<AppState>,
    Path((index, id)): Path<(String, String)>,
    Query(params): Params,
    body: Bytes,
) -> ApiResult {
    check_id(&id)?;
    write_one(&state, &index, id, &params, body, true).await
}

async fn index_auto_id(
    State(state): State<AppState>,
    Path(index): Path<String>,
    Query(params): Params,
    body: Bytes,
) -> ApiResult {
    write_one(&state, &index, short_uuid(), &params, body, true).await
}

fn check_id(id: &str) -> Result<(), EsError> {
    if id.is_empty() || id.len() > 512 {
        return Err(EsError::illegal_argument(format!(
            "id [{id}] is too long, must be no longer than 512 bytes and not empty"
        )));
    }
    Ok(())
}

fn existing(state: &AppState, name: &str) -> Result<Arc<IndexHandle>, EsError> {
    state
        .node
        .get(name)
        .ok_or_else(|| EsError::index_not_found(name))
}

fn get_json(
    index: &IndexHandle,
    id: &str,
    routing: &str,
    filter: &SourceFilter,
) -> Result<(bool, Value), EsError> {
    let doc = index.shard_for(routing).get(id)?;
    Ok(match doc {
        Some(doc) => {
            let mut body = json!({
                "_index": index.name,
                "_id": id,
                "_version": doc.version,
                "_seq_no": doc.seq_no,
                "_primary_term": PRIMARY_TERM,
                "found": true,
            });
            if !filter.disabled {
                let source: Value = serde_json::from_str(&doc.source).unwrap_or(Value::Null);
                body["_source"] = if filter.is_identity() {
                    source
                } else {
                    filter.apply(&source)
                };
            }
            (true, body)
        }
        None => (
            false,
            json!({ "_index": index.name, "_id": id, "found": false }),
        ),
    })
}

fn source_filter(params: &HashMap<String, String>) -> SourceFilter {
    SourceFilter::from_params(
        params.get("_source").map(String::as_str),
        params.get("_source_includes").map(String::as_str),
        params.get("_source_excludes").map(String::as_str),
    )
}

async fn get_doc(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    Query(params): Params,
) -> ApiResult {
    let index = existing(&state, &name)?;
    let filter = source_filter(&params);
    let routing = routing_key(&params, &id).to_owned();
    let (found, body) = blocking(move || get_json(&index, &id, &routing, &filter)).await?;
    let status = if found {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    };
    Ok(reply(status, body))
}

async fn get_source(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    Query(params): Params,
) -> ApiResult {
    let index = existing(&state, &name)?;
    let filter = source_filter(&params);
    let routing = routing_key(&params, &id).to_owned();
    let doc_id = id.clone();
    let (found, body) = blocking(move || get_json(&index, &doc_id, &routing, &filter)).await?;
    if !found {
        return Err(EsError::new(
            ErrorKind::ResourceNotFound,
            format!("Document not found [{name}]/[{id}]"),
        ));
    }
    ok(body.get("_source").cloned().unwrap_or(json!({})))
}

async fn delete_doc(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    Query(params): Params,
) -> ApiResult {
    let index = existing(&state, &name)?;
    let cond = conditions(&params)?;
    let refresh = wants_refresh(&params)?;
    let shard = index.shard_for(routing_key(&params, &id));
    let outcome = shard
        .write(vec![WriteOp::Delete {
            id: id.clone(),
            cond,
        }])
        .await?
        .pop()
        .ok_or_else(|| EsError::internal("shard returned no result"))?
        .map_err(|e| index_error(e, &name))?;
    settle(&index, shard, outcome.seq_no, refresh).await?;
    let status = if outcome.result == WriteResult::NotFound {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    Ok(reply(status, write_body(&index, &id, &outcome)))
}

/// Splits an `_update` body into the shard operation.
fn update_op(id: &str, body: &Value, cond: Conditions) -> Result<WriteOp, EsError> {
    let Some(obj) = body.as_object() else {
        return Err(EsError::parsing(
            "request body is required and must be an object",
        ));
    };
    let mut doc = None;
    let mut upsert = None;
    let mut doc_as_upsert = false;
    for (k, v) in obj {
        match k.as_str() {
            "doc" => {
                if !v.is_object() {
                    return Err(EsError::parsing("[doc] must be an object"));
                }
                doc = Some(v.clone());
            }
            "upsert" => {
                if !v.is_object() {
                    return Err(EsError::parsing("[upsert] must be an object"));
                }
                upsert = Some(v.clone());
            }
            "doc_as_upsert" => doc_as_upsert = v.as_bool().unwrap_or(false),
            "detect_noop" | "_source" => {}
            "script" | "scripted_upsert" => {
                return Err(EsError::illegal_argument(
                    "scripted updates are not supported",
                ));
            }
            other => {
                return Err(EsError::parsing(format!(
                    "[UpdateRequest] unknown field [{other}]"
                )));
            }
        }
    }
    if doc.is_none() && upsert.is_none() {
        return Err(EsError::new(
            ErrorKind::ActionRequestValidation,
            "Validation Failed: 1: script or doc is missing;",
        ));
    }
    Ok(WriteOp::Update {
        id: id.to_owned(),
        doc,
        upsert,
        doc_as_upsert,
        cond,
    })
}

async fn update_doc(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    Query(params): Params,
    body: Bytes,
) -> ApiResult {
    check_id(&id)?;
    let cond = conditions(&params)?;
    let refresh = wants_refresh(&params)?;
    let body = parse_json(&body, ErrorKind::Parsing)?;
    let op = update_op(&id, &body, cond)?;
    let node = state.node.clone();
    let index_name = name.clone();
    let prepared = op.clone();
    let index = blocking(move || {
        let index = node.get_or_create(&index_name)?;
        if let WriteOp::Update { doc, upsert, .. } = &prepared {
            for v in [doc, upsert].into_iter().flatten() {
                index
                    .prepare_fields(v)
                    .map_err(|e| index_error(e, &index_name))?;
            }
        }
        Ok(index)
    })
    .await?;
    let shard = index.shard_for(routing_key(&params, &id));
    let outcome = shard
        .write(vec![op])
        .await?
        .pop()
        .ok_or_else(|| EsError::internal("shard returned no result"))?
        .map_err(|e| index_error(e, &name))?;
    if outcome.result != WriteResult::Noop {
        state.metrics.documents_indexed.inc();
    }
    settle(&index, shard, outcome.seq_no, refresh).await?;
    let status = if outcome.result == WriteResult::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(reply(status, write_body(&index, &id, &outcome)))
}

async fn mget_impl(
    state: &AppState,
    default_index: Option<String>,
    params: &HashMap<String, String>,
    body: Bytes,
) -> ApiResult {
    let body = parse_json(&body, ErrorKind::Parsing)?;
    let default_filter = source_filter(params);
    let mut requests: Vec<(Option<String>, String, SourceFilter, Option<String>)> = Vec::new();
    match (body.get("docs"), body.get("ids")) {
        (Some(Value::Array(docs)), _) => {
            for d in docs {
                let id = d
                    .get("_id")
                    .and_then(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .or_else(|| v.as_u64().map(|n| n.to_string()))
                    })
                    .ok_or_else(|| {
                        EsError::new(
                            ErrorKind::ActionRequestValidation,
                            "Validation Failed: 1: id is missing for doc 0;",
                        )
                    })?;
                let index = d
                    .get("_index")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| default_index.clone());
                let filter = match d.get("_source") {
                    Some(s) => search::parse_source(s)?,
                    None => default_filter.clone(),
                };
                let routing = d.get("routing").and_then(Value::as_str).map(str::to_owned);
                requests.push((index, id, filter, routing));
            }
        }
        (_, Some(Value::Array(ids))) => {
            for id in ids {
                let id = id
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| id.as_u64().map(|n| n.to_string()))
                    .ok_or_else(|| EsError::parsing("[ids] must be strings"))?;
                requests.push((default_index.clone(), id, default_filter.clone(), None));
            }
        }
        _ => {
            return Err(EsError::new(
                ErrorKind::ActionRequestValidation,
                "Validation Failed: 1: no documents to get;",
            ));
        }
    }
    let node = state.node.clone();
    let docs = blocking(move || {
        let mut out = Vec::new();
        for (index, id, filter, routing) in requests {
            let Some(index_name) = index else {
                return Err(EsError::new(
                    ErrorKind::ActionRequestValidation,
                    "Validation Failed: 1: index is missing for doc 0;",
                ));
            };
            match node.get(&index_name) {
                None => out.push(json!({
                    "_index": index_name,
                    "_id": id,
                    "error": EsError::index_not_found(&index_name).cause_json(),
                })),
                Some(index) => {
                    let routing = routing.unwrap_or_else(|| id.clone());
                    out.push(get_json(&index, &id, &routing, &filter)?.1);
                }
            }
        }
        Ok(out)
    })
    .await?;
    ok(json!({ "docs": docs }))
}

async fn mget(
    State(state): State<AppState>,
    Path(index): Path<String>,
    Query(params): Params,
    body: Bytes,
) -> ApiResult {
    mget_impl(&state, Some(index), &params, body).await
}

async fn mget_all(State(state): State<AppState>, Query(params): Params, body: Bytes) -> ApiResult {
    mget_impl(&state, None, &params, body).await
}

// ---------------------------------------------------------------------------------------------
// Bulk

/// One parsed bulk item.
struct BulkItem {
    action: &'static str,
    index: String,
    id: String,
    routing: Option<String>,
    /// `Ok(op)` ready for a shard, or the item's error.
    op: Result<WriteOp, EsError>,
}

fn bulk_error(line: usize, why: &str) -> EsError {
    EsError::illegal_argument(format!("Malformed action/metadata line [{line}], {why}"))
}

/// Parses the NDJSON body into items. A malformed action line fails the request (the lines after
/// it cannot be told apart); a malformed document fails only its item.
fn parse_bulk(
    body: &[u8],
    default_index: Option<&str>,
) -> Result<Vec<(BulkItem, Option<Value>)>, EsError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| EsError::illegal_argument("bulk body is not UTF-8"))?;
    let mut lines = text
        .split('\n')
        .enumerate()
        .map(|(n, l)| (n + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty());
    let mut items = Vec::new();
    while let Some((n, line)) = lines.next() {
        let action: Value = serde_json::from_str(line)
            .map_err(|e| bulk_error(n, &format!("expected a JSON object: {e}")))?;
        let Some(obj) = action.as_object().filter(|o| o.len() == 1) else {
            return Err(bulk_error(n, "expected one action"));
        };
        let Some((name, meta)) = obj.iter().next() else {
            return Err(bulk_error(n, "expected one action"));
        };
        let action: &'static str = match name.as_str() {
            "index" => "index",
            "create" => "create",
            "update" => "update",
            "delete" => "delete",
            other => {
                return Err(bulk_error(
                    n,
                    &format!("expected one of [create, delete, index, update] but found [{other}]"),
                ));
            }
        };
        let meta = meta
            .as_object()
            .ok_or_else(|| bulk_error(n, "expected an object for the action"))?;
        let index = meta
            .get("_index")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| default_index.map(str::to_owned))
            .ok_or_else(|| {
                EsError::new(
                    ErrorKind::ActionRequestValidation,
                    format!("Validation Failed: 1: index is missing for line [{n}];"),
                )
            })?;
        let id = meta.get("_id").and_then(|v| {
            v.as_str()
                .map(str::to_owned)
                .or_else(|| v.as_u64().map(|n| n.to_string()))
        });
        let routing = meta
            .get("routing")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let cond = Conditions {
            if_seq_no: meta.get("if_seq_no").and_then(Value::as_u64),
            if_primary_term: meta.get("if_primary_term").and_then(Value::as_u64),
        };
        let source = if action == "delete" {
            None
        } else {
            let Some((_, doc_line)) = lines.next() else {
                return Err(bulk_error(n, "the action is missing its document line"));
            };
            Some(serde_json::from_str::<Value>(doc_line).map_err(|e| {
                EsError::mapper_parsing(format!("failed to parse: {e}")).with_index(index.clone())
            }))
        };
        let (id, op, parsed_source) = match (action, id) {
            ("delete", Some(id)) => (id.clone(), Ok(WriteOp::Delete { id, cond }), None),
            ("delete" | "update", None) => {
                return Err(EsError::new(
                    ErrorKind::ActionRequestValidation,
                    format!("Validation Failed: 1: id is missing for line [{n}];"),
                ));
            }
            ("update", Some(id)) => {
                let op = source
                    .unwrap_or_else(|| Err(EsError::parsing("missing document")))
                    .and_then(|body| update_op(&id, &body, cond));
                (id, op, None)
            }
            (_, id) => {
                let id = id.unwrap_or_else(short_uuid);
                match source.unwrap_or_else(|| Err(EsError::parsing("missing document"))) {
                    Ok(v) => {
                        // The shard op is completed once the mapping has checked the document.
                        let op = Ok(WriteOp::Index {
                            id: id.clone(),
                            source: String::new(),
                            parsed: Default::default(),
                            create: action == "create",
                            cond,
                        });
                        (id, op, Some(v))
                    }
                    Err(e) => (id, Err(e), None),
                }
            }
        };
        items.push((
            BulkItem {
                action,
                index,
                id,
                routing,
                op,
            },
            parsed_source,
        ));
    }
    Ok(items)
}

async fn bulk_impl(
    state: &AppState,
    default_index: Option<String>,
    params: &HashMap<String, String>,
    body: Bytes,
) -> ApiResult {
    let started = Instant::now();
    let refresh = wants_refresh(params)?;
    let parsed = parse_bulk(&body, default_index.as_deref())?;
    let node = state.node.clone();
    // Resolve indices (auto-creating), check documents against mappings: blocking work.
    let items = blocking(move || {
        let mut out: Vec<(BulkItem, Option<Arc<IndexHandle>>)> = Vec::new();
        for (mut item, source) in parsed {
            let index = match node.get_or_create(&item.index) {
                Ok(i) => Some(i),
                Err(e) => {
                    item.op = Err(e);
                    None
                }
            };
            if let (Some(index), Ok(op)) = (&index, &mut item.op) {
                match op {
                    WriteOp::Index {
                        id,
                        source: text,
                        parsed,
                        ..
                    } => {
                        let value = source.unwrap_or(Value::Null);
                        if !value.is_object() {
                            item.op = Err(EsError::mapper_parsing(
                                "failed to parse, document is empty or not an object",
                            )
                            .with_index(index.name.clone()));
                        } else {
                            match index.prepare_document(&value, id) {
                                Ok(p) => {
                                    *parsed = p;
                                    *text = value.to_string();
                                }
                                Err(e) => item.op = Err(index_error(e, &index.name)),
                            }
                        }
                    }
                    WriteOp::Update { doc, upsert, .. } => {
                        let failed = [doc.as_ref(), upsert.as_ref()]
                            .into_iter()
                            .flatten()
                            .find_map(|v| index.prepare_fields(v).err());
                        if let Some(e) = failed {
                            item.op = Err(index_error(e, &index.name));
                        }
                    }
                    WriteOp::Delete { .. } => {}
                }
            }
            out.push((item, index));
        }
        Ok(out)
    })
    .await?;

    // Group by shard, keeping each shard's operations in request order.
    let mut results: Vec<Option<Result<WriteOutcome, EsError>>> = vec![None; items.len()];
    // (index, shard number, positions in the request, operations)
    type ShardGroup = (Arc<IndexHandle>, usize, Vec<usize>, Vec<WriteOp>);
    let mut groups: Vec<ShardGroup> = Vec::new();
    let mut metas = Vec::with_capacity(items.len());
    for (n, (item, index)) in items.into_iter().enumerate() {
        metas.push((item.action, item.index.clone(), item.id.clone()));
        let op = match item.op {
            Ok(op) => op,
            Err(e) => {
                results[n] = Some(Err(e));
                continue;
            }
        };
        let Some(index) = index else {
            continue;
        };
        let shard_no = crate::node::route(
            item.routing.as_deref().unwrap_or(&item.id),
            index.shards().len(),
        );
        match groups
            .iter_mut()
            .find(|(i, s, _, _)| Arc::ptr_eq(i, &index) && *s == shard_no)
        {
            Some((_, _, positions, ops)) => {
                positions.push(n);
                ops.push(op);
            }
            None => groups.push((index, shard_no, vec![n], vec![op])),
        }
    }
    let mut touched: Vec<(Arc<IndexHandle>, usize, u64)> = Vec::new();
    for (index, shard_no, positions, ops) in groups {
        let outcomes = match index.shards()[shard_no].write(ops).await {
            Ok(o) => o,
            Err(e) => positions.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut max_seq_no = 0;
        for (pos, outcome) in positions.into_iter().zip(outcomes) {
            if let Ok(o) = &outcome {
                max_seq_no = max_seq_no.max(o.seq_no);
            }
            results[pos] = Some(outcome.map_err(|e| index_error(e, &index.name)));
        }
        touched.push((index, shard_no, max_seq_no));
    }
    let mut refreshed: Vec<Arc<IndexHandle>> = Vec::new();
    for (index, shard_no, seq_no) in &touched {
        if refresh == Some(true) && refreshed.iter().any(|r| Arc::ptr_eq(r, index)) {
            continue;
        }
        settle(index, &index.shards()[*shard_no], *seq_no, refresh).await?;
        refreshed.push(index.clone());
    }
    let mut errors = false;
    let mut out = Vec::with_capacity(results.len());
    for ((action, index_name, id), result) in metas.into_iter().zip(results) {
        let result = result.unwrap_or_else(|| Err(EsError::internal("bulk item was not executed")));
        let entry = match result {
            Ok(outcome) => {
                if matches!(outcome.result, WriteResult::Created | WriteResult::Updated) {
                    state.metrics.documents_indexed.inc();
                }
                let status = match outcome.result {
                    WriteResult::Created => 201,
                    WriteResult::NotFound => 404,
                    _ => 200,
                };
                let replicas = state
                    .node
                    .get(&index_name)
                    .map_or(0, |i| i.settings().number_of_replicas);
                json!({
                    "_index": index_name,
                    "_id": id,
                    "_version": outcome.version,
                    "result": outcome.result.as_str(),
                    "_shards": { "total": 1 + replicas, "successful": 1, "failed": 0 },
                    "_seq_no": outcome.seq_no,
                    "_primary_term": PRIMARY_TERM,
                    "status": status,
                })
            }
            Err(e) => {
                errors = true;
                json!({
                    "_index": index_name,
                    "_id": id,
                    "status": e.status(),
                    "error": e.cause_json(),
                })
            }
        };
        out.push(json!({ action: entry }));
    }
    ok(json!({
        "errors": errors,
        "took": started.elapsed().as_millis() as u64,
        "items": out,
    }))
}

async fn bulk(
    State(state): State<AppState>,
    Path(index): Path<String>,
    Query(params): Params,
    body: Bytes,
) -> ApiResult {
    bulk_impl(&state, Some(index), &params, body).await
}

async fn bulk_all(State(state): State<AppState>, Query(params): Params, body: Bytes) -> ApiResult {
    bulk_impl(&state, None, &params, body).await
}

// ---------------------------------------------------------------------------------------------
// Search

/// Folds URL parameters (`size`, `from`, `sort`, `_source`, `track_total_hits`) into the body.
fn merge_params(mut body: Value, params: &HashMap<String, String>) -> Result<Value, EsError> {
    if params.contains_key("q") {
        return Err(EsError::illegal_argument(
            "the [q] parameter (Lucene query syntax) is not supported; send a query DSL body",
        ));
    }
    if body.is_null() {
        body = json!({});
    }
    let Some(obj) = body.as_object_mut() else {
        return Err(EsError::parsing("request body must be a JSON object"));
    };
    for key in ["size", "from"] {
        if let Some(v) = params.get(key) {
            let n: u64 = v.parse().map_err(|_| {
                EsError::illegal_argument(format!(
                    "Failed to parse int parameter [{key}] with value [{v}]"
                ))
            })?;
            obj.insert(key.into(), json!(n));
        }
    }
    if let Some(v) = params.get("track_total_hits") {
        let value = match v.as_str() {
            "true" => json!(true),
            "false" => json!(false),
            n => json!(
                n.parse::<u64>()
                    .map_err(|_| EsError::illegal_argument(format!(
                        "invalid track_total_hits [{n}]"
                    )))?
            ),
        };
        obj.insert("track_total_hits".into(), value);
    }
    if let Some(v) = params.get("sort") {
        obj.insert(
            "sort".into(),
            Value::Array(v.split(',').map(|s| json!(s)).collect()),
        );
    }
    if params.contains_key("_source")
        || params.contains_key("_source_includes")
        || params.contains_key("_source_excludes")
    {
        let f = source_filter(params);
        let v = if f.disabled {
            json!(false)
        } else {
            json!({ "includes": f.includes, "excludes": f.excludes })
        };
        obj.insert("_source".into(), v);
    }
    Ok(body)
}

/// The analyzer of text fields in `index` (tantivy's default).
fn default_analyzer(index: &tantivy::Index) -> Result<tantivy::tokenizer::TextAnalyzer, EsError> {
    index
        .tokenizers()
        .get("default")
        .ok_or_else(|| EsError::internal("default tokenizer missing"))
}

/// The context queries on `index` are built in: `mapping` (the index's), its first shard's
/// schema and analyzer; `None` for an index without shards.
fn query_context<'a>(
    index: &IndexHandle,
    mapping: &'a Mapping,
    now_ms: i64,
) -> Result<Option<Context<'a>>, EsError> {
    let Some(first) = index.shards().first() else {
        return Ok(None);
    };
    Ok(Some(Context {
        mapping,
        fields: first.fields(),
        analyzer: default_analyzer(first.index())?,
        now_ms,
    }))
}

/// Runs a search over `indices`. Blocking.
fn run_search(
    indices: &[Arc<IndexHandle>],
    req: &SearchRequest,
    rest_total_hits_as_int: bool,
) -> Result<Value, EsError> {
    let started = Instant::now();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut hits = Vec::new();
    let mut total: u64 = 0;
    let mut searchers = Vec::new();
    let mut shard_count = 0;
    let mut agg_parts = Vec::new();
    let mappings: Vec<Mapping> = indices.iter().map(|i| i.mapping()).collect();
    req.check_sort(&mappings)?;
    let mut plan = match &req.aggs {
        Some(aggs) => Some(crate::aggs::Plan::parse(aggs, &mappings)?),
        None => None,
    };
    // Calendar histograms first need the date range of the matching documents.
    if let Some(plan) = &mut plan {
        if let Some(bounds_request) = plan.bounds_request() {
            let mut parts = Vec::new();
            for index in indices {
                let mapping = index.mapping();
                let Some(mut ctx) = query_context(index, &mapping, now_ms)? else {
                    continue;
                };
                let query = ctx
                    .build(&req.query)
                    .map_err(|e| index_error(e, &index.name))?;
                for shard in index.shards() {
                    parts.push(crate::aggs::Plan::collect_bounds(
                        &shard.searcher(),
                        &*query,
                        &bounds_request,
                    )?);
                }
            }
            let bounds = crate::aggs::Plan::merge_bounds(&bounds_request, parts)?;
            plan.bind(&bounds)?;
        }
    }
    for (i, index) in indices.iter().enumerate() {
        let mapping = Arc::new(index.mapping());
        let Some(mut ctx) = query_context(index, &mapping, now_ms)? else {
            continue;
        };
        let query = ctx
            .build(&req.query)
            .map_err(|e| index_error(e, &index.name))?;
        let mut per_index = Vec::new();
        for (s, shard) in index.shards().iter().enumerate() {
            shard_count += 1;
            let searcher = shard.searcher();
            let collector = HitCollector::new(req, mapping.clone());
            let (mut shard_hits, count) = searcher.search(&*query, &collector)?;
            for h in &mut shard_hits {
                h.origin = (i, s);
            }
            total += count;
            hits.extend(shard_hits);
            if let Some(plan) = &plan {
                let index_name = index.name.clone();
                let mut build =
                    |ast: &query::QueryAst| ctx.build(ast).map_err(|e| index_error(e, &index_name));
                per_index.push(plan.collect(&searcher, &*query, &mut build)?);
            }
            searchers.push(((i, s), searcher));
        }
        agg_parts.extend(per_index);
    }
    let page = search::merge_page(hits, req);
    let scores = req.scores();
    let sorted = !req.sort.is_empty();
    let mut max_score: Option<f32> = None;
    let mut out_hits = Vec::with_capacity(page.len());
    for hit in &page {
        let Some((_, searcher)) = searchers.iter().find(|(o, _)| *o == hit.origin) else {
            continue;
        };
        let index = &indices[hit.origin.0];
        let fields = index.shards()[hit.origin.1].fields();
        let doc: TantivyDocument = searcher.doc(hit.address)?;
        let id = doc
            .get_first(fields.id)
            .and_then(|v| tantivy::schema::Value::as_str(&v).map(str::to_owned))
            .unwrap_or_default();
        let mut h = json!({ "_index": index.name, "_id": id });
        if scores {
            h["_score"] = json!(hit.score);
            max_score = Some(max_score.map_or(hit.score, |m: f32| m.max(hit.score)));
        } else {
            h["_score"] = Value::Null;
        }
        if req.version || req.seq_no_primary_term {
            let stored = crate::shard::stored_doc(&doc, &fields);
            if req.version {
                h["_version"] = json!(stored.version);
            }
            if req.seq_no_primary_term {
                h["_seq_no"] = json!(stored.seq_no);
                h["_primary_term"] = json!(PRIMARY_TERM);
            }
        }
        if let Some(source) = search::hit_source(&doc, &fields, &req.source) {
            h["_source"] = source;
        }
        if let Some(highlight) = &req.highlight {
            let stored = crate::shard::stored_doc(&doc, &fields);
            let source: Value = serde_json::from_str(&stored.source).unwrap_or(Value::Null);
            let mut analyzer = default_analyzer(index.shards()[hit.origin.1].index())?;
            if let Some(marked) =
                highlight.apply(&req.query, &index.mapping(), &mut analyzer, &source)
            {
                h["highlight"] = marked;
            }
        }
        if sorted {
            h["sort"] = search::sort_json(hit, req, &index.mapping());
        }
        out_hits.push(h);
    }
    if scores && max_score.is_none() && total > 0 && req.size == 0 {
        max_score = None;
    }
    let mut hits_obj = Map::new();
    match req.track_total_hits {
        TrackTotal::Off => {}
        TrackTotal::Exact => {
            hits_obj.insert(
                "total".into(),
                total_json(total, "eq", rest_total_hits_as_int),
            );
        }
        TrackTotal::UpTo(limit) => {
            let (value, relation) = if total > limit {
                (limit, "gte")
            } else {
                (total, "eq")
            };
            hits_obj.insert(
                "total".into(),
                total_json(value, relation, rest_total_hits_as_int),
            );
        }
    }
    hits_obj.insert(
        "max_score".into(),
        max_score.map_or(Value::Null, |m| json!(m)),
    );
    hits_obj.insert("hits".into(), Value::Array(out_hits));
    let mut body = json!({
        "took": started.elapsed().as_millis() as u64,
        "timed_out": false,
        "_shards": { "total": shard_count, "successful": shard_count, "skipped": 0, "failed": 0 },
        "hits": Value::Object(hits_obj),
    });
    if let Some(plan) = &plan {
        let mut aggregations = plan.finish(agg_parts)?;
        let mut run = |filters: &[query::QueryAst], page: &Value| -> Result<Value, EsError> {
            let mut sub = SearchRequest::parse(page)?;
            if page.get("size").is_none() {
                sub.size = 3;
            }
            sub.query = query::QueryAst::Bool {
                must: vec![req.query.clone()],
                should: Vec::new(),
                must_not: Vec::new(),
                filter: filters.to_vec(),
                minimum_should_match: None,
                boost: 1.0,
            };
            sub.track_total_hits = TrackTotal::Exact;
            let result = run_search(indices, &sub, rest_total_hits_as_int)?;
            Ok(result["hits"].clone())
        };
        plan.fill_top_hits(&mut aggregations, &[], &mut run)?;
        body["aggregations"] = aggregations;
    }
    Ok(body)
}

fn total_json(value: u64, relation: &str, as_int: bool) -> Value {
    if as_int {
        json!(value)
    } else {
        json!({ "value": value, "relation": relation })
    }
}

async fn search_impl(
    state: &AppState,
    target: Option<String>,
    params: &HashMap<String, String>,
    body: Bytes,
) -> ApiResult {
    let body = parse_json(&body, ErrorKind::Parsing)?;
    let body = merge_params(body, params)?;
    let req = SearchRequest::parse(&body)?;
    let indices = match &target {
        Some(t) => state.node.resolve(t)?,
        None => state.node.all(),
    };
    let as_int = params.get("rest_total_hits_as_int").map(String::as_str) == Some("true");
    let body = blocking(move || run_search(&indices, &req, as_int)).await?;
    ok(body)
}

async fn search_index(
    State(state): State<AppState>,
    Path(index): Path<String>,
    Query(params): Params,
    body: Bytes,
) -> ApiResult {
    search_impl(&state, Some(index), &params, body).await
}

async fn search_all(
    State(state): State<AppState>,
    Query(params): Params,
    body: Bytes,
) -> ApiResult {
    search_impl(&state, None, &params, body).await
}

async fn count_impl(state: &AppState, target: Option<String>, body: Bytes) -> ApiResult {
    let body = parse_json(&body, ErrorKind::Parsing)?;
    let query = match &body {
        Value::Null => query::QueryAst::MatchAll { boost: 1.0 },
        Value::Object(o) => {
            for key in o.keys() {
                if key != "query" {
                    return Err(EsError::parsing(format!(
                        "request does not support [{key}]"
                    )));
                }
            }
            match o.get("query") {
                Some(q) => query::parse(q)?,
                None => query::QueryAst::MatchAll { boost: 1.0 },
            }
        }
        _ => return Err(EsError::parsing("request body must be a JSON object")),
    };
    let indices = match &target {
        Some(t) => state.node.resolve(t)?,
        None => state.node.all(),
    };
    let body = blocking(move || {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut count = 0;
        let mut shards = 0;
        for index in &indices {
            let mapping = index.mapping();
            let Some(mut ctx) = query_context(index, &mapping, now_ms)? else {
                continue;
            };
            let q = ctx.build(&query).map_err(|e| index_error(e, &index.name))?;
            for shard in index.shards() {
                shards += 1;
                count += shard.searcher().search(&*q, &Count)?;
            }
        }
        Ok(json!({
            "count": count,
            "_shards": { "total": shards, "successful": shards, "skipped": 0, "failed": 0 },
        }))
    })
    .await?;
    ok(body)
}

async fn count(State(state): State<AppState>, Path(index): Path<String>, body: Bytes) -> ApiResult {
    count_impl(&state, Some(index), body).await
}

async fn count_all(State(state): State<AppState>, body: Bytes) -> ApiResult {
    count_impl(&state, None, body).await
}

async fn msearch_impl(state: &AppState, default_index: Option<String>, body: Bytes) -> ApiResult {
    let started = Instant::now();
    let text = std::str::from_utf8(&body)
        .map_err(|_| EsError::illegal_argument("msearch body is not UTF-8"))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let mut responses = Vec::new();
    while let Some(header_line) = lines.next() {
        let header: Value = serde_json::from_str(header_line)
            .map_err(|e| EsError::parsing(format!("failed to parse msearch header: {e}")))?;
        let Some(body_line) = lines.next() else {
            return Err(EsError::parsing("msearch header without a body line"));
        };
        let target = match header.get("index") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            _ => default_index.clone(),
        };
        let one = async {
            let body: Value = serde_json::from_str(body_line)
                .map_err(|e| EsError::parsing(format!("failed to parse search body: {e}")))?;
            let req = SearchRequest::parse(&body)?;
            let indices = match &target {
                Some(t) => state.node.resolve(t)?,
                None => state.node.all(),
            };
            blocking(move || run_search(&indices, &req, false)).await
        }
        .await;
        responses.push(match one {
            Ok(mut body) => {
                body["status"] = json!(200);
                body
            }
            Err(e) => {
                let mut body = e.to_json();
                body["status"] = json!(e.status());
                body
            }
        });
    }
    ok(json!({ "took": started.elapsed().as_millis() as u64, "responses": responses }))
}

async fn msearch(
    State(state): State<AppState>,
    Path(index): Path<String>,
    body: Bytes,
) -> ApiResult {
    msearch_impl(&state, Some(index), body).await
}

async fn msearch_all(State(state): State<AppState>, body: Bytes) -> ApiResult {
    msearch_impl(&state, None, body).await
}

async fn delete_by_query(
    State(state): State<AppState>,
    Path(target): Path<String>,
    Query(params): Params,
    body: Bytes,
) -> ApiResult {
    let started = Instant::now();
    let body = parse_json(&body, ErrorKind::Parsing)?;
    let q = body
        .get("query")
        .ok_or_else(|| {
            EsError::new(
                ErrorKind::ActionRequestValidation,
                "Validation Failed: 1: query is missing;",
            )
        })
        .and_then(query::parse)?;
    let refresh = wants_refresh(&params)?;
    let indices = state.node.resolve(&target)?;
    let targets = indices.clone();
    // Which documents match, per (index, shard), at the last refresh.
    let matches = blocking(move || {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut out: Vec<(usize, usize, Vec<String>)> = Vec::new();
        for (i, index) in targets.iter().enumerate() {
            let mapping = index.mapping();
            let Some(mut ctx) = query_context(index, &mapping, now_ms)? else {
                continue;
            };
            let query = ctx.build(&q).map_err(|e| index_error(e, &index.name))?;
            for (s, shard) in index.shards().iter().enumerate() {
                let searcher = shard.searcher();
                let fields = shard.fields();
                let addresses = searcher.search(&*query, &tantivy::collector::DocSetCollector)?;
                let mut ids = Vec::with_capacity(addresses.len());
                for addr in addresses {
                    let doc: TantivyDocument = searcher.doc(addr)?;
                    if let Some(id) = doc
                        .get_first(fields.id)
                        .and_then(|v| tantivy::schema::Value::as_str(&v).map(str::to_owned))
                    {
                        ids.push(id);
                    }
                }
                out.push((i, s, ids));
            }
        }
        Ok(out)
    })
    .await?;
    let mut total = 0;
    let mut deleted = 0;
    let mut failures = Vec::new();
    let mut touched = Vec::new();
    for (i, s, ids) in matches {
        total += ids.len();
        let ops = ids
            .iter()
            .map(|id| WriteOp::Delete {
                id: id.clone(),
                cond: Conditions::default(),
            })
            .collect();
        for (id, outcome) in ids.iter().zip(indices[i].shards()[s].write(ops).await?) {
            if let Ok(o) = &outcome {
                touched.push((i, s, o.seq_no));
            }
            match outcome {
                Ok(o) if o.result == WriteResult::Deleted => deleted += 1,
                Ok(_) => {}
                Err(e) => failures.push(json!({ "index": indices[i].name, "id": id, "cause": e.cause_json(), "status": e.status() })),
            }
        }
    }
    match refresh {
        None => {}
        Some(true) => {
            for index in &indices {
                force_refresh(index).await?;
            }
        }
        Some(false) => {
            for (i, s, seq_no) in touched {
                indices[i].shards()[s].wait_for(seq_no).await?;
            }
        }
    }
    ok(json!({
        "took": started.elapsed().as_millis() as u64,
        "timed_out": false,
        "total": total,
        "deleted": deleted,
        "batches": 1,
        "version_conflicts": 0,
        "noops": total.saturating_sub(deleted + failures.len()),
        "retries": { "bulk": 0, "search": 0 },
        "throttled_millis": 0,
        "requests_per_second": -1.0,
        "throttled_until_millis": 0,
        "failures": failures,
    }))
}

/// Serves the API on `listener` until `shutdown` is cancelled, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
