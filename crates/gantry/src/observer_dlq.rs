//! `gantry observer dlq list|show|retry|retry-all|remove|stats`: the observer's dead-letter
//! queue, which is the DEAD jobs of queue `observer` in the jobs store.

use clap::Subcommand;
use gantry_jobs::model::{Job, Status};
use gantry_jobs::store::postgres::PostgresStore;
use gantry_jobs::store::{JobError, ListFilter, ListOrder, Store as _};
use serde_json::{Value, json};

use crate::observer_cli::{Failure, exit, failure};

/// The queue observer action jobs are in.
const QUEUE: &str = "observer";

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Actions that failed for good, newest first.
    List {
        /// Only this observer's.
        #[arg(long, value_name = "NAME")]
        observer: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One item: the event, the action, its attempts and last error.
    Show {
        /// The item's (job's) id.
        id: String,
    },
    /// Gives one item a new round of attempts.
    Retry {
        /// The item's (job's) id.
        id: String,
    },
    /// Gives every item (of one observer, with --observer) a new round of attempts.
    RetryAll {
        /// Only this observer's.
        #[arg(long, value_name = "NAME")]
        observer: Option<String>,
    },
    /// Deletes one item.
    Remove {
        /// The item's (job's) id.
        id: String,
    },
    /// Items by observer and action.
    Stats,
}

/// Where the dead-letter queue is.
#[derive(Debug, clap::Args)]
pub struct DlqTarget {
    /// The watched database (the jobs store is in it).
    #[arg(long, value_name = "URL")]
    pub database: String,
    /// The jobs store's schema.
    #[arg(long, value_name = "NAME", default_value = "gantry_jobs")]
    pub jobs_schema: String,
    /// Print JSON instead of a table or sentence.
    #[arg(long)]
    pub json: bool,
}

/// (observer, action) of an action job name `observer:<observer>:<action>`.
fn split_name(name: &str) -> (&str, &str) {
    let rest = name.strip_prefix("observer:").unwrap_or(name);
    rest.rsplit_once(':').unwrap_or((rest, ""))
}

fn item_json(job: &Job, full: bool) -> Value {
    let (observer, action) = split_name(&job.name);
    let event: Value = serde_json::from_slice::<Value>(&job.args)
        .ok()
        .and_then(|v| v.get(0).cloned())
        .unwrap_or(Value::Null);
    let mut item = json!({
        "id": job.id,
        "observer": observer,
        "action": action,
        "event_id": event.get("id"),
        "attempts": job.attempt,
        "failed_at_ms": job.completed_at,
        "error": job.error,
    });
    if full {
        item["event"] = event;
        item["created_at_ms"] = json!(job.created_at);
        item["status"] = json!(job.status.as_str());
    }
    item
}

async fn dead(
    store: &PostgresStore,
    observer: Option<&str>,
    limit: usize,
) -> Result<(Vec<Job>, u64), Failure> {
    let names = match observer {
        None => Vec::new(),
        Some(o) => store
            .count_by_name(QUEUE, Status::Dead)
            .await
            .map_err(store_failure)?
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| split_name(name).0 == o)
            .collect(),
    };
    if observer.is_some() && names.is_empty() {
        return Ok((Vec::new(), 0));
    }
    store
        .list(ListFilter {
            statuses: vec![Status::Dead],
            names,
            queue: Some(QUEUE.into()),
            limit,
            offset: 0,
            order_by: ListOrder::CreatedAt,
            ascending: false,
        })
        .await
        .map_err(store_failure)
}

fn store_failure(e: gantry_jobs::store::StoreError) -> Failure {
    failure(exit::ERROR, format!("jobs store: {e}"))
}

fn job_failure(e: JobError) -> Failure {
    match e {
        JobError::NotFound(_) => failure(exit::NOT_FOUND, e.to_string()),
        JobError::Rejected(_) => failure(exit::VALIDATION, e.to_string()),
    }
}

/// An item of the dead-letter queue, or why not.
async fn item(store: &PostgresStore, id: &str) -> Result<Job, Failure> {
    match store.get(id.to_owned()).await.map_err(store_failure)? {
        Some(job) if job.queue == QUEUE && job.status == Status::Dead => Ok(job),
        Some(job) if job.queue == QUEUE => Err(failure(
            exit::VALIDATION,
            format!("{id} is not in the dead-letter queue: it is {}", job.status),
        )),
        _ => Err(failure(
            exit::NOT_FOUND,
            format!("no dead-letter item {id}"),
        )),
    }
}

