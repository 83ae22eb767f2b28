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

#[test]
fn keys_sign_artifacts_that_verify_until_tampered() {
    let dir = temp_dir("fleet-artifacts");
    let db = dir.join("registry").join("fleet.db");
    let keys = dir.join("keys");
    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    let out = run(&[
        "fleet",
        "keys",
        "generate",
        "--out-dir",
        keys.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let secret = keys.join("fleet-signing.key");
    let public = keys.join("fleet-signing.pub");
    // Never overwrites.
    let out = run(&[
        "fleet",
        "keys",
        "generate",
        "--out-dir",
        keys.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    let file = dir.join("app-1.2.0.bin");
    std::fs::write(&file, "hello\n").unwrap();
    let dbs = db.to_str().unwrap();
    let out = run(&[
        "fleet",
        "artifacts",
        "add",
        "--db",
        dbs,
        "--version",
        "1.2.0",
        "--file",
        file.to_str().unwrap(),
        "--key",
        secret.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let a: Value = serde_json::from_slice(&out.stdout).unwrap();
    // sha256("hello\n")
    assert_eq!(
        a["sha256"],
        "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    );
    assert_eq!(a["size"], 6);
    assert_eq!(a["signature"].as_str().unwrap().len(), 128);
    // The registry keeps its own copy: changing the source later changes nothing.
    std::fs::write(&file, "changed\n").unwrap();
    let verify = || {
        run(&[
            "fleet",
            "artifacts",
            "verify",
            "--db",
            dbs,
            "1.2.0",
            "--public-key",
            public.to_str().unwrap(),
        ])
    };
    let out = verify();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // A version is registered once.
    let out = run(&[
        "fleet",
        "artifacts",
        "add",
        "--db",
        dbs,
        "--version",
        "1.2.0",
        "--file",
        file.to_str().unwrap(),
        "--key",
        secret.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Another key does not verify it.
    let out = run(&[
        "fleet",
        "keys",
        "generate",
        "--out-dir",
        keys.to_str().unwrap(),
        "--name",
        "other",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = run(&[
        "fleet",
        "artifacts",
        "verify",
        "--db",
        dbs,
        "1.2.0",
        "--public-key",
        keys.join("other.pub").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not verify"));
    // Tampering with the registry's copy is caught.
    let stored = std::path::PathBuf::from(a["path"].as_str().unwrap());
    std::fs::write(&stored, "hellO\n").unwrap();
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("registered 5891b5b5"));
    // Bad input.
    let out = run(&[
        "fleet",
        "artifacts",
        "add",
        "--db",
        dbs,
        "--version",
        "../x",
        "--file",
        file.to_str().unwrap(),
        "--key",
        secret.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run(&[
        "fleet",
        "artifacts",
        "add",
        "--db",
        dbs,
        "--version",
        "2.0.0",
        "--file",
        file.to_str().unwrap(),
        "--key",
        public
            .to_str()
            .unwrap()
            .replace(".pub", ".missing")
            .as_str(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    std::fs::write(keys.join("bad.key"), "not a key\n").unwrap();
    let out = run(&[
        "fleet",
        "artifacts",
        "add",
        "--db",
        dbs,
        "--version",
        "2.0.0",
        "--file",
        file.to_str().unwrap(),
        "--key",
        keys.join("bad.key").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run(&["fleet", "artifacts", "show", "--db", dbs, "9.9.9"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let out = run(&["fleet", "artifacts", "list", "--db", dbs, "--json"]);
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1);
}
