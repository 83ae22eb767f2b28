//! Install, capture and the commit-safe cursor.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use gantry_observer::Error;
use gantry_observer::capture::{Capture, Event, Position};
use gantry_observer::config::{Entity, EventType};
use gantry_observer::schema::{install, uninstall};
use tokio_postgres::{Client, NoTls};

fn database_url() -> String {
    std::env::var("GANTRY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn connect() -> Client {
    let url = database_url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url} (set GANTRY_TEST_DATABASE_URL): {e}"));
    tokio::spawn(connection);
    client
}

/// A schema and a watched table of the test's own.
struct Fixture {
    client: Client,
    schema: String,
    table: String,
}

impl Fixture {
    async fn new() -> Self {
        let tag = format!("{:x}", rand_tag());
        let schema = format!("gantry_observer_t{tag}");
        let table = format!("obs_orders_{tag}");
        let mut client = connect().await;
        client
            .batch_execute(&format!(
                "CREATE TABLE {table} (id bigint PRIMARY KEY, status text, total numeric)"
            ))
            .await
            .unwrap();
        let entities = BTreeSet::from([Entity::parse(&table).unwrap()]);
        install(&mut client, &schema, &entities).await.unwrap();
        Self {
            client,
            schema,
            table,
        }
    }

    fn capture(&self, set: &str) -> Capture {
        Capture::new(&self.schema, set)
    }

    async fn drop(mut self) {
        uninstall(&mut self.client, &self.schema).await.unwrap();
        self.client
            .batch_execute(&format!("DROP TABLE {}", self.table))
            .await
            .unwrap();
    }
}

fn rand_tag() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Reads until the cursor is caught up with what is deliverable now. Other tests' open
/// transactions hold the horizon back (it is cluster-wide), so this may return less than was
/// committed; [`read_n`] waits.
async fn read_all(
    client: &mut Client,
    capture: &Capture,
    pos: &mut Position,
    limit: i64,
) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        let (events, next) = capture.read(client, *pos, limit).await.unwrap();
        *pos = next;
        if events.is_empty() && pos.lo == pos.hi {
            return out;
        }
        out.extend(events);
    }
}

/// Reads until `n` events have been delivered (within 20 s), then checks that no more come.
async fn read_n(
    client: &mut Client,
    capture: &Capture,
    pos: &mut Position,
    limit: i64,
    n: usize,
) -> Vec<Event> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} events: {out:?}",
            out.len()
        );
        out.extend(read_all(client, capture, pos, limit).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let extra = read_all(client, capture, pos, limit).await;
    assert!(extra.is_empty(), "more than {n} events: {extra:?}");
    out
}

#[tokio::test]
async fn captures_inserts_updates_and_deletes_with_their_images() {
    let mut f = Fixture::new().await;
    let t = f.table.clone();
    f.client
        .batch_execute(&format!(
            "INSERT INTO {t} VALUES (1, 'new', 100.00);
             UPDATE {t} SET status = 'shipped' WHERE id = 1;
             DELETE FROM {t} WHERE id = 1;"
        ))
        .await
        .unwrap();
    let capture = f.capture("main");
    let mut pos = capture.acquire(&f.client).await.unwrap().position;
    let events = read_n(&mut f.client, &capture, &mut pos, 100, 3).await;
    let ops: Vec<EventType> = events.iter().map(|e| e.op).collect();
    assert_eq!(
        ops,
        vec![EventType::Insert, EventType::Update, EventType::Delete]
    );
    assert!(events.iter().all(|e| e.entity == t));
    assert_eq!(events[0].before, None);
    assert_eq!(events[0].after.as_ref().unwrap()["status"], "new");
    assert_eq!(events[0].after.as_ref().unwrap()["total"], 100.00);
    assert_eq!(events[1].before.as_ref().unwrap()["status"], "new");
    assert_eq!(events[1].after.as_ref().unwrap()["status"], "shipped");
    assert_eq!(events[2].before.as_ref().unwrap()["status"], "shipped");
    assert_eq!(events[2].after, None);
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    f.drop().await;
}