/// Runs a `dlq` command.
pub async fn run(target: DlqTarget, command: DlqCommand) -> Result<(), Failure> {
    let store = PostgresStore::connect(&target.database, &target.jobs_schema)
        .await
        .map_err(|e| {
            failure(
                exit::CANNOT_CONNECT,
                format!("cannot open the jobs store in {}: {e}", target.database),
            )
        })?;
    let json = target.json;
    match command {
        DlqCommand::List { observer, limit } => {
            let (jobs, total) = dead(&store, observer.as_deref(), limit).await?;
            if json {
                let items: Vec<Value> = jobs.iter().map(|j| item_json(j, false)).collect();
                println!("{}", json!({ "total": total, "items": items }));
            } else if jobs.is_empty() {
                println!("the dead-letter queue is empty");
            } else {
                println!(
                    "{:<36}  {:<20}  {:<12}  {:>8}  {:>8}  ERROR",
                    "ID", "OBSERVER", "ACTION", "EVENT", "ATTEMPTS"
                );
                for j in &jobs {
                    let i = item_json(j, false);
                    println!(
                        "{:<36}  {:<20}  {:<12}  {:>8}  {:>8}  {}",
                        j.id,
                        i["observer"].as_str().unwrap_or_default(),
                        i["action"].as_str().unwrap_or_default(),
                        i["event_id"],
                        j.attempt,
                        j.error.as_deref().unwrap_or_default()
                    );
                }
                if total > jobs.len() as u64 {
                    println!("({} of {total} shown)", jobs.len());
                }
            }
        }
        DlqCommand::Show { id } => {
            let job = item(&store, &id).await?;
            let i = item_json(&job, true);
            if json {
                println!("{i}");
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&i).unwrap_or_else(|_| i.to_string())
                );
            }
        }
        DlqCommand::Retry { id } => {
            item(&store, &id).await?;
            let job = store
                .retry(id, gantry_jobs::model::now_millis())
                .await
                .map_err(store_failure)?
                .map_err(job_failure)?;
            if json {
                println!("{}", json!({ "retried": [job.id] }));
            } else {
                println!("{} is pending again ({})", job.id, job.name);
            }
        }
        DlqCommand::RetryAll { observer } => {
            let mut retried = Vec::new();
            loop {
                let (jobs, _) = dead(&store, observer.as_deref(), 500).await?;
                if jobs.is_empty() {
                    break;
                }
                for j in jobs {
                    // One already revived by someone else is skipped.
                    if let Ok(job) = store
                        .retry(j.id, gantry_jobs::model::now_millis())
                        .await
                        .map_err(store_failure)?
                    {
                        retried.push(job.id);
                    }
                }
            }
            if json {
                println!("{}", json!({ "retried": retried }));
            } else {
                println!("{} item(s) pending again", retried.len());
            }
        }
        DlqCommand::Remove { id } => {
            item(&store, &id).await?;
            let job = store
                .remove_finished(id)
                .await
                .map_err(store_failure)?
                .map_err(job_failure)?;
            if json {
                println!("{}", json!({ "removed": job.id }));
            } else {
                println!("{} removed", job.id);
            }
        }
        DlqCommand::Stats => {
            let counts = store
                .count_by_name(QUEUE, Status::Dead)
                .await
                .map_err(store_failure)?;
            let total: u64 = counts.iter().map(|(_, n)| n).sum();
            if json {
                let by: Vec<Value> = counts
                    .iter()
                    .map(|(name, n)| {
                        let (observer, action) = split_name(name);
                        json!({ "observer": observer, "action": action, "count": n })
                    })
                    .collect();
                println!("{}", json!({ "total": total, "by_action": by }));
            } else {
                println!("{:<24}  {:<16}  {:>8}", "OBSERVER", "ACTION", "ITEMS");
                for (name, n) in &counts {
                    let (observer, action) = split_name(name);
                    println!("{observer:<24}  {action:<16}  {n:>8}");
                }
                println!("{:<24}  {:<16}  {total:>8}", "total", "");
            }
        }
    }
    Ok(())
}
