//! The schedule part of the storage conformance suite: creation and lookup, changes, and due
//! checks — each tick fires once, across handles, restarts and (on PostgreSQL) racing servers.
//! Instantiated for both backends by the suite's `conformance!` macro.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use gantry_jobs::model::{JobOptions, Millis, Status};
use gantry_jobs::schedule::{
    Misfire, NewSchedule, Schedule, ScheduleChange, ScheduleRejection, ScheduleStatus,
    ScheduleUpdate, SpecError, idempotency_key,
};
use gantry_jobs::store::sqlite::{SqliteOptions, SqliteStore};
use gantry_jobs::store::{FireReport, ScheduleError, ScheduleFilter, Store};

use super::{Backend, ListFilter, Postgres, Sqlite, T0, TempDb, all, policy};

const SEC: Millis = 1000;

fn every_second(name: &str) -> NewSchedule {
    NewSchedule {
        name: name.to_owned(),
        cron: "* * * * * *".to_owned(),
        timezone: String::new(),
        misfire: Misfire::Coalesce,
        args: br#"["tick"]"#.to_vec(),
        options: JobOptions {
            retry: policy(2),
            timeout: Duration::from_secs(5),
        },
    }
}

async fn create<S: Store>(s: &S, new: NewSchedule, now: Millis) -> Schedule {
    s.create_schedule(new, now)
        .await
        .expect("create schedule")
        .expect("schedule accepted")
}

async fn change<S: Store>(
    s: &S,
    key: &str,
    c: ScheduleChange,
    now: Millis,
) -> Result<Schedule, ScheduleError> {
    s.change_schedule(key.to_owned(), c, now)
        .await
        .expect("change schedule")
}

async fn fire<S: Store>(s: &S, now: Millis) -> FireReport {
    s.fire_due_schedules(now, 100).await.expect("fire")
}

fn filter(status: Option<ScheduleStatus>, limit: usize, offset: usize) -> ScheduleFilter {
    ScheduleFilter {
        status,
        limit,
        offset,
    }
}

fn wrong(status: ScheduleStatus, expected: &'static str) -> ScheduleError {
    ScheduleError::Rejected(ScheduleRejection::WrongStatus { status, expected })
}

/// `(schedule id, tick)` of every job a due check created (not deduplicated).
fn created(report: &FireReport) -> Vec<(String, Millis)> {
    report
        .fired
        .iter()
        .filter(|f| f.job.as_ref().is_some_and(|j| !j.deduplicated))
        .map(|f| {
            (
                f.schedule_id.clone(),
                f.tick.expect("a created job has a tick"),
            )
        })
        .collect()
}

async fn create_get_and_list<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let a = create(s, every_second("a"), T0 + 300).await;
    assert_eq!(
        (a.status, a.next_run_at, a.last_run_at, a.created_at),
        (ScheduleStatus::Active, Some(T0 + SEC), None, T0 + 300)
    );
    assert_eq!((a.timezone.as_str(), a.misfire), ("UTC", Misfire::Coalesce));
    // Stored as given; found by id and by name.
    assert_eq!(s.get_schedule(a.id.clone()).await.unwrap(), Some(a.clone()));
    assert_eq!(s.get_schedule("a".into()).await.unwrap(), Some(a.clone()));
    assert_eq!(s.get_schedule("nope".into()).await.unwrap(), None);
    assert_eq!(s.get_schedule("a\0".into()).await.unwrap(), None);

    // Names are unique among schedules not deleted.
    assert_eq!(
        s.create_schedule(every_second("a"), T0).await.unwrap(),
        Err(ScheduleError::NameTaken("a".into()))
    );
    let daily = create(
        s,
        NewSchedule {
            cron: "0 30 9 * * *".into(),
            timezone: "Europe/Berlin".into(),
            misfire: Misfire::Skip,
            ..every_second("b")
        },
        T0,
    )
    .await;
    // 2023-11-15 09:30 CET.
    assert_eq!(daily.next_run_at, Some(1_700_037_000_000));
    assert_eq!(daily.misfire, Misfire::Skip);
    let c = create(s, every_second("c"), T0 + 2 * SEC).await;
    // A cron that never fires is refused, and nothing is stored.
    assert!(matches!(
        s.create_schedule(
            NewSchedule {
                cron: "0 0 30 2 *".into(),
                ..every_second("never")
            },
            T0
        )
        .await
        .unwrap(),
        Err(ScheduleError::Rejected(ScheduleRejection::Spec(
            SpecError::NeverFires(_)
        )))
    ));

    change(s, &c.id, ScheduleChange::Pause, T0).await.unwrap();
    // Soonest first, schedules without a next tick last.
    let names = |v: &[Schedule]| v.iter().map(|x| x.name.clone()).collect::<Vec<_>>();
    let (page, total) = s.list_schedules(filter(None, 10, 0)).await.unwrap();
    assert_eq!(
        (names(&page), total),
        (["a", "b", "c"].map(String::from).to_vec(), 3)
    );
    let (page, total) = s.list_schedules(filter(None, 1, 1)).await.unwrap();
    assert_eq!((names(&page), total), (vec!["b".to_owned()], 3));
    let (page, total) = s
        .list_schedules(filter(Some(ScheduleStatus::Paused), 10, 0))
        .await
        .unwrap();
    assert_eq!((names(&page), total), (vec!["c".to_owned()], 1));

    // Deleting frees the name; the deleted one is still found by id, not by name.
    change(s, "a", ScheduleChange::Delete, T0 + 5)
        .await
        .unwrap();
    let a2 = create(s, every_second("a"), T0 + 6).await;
    assert_ne!(a2.id, a.id);
    assert_eq!(s.get_schedule("a".into()).await.unwrap(), Some(a2.clone()));
    let old = s.get_schedule(a.id.clone()).await.unwrap().unwrap();
    assert_eq!(
        (old.status, old.next_run_at),
        (ScheduleStatus::Deleted, None)
    );
    let (_, total) = s.list_schedules(filter(None, 10, 0)).await.unwrap();
    assert_eq!(total, 3);
    let (page, total) = s
        .list_schedules(filter(Some(ScheduleStatus::Deleted), 10, 0))
        .await
        .unwrap();
    assert_eq!((names(&page), total), (vec!["a".to_owned()], 1));
}

