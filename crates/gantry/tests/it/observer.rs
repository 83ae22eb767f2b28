//! `gantry observer install|uninstall` against the real PostgreSQL.

use serde_json::Value;
use tokio_postgres::NoTls;

use crate::jobs::database_url;
use crate::{gantry, temp_dir};

pub async fn sql(query: &str) -> Vec<tokio_postgres::Row> {
    let (client, connection) = tokio_postgres::connect(&database_url(), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.unwrap();
    client.query(query, &[]).await.unwrap()
}

pub async fn exec(query: &str) {
    let (client, connection) = tokio_postgres::connect(&database_url(), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.batch_execute(query).await.unwrap();
}

pub fn observer(args: &[&str]) -> std::process::Output {
    gantry().arg("observer").args(args).output().unwrap()
}

#[tokio::test]
async fn install_captures_changes_and_uninstall_removes_everything() {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let schema = format!("gantry_obs_it_{tag}");
    let table = format!("obs_it_orders_{tag}");
    exec(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, status text)"
    ))
    .await;
    let dir = temp_dir("observer");
    let config = dir.join("observers.toml");
    std::fs::write(
        &config,
        format!("[[observers]]\nname = \"orders\"\nentity = \"{table}\"\nevents = [\"INSERT\"]\n"),
    )
    .unwrap();
    let url = database_url();
    let args = [
        "install",
        "--database",
        &url,
        "--config",
        config.to_str().unwrap(),
        "--schema",
        &schema,
        "--json",
    ];
    let out = observer(&args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let first: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(first["watched"], serde_json::json!([table]));
    assert_eq!(first["migrations_applied"], 2);
    // Again: nothing to migrate, same triggers.
    let out = observer(&args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["migrations_applied"], 0);

    exec(&format!("INSERT INTO {table} VALUES (1, 'new')")).await;
    let rows = sql(&format!(
        "SELECT entity, op, after->>'status' FROM {schema}.changes"
    ))
    .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), table);
    assert_eq!(rows[0].get::<_, String>(1), "INSERT");
    assert_eq!(rows[0].get::<_, String>(2), "new");

    let out = observer(&["status", "--database", &url, "--schema", &schema, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["changes"], 1);
    assert_eq!(st["watched"], serde_json::json!([table]));
    assert_eq!(st["observer_sets"], serde_json::json!([]));

    let out = observer(&["uninstall", "--database", &url, "--schema", &schema]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed schema"));
    let out = observer(&["status", "--database", &url, "--schema", &schema]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not installed"));
    let left = sql(&format!(
        "SELECT 1 FROM pg_namespace WHERE nspname = '{schema}'
         UNION ALL SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relname = '{table}'"
    ))
    .await;
    assert!(left.is_empty(), "schema or triggers left behind");
    // The table works without the observer.
    exec(&format!(
        "INSERT INTO {table} VALUES (2, 'new'); DROP TABLE {table}"
    ))
    .await;
    let out = observer(&[
        "uninstall",
        "--database",
        &url,
        "--schema",
        &schema,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["removed"], false);
}

#[test]
fn install_errors_have_their_exit_codes() {
    let dir = temp_dir("observer-bad");
    let url = database_url();
    // 2: the config does not parse; the message names the file, line and key.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[observers]]\nname = \"a\"\nentity = \"t\"\nevnts = []\n",
    )
    .unwrap();
    let out = observer(&[
        "install",
        "--database",
        &url,
        "--config",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:4:1: unknown field `evnts`"),
        "{stderr}"
    );
    // 4: the config names a table the database does not have.
    let missing = dir.join("missing.toml");
    std::fs::write(
        &missing,
        "[[observers]]\nname = \"a\"\nentity = \"no_such_table_for_gantry\"\n",
    )
    .unwrap();
    let out = observer(&[
        "install",
        "--database",
        &url,
        "--config",
        missing.to_str().unwrap(),
        "--schema",
        "gantry_obs_it_never",
    ]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_table_for_gantry"));
    // 3: nothing listens there.
    let out = observer(&[
        "install",
        "--database",
        "postgres://postgres@127.0.0.1:1/test",
        "--config",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
}

#[test]
fn validate_config_checks_conditions_without_a_database() {
    let dir = temp_dir("observer-validate");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[observers]]\nname = \"shipped\"\nentity = \"orders\"\nevents = [\"UPDATE\"]\n\
         condition = \"changed_to('status', 'shipped') && data.total == 100\"\n",
    )
    .unwrap();
    let out = observer(&[
        "validate-config",
        "--config",
        good.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["observers"][0]["events"], serde_json::json!(["UPDATE"]));
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[observers]]\nname = \"created\"\nentity = \"orders\"\nevents = [\"INSERT\"]\n\
         condition = \"field_changed('status')\"\n",
    )
    .unwrap();
    let out = observer(&["validate-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("observer \"created\""), "{stderr}");
    assert!(stderr.contains("INSERT events have only one"), "{stderr}");
}

/// A `gantry observer run` child whose output lines arrive on a channel; killed on drop.
pub struct Listener {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Its stderr: the log.
    log: std::path::PathBuf,
}

impl Listener {
    pub fn start(args: &[&str]) -> Self {
        use std::io::BufRead as _;
        let log = temp_dir("observer-log").join("stderr.log");
        let mut child = gantry()
            .args(["observer", "run"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, log }
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for(&self, prefix: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line starting {prefix:?}: {e}"),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn run_wakes_on_notify_without_waiting_for_its_poll() {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let schema = format!("gantry_obs_notify_{tag}");
    let jobs_schema = format!("gantry_jobs_notify_{tag}");
    let table = format!("obs_notify_{tag}");
    exec(&format!("CREATE TABLE {table} (id bigint PRIMARY KEY)")).await;
    let dir = temp_dir("observer-notify");
    let config = dir.join("observers.toml");
    std::fs::write(
        &config,
        format!(
            "[[observers]]\nname = \"any\"\nentity = \"{table}\"\n\
             retry = {{ max_attempts = 1 }}\n\
             [[observers.actions]]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\n"
        ),
    )
    .unwrap();
    let url = database_url();
    let cfg = config.to_str().unwrap();
    let out = observer(&[
        "install",
        "--database",
        &url,
        "--config",
        cfg,
        "--schema",
        &schema,
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // A 60 s poll: only a notification can wake it within the test's patience.
    let listener = Listener::start(&[
        "--database",
        &url,
        "--config",
        cfg,
        "--schema",
        &schema,
        "--jobs-schema",
        &jobs_schema,
        "--poll",
        "60s",
    ]);
    listener.wait_for("leader of observer set main");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    exec(&format!("INSERT INTO {table} VALUES (1), (2), (3)")).await;
    // `wait_for` gives up after 30 s, half the poll: only the NOTIFY can have woken it.
    listener.wait_for("handed over 3 change(s): 3 job(s)");
    drop(listener);
    let out = observer(&["uninstall", "--database", &url, "--schema", &schema]);
    assert_eq!(out.status.code(), Some(0));
    exec(&format!(
        "DROP TABLE {table}; DROP SCHEMA \"{jobs_schema}\" CASCADE"
    ))
    .await;
}

#[tokio::test]
async fn changes_held_back_by_an_older_transaction_arrive_once_it_ends() {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let schema = format!("gantry_obs_held_{tag}");
    let jobs_schema = format!("gantry_jobs_held_{tag}");
    let table = format!("obs_held_{tag}");
    exec(&format!("CREATE TABLE {table} (id bigint PRIMARY KEY)")).await;
    let dir = temp_dir("observer-held");
    let config = dir.join("observers.toml");
    std::fs::write(
        &config,
        format!(
            "[[observers]]\nname = \"any\"\nentity = \"{table}\"\n\
             retry = {{ max_attempts = 1 }}\n\
             [[observers.actions]]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\n"
        ),
    )
    .unwrap();
    let url = database_url();
    let cfg = config.to_str().unwrap();
    let out = observer(&[
        "install",
        "--database",
        &url,
        "--config",
        cfg,
        "--schema",
        &schema,
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let listener = Listener::start(&[
        "--database",
        &url,
        "--config",
        cfg,
        "--schema",
        &schema,
        "--jobs-schema",
        &jobs_schema,
        "--poll",
        "60s",
    ]);
    listener.wait_for("leader of observer set main");
    // An older transaction with an id holds the capture's horizon: rows committed after it
    // started cannot be delivered before it ends (it could still commit rows below them).
    let (blocker, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    blocker
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .unwrap();
    exec(&format!("INSERT INTO {table} VALUES (1), (2), (3)")).await;
    // The insert's NOTIFY is spent on rows held back; once the blocker ends, they must come
    // without waiting for the 60 s poll (`wait_for` gives up after 30 s).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    blocker.batch_execute("COMMIT").await.unwrap();
    listener.wait_for("handed over 3 change(s): 3 job(s)");
    drop(listener);
    let out = observer(&["uninstall", "--database", &url, "--schema", &schema]);
    assert_eq!(out.status.code(), Some(0));
    exec(&format!(
        "DROP TABLE {table}; DROP SCHEMA \"{jobs_schema}\" CASCADE"
    ))
    .await;
}
