//! The storage conformance suite: the whole [`Store`] contract, through its public API only.
//!
//! Every test is a function generic over [`Backend`], instantiated by `conformance!` at the bottom
//! for SQLite (`store::sqlite::*`, a fresh database file in the temp dir per test) and PostgreSQL
//! (`store::postgres::*`, a fresh schema `gantry_jobs_test_<uuid>` per test, dropped at the end,
//! in the database named by `GANTRY_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). Tests pass `now` explicitly and never sleep.
//! `random_ops_match_the_reference_model` checks random operation sequences against a small
//! in-memory model; the `concurrent_*` and `racing_*` tests use two store handles (for
//! PostgreSQL, two `PostgresStore`s on one schema, standing for two gantry servers).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use gantry_jobs::machine::{AckEffect, CancelEffect, Rejection};
use gantry_jobs::model::{Ack, DEFAULT_QUEUE, Job, JobOptions, Millis, NewJob, Outcome, Status};
use gantry_jobs::store::postgres::PostgresStore;
use gantry_jobs::store::sqlite::{SqliteOptions, SqliteStore};
use gantry_jobs::store::{
    ClaimRequest, JobError, ListFilter, ListOrder, QueueLimits, Store, StoreError,
};
use gantry_runtime::retry::{Backoff, RetryPolicy};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// A fresh, empty store for one test, removed when dropped.
trait Backend: Sized {
    type Store: Store + Clone;
    async fn new() -> Self;
    fn store(&self) -> &Self::Store;
    /// Another handle on the same data: for PostgreSQL a second server (its own pool).
    async fn second(&self) -> Self::Store;
}

/// A database file in the temp dir, with its WAL and shared-memory files removed when dropped.
pub struct TempDb(pub PathBuf);

impl TempDb {
    /// A unique path; nothing is created yet.
    pub fn unique() -> Self {
        Self(std::env::temp_dir().join(format!(
            "gantry-jobs-store-{}-{}.db",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        )))
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut file = OsString::from(self.0.as_os_str());
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
    }
}

/// A SQLite store on a [`TempDb`]. Fields drop in order: the store closes, then the files go.
pub struct Sqlite {
    store: SqliteStore,
    _file: TempDb,
}

impl Backend for Sqlite {
    type Store = SqliteStore;

    async fn new() -> Self {
        let file = TempDb::unique();
        let store = SqliteStore::open(SqliteOptions::new(&file.0)).expect("open a sqlite store");
        Self { store, _file: file }
    }

    fn store(&self) -> &SqliteStore {
        &self.store
    }

    async fn second(&self) -> SqliteStore {
        self.store.clone()
    }
}

/// The PostgreSQL database the tests use.
pub fn database_url() -> String {
    std::env::var("GANTRY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of its own in the test database.
pub struct Postgres {
    store: PostgresStore,
    url: String,
    schema: String,
}

impl Backend for Postgres {
    type Store = PostgresStore;

    async fn new() -> Self {
        let url = database_url();
        let schema = format!("gantry_jobs_test_{}", uuid::Uuid::now_v7().simple());
        let store = PostgresStore::connect(&url, &schema)
            .await
            .unwrap_or_else(|e| panic!("connect to {url} (set GANTRY_TEST_DATABASE_URL): {e}"));
        Self { store, url, schema }
    }

    fn store(&self) -> &PostgresStore {
        &self.store
    }

    async fn second(&self) -> PostgresStore {
        PostgresStore::connect(&self.url, &self.schema)
            .await
            .expect("a second store on the same schema")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        drop_schema(&self.url, &self.schema);
    }
}

/// Drops a test schema. `Drop` cannot await, so a thread with its own runtime does it.
fn drop_schema(url: &str, schema: &str) {
    let url = url.to_owned();
    let sql = format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    let done = std::thread::spawn(move || -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            client.batch_execute(&sql).await.map_err(|e| e.to_string())
        })
    })
    .join();
    if let Ok(Err(e)) = done {
        eprintln!("could not drop test schema {schema}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const T0: Millis = 1_700_000_000_000;
/// Every test job backs off a fixed 100 ms, without jitter.
const BACKOFF: Millis = 100;
/// Every test job's attempt timeout.
const TIMEOUT: Millis = 1000;
const UNKNOWN: &str = "00000000-0000-7000-8000-000000000000";

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::builder()
        .backoff(Backoff::Fixed)
        .initial_delay(Duration::from_millis(BACKOFF as u64))
        .max_delay(Duration::from_secs(60))
        .jitter(0.0)
        .max_attempts(max_attempts)
        .build()
        .expect("a valid retry policy")
}

fn job(name: &str) -> NewJob {
    NewJob {
        name: name.to_owned(),
        queue: DEFAULT_QUEUE.to_owned(),
        priority: 5,
        args: b"[1,2]".to_vec(),
        options: JobOptions {
            retry: policy(3),
            timeout: Duration::from_millis(TIMEOUT as u64),
        },
        idempotency_key: None,
        run_at: T0,
    }
}

fn max_attempts(mut j: NewJob, n: u32) -> NewJob {
    j.options.retry = policy(n);
    j
}

fn keyed(name: &str, key: &str) -> NewJob {
    NewJob {
        idempotency_key: Some(key.to_owned()),
        ..job(name)
    }
}

fn req(worker: &str, names: &[&str], limit: usize) -> ClaimRequest {
    ClaimRequest {
        worker_id: worker.to_owned(),
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        limit,
    }
}

fn ids(jobs: &[Job]) -> Vec<String> {
    jobs.iter().map(|j| j.id.clone()).collect()
}

fn success() -> Outcome {
    Outcome::Success(b"\"done\"".to_vec())
}

fn failure(retry: bool) -> Outcome {
    Outcome::Failure {
        error: "boom".to_owned(),
        retry,
    }
}

fn ack(id: &str, attempt: Option<u32>, outcome: Outcome) -> Ack {
    Ack {
        job_id: id.to_owned(),
        attempt,
        outcome,
    }
}

fn no_limits() -> QueueLimits {
    QueueLimits::default()
}

async fn add<S: Store>(s: &S, j: NewJob) -> String {
    add_at(s, j, T0).await
}

async fn add_at<S: Store>(s: &S, j: NewJob, now: Millis) -> String {
    let mut out = s.enqueue(vec![j], now).await.expect("enqueue");
    assert!(!out[0].deduplicated);
    out.remove(0).id
}

async fn take<S: Store>(s: &S, names: &[&str], limit: usize, now: Millis) -> Vec<Job> {
    s.claim(vec![req("w", names, limit)], no_limits(), now)
        .await
        .expect("claim")
        .remove(0)
}

async fn get<S: Store>(s: &S, id: &str) -> Job {
    s.get(id.to_owned())
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("job {id} exists"))
}

async fn ack_one<S: Store>(s: &S, a: Ack, now: Millis) -> Result<(Job, AckEffect), JobError> {
    s.ack(vec![a], now).await.expect("ack").remove(0)
}

fn wrong_status(status: Status, expected: &'static str) -> JobError {
    JobError::Rejected(Rejection::WrongStatus { status, expected })
}

fn all(limit: usize) -> ListFilter {
    ListFilter {
        limit,
        ..ListFilter::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Enqueue
// ---------------------------------------------------------------------------------------------

async fn enqueue_stores_the_job_as_given<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let retry = RetryPolicy::builder()
        .backoff(Backoff::Linear)
        .initial_delay(Duration::from_millis(250))
        .max_delay(Duration::from_secs(5))
        .multiplier(3.0)
        .jitter(0.25)
        .max_attempts(7)
        .build()
        .unwrap();
    let custom = NewJob {
        name: "email.send".into(),
        queue: "mail".into(),
        priority: 2,
        args: br#"{"to":"a@example.com"}"#.to_vec(),
        options: JobOptions {
            retry,
            timeout: Duration::from_secs(45),
        },
        idempotency_key: Some("order-17".into()),
        run_at: T0 + 500,
    };
    let defaults = NewJob {
        options: JobOptions::default(),
        args: Vec::new(),
        ..job("plain")
    };
    let out = s
        .enqueue(vec![custom.clone(), defaults.clone()], T0)
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|e| !e.deduplicated));
    for e in &out {
        let uuid = uuid::Uuid::parse_str(&e.id).expect("ids are UUIDs");
        assert_eq!(uuid.get_version_num(), 7);
    }
    assert_eq!(
        get(s, &out[0].id).await,
        Job::create(out[0].id.clone(), custom, T0)
    );
    let stored = get(s, &out[1].id).await;
    assert_eq!(stored, Job::create(out[1].id.clone(), defaults, T0));
    assert_eq!(
        (stored.status, stored.attempt, stored.created_at),
        (Status::Pending, 0, T0)
    );
    assert_eq!(stored.options, JobOptions::default());
}