async fn changes_follow_the_status_rules<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let a = create(s, every_second("a"), T0).await;
    let missing = "00000000-0000-7000-8000-000000000000";
    assert_eq!(
        change(s, missing, ScheduleChange::Pause, T0).await,
        Err(ScheduleError::NotFound(missing.into()))
    );
    assert_eq!(
        change(s, &a.id, ScheduleChange::Resume, T0).await,
        Err(wrong(ScheduleStatus::Active, "paused"))
    );
    let paused = change(s, &a.id, ScheduleChange::Pause, T0 + 1)
        .await
        .unwrap();
    assert_eq!(
        (paused.status, paused.next_run_at),
        (ScheduleStatus::Paused, None)
    );
    assert_eq!(
        change(s, "a", ScheduleChange::Pause, T0 + 2).await,
        Err(wrong(ScheduleStatus::Paused, "active"))
    );
    // Paused: nothing fires, however late.
    assert!(fire(s, T0 + 60 * SEC).await.fired.is_empty());
    // Resumed: ticks from now on; those passed while paused never fire.
    let resumed = change(s, "a", ScheduleChange::Resume, T0 + 60 * SEC + 500)
        .await
        .unwrap();
    assert_eq!(resumed.next_run_at, Some(T0 + 61 * SEC));
    assert!(fire(s, T0 + 60 * SEC + 600).await.fired.is_empty());

    // Update: a new cron restarts from now; options and misfire apply; a bad cron changes nothing.
    let update = |u: ScheduleUpdate| ScheduleChange::Update(u);
    assert!(matches!(
        change(
            s,
            "a",
            update(ScheduleUpdate {
                timezone: Some("Nowhere/Land".into()),
                ..Default::default()
            }),
            T0 + 61 * SEC
        )
        .await,
        Err(ScheduleError::Rejected(ScheduleRejection::Spec(
            SpecError::TimeZone(_)
        )))
    ));
    let updated = change(
        s,
        "a",
        update(ScheduleUpdate {
            cron: Some("*/10 * * * * *".into()),
            options: Some(JobOptions {
                retry: policy(9),
                timeout: Duration::from_secs(1),
            }),
            misfire: Some(Misfire::Skip),
            ..Default::default()
        }),
        T0 + 61 * SEC,
    )
    .await
    .unwrap();
    assert_eq!(
        (updated.cron.as_str(), updated.next_run_at, updated.misfire),
        ("*/10 * * * * *", Some(T0 + 70 * SEC), Misfire::Skip)
    );
    assert_eq!(updated.options.retry.max_attempts(), 9);
    assert_eq!(s.get_schedule("a".into()).await.unwrap(), Some(updated));

    change(s, "a", ScheduleChange::Delete, T0 + 62 * SEC)
        .await
        .unwrap();
    assert_eq!(
        change(s, &a.id, ScheduleChange::Delete, T0 + 63 * SEC).await,
        Err(wrong(ScheduleStatus::Deleted, "active or paused"))
    );
    assert_eq!(
        change(s, &a.id, ScheduleChange::Resume, T0 + 63 * SEC).await,
        Err(wrong(ScheduleStatus::Deleted, "paused"))
    );
    assert!(fire(s, T0 + 600 * SEC).await.fired.is_empty());
}

