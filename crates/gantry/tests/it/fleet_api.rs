//! `gantry fleet serve`: the REST API, its event stream and metrics, rollouts run (and
//! continued after a SIGKILL) by the server, and the claim that keeps a second orchestrator off.

use std::io::BufRead as _;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fleet::{Sim, fleet_with_artifact, free_port, json_of};
use crate::{gantry, temp_dir};

/// A `gantry fleet serve` child process; killed on drop.
struct Server {
    child: std::process::Child,
    api: String,
    admin: String,
    /// Its stdout lines after the listening ones.
    lines: std::sync::mpsc::Receiver<String>,
}

impl Server {
    fn start(dir: &std::path::Path, db: &str) -> Self {
        let (api_port, admin_port) = (free_port(), free_port());
        let mut child = gantry()
            .args([
                "fleet",
                "serve",
                "--db",
                db,
                "--listen",
                &format!("127.0.0.1:{api_port}"),
                "--admin",
                &format!("127.0.0.1:{admin_port}"),
                "--signing-key",
                dir.join("keys/fleet-signing.key").to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("server-{api_port}.err"))).unwrap())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let server = Self {
            child,
            api: format!("http://127.0.0.1:{api_port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            lines,
        };
        server.expect_line("fleet API listening on");
        server
    }

    fn expect_line(&self, prefix: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("no line {prefix:?}: {e}"));
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    fn sigkill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = client.request(method, &url);
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

async fn wait_rollout(
    client: &reqwest::Client,
    api: &str,
    id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, info) = call(
            client,
            reqwest::Method::GET,
            format!("{api}/v1/rollouts/{id}"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{info}");
        if done(&info) {
            return info;
        }
        assert!(Instant::now() < deadline, "stuck: {info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_manages_devices_artifacts_and_a_dynamic_rollout_with_its_event_stream() {
    use reqwest::Method;
    let dir = temp_dir("fleet-api");
    let db = fleet_with_artifact(&dir);
    let sim = Sim::start(&dir, "api", &["--devices", "21"]);
    // 20 devices now; the 21st is registered while the rollout runs.
    let csv = std::fs::read_to_string(&sim.csv).unwrap();
    let mut lines: Vec<&str> = csv.lines().collect();
    let late = lines.pop().unwrap().to_owned();
    let server = Server::start(&dir, &db);
    let api = server.api.clone();
    let client = reqwest::Client::new();

    // Devices.
    let imported = client
        .post(format!("{api}/v1/devices/import"))
        .header("content-type", "text/csv")
        .body(lines.join("\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(imported.status().as_u16(), 200);
    assert_eq!(imported.json::<Value>().await.unwrap()["imported"], 20);
    let (status, page) = call(
        &client,
        Method::GET,
        format!("{api}/v1/devices?limit=5"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 20);
    assert_eq!(page["devices"].as_array().unwrap().len(), 5);
    let first = page["devices"][0]["id"].as_str().unwrap().to_owned();
    let (status, device) = call(
        &client,
        Method::GET,
        format!("{api}/v1/devices/{first}"),
        None,
    )
    .await;
    assert_eq!((status, device["id"].as_str()), (200, Some(first.as_str())));
    let (status, missing) =
        call(&client, Method::GET, format!("{api}/v1/devices/nope"), None).await;
    assert_eq!(status, 404);
    assert_eq!(missing["error"]["type"], "not_found", "{missing}");
    let (status, taken) = call(
        &client,
        Method::POST,
        format!("{api}/v1/devices"),
        Some(json!({"id": first, "address": "127.0.0.1:1"})),
    )
    .await;
    assert_eq!(status, 409, "{taken}");
    let (status, bad) = call(
        &client,
        Method::POST,
        format!("{api}/v1/devices"),
        Some(json!({"id": "x", "address": "127.0.0.1:1", "colour": "red"})),
    )
    .await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"]["message"].as_str().unwrap().contains("colour"),
        "{bad}"
    );
    let (status, bad) = call(
        &client,
        Method::GET,
        format!("{api}/v1/devices?version=not-a-req"),
        None,
    )
    .await;
    assert_eq!(status, 400, "{bad}");
    let bad_csv = client
        .post(format!("{api}/v1/devices/import"))
        .body("id,address\nok,127.0.0.1:1\n,127.0.0.1:2\n")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_csv.status().as_u16(), 400);
    let bad_csv: Value = bad_csv.json().await.unwrap();
    assert!(
        bad_csv["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 3"),
        "{bad_csv}"
    );

    // An artifact uploaded, hashed and signed by the server.
    let bytes = vec![7u8; 10_000];
    let uploaded = client
        .post(format!("{api}/v1/artifacts?version=3.0.0"))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status().as_u16(), 201);
    let uploaded: Value = uploaded.json().await.unwrap();
    let digest: String = {
        use sha2::Digest as _;
        sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    assert_eq!(uploaded["sha256"], digest);
    assert_eq!(uploaded["size"], 10_000);
    let (status, _) = call(
        &client,
        Method::GET,
        format!("{api}/v1/artifacts/3.0.0"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &client,
        Method::GET,
        format!("{api}/v1/artifacts/9.9.9"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // A dynamic rollout, started by the server.
    let (status, bad) = call(
        &client,
        Method::POST,
        format!("{api}/v1/rollouts"),
        Some(json!({"artifact": "7.7.7"})),
    )
    .await;
    assert_eq!(status, 400, "an unknown artifact in a body: {bad}");
    let (status, created) = call(
        &client,
        Method::POST,
        format!("{api}/v1/rollouts"),
        Some(json!({
            "artifact": "2.0.0", "canary": 2, "batch": 10, "threshold_percent": 50.0,
            "concurrency": 5, "dynamic": true, "start": true
        })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["targets"], 20);
    let (status, again) = call(
        &client,
        Method::POST,
        format!("{api}/v1/rollouts/{id}/start"),
        None,
    )
    .await;
    assert_eq!(status, 409, "one orchestrator per rollout: {again}");

    // The event stream, read while the rollout runs.
    let stream = {
        let client = client.clone();
        let url = format!("{api}/v1/rollouts/{id}/events/stream");
        tokio::spawn(async move {
            let mut response = client.get(url).send().await.unwrap();
            assert_eq!(
                response.headers()["content-type"].to_str().unwrap(),
                "text/event-stream"
            );
            let mut text = String::new();
            while let Some(chunk) = response.chunk().await.unwrap() {
                text.push_str(&String::from_utf8_lossy(&chunk));
                if text.contains("event: end") {
                    break;
                }
            }
            text
        })
    };

    let waiting = wait_rollout(&client, &api, &id, |i| i["devices"]["succeeded"] == 20).await;
    assert_eq!(
        waiting["phase"], "running",
        "dynamic: waits for devices to join"
    );
    // A device registered now joins.
    let cols: Vec<&str> = late.split(',').collect();
    let (status, added) = call(
        &client,
        Method::POST,
        format!("{api}/v1/devices"),
        Some(json!({"id": cols[0], "address": cols[1]})),
    )
    .await;
    assert_eq!(status, 201, "{added}");
    let joined = wait_rollout(&client, &api, &id, |i| i["devices"]["succeeded"] == 21).await;
    assert_eq!(joined["targets"], 21);
    let (status, _) = call(
        &client,
        Method::POST,
        format!("{api}/v1/rollouts/{id}/close"),
        None,
    )
    .await;
    assert_eq!(status, 202);
    wait_rollout(&client, &api, &id, |i| i["phase"] == "completed").await;
    let text = tokio::time::timeout(Duration::from_secs(30), stream)
        .await
        .expect("the stream ends after completion")
        .unwrap();
    let (status, events) = call(
        &client,
        Method::GET,
        format!("{api}/v1/rollouts/{id}/events"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let events = events["events"].as_array().unwrap().clone();
    let streamed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    // Every entry of the trail, in order, then the end.
    assert_eq!(streamed.len(), events.len() + 1, "{text}");
    for (line, event) in streamed.iter().zip(&events) {
        assert_eq!(&serde_json::from_str::<Value>(line).unwrap(), event);
    }
    assert_eq!(streamed.last(), Some(&"completed"));
    assert!(events.iter().any(|e| e["change"]["change"] == "joined"));
    // Resuming the stream after the last id sends only the end.
    let last_id = events.last().unwrap()["seq"].as_i64().unwrap();
    let tail = client
        .get(format!("{api}/v1/rollouts/{id}/events/stream"))
        .header("last-event-id", last_id.to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!tail.contains("event: change"), "{tail}");
    assert!(tail.contains("event: end"), "{tail}");

    // Finished rollouts and unknown ones.
    let (status, done) = call(
        &client,
        Method::POST,
        format!("{api}/v1/rollouts/{id}/pause"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{done}");
    let (status, _) = call(
        &client,
        Method::GET,
        format!("{api}/v1/rollouts/r-none"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &client,
        Method::POST,
        format!("{api}/v1/rollouts/{id}/explode"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Metrics of what the server ran.
    let metrics = reqwest::get(format!("{}/metrics", server.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("gantry_fleet_pushes_total{outcome=\"delivered\"} 21"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "gantry_fleet_rollout_progress_ratio{{rollout=\"{id}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("gantry_fleet_push_seconds_count{phase=\"verify\"} 21"));
    drop(server);
    assert_eq!(sim.stop(), 21, "each device updated once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_sigkilled_mid_rollout_continues_it_and_keeps_a_second_runner_off() {
    use reqwest::Method;
    let dir = temp_dir("fleet-api-crash");
    let db = fleet_with_artifact(&dir);
    let sim = Sim::start(&dir, "slow", &["--devices", "12", "--latency", "100ms"]);
    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    sim.import_into(&db);
    let server = Server::start(&dir, &db);
    let client = reqwest::Client::new();
    let (status, created) = call(
        &client,
        Method::POST,
        format!("{}/v1/rollouts", server.api),
        Some(
            json!({"artifact": "2.0.0", "canary": 1, "batch": 11, "concurrency": 1,
                    "threshold_percent": 0.0, "start": true}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    wait_rollout(&client, &server.api, &id, |i| {
        i["devices"]["succeeded"] == 2
    })
    .await;
    // The CLI cannot run it while the server does.
    let out = run(&["fleet", "rollout", "start", "--db", &db, &id]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("being run by another orchestrator"),
        "{out:?}"
    );
    let before = json_of(&run(&[
        "fleet", "rollout", "status", "--db", &db, &id, "--json",
    ]));
    assert!(
        before["devices"]["succeeded"].as_u64().unwrap() < 12,
        "{before}"
    );
    server.sigkill();

    // A new server continues it: its claim is taken over from the dead process.
    let server = Server::start(&dir, &db);
    assert_eq!(
        server.expect_line("continuing rollout"),
        format!("continuing rollout {id}")
    );
    let done = wait_rollout(&client, &server.api, &id, |i| i["phase"] == "completed").await;
    assert_eq!(done["devices"]["succeeded"], 12, "{done}");
    drop(server);
    assert_eq!(sim.stop(), 12, "no device was pushed twice");
}