async fn enqueue_batches_keep_their_order<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    assert!(s.enqueue(Vec::new(), T0).await.unwrap().is_empty());
    let names = ["a", "b", "c", "d", "e"];
    let out = s
        .enqueue(names.iter().map(|n| job(n)).collect(), T0)
        .await
        .unwrap();
    assert_eq!(out.len(), names.len());
    // Ids are UUIDv7 made in batch order: they sort as the jobs were enqueued.
    assert!(out.windows(2).all(|w| w[0].id < w[1].id));
    for (e, name) in out.iter().zip(names) {
        assert_eq!(get(s, &e.id).await.name, name);
    }
    let (_, total) = s.list(all(100)).await.unwrap();
    assert_eq!(total, 5);
}

async fn idempotency_keys_are_unique_per_name<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let first = add(s, keyed("a", "k")).await;
    let again = s.enqueue(vec![keyed("a", "k")], T0 + 1).await.unwrap();
    assert_eq!(
        (again[0].id.as_str(), again[0].deduplicated),
        (first.as_str(), true)
    );
    let other_name = add(s, keyed("b", "k")).await;
    let other_key = add(s, keyed("a", "k2")).await;
    assert_ne!(other_name, first);
    assert_ne!(other_key, first);

    // Within one batch: the first of a pair wins, jobs without keys never collide.
    let out = s
        .enqueue(
            vec![
                keyed("c", "x"),
                keyed("c", "x"),
                job("c"),
                job("c"),
                keyed("a", "k"),
            ],
            T0,
        )
        .await
        .unwrap();
    let flags: Vec<bool> = out.iter().map(|e| e.deduplicated).collect();
    assert_eq!(flags, [false, true, false, false, true]);
    assert_eq!(out[1].id, out[0].id);
    assert_ne!(out[2].id, out[3].id);
    assert_eq!(out[4].id, first);

    // A finished job still holds its key while it is retained.
    let claimed = take(s, &["a"], 10, T0).await;
    for j in &claimed {
        ack_one(s, ack(&j.id, Some(1), success()), T0 + 1)
            .await
            .unwrap();
    }
    let dedup = s.enqueue(vec![keyed("a", "k")], T0 + 2).await.unwrap();
    assert_eq!(
        (dedup[0].id.as_str(), dedup[0].deduplicated),
        (first.as_str(), true)
    );
    let (_, total) = s.list(all(100)).await.unwrap();
    assert_eq!(total, 6);
}

// ---------------------------------------------------------------------------------------------
// Claim
// ---------------------------------------------------------------------------------------------

async fn claim_takes_only_due_jobs<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let due = add(s, job("a")).await;
    let later = add(
        s,
        NewJob {
            run_at: T0 + 1000,
            ..job("a")
        },
    )
    .await;
    assert_eq!(ids(&take(s, &[], 10, T0).await), [due]);
    assert!(take(s, &[], 10, T0 + 999).await.is_empty());
    assert_eq!(ids(&take(s, &[], 10, T0 + 1000).await), [later]);
    assert!(take(s, &[], 10, T0 + 5000).await.is_empty());
}

async fn claim_order_is_priority_then_run_at_then_enqueue_order<B: Backend>() {
    // The name filter takes another path through SQLite's indexes: check both.
    for names in [&[][..], &["n1", "n2", "n3"][..]] {
        let b = B::new().await;
        let s = b.store();
        let a = add(
            s,
            NewJob {
                priority: 5,
                ..job("n1")
            },
        )
        .await;
        let late_urgent = add(
            s,
            NewJob {
                priority: 0,
                run_at: T0 + 10,
                ..job("n2")
            },
        )
        .await;
        let urgent = add(
            s,
            NewJob {
                priority: 0,
                ..job("n3")
            },
        )
        .await;
        let batch = s
            .enqueue(
                vec![
                    NewJob {
                        priority: 5,
                        ..job("n2")
                    },
                    NewJob {
                        priority: 9,
                        run_at: T0 - 100,
                        ..job("n3")
                    },
                    NewJob {
                        priority: 0,
                        ..job("n1")
                    },
                ],
                T0,
            )
            .await
            .unwrap();
        let (d, lowest, urgent_too) = (&batch[0].id, &batch[1].id, &batch[2].id);
        let expected: Vec<String> = [&urgent, urgent_too, &late_urgent, &a, d, lowest]
            .into_iter()
            .cloned()
            .collect();

        let first = take(s, names, 2, T0 + 10).await;
        let rest = take(s, names, 10, T0 + 10).await;
        let got: Vec<String> = ids(&first).into_iter().chain(ids(&rest)).collect();
        assert_eq!(got, expected, "names {names:?}");
    }
}

async fn claim_filters_by_name<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let a = add(s, job("a")).await;
    let b1 = add(s, job("b")).await;
    let c = add(s, job("c")).await;
    assert!(take(s, &["zzz"], 10, T0).await.is_empty());
    assert_eq!(ids(&take(s, &["b"], 10, T0).await), [b1]);
    // A name listed twice must not hand out its jobs twice.
    assert_eq!(ids(&take(s, &["a", "a", "c", "c"], 10, T0).await), [a, c]);
    let d = add(s, job("d")).await;
    // Empty means any name.
    assert_eq!(ids(&take(s, &[], 10, T0).await), [d]);
}

async fn claim_respects_limits<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    for _ in 0..5 {
        add(s, job("a")).await;
    }
    assert!(
        s.claim(Vec::new(), no_limits(), T0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(take(s, &[], 0, T0).await.is_empty());
    assert_eq!(take(s, &[], 2, T0).await.len(), 2);
    assert_eq!(take(s, &[], 10, T0).await.len(), 3);
    assert!(take(s, &[], 10, T0).await.is_empty());
}

async fn claim_requests_in_one_call_never_share_a_job<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let out = s
        .enqueue(vec![job("a"), job("b"), job("a"), job("b"), job("a")], T0)
        .await
        .unwrap();
    let id = |i: usize| out[i].id.clone();
    let got = s
        .claim(
            vec![
                req("w1", &[], 2),
                req("w2", &["a"], 5),
                req("w3", &[], 5),
                req("w4", &[], 5),
            ],
            no_limits(),
            T0,
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(ids(&got[0]), [id(0), id(1)]);
    assert_eq!(ids(&got[1]), [id(2), id(4)]);
    assert_eq!(ids(&got[2]), [id(3)]);
    assert!(got[3].is_empty());
    for (jobs, worker) in got.iter().zip(["w1", "w2", "w3"]) {
        for j in jobs {
            assert_eq!(j.worker_id.as_deref(), Some(worker));
            assert_eq!(get(s, &j.id).await.worker_id.as_deref(), Some(worker));
        }
    }
}

async fn claim_starts_an_attempt_with_a_lease<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let id = add(s, job("a")).await;
    let claimed = take(s, &[], 1, T0 + 5).await;
    let j = &claimed[0];
    assert_eq!(j.id, id);
    assert_eq!(j.status, Status::Running);
    assert_eq!(j.attempt, 1);
    assert_eq!(j.started_at, Some(T0 + 5));
    assert_eq!(j.lease_until, Some(T0 + 5 + TIMEOUT));
    assert_eq!(j.worker_id.as_deref(), Some("w"));
    assert_eq!(&get(s, &id).await, j);
}

// ---------------------------------------------------------------------------------------------
// Ack
// ---------------------------------------------------------------------------------------------

async fn successful_ack_stores_the_result<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let id = add(s, job("a")).await;
    take(s, &[], 1, T0).await;
    let (j, effect) = ack_one(s, ack(&id, Some(1), success()), T0 + 50)
        .await
        .unwrap();
    assert_eq!(
        effect,
        AckEffect {
            status: Status::Success,
            next_run_at: None
        }
    );
    assert_eq!(j.result.as_deref(), Some(&b"\"done\""[..]));
    assert_eq!(
        (
            j.status,
            j.completed_at,
            j.lease_until,
            j.worker_id.as_deref()
        ),
        (Status::Success, Some(T0 + 50), None, None)
    );
    assert_eq!(get(s, &id).await, j);
}