async fn due_schedules_fire_once_per_tick<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let a = create(s, every_second("a"), T0).await;
    assert!(fire(s, T0 + SEC - 1).await.fired.is_empty());

    let report = fire(s, T0 + SEC + 20).await;
    assert_eq!(report.fired.len(), 1);
    let f = &report.fired[0];
    assert_eq!((f.tick, f.late), (Some(T0 + SEC), false));
    assert_eq!(report.next_due, Some(T0 + 2 * SEC));
    let job_id = f.job.as_ref().unwrap().id.clone();
    let job = s.get(job_id.clone()).await.unwrap().unwrap();
    assert_eq!(
        (
            job.name.as_str(),
            job.args.as_slice(),
            job.status,
            job.run_at,
            job.options.retry.max_attempts()
        ),
        ("a", &br#"["tick"]"#[..], Status::Pending, T0 + SEC + 20, 2)
    );
    assert_eq!(job.idempotency_key, Some(idempotency_key(&a.id, T0 + SEC)));
    let stored = s.get_schedule(a.id.clone()).await.unwrap().unwrap();
    assert_eq!(
        (stored.next_run_at, stored.last_run_at),
        (Some(T0 + 2 * SEC), Some(T0 + SEC + 20))
    );
    // The same moment again, or through another handle: nothing.
    assert!(fire(s, T0 + SEC + 20).await.fired.is_empty());
    assert!(
        fire(&b.second().await, T0 + SEC + 30)
            .await
            .fired
            .is_empty()
    );

    // Down for four ticks: coalesced into one late job for the first of them.
    let report = fire(s, T0 + 5 * SEC + 500).await;
    assert_eq!(created(&report), [(a.id.clone(), T0 + 2 * SEC)]);
    assert!(report.fired[0].late);
    assert_eq!(report.next_due, Some(T0 + 6 * SEC));
    let (_, total) = s.list(all(100)).await.unwrap();
    assert_eq!(total, 2);
    // The next due check goes on from there.
    assert_eq!(
        created(&fire(s, T0 + 6 * SEC).await),
        [(a.id, T0 + 6 * SEC)]
    );
}

/// The key guard behind the transaction: a tick whose job already exists (as after a crash that
/// lost only the schedule's update) is not enqueued again, and the schedule still moves on.
async fn a_tick_whose_job_exists_is_not_enqueued_again<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let a = create(s, every_second("a"), T0).await;
    let existing = a.job_for(T0 + SEC, T0);
    let first = s.enqueue(vec![existing], T0).await.unwrap().remove(0);
    let report = fire(s, T0 + SEC).await;
    assert_eq!(report.fired.len(), 1);
    let job = report.fired[0].job.clone().unwrap();
    assert_eq!((job.id, job.deduplicated), (first.id, true));
    assert_eq!(report.next_due, Some(T0 + 2 * SEC));
    let (_, total) = s.list(all(10)).await.unwrap();
    assert_eq!(total, 1);
}

async fn skip_drops_missed_ticks<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    let a = create(
        s,
        NewSchedule {
            misfire: Misfire::Skip,
            cron: "*/10 * * * * *".into(),
            ..every_second("a")
        },
        T0 + 1,
    )
    .await;
    assert_eq!(a.next_run_at, Some(T0 + 10 * SEC));
    // On time (within the grace): fires.
    assert_eq!(
        created(&fire(s, T0 + 10 * SEC + 900).await),
        [(a.id.clone(), T0 + 10 * SEC)]
    );
    // Missed by three seconds: dropped, reported late, next tick after now.
    let report = fire(s, T0 + 23 * SEC).await;
    assert_eq!(report.fired.len(), 1);
    assert_eq!(
        (
            report.fired[0].tick,
            report.fired[0].job.as_ref(),
            report.fired[0].late
        ),
        (None, None, true)
    );
    assert_eq!(report.next_due, Some(T0 + 30 * SEC));
    let (_, total) = s.list(all(100)).await.unwrap();
    assert_eq!(total, 1);
    let stored = s.get_schedule(a.id).await.unwrap().unwrap();
    assert_eq!(stored.last_run_at, Some(T0 + 10 * SEC + 900));
}

async fn next_wakeup_includes_the_next_tick<B: Backend>() {
    let b = B::new().await;
    let s = b.store();
    assert_eq!(s.next_wakeup(T0).await.unwrap(), None);
    let a = create(s, every_second("a"), T0 + 100).await;
    assert_eq!(s.next_wakeup(T0 + 100).await.unwrap(), Some(T0 + SEC));
    // A due tick is not in the future.
    assert_eq!(s.next_wakeup(T0 + SEC).await.unwrap(), None);
    change(s, &a.id, ScheduleChange::Pause, T0 + 200)
        .await
        .unwrap();
    assert_eq!(s.next_wakeup(T0 + 200).await.unwrap(), None);
}

