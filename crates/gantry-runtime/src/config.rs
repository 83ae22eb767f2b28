//! The one config file: TOML, every key overridable from the environment, validated before use.
//!
//! Loading goes in three steps, each reporting errors at their origin:
//! 1. the file (if any) is deserialized into [`Config`]; an unknown key or a bad value is reported
//!    with the file, line, column and dotted key (`gantry.toml:4:1: admin.listn: unknown field ...`);
//! 2. every `GANTRY_<SECTION>_<KEY>` environment variable is applied on top, one at a time, so a
//!    bad value names the variable that carried it; a `GANTRY_` variable whose section is known but
//!    whose key is not is an error too (variables listed in [`RESERVED_ENV`] are not config);
//! 3. the fields deserialize straight into checked types ([`SocketAddr`], [`Duration`],
//!    [`LogFilter`], [`LogFormat`]), so a [`Config`] that exists is a valid one.
//!
//! [`DEFAULT_CONFIG`] is the full documented default file that `gantry config default` prints; a test
//! keeps it equal to [`Config::default`].
//!
//! This module does not read any system's settings beyond the shared sections; each system adds
//! its own section when it is built.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The documented default config file, as printed by `gantry config default`.
pub const DEFAULT_CONFIG: &str = r#"# Gantry configuration.
#
# Every key can be overridden by an environment variable named GANTRY_<SECTION>_<KEY>,
# e.g. GANTRY_ADMIN_LISTEN=0.0.0.0:8080 or GANTRY_SHUTDOWN_DEADLINE=10s.
# Unknown keys are errors. Durations take units: "500ms", "30s", "5m", "1h".

[admin]
# Address of the admin HTTP server: /health (liveness), /ready (readiness of each system as
# JSON, 503 until all are ready) and /metrics (Prometheus text format).
listen = "127.0.0.1:8080"

[log]
# "pretty" for people at a terminal, "json" (one object per line) for log collectors.
format = "pretty"
# A level (error, warn, info, debug, trace) or filter directives such as
# "info,gantry_jobs=debug". The RUST_LOG syntax of tracing-subscriber's EnvFilter.
level = "info"

[jobs]
# Run the jobs server (durable job execution, Reseolio's gRPC contract) in `gantry serve`.
enabled = true
# gRPC address of the jobs server.
listen = "127.0.0.1:50051"
# Where jobs are stored: a SQLite file (created if missing), or a postgres:// URL that several
# gantry servers can share (they never run one job twice at once).
database = "gantry-data/jobs.db"
# With PostgreSQL: the schema holding the jobs tables (created and migrated at start).
postgres_schema = "gantry_jobs"
# SQLite commit durability: "full" fsyncs every commit (survives power loss); "normal" survives a
# process crash but may lose the last commits on power loss. Ignored for PostgreSQL.
sync = "full"
# Finished jobs (success, dead, cancelled) are deleted this long after they finished, which also
# ends their idempotency keys. "0s" keeps them forever.
retention = "7d"

[jobs.queues]
# Most jobs of a queue running at once, across every worker (and every server sharing one
# PostgreSQL database). Jobs name their queue when enqueued ("default" otherwise); queues not
# listed here are unlimited. For example:
# emails = 5

[search]
# Run the Elasticsearch-compatible search server in `gantry serve`.
enabled = true
# HTTP address of the search server (Elasticsearch clients default to port 9200).
listen = "127.0.0.1:9200"
# Where indices keep their metadata, tantivy segments and translogs (created if missing).
data = "gantry-data/search"

[shutdown]
# After SIGINT or SIGTERM, running components drain in order (last started, first stopped).
# If the drain takes longer than this, the process exits anyway with status 1.
# A second signal exits at once.
deadline = "30s"
"#;

/// Environment variables that start with `GANTRY_` but are not config overrides.
///
/// `GANTRY_CONFIG` names the config file; `GANTRY_TEST_*` and `GANTRY_BENCH_*` belong to the test
/// suite and the benchmark drivers.
pub const RESERVED_ENV: &[&str] = &["GANTRY_CONFIG", "GANTRY_TEST_", "GANTRY_BENCH_"];

