//! API behaviour as data: each `tests/scenarios/*.json` file is a list of steps, each a request
//! and the response expected from a fresh server.
//!
//! A step: `{"method", "path", "body" | "ndjson" | "raw", "status", "expect", "expect_ids",
//! "expect_text"}`. `expect` is matched as a subset: objects need the listed keys (recursively),
//! arrays need the same length and matching elements, and the string `"$any"` matches anything.
//! `expect_ids` lists the `_id`s of `hits.hits` in order.

use serde_json::Value;

use crate::server::TestServer;

fn subset(expected: &Value, actual: &Value, at: &str, errors: &mut Vec<String>) {
    match (expected, actual) {
        (Value::String(s), _) if s == "$any" => {}
        (Value::Object(e), Value::Object(a)) => {
            for (k, v) in e {
                match a.get(k) {
                    Some(av) => subset(v, av, &format!("{at}.{k}"), errors),
                    None if v.is_null() => {}
                    None => errors.push(format!("{at}.{k}: missing")),
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                errors.push(format!(
                    "{at}: expected {} elements, got {}: {actual}",
                    e.len(),
                    a.len()
                ));
                return;
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                subset(ev, av, &format!("{at}[{i}]"), errors);
            }
        }
        (Value::Number(e), Value::Number(a)) => {
            if e.as_f64() != a.as_f64() {
                errors.push(format!("{at}: expected {e}, got {a}"));
            }
        }
        (e, a) => {
            if e != a {
                errors.push(format!("{at}: expected {e}, got {a}"));
            }
        }
    }
}

async fn run(file: &str) {
    let path = format!("{}/tests/scenarios/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("scenario file");
    let scenario: Value = serde_json::from_str(&text).expect("scenario is JSON");
    let steps = scenario["steps"].as_array().expect("steps");
    let server = TestServer::start().await;
    let client = reqwest::Client::new();
    let mut failures = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        let method = step["method"].as_str().unwrap_or("GET");
        let path = step["path"].as_str().expect("path");
        let mut request = client.request(method.parse().expect("method"), server.url(path));
        if let Some(body) = step.get("body") {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        } else if let Some(lines) = step.get("ndjson") {
            let mut body = String::new();
            for line in lines.as_array().expect("ndjson lines") {
                match line {
                    Value::String(s) => body.push_str(s),
                    other => body.push_str(&other.to_string()),
                }
                body.push('\n');
            }
            request = request
                .header("content-type", "application/x-ndjson")
                .body(body);
        } else if let Some(raw) = step.get("raw") {
            request = request
                .header("content-type", "application/json")
                .body(raw.as_str().expect("raw").to_owned());
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let product = response
            .headers()
            .get("x-elastic-product")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await.expect("body");
        let label = format!("step {n} ({method} {path})");
        if product.as_deref() != Some("Elasticsearch") {
            failures.push(format!("{label}: missing X-Elastic-Product header"));
        }
        if let Some(expected) = step.get("status").and_then(Value::as_u64) {
            if u64::from(status) != expected {
                failures.push(format!(
                    "{label}: status {status}, expected {expected}: {text}"
                ));
                continue;
            }
        }
        if let Some(needle) = step.get("expect_text").and_then(Value::as_str) {
            if !text.contains(needle) {
                failures.push(format!("{label}: body {text:?} lacks {needle:?}"));
            }
        }
        let needs_json = step.get("expect").is_some() || step.get("expect_ids").is_some();
        if !needs_json {
            continue;
        }
        let actual: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{label}: body is not JSON ({e}): {text}"));
                continue;
            }
        };
        let mut errors = Vec::new();
        if let Some(expected) = step.get("expect") {
            subset(expected, &actual, "$", &mut errors);
        }
        if let Some(ids) = step.get("expect_ids") {
            let got: Vec<Value> = actual["hits"]["hits"]
                .as_array()
                .map(|h| h.iter().map(|h| h["_id"].clone()).collect())
                .unwrap_or_default();
            if &Value::Array(got.clone()) != ids {
                errors.push(format!("hit ids {got:?}, expected {ids}"));
            }
        }
        for e in errors {
            failures.push(format!("{label}: {e}\n    actual: {actual}"));
        }
    }
    server.stop().await;
    assert!(failures.is_empty(), "{file}:\n{}", failures.join("\n"));
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                run(concat!(stringify!($name), ".json")).await;
            }
        )*
    };
}

scenarios!(
    root_and_cluster,
    index_admin,
    documents,
    bulk,
    queries,
    sorting_and_paging,
    source_filtering,
    count_msearch_delete_by_query,
    errors,
    aggregations,
    refresh,
);
