//! A stopped node reopens its data directory: indices, settings, mappings, documents, versions.

use serde_json::{Value, json};

use crate::server::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_node_has_everything_it_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::new();
    let server = TestServer::start_in(dir.path()).await;
    let r = client
        .put(server.url("/kept"))
        .json(
            &json!({"settings": {"number_of_shards": 2, "refresh_interval": "-1"},
                      "mappings": {"properties": {"n": {"type": "integer"}}}}),
        )
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    for n in 0..20 {
        let r = client
            .put(server.url(&format!("/kept/_doc/{n}")))
            .json(&json!({"n": n, "title": format!("doc {n}")}))
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), 201);
    }
    let r = client
        .put(server.url("/kept/_doc/0"))
        .json(&json!({"n": 100}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let uuid = server.node.get("kept").expect("index").uuid.clone();
    server.stop().await;

    let server = TestServer::start_in(dir.path()).await;
    assert_eq!(server.node.get("kept").expect("reopened").uuid, uuid);
    let count: Value = client
        .get(server.url("/kept/_count"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(count["count"], 20);
    let doc: Value = client
        .get(server.url("/kept/_doc/0"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["_version"], 2);
    assert_eq!(doc["_source"], json!({"n": 100}));
    let mapping: Value = client
        .get(server.url("/kept/_mapping"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(
        mapping["kept"]["mappings"]["properties"]["n"],
        json!({"type": "integer"})
    );
    assert_eq!(
        mapping["kept"]["mappings"]["properties"]["title"]["type"], "text",
        "dynamic fields are kept"
    );
    let settings: Value = client
        .get(server.url("/kept/_settings"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(
        settings["kept"]["settings"]["index"]["number_of_shards"],
        "2"
    );
    assert_eq!(
        settings["kept"]["settings"]["index"]["refresh_interval"],
        "-1"
    );
    let hits: Value = client
        .post(server.url("/kept/_search"))
        .json(&json!({"query": {"range": {"n": {"gte": 18}}}, "sort": ["n"]}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = hits["hits"]["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .filter_map(|h| h["_id"].as_str())
        .collect();
    assert_eq!(ids, ["18", "19", "0"]);
    // A deleted index stays deleted.
    let r = client
        .delete(server.url("/kept"))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    server.stop().await;
    let server = TestServer::start_in(dir.path()).await;
    assert!(server.node.get("kept").is_none());
    server.stop().await;
}
