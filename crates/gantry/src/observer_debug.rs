//! `gantry observer debug-event` (one event: which observers matched it, why the others did
//! not, and each action's job) and `gantry observer metrics` (a running listener's metrics).

use std::path::Path;

use gantry_jobs::store::postgres::PostgresStore;
use gantry_observer::config::ObserverConfig;
use gantry_observer::dispatch::{Matcher, Verdict};
use serde_json::{Value, json};

use crate::observer_cli::{Failure, connect, db_failure, exit, failure};

/// `debug-event`.
pub async fn debug_event(
    url: &str,
    config: &Path,
    schema: &str,
    jobs_schema: &str,
    id: i64,
    as_json: bool,
) -> Result<(), Failure> {
    let config = ObserverConfig::load(config).map_err(|e| failure(exit::CONFIG, e.to_string()))?;
    let client = connect(url).await?;
    if gantry_observer::capture::status(&client, schema)
        .await
        .map_err(db_failure)?
        .is_none()
    {
        return Err(failure(
            exit::NOT_FOUND,
            format!("schema {schema} is not installed (gantry observer install)"),
        ));
    }
    let Some(event) = gantry_observer::capture::event(&client, schema, id)
        .await
        .map_err(db_failure)?
    else {
        return Err(failure(
            exit::NOT_FOUND,
            format!(
                "event {id} is not in the change log of {schema}: never written, or pruned \
                 after every observer set passed it"
            ),
        ));
    };
    let store = PostgresStore::connect(url, jobs_schema)
        .await
        .map_err(|e| failure(exit::CANNOT_CONNECT, format!("jobs store: {e}")))?;
    let key = format!("event:{}", event.key());
    let mut observers = Vec::new();
    for observer in config.observers {
        let matcher = Matcher::new(observer);
        let verdict = matcher.verdict(&event);
        let mut actions = Vec::new();
        if verdict == Verdict::Matched {
            for (name, action) in matcher.job_names().zip(&matcher.observer.actions) {
                let job = store
                    .get_by_key(name, &key)
                    .await
                    .map_err(|e| failure(exit::ERROR, format!("jobs store: {e}")))?;
                actions.push(json!({
                    "action": action.name(),
                    "type": action.kind(),
                    "job": job.as_ref().map(|j| json!({
                        "id": j.id,
                        "status": j.status.as_str(),
                        "attempts": j.attempt,
                        "max_attempts": j.options.retry.max_attempts(),
                        "next_run_at_ms": (j.status == gantry_jobs::model::Status::Pending).then_some(j.run_at),
                        "completed_at_ms": j.completed_at,
                        "error": j.error,
                        "result": j.result.as_deref().and_then(|r| serde_json::from_slice::<Value>(r).ok()),
                    })),
                }));
            }
        }
        observers.push(json!({
            "observer": matcher.observer.name,
            "matched": verdict == Verdict::Matched,
            "why": verdict.to_string(),
            "actions": actions,
        }));
    }
    let report = json!({
        "event": {
            "id": event.id,
            "key": event.key(),
            "entity": event.entity,
            "op": event.op.as_str(),
            "changed_at_ms": event.changed_at_ms,
            "before": event.before,
            "after": event.after,
        },
        "observers": observers,
    });
    if as_json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "event {} (key {}): {} on {} at {} ms",
        event.id,
        event.key(),
        event.op.as_str(),
        event.entity,
        event.changed_at_ms
    );
    for (label, image) in [("before", &event.before), ("after", &event.after)] {
        if let Some(image) = image {
            println!("  {label}: {image}");
        }
    }
    for o in report["observers"].as_array().into_iter().flatten() {
        println!(
            "observer {}: {}",
            o["observer"].as_str().unwrap_or_default(),
            o["why"].as_str().unwrap_or_default()
        );
        for a in o["actions"].as_array().into_iter().flatten() {
            let what = match a["job"].as_object() {
                None => "no job: not handed over yet".to_owned(),
                Some(j) => format!(
                    "{} after {} of {} attempt(s){}{} [job {}]",
                    j["status"].as_str().unwrap_or_default(),
                    j["attempts"],
                    j["max_attempts"],
                    j["error"]
                        .as_str()
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default(),
                    j["next_run_at_ms"]
                        .as_i64()
                        .map(|t| format!(", next attempt at {t} ms"))
                        .unwrap_or_default(),
                    j["id"].as_str().unwrap_or_default()
                ),
            };
            println!(
                "  action {} ({}): {what}",
                a["action"].as_str().unwrap_or_default(),
                a["type"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// `metrics`: the `gantry_observer_*` samples a running `run --admin ADDR` serves.
pub async fn metrics(admin: &str, as_json: bool) -> Result<(), Failure> {
    let url = format!("http://{admin}/metrics");
    let text = reqwest::get(&url)
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| failure(exit::CANNOT_CONNECT, format!("cannot read {url}: {e}")))?
        .text()
        .await
        .map_err(|e| failure(exit::CANNOT_CONNECT, format!("cannot read {url}: {e}")))?;
    let samples: Vec<(&str, &str)> = text
        .lines()
        .filter(|l| l.starts_with("gantry_observer_"))
        .filter_map(|l| l.rsplit_once(' '))
        .collect();
    if as_json {
        let map: serde_json::Map<String, Value> = samples
            .iter()
            .map(|(k, v)| {
                let value = v
                    .parse::<f64>()
                    .ok()
                    .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
                    .unwrap_or(Value::Null);
                ((*k).to_owned(), value)
            })
            .collect();
        println!("{}", Value::Object(map));
    } else {
        for (k, v) in samples {
            println!("{k} {v}");
        }
    }
    Ok(())
}
