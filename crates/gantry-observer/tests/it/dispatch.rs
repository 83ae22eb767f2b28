//! Hand-off of matched events to the jobs store, atomically with the checkpoint.

use std::collections::BTreeSet;
use std::time::Duration;

use gantry_jobs::store::postgres::PostgresStore;
use gantry_jobs::store::{ListFilter, Store as _};
use gantry_observer::Error;
use gantry_observer::capture::Capture;
use gantry_observer::config::{Entity, ObserverConfig};
use gantry_observer::dispatch::{Matcher, hand_off};
use gantry_observer::schema::{install, uninstall};
use tokio_postgres::NoTls;

fn database_url() -> String {
    std::env::var("GANTRY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn tag() -> String {
    use std::hash::{BuildHasher, RandomState};
    format!(
        "{:x}",
        RandomState::new().hash_one(std::time::SystemTime::now())
    )
}

async fn jobs_named(store: &PostgresStore, name: &str) -> Vec<serde_json::Value> {
    let (jobs, _) = store
        .list(ListFilter {
            statuses: vec![],
            names: vec![name.to_owned()],
            queue: Some("observer".into()),
            limit: 100,
            offset: 0,
            order_by: Default::default(),
            ascending: true,
        })
        .await
        .unwrap();
    jobs.iter()
        .map(|j| serde_json::from_slice::<serde_json::Value>(&j.args).unwrap()[0].clone())
        .collect()
}

#[tokio::test]
async fn matches_become_jobs_in_the_same_commit_as_the_checkpoint() {
    let t = tag();
    let (schema, jobs_schema, table) = (
        format!("gantry_observer_d{t}"),
        format!("gantry_jobs_d{t}"),
        format!("obs_dispatch_{t}"),
    );
    let url = database_url();
    let (mut client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, status text, total numeric)"
        ))
        .await
        .unwrap();
    install(
        &mut client,
        &schema,
        &BTreeSet::from([Entity::parse(&table).unwrap()]),
    )
    .await
    .unwrap();
    let store = PostgresStore::connect(&url, &jobs_schema).await.unwrap();
    let config = ObserverConfig::parse(
        &format!(
            "[[observers]]\nname = \"big-{t}\"\nentity = \"{table}\"\nevents = [\"INSERT\"]\n\
             condition = \"data.total >= 100\"\n\
             [[observers.actions]]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/a\"\n\
             [[observers.actions]]\ntype = \"slack\"\nurl = \"http://127.0.0.1:9/b\"\ntext = \"big\"\n\n\
             [[observers]]\nname = \"shipped-{t}\"\nentity = \"{table}\"\nevents = [\"UPDATE\"]\n\
             condition = \"changed_to('status', 'shipped')\"\n\
             [[observers.actions]]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/c\"\n"
        ),
        "test.toml",
    )
    .unwrap();
    let matchers: Vec<Matcher> = config.observers.into_iter().map(Matcher::new).collect();
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 'new', 100.00), (2, 'new', 5), (3, 'new', 250);
             UPDATE {table} SET status = 'shipped' WHERE id = 2;
             UPDATE {table} SET total = 7 WHERE id = 3;"
        ))
        .await
        .unwrap();

    let capture = Capture::new(&schema, "main");
    let held = capture.acquire(&client).await.unwrap();
    let mut events = Vec::new();
    let mut pos = held.position;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while events.len() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "{events:?}");
        let (batch, next) = capture.read(&mut client, pos, 100).await.unwrap();
        pos = next;
        events.extend(batch);
    }
    // A deposed holder's hand-off is refused whole: no jobs, no checkpoint.
    let newer = capture.acquire(&client).await.unwrap();
    let refused = hand_off(&store, &capture, &matchers, &events, pos, held.epoch, 1).await;
    assert!(matches!(refused, Err(Error::Fenced { .. })), "{refused:?}");
    assert!(
        jobs_named(&store, &format!("observer:big-{t}:webhook"))
            .await
            .is_empty()
    );

    let handed = hand_off(&store, &capture, &matchers, &events, pos, newer.epoch, 1)
        .await
        .unwrap();
    // Two matches of `big` with two actions each, one of `shipped` with one.
    assert_eq!((handed.events, handed.jobs), (5, 5));
    assert!(handed.condition_errors.is_empty());
    let big = jobs_named(&store, &format!("observer:big-{t}:webhook")).await;
    let ids: Vec<i64> = big
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 3], "100.00 >= 100 and 250 match, 5 does not");
    assert_eq!(
        jobs_named(&store, &format!("observer:big-{t}:slack"))
            .await
            .len(),
        2
    );
    let shipped = jobs_named(&store, &format!("observer:shipped-{t}:webhook")).await;
    assert_eq!(shipped.len(), 1);
    assert_eq!(shipped[0]["before"]["status"], "new");
    assert_eq!(shipped[0]["op"], "UPDATE");
    // The checkpoint moved with them.
    assert_eq!(capture.acquire(&client).await.unwrap().position, pos);
    // Handing the same events over again (a crash between commit and reply) adds nothing.
    let latest = capture.acquire(&client).await.unwrap();
    let again = hand_off(&store, &capture, &matchers, &events, pos, latest.epoch, 1)
        .await
        .unwrap();
    assert_eq!(again.jobs, 0);
    assert_eq!(
        jobs_named(&store, &format!("observer:big-{t}:webhook"))
            .await
            .len(),
        2
    );

    uninstall(&mut client, &schema).await.unwrap();
    client
        .batch_execute(&format!(
            "DROP TABLE {table}; DROP SCHEMA \"{jobs_schema}\" CASCADE;"
        ))
        .await
        .unwrap();
}