/// Many due checks from two handles at once (two servers on PostgreSQL): every tick's job is
/// created exactly once, and no check even tries to fire a tick another already fired.
async fn concurrent_due_checks_fire_each_tick_once<B: Backend>() {
    const SCHEDULES: usize = 20;
    const STEPS: i64 = 12;
    let b = B::new().await;
    let stores = [b.store().clone(), b.second().await];
    for i in 0..SCHEDULES {
        create(&stores[0], every_second(&format!("s{i}")), T0).await;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..4 {
        let s = stores[t % 2].clone();
        tasks.spawn(async move {
            let mut reports = Vec::new();
            // Every handle walks the same clock, half a second per step.
            for step in 1..=STEPS {
                reports.push(s.fire_due_schedules(T0 + step * 500, 7).await.unwrap());
            }
            reports
        });
    }
    let mut seen: HashSet<(String, Millis)> = HashSet::new();
    while let Some(reports) = tasks.join_next().await {
        for r in reports.unwrap() {
            for f in &r.fired {
                let job = f.job.as_ref().expect("coalesce always enqueues");
                assert!(
                    !job.deduplicated,
                    "tick {:?} of {} fired twice",
                    f.tick, f.name
                );
            }
            for key in created(&r) {
                assert!(seen.insert(key.clone()), "{key:?} created twice");
            }
        }
    }
    // Each schedule fired at most once per second of the walk, never twice for one tick.
    let mut per_schedule: HashMap<String, usize> = HashMap::new();
    for (id, _) in &seen {
        *per_schedule.entry(id.clone()).or_default() += 1;
    }
    assert_eq!(per_schedule.len(), SCHEDULES);
    assert!(per_schedule.values().all(|n| (1..=6).contains(n)));
    let (_, total) = stores[1].list(all(1)).await.unwrap();
    assert_eq!(total, seen.len() as u64);
}

/// SQLite: a due check, then the file closed and opened again (a restart): the tick that fired
/// does not fire again, and the ticks missed while closed fire once.
async fn sqlite_restart_does_not_double_fire() {
    let file = TempDb::unique();
    let id = {
        let s = SqliteStore::open(SqliteOptions::new(&file.0)).unwrap();
        let a = create(&s, every_second("a"), T0).await;
        assert_eq!(created(&fire(&s, T0 + SEC).await).len(), 1);
        a.id
    };
    let s = SqliteStore::open(SqliteOptions::new(&file.0)).unwrap();
    assert!(fire(&s, T0 + SEC).await.fired.is_empty());
    assert!(fire(&s, T0 + 1500).await.fired.is_empty());
    assert_eq!(
        created(&fire(&s, T0 + 4 * SEC + 100).await),
        [(id.clone(), T0 + 2 * SEC)]
    );
    let (jobs, _) = s.list(all(100)).await.unwrap();
    let keys: HashSet<_> = jobs.iter().map(|j| j.idempotency_key.clone()).collect();
    assert_eq!(
        keys,
        [T0 + SEC, T0 + 2 * SEC]
            .iter()
            .map(|t| Some(idempotency_key(&id, *t)))
            .collect()
    );
}

/// PostgreSQL: a second server started on the schema after a due check fires nothing more
/// for that tick, and the schema is at migration 3.
async fn postgres_second_server_does_not_double_fire() {
    let b = Postgres::new().await;
    let a = create(b.store(), every_second("a"), T0).await;
    assert_eq!(created(&fire(b.store(), T0 + SEC).await).len(), 1);
    let second = b.second().await;
    assert!(fire(&second, T0 + SEC).await.fired.is_empty());
    assert_eq!(
        created(&fire(&second, T0 + 2 * SEC).await),
        [(a.id, T0 + 2 * SEC)]
    );
    let (_, total) = b.store().list(ListFilter::default()).await.unwrap();
    assert_eq!(total, 2);
}

conformance! {
    async: [
        create_get_and_list,
        changes_follow_the_status_rules,
        due_schedules_fire_once_per_tick,
        a_tick_whose_job_exists_is_not_enqueued_again,
        skip_drops_missed_ticks,
        next_wakeup_includes_the_next_tick,
        concurrent_due_checks_fire_each_tick_once,
    ],
    sync: [],
    sqlite: [sqlite_restart_does_not_double_fire],
    postgres: [postgres_second_server_does_not_double_fire],
}
