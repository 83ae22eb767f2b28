//! Optimistic concurrency under contention: of many writers racing on one `_seq_no`, exactly one
//! wins and the others get 409; a bulk and single writes to one document keep versions dense.

use serde_json::{Value, json};

use crate::server::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_writer_wins_a_race_on_if_seq_no() {
    let server = TestServer::start().await;
    let client = reqwest::Client::new();
    let first: Value = client
        .put(server.url("/race/_doc/x"))
        .json(&json!({"n": 0}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let seq_no = first["_seq_no"].as_u64().expect("seq_no");
    let mut tasks = Vec::new();
    for n in 1..=20 {
        let client = client.clone();
        let url = server.url(&format!(
            "/race/_doc/x?if_seq_no={seq_no}&if_primary_term=1"
        ));
        tasks.push(tokio::spawn(async move {
            client
                .put(url)
                .json(&json!({"n": n}))
                .send()
                .await
                .expect("sent")
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.expect("task"));
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        19,
        "{statuses:?}"
    );
    let doc: Value = client
        .get(server.url("/race/_doc/x"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["_version"], 2);

    // Unconditional writes from many clients: every one applies, versions count them all.
    let mut tasks = Vec::new();
    for n in 0..30 {
        let client = client.clone();
        let url = server.url("/race/_doc/y");
        tasks.push(tokio::spawn(async move {
            let r = client
                .put(url)
                .json(&json!({"n": n}))
                .send()
                .await
                .expect("sent");
            r.status().as_u16()
        }));
    }
    for t in tasks {
        let status = t.await.expect("task");
        assert!(status == 200 || status == 201, "{status}");
    }
    let doc: Value = client
        .get(server.url("/race/_doc/y"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["_version"], 30);
    server.stop().await;
}
