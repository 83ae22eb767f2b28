//! `gantry observer run` end to end: row changes in the real PostgreSQL become webhook, Slack,
//! email (a real SMTP conversation), search `_bulk` and Redis actions against servers on
//! loopback; failures retry or land in the dead-letter queue, which `gantry observer dlq` works.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::jobs::database_url;
use crate::observer::{Listener, exec, observer, sql};
use crate::temp_dir;

fn redis_url() -> String {
    std::env::var("GANTRY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    status: u16,
    at: Instant,
}

/// An HTTP server on loopback standing for the webhook endpoint, Slack and a search server
/// (`_bulk`, `_cat/indices`). `/hook` answers `hook_status`, after `fail_first` answers of
/// 503 with `Retry-After: 1`.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    hook_status: Arc<AtomicU16>,
    fail_first: Arc<AtomicU32>,
}

impl Receiver {
    async fn start() -> (SocketAddr, Self) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let this = Self::default();
        this.hook_status.store(200, Ordering::SeqCst);
        let app = axum::Router::new()
            .fallback(handle)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(this.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, this)
    }

    fn on(&self, path: &str) -> Vec<Got> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.path == path)
            .cloned()
            .collect()
    }

    async fn wait(&self, path: &str, n: usize) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.on(path);
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "{} of {n} on {path}", got.len());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

async fn handle(
    axum::extract::State(r): axum::extract::State<Receiver>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = uri.path().to_owned();
    let (status, answer, extra): (u16, String, Option<(&str, &str)>) = if path == "/_bulk" {
        // One item per action line (every other line; the others are documents).
        let items: Vec<Value> = body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .step_by(2)
            .map(|l| {
                let action: Value = serde_json::from_slice(l).unwrap();
                json!({"index": {
                    "_index": action["index"]["_index"], "_id": action["index"]["_id"],
                    "status": 201, "result": "created"}})
            })
            .collect();
        (
            200,
            json!({"took": 1, "errors": false, "items": items}).to_string(),
            None,
        )
    } else if path.starts_with("/_cat/indices") {
        (200, "[]".into(), None)
    } else if path == "/hook"
        && r.fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        (503, "busy".into(), Some(("retry-after", "1")))
    } else if path == "/hook" {
        (r.hook_status.load(Ordering::SeqCst), "ok".into(), None)
    } else {
        (200, "ok".into(), None)
    };
    r.got.lock().unwrap().push(Got {
        path,
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        body: body.to_vec(),
        status,
        at: Instant::now(),
    });
    let mut response = (axum::http::StatusCode::from_u16(status).unwrap(), answer).into_response();
    if let Some((k, v)) = extra {
        response.headers_mut().insert(k, v.parse().unwrap());
    }
    response
}

/// A mail received by the SMTP sink.
#[derive(Debug, Clone)]
struct Mail {
    to: Vec<String>,
    data: String,
}

/// A minimal SMTP server on loopback: it takes every message and keeps it.
async fn smtp_sink() -> (SocketAddr, Arc<Mutex<Vec<Mail>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mails = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&mails);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let mails = Arc::clone(&kept);
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 sink ESMTP\r\n").await.unwrap();
                let mut to = Vec::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" => b"250-sink\r\n250 8BITMIME\r\n",
                        "RCPT" => {
                            let addr = line[line.find('<').unwrap() + 1..line.find('>').unwrap()]
                                .to_owned();
                            to.push(addr);
                            b"250 ok\r\n"
                        }
                        "DATA" => {
                            write.write_all(b"354 go on\r\n").await.unwrap();
                            let mut data = String::new();
                            while let Ok(Some(l)) = lines.next_line().await {
                                if l == "." {
                                    break;
                                }
                                data.push_str(&l);
                                data.push('\n');
                            }
                            mails.lock().unwrap().push(Mail {
                                to: std::mem::take(&mut to),
                                data,
                            });
                            b"250 queued\r\n"
                        }
                        "QUIT" => {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => b"250 ok\r\n",
                    };
                    write.write_all(reply).await.unwrap();
                }
            });
        }
    });
    (addr, mails)
}

/// A watched `orders` table, the observer's schema and the jobs schema, all the test's own.
struct Shop {
    schema: String,
    jobs_schema: String,
    table: String,
    config: std::path::PathBuf,
}

