use std::path::PathBuf;

use gantry_fleet::registry::{
    Delivery, Device, Filter, Format, Health, Registry, RegistryError, parse_time,
};

fn temp_db(label: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "gantry-fleet-it-{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("fleet.db")
}

const CSV: &str = "\
id,name,address,delivery,tags,group,location,version,last_seen,health
pos-001,Till 1,10.0.0.1:8080,http,eu;canary,stores,berlin,1.2.0,2026-11-01T10:00:00Z,healthy
pos-002,,10.0.0.2:8080,http,eu,stores,paris,1.3.1,2026-11-20T10:00:00Z,unknown
pos-003,Kiosk,ops@10.0.0.3,ssh,us,kiosks,nyc,2.0.0,,unhealthy
pos-004,Till 4,10.0.0.4:8080,,eu;canary,stores,berlin,not-semver,,
";

fn ids(devices: &[Device]) -> Vec<&str> {
    devices.iter().map(|d| d.id.as_str()).collect()
}

#[test]
fn imports_csv_and_filters_by_every_field() {
    let mut r = Registry::open(&temp_db("filters")).unwrap();
    assert_eq!(r.import(CSV.as_bytes(), Format::Csv).unwrap(), 4);
    let list = |f: Filter| {
        let (page, total) = r.list(&f, 0, 100).unwrap();
        assert_eq!(total as usize, page.len());
        ids(&page)
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(list(Filter::default()).len(), 4);
    assert_eq!(
        list(Filter {
            tags: vec!["eu".into(), "canary".into()],
            ..Filter::default()
        }),
        vec!["pos-001", "pos-004"]
    );
    assert_eq!(
        list(Filter {
            group: Some("stores".into()),
            location: Some("berlin".into()),
            ..Filter::default()
        }),
        vec!["pos-001", "pos-004"]
    );
    assert_eq!(
        list(Filter {
            version: Some(semver::VersionReq::parse(">=1.2.1, <2").unwrap()),
            ..Filter::default()
        }),
        vec!["pos-002"]
    );
    let nov10 = parse_time("2026-11-10T00:00:00Z").unwrap();
    assert_eq!(
        list(Filter {
            seen_since: Some(nov10),
            ..Filter::default()
        }),
        vec!["pos-002"]
    );
    assert_eq!(
        list(Filter {
            unseen_since: Some(nov10),
            ..Filter::default()
        }),
        vec!["pos-001", "pos-003", "pos-004"]
    );
    let d = r.get("pos-003").unwrap().unwrap();
    assert_eq!(d.delivery, Delivery::Ssh);
    assert_eq!(d.health, Health::Unhealthy);
    assert_eq!(d.tags, vec!["us"]);
    assert_eq!(r.get("pos-002").unwrap().unwrap().name, "pos-002");
    let (page, total) = r.list(&Filter::default(), 1, 2).unwrap();
    assert_eq!((ids(&page), total), (vec!["pos-002", "pos-003"], 4));
}

#[test]
fn a_bad_csv_record_names_its_line_and_imports_nothing() {
    let mut r = Registry::open(&temp_db("bad-csv")).unwrap();
    let bad = "id,address,delivery\nok-1,10.0.0.1:1,http\nok-2,10.0.0.2:1,carrier-pigeon\n";
    let err = r.import(bad.as_bytes(), Format::Csv).unwrap_err();
    assert!(matches!(err, RegistryError::Invalid(_)));
    assert_eq!(
        err.to_string(),
        "line 3: delivery \"carrier-pigeon\" is not http or ssh"
    );
    assert_eq!(r.count().unwrap(), 0, "nothing imported");
    let err = r
        .import("id,address\nx,\n".as_bytes(), Format::Csv)
        .unwrap_err();
    assert_eq!(err.to_string(), "line 2: device x: address is empty");
    let err = r
        .import("id,adress\nx,y\n".as_bytes(), Format::Csv)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("line 1: unknown column \"adress\""),
        "{err}"
    );
    let err = r
        .import("id,address\nx,y,z\n".as_bytes(), Format::Csv)
        .unwrap_err();
    assert!(err.to_string().starts_with("line 2:"), "{err}");
    let err = r
        .import(
            "id,address,last_seen\nx,y,yesterday\n".as_bytes(),
            Format::Csv,
        )
        .unwrap_err();
    assert!(
        err.to_string().starts_with("line 2: time \"yesterday\""),
        "{err}"
    );
    assert_eq!(r.count().unwrap(), 0);
}