async fn failed_attempts_back_off_then_die<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let id = add(s, max_attempts(job("a"), 2)).await;
    take(s, &[], 1, T0).await;
    let (j, effect) = ack_one(s, ack(&id, Some(1), failure(true)), T0 + 10)
        .await
        .unwrap();
    let next = T0 + 10 + BACKOFF;
    assert_eq!(
        effect,
        AckEffect {
            status: Status::Pending,
            next_run_at: Some(next)
        }
    );
    assert_eq!(
        (
            j.status,
            j.run_at,
            j.attempt,
            j.error.as_deref(),
            j.lease_until
        ),
        (Status::Pending, next, 1, Some("boom"), None)
    );
    assert_eq!(get(s, &id).await, j);
    assert!(take(s, &[], 1, next - 1).await.is_empty());
    assert_eq!(take(s, &[], 1, next).await[0].attempt, 2);
    let (j, effect) = ack_one(s, ack(&id, Some(2), failure(true)), next + 1)
        .await
        .unwrap();
    assert_eq!(
        effect,
        AckEffect {
            status: Status::Dead,
            next_run_at: None
        }
    );
    assert_eq!((j.status, j.completed_at), (Status::Dead, Some(next + 1)));
    assert!(take(s, &[], 1, next + 10_000).await.is_empty());
}

async fn failure_without_retry_is_dead_at_once<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let id = add(s, max_attempts(job("a"), 5)).await;
    take(s, &[], 1, T0).await;
    let (j, effect) = ack_one(s, ack(&id, Some(1), failure(false)), T0 + 1)
        .await
        .unwrap();
    assert_eq!(effect.status, Status::Dead);
    assert_eq!(get(s, &id).await, j);
}

async fn stale_ack_is_rejected_and_changes_nothing<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let id = add(s, job("a")).await;
    take(s, &[], 1, T0).await;
    s.abandon(vec![(id.clone(), 1)], "worker gone".into(), T0 + 1)
        .await
        .unwrap();
    assert_eq!(take(s, &[], 1, T0 + 1).await[0].attempt, 2);
    let before = get(s, &id).await;
    let results = s
        .ack(
            vec![
                ack(&id, Some(1), success()),
                ack(&id, Some(3), failure(true)),
            ],
            T0 + 2,
        )
        .await
        .unwrap();
    assert_eq!(
        results,
        [
            Err(JobError::Rejected(Rejection::Stale {
                given: 1,
                current: 2
            })),
            Err(JobError::Rejected(Rejection::Stale {
                given: 3,
                current: 2
            })),
        ]
    );
    assert_eq!(get(s, &id).await, before);
}

async fn unfenced_ack_applies_to_the_current_attempt<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let id = add(s, job("a")).await;
    take(s, &[], 1, T0).await;
    s.abandon(vec![(id.clone(), 1)], "worker gone".into(), T0)
        .await
        .unwrap();
    take(s, &[], 1, T0).await;
    let (j, _) = ack_one(s, ack(&id, None, success()), T0 + 1).await.unwrap();
    assert_eq!((j.status, j.attempt), (Status::Success, 2));
}

async fn ack_batch_results_are_independent<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let r1 = add(s, job("a")).await;
    let r2 = add(s, job("a")).await;
    take(s, &[], 2, T0).await;
    let pending = add(s, job("a")).await;
    let results = s
        .ack(
            vec![
                ack(UNKNOWN, Some(1), success()),
                ack(&pending, None, success()),
                ack(&r1, Some(1), success()),
                ack(&r1, Some(1), success()),
                ack(&r2, None, failure(false)),
            ],
            T0 + 3,
        )
        .await
        .unwrap();
    assert_eq!(results.len(), 5);
    assert_eq!(results[0], Err(JobError::NotFound(UNKNOWN.into())));
    assert_eq!(results[1], Err(wrong_status(Status::Pending, "running")));
    assert_eq!(results[2].as_ref().unwrap().1.status, Status::Success);
    // The batch applies in order: the second ack of r1 sees it finished.
    assert_eq!(results[3], Err(wrong_status(Status::Success, "running")));
    assert_eq!(results[4].as_ref().unwrap().1.status, Status::Dead);
    assert_eq!(get(s, &r1).await.status, Status::Success);
    assert_eq!(get(s, &r2).await.status, Status::Dead);
    assert_eq!(get(s, &pending).await.status, Status::Pending);
    assert_eq!(
        s.ack(vec![ack(UNKNOWN, None, success())], T0)
            .await
            .unwrap(),
        [Err(JobError::NotFound(UNKNOWN.into()))]
    );
}

async fn nul_bytes_in_text_do_not_break_a_batch<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let id = add(s, job("a")).await;
    let claimed = s
        .claim(vec![req("w\0x", &[], 1)], no_limits(), T0)
        .await
        .unwrap();
    assert_eq!(ids(&claimed[0]), [id.as_str()]);
    let other = add(s, job("a")).await;
    let results = s
        .ack(
            vec![
                ack(
                    &id,
                    Some(1),
                    Outcome::Failure {
                        error: "bad\0byte".into(),
                        retry: true,
                    },
                ),
                ack("x\0y", None, success()),
            ],
            T0 + 1,
        )
        .await
        .unwrap();
    assert!(results[0].is_ok());
    assert_eq!(results[1], Err(JobError::NotFound("x\0y".into())));
    let error = get(s, &id).await.error.unwrap();
    assert!(
        error.starts_with("bad") && error.ends_with("byte"),
        "{error:?}"
    );
    assert_eq!(s.get("x\0y".into()).await.unwrap(), None);
    // A filter of names that cannot exist matches nothing; it does not turn into "any".
    assert!(take(s, &["\0"], 10, T0 + 1).await.is_empty());
    let (jobs, total) = s
        .list(ListFilter {
            names: vec!["\0".into()],
            ..all(10)
        })
        .await
        .unwrap();
    assert_eq!((jobs.len(), total), (0, 0));
    assert_eq!(ids(&take(s, &["a"], 1, T0 + 1).await), [other]);
}

// ---------------------------------------------------------------------------------------------
// Abandon, leases, heartbeats
// ---------------------------------------------------------------------------------------------

async fn abandon_gives_up_only_current_attempts<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let j1 = add(s, job("a")).await;
    let j2 = add(s, job("a")).await;
    let j3 = add(s, job("a")).await;
    let last = add(s, max_attempts(job("a"), 1)).await;
    let pending = add(
        s,
        NewJob {
            run_at: T0 + 10_000,
            ..job("a")
        },
    )
    .await;
    assert_eq!(take(s, &[], 10, T0).await.len(), 4);
    ack_one(s, ack(&j3, Some(1), success()), T0 + 1)
        .await
        .unwrap();
    let changed = s
        .abandon(
            vec![
                (j1.clone(), 1),
                (j2.clone(), 7),
                (UNKNOWN.to_owned(), 1),
                (j3.clone(), 1),
                (pending.clone(), 0),
                (last.clone(), 1),
            ],
            "stream closed".into(),
            T0 + 20,
        )
        .await
        .unwrap();
    let got: Vec<(&str, AckEffect)> = changed.iter().map(|(j, e)| (j.id.as_str(), *e)).collect();
    assert_eq!(
        got,
        [
            (
                j1.as_str(),
                AckEffect {
                    status: Status::Pending,
                    next_run_at: Some(T0 + 20)
                }
            ),
            (
                last.as_str(),
                AckEffect {
                    status: Status::Dead,
                    next_run_at: None
                }
            ),
        ]
    );
    let j = get(s, &j1).await;
    assert_eq!(
        (j.status, j.run_at, j.worker_id),
        (Status::Pending, T0 + 20, None)
    );
    assert!(j.error.unwrap().contains("stream closed"));
    assert_eq!(get(s, &j2).await.status, Status::Running);
    assert_eq!(get(s, &j3).await.status, Status::Success);
    assert_eq!(get(s, &pending).await.status, Status::Pending);
    assert_eq!(get(s, &last).await.status, Status::Dead);
    // Pending again at once, not after the backoff.
    assert_eq!(ids(&take(s, &[], 10, T0 + 20).await), [j1]);
}