#[tokio::test]
async fn install_is_idempotent_and_follows_the_config() {
    let mut f = Fixture::new().await;
    let other = format!("{}_other", f.table);
    f.client
        .batch_execute(&format!("CREATE TABLE {other} (id bigint PRIMARY KEY)"))
        .await
        .unwrap();
    let both = BTreeSet::from([
        Entity::parse(&f.table).unwrap(),
        Entity::parse(&other).unwrap(),
    ]);
    let again = install(&mut f.client, &f.schema, &both).await.unwrap();
    assert_eq!(again.migrations_applied, 0);
    assert_eq!(again.watched.len(), 2);
    assert!(again.unwatched.is_empty());
    // Dropping `other` from the config drops its triggers.
    let one = BTreeSet::from([Entity::parse(&f.table).unwrap()]);
    let third = install(&mut f.client, &f.schema, &one).await.unwrap();
    assert_eq!(third.unwatched, vec![other.clone()]);
    f.client
        .batch_execute(&format!(
            "INSERT INTO {other} VALUES (1); INSERT INTO {} VALUES (7, 'x', 1);",
            f.table
        ))
        .await
        .unwrap();
    let capture = f.capture("main");
    let mut pos = capture.acquire(&f.client).await.unwrap().position;
    let events = read_n(&mut f.client, &capture, &mut pos, 10, 1).await;
    assert_eq!(events[0].entity, f.table);
    // A table that does not exist is a config error naming it.
    let missing = BTreeSet::from([Entity::parse("no_such_table_here").unwrap()]);
    let err = install(&mut f.client, &f.schema, &missing)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no_such_table_here"), "{err}");
    f.client
        .batch_execute(&format!("DROP TABLE {other}"))
        .await
        .unwrap();
    f.drop().await;
}

#[tokio::test]
async fn a_transaction_that_commits_late_is_not_skipped() {
    let mut f = Fixture::new().await;
    let t = f.table.clone();
    let capture = f.capture("main");
    let mut pos = capture.acquire(&f.client).await.unwrap().position;
    // A takes the lower change-log id but commits after B.
    let mut late = connect().await;
    let a = late.transaction().await.unwrap();
    a.execute(&format!("INSERT INTO {t} VALUES (1, 'a', 1)"), &[])
        .await
        .unwrap();
    f.client
        .batch_execute(&format!("INSERT INTO {t} VALUES (2, 'b', 2)"))
        .await
        .unwrap();
    // B is committed, but A might still write below it: nothing is delivered yet.
    let early = read_all(&mut f.client, &capture, &mut pos, 10).await;
    assert!(early.is_empty(), "{early:?}");
    a.commit().await.unwrap();
    let events = read_n(&mut f.client, &capture, &mut pos, 10, 2).await;
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e.after.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2]);
    // And nothing twice.
    assert!(
        read_all(&mut f.client, &capture, &mut pos, 10)
            .await
            .is_empty()
    );
    f.drop().await;
}

#[tokio::test]
async fn a_rolled_back_transaction_delivers_nothing_and_releases_the_horizon() {
    let mut f = Fixture::new().await;
    let t = f.table.clone();
    let capture = f.capture("main");
    let mut pos = capture.acquire(&f.client).await.unwrap().position;
    let mut other = connect().await;
    let a = other.transaction().await.unwrap();
    a.execute(&format!("INSERT INTO {t} VALUES (1, 'a', 1)"), &[])
        .await
        .unwrap();
    f.client
        .batch_execute(&format!("INSERT INTO {t} VALUES (2, 'b', 2)"))
        .await
        .unwrap();
    assert!(capture.lag_ms(&f.client, pos).await.unwrap() >= 0);
    a.rollback().await.unwrap();
    let events = read_n(&mut f.client, &capture, &mut pos, 10, 1).await;
    assert_eq!(events[0].after.as_ref().unwrap()["id"], 2);
    f.drop().await;
}