/// The whole configuration, checked.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The admin HTTP server.
    pub admin: AdminConfig,
    /// Logging.
    pub log: LogConfig,
    /// The jobs server.
    pub jobs: JobsConfig,
    /// The search server.
    pub search: SearchConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
}

/// `[jobs]`: the durable job server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Whether `gantry serve` runs it.
    pub enabled: bool,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// SQLite file path or `postgres://` URL.
    pub database: String,
    /// PostgreSQL schema for the jobs tables.
    pub postgres_schema: String,
    /// SQLite commit durability.
    pub sync: SyncMode,
    /// How long finished jobs are kept; zero keeps them forever.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Concurrency limit per named queue.
    pub queues: std::collections::BTreeMap<String, u32>,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            database: "gantry-data/jobs.db".to_owned(),
            postgres_schema: "gantry_jobs".to_owned(),
            sync: SyncMode::Full,
            retention: Duration::from_secs(7 * 24 * 3600),
            queues: std::collections::BTreeMap::new(),
        }
    }
}

/// `[search]`: the Elasticsearch-compatible search server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchConfig {
    /// Whether `gantry serve` runs it.
    pub enabled: bool,
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data: std::path::PathBuf,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9200)),
            data: "gantry-data/search".into(),
        }
    }
}

/// How hard commits are pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync every commit.
    #[default]
    Full,
    /// fsync at checkpoints; survives a process crash, not power loss.
    Normal,
}

/// `[admin]`: the admin HTTP server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address the admin server binds.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

/// `[log]`: the tracing subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// Level or filter directives.
    pub level: LogFilter,
}

/// `[shutdown]`: the ordered drain after a signal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Longest time the drain may take.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, coloured when the output is a terminal.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pretty" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format `{other}`, expected `pretty` or `json`"
            )),
        }
    }
}

/// A tracing filter (`info`, `warn,gantry_jobs=debug`), checked to parse when it is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct LogFilter(String);

impl LogFilter {
    /// The filter directives as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for LogFilter {
    fn default() -> Self {
        Self("info".to_owned())
    }
}

impl FromStr for LogFilter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("log level must not be empty".to_owned());
        }
        tracing_subscriber::EnvFilter::builder()
            .parse(s)
            .map_err(|e| format!("invalid log level or filter `{s}`: {e}"))?;
        Ok(Self(s.to_owned()))
    }
}

impl From<LogFilter> for String {
    fn from(f: LogFilter) -> Self {
        f.0
    }
}

impl<'de> Deserialize<'de> for LogFilter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for LogFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a bad value.
    #[error("{path}:{line}:{column}: {key}{message}")]
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// `section.key: ` when the problem is at a key, else empty.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// An environment override names an unknown key or carries a bad value.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Loads the configuration: embedded defaults, then the file (if any), then `GANTRY_*`
    /// overrides from `env`.
    ///
    /// ```
    /// use gantry_runtime::config::Config;
    ///
    /// let env = [("GANTRY_ADMIN_LISTEN".to_owned(), "127.0.0.1:9090".to_owned())];
    /// let config = Config::load(None, env).unwrap();
    /// assert_eq!(config.admin.listen.port(), 9090);
    /// assert_eq!(config.shutdown.deadline.as_secs(), 30);
    /// ```
    pub fn load<I>(path: Option<&Path>, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        match path {
            None => Self::from_parts(None, env),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::from_parts(Some((path, &text)), env)
            }
        }
    }

    /// Like [`Config::load`] with the file's text already in hand (`path` names it in errors).
    pub fn from_parts<I>(file: Option<(&Path, &str)>, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut table = match file {
            None => toml::Table::new(),
            Some((path, text)) => {
                // Typed first, so every error carries its span; then untyped, to layer env on top.
                toml::from_str::<Config>(text).map_err(|e| file_error(path, text, &e))?;
                toml::from_str::<toml::Table>(text).map_err(|e| file_error(path, text, &e))?
            }
        };

        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("GANTRY_"))
            .filter(|(k, _)| !RESERVED_ENV.iter().any(|r| k.starts_with(r)))
            .collect();
        overrides.sort();
        let schema = schema();
        for (var, value) in &overrides {
            apply_override(&schema, &mut table, var, value)?;
            // Check after each one so the error names the variable that broke it.
            Config::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
                ConfigError::Env {
                    var: var.clone(),
                    message: e.message().to_owned(),
                }
            })?;
        }
        Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Env {
            var: "(overrides)".to_owned(),
            message: e.message().to_owned(),
        })
    }
}