async fn expired_leases_fail_their_attempts<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let j1 = add(s, job("a")).await;
    let last = add(s, max_attempts(job("a"), 1)).await;
    take(s, &[], 2, T0).await;
    let j2 = add(s, job("a")).await;
    take(s, &[], 1, T0 + 500).await;
    assert!(s.expire_leases(T0 + TIMEOUT - 1).await.unwrap().is_empty());
    let mut expired = s.expire_leases(T0 + TIMEOUT).await.unwrap();
    expired.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    let got: Vec<(&str, AckEffect)> = expired.iter().map(|(j, e)| (j.id.as_str(), *e)).collect();
    assert_eq!(
        got,
        [
            (
                j1.as_str(),
                AckEffect {
                    status: Status::Pending,
                    next_run_at: Some(T0 + TIMEOUT + BACKOFF)
                }
            ),
            (
                last.as_str(),
                AckEffect {
                    status: Status::Dead,
                    next_run_at: None
                }
            ),
        ]
    );
    let j = get(s, &j1).await;
    assert_eq!(
        (j.status, j.attempt, j.lease_until),
        (Status::Pending, 1, None)
    );
    assert!(j.error.unwrap().contains("timed out"));
    assert_eq!(get(s, &j2).await.status, Status::Running);
    assert!(s.expire_leases(T0 + TIMEOUT).await.unwrap().is_empty());
    let late = s.expire_leases(T0 + 500 + TIMEOUT).await.unwrap();
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].0.id, j2);
}

async fn heartbeats_extend_the_lease_and_are_fenced<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let id = add(s, job("a")).await;
    take(s, &[], 1, T0).await;
    let pending = add(s, job("a")).await;
    assert_eq!(
        s.heartbeat(vec![(id.clone(), Some(1))], None, T0 + 600)
            .await
            .unwrap(),
        [Ok(T0 + 600 + TIMEOUT)]
    );
    assert_eq!(get(s, &id).await.lease_until, Some(T0 + 600 + TIMEOUT));
    assert!(s.expire_leases(T0 + TIMEOUT).await.unwrap().is_empty());
    assert_eq!(
        s.heartbeat(
            vec![(id.clone(), Some(1))],
            Some(Duration::from_secs(5)),
            T0 + 700
        )
        .await
        .unwrap(),
        [Ok(T0 + 5700)]
    );
    let before = get(s, &id).await;
    let results = s
        .heartbeat(
            vec![
                (id.clone(), Some(2)),
                (UNKNOWN.to_owned(), None),
                (pending.clone(), None),
            ],
            None,
            T0 + 800,
        )
        .await
        .unwrap();
    assert_eq!(
        results,
        [
            Err(JobError::Rejected(Rejection::Stale {
                given: 2,
                current: 1
            })),
            Err(JobError::NotFound(UNKNOWN.into())),
            Err(wrong_status(Status::Pending, "running")),
        ]
    );
    assert_eq!(get(s, &id).await, before);
    assert_eq!(
        s.heartbeat(vec![(id.clone(), None)], None, T0 + 900)
            .await
            .unwrap(),
        [Ok(T0 + 900 + TIMEOUT)]
    );
}

// ---------------------------------------------------------------------------------------------
// Cancel, retry
// ---------------------------------------------------------------------------------------------

async fn cancel_pending_running_and_finished_jobs<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let p = add(s, job("p")).await;
    let (j, effect) = s.cancel(p.clone(), T0 + 1).await.unwrap().unwrap();
    assert_eq!(effect, CancelEffect::Cancelled);
    assert_eq!(
        (j.status, j.completed_at),
        (Status::Cancelled, Some(T0 + 1))
    );
    assert_eq!(get(s, &p).await, j);
    assert!(take(s, &["p"], 10, T0 + 1).await.is_empty());
    let (_, effect) = s.cancel(p.clone(), T0 + 2).await.unwrap().unwrap();
    assert_eq!(effect, CancelEffect::AlreadyFinished(Status::Cancelled));

    let r = add(s, job("r")).await;
    take(s, &["r"], 1, T0).await;
    let (j, effect) = s.cancel(r.clone(), T0 + 1).await.unwrap().unwrap();
    assert_eq!(effect, CancelEffect::Requested);
    assert_eq!((j.status, j.cancel_requested), (Status::Running, true));
    assert!(get(s, &r).await.cancel_requested);
    let (j, effect) = ack_one(s, ack(&r, Some(1), failure(true)), T0 + 2)
        .await
        .unwrap();
    assert_eq!(
        effect,
        AckEffect {
            status: Status::Cancelled,
            next_run_at: None
        }
    );
    assert_eq!((j.status, j.cancel_requested), (Status::Cancelled, false));

    let done = add(s, job("d")).await;
    take(s, &["d"], 1, T0).await;
    s.cancel(done.clone(), T0 + 1).await.unwrap().unwrap();
    let (j, _) = ack_one(s, ack(&done, Some(1), success()), T0 + 2)
        .await
        .unwrap();
    assert_eq!(j.status, Status::Success);
    let (_, effect) = s.cancel(done, T0 + 3).await.unwrap().unwrap();
    assert_eq!(effect, CancelEffect::AlreadyFinished(Status::Success));

    assert_eq!(
        s.cancel(UNKNOWN.into(), T0).await.unwrap(),
        Err(JobError::NotFound(UNKNOWN.into()))
    );
}

async fn retry_revives_only_dead_jobs<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let id = add(s, max_attempts(job("a"), 1)).await;
    assert_eq!(
        s.retry(id.clone(), T0).await.unwrap(),
        Err(wrong_status(Status::Pending, "dead"))
    );
    take(s, &[], 1, T0).await;
    assert_eq!(
        s.retry(id.clone(), T0).await.unwrap(),
        Err(wrong_status(Status::Running, "dead"))
    );
    ack_one(s, ack(&id, Some(1), failure(true)), T0 + 1)
        .await
        .unwrap();
    assert_eq!(get(s, &id).await.status, Status::Dead);
    let j = s.retry(id.clone(), T0 + 100).await.unwrap().unwrap();
    // The attempt counter never goes back (acks from before stay stale); the revived job gets a
    // fresh run of attempts.
    assert_eq!(
        (
            j.status,
            j.attempt,
            j.attempt_base,
            j.run_at,
            j.completed_at
        ),
        (Status::Pending, 1, 1, T0 + 100, None)
    );
    assert_eq!(get(s, &id).await, j);
    assert_eq!(take(s, &[], 1, T0 + 100).await[0].attempt, 2);
    assert_eq!(
        ack_one(s, ack(&id, Some(1), Outcome::Success(vec![])), T0 + 101).await,
        Err(JobError::Rejected(Rejection::Stale {
            given: 1,
            current: 2
        }))
    );
    assert_eq!(
        s.retry(UNKNOWN.into(), T0).await.unwrap(),
        Err(JobError::NotFound(UNKNOWN.into()))
    );
}

// ---------------------------------------------------------------------------------------------
// Reads and maintenance
// ---------------------------------------------------------------------------------------------

async fn get_of_an_unknown_job_is_none<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    assert_eq!(s.get(UNKNOWN.into()).await.unwrap(), None);
    assert_eq!(s.get(String::new()).await.unwrap(), None);
}

async fn list_filters_orders_and_pages<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    // Created in order 0..6, run times in the opposite order; names a, b, a, b, a, b.
    let mut created = Vec::new();
    for i in 0..6 {
        let name = if i % 2 == 0 { "a" } else { "b" };
        let j = NewJob {
            run_at: T0 + 100 - i * 10,
            ..job(name)
        };
        created.push(add_at(s, j, T0 + i).await);
    }
    // The most urgent job (created[5], name b) runs.
    let running = take(s, &[], 1, T0 + 100).await;
    assert_eq!(ids(&running), [created[5].clone()]);

    let list = |filter: ListFilter| async move { s.list(filter).await.unwrap() };
    let (jobs, total) = list(all(100)).await;
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!((ids(&jobs), total), (newest_first.clone(), 6));

    let (jobs, _) = list(ListFilter {
        ascending: true,
        ..all(100)
    })
    .await;
    assert_eq!(ids(&jobs), created);

    let (jobs, _) = list(ListFilter {
        order_by: ListOrder::RunAt,
        ascending: true,
        ..all(100)
    })
    .await;
    assert_eq!(ids(&jobs), newest_first);

    let (jobs, total) = list(ListFilter {
        names: vec!["a".into()],
        ascending: true,
        ..all(100)
    })
    .await;
    assert_eq!(
        (ids(&jobs), total),
        (
            vec![created[0].clone(), created[2].clone(), created[4].clone()],
            3
        )
    );

    let (jobs, total) = list(ListFilter {
        statuses: vec![Status::Running],
        ..all(100)
    })
    .await;
    assert_eq!((ids(&jobs), total), (vec![created[5].clone()], 1));

    let (jobs, total) = list(ListFilter {
        statuses: vec![Status::Pending, Status::Success],
        names: vec!["b".into(), "zzz".into()],
        ascending: true,
        ..all(100)
    })
    .await;
    assert_eq!(
        (ids(&jobs), total),
        (vec![created[1].clone(), created[3].clone()], 2)
    );

    // A page: the total counts the filter, not the page.
    let (jobs, total) = list(ListFilter {
        ascending: true,
        offset: 1,
        ..all(2)
    })
    .await;
    assert_eq!((ids(&jobs), total), (created[1..3].to_vec(), 6));
    let (jobs, total) = list(ListFilter {
        offset: 10,
        ..all(2)
    })
    .await;
    assert_eq!((jobs.len(), total), (0, 6));
}

