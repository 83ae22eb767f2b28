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

/// A free port on 127.0.0.1 (the simulator's devices use it on other loopback addresses).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn simulated_devices_speak_the_device_protocol() {
    let dir = temp_dir("fleet-sim");
    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    let keys = dir.join("keys");
    assert!(
        run(&[
            "fleet",
            "keys",
            "generate",
            "--out-dir",
            keys.to_str().unwrap()
        ])
        .status
        .success()
    );
    assert!(
        run(&[
            "fleet",
            "keys",
            "generate",
            "--out-dir",
            keys.to_str().unwrap(),
            "--name",
            "other"
        ])
        .status
        .success()
    );
    let db = dir.join("fleet.db");
    let dbs = db.to_str().unwrap();
    let file = dir.join("app.bin");
    std::fs::write(&file, vec![7u8; 100_000]).unwrap();
    let add = |version: &str, key: &str| {
        let out = run(&[
            "fleet",
            "artifacts",
            "add",
            "--db",
            dbs,
            "--version",
            version,
            "--file",
            file.to_str().unwrap(),
            "--key",
            keys.join(key).to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let good = add("2.0.0", "fleet-signing.key");
    let forged = add("2.0.1", "other.key");

    let sim = Sim::start(
        &dir,
        "sim",
        &[
            "--devices",
            "24",
            "--public-key",
            keys.join("fleet-signing.pub").to_str().unwrap(),
            "--dead",
            "0.2",
            "--reject",
            "0.2",
            "--seed",
            "7",
        ],
    );
    let registry_file = sim.csv.clone();
    let line = sim.started.clone();
    assert!(line.starts_with("simulating 24 devices ("), "{line}");
    let dead: usize = line
        .split(", ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));

    // The registry file imports.
    let out = run(&[
        "fleet",
        "devices",
        "import",
        "--db",
        dbs,
        registry_file.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["imported"],
        24
    );

    let http = reqwest::Client::new();
    let body = std::fs::read(&file).unwrap();
    let mut refused_connections = 0;
    let mut updated = Vec::new();
    let mut rejected = 0;
    for row in std::fs::read_to_string(&registry_file)
        .unwrap()
        .lines()
        .skip(1)
    {
        let mut cols = row.split(',');
        let (id, addr) = (cols.next().unwrap(), cols.next().unwrap());
        let url = format!("http://{addr}");
        let Ok(version) = http.get(format!("{url}/version")).send().await else {
            refused_connections += 1;
            continue;
        };
        let v: Value = version.json().await.unwrap();
        assert_eq!(
            (v["version"].as_str(), v["device_id"].as_str()),
            (Some("1.0.0"), Some(id))
        );
        assert_eq!(
            http.get(format!("{url}/health"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        let push = |artifact: &Value, device: &str, body: Vec<u8>| {
            http.post(format!("{url}/update"))
                .header("Content-Type", "application/octet-stream")
                .header("X-Device-ID", device)
                .header("X-Artifact-Version", artifact["version"].as_str().unwrap())
                .header("X-Artifact-SHA256", artifact["sha256"].as_str().unwrap())
                .header(
                    "X-Artifact-Signature",
                    artifact["signature"].as_str().unwrap(),
                )
                .body(body)
                .send()
        };
        let answer = push(&good, id, body.clone()).await.unwrap();
        if answer.status() == 409 {
            rejected += 1;
            continue;
        }
        assert_eq!(answer.status(), 200);
        let v: Value = http
            .get(format!("{url}/version"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["version"], "2.0.0");
        updated.push(url.clone());
        // Refusals: a tampered body, a signature by another key, someone else's id.
        let mut tampered = body.clone();
        tampered[5] ^= 1;
        let r = push(&good, id, tampered).await.unwrap();
        assert_eq!(r.status(), 422);
        assert!(r.text().await.unwrap().contains("checksum mismatch"));
        let r = push(&forged, id, body.clone()).await.unwrap();
        assert_eq!(r.status(), 422);
        assert!(r.text().await.unwrap().contains("signature refused"));
        let r = push(&good, "sim-999999", body.clone()).await.unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = http
            .get(format!("{url}/version"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["version"], "2.0.0", "refused pushes change nothing");
    }
    assert_eq!(refused_connections, dead);
    assert!(
        dead > 0 && rejected > 0 && !updated.is_empty(),
        "dead {dead} rejected {rejected}"
    );
    assert_eq!(refused_connections + rejected + updated.len(), 24);

    assert_eq!(sim.stop(), updated.len() as u64);
}

#[tokio::test]
async fn push_retries_transient_failures_never_refusals_and_gates_on_health() {
    let dir = temp_dir("fleet-push");
    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    let keys = dir.join("keys");
    assert!(
        run(&[
            "fleet",
            "keys",
            "generate",
            "--out-dir",
            keys.to_str().unwrap()
        ])
        .status
        .success()
    );
    let db = dir.join("fleet.db");
    let dbs = db.to_str().unwrap();
    let file = dir.join("app.bin");
    // Over axum's default 2 MiB body cap: devices take firmware-sized uploads.
    std::fs::write(&file, vec![b'x'; 3 << 20]).unwrap();
    let add = |version: &str| {
        let out = run(&[
            "fleet",
            "artifacts",
            "add",
            "--db",
            dbs,
            "--version",
            version,
            "--file",
            file.to_str().unwrap(),
            "--key",
            keys.join("fleet-signing.key").to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    add("2.0.0");
    let tampered = add("2.0.1");
    // Same size, one byte changed: only the checksum can tell.
    let stored = tampered["path"].as_str().unwrap();
    let mut bytes = std::fs::read(stored).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(stored, bytes).unwrap();

    // Every simulated device answers 503 to its first two update attempts.
    let sim = Sim::start(
        &dir,
        "sim",
        &[
            "--devices",
            "3",
            "--flaky",
            "1",
            "--public-key",
            keys.join("fleet-signing.pub").to_str().unwrap(),
        ],
    );
    let (sim_file, line) = (sim.csv.clone(), sim.started.clone());
    assert!(line.starts_with("simulating 3 devices"), "{line}");
    assert!(
        run(&[
            "fleet",
            "devices",
            "import",
            "--db",
            dbs,
            sim_file.to_str().unwrap()
        ])
        .status
        .success()
    );
    // Nothing listens there (the simulator answers on its own port only).
    let gone = format!("127.1.0.200:{}", free_port());
    assert!(
        run(&[
            "fleet",
            "devices",
            "add",
            "--db",
            dbs,
            "--id",
            "gone",
            "--address",
            &gone
        ])
        .status
        .success()
    );

    let push = |device: &str, artifact: &str, attempts: &str| {
        let out = run(&[
            "fleet",
            "push",
            "--db",
            dbs,
            "--device",
            device,
            "--artifact",
            artifact,
            "--attempts",
            attempts,
            "--retry-delay",
            "10ms",
            "--gate-timeout",
            "5s",
            "--json",
        ]);
        let outcome: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        (out.status.code(), outcome)
    };
    // Two 503s, then accepted, version and health confirmed.
    let (code, o) = push("sim-000000", "2.0.0", "3");
    assert_eq!(code, Some(0), "{o}");
    assert_eq!(
        (o["outcome"].as_str(), o["attempts"].as_u64()),
        (Some("delivered"), Some(3))
    );
    let show: Value = serde_json::from_slice(
        &run(&[
            "fleet",
            "devices",
            "show",
            "--db",
            dbs,
            "sim-000000",
            "--json",
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!(
        (show["version"].as_str(), show["health"].as_str()),
        (Some("2.0.0"), Some("healthy"))
    );
    assert!(show["last_seen"].is_string());
    // Attempts run out on transient failures.
    let (code, o) = push("sim-000001", "2.0.0", "2");
    assert_eq!(code, Some(1));
    assert_eq!(
        (o["outcome"].as_str(), o["attempts"].as_u64()),
        (Some("failed"), Some(2))
    );
    assert!(o["error"].as_str().unwrap().starts_with("503"), "{o}");
    // Nothing listens: connection errors are transient too.
    let (code, o) = push("gone", "2.0.0", "2");
    assert_eq!(code, Some(1));
    assert_eq!(o["outcome"], "failed");
    assert!(
        o["error"].as_str().unwrap().contains("cannot connect"),
        "{o}"
    );
    // A tampered artifact: the device refuses it, and that is not retried.
    let (code, o) = push("sim-000002", "2.0.1", "5");
    assert_eq!(code, Some(1));
    assert_eq!(
        (o["outcome"].as_str(), o["status"].as_u64()),
        (Some("rejected"), Some(422))
    );
    assert_eq!(
        o["attempts"], 3,
        "two 503s, then the refusal, then no more: {o}"
    );
    assert!(
        o["error"].as_str().unwrap().contains("checksum mismatch"),
        "{o}"
    );
    // Unknown device or artifact.
    let out = run(&[
        "fleet",
        "push",
        "--db",
        dbs,
        "--device",
        "nope",
        "--artifact",
        "2.0.0",
    ]);
    assert_eq!(out.status.code(), Some(4));
    let out = run(&[
        "fleet",
        "push",
        "--db",
        dbs,
        "--device",
        "gone",
        "--artifact",
        "9",
    ]);
    assert_eq!(out.status.code(), Some(4));
}

/// A simulator child process, stopped (and its update count read) at the end.
pub(crate) struct Sim {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    pub(crate) csv: std::path::PathBuf,
    /// Its first line: `simulating N devices (L listening, D dead) …`.
    started: String,
}

impl Sim {
    pub(crate) fn start(dir: &std::path::Path, name: &str, args: &[&str]) -> Self {
        use std::io::BufRead as _;
        let csv = dir.join(format!("{name}.csv"));
        let port = free_port();
        let mut child = gantry()
            .args([
                "fleet",
                "simulate",
                "--port",
                &port.to_string(),
                "--registry-file",
                csv.to_str().unwrap(),
            ])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("simulating"), "{line}");
        Self {
            child,
            stdout,
            csv,
            started: line,
        }
    }

    /// Imports its registry file into the registry at `db`.
    pub(crate) fn import_into(&self, db: &str) {
        let out = gantry()
            .args(["fleet", "devices", "import", "--db", db])
            .arg(&self.csv)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    /// Stops it; returns how many updates its devices applied.
    pub(crate) fn stop(mut self) -> u64 {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).unwrap();
        rest.trim()
            .strip_prefix("stopped; ")
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{rest}"))
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// Keys, an artifact 2.0.0 and a registry in `dir`; returns the registry path.
pub(crate) fn fleet_with_artifact(dir: &std::path::Path) -> String {
    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    let keys = dir.join("keys");
    assert!(
        run(&[
            "fleet",
            "keys",
            "generate",
            "--out-dir",
            keys.to_str().unwrap()
        ])
        .status
        .success()
    );
    let db = dir.join("fleet.db").to_str().unwrap().to_owned();
    let file = dir.join("app.bin");
    std::fs::write(&file, vec![1u8; 4096]).unwrap();
    let out = run(&[
        "fleet",
        "artifacts",
        "add",
        "--db",
        &db,
        "--version",
        "2.0.0",
        "--file",
        file.to_str().unwrap(),
        "--key",
        keys.join("fleet-signing.key").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    db
}

#[test]
fn a_rollout_records_failures_and_a_failing_canary_aborts_it() {
    let dir = temp_dir("fleet-rollout");
    let db = fleet_with_artifact(&dir);
    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    let pubkey = dir.join("keys").join("fleet-signing.pub");
    let good = Sim::start(
        &dir,
        "good",
        &[
            "--devices",
            "60",
            "--reject",
            "0.1",
            "--seed",
            "3",
            "--public-key",
            pubkey.to_str().unwrap(),
        ],
    );
    good.import_into(&db);
    let out = run(&[
        "fleet",
        "rollout",
        "create",
        "--db",
        &db,
        "--artifact",
        "2.0.0",
        "--tag",
        "sim",
        "--canary",
        "10%",
        "--batch",
        "20",
        "--threshold",
        "50",
        "--concurrency",
        "8",
        "--retry-delay",
        "10ms",
        "--json",
    ]);
    let created = json_of(&out);
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["targets"], 60);
    let out = run(&["fleet", "rollout", "start", "--db", &db, &id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let done = json_of(&out);
    assert_eq!(done["phase"], "completed", "{done}");
    let (ok, rejected) = (
        done["devices"]["succeeded"].as_u64().unwrap(),
        done["devices"]["rejected"].as_u64().unwrap(),
    );
    assert_eq!(ok + rejected, 60, "{done}");
    assert!(rejected > 0 && rejected < 15, "{done}");
    // The registry knows who runs what.
    let listed = json_of(&run(&[
        "fleet",
        "devices",
        "list",
        "--db",
        &db,
        "--version",
        "=2.0.0",
        "--json",
    ]));
    assert_eq!(listed["total"].as_u64(), Some(ok));
    // The trail names the refusals, with the device's answer.
    let events = json_of(&run(&[
        "fleet", "rollout", "events", "--db", &db, &id, "--json",
    ]));
    let refusals = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["change"]["state"] == "rejected")
        .inspect(|e| assert!(e["detail"].as_str().unwrap().contains("409"), "{e}"))
        .count();
    assert_eq!(refusals as u64, rejected);
    assert_eq!(
        good.stop(),
        ok,
        "each successful device updated exactly once"
    );

    // Every device refuses: the canary's failures abort the rollout before the next wave.
    let bad = Sim::start(&dir, "bad", &["--devices", "20", "--reject", "1"]);
    let bad_db = dir.join("bad.db");
    let bad_db = bad_db.to_str().unwrap();
    let file = dir.join("app.bin");
    assert!(
        run(&[
            "fleet",
            "artifacts",
            "add",
            "--db",
            bad_db,
            "--version",
            "2.0.0",
            "--file",
            file.to_str().unwrap(),
            "--key",
            dir.join("keys").join("fleet-signing.key").to_str().unwrap()
        ])
        .status
        .success()
    );
    assert!(
        run(&[
            "fleet",
            "devices",
            "import",
            "--db",
            bad_db,
            bad.csv.to_str().unwrap()
        ])
        .status
        .success()
    );
    let created = json_of(&run(&[
        "fleet",
        "rollout",
        "create",
        "--db",
        bad_db,
        "--artifact",
        "2.0.0",
        "--canary",
        "2",
        "--batch",
        "5",
        "--threshold",
        "10",
        "--json",
    ]));
    let id = created["id"].as_str().unwrap();
    let out = run(&["fleet", "rollout", "start", "--db", bad_db, id, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let aborted = json_of(&out);
    assert_eq!(aborted["phase"], "aborted");
    assert_eq!(aborted["devices"]["rejected"], 2);
    assert_eq!(aborted["devices"]["pending"], 18);
    let out = run(&["fleet", "rollout", "resume", "--db", bad_db, id]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an aborted rollout stays aborted: {out:?}"
    );
    let out = run(&["fleet", "rollout", "status", "--db", bad_db, "r-nope"]);
    assert_eq!(out.status.code(), Some(4));
}

#[test]
fn a_rollout_pauses_resumes_and_survives_sigkill_without_pushing_twice() {
    let dir = temp_dir("fleet-rollout-crash");
    let db = fleet_with_artifact(&dir);
    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    // Slow devices, so the runner can be stopped mid-wave.
    let sim = Sim::start(&dir, "slow", &["--devices", "30", "--latency", "150ms"]);
    sim.import_into(&db);
    let created = json_of(&run(&[
        "fleet",
        "rollout",
        "create",
        "--db",
        &db,
        "--artifact",
        "2.0.0",
        "--canary",
        "3",
        "--batch",
        "9",
        "--threshold",
        "0",
        "--concurrency",
        "3",
        "--json",
    ]));
    let id = created["id"].as_str().unwrap().to_owned();
    let status = |id: &str| {
        json_of(&run(&[
            "fleet", "rollout", "status", "--db", &db, id, "--json",
        ]))
    };
    let wait_for = |at_least: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let s = status(&id);
            if s["devices"]["succeeded"].as_u64().unwrap() >= at_least {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "stuck: {s}\nrunner: {}",
                std::fs::read_to_string(dir.join("runner.err")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let start = || {
        gantry()
            .args(["fleet", "rollout", "start", "--db", &db, &id, "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.join("runner.err")).unwrap())
            .spawn()
            .unwrap()
    };

    // Pause: the runner stops starting pushes, finishes what is in flight, and exits.
    let runner = start();
    wait_for(4);
    assert!(
        run(&["fleet", "rollout", "pause", "--db", &db, &id])
            .status
            .success()
    );
    let out = runner.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let paused = json_of(&out);
    assert_eq!(paused["phase"], "paused", "{paused}");
    assert_eq!(paused["devices"]["in_flight"], 0);
    let pending = paused["devices"]["pending"].as_u64().unwrap();
    assert!(pending > 0, "{paused}");
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(
        status(&id)["devices"],
        paused["devices"],
        "nothing moves while paused"
    );

    // Resume, then SIGKILL the runner mid-wave and start it again.
    assert!(
        run(&["fleet", "rollout", "resume", "--db", &db, &id])
            .status
            .success()
    );
    let mut runner = start();
    let before_kill = wait_for(paused["devices"]["succeeded"].as_u64().unwrap() + 4);
    runner.kill().unwrap();
    runner.wait().unwrap();
    let after_kill = status(&id);
    assert!(
        after_kill["devices"]["succeeded"].as_u64() >= before_kill["devices"]["succeeded"].as_u64()
    );
    let out = run(&["fleet", "rollout", "start", "--db", &db, &id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let done = json_of(&out);
    assert_eq!(done["phase"], "completed", "{done}");
    assert_eq!(done["devices"]["succeeded"], 30);
    // No device was pushed twice after it had taken the update.
    assert_eq!(sim.stop(), 30);
}

#[test]
fn rollouts_wait_for_their_start_time_and_maintenance_window() {
    let dir = temp_dir("fleet-window");
    let db = fleet_with_artifact(&dir);
    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    let sim = Sim::start(&dir, "win", &["--devices", "4"]);
    sim.import_into(&db);
    let create = |extra: &[&str]| {
        let mut args = vec![
            "fleet",
            "rollout",
            "create",
            "--db",
            &db,
            "--artifact",
            "2.0.0",
            "--canary",
            "2",
            "--batch",
            "2",
            "--json",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    // Held back: a window that opens on January 1st only, and a start in 2099.
    for extra in [
        &["--window", "0 0 1 1 *", "--window-duration", "1m"][..],
        &["--start-at", "2099-01-01T00:00:00Z"][..],
    ] {
        let id = json_of(&create(extra))["id"].as_str().unwrap().to_owned();
        let runner = gantry()
            .args(["fleet", "rollout", "start", "--db", &db, &id, "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(800));
        let s = json_of(&run(&[
            "fleet", "rollout", "status", "--db", &db, &id, "--json",
        ]));
        assert_eq!(s["devices"]["pending"], 4, "{extra:?}: {s}");
        assert!(
            run(&["fleet", "rollout", "abort", "--db", &db, &id])
                .status
                .success()
        );
        let out = runner.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "aborted: {out:?}");
        assert_eq!(json_of(&out)["phase"], "aborted");
    }
    // Open: a window every minute lasting two, and a start in the past.
    let id = json_of(&create(&[
        "--window",
        "* * * * *",
        "--window-duration",
        "2m",
        "--window-tz",
        "Europe/Berlin",
        "--start-at",
        "2020-01-01T00:00:00Z",
    ]))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = run(&["fleet", "rollout", "start", "--db", &db, &id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(json_of(&out)["devices"]["succeeded"], 4);
    // Bad schedules are refused at creation.
    for extra in [
        &["--window", "61 * * * *", "--window-duration", "1h"][..],
        &[
            "--window",
            "0 2 * * *",
            "--window-duration",
            "1h",
            "--window-tz",
            "Mars/Olympus",
        ][..],
        &["--start-at", "tomorrow"][..],
    ] {
        let out = create(extra);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {out:?}");
    }
    drop(sim);
}

#[test]
fn a_dynamic_rollout_takes_in_devices_registered_later_until_closed() {
    let dir = temp_dir("fleet-dynamic");
    let db = fleet_with_artifact(&dir);
    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    let sim = Sim::start(&dir, "dyn", &["--devices", "2"]);
    let csv = std::fs::read_to_string(&sim.csv).unwrap();
    let addresses: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap())
        .collect();
    let create = |extra: &[&str]| {
        let mut args = vec![
            "fleet",
            "rollout",
            "create",
            "--db",
            &db,
            "--artifact",
            "2.0.0",
            "--tag",
            "late",
            "--json",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    // A fixed rollout needs a device now; a dynamic one may wait for them.
    let out = create(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no device matches"));
    let id = json_of(&create(&["--dynamic"]))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let runner = gantry()
        .args(["fleet", "rollout", "start", "--db", &db, &id, "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = || {
        json_of(&run(&[
            "fleet", "rollout", "status", "--db", &db, &id, "--json",
        ]))
    };
    let wait_for = |succeeded: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let s = status();
            if s["devices"]["succeeded"] == succeeded {
                return s;
            }
            assert!(std::time::Instant::now() < deadline, "stuck: {s}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    for (i, address) in addresses.iter().enumerate() {
        let id = format!("sim-{i:06}");
        let out = run(&[
            "fleet",
            "devices",
            "add",
            "--db",
            &db,
            "--id",
            &id,
            "--address",
            address,
            "--tag",
            "late",
        ]);
        assert!(out.status.success(), "{out:?}");
        let s = wait_for(i as u64 + 1);
        assert_eq!(s["phase"], "running", "waits for more: {s}");
    }
    let out = run(&["fleet", "rollout", "close", "--db", &db, &id]);
    assert!(out.status.success(), "{out:?}");
    let out = runner.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let done = json_of(&out);
    assert_eq!(done["phase"], "completed");
    assert_eq!(done["targets"], 2);
    // Closing is for dynamic rollouts that have not finished.
    let out = run(&["fleet", "rollout", "close", "--db", &db, &id]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(sim.stop(), 2);
}

#[test]
fn a_thousand_device_rollout_with_five_percent_failing_records_and_retries_as_configured() {
    let dir = temp_dir("fleet-1k");
    let db = fleet_with_artifact(&dir);
    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    let pubkey = dir.join("keys").join("fleet-signing.pub");
    // 3 % dead, 2 % refusing: about 5 % fail; 5 % flaky (two 503s, then fine) succeed on retry.
    let sim = Sim::start(
        &dir,
        "k",
        &[
            "--devices",
            "1000",
            "--dead",
            "0.03",
            "--reject",
            "0.02",
            "--flaky",
            "0.05",
            "--seed",
            "11",
            "--public-key",
            pubkey.to_str().unwrap(),
        ],
    );
    sim.import_into(&db);
    let created = json_of(&run(&[
        "fleet",
        "rollout",
        "create",
        "--db",
        &db,
        "--artifact",
        "2.0.0",
        "--canary",
        "10%",
        "--batch",
        "300",
        "--threshold",
        "25",
        "--concurrency",
        "50",
        "--attempts",
        "3",
        "--retry-delay",
        "10ms",
        "--json",
    ]));
    let id = created["id"].as_str().unwrap().to_owned();
    let out = run(&["fleet", "rollout", "start", "--db", &db, &id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let done = json_of(&out);
    assert_eq!(done["phase"], "completed", "{done}");
    let events = json_of(&run(&[
        "fleet", "rollout", "events", "--db", &db, &id, "--json",
    ]));
    let (mut delivered, mut retried_then_delivered, mut failed, mut rejected) = (0, 0, 0, 0);
    for e in events.as_array().unwrap() {
        let state = e["change"]["state"].as_str().unwrap_or("");
        if !matches!(state, "succeeded" | "failed" | "rejected") {
            continue;
        }
        let detail: Value = serde_json::from_str(e["detail"].as_str().unwrap()).unwrap();
        match (state, detail["outcome"].as_str().unwrap()) {
            ("succeeded", "delivered") => {
                delivered += 1;
                if detail["attempts"] == 3 {
                    retried_then_delivered += 1;
                }
            }
            ("failed", "failed") => {
                // Transient failures are retried until the attempts run out.
                assert_eq!(detail["attempts"], 3, "{detail}");
                failed += 1;
            }
            ("rejected", "rejected") => {
                // A refusal is never retried.
                assert_eq!(detail["attempts"], 1, "{detail}");
                assert_eq!(detail["status"], 409, "{detail}");
                rejected += 1;
            }
            other => panic!("unexpected {other:?}: {e}"),
        }
    }
    assert_eq!(delivered + failed + rejected, 1000);
    assert_eq!(done["devices"]["succeeded"], delivered);
    assert_eq!(done["devices"]["failed"], failed);
    assert_eq!(done["devices"]["rejected"], rejected);
    let dead: u64 = sim
        .started
        .split(" listening, ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_eq!(failed, dead, "the dead devices, and only they, failed");
    assert!(
        (30..=70).contains(&(failed + rejected)),
        "about 5 %: {failed} + {rejected}"
    );
    assert!(
        retried_then_delivered >= 20,
        "flaky devices retried: {retried_then_delivered}"
    );
    assert_eq!(sim.stop(), delivered);
}