/// The shape of the config: each section with its keys and the type of their default values.
fn schema() -> toml::Table {
    // The defaults parse: `default_config_parses_to_default` holds it.
    toml::from_str(DEFAULT_CONFIG).unwrap_or_default()
}

/// Applies one `GANTRY_<SECTION>_<KEY>=value` to `table`, typed like the key's default value.
fn apply_override(
    schema: &toml::Table,
    table: &mut toml::Table,
    var: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let env_err = |message: String| ConfigError::Env {
        var: var.to_owned(),
        message,
    };
    let rest = var.strip_prefix("GANTRY_").unwrap_or(var);
    let (section, keys) = schema
        .iter()
        .filter_map(|(name, keys)| {
            let prefix = format!("{}_", env_name(name));
            rest.strip_prefix(prefix.as_str())
                .and_then(|key| keys.as_table().map(|keys| (name, keys, key)))
        })
        .max_by_key(|(name, _, _)| name.len())
        .map(|(name, keys, key)| {
            let found = keys.iter().find(|(k, _)| env_name(k) == key);
            (name.clone(), found)
        })
        .ok_or_else(|| {
            let sections: Vec<String> = schema.keys().map(|s| env_name(s)).collect();
            env_err(format!(
                "no config section matches; expected GANTRY_<SECTION>_<KEY> with SECTION one of {}",
                sections.join(", ")
            ))
        })?;
    let Some((key, default)) = keys else {
        return Err(env_err(format!(
            "unknown key in section [{section}]; known keys: {}",
            schema
                .get(&section)
                .and_then(|t| t.as_table())
                .map(|t| t.keys().map(|k| env_name(k)).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        )));
    };
    let parsed = match default {
        toml::Value::String(_) => toml::Value::String(value.to_owned()),
        toml::Value::Integer(_) => value
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| env_err(format!("expected an integer, got `{value}`")))?,
        toml::Value::Float(_) => value
            .trim()
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| env_err(format!("expected a number, got `{value}`")))?,
        toml::Value::Boolean(_) => match value.trim() {
            "true" | "1" => toml::Value::Boolean(true),
            "false" | "0" => toml::Value::Boolean(false),
            _ => return Err(env_err(format!("expected true or false, got `{value}`"))),
        },
        _ => toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .ok_or_else(|| env_err(format!("expected a TOML value, got `{value}`")))?,
    };
    let section_table = table
        .entry(section.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match section_table {
        toml::Value::Table(t) => {
            t.insert(key.clone(), parsed);
            Ok(())
        }
        _ => Err(env_err(format!("[{section}] in the file is not a table"))),
    }
}

fn env_name(key: &str) -> String {
    key.to_ascii_uppercase().replace('-', "_")
}

/// Turns a TOML error into one naming the file, line, column and dotted key.
fn file_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let offset = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    let key = key_at(text, line_start)
        .map(|k| format!("{k}: "))
        .unwrap_or_default();
    ConfigError::File {
        path: path.to_owned(),
        line,
        column,
        key,
        message: e.message().trim_end().to_owned(),
    }
}