#[tokio::test]
async fn pages_resume_from_a_saved_checkpoint_exactly_once() {
    let mut f = Fixture::new().await;
    let t = f.table.clone();
    f.client
        .batch_execute(&format!(
            "INSERT INTO {t} SELECT g, 's', g FROM generate_series(1, 10) g"
        ))
        .await
        .unwrap();
    let capture = f.capture("main");
    let held = capture.acquire(&f.client).await.unwrap();
    let mut pos = held.position;
    let mut first = Vec::new();
    for _ in 0..2000 {
        let (page, next) = capture.read(&mut f.client, pos, 3).await.unwrap();
        pos = next;
        if !page.is_empty() {
            first = page;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(first.len(), 3);
    capture.save(&f.client, pos, held.epoch).await.unwrap();
    // A new holder resumes where the last save left off.
    let resumed = capture.acquire(&f.client).await.unwrap();
    assert_eq!(resumed.position, pos);
    assert_eq!(resumed.epoch, held.epoch + 1);
    let mut at = resumed.position;
    let rest = read_n(&mut f.client, &capture, &mut at, 3, 7).await;
    let mut seen: Vec<i64> = first.iter().chain(&rest).map(|e| e.id).collect();
    assert_eq!(seen.len(), 10);
    seen.dedup();
    assert_eq!(seen.len(), 10);
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    // The deposed holder's save is refused.
    let err = capture.save(&f.client, at, held.epoch).await.unwrap_err();
    assert!(
        matches!(err, Error::Fenced { current, ours, .. } if current == held.epoch + 1 && ours == held.epoch),
        "{err}"
    );
    f.drop().await;
}

#[tokio::test]
async fn pruning_keeps_what_the_slowest_set_has_not_passed() {
    let mut f = Fixture::new().await;
    let t = f.table.clone();
    f.client
        .batch_execute(&format!(
            "INSERT INTO {t} SELECT g, 's', g FROM generate_series(1, 5) g"
        ))
        .await
        .unwrap();
    let fast = f.capture("fast");
    let slow = f.capture("slow");
    let fast_held = fast.acquire(&f.client).await.unwrap();
    let slow_held = slow.acquire(&f.client).await.unwrap();
    let mut pos = fast_held.position;
    assert_eq!(
        read_n(&mut f.client, &fast, &mut pos, 100, 5).await.len(),
        5
    );
    fast.save(&f.client, pos, fast_held.epoch).await.unwrap();
    assert_eq!(fast.prune(&f.client, 1000).await.unwrap(), 0);
    let st = gantry_observer::capture::status(&f.client, &f.schema)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.changes, 5);
    assert_eq!(st.watched, vec![t.clone()]);
    let sets: Vec<(&str, i64)> = st
        .sets
        .iter()
        .map(|s| (s.set.as_str(), s.pending))
        .collect();
    assert_eq!(sets, vec![("fast", 0), ("slow", 5)]);
    assert!(st.sets[1].lag_ms >= 0);
    let mut slow_pos = slow_held.position;
    assert_eq!(
        read_n(&mut f.client, &slow, &mut slow_pos, 100, 5)
            .await
            .len(),
        5
    );
    slow.save(&f.client, slow_pos, slow_held.epoch)
        .await
        .unwrap();
    assert_eq!(fast.prune(&f.client, 1000).await.unwrap(), 5);
    f.drop().await;
}

#[tokio::test]
async fn concurrent_writers_with_late_commits_are_each_delivered_once() {
    let mut f = Fixture::new().await;
    let t = f.table.clone();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..6i64 {
        let t = t.clone();
        writers.spawn(async move {
            let mut client = connect().await;
            for i in 0..40i64 {
                let tx = client.transaction().await.unwrap();
                for k in 0..(1 + (i + w) % 3) {
                    let id = w * 1_000_000 + i * 10 + k;
                    tx.execute(&format!("INSERT INTO {t} VALUES ($1, 'w', 1)"), &[&id])
                        .await
                        .unwrap();
                }
                // Some transactions stay open while others commit past them.
                tokio::time::sleep(Duration::from_millis(
                    u64::try_from((i * 7 + w * 3) % 5).unwrap(),
                ))
                .await;
                if (i + w) % 11 == 0 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                }
            }
        });
    }
    let capture = f.capture("main");
    let mut pos = capture.acquire(&f.client).await.unwrap().position;
    let mut delivered: Vec<Event> = Vec::new();
    while !writers.is_empty() {
        let (events, next) = capture.read(&mut f.client, pos, 7).await.unwrap();
        pos = next;
        delivered.extend(events);
        if let Some(done) = writers.try_join_next() {
            done.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let committed: HashSet<i64> = f
        .client
        .query(&format!("SELECT id FROM {t}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let left = committed.len().saturating_sub(delivered.len());
    delivered.extend(read_n(&mut f.client, &capture, &mut pos, 7, left).await);
    let mut rows: Vec<i64> = delivered
        .iter()
        .map(|e| e.after.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    let n = rows.len();
    rows.sort_unstable();
    rows.dedup();
    assert_eq!(rows.len(), n, "a row was delivered twice");
    assert_eq!(rows.into_iter().collect::<HashSet<_>>(), committed);
    assert!(!committed.is_empty());
    f.drop().await;
}
