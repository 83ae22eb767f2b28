//! `gantry fleet push` to a device reached over SSH: a real OpenSSH `sshd` the test starts on
//! its own loopback port, key authentication, host keys checked against a known_hosts file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{gantry, temp_dir};

const SSHD: &str = "/usr/sbin/sshd";

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (Debian: apt-get install openssh-client)");
    assert!(out.status.success(), "{out:?}");
}

/// An sshd of the test's own; killed on drop.
struct Sshd {
    child: Child,
    port: u16,
}

impl Sshd {
    fn start(dir: &Path) -> Self {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing (Debian: apt-get install openssh-server)"
        );
        // Privilege separation needs its directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        keygen(&dir.join("host_key"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nPubkeyAuthentication yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n\
                 PidFile {dir}/sshd.pid\nSubsystem sftp /usr/lib/openssh/sftp-server\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not listen: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An sshd with the client's key authorized, a known_hosts file that has its host key, this
/// user's login, and a registry with a signed artifact 2.0.0 (the file returned).
fn setup(label: &str) -> (PathBuf, Sshd, PathBuf, String, PathBuf) {
    let dir = temp_dir(label);
    let sshd = Sshd::start(&dir);
    // The client's key, authorized on the device.
    keygen(&dir.join("client_key"));
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
    let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
    let known_hosts = dir.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{} {host_pub}", sshd.port),
    )
    .unwrap();
    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    let db = dir.join("fleet.db");
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
    let file = dir.join("app.bin");
    std::fs::write(&file, vec![7u8; 256 * 1024]).unwrap();
    let out = run(&[
        "fleet",
        "artifacts",
        "add",
        "--db",
        db.to_str().unwrap(),
        "--version",
        "2.0.0",
        "--file",
        file.to_str().unwrap(),
        "--key",
        keys.join("fleet-signing.key").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned();
    (dir, sshd, known_hosts, user, file)
}

#[test]
fn push_over_ssh_copies_installs_checks_the_version_and_refuses_unknown_host_keys() {
    let (dir, sshd, known_hosts, user, file) = setup("fleet-ssh");
    // A known_hosts that knows another key for it.
    keygen(&dir.join("other_key"));
    let wrong_hosts = dir.join("wrong_hosts");
    std::fs::write(
        &wrong_hosts,
        format!(
            "[127.0.0.1]:{} {}",
            sshd.port,
            std::fs::read_to_string(dir.join("other_key.pub")).unwrap()
        ),
    )
    .unwrap();

    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    let db = dir.join("fleet.db");
    let dbs = db.to_str().unwrap();
    let address = format!("{user}@127.0.0.1:{}", sshd.port);
    let out = run(&[
        "fleet",
        "devices",
        "add",
        "--db",
        dbs,
        "--id",
        "pos-1",
        "--address",
        &address,
        "--delivery",
        "ssh",
    ]);
    assert!(out.status.success(), "{out:?}");

    let device_dir = dir.join("device");
    std::fs::create_dir_all(&device_dir).unwrap();
    let d = device_dir.display().to_string();
    let install = format!("cp {{path}} {d}/installed && echo {{version}} > {d}/version");
    let version = format!("cat {d}/version");
    let identity = dir.join("client_key");
    let push = |hosts: &Path, install: &str, extra: &[&str]| {
        let mut args = vec![
            "fleet",
            "push",
            "--db",
            dbs,
            "--device",
            "pos-1",
            "--artifact",
            "2.0.0",
            "--ssh-identity",
            identity.to_str().unwrap(),
            "--known-hosts",
            hosts.to_str().unwrap(),
            "--install-command",
            install,
            "--version-command",
            &version,
            "--gate-timeout",
            "5s",
            "--retry-delay",
            "10ms",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = run(&args);
        let outcome: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        (out.status.code(), outcome)
    };

    // A host key the known_hosts file does not have is refused, at once, and nothing runs.
    let (code, o) = push(&wrong_hosts, &install, &[]);
    assert_eq!(code, Some(1), "{o}");
    assert_eq!(o["outcome"], "rejected", "{o}");
    assert_eq!(o["attempts"], 1);
    assert!(
        o["error"]
            .as_str()
            .unwrap()
            .contains("Host key verification failed"),
        "{o}"
    );
    assert!(!device_dir.join("installed").exists());

    // With the right one: copied, installed, and the version command reports it.
    let (code, o) = push(&known_hosts, &install, &[]);
    assert_eq!(code, Some(0), "{o}");
    assert_eq!(o["outcome"], "delivered");
    assert_eq!(
        std::fs::read(device_dir.join("installed")).unwrap(),
        std::fs::read(&file).unwrap()
    );
    let show: Value = serde_json::from_slice(
        &run(&["fleet", "devices", "show", "--db", dbs, "pos-1", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(show["version"], "2.0.0", "{show}");

    // An install command that fails is a refusal, not retried.
    let (code, o) = push(
        &known_hosts,
        "echo disk full >&2; exit 3",
        &["--attempts", "3"],
    );
    assert_eq!(code, Some(1), "{o}");
    assert_eq!(
        (o["outcome"].as_str(), o["attempts"].as_u64()),
        (Some("rejected"), Some(1))
    );
    assert!(o["error"].as_str().unwrap().contains("disk full"), "{o}");

    // A device that does not answer is retried, then failed.
    drop(sshd);
    let (code, o) = push(&known_hosts, &install, &["--attempts", "2"]);
    assert_eq!(code, Some(1), "{o}");
    assert_eq!(
        (o["outcome"].as_str(), o["attempts"].as_u64()),
        (Some("failed"), Some(2))
    );
}

#[test]
fn a_rollout_reaches_ssh_devices_and_refuses_to_start_without_ssh_settings() {
    let (dir, sshd, known_hosts, user, file) = setup("fleet-ssh-rollout");
    let run = |args: &[&str]| gantry().args(args).output().unwrap();
    let db = dir.join("fleet.db");
    let dbs = db.to_str().unwrap();
    let address = format!("{user}@127.0.0.1:{}", sshd.port);
    for id in ["pos-1", "pos-2", "pos-3"] {
        let out = run(&[
            "fleet",
            "devices",
            "add",
            "--db",
            dbs,
            "--id",
            id,
            "--address",
            &address,
            "--delivery",
            "ssh",
            "--tag",
            "stores",
        ]);
        assert!(out.status.success(), "{out:?}");
    }
    // Without SSH settings the rollout is refused at creation, naming a device.
    let out = run(&[
        "fleet",
        "rollout",
        "create",
        "--db",
        dbs,
        "--artifact",
        "2.0.0",
        "--tag",
        "stores",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is delivered over ssh"),
        "{out:?}"
    );

    let device_dir = dir.join("devices");
    std::fs::create_dir_all(&device_dir).unwrap();
    let d = device_dir.display().to_string();
    // One file per device: the install runs once per device, all on the one sshd.
    let install =
        format!("cp {{path}} {d}/{{device}}.bin && echo {{version}} > {d}/{{device}}.version");
    let identity = dir.join("client_key");
    let out = run(&[
        "fleet",
        "rollout",
        "create",
        "--db",
        dbs,
        "--artifact",
        "2.0.0",
        "--tag",
        "stores",
        "--canary",
        "1",
        "--batch",
        "2",
        "--threshold",
        "0",
        "--concurrency",
        "2",
        "--ssh-identity",
        identity.to_str().unwrap(),
        "--known-hosts",
        known_hosts.to_str().unwrap(),
        "--install-command",
        &install,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = info["id"].as_str().unwrap();
    let out = run(&["fleet", "rollout", "start", "--db", dbs, id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["phase"], "completed", "{done}");
    assert_eq!(done["devices"]["succeeded"], 3, "{done}");
    for id in ["pos-1", "pos-2", "pos-3"] {
        assert_eq!(
            std::fs::read(device_dir.join(format!("{id}.bin"))).unwrap(),
            std::fs::read(&file).unwrap()
        );
    }
}