/// The dotted key (`section.key`) defined on the line starting at `line_start`, if any.
fn key_at(text: &str, line_start: usize) -> Option<String> {
    let line = text[line_start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('#') {
        return None;
    }
    let section = text[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.strip_prefix('[')
            .and_then(|l| l.split_once(']'))
            .map(|(s, _)| s.trim().trim_matches(['[', ']']).to_owned())
    });
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_parts(Some((Path::new("gantry.toml"), text)), env).map_err(|e| e.to_string())
    }

    fn check_err(text: &str, env: &[(&str, &str)], expected: &str) {
        match load(text, env) {
            Ok(c) => panic!("expected error `{expected}`, got {c:?}"),
            Err(e) => assert!(e.contains(expected), "error `{e}` lacks `{expected}`"),
        }
    }

    #[test]
    fn default_config_parses_to_default() {
        assert_eq!(load(DEFAULT_CONFIG, &[]).unwrap(), Config::default());
        assert_eq!(
            Config::from_parts(None, std::iter::empty()).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = "[admin]\nlisten = \"127.0.0.1:1\"\n\n[shutdown]\ndeadlin = \"5s\"\n";
        check_err(
            text,
            &[],
            "gantry.toml:5:1: shutdown.deadlin: unknown field `deadlin`",
        );
    }

    #[test]
    fn unknown_section_is_rejected() {
        check_err("[admn]\nlisten = \"x\"\n", &[], "gantry.toml:1:");
        check_err("[admn]\nlisten = \"x\"\n", &[], "unknown field `admn`");
    }

    #[test]
    fn bad_value_type_names_line_and_key() {
        check_err(
            "# comment\n[admin]\nlisten = 8080\n",
            &[],
            "gantry.toml:3:10: admin.listen: invalid type: integer `8080`",
        );
        check_err(
            "[shutdown]\ndeadline = \"soon\"\n",
            &[],
            "gantry.toml:2:12: shutdown.deadline:",
        );
        check_err(
            "[log]\nformat = \"xml\"\n",
            &[],
            "gantry.toml:2:10: log.format: unknown variant `xml`",
        );
        check_err(
            "[log]\nlevel = \"info,=,[\"\n",
            &[],
            "log.level: invalid log level or filter",
        );
    }

    #[test]
    fn malformed_toml_names_line() {
        check_err("[admin]\nlisten = \n", &[], "gantry.toml:2:");
    }

    #[test]
    fn env_override_wins_over_file() {
        let c = load(
            "[admin]\nlisten = \"127.0.0.1:1000\"\n[shutdown]\ndeadline = \"5s\"\n",
            &[
                ("GANTRY_ADMIN_LISTEN", "127.0.0.1:2000"),
                ("GANTRY_LOG_FORMAT", "json"),
            ],
        )
        .unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:2000".parse().unwrap());
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.shutdown.deadline, Duration::from_secs(5));
    }

    #[test]
    fn queue_limits_from_file_and_env() {
        let c = load("[jobs.queues]\nemails = 5\n", &[]).unwrap();
        assert_eq!(c.jobs.queues.get("emails"), Some(&5));
        let c = load("", &[("GANTRY_JOBS_QUEUES", "{ sms = 2, push = 0 }")]).unwrap();
        assert_eq!(c.jobs.queues.len(), 2);
        check_err(
            "[jobs.queues]\nemails = -1\n",
            &[],
            "gantry.toml:2:10: jobs.queues.emails:",
        );
    }

    #[test]
    fn env_override_without_file() {
        let env = [("GANTRY_SHUTDOWN_DEADLINE".to_owned(), "250ms".to_owned())];
        let c = Config::from_parts(None, env).unwrap();
        assert_eq!(c.shutdown.deadline, Duration::from_millis(250));
    }

    #[test]
    fn bad_env_values_and_keys_name_the_variable() {
        check_err(
            "",
            &[("GANTRY_ADMIN_LISTEN", "nowhere")],
            "environment variable GANTRY_ADMIN_LISTEN: invalid socket address",
        );
        check_err(
            "",
            &[("GANTRY_ADMIN_LISTN", "127.0.0.1:1")],
            "environment variable GANTRY_ADMIN_LISTN: unknown key in section [admin]",
        );
        check_err(
            "",
            &[("GANTRY_NOPE_X", "1")],
            "environment variable GANTRY_NOPE_X: no config section matches",
        );
    }

    #[test]
    fn reserved_env_is_not_config() {
        let c = load(
            "",
            &[
                ("GANTRY_CONFIG", "/etc/gantry.toml"),
                ("GANTRY_TEST_DATABASE_URL", "postgres://x"),
                ("OTHER", "1"),
            ],
        )
        .unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn log_filter_accepts_directives() {
        assert!("info,gantry_jobs=debug".parse::<LogFilter>().is_ok());
        assert!("".parse::<LogFilter>().is_err());
    }
}