async fn stats_count_every_status<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let zero: Vec<(Status, u64)> = Status::ALL.iter().map(|&st| (st, 0)).collect();
    assert_eq!(s.stats().await.unwrap().by_status, zero);
    let out = s
        .enqueue((0..6).map(|_| max_attempts(job("a"), 1)).collect(), T0)
        .await
        .unwrap();
    let claimed = take(s, &[], 3, T0).await;
    ack_one(s, ack(&claimed[0].id, None, success()), T0)
        .await
        .unwrap();
    ack_one(s, ack(&claimed[1].id, None, failure(true)), T0)
        .await
        .unwrap();
    s.cancel(out[5].id.clone(), T0).await.unwrap().unwrap();
    assert_eq!(
        s.stats().await.unwrap().by_status,
        [
            (Status::Pending, 2),
            (Status::Running, 1),
            (Status::Success, 1),
            (Status::Dead, 1),
            (Status::Cancelled, 1),
        ]
    );
}

async fn purge_deletes_only_old_finished_jobs<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let ok_old = add(s, keyed("s", "k")).await;
    let dead_old = add(s, max_attempts(job("d"), 1)).await;
    let cancelled_old = add(s, job("c")).await;
    let ok_new = add(s, job("s2")).await;
    let running = add(s, job("r")).await;
    let pending = add(
        s,
        NewJob {
            run_at: T0 + 1_000_000,
            ..job("p")
        },
    )
    .await;
    assert_eq!(take(s, &[], 10, T0).await.len(), 5);
    ack_one(s, ack(&ok_old, None, success()), T0 + 10)
        .await
        .unwrap();
    ack_one(s, ack(&dead_old, None, failure(true)), T0 + 20)
        .await
        .unwrap();
    s.cancel(cancelled_old.clone(), T0 + 25)
        .await
        .unwrap()
        .unwrap();
    ack_one(s, ack(&cancelled_old, None, failure(true)), T0 + 30)
        .await
        .unwrap();
    ack_one(s, ack(&ok_new, None, success()), T0 + 100)
        .await
        .unwrap();
    assert_eq!(get(s, &cancelled_old).await.status, Status::Cancelled);

    assert_eq!(
        s.purge(T0 + 50, vec![Status::Pending, Status::Running])
            .await
            .unwrap(),
        0
    );
    assert_eq!(s.purge(T0 + 50, vec![Status::Dead]).await.unwrap(), 1);
    assert!(s.get(dead_old).await.unwrap().is_none());
    // The key of a retained finished job still deduplicates; once purged it is free again.
    let dedup = s.enqueue(vec![keyed("s", "k")], T0 + 60).await.unwrap();
    assert_eq!(
        (dedup[0].id.as_str(), dedup[0].deduplicated),
        (ok_old.as_str(), true)
    );
    assert_eq!(s.purge(T0 + 50, Vec::new()).await.unwrap(), 2);
    assert!(s.get(ok_old.clone()).await.unwrap().is_none());
    assert!(s.get(cancelled_old).await.unwrap().is_none());
    let fresh = s.enqueue(vec![keyed("s", "k")], T0 + 60).await.unwrap();
    assert!(!fresh[0].deduplicated);
    assert_ne!(fresh[0].id, ok_old);
    // Strictly before the cutoff.
    assert_eq!(s.purge(T0 + 100, Vec::new()).await.unwrap(), 0);
    assert_eq!(s.purge(T0 + 101, Vec::new()).await.unwrap(), 1);
    assert_eq!(get(s, &running).await.status, Status::Running);
    assert_eq!(get(s, &pending).await.status, Status::Pending);
    assert_eq!(s.purge(i64::MAX, Vec::new()).await.unwrap(), 0);
}

async fn next_wakeup_is_the_earliest_future_event<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    assert_eq!(s.next_wakeup(T0).await.unwrap(), None);
    add(s, job("a")).await;
    // Due now is not in the future.
    assert_eq!(s.next_wakeup(T0).await.unwrap(), None);
    add(
        s,
        NewJob {
            run_at: T0 + 500,
            ..job("a")
        },
    )
    .await;
    assert_eq!(s.next_wakeup(T0).await.unwrap(), Some(T0 + 500));
    add(
        s,
        NewJob {
            priority: 9,
            run_at: T0 + 300,
            ..job("a")
        },
    )
    .await;
    assert_eq!(s.next_wakeup(T0).await.unwrap(), Some(T0 + 300));
    take(s, &[], 1, T0).await;
    assert_eq!(s.next_wakeup(T0).await.unwrap(), Some(T0 + 300));
    // Past the pending ones: the running job's lease end.
    assert_eq!(s.next_wakeup(T0 + 600).await.unwrap(), Some(T0 + TIMEOUT));
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

/// Queue limits hold across requests, claims and (on PostgreSQL) servers; other queues fill the
/// room a full queue leaves.
async fn queue_limits_cap_running_jobs_per_queue<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let limits: QueueLimits = std::sync::Arc::new([("mail".to_owned(), 2)].into_iter().collect());
    let in_queue = |q: &str| NewJob {
        queue: q.to_owned(),
        ..job("n")
    };
    let batch = (0..6)
        .map(|_| in_queue("mail"))
        .chain((0..3).map(|_| in_queue("default")));
    s.enqueue(batch.collect(), T0).await.unwrap();

    let got = s
        .claim(vec![req("w", &[], 10)], limits.clone(), T0)
        .await
        .unwrap();
    let queues = |jobs: &[Job], q: &str| jobs.iter().filter(|j| j.queue == q).count();
    assert_eq!(
        (queues(&got[0], "mail"), queues(&got[0], "default")),
        (2, 3)
    );
    // Full: nothing more from it, even for another worker.
    let none = s
        .claim(vec![req("w2", &[], 10)], limits.clone(), T0)
        .await
        .unwrap();
    assert!(none[0].is_empty(), "{:?}", ids(&none[0]));
    // One finishes: exactly one more may start.
    let mail = got[0].iter().find(|j| j.queue == "mail").unwrap();
    ack_one(s, ack(&mail.id, Some(1), success()), T0 + 1)
        .await
        .unwrap();
    let one = s
        .claim(vec![req("w", &[], 10)], limits.clone(), T0 + 2)
        .await
        .unwrap();
    assert_eq!((one[0].len(), one[0][0].queue.as_str()), (1, "mail"));

    // Two servers racing for the two free slots take exactly two between them.
    let running = |s: B::Store| async move {
        s.list(ListFilter {
            statuses: vec![Status::Running],
            limit: 100,
            ..ListFilter::default()
        })
        .await
        .unwrap()
        .0
        .into_iter()
        .filter(|j| j.queue == "mail")
        .collect::<Vec<_>>()
    };
    for j in running(s.clone()).await {
        ack_one(s, ack(&j.id, Some(1), success()), T0 + 3)
            .await
            .unwrap();
    }
    let stores = [s.clone(), b.second().await];
    let mut tasks = tokio::task::JoinSet::new();
    for (i, st) in stores.into_iter().enumerate() {
        let limits = limits.clone();
        tasks.spawn(async move {
            st.claim(vec![req(&format!("r{i}"), &[], 10)], limits, T0 + 4)
                .await
                .unwrap()
        });
    }
    let mut taken = 0;
    while let Some(got) = tasks.join_next().await {
        taken += got.unwrap()[0].len();
    }
    assert_eq!(taken, 2);
    assert_eq!(running(s.clone()).await.len(), 2);
}

