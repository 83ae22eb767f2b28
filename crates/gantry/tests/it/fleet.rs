//! `gantry fleet devices …`: the registry through the CLI.

use serde_json::Value;

use crate::{gantry, temp_dir};

fn fleet(db: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["fleet", "devices"];
    all.extend_from_slice(&args[..1]);
    all.extend_from_slice(&["--db", db.to_str().unwrap()]);
    all.extend_from_slice(&args[1..]);
    gantry().args(all).output().unwrap()
}

#[test]
fn devices_add_import_list_show_export_remove() {
    let dir = temp_dir("fleet");
    let db = dir.join("fleet.db");
    let out = fleet(
        &db,
        &[
            "add",
            "--id",
            "pos-1",
            "--address",
            "127.0.0.1:9001",
            "--tag",
            "canary",
            "--version",
            "1.0.0",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // A taken id is refused.
    let out = fleet(
        &db,
        &["add", "--id", "pos-1", "--address", "127.0.0.1:9001"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("device pos-1 already exists"));

    let csv = dir.join("devices.csv");
    std::fs::write(
        &csv,
        "id,address,tags,group,version\npos-2,127.0.0.1:9002,eu,stores,1.1.0\npos-3,127.0.0.1:9003,eu;canary,stores,2.0.0\n",
    )
    .unwrap();
    let out = fleet(&db, &["import", csv.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["imported"], 2);

    let out = fleet(
        &db,
        &["list", "--tag", "canary", "--version", "<2", "--json"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total"], 1);
    assert_eq!(v["devices"][0]["id"], "pos-1");

    let out = fleet(&db, &["show", "pos-3", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["canary", "eu"]));
    let out = fleet(&db, &["show", "pos-9"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");

    let out = fleet(&db, &["export", "--group", "stores", "--format", "csv"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("id,name,address,delivery,tags,group,location,version,last_seen,health\n")
    );
    assert_eq!(text.lines().count(), 3, "{text}");

    let out = fleet(&db, &["remove", "pos-2"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = fleet(&db, &["remove", "pos-2"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
}

#[test]
fn bad_input_is_refused_with_its_line_and_exit_2() {
    let dir = temp_dir("fleet-bad");
    let db = dir.join("fleet.db");
    let csv = dir.join("bad.csv");
    std::fs::write(&csv, "id,address\nok,127.0.0.1:1\n,127.0.0.1:2\n").unwrap();
    let out = fleet(&db, &["import", csv.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "gantry fleet: line 3: id is empty\n"
    );
    let out = fleet(&db, &["list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total"], 0, "nothing imported");
    let out = fleet(&db, &["list", "--version", "not a req"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = fleet(
        &db,
        &["add", "--id", "x", "--address", "a:1", "--delivery", "ftp"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
