//! One attempt of an action against real servers on loopback: the Redis result record and the
//! circuit breaker per endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use gantry_observer::action::Attempt;
use gantry_observer::config::ObserverConfig;
use gantry_observer::metrics::ObserverMetrics;
use gantry_observer::runner::Runner;
use gantry_runtime::circuit_breaker::State;

/// An HTTP server counting requests per path: `/ok` answers 200, `/down` 503, `/slow` after
/// two seconds.
async fn server() -> (String, Arc<[AtomicUsize; 3]>) {
    let hits: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let counted = Arc::clone(&hits);
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let hits = Arc::clone(&counted);
        async move {
            match uri.path() {
                "/ok" => {
                    hits[0].fetch_add(1, Ordering::SeqCst);
                    axum::http::StatusCode::OK
                }
                "/down" => {
                    hits[1].fetch_add(1, Ordering::SeqCst);
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                }
                _ => {
                    hits[2].fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    axum::http::StatusCode::OK
                }
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr.to_string(), hits)
}

fn event(id: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!([{
        "id": id, "entity": "orders", "op": "INSERT", "before": null,
        "after": {"id": id}, "changed_at_ms": 0
    }]))
    .unwrap()
}

fn redis_url() -> String {
    std::env::var("GANTRY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[tokio::test]
async fn a_delivered_action_is_recorded_in_redis_and_not_repeated() {
    let (addr, hits) = server().await;
    let name = format!(
        "dedup-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let config = ObserverConfig::parse(
        &format!(
            "[redis]\nurl = \"{}\"\ndedup_ttl = \"60s\"\n\
             [[observers]]\nname = \"{name}\"\nentity = \"orders\"\n\
             [[observers.actions]]\ntype = \"webhook\"\nurl = \"http://{addr}/ok\"\n",
            redis_url()
        ),
        "t.toml",
    )
    .unwrap();
    let metrics = ObserverMetrics::new().unwrap();
    let runner = Runner::new(&config, metrics.clone()).unwrap();
    let job = format!("observer:{name}:webhook");
    let first = runner.run(&job, &event(7)).await;
    assert_eq!(first, Attempt::Done(serde_json::json!({"status": 200})));
    // Run again (an ack lost after delivery): the record answers, the endpoint is not called.
    let again = runner.run(&job, &event(7)).await;
    assert_eq!(
        again,
        Attempt::Done(serde_json::json!({"deduplicated": true, "result": {"status": 200}}))
    );
    assert_eq!(hits[0].load(Ordering::SeqCst), 1);
    assert_eq!(metrics.dedup.with_label_values(&["hit"]).get(), 1);
    assert_eq!(metrics.dedup.with_label_values(&["miss"]).get(), 1);
    // Another event is another record.
    runner.run(&job, &event(8)).await;
    assert_eq!(hits[0].load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_failing_endpoint_opens_its_breaker_while_others_keep_flowing() {
    let (addr, hits) = server().await;
    let (healthy, healthy_hits) = server().await;
    let config = ObserverConfig::parse(
        &format!(
            "[circuit_breaker]\nconsecutive_failures = 3\nopen_duration = \"30s\"\n\
             [[observers]]\nname = \"a\"\nentity = \"orders\"\n\
             [[observers.actions]]\ntype = \"webhook\"\nname = \"down\"\nurl = \"http://{addr}/down\"\n\
             [[observers.actions]]\ntype = \"webhook\"\nname = \"slow\"\nurl = \"http://localhost:{port}/slow\"\ntimeout = \"200ms\"\n\
             [[observers.actions]]\ntype = \"webhook\"\nname = \"ok\"\nurl = \"http://{healthy}/ok\"\n",
            port = addr.rsplit_once(':').unwrap().1
        ),
        "t.toml",
    )
    .unwrap();
    let metrics = ObserverMetrics::new().unwrap();
    let runner = Runner::new(&config, metrics.clone()).unwrap();
    // Three 503s open the breaker of 127.0.0.1:<port>; the fourth attempt fails fast.
    for i in 0..3 {
        let a = runner.run("observer:a:down", &event(i)).await;
        assert!(
            matches!(a, Attempt::Retry { ref error, .. } if error == "HTTP 503"),
            "{a:?}"
        );
    }
    let fast = runner.run("observer:a:down", &event(3)).await;
    match fast {
        Attempt::Deferred { error, after } => {
            assert!(error.contains("circuit open"), "{error}");
            assert!(after <= Duration::from_secs(30));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(hits[1].load(Ordering::SeqCst), 3);
    let endpoint = format!("http://{addr}");
    assert_eq!(
        metrics.breaker_state.with_label_values(&[&endpoint]).get(),
        2
    );
    // A slow endpoint (the same server as `localhost:<port>`: another endpoint, another
    // breaker) times out three times and opens too; then it fails fast as well.
    for i in 0..3 {
        let a = runner.run("observer:a:slow", &event(i)).await;
        assert!(
            matches!(a, Attempt::Retry { ref error, .. } if error.starts_with("timed out")),
            "{a:?}"
        );
    }
    let a = runner.run("observer:a:slow", &event(3)).await;
    assert!(
        matches!(a, Attempt::Deferred { ref error, .. } if error.contains("circuit open")),
        "{a:?}"
    );
    assert_eq!(hits[2].load(Ordering::SeqCst), 3);
    let states: std::collections::HashMap<String, State> = runner.breakers().into_iter().collect();
    assert_eq!(states[&endpoint], State::Open);
    assert_eq!(
        states[&format!("http://localhost:{}", addr.rsplit_once(':').unwrap().1)],
        State::Open
    );
    // Other endpoints keep flowing.
    for i in 0..5 {
        assert_eq!(
            runner.run("observer:a:ok", &event(i)).await,
            Attempt::Done(serde_json::json!({"status": 200}))
        );
    }
    assert_eq!(healthy_hits[0].load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn search_events_run_together_go_out_in_one_bulk_request_each_with_its_item_status() {
    // A search server whose `_bulk` refuses documents whose `data.id` is 2.
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let requests = Arc::clone(&counted);
        async move {
            requests.fetch_add(1, Ordering::SeqCst);
            let lines: Vec<serde_json::Value> = body
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).unwrap())
                .collect();
            let items: Vec<serde_json::Value> = lines
                .chunks(2)
                .map(|pair| {
                    if pair[1]["data"]["id"] == 2 {
                        serde_json::json!({"index": {"status": 400, "error": {"type": "mapper_parsing_exception", "reason": "bad"}}})
                    } else {
                        serde_json::json!({"index": {"_id": pair[0]["index"]["_id"], "status": 201, "result": "created"}})
                    }
                })
                .collect();
            axum::Json(serde_json::json!({"errors": true, "items": items}))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = ObserverConfig::parse(
        &format!(
            "[[observers]]\nname = \"s\"\nentity = \"orders\"\n\
             [[observers.actions]]\ntype = \"search\"\nurl = \"http://{addr}\"\nindex = \"orders\"\n"
        ),
        "t.toml",
    )
    .unwrap();
    let runner = Runner::new(&config, ObserverMetrics::new().unwrap()).unwrap();
    assert!(runner.batches("observer:s:search"));
    let (a, b, c) = (event(1), event(2), event(3));
    let attempts = runner
        .run_many("observer:s:search", &[&a, b"not an event", &b, &c])
        .await;
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    assert!(matches!(attempts[0], Attempt::Done(_)), "{attempts:?}");
    assert!(matches!(attempts[1], Attempt::GiveUp(_)), "{attempts:?}");
    assert!(
        matches!(&attempts[2], Attempt::GiveUp(e) if e.contains("mapper_parsing_exception")),
        "{attempts:?}"
    );
    assert!(matches!(attempts[3], Attempt::Done(_)), "{attempts:?}");
}
