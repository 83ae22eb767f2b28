//! `gantry observer install|uninstall` against the real PostgreSQL.

use serde_json::Value;
use tokio_postgres::NoTls;

use crate::jobs::database_url;
use crate::{gantry, temp_dir};

async fn sql(query: &str) -> Vec<tokio_postgres::Row> {
    let (client, connection) = tokio_postgres::connect(&database_url(), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.unwrap();
    client.query(query, &[]).await.unwrap()
}

async fn exec(query: &str) {
    let (client, connection) = tokio_postgres::connect(&database_url(), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.batch_execute(query).await.unwrap();
}

fn observer(args: &[&str]) -> std::process::Output {
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
    assert_eq!(first["migrations_applied"], 1);
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
