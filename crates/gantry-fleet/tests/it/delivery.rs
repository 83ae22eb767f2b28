//! HTTP pushes to an in-process simulated fleet over loopback.

use std::time::Duration;

use gantry_fleet::artifact::{generate_keys, read_signing_key, read_verifying_key};
use gantry_fleet::delivery::{self, Outcome, PushOptions};
use gantry_fleet::registry::Registry;
use gantry_fleet::simulator::{SimSpec, Simulation};

fn dir(label: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("gantry-fleet-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Artifacts smaller than one read and several reads long reach the device intact (the device
/// checks the body's SHA-256 and the signature).
#[tokio::test]
async fn artifacts_of_every_size_arrive_intact() {
    let d = dir("sizes");
    let (secret, public) = generate_keys(&d.join("keys"), "k").unwrap();
    let key = read_signing_key(&secret).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sim = Simulation::start(SimSpec {
        devices: 4,
        port,
        initial_version: "1.0.0".into(),
        public_key: Some(read_verifying_key(&public).unwrap()),
        fail_rate: 0.0,
        latency: Duration::ZERO,
        flaky: 0.0,
        dead: 0.0,
        reject: 0.0,
        seed: 1,
    })
    .await
    .unwrap();
    let mut registry = Registry::open(&d.join("f.db")).unwrap();
    let options = PushOptions::default();
    let client = delivery::client(&options).unwrap();
    let sizes = [0usize, 1, 65_536, 65_537, 1_000_003];
    for (i, size) in sizes.into_iter().enumerate() {
        let file = d.join(format!("a{i}.bin"));
        std::fs::write(
            &file,
            (0..size).map(|b| (b % 251) as u8).collect::<Vec<_>>(),
        )
        .unwrap();
        let version = format!("2.0.{i}");
        let artifact = registry.add_artifact(&version, &file, &key).unwrap();
        let (device, addr) = &sim.devices[i % sim.devices.len()];
        let outcome = delivery::push(&client, device, &addr.to_string(), &artifact, &options).await;
        assert!(
            matches!(outcome, Outcome::Delivered { attempts: 1, .. }),
            "{size} bytes: {outcome:?}"
        );
    }
    assert_eq!(sim.stats().applied, sizes.len() as u64);
    sim.stop().await;
}
