//! The admin server on a real loopback port, driven over HTTP.

use gantry_runtime::admin::{self, AdminState, Readiness};
use gantry_runtime::telemetry::{BuildInfo, Metrics};
use tokio_util::sync::CancellationToken;

struct Admin {
    base: String,
    readiness: Readiness,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start() -> Admin {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let readiness = Readiness::default();
    let metrics = Metrics::new(BuildInfo {
        version: "9.9.9",
        commit: "cafe",
    })
    .unwrap();
    let stop = CancellationToken::new();
    let state = AdminState {
        metrics,
        readiness: readiness.clone(),
    };
    let task = tokio::spawn(admin::serve(listener, state, stop.clone()));
    Admin {
        base,
        readiness,
        stop,
        task,
    }
}

async fn get(url: String) -> (u16, String) {
    let resp = reqwest::get(url).await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn health_is_always_ok() {
    let admin = start().await;
    admin.readiness.register("jobs");
    let (status, body) = get(format!("{}/health", admin.base)).await;
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"status":"ok"}"#);
}

#[tokio::test]
async fn ready_is_503_until_every_subsystem_is_ready() {
    let admin = start().await;
    let jobs = admin.readiness.register("jobs");
    let search = admin.readiness.register("search");

    let (status, body) = get(format!("{}/ready", admin.base)).await;
    assert_eq!(status, 503);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["ready"], false);
    assert_eq!(report["subsystems"]["jobs"]["ready"], false);
    assert_eq!(report["subsystems"]["jobs"]["reason"], "starting");

    jobs.set_ready();
    let (status, body) = get(format!("{}/ready", admin.base)).await;
    assert_eq!(status, 503);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["subsystems"]["jobs"]["ready"], true);
    assert!(report["subsystems"]["jobs"].get("reason").is_none());
    assert_eq!(report["subsystems"]["search"]["ready"], false);

    search.set_ready();
    let (status, body) = get(format!("{}/ready", admin.base)).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        r#"{"ready":true,"subsystems":{"jobs":{"ready":true},"search":{"ready":true}}}"#
    );

    search.set_not_ready("draining");
    let (status, body) = get(format!("{}/ready", admin.base)).await;
    assert_eq!(status, 503);
    assert!(
        body.contains(r#""search":{"ready":false,"reason":"draining"}"#),
        "{body}"
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_process_metrics() {
    let admin = start().await;
    let resp = reqwest::get(format!("{}/metrics", admin.base))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let body = resp.text().await.unwrap();
    assert!(body.contains("# TYPE process_resident_memory_bytes gauge"));
    assert!(body.contains("# TYPE process_cpu_seconds_total counter"));
    assert!(body.contains("# TYPE process_open_fds gauge"));
    assert!(body.contains("# TYPE process_start_time_seconds gauge"));
    assert!(body.contains(r#"gantry_build_info{commit="cafe",version="9.9.9"} 1"#));
    // Every sample line is `name{labels} value` with a numeric value.
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line `{line}`");
    }
}

#[tokio::test]
async fn unknown_paths_are_404() {
    let admin = start().await;
    let (status, _) = get(format!("{}/nope", admin.base)).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn stops_when_cancelled() {
    let admin = start().await;
    admin.stop.cancel();
    admin.task.await.unwrap().unwrap();
}