impl Shop {
    async fn new(label: &str, observers: impl Fn(&str) -> String) -> Self {
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let table = format!("obs_{label}_orders_{tag}");
        exec(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, email text, total numeric)"
        ))
        .await;
        let config = temp_dir(&format!("observer-{label}")).join("observers.toml");
        std::fs::write(&config, observers(&table)).unwrap();
        let shop = Self {
            schema: format!("gantry_obs_{label}_{tag}"),
            jobs_schema: format!("gantry_jobs_{label}_{tag}"),
            table,
            config,
        };
        let out = observer(&[
            "install",
            "--database",
            &database_url(),
            "--config",
            shop.config.to_str().unwrap(),
            "--schema",
            &shop.schema,
        ]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        shop
    }

    /// A listener on this shop, with `extra` flags; not waited for.
    fn start(&self, extra: &[&str]) -> Listener {
        let url = database_url();
        let mut args = vec![
            "--database",
            &url,
            "--config",
            self.config.to_str().unwrap(),
            "--schema",
            &self.schema,
            "--jobs-schema",
            &self.jobs_schema,
            "--poll",
            "50ms",
        ];
        args.extend_from_slice(extra);
        Listener::start(&args)
    }

    /// A listener that leads.
    fn listen(&self) -> Listener {
        let listener = self.start(&[]);
        listener.wait_for("leader of observer set main");
        listener
    }

    fn dlq(&self, args: &[&str]) -> (Option<i32>, Value, String) {
        let url = database_url();
        let mut all = vec![
            "dlq",
            "--database",
            &url,
            "--jobs-schema",
            &self.jobs_schema,
            "--json",
        ];
        all.extend_from_slice(args);
        let out = observer(&all);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        (
            out.status.code(),
            value,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// (name, status, attempt) of every action job.
    async fn jobs(&self) -> Vec<(String, String, i32)> {
        sql(&format!(
            "SELECT name, CASE status WHEN 1 THEN 'PENDING' WHEN 2 THEN 'RUNNING' \
             WHEN 3 THEN 'SUCCESS' WHEN 5 THEN 'DEAD' ELSE 'CANCELLED' END, attempt::int4 \
             FROM \"{}\".jobs ORDER BY name",
            self.jobs_schema
        ))
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    }

    async fn drop(self) {
        let out = observer(&[
            "uninstall",
            "--database",
            &database_url(),
            "--schema",
            &self.schema,
        ]);
        assert_eq!(out.status.code(), Some(0));
        exec(&format!(
            "DROP TABLE {}; DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.table, self.jobs_schema
        ))
        .await;
    }
}

fn stop(listener: Listener) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(listener.child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut listener = listener;
    assert!(listener.child.wait().unwrap().success());
}

#[tokio::test]
async fn an_order_gives_one_webhook_one_slack_one_email_one_search_document_and_a_cache_delete() {
    let (http, receiver) = Receiver::start().await;
    let (smtp, mails) = smtp_sink().await;
    let redis_url = redis_url();
    let cache_tag = uuid::Uuid::now_v7().simple().to_string();
    let shop = Shop::new("e2e", |table| {
        format!(
            r#"
[redis]
url = "{redis_url}"

[[observers]]
name = "order-created"
entity = "{table}"
events = ["INSERT"]
condition = "data.total >= 100"

[[observers.actions]]
type = "webhook"
url = "http://{http}/hook"
secret = "s3cret"
headers = {{ "X-Order" = "{{{{ data.id }}}}" }}
body = '{{"order": {{{{ data.id }}}}, "email": {{{{ data.email | tojson }}}}}}'

[[observers.actions]]
type = "slack"
url = "http://{http}/slack"
text = "New order {{{{ data.id }}}} from {{{{ data.email }}}}"

[[observers.actions]]
type = "email"
smtp = "smtp://{smtp}"
from = "shop@example.com"
to = ["{{{{ data.email }}}}"]
subject = "Order {{{{ data.id }}}}"
body = "Thanks for order {{{{ data.id }}}} ({{{{ data.total }}}})."

[[observers.actions]]
type = "search"
url = "http://{http}"
index = "orders"

[[observers.actions]]
type = "cache"
keys = ["order:{cache_tag}:{{{{ data.id }}}}"]

[[observers]]
name = "order-shipped"
entity = "{table}"
events = ["UPDATE"]
condition = "changed_to('status', 'shipped')"
actions = [{{ type = "slack", url = "http://{http}/slack", text = "shipped" }}]
"#
        )
    })
    .await;
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("order:{cache_tag}:1");
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("cached")
        .query_async(&mut redis)
        .await
        .unwrap();

    let listener = shop.listen();
    exec(&format!(
        "INSERT INTO {} VALUES (1, 'ann@example.com', 100.00), (2, 'bob@example.com', 5)",
        shop.table
    ))
    .await;

    let hook = receiver.wait("/hook", 1).await;
    let slack = receiver.wait("/slack", 1).await;
    let bulk = receiver.wait("/_bulk", 1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while mails.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no mail");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    loop {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        if exists == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "cache key not deleted");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // The webhook: the rendered body, signed over timestamp + body, with its idempotency key.
    let h = &hook[0];
    let body: Value = serde_json::from_slice(&h.body).unwrap();
    assert_eq!(body, json!({"order": 1, "email": "ann@example.com"}));
    assert_eq!(h.headers["x-order"], "1");
    assert_eq!(h.headers["content-type"], "application/json");
    let event_id = h.headers["x-gantry-event-id"].clone();
    // The event key is `<transaction id>-<change-log id>`: unique for good, even across a
    // reinstall that restarts the change-log ids.
    let key = h.headers["idempotency-key"].clone();
    let event_key = key
        .strip_suffix(":order-created:webhook")
        .unwrap_or_else(|| panic!("{key}"));
    let (xid, id) = event_key.split_once('-').unwrap();
    assert!(xid.parse::<u64>().unwrap() > 0);
    assert_eq!(id, event_id);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(format!("{}.", h.headers["x-gantry-timestamp"]).as_bytes());
    mac.update(&h.body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(h.headers["x-gantry-signature"], format!("v1={expected}"));
    // Slack, email, search.
    let text: Value = serde_json::from_slice(&slack[0].body).unwrap();
    assert_eq!(text, json!({"text": "New order 1 from ann@example.com"}));
    let mail = mails.lock().unwrap()[0].clone();
    assert_eq!(mail.to, vec!["ann@example.com"]);
    assert!(mail.data.contains("Subject: Order 1"), "{}", mail.data);
    // Numbers reach templates as JSON numbers (f64): numeric 100.00 renders as 100.0.
    assert!(
        mail.data.contains("Thanks for order 1 (100.0)."),
        "{}",
        mail.data
    );
    let lines: Vec<Value> = bulk[0]
        .body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["index"]["_id"], event_key);
    assert!(
        lines[0]["index"]["_index"]
            .as_str()
            .unwrap()
            .starts_with("orders-20"),
        "{lines:?}"
    );
    assert_eq!(lines[1]["data"]["email"], "ann@example.com");
    assert_eq!(lines[1]["op"], "INSERT");
    assert_eq!(bulk[0].headers["content-type"], "application/x-ndjson");

    // Every action is one job, done; the small order matched nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = shop.jobs().await;
        if jobs.iter().all(|(_, status, _)| status == "SUCCESS") {
            let names: Vec<&str> = jobs.iter().map(|(n, _, _)| n.as_str()).collect();
            assert_eq!(
                names,
                [
                    "observer:order-created:cache",
                    "observer:order-created:email",
                    "observer:order-created:search",
                    "observer:order-created:slack",
                    "observer:order-created:webhook",
                ]
            );
            break;
        }
        assert!(Instant::now() < deadline, "{jobs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // debug-event tells which observers matched and what became of each action.
    let url = database_url();
    let debug = |id: &str| {
        let out = observer(&[
            "debug-event",
            id,
            "--database",
            &url,
            "--config",
            shop.config.to_str().unwrap(),
            "--schema",
            &shop.schema,
            "--jobs-schema",
            &shop.jobs_schema,
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let report = debug(&event_id);
    assert_eq!(report["event"]["key"], event_key);
    assert_eq!(report["observers"][0]["matched"], true);
    let actions = report["observers"][0]["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 5);
    for a in actions {
        assert_eq!(a["job"]["status"], "success", "{a}");
        assert_eq!(a["job"]["attempts"], 1, "{a}");
    }
    assert_eq!(actions[0]["job"]["result"], json!({"status": 200}));
    assert_eq!(report["observers"][1]["matched"], false);
    assert_eq!(
        report["observers"][1]["why"],
        "not matched: it reacts to UPDATE only"
    );
    let small = sql(&format!(
        "SELECT id FROM \"{}\".changes WHERE after->>'id' = '2'",
        shop.schema
    ))
    .await[0]
        .get::<_, i64>(0);
    let report = debug(&small.to_string());
    assert_eq!(
        report["observers"][0]["why"],
        "not matched: the condition is false"
    );
    let out = observer(&[
        "debug-event",
        "999999999",
        "--database",
        &url,
        "--config",
        shop.config.to_str().unwrap(),
        "--schema",
        &shop.schema,
    ]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");

    // A restart re-processes nothing.
    stop(listener);
    let listener = shop.listen();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.on("/hook").len(), 1);
    assert_eq!(receiver.on("/slack").len(), 1);
    assert_eq!(receiver.on("/_bulk").len(), 1);
    assert_eq!(mails.lock().unwrap().len(), 1);
    assert_eq!(shop.jobs().await.len(), 5);
    stop(listener);
    shop.drop().await;
}

#[tokio::test]
async fn a_refused_webhook_lands_in_the_dlq_and_dlq_retry_delivers_it() {
    let (http, receiver) = Receiver::start().await;
    receiver.hook_status.store(422, Ordering::SeqCst);
    let shop = Shop::new("dlq", |table| {
        format!(
            "[[observers]]\nname = \"paid\"\nentity = \"{table}\"\n\
             retry = {{ max_attempts = 5, initial_delay = \"50ms\" }}\n\
             [[observers.actions]]\ntype = \"webhook\"\nurl = \"http://{http}/hook\"\n"
        )
    })
    .await;
    let listener = shop.listen();
    exec(&format!(
        "INSERT INTO {} VALUES (1, 'ann@example.com', 10), (2, 'bob@example.com', 20)",
        shop.table
    ))
    .await;
    // A 4xx is not retried: straight to the dead-letter queue, one attempt each.
    let deadline = Instant::now() + Duration::from_secs(30);
    let items = loop {
        let (code, list, err) = shop.dlq(&["list"]);
        assert_eq!(code, Some(0), "{err}");
        if list["total"] == 2 {
            break list["items"].as_array().unwrap().clone();
        }
        assert!(Instant::now() < deadline, "{list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(receiver.on("/hook").len(), 2);
    for item in &items {
        assert_eq!(item["observer"], "paid");
        assert_eq!(item["action"], "webhook");
        assert_eq!(item["attempts"], 1);
        assert_eq!(item["error"], "HTTP 422");
    }
    // `status` counts the action jobs by status.
    let url = database_url();
    let out = observer(&[
        "status",
        "--database",
        &url,
        "--schema",
        &shop.schema,
        "--jobs-schema",
        &shop.jobs_schema,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status["actions"],
        json!([{"job": "observer:paid:webhook", "pending": 0, "running": 0, "succeeded": 0, "dead": 2}])
    );
    let (code, stats, _) = shop.dlq(&["stats"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        stats,
        json!({"total": 2, "by_action": [{"observer": "paid", "action": "webhook", "count": 2}]})
    );
    let first = items[0]["id"].as_str().unwrap().to_owned();
    let second = items[1]["id"].as_str().unwrap().to_owned();
    let (code, shown, _) = shop.dlq(&["show", &first]);
    assert_eq!(code, Some(0));
    assert_eq!(shown["event"]["op"], "INSERT");
    assert!(shown["event"]["after"]["email"].is_string(), "{shown}");

    // The endpoint is fixed; one item is retried and delivered, the other removed.
    receiver.hook_status.store(200, Ordering::SeqCst);
    let (code, retried, err) = shop.dlq(&["retry", &first]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(retried, json!({"retried": [first]}));
    let hooks = receiver.wait("/hook", 3).await;
    assert_eq!(hooks[2].status, 200);
    let (code, removed, _) = shop.dlq(&["remove", &second]);
    assert_eq!(code, Some(0));
    assert_eq!(removed, json!({"removed": second}));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, list, _) = shop.dlq(&["list"]);
        let jobs = shop.jobs().await;
        if list["total"] == 0 && jobs.len() == 1 && jobs[0].1 == "SUCCESS" {
            break;
        }
        assert!(Instant::now() < deadline, "{list} {jobs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What is not there, or not dead, is said so with its exit code.
    let (code, _, err) = shop.dlq(&["retry", &first]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("not in the dead-letter queue"), "{err}");
    let (code, _, err) = shop.dlq(&["show", &second]);
    assert_eq!(code, Some(5), "{err}");
    stop(listener);
    shop.drop().await;
}

#[tokio::test]
async fn a_busy_endpoint_is_retried_no_sooner_than_its_retry_after() {
    let (http, receiver) = Receiver::start().await;
    receiver.fail_first.store(2, Ordering::SeqCst);
    let shop = Shop::new("busy", |table| {
        format!(
            "[[observers]]\nname = \"any\"\nentity = \"{table}\"\n\
             retry = {{ max_attempts = 4, initial_delay = \"50ms\", max_delay = \"100ms\" }}\n\
             [[observers.actions]]\ntype = \"webhook\"\nurl = \"http://{http}/hook\"\n"
        )
    })
    .await;
    let listener = shop.listen();
    exec(&format!(
        "INSERT INTO {} VALUES (1, 'a@b.c', 1)",
        shop.table
    ))
    .await;
    let hooks = receiver.wait("/hook", 3).await;
    let statuses: Vec<u16> = hooks.iter().map(|g| g.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
    // The backoff alone would retry after 50-100 ms; the server asked for 1 s.
    for pair in hooks.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    }
    // Every attempt carried the same idempotency key.
    let keys: std::collections::HashSet<&String> = hooks
        .iter()
        .map(|g| &g.headers["idempotency-key"])
        .collect();
    assert_eq!(keys.len(), 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = shop.jobs().await;
        if jobs == [("observer:any:webhook".to_owned(), "SUCCESS".to_owned(), 3)] {
            break;
        }
        assert!(Instant::now() < deadline, "{jobs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(listener);
    shop.drop().await;
}

#[tokio::test]
async fn two_thousand_events_across_a_leader_sigkill_each_arrive_with_one_idempotency_key() {
    let (http, receiver) = Receiver::start().await;
    let shop = Shop::new("failover", |table| {
        // A short timeout: the attempts the killed process held come back after their lease
        // (timeout + 5 s grace).
        format!(
            "[[observers]]\nname = \"big\"\nentity = \"{table}\"\nevents = [\"INSERT\"]\n\
             condition = \"data.total >= 100\"\ntimeout = \"2s\"\n\
             retry = {{ max_attempts = 10, initial_delay = \"100ms\", max_delay = \"1s\" }}\n\
             [[observers.actions]]\ntype = \"webhook\"\nurl = \"http://{http}/hook\"\n"
        )
    })
    .await;
    let mut a = shop.listen();
    let b = shop.start(&[]);
    b.wait_for("standby for observer set main");
    // 40 transactions of 50 orders, plus one small order each that matches nothing.
    let insert = |from: i64| {
        let table = shop.table.clone();
        async move {
            let mut rows: Vec<String> = (from..from + 50)
                .map(|i| format!("({i}, 'x@example.com', 100.00)"))
                .collect();
            rows.push(format!("({}, 'small@example.com', 5)", 1_000_000 + from));
            exec(&format!("INSERT INTO {table} VALUES {}", rows.join(", "))).await;
        }
    };
    for t in 0..20 {
        insert(t * 50).await;
    }
    receiver.wait("/hook", 200).await;
    // The leader dies mid-run, with deliveries in flight.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    for t in 20..40 {
        insert(t * 50).await;
    }
    b.wait_for("leader of observer set main (epoch 2)");
    let deadline = Instant::now() + Duration::from_secs(60);
    let keys = loop {
        let keys: std::collections::HashSet<String> = receiver
            .on("/hook")
            .iter()
            .map(|g| g.headers["idempotency-key"].clone())
            .collect();
        if keys.len() >= 2000 {
            break keys;
        }
        assert!(Instant::now() < deadline, "{} of 2000 events", keys.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Every order arrived; the small ones never did.
    let mut orders: Vec<i64> = receiver
        .on("/hook")
        .iter()
        .map(|g| {
            let body: Value = serde_json::from_slice(&g.body).unwrap();
            body["data"]["id"].as_i64().unwrap()
        })
        .collect();
    orders.sort_unstable();
    orders.dedup();
    assert_eq!(orders, (0..2000).collect::<Vec<i64>>());
    assert_eq!(keys.len(), 2000);
    // A repeat is the at-least-once window (an attempt of the killed process that delivered
    // before its ack was written): it carries the key of its event, so it is in `keys` already.
    let raw = receiver.on("/hook").len();
    println!("{raw} deliveries for 2000 events");
    let jobs = shop.jobs().await;
    assert_eq!(jobs.len(), 2000, "one job per event");
    stop(b);
    shop.drop().await;
}

/// A redis-server of the test's own, on a free port, that the test can stop and restart.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    fn start(port: u16, dir: std::path::PathBuf) -> Self {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian: apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port, dir }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn scrape(admin: &str, metric: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(metric)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test]
async fn with_redis_stopped_mid_run_actions_keep_flowing_and_redis_is_used_again_when_back() {
    let (http, receiver) = Receiver::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis_server = PrivateRedis::start(port, temp_dir("observer-redis"));
    let shop = Shop::new("redis", |table| {
        format!(
            "[redis]\nurl = \"redis://127.0.0.1:{port}\"\n\
             [[observers]]\nname = \"any\"\nentity = \"{table}\"\n\
             retry = {{ max_attempts = 5, initial_delay = \"50ms\" }}\n\
             [[observers.actions]]\ntype = \"webhook\"\nurl = \"http://{http}/hook\"\n"
        )
    })
    .await;
    let listener = shop.start(&["--admin", "127.0.0.1:0"]);
    let admin = listener
        .wait_for("admin listening on ")
        .trim_start_matches("admin listening on ")
        .to_owned();
    listener.wait_for("leader of observer set main");
    assert_eq!(scrape(&admin, "gantry_observer_leader").await, 1.0);
    let out = observer(&["metrics", "--admin", &admin, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["gantry_observer_leader"], 1.0);
    let out = observer(&["metrics", "--admin", "127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let insert = |from: i64, n: i64| {
        let table = shop.table.clone();
        async move {
            let rows: Vec<String> = (from..from + n)
                .map(|i| format!("({i}, 'x@example.com', 1)"))
                .collect();
            exec(&format!("INSERT INTO {table} VALUES {}", rows.join(", "))).await;
        }
    };
    let recorded = || async move {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("gantry:observer:done:observer:any:webhook:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.len()
    };

    insert(0, 10).await;
    receiver.wait("/hook", 10).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while recorded().await < 10 {
        assert!(Instant::now() < deadline, "results not recorded in Redis");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        scrape(&admin, "gantry_observer_dedup_total{result=\"miss\"}").await,
        10.0
    );
    assert_eq!(scrape(&admin, "gantry_observer_redis_up").await, 1.0);

    // Redis goes away: actions keep flowing, without the record.
    redis_server.kill();
    insert(10, 10).await;
    receiver.wait("/hook", 20).await;
    assert_eq!(scrape(&admin, "gantry_observer_redis_up").await, 0.0);

    // Redis comes back: it is used again.
    let dir = redis_server.dir.clone();
    let redis_server = PrivateRedis::start(redis_server.port, dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = 20;
    loop {
        insert(next, 1).await;
        next += 1;
        receiver.wait("/hook", usize::try_from(next).unwrap()).await;
        if recorded().await > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "Redis not used again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(scrape(&admin, "gantry_observer_redis_up").await, 1.0);
    // The outage and the return were each logged once.
    let log = listener.log();
    assert_eq!(
        log.matches("Redis is down; going on without it").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("Redis answers again").count(), 1, "{log}");
    // Every event was delivered exactly once through all of it.
    let keys: std::collections::HashSet<String> = receiver
        .on("/hook")
        .iter()
        .map(|g| g.headers["idempotency-key"].clone())
        .collect();
    assert_eq!(keys.len(), receiver.on("/hook").len());
    assert!(scrape(&admin, "gantry_observer_actions_total{action=\"webhook\",observer=\"any\",outcome=\"delivered\"}").await >= 21.0);
    drop(redis_server);
    stop(listener);
    shop.drop().await;
}

#[tokio::test]
async fn a_100_kb_and_a_100_mb_event_are_delivered_whole() {
    let (http, receiver) = Receiver::start().await;
    let shop = Shop::new("big", |table| {
        format!(
            "[[observers]]\nname = \"any\"\nentity = \"{table}\"\ntimeout = \"60s\"\n\
             [[observers.actions]]\ntype = \"webhook\"\nurl = \"http://{http}/hook\"\n"
        )
    })
    .await;
    let listener = shop.listen();
    for (id, size) in [(1, 100 * 1024), (2, 100 * 1024 * 1024)] {
        // The `email` column carries the payload.
        exec(&format!(
            "INSERT INTO {} VALUES ({id}, repeat('x', {size}), 1)",
            shop.table
        ))
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let hooks = loop {
        let hooks = receiver.on("/hook");
        if hooks.len() >= 2 {
            break hooks;
        }
        assert!(Instant::now() < deadline, "{} of 2 events", hooks.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut sizes: Vec<usize> = hooks
        .iter()
        .map(|g| {
            let body: Value = serde_json::from_slice(&g.body).unwrap();
            body["data"]["email"].as_str().unwrap().len()
        })
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [100 * 1024, 100 * 1024 * 1024]);
    stop(listener);
    shop.drop().await;
}

#[tokio::test]
async fn search_down_then_back_catches_up_on_everything_it_missed() {
    // A port with nothing on it yet: the search server is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let shop = Shop::new("search", |table| {
        format!(
            "[circuit_breaker]\nconsecutive_failures = 3\nopen_duration = \"1s\"\n\
             [[observers]]\nname = \"idx\"\nentity = \"{table}\"\n\
             retry = {{ max_attempts = 4, initial_delay = \"100ms\", max_delay = \"300ms\" }}\n\
             [[observers.actions]]\ntype = \"search\"\nurl = \"http://127.0.0.1:{port}\"\n\
             index = \"orders\"\nrollover = \"none\"\n"
        )
    })
    .await;
    let listener = shop.listen();
    exec(&format!(
        "INSERT INTO {} SELECT g, 'x@example.com', g FROM generate_series(1, 20) g",
        shop.table
    ))
    .await;
    // The attempts fail while it is down, and wait in backoff.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = shop.jobs().await;
        // Three failures open the breaker; from then on the attempts are deferred without
        // counting (failed probes too), so 4 attempts are enough to outlast any outage.
        assert!(
            jobs.iter().all(|(_, status, _)| status != "DEAD"),
            "{jobs:?}"
        );
        if jobs.len() == 20 && jobs.iter().map(|(_, _, a)| *a).max() >= Some(8) {
            break;
        }
        assert!(Instant::now() < deadline, "{jobs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // `status` shows the endpoint's breaker, as the running process reported it.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let url = database_url();
        let out = observer(&[
            "status",
            "--database",
            &url,
            "--schema",
            &shop.schema,
            "--jobs-schema",
            &shop.jobs_schema,
            "--json",
        ]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let endpoint = format!("http://127.0.0.1:{port}");
        if v["breakers"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["endpoint"] == endpoint.as_str()))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // It comes back on the same address: every document arrives, once.
    let std_listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let receiver = Receiver::default();
    receiver.hook_status.store(200, Ordering::SeqCst);
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(receiver.clone());
    let tokio_listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    tokio::spawn(async move { axum::serve(tokio_listener, app).await });
    // Jobs that come due together go out together, as one `_bulk` request.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !shop.jobs().await.iter().all(|(_, s, _)| s == "SUCCESS") {
        assert!(Instant::now() < deadline, "{:?}", shop.jobs().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ids: Vec<String> = Vec::new();
    for g in receiver.on("/_bulk") {
        let lines: Vec<Value> = g
            .body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        for pair in lines.chunks(2) {
            assert_eq!(pair[0]["index"]["_index"], "orders");
            assert_eq!(pair[1]["op"], "INSERT");
            ids.push(pair[0]["index"]["_id"].as_str().unwrap().to_owned());
        }
    }
    let indexed = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!((ids.len(), indexed), (20, 20), "every document once");
    stop(listener);
    shop.drop().await;
}
