//! Commands that run and exit: version, config, and usage errors.

use std::io::Write as _;

use crate::gantry;

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gantry-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    path
}

#[test]
fn version_prints_version_and_commit() {
    let out = gantry().arg("version").output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with(&format!("gantry {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
}

#[test]
fn config_default_is_a_valid_config() {
    let out = gantry().args(["config", "default"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[admin]") && text.contains("listen = \"127.0.0.1:8080\""));
    let path = temp_file("default.toml", &text);
    let out = gantry()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8(out.stdout).unwrap().ends_with(": ok\n"));
}

#[test]
fn config_check_names_misspelt_key_and_line() {
    let path = temp_file(
        "misspelt.toml",
        "[admin]\nlisten = \"127.0.0.1:8080\"\n\n[log]\nlevle = \"debug\"\n",
    );
    let out = gantry()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("misspelt.toml:5:1: log.levle: unknown field `levle`"),
        "{stderr}"
    );
}

#[test]
fn config_check_applies_environment_overrides() {
    let path = temp_file("ok.toml", "[admin]\nlisten = \"127.0.0.1:8080\"\n");
    let out = gantry()
        .args(["config", "check"])
        .arg(&path)
        .env("GANTRY_ADMIN_LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("environment variable GANTRY_ADMIN_LISTEN"),
        "{stderr}"
    );
}

#[test]
fn config_check_of_a_missing_file_exits_2() {
    let out = gantry()
        .args(["config", "check", "/nonexistent/gantry.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("cannot read config file /nonexistent/gantry.toml")
    );
}

#[test]
fn serve_with_a_bad_config_exits_2_before_starting() {
    let path = temp_file("bad-value.toml", "[shutdown]\ndeadline = 5\n");
    let out = gantry()
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("bad-value.toml:2:12: shutdown.deadline:"),
        "{stderr}"
    );
}

#[test]
fn unknown_search_commands_are_usage_errors() {
    let out = gantry()
        .args(["search", "list", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "search printed output");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("unrecognized subcommand 'list'"),
        "{stderr}"
    );
}

#[test]
fn bad_flags_are_usage_errors() {
    let out = gantry()
        .args(["--log-format", "xml", "serve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = gantry()
        .args(["--log-level", "info,=,[", "serve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = gantry().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