async fn concurrent_claims_never_share_a_job<B: Backend>() {
    const JOBS: usize = 300;
    let b = B::new().await;
    let stores = [b.store().clone(), b.second().await];
    let names = ["a", "b", "c"];
    for chunk in 0..JOBS / 100 {
        let batch = (0..100)
            .map(|i| NewJob {
                priority: u8::try_from(i % 3).unwrap(),
                ..job(names[(chunk * 100 + i) % 3])
            })
            .collect();
        stores[0].enqueue(batch, T0).await.unwrap();
    }
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8 {
        let s = stores[t % 2].clone();
        tasks.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let filter: &[&str] = if t % 4 == 3 { &["a", "c"] } else { &[] };
                let got = s
                    .claim(
                        vec![
                            req(&format!("w{t}x"), filter, rand::random_range(1..5)),
                            req(&format!("w{t}y"), &[], rand::random_range(0..3)),
                        ],
                        no_limits(),
                        T0,
                    )
                    .await
                    .unwrap();
                if got.iter().all(Vec::is_empty) {
                    return mine;
                }
                mine.extend(got.into_iter().flatten().map(|j| (j.id, j.attempt)));
            }
        });
    }
    let mut seen = HashSet::new();
    while let Some(claimed) = tasks.join_next().await {
        for (id, attempt) in claimed.unwrap() {
            assert_eq!(attempt, 1);
            assert!(seen.insert(id.clone()), "job {id} was claimed twice");
        }
    }
    assert_eq!(seen.len(), JOBS);
    let stats = stores[1].stats().await.unwrap();
    assert_eq!(stats.by_status[1], (Status::Running, JOBS as u64));
}

async fn racing_acks_and_lease_expiry_apply_once<B: Backend>() {
    const JOBS: usize = 60;
    let b = B::new().await;
    let stores = [b.store().clone(), b.second().await];
    stores[0]
        .enqueue((0..JOBS).map(|_| job("a")).collect(), T0)
        .await
        .unwrap();
    let claimed = take(&stores[0], &[], JOBS, T0).await;
    assert_eq!(claimed.len(), JOBS);
    let at = T0 + TIMEOUT;
    let expiry = {
        let s = stores[1].clone();
        tokio::spawn(async move {
            let mut expired = Vec::new();
            for _ in 0..3 {
                expired.extend(s.expire_leases(at).await.unwrap());
            }
            expired
        })
    };
    let mut acks = tokio::task::JoinSet::new();
    for chunk in ids(&claimed).chunks(10) {
        let s = stores[0].clone();
        let chunk = chunk.to_vec();
        acks.spawn(async move {
            let batch = chunk.iter().map(|id| ack(id, Some(1), success())).collect();
            chunk
                .into_iter()
                .zip(s.ack(batch, at).await.unwrap())
                .collect::<Vec<_>>()
        });
    }
    let expired: HashSet<String> = expiry
        .await
        .unwrap()
        .into_iter()
        .map(|(j, effect)| {
            assert_eq!(effect.status, Status::Pending);
            j.id
        })
        .collect();
    let mut acked = HashSet::new();
    while let Some(results) = acks.join_next().await {
        for (id, result) in results.unwrap() {
            match result {
                Ok((j, _)) => {
                    assert_eq!(j.status, Status::Success);
                    acked.insert(id);
                }
                Err(e) => {
                    assert_eq!(e, wrong_status(Status::Pending, "running"));
                    assert!(
                        expired.contains(&id),
                        "ack of {id} refused but it did not expire"
                    );
                }
            }
        }
    }
    assert!(acked.is_disjoint(&expired));
    assert_eq!(acked.len() + expired.len(), JOBS);
    for id in &acked {
        assert_eq!(get(&stores[1], id).await.status, Status::Success);
    }
    for id in &expired {
        assert_eq!(get(&stores[1], id).await.status, Status::Pending);
    }
}

async fn racing_idempotent_enqueues_create_one_job<B: Backend>() {
    let b = B::new().await;
    let stores = [b.store().clone(), b.second().await];
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8 {
        let s = stores[t % 2].clone();
        tasks.spawn(async move {
            // Opposite key orders in different batches: they must not deadlock.
            let mut batch: Vec<NewJob> = (0..20)
                .map(|k| keyed(&format!("n{}", k % 2), &format!("key-{k}")))
                .collect();
            if t % 2 == 1 {
                batch.reverse();
            }
            let keys: Vec<String> = batch
                .iter()
                .map(|j| format!("{}/{}", j.name, j.idempotency_key.as_deref().unwrap_or("")))
                .collect();
            keys.into_iter()
                .zip(s.enqueue(batch, T0).await.unwrap())
                .collect::<Vec<_>>()
        });
    }
    let mut by_key: HashMap<String, (String, usize)> = HashMap::new();
    while let Some(results) = tasks.join_next().await {
        for (key, e) in results.unwrap() {
            let entry = by_key.entry(key.clone()).or_insert((e.id.clone(), 0));
            assert_eq!(entry.0, e.id, "key {key} got two jobs");
            if !e.deduplicated {
                entry.1 += 1;
            }
        }
    }
    assert_eq!(by_key.len(), 20);
    assert!(by_key.values().all(|(_, created)| *created == 1));
    let (_, total) = stores[0].list(all(1)).await.unwrap();
    assert_eq!(total, 20);
}

// ---------------------------------------------------------------------------------------------
// Random operations against a reference model
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Fence {
    Unfenced,
    Current,
    Other(u32),
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue {
        name: u8,
        priority: u8,
        delay: u8,
        key: Option<u8>,
        max: u32,
    },
    Claim(Vec<(Vec<u8>, usize)>),
    Ack {
        job: usize,
        fence: Fence,
        ok: bool,
        retry: bool,
    },
    Heartbeat {
        job: usize,
        fence: Fence,
    },
    Abandon {
        job: usize,
        fence: Fence,
    },
    Expire,
    Cancel(usize),
    Retry(usize),
    Purge(u16),
    Advance(u16),
}

fn fence() -> impl Strategy<Value = Fence> {
    prop_oneof![
        1 => Just(Fence::Unfenced),
        4 => Just(Fence::Current),
        1 => (0u32..2).prop_map(Fence::Other),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u8..3, 0u8..3, proptest::option::of(0u8..2), 1u32..4).prop_map(
            |(name, priority, delay, key, max)| Op::Enqueue { name, priority, delay, key, max }
        ),
        4 => proptest::collection::vec((proptest::collection::vec(0u8..3, 0..3), 0usize..4), 1..3)
            .prop_map(Op::Claim),
        4 => (any::<usize>(), fence(), any::<bool>(), any::<bool>())
            .prop_map(|(job, fence, ok, retry)| Op::Ack { job, fence, ok, retry }),
        1 => (any::<usize>(), fence()).prop_map(|(job, fence)| Op::Heartbeat { job, fence }),
        1 => (any::<usize>(), fence()).prop_map(|(job, fence)| Op::Abandon { job, fence }),
        1 => Just(Op::Expire),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => any::<usize>().prop_map(Op::Retry),
        1 => (0u16..2000).prop_map(Op::Purge),
        3 => (0u16..1500).prop_map(Op::Advance),
    ]
}

/// What the model knows of a job: written from the state diagram in `model::Status`, not from
/// the machine's code.
#[derive(Debug, Clone)]
struct Model {
    id: String,
    name: String,
    key: Option<String>,
    priority: u8,
    run_at: Millis,
    status: Status,
    attempt: u32,
    base: u32,
    max: u32,
    cancel_requested: bool,
    lease_until: Option<Millis>,
    completed_at: Option<Millis>,
    worker: Option<String>,
    deleted: bool,
}

impl Model {
    fn finish(&mut self, status: Status, now: Millis) -> AckEffect {
        self.status = status;
        self.completed_at = Some(now);
        self.lease_until = None;
        self.worker = None;
        self.cancel_requested = false;
        AckEffect {
            status,
            next_run_at: None,
        }
    }

    /// A failed attempt that may be retried after `delay`.
    fn fail(&mut self, now: Millis, delay: Millis) -> AckEffect {
        if self.cancel_requested {
            self.finish(Status::Cancelled, now)
        } else if self.attempt - self.base < self.max {
            self.status = Status::Pending;
            self.run_at = now + delay;
            self.lease_until = None;
            self.worker = None;
            AckEffect {
                status: Status::Pending,
                next_run_at: Some(self.run_at),
            }
        } else {
            self.finish(Status::Dead, now)
        }
    }

    fn attempt_for(&self, fence: Fence) -> Option<u32> {
        match fence {
            Fence::Unfenced => None,
            Fence::Current => Some(self.attempt),
            Fence::Other(k) => Some(self.attempt + 1 + k),
        }
    }

