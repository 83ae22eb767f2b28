//! `gantry jobs list|show|retry|cancel|stats|purge` and `gantry jobs schedules
//! list|create|show|pause|resume|delete`: a gRPC client of a running jobs server.
//!
//! Exit codes: 0 ok, 1 error, 2 usage, 3 cannot connect, 4 not found.

use std::time::Duration;

use gantry_jobs::proto::gantry::jobs::v1::{self, jobs_client::JobsClient};
use gantry_jobs::proto::reseolio_client::ReseolioClient;
use gantry_jobs::proto::{self, JobStatus, ScheduleStatus};
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

use crate::exit;

/// A failed command: its message and exit code.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

fn failure(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

fn from_status(s: tonic::Status) -> Failure {
    let code = match s.code() {
        Code::NotFound => exit::NOT_FOUND,
        Code::Unavailable => exit::CANNOT_CONNECT,
        Code::InvalidArgument => exit::USAGE,
        _ => exit::ERROR,
    };
    failure(code, s.message().to_owned())
}

/// Connects to the server at `server` (`host:port` or a URL).
pub async fn connect(server: &str) -> Result<Channel, Failure> {
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let endpoint = Channel::from_shared(url.clone())
        .map_err(|e| failure(exit::USAGE, format!("bad server address {server}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60));
    endpoint.connect().await.map_err(|e| {
        failure(
            exit::CANNOT_CONNECT,
            format!("cannot connect to the jobs server at {url}: {e}"),
        )
    })
}

/// Parses a status name (`pending`, `dead`, ...).
pub fn parse_status(s: &str) -> Result<JobStatus, String> {
    match s.to_ascii_lowercase().as_str() {
        "pending" => Ok(JobStatus::Pending),
        "running" => Ok(JobStatus::Running),
        "success" | "succeeded" => Ok(JobStatus::Success),
        "dead" => Ok(JobStatus::Dead),
        "cancelled" | "canceled" => Ok(JobStatus::Cancelled),
        other => Err(format!(
            "unknown status `{other}`, expected pending, running, success, dead or cancelled"
        )),
    }
}

fn status_name(code: i32) -> &'static str {
    match JobStatus::try_from(code) {
        Ok(JobStatus::Pending) => "pending",
        Ok(JobStatus::Running) => "running",
        Ok(JobStatus::Success) => "success",
        Ok(JobStatus::Failed) => "failed",
        Ok(JobStatus::Dead) => "dead",
        Ok(JobStatus::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn payload(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn time(ms: i64) -> Value {
    if ms == 0 { Value::Null } else { json!(ms) }
}

fn job_json(j: &proto::Job) -> Value {
    json!({
        "id": j.id,
        "name": j.name,
        "queue": j.queue,
        "priority": j.priority,
        "status": status_name(j.status),
        "attempt": j.attempt,
        "max_attempts": j.max_attempts,
        "args": payload(&j.args),
        "result": payload(&j.result),
        "error": if j.error.is_empty() { Value::Null } else { json!(j.error) },
        "idempotency_key": if j.idempotency_key.is_empty() { Value::Null } else { json!(j.idempotency_key) },
        "created_at": time(j.created_at),
        "run_at": time(j.scheduled_at),
        "started_at": time(j.started_at),
        "completed_at": time(j.completed_at),
        "lease_until": time(j.deadline_ms),
        "cancel_requested": j.cancel_requested,
    })
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows as a table with a header, columns padded to their widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn when(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// What `gantry jobs enqueue` was given.
pub struct EnqueueArgs {
    pub name: String,
    pub args: String,
    pub delay: Option<Duration>,
    pub priority: u8,
    pub idempotency_key: Option<String>,
    pub max_attempts: Option<u32>,
}

/// `gantry jobs enqueue`.
pub async fn enqueue(channel: Channel, a: EnqueueArgs, json_out: bool) -> Result<(), Failure> {
    let mut client = ReseolioClient::new(channel);
    let resp = client
        .enqueue_job(proto::EnqueueRequest {
            name: a.name,
            args: a.args.into_bytes(),
            options: a.max_attempts.map(|n| proto::JobOptions {
                max_attempts: i32::try_from(n).unwrap_or(i32::MAX),
                ..Default::default()
            }),
            idempotency_key: a.idempotency_key.unwrap_or_default(),
            delay_ms: a
                .delay
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0),
            priority: i32::from(a.priority),
            ..Default::default()
        })
        .await
        .map_err(from_status)?
        .into_inner();
    if json_out {
        print_json(&json!({ "id": resp.job_id, "deduplicated": resp.deduplicated }));
    } else if resp.deduplicated {
        println!(
            "{} (already enqueued with this idempotency key)",
            resp.job_id
        );
    } else {
        println!("{}", resp.job_id);
    }
    Ok(())
}

/// `gantry jobs list`.
pub async fn list(
    channel: Channel,
    statuses: Vec<JobStatus>,
    names: Vec<String>,
    limit: u32,
    offset: u32,
    json_out: bool,
) -> Result<(), Failure> {
    let mut client = ReseolioClient::new(channel);
    let resp = client
        .list_jobs(proto::ListJobsRequest {
            statuses: statuses.into_iter().map(|s| s as i32).collect(),
            names,
            limit: i32::try_from(limit).unwrap_or(i32::MAX),
            offset: i32::try_from(offset).unwrap_or(i32::MAX),
            order_by: String::new(),
            ascending: false,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    if json_out {
        print_json(&json!({
            "total": resp.total,
            "jobs": resp.jobs.iter().map(job_json).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = resp
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.name.clone(),
                status_name(j.status).to_owned(),
                format!("{}/{}", j.attempt, j.max_attempts),
                when(j.created_at),
                j.error
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(60)
                    .collect(),
            ]
        })
        .collect();
    print_table(
        &["ID", "NAME", "STATUS", "ATTEMPT", "CREATED", "ERROR"],
        &rows,
    );
    println!("{} of {} jobs", resp.jobs.len(), resp.total);
    Ok(())
}

/// `gantry jobs show ID`.
pub async fn show(channel: Channel, id: String, json_out: bool) -> Result<(), Failure> {
    let mut client = ReseolioClient::new(channel);
    let job = client
        .get_job(proto::GetJobRequest { job_id: id })
        .await
        .map_err(from_status)?
        .into_inner();
    let v = job_json(&job);
    if json_out {
        print_json(&v);
        return Ok(());
    }
    if let Value::Object(map) = v {
        for (key, value) in map {
            let text = match (&value, key.as_str()) {
                (
                    Value::Number(n),
                    "created_at" | "run_at" | "started_at" | "completed_at" | "lease_until",
                ) => when(n.as_i64().unwrap_or(0)),
                (Value::String(s), _) => s.clone(),
                (Value::Null, _) => "-".into(),
                (other, _) => other.to_string(),
            };
            println!("{key:<16} {text}");
        }
    }
    Ok(())
}

/// `gantry jobs retry ID` and `gantry jobs cancel ID`.
pub async fn retry_or_cancel(
    channel: Channel,
    id: String,
    cancel: bool,
    json_out: bool,
) -> Result<(), Failure> {
    let mut client = ReseolioClient::new(channel);
    // Unknown ids are "not found" (exit 4), which the calls themselves report only in text.
    client
        .get_job(proto::GetJobRequest { job_id: id.clone() })
        .await
        .map_err(from_status)?;
    let (success, message) = if cancel {
        let r = client
            .cancel_job(proto::CancelRequest { job_id: id.clone() })
            .await
            .map_err(from_status)?
            .into_inner();
        (r.success, r.message)
    } else {
        let r = client
            .retry_job(proto::RetryRequest { job_id: id.clone() })
            .await
            .map_err(from_status)?
            .into_inner();
        (r.success, r.message)
    };
    if json_out {
        print_json(&json!({ "id": id, "success": success, "message": message }));
    } else if success {
        println!("{message}");
    }
    if success {
        Ok(())
    } else {
        Err(failure(exit::ERROR, message))
    }
}

/// `gantry jobs stats`.
pub async fn stats(channel: Channel, json_out: bool) -> Result<(), Failure> {
    let mut client = JobsClient::new(channel);
    let resp = client
        .stats(v1::StatsRequest {})
        .await
        .map_err(from_status)?
        .into_inner();
    if json_out {
        let map: serde_json::Map<String, Value> = resp
            .counts
            .iter()
            .map(|c| (status_name(c.status).to_owned(), json!(c.count)))
            .collect();
        print_json(&Value::Object(map));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = resp
        .counts
        .iter()
        .map(|c| vec![status_name(c.status).to_owned(), c.count.to_string()])
        .collect();
    print_table(&["STATUS", "JOBS"], &rows);
    Ok(())
}

/// `gantry jobs purge --older-than D`.
pub async fn purge(
    channel: Channel,
    older_than: Duration,
    statuses: Vec<JobStatus>,
    json_out: bool,
) -> Result<(), Failure> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let before = now.saturating_sub(older_than);
    let mut client = JobsClient::new(channel);
    let resp = client
        .purge(v1::PurgeRequest {
            completed_before: i64::try_from(before.as_millis()).unwrap_or(i64::MAX).max(1),
            statuses: statuses.into_iter().map(|s| s as i32).collect(),
        })
        .await
        .map_err(from_status)?
        .into_inner();
    if json_out {
        print_json(&json!({ "deleted": resp.deleted }));
    } else {
        println!("deleted {} finished jobs", resp.deleted);
    }
    Ok(())
}

/// `gantry jobs schedules ...`.
#[derive(Debug, clap::Subcommand)]
pub enum SchedulesCommand {
    /// Lists schedules, soonest next run first.
    List {
        #[command(flatten)]
        client: crate::ClientArgs,
        /// Only schedules in this status: active, paused, deleted, or all (every one not
        /// deleted).
        #[arg(long, default_value = "all", value_parser = ["active", "paused", "deleted", "all"])]
        status: String,
        /// Page size (at most 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Schedules to skip.
        #[arg(long, default_value_t = 0)]
        offset: u32,
    },
    /// Creates a schedule: each tick of CRON enqueues a job named NAME with ARGS.
    Create {
        #[command(flatten)]
        client: crate::ClientArgs,
        /// The schedule's name, which is also its jobs' (handler) name.
        name: String,
        /// Cron expression: 5 fields (min hour dom month dow), 6 with seconds first, or 7 with
        /// a year last; 0 and 7 are Sunday. E.g. `0 9 * * MON-FRI`.
        cron: String,
        /// JSON arguments of every job, usually an array.
        #[arg(default_value = "[]")]
        args: String,
        /// IANA time zone the cron expression is read in, e.g. `Europe/Berlin`.
        #[arg(long, default_value = "UTC", value_name = "ZONE")]
        timezone: String,
        /// Ticks missed while no server could fire them: `coalesce` fires one job for all of
        /// them when possible, `skip` fires none.
        #[arg(long, default_value = "coalesce", value_parser = ["coalesce", "skip"])]
        misfire: String,
        /// Total attempts of every job (default 3).
        #[arg(long)]
        max_attempts: Option<u32>,
    },
    /// Shows one schedule.
    Show {
        #[command(flatten)]
        client: crate::ClientArgs,
        /// The schedule's id or name.
        schedule: String,
    },
    /// Stops a schedule from firing until it is resumed.
    Pause {
        #[command(flatten)]
        client: crate::ClientArgs,
        /// The schedule's id or name.
        schedule: String,
    },
    /// Resumes a paused schedule from its next tick after now (ticks passed while paused never
    /// fire).
    Resume {
        #[command(flatten)]
        client: crate::ClientArgs,
        /// The schedule's id or name.
        schedule: String,
    },
    /// Deletes a schedule: it never fires again and its name is free.
    Delete {
        #[command(flatten)]
        client: crate::ClientArgs,
        /// The schedule's id or name.
        schedule: String,
    },
}

fn schedule_status_name(code: i32) -> &'static str {
    match ScheduleStatus::try_from(code) {
        Ok(ScheduleStatus::Active) => "active",
        Ok(ScheduleStatus::Paused) => "paused",
        Ok(ScheduleStatus::Deleted) => "deleted",
        _ => "unknown",
    }
}

fn schedule_json(s: &proto::Schedule) -> Value {
    let options = s.handler_options.clone().unwrap_or_default();
    json!({
        "id": s.id,
        "name": s.name,
        "cron": s.cron_expression,
        "timezone": s.timezone,
        "status": schedule_status_name(s.status),
        "misfire": s.misfire,
        "args": payload(&s.args),
        "next_run_at": time(s.next_run_at),
        "last_run_at": time(s.last_run_at),
        "created_at": time(s.created_at),
        "updated_at": time(s.updated_at),
        "options": {
            "max_attempts": options.max_attempts,
            "backoff": options.backoff,
            "initial_delay_ms": options.initial_delay_ms,
            "max_delay_ms": options.max_delay_ms,
            "timeout_ms": options.timeout_ms,
            "jitter": options.jitter,
        },
    })
}

/// Runs one `gantry jobs schedules` command.
pub async fn schedules(command: SchedulesCommand) -> Result<(), Failure> {
    match command {
        SchedulesCommand::List {
            client,
            status,
            limit,
            offset,
        } => {
            let channel = connect(&client.server).await?;
            list_schedules(channel, status, limit, offset, client.json).await
        }
        SchedulesCommand::Create {
            client,
            name,
            cron,
            args,
            timezone,
            misfire,
            max_attempts,
        } => {
            let mut c = ReseolioClient::new(connect(&client.server).await?);
            let s = c
                .create_schedule(proto::CreateScheduleRequest {
                    name,
                    cron_expression: cron,
                    timezone,
                    handler_options: max_attempts.map(|n| proto::JobOptions {
                        max_attempts: i32::try_from(n).unwrap_or(i32::MAX),
                        ..Default::default()
                    }),
                    args: args.into_bytes(),
                    misfire,
                })
                .await
                .map_err(from_status)?
                .into_inner();
            report_schedule(&s, "created", client.json);
            Ok(())
        }
        SchedulesCommand::Show { client, schedule } => {
            let mut c = ReseolioClient::new(connect(&client.server).await?);
            let s = c
                .get_schedule(proto::GetScheduleRequest {
                    schedule_id: schedule,
                })
                .await
                .map_err(from_status)?
                .into_inner();
            show_schedule(&s, client.json);
            Ok(())
        }
        SchedulesCommand::Pause { client, schedule } => {
            let mut c = ReseolioClient::new(connect(&client.server).await?);
            let s = c
                .pause_schedule(proto::PauseScheduleRequest {
                    schedule_id: schedule,
                })
                .await
                .map_err(from_status)?
                .into_inner();
            report_schedule(&s, "paused", client.json);
            Ok(())
        }
        SchedulesCommand::Resume { client, schedule } => {
            let mut c = ReseolioClient::new(connect(&client.server).await?);
            let s = c
                .resume_schedule(proto::ResumeScheduleRequest {
                    schedule_id: schedule,
                })
                .await
                .map_err(from_status)?
                .into_inner();
            report_schedule(&s, "resumed", client.json);
            Ok(())
        }
        SchedulesCommand::Delete { client, schedule } => {
            let mut c = ReseolioClient::new(connect(&client.server).await?);
            // Unknown schedules are "not found" (exit 4); DeleteSchedule reports them only in
            // text, as Reseolio's contract has it.
            let s = c
                .get_schedule(proto::GetScheduleRequest {
                    schedule_id: schedule,
                })
                .await
                .map_err(from_status)?
                .into_inner();
            let r = c
                .delete_schedule(proto::DeleteScheduleRequest {
                    schedule_id: s.id.clone(),
                })
                .await
                .map_err(from_status)?
                .into_inner();
            if client.json {
                print_json(&json!({ "id": s.id, "success": r.success, "message": r.message }));
            } else if r.success {
                println!("deleted schedule {} ({})", s.name, s.id);
            }
            if r.success {
                Ok(())
            } else {
                Err(failure(exit::ERROR, r.message))
            }
        }
    }
}

async fn list_schedules(
    channel: Channel,
    status: String,
    limit: u32,
    offset: u32,
    json_out: bool,
) -> Result<(), Failure> {
    let mut client = ReseolioClient::new(channel);
    let resp = client
        .list_schedules(proto::ListSchedulesRequest {
            status_filter: status,
            limit: i32::try_from(limit).unwrap_or(i32::MAX),
            offset: i32::try_from(offset).unwrap_or(i32::MAX),
        })
        .await
        .map_err(from_status)?
        .into_inner();
    if json_out {
        print_json(&json!({
            "total": resp.total,
            "schedules": resp.schedules.iter().map(schedule_json).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = resp
        .schedules
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.name.clone(),
                s.cron_expression.clone(),
                s.timezone.clone(),
                schedule_status_name(s.status).to_owned(),
                s.misfire.clone(),
                when(s.next_run_at),
                when(s.last_run_at),
            ]
        })
        .collect();
    print_table(
        &[
            "ID", "NAME", "CRON", "TIMEZONE", "STATUS", "MISFIRE", "NEXT RUN", "LAST RUN",
        ],
        &rows,
    );
    println!("{} of {} schedules", resp.schedules.len(), resp.total);
    Ok(())
}

fn show_schedule(s: &proto::Schedule, json_out: bool) {
    let v = schedule_json(s);
    if json_out {
        print_json(&v);
        return;
    }
    if let Value::Object(map) = v {
        for (key, value) in map {
            let text = match (&value, key.as_str()) {
                (Value::Number(n), "next_run_at" | "last_run_at" | "created_at" | "updated_at") => {
                    when(n.as_i64().unwrap_or(0))
                }
                (Value::String(s), _) => s.clone(),
                (Value::Null, _) => "-".into(),
                (other, _) => other.to_string(),
            };
            println!("{key:<16} {text}");
        }
    }
}

/// Prints a schedule after a change: JSON, or one line saying what happened and when it runs next.
fn report_schedule(s: &proto::Schedule, what: &str, json_out: bool) {
    if json_out {
        print_json(&schedule_json(s));
    } else {
        println!(
            "{what} schedule {} ({}), next run {}",
            s.name,
            s.id,
            when(s.next_run_at)
        );
    }
}