#[test]
fn exports_import_back_identically_in_both_formats() {
    let mut r = Registry::open(&temp_db("roundtrip")).unwrap();
    r.import(CSV.as_bytes(), Format::Csv).unwrap();
    let (all, _) = r.list(&Filter::default(), 0, 100).unwrap();
    for format in [Format::Csv, Format::Json] {
        let mut out = Vec::new();
        assert_eq!(r.export(&Filter::default(), format, &mut out).unwrap(), 4);
        let mut copy = Registry::open(&temp_db("copy")).unwrap();
        assert_eq!(copy.import(out.as_slice(), format).unwrap(), 4);
        let (again, _) = copy.list(&Filter::default(), 0, 100).unwrap();
        assert_eq!(again, all, "{format:?}");
    }
}

#[test]
fn json_import_names_the_bad_record_and_reimport_replaces_tags() {
    let mut r = Registry::open(&temp_db("json")).unwrap();
    let err = r
        .import(
            r#"[{"id": "a", "address": "h:1"}, {"id": "b", "adress": "h:2"}]"#.as_bytes(),
            Format::Json,
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("device [1]: unknown field `adress`"),
        "{err}"
    );
    assert_eq!(r.count().unwrap(), 0);
    r.import(
        r#"[{"id": "a", "address": "h:1", "tags": ["x", "y"]}]"#.as_bytes(),
        Format::Json,
    )
    .unwrap();
    r.import(
        r#"[{"id": "a", "address": "h:9", "tags": ["z"]}]"#.as_bytes(),
        Format::Json,
    )
    .unwrap();
    let a = r.get("a").unwrap().unwrap();
    assert_eq!(
        (a.address.as_str(), a.tags.clone()),
        ("h:9", vec!["z".to_owned()])
    );
    let (tagged_x, _) = r
        .list(
            &Filter {
                tags: vec!["x".into()],
                ..Filter::default()
            },
            0,
            10,
        )
        .unwrap();
    assert!(tagged_x.is_empty());
}

#[test]
fn add_refuses_a_taken_id_and_remove_forgets_tags() {
    let mut r = Registry::open(&temp_db("add")).unwrap();
    let device = Device {
        id: "d1".into(),
        name: "D1".into(),
        address: "127.0.0.1:9000".into(),
        delivery: Delivery::Http,
        tags: vec!["t".into()],
        group: None,
        location: None,
        version: Some("1.0.0".into()),
        last_seen: None,
        health: Health::Unknown,
    };
    r.add(&device).unwrap();
    assert!(matches!(r.add(&device), Err(RegistryError::Exists(id)) if id == "d1"));
    assert_eq!(r.get("d1").unwrap().unwrap(), device);
    assert!(r.remove("d1").unwrap());
    assert!(!r.remove("d1").unwrap());
    assert!(r.get("d1").unwrap().is_none());
    let mut blank = device.clone();
    blank.id = " ".into();
    assert!(matches!(r.add(&blank), Err(RegistryError::Invalid(_))));
    let mut semicolon = device.clone();
    semicolon.tags = vec!["a;b".into()];
    assert!(matches!(r.add(&semicolon), Err(RegistryError::Invalid(m)) if m.contains("`;`")));
}

#[test]
fn imports_twenty_thousand_devices_in_one_go() {
    let mut r = Registry::open(&temp_db("bulk")).unwrap();
    let mut csv = String::from("id,address,tags,group,version\n");
    for i in 0..20_000 {
        csv.push_str(&format!(
            "dev-{i:06},10.{}.{}.{}:8080,{},g{},1.{}.0\n",
            i / 65536,
            (i / 256) % 256,
            i % 256,
            if i % 10 == 0 { "canary" } else { "main" },
            i % 7,
            i % 3
        ));
    }
    assert_eq!(r.import(csv.as_bytes(), Format::Csv).unwrap(), 20_000);
    let (_, canaries) = r
        .list(
            &Filter {
                tags: vec!["canary".into()],
                group: Some("g0".into()),
                ..Filter::default()
            },
            0,
            0,
        )
        .unwrap();
    // i % 10 == 0 and i % 7 == 0: multiples of 70 below 20 000.
    assert_eq!(canaries, 286);
}