    /// Why a transition needing a running job with `attempt` is refused, if it is.
    fn refusal(&self, attempt: Option<u32>) -> Option<JobError> {
        if self.deleted {
            Some(JobError::NotFound(self.id.clone()))
        } else if self.status != Status::Running {
            Some(wrong_status(self.status, "running"))
        } else {
            match attempt {
                Some(given) if given != self.attempt => {
                    Some(JobError::Rejected(Rejection::Stale {
                        given,
                        current: self.attempt,
                    }))
                }
                _ => None,
            }
        }
    }
}

fn pick(jobs: &[Model], i: usize) -> Option<usize> {
    (!jobs.is_empty()).then(|| i % jobs.len())
}

async fn run_model<S: Store>(s: &S, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut jobs: Vec<Model> = Vec::new();
    let mut now = T0;
    for (step, op) in ops.into_iter().enumerate() {
        match op.clone() {
            Op::Advance(ms) => now += Millis::from(ms),
            Op::Enqueue {
                name,
                priority,
                delay,
                key,
                max,
            } => {
                let name = format!("n{name}");
                let key = key.map(|k| format!("k{k}"));
                let new = NewJob {
                    priority,
                    run_at: now + Millis::from(delay) * 200,
                    idempotency_key: key.clone(),
                    ..max_attempts(job(&name), max)
                };
                let twin = jobs
                    .iter()
                    .find(|j| !j.deleted && key.is_some() && j.name == name && j.key == key);
                let out = s.enqueue(vec![new.clone()], now).await.unwrap().remove(0);
                match twin {
                    Some(twin) => {
                        prop_assert!(out.deduplicated);
                        prop_assert_eq!(&out.id, &twin.id);
                    }
                    None => {
                        prop_assert!(!out.deduplicated);
                        jobs.push(Model {
                            id: out.id,
                            name,
                            key,
                            priority,
                            run_at: new.run_at,
                            status: Status::Pending,
                            attempt: 0,
                            base: 0,
                            max,
                            cancel_requested: false,
                            lease_until: None,
                            completed_at: None,
                            worker: None,
                            deleted: false,
                        });
                    }
                }
            }
            Op::Claim(requests) => {
                let requests: Vec<ClaimRequest> = requests
                    .into_iter()
                    .enumerate()
                    .map(|(r, (names, limit))| ClaimRequest {
                        worker_id: format!("w{r}"),
                        names: names.iter().map(|n| format!("n{n}")).collect(),
                        limit,
                    })
                    .collect();
                let got = s.claim(requests.clone(), no_limits(), now).await.unwrap();
                prop_assert_eq!(got.len(), requests.len());
                for (r, got) in requests.iter().zip(got) {
                    let mut due: Vec<usize> = (0..jobs.len())
                        .filter(|&i| {
                            let j = &jobs[i];
                            !j.deleted
                                && j.status == Status::Pending
                                && j.run_at <= now
                                && (r.names.is_empty() || r.names.contains(&j.name))
                        })
                        .collect();
                    due.sort_by_key(|&i| (jobs[i].priority, jobs[i].run_at, i));
                    due.truncate(r.limit);
                    let expected: Vec<String> = due.iter().map(|&i| jobs[i].id.clone()).collect();
                    prop_assert_eq!(ids(&got), expected, "claim {:?}", r);
                    for i in due {
                        let j = &mut jobs[i];
                        j.status = Status::Running;
                        j.attempt += 1;
                        j.lease_until = Some(now + TIMEOUT);
                        j.worker = Some(r.worker_id.clone());
                        j.cancel_requested = false;
                    }
                }
            }
            Op::Ack {
                job: i,
                fence,
                ok,
                retry,
            } => {
                let (id, attempt) = match pick(&jobs, i) {
                    Some(i) => (jobs[i].id.clone(), jobs[i].attempt_for(fence)),
                    None => (UNKNOWN.to_owned(), None),
                };
                let outcome = if ok { success() } else { failure(retry) };
                let got = ack_one(s, ack(&id, attempt, outcome), now).await;
                let expected = match pick(&jobs, i) {
                    None => Err(JobError::NotFound(id)),
                    Some(i) => match jobs[i].refusal(attempt) {
                        Some(e) => Err(e),
                        None if ok => Ok(jobs[i].finish(Status::Success, now)),
                        None if retry || jobs[i].cancel_requested => Ok(jobs[i].fail(now, BACKOFF)),
                        None => Ok(jobs[i].finish(Status::Dead, now)),
                    },
                };
                prop_assert_eq!(got.map(|(_, effect)| effect), expected);
            }
            Op::Heartbeat { job: i, fence } => {
                let (id, attempt) = match pick(&jobs, i) {
                    Some(i) => (jobs[i].id.clone(), jobs[i].attempt_for(fence)),
                    None => (UNKNOWN.to_owned(), None),
                };
                let got = s
                    .heartbeat(vec![(id.clone(), attempt)], None, now)
                    .await
                    .unwrap()
                    .remove(0);
                let expected = match pick(&jobs, i) {
                    None => Err(JobError::NotFound(id)),
                    Some(i) => match jobs[i].refusal(attempt) {
                        Some(e) => Err(e),
                        None => {
                            jobs[i].lease_until = Some(now + TIMEOUT);
                            Ok(now + TIMEOUT)
                        }
                    },
                };
                prop_assert_eq!(got, expected);
            }
            Op::Abandon { job: i, fence } => {
                let Some(i) = pick(&jobs, i) else { continue };
                let attempt = jobs[i].attempt_for(fence).unwrap_or(jobs[i].attempt);
                let got = s
                    .abandon(vec![(jobs[i].id.clone(), attempt)], "gone".into(), now)
                    .await
                    .unwrap();
                let expected: Vec<(String, AckEffect)> = match jobs[i].refusal(Some(attempt)) {
                    Some(_) => Vec::new(),
                    None => vec![(jobs[i].id.clone(), jobs[i].fail(now, 0))],
                };
                let got: Vec<(String, AckEffect)> =
                    got.into_iter().map(|(j, e)| (j.id, e)).collect();
                prop_assert_eq!(got, expected);
            }
            Op::Expire => {
                let mut got: Vec<(String, AckEffect)> = s
                    .expire_leases(now)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|(j, e)| (j.id, e))
                    .collect();
                got.sort_by(|a, b| a.0.cmp(&b.0));
                let mut expected = Vec::new();
                for j in jobs.iter_mut().filter(|j| {
                    !j.deleted && j.status == Status::Running && j.lease_until <= Some(now)
                }) {
                    expected.push((j.id.clone(), j.fail(now, BACKOFF)));
                }
                expected.sort_by(|a, b| a.0.cmp(&b.0));
                prop_assert_eq!(got, expected);
            }
            Op::Cancel(i) => {
                let Some(i) = pick(&jobs, i) else { continue };
                let got = s.cancel(jobs[i].id.clone(), now).await.unwrap();
                let j = &mut jobs[i];
                let expected = if j.deleted {
                    Err(JobError::NotFound(j.id.clone()))
                } else {
                    Ok(match j.status {
                        Status::Pending => {
                            j.finish(Status::Cancelled, now);
                            CancelEffect::Cancelled
                        }
                        Status::Running => {
                            j.cancel_requested = true;
                            CancelEffect::Requested
                        }
                        status => CancelEffect::AlreadyFinished(status),
                    })
                };
                prop_assert_eq!(got.map(|(_, effect)| effect), expected);
            }
            Op::Retry(i) => {
                let Some(i) = pick(&jobs, i) else { continue };
                let got = s.retry(jobs[i].id.clone(), now).await.unwrap();
                let j = &mut jobs[i];
                let expected = if j.deleted {
                    Err(JobError::NotFound(j.id.clone()))
                } else if j.status == Status::Dead {
                    j.status = Status::Pending;
                    j.base = j.attempt;
                    j.run_at = now;
                    j.completed_at = None;
                    Ok(())
                } else {
                    Err(wrong_status(j.status, "dead"))
                };
                prop_assert_eq!(got.map(|_| ()), expected);
            }
            Op::Purge(ago) => {
                let before = now - Millis::from(ago);
                let got = s.purge(before, Vec::new()).await.unwrap();
                let mut expected = 0;
                for j in jobs.iter_mut().filter(|j| {
                    !j.deleted && j.status.is_terminal() && j.completed_at < Some(before)
                }) {
                    j.deleted = true;
                    expected += 1;
                }
                prop_assert_eq!(got, expected);
            }
        }
        check_state(s, &jobs, now)
            .await
            .map_err(|e| TestCaseError::fail(format!("after step {step} ({op:?}): {e}")))?;
    }
    Ok(())
}

/// Compares every job, the stats and the next wakeup with the model.
async fn check_state<S: Store>(s: &S, jobs: &[Model], now: Millis) -> Result<(), TestCaseError> {
    let (stored, total) = s.list(all(10_000)).await.unwrap();
    let live: Vec<&Model> = jobs.iter().filter(|j| !j.deleted).collect();
    prop_assert_eq!(total as usize, live.len());
    let stored: HashMap<&str, &Job> = stored.iter().map(|j| (j.id.as_str(), j)).collect();
    for m in &live {
        let Some(j) = stored.get(m.id.as_str()) else {
            return Err(TestCaseError::fail(format!("job {} is missing", m.id)));
        };
        prop_assert_eq!(
            (
                j.status,
                j.attempt,
                j.run_at,
                j.cancel_requested,
                j.lease_until,
                j.completed_at,
                j.worker_id.as_deref()
            ),
            (
                m.status,
                m.attempt,
                m.run_at,
                m.cancel_requested,
                m.lease_until,
                m.completed_at,
                m.worker.as_deref()
            ),
            "job {}",
            m.id
        );
    }
    let counts: Vec<(Status, u64)> = Status::ALL
        .iter()
        .map(|&st| (st, live.iter().filter(|m| m.status == st).count() as u64))
        .collect();
    prop_assert_eq!(s.stats().await.unwrap().by_status, counts);
    let lease = live.iter().filter_map(|m| m.lease_until).min();
    let due = live
        .iter()
        .filter(|m| m.status == Status::Pending && m.run_at > now)
        .map(|m| m.run_at)
        .min();
    let expected = match (lease, due) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    prop_assert_eq!(s.next_wakeup(now).await.unwrap(), expected);
    Ok(())
}

/// 32 random sequences of up to 40 operations, each on a fresh store.
fn random_ops_match_the_reference_model<B: Backend>() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 32,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        rt.block_on(async {
            let b = B::new().await;
            run_model(b.store(), ops).await
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Backend-specific
// ---------------------------------------------------------------------------------------------

/// SQLite: close the store, open the file again: everything acknowledged is there.
async fn sqlite_reopen_keeps_everything_acknowledged() {
    let file = TempDb::unique();
    let (out, before, stats) = {
        let s = SqliteStore::open(SqliteOptions::new(&file.0)).unwrap();
        let out = s
            .enqueue((0..6).map(|i| keyed("a", &format!("k{i}"))).collect(), T0)
            .await
            .unwrap();
        let claimed = take(&s, &[], 4, T0).await;
        ack_one(&s, ack(&claimed[0].id, Some(1), success()), T0 + 1)
            .await
            .unwrap();
        ack_one(&s, ack(&claimed[1].id, Some(1), failure(true)), T0 + 1)
            .await
            .unwrap();
        s.heartbeat(vec![(claimed[2].id.clone(), Some(1))], None, T0 + 2)
            .await
            .unwrap();
        s.cancel(out[5].id.clone(), T0 + 3).await.unwrap().unwrap();
        let (before, _) = s.list(all(100)).await.unwrap();
        (out, before, s.stats().await.unwrap())
    };
    let reopened = SqliteStore::open(SqliteOptions::new(&file.0)).unwrap();
    let (after, _) = reopened.list(all(100)).await.unwrap();
    assert_eq!(after.len(), 6);
    assert_eq!(after, before);
    assert_eq!(reopened.stats().await.unwrap(), stats);
    let success = after.iter().find(|j| j.status == Status::Success).unwrap();
    assert_eq!(success.result.as_deref(), Some(&b"\"done\""[..]));
    let dedup = reopened
        .enqueue(vec![keyed("a", "k0")], T0 + 5)
        .await
        .unwrap();
    assert_eq!(
        (dedup[0].id.as_str(), dedup[0].deduplicated),
        (out[0].id.as_str(), true)
    );
}

/// PostgreSQL: a second server on the schema sees everything, and its startup migrates nothing.
async fn postgres_second_server_sees_everything() {
    let b = Postgres::new().await;
    let s = b.store();
    let out = s
        .enqueue((0..4).map(|_| job("a")).collect(), T0)
        .await
        .unwrap();
    let claimed = take(s, &[], 2, T0).await;
    ack_one(s, ack(&claimed[0].id, Some(1), success()), T0 + 1)
        .await
        .unwrap();
    s.cancel(out[3].id.clone(), T0 + 2).await.unwrap().unwrap();
    let (before, _) = s.list(all(100)).await.unwrap();
    let second = b.second().await;
    let (after, _) = second.list(all(100)).await.unwrap();
    assert_eq!(after, before);
    assert_eq!(migration_versions(&b.url, &b.schema).await, [1, 2, 3]);
}

/// PostgreSQL: servers starting together on a new schema migrate it once, without errors.
async fn postgres_concurrent_startup_migrates_once() {
    let url = database_url();
    let schema = format!("gantry_jobs_test_{}", uuid::Uuid::now_v7().simple());
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (url, schema) = (url.clone(), schema.clone());
        starts.spawn(async move { PostgresStore::connect(&url, &schema).await });
    }
    let mut stores = Vec::new();
    while let Some(store) = starts.join_next().await {
        stores.push(store.unwrap());
    }
    let versions = migration_versions(&url, &schema).await;
    let ok = stores.iter().all(Result::is_ok);
    drop(stores);
    drop_schema(&url, &schema);
    assert!(ok, "a concurrent start failed");
    assert_eq!(versions, [1, 2, 3]);
}

async fn postgres_rejects_bad_schema_names() {
    for bad in [
        "",
        "Jobs",
        "1jobs",
        "jobs; drop table x",
        "a\"b",
        &"x".repeat(64),
    ] {
        match PostgresStore::connect(&database_url(), bad).await {
            Err(StoreError::Database(msg)) => assert!(msg.contains("schema"), "{msg}"),
            other => panic!("schema {bad:?} accepted: {other:?}"),
        }
    }
}

async fn migration_versions(url: &str, schema: &str) -> Vec<i32> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query(
            &format!("SELECT version FROM \"{schema}\".schema_migrations ORDER BY version"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Instantiation
// ---------------------------------------------------------------------------------------------

macro_rules! conformance {
    (
        async: [$($test:ident),* $(,)?],
        sync: [$($sync:ident),* $(,)?],
        sqlite: [$($sqlite:ident),* $(,)?],
        postgres: [$($postgres:ident),* $(,)?] $(,)?
    ) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test::<super::Sqlite>().await;
                }
            )*
            $(
                #[test]
                fn $sync() {
                    super::$sync::<super::Sqlite>();
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $sqlite() {
                    super::$sqlite().await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test::<super::Postgres>().await;
                }
            )*
            $(
                #[test]
                fn $sync() {
                    super::$sync::<super::Postgres>();
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $postgres() {
                    super::$postgres().await;
                }
            )*
        }
    };
}

conformance! {
    async: [
        enqueue_stores_the_job_as_given,
        enqueue_batches_keep_their_order,
        idempotency_keys_are_unique_per_name,
        claim_takes_only_due_jobs,
        claim_order_is_priority_then_run_at_then_enqueue_order,
        claim_filters_by_name,
        claim_respects_limits,
        queue_limits_cap_running_jobs_per_queue,
        claim_requests_in_one_call_never_share_a_job,
        claim_starts_an_attempt_with_a_lease,
        successful_ack_stores_the_result,
        failed_attempts_back_off_then_die,
        failure_without_retry_is_dead_at_once,
        stale_ack_is_rejected_and_changes_nothing,
        unfenced_ack_applies_to_the_current_attempt,
        ack_batch_results_are_independent,
        nul_bytes_in_text_do_not_break_a_batch,
        abandon_gives_up_only_current_attempts,
        expired_leases_fail_their_attempts,
        heartbeats_extend_the_lease_and_are_fenced,
        cancel_pending_running_and_finished_jobs,
        retry_revives_only_dead_jobs,
        get_of_an_unknown_job_is_none,
        list_filters_orders_and_pages,
        stats_count_every_status,
        purge_deletes_only_old_finished_jobs,
        next_wakeup_is_the_earliest_future_event,
        concurrent_claims_never_share_a_job,
        racing_acks_and_lease_expiry_apply_once,
        racing_idempotent_enqueues_create_one_job,
    ],
    sync: [random_ops_match_the_reference_model],
    sqlite: [sqlite_reopen_keeps_everything_acknowledged],
    postgres: [
        postgres_second_server_sees_everything,
        postgres_concurrent_startup_migrates_once,
        postgres_rejects_bad_schema_names,
    ],
}

/// Schedules, instantiated with the macro above.
mod schedules;
