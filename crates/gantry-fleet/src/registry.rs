//! The device registry: one SQLite database.
//!
//! A device has an id (unique, the key), a name, an address (`host:port` for HTTP delivery,
//! `[user@]host[:port]` for SSH), a delivery kind, tags, a group, a location, the version it runs,
//! when it was last seen and its health. Tags live in their own table, indexed by tag, so a
//! filter on a tag is an index lookup at a million devices; so are group, location and last-seen
//! filters. A version filter is a semver requirement (`>=1.2, <2`) checked on the rows the other
//! filters leave (versions that are not semver never match one).
//!
//! Import ([`Registry::import`]) reads CSV or JSON and writes in one transaction, so a bad record
//! imports nothing: the error names its line (CSV) or position (JSON). A device whose id is
//! already registered is replaced. Export writes the same formats, so an export imports back.
//!
//! **Invariant:** a device's tags are exactly what was last written for it (replacing a device
//! replaces its tags).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// A registry failure.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// SQLite failed.
    #[error("registry database: {0}")]
    Database(#[from] rusqlite::Error),
    /// A device with this id exists already.
    #[error("device {0} already exists")]
    Exists(String),
    /// A record of an import, or a device given to `add`, is not valid.
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(String),
    /// Another orchestrator is running this rollout.
    #[error("{0}")]
    Busy(String),
}

/// How updates reach a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// `POST /update` to the device's agent.
    #[default]
    Http,
    /// Copy over SSH and run the install command.
    Ssh,
}

impl Delivery {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Http => "http",
            Delivery::Ssh => "ssh",
        }
    }
}

impl FromStr for Delivery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "http" | "" => Ok(Delivery::Http),
            "ssh" => Ok(Delivery::Ssh),
            other => Err(format!("delivery {other:?} is not http or ssh")),
        }
    }
}

/// A device's last known health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not checked yet.
    #[default]
    Unknown,
    /// `GET /health` answered 200.
    Healthy,
    /// It did not.
    Unhealthy,
}

impl Health {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

impl FromStr for Health {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unknown" | "" => Ok(Health::Unknown),
            "healthy" => Ok(Health::Healthy),
            "unhealthy" => Ok(Health::Unhealthy),
            other => Err(format!(
                "health {other:?} is not unknown, healthy or unhealthy"
            )),
        }
    }
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// Unique id.
    pub id: String,
    /// A human name (the id when left out).
    #[serde(default)]
    pub name: String,
    /// Where it is reached.
    pub address: String,
    /// How updates reach it.
    #[serde(default)]
    pub delivery: Delivery,
    /// Free-form tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Its group.
    #[serde(default)]
    pub group: Option<String>,
    /// Its location.
    #[serde(default)]
    pub location: Option<String>,
    /// The version it runs.
    #[serde(default)]
    pub version: Option<String>,
    /// When it was last seen (RFC 3339 in files; milliseconds since the epoch here).
    #[serde(default, with = "rfc3339_opt")]
    pub last_seen: Option<i64>,
    /// Its last known health.
    #[serde(default)]
    pub health: Health,
}

mod rfc3339_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(ms) => s.serialize_str(&super::format_time(*ms)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(t) if t.is_empty() => Ok(None),
            Some(t) => super::parse_time(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Now, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Parses an RFC 3339 time into milliseconds since the epoch.
pub fn parse_time(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("time {s:?} is not RFC 3339 ({e})"))
}

/// Formats milliseconds since the epoch as RFC 3339 (UTC).
pub fn format_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

impl Device {
    /// Checks the fields a registry refuses: an empty id or address, a blank tag, a NUL byte.
    pub fn check(&self) -> Result<(), String> {
        if self.id.trim().is_empty() {
            return Err("id is empty".into());
        }
        if self.address.trim().is_empty() {
            return Err(format!("device {}: address is empty", self.id));
        }
        if self.tags.iter().any(|t| t.trim().is_empty()) {
            return Err(format!("device {}: a tag is empty", self.id));
        }
        // `;` separates tags in CSV; a tag holding one would not survive an export.
        if let Some(t) = self.tags.iter().find(|t| t.contains(';')) {
            return Err(format!("device {}: tag {t:?} contains `;`", self.id));
        }
        let texts = [Some(&self.id), Some(&self.name), Some(&self.address)]
            .into_iter()
            .chain([&self.group, &self.location, &self.version].map(Option::as_ref))
            .flatten()
            .chain(&self.tags);
        if texts.into_iter().any(|t| t.contains('\0')) {
            return Err(format!("device {}: a field contains a NUL byte", self.id));
        }
        Ok(())
    }
}

/// Which devices a listing (or later, a rollout) targets. Every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Has all these tags.
    pub tags: Vec<String>,
    /// In this group.
    pub group: Option<String>,
    /// At this location.
    pub location: Option<String>,
    /// Runs a version matching this requirement.
    pub version: Option<semver::VersionReq>,
    /// Last seen at or after this time (ms).
    pub seen_since: Option<i64>,
    /// Not seen since this time (ms), or never seen.
    pub unseen_since: Option<i64>,
}

/// A [`Filter`] as written by a user (CLI flags, API query or body) and kept with a rollout:
/// times are relative (`seen_within`), so a dynamic rollout's filter keeps its meaning later.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterSpec {
    /// Has all these tags.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// In this group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// At this location.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// A semver requirement on the version it runs, e.g. `>=1.2, <2`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Seen within this many milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_within_ms: Option<u64>,
    /// Not seen for this many milliseconds (or never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unseen_for_ms: Option<u64>,
}

impl FilterSpec {
    /// The filter as of `now` (ms); an invalid version requirement is refused, named.
    pub fn at(&self, now: i64) -> Result<Filter, RegistryError> {
        let ago = |ms: u64| now.saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX));
        Ok(Filter {
            tags: self.tags.clone(),
            group: self.group.clone(),
            location: self.location.clone(),
            version: self
                .version
                .as_deref()
                .map(|v| {
                    semver::VersionReq::parse(v).map_err(|e| {
                        RegistryError::Invalid(format!("version requirement {v:?}: {e}"))
                    })
                })
                .transpose()?,
            seen_since: self.seen_within_ms.map(ago),
            unseen_since: self.unseen_for_ms.map(ago),
        })
    }
}

/// File formats of import and export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A header line and one device per line; tags separated by `;`.
    Csv,
    /// One JSON array of device objects.
    Json,
}

impl Format {
    /// The format a file name suggests (`.json` is JSON, anything else CSV).
    pub fn of_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Csv,
        }
    }
}

/// The CSV columns, in order.
pub const CSV_HEADER: [&str; 10] = [
    "id",
    "name",
    "address",
    "delivery",
    "tags",
    "group",
    "location",
    "version",
    "last_seen",
    "health",
];

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE devices (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    address      TEXT NOT NULL,
    delivery     TEXT NOT NULL,
    grp          TEXT,
    location     TEXT,
    version      TEXT,
    last_seen_ms INTEGER,
    health       TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX devices_group ON devices (grp);
CREATE INDEX devices_location ON devices (location);
CREATE INDEX devices_last_seen ON devices (last_seen_ms);
CREATE TABLE device_tags (
    tag       TEXT NOT NULL,
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    PRIMARY KEY (tag, device_id)
) WITHOUT ROWID;
CREATE INDEX device_tags_device ON device_tags (device_id);
"#,
    r#"
CREATE TABLE artifacts (
    version    TEXT PRIMARY KEY,
    path       TEXT NOT NULL,
    size       INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    signature  TEXT NOT NULL,
    public_key TEXT NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    r#"
CREATE TABLE rollouts (
    id         TEXT PRIMARY KEY,
    artifact   TEXT NOT NULL,
    spec       TEXT NOT NULL,
    targets    INTEGER NOT NULL,
    phase      TEXT NOT NULL,
    requested  TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE rollout_targets (
    rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    idx        INTEGER NOT NULL,
    device_id  TEXT NOT NULL,
    PRIMARY KEY (rollout_id, idx)
) WITHOUT ROWID;
CREATE TABLE rollout_events (
    rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    at_ms      INTEGER NOT NULL,
    change     TEXT NOT NULL,
    detail     TEXT,
    PRIMARY KEY (rollout_id, seq)
) WITHOUT ROWID;
"#,
    // Who runs a rollout: `<pid>:<nonce>` and until when, so two orchestrators never run one.
    r#"
ALTER TABLE rollouts ADD COLUMN runner TEXT;
ALTER TABLE rollouts ADD COLUMN runner_until_ms INTEGER;
"#,
];

/// A registered artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Artifact {
    /// The version it installs.
    pub version: String,
    /// The registry's copy of the file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of its bytes, hex.
    pub sha256: String,
    /// Ed25519 signature of the digest, hex.
    pub signature: String,
    /// The public key that verifies the signature, hex.
    pub public_key: String,
    /// When it was registered, milliseconds since the epoch.
    pub created_ms: i64,
}

/// The registry.
pub struct Registry {
    conn: Connection,
    /// Where artifact copies live: `<database file>.artifacts/` beside it.
    artifact_dir: PathBuf,
}

const COLUMNS: &str = "id, name, address, delivery, grp, location, version, last_seen_ms, health";

impl Registry {
    /// Opens (creating and migrating) the registry at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| RegistryError::Io(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
             PRAGMA temp_store = MEMORY;",
        )?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(version).unwrap_or(0))
        {
            tx.execute_batch(sql)?;
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        }
        tx.commit()?;
        // `<file>.artifacts` beside the database: two registries in one directory keep theirs apart.
        let mut dir_name = path.file_name().unwrap_or_default().to_os_string();
        dir_name.push(".artifacts");
        let artifact_dir = path.with_file_name(dir_name);
        Ok(Self { conn, artifact_dir })
    }

    /// Registers `file` as `version`: copies it into the registry's artifact directory, hashes
    /// it and signs the digest with `key`. A version can be registered once.
    pub fn add_artifact(
        &mut self,
        version: &str,
        file: &Path,
        key: &ed25519_dalek::SigningKey,
    ) -> Result<Artifact, RegistryError> {
        let safe = !version.is_empty()
            && !version.starts_with('.')
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
        if !safe {
            return Err(RegistryError::Invalid(format!(
                "version {version:?}: use letters, digits and . _ + - (not starting with .)"
            )));
        }
        if self.artifact(version)?.is_some() {
            return Err(RegistryError::Exists(format!("artifact {version}")));
        }
        let dest = self.artifact_dir.join(version);
        let stored = crate::artifact::store(file, &dest, key)
            .map_err(|e| RegistryError::Io(e.to_string()))?;
        let artifact = Artifact {
            version: version.to_owned(),
            path: stored.path,
            size: stored.size,
            sha256: stored.sha256,
            signature: stored.signature,
            public_key: stored.public_key,
            created_ms: now_ms(),
        };
        let inserted = self.conn.execute(
            "INSERT INTO artifacts (version, path, size, sha256, signature, public_key, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                artifact.version,
                artifact.path.to_string_lossy(),
                i64::try_from(artifact.size).unwrap_or(i64::MAX),
                artifact.sha256,
                artifact.signature,
                artifact.public_key,
                artifact.created_ms,
            ],
        );
        if let Err(e) = inserted {
            let _ = std::fs::remove_file(&dest);
            return Err(e.into());
        }
        Ok(artifact)
    }

    /// The artifact registered as `version`.
    pub fn artifact(&self, version: &str) -> Result<Option<Artifact>, RegistryError> {
        Ok(self
            .conn
            .query_row(
                "SELECT version, path, size, sha256, signature, public_key, created_ms
                 FROM artifacts WHERE version = ?1",
                [version],
                row_to_artifact,
            )
            .optional()?)
    }

    /// Every artifact, newest first.
    pub fn artifacts(&self) -> Result<Vec<Artifact>, RegistryError> {
        let mut stmt = self.conn.prepare(
            "SELECT version, path, size, sha256, signature, public_key, created_ms
             FROM artifacts ORDER BY created_ms DESC, version",
        )?;
        let all = stmt
            .query_map([], row_to_artifact)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(all)
    }

    /// Registers a new device; [`RegistryError::Exists`] if its id is taken.
    pub fn add(&mut self, device: &Device) -> Result<(), RegistryError> {
        device.check().map_err(RegistryError::Invalid)?;
        let tx = self.conn.transaction()?;
        let taken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE id = ?1)",
            [&device.id],
            |r| r.get(0),
        )?;
        if taken {
            return Err(RegistryError::Exists(device.id.clone()));
        }
        write_device(&tx, device)?;
        tx.commit()?;
        Ok(())
    }

    /// The device `id`.
    pub fn get(&self, id: &str) -> Result<Option<Device>, RegistryError> {
        let device = self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM devices WHERE id = ?1"))?
            .query_row([id], row_to_device)
            .optional()?;
        match device {
            Some(mut d) => {
                d.tags = self.tags_of(id)?;
                Ok(Some(d))
            }
            None => Ok(None),
        }
    }

    fn tags_of(&self, id: &str) -> Result<Vec<String>, RegistryError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT tag FROM device_tags WHERE device_id = ?1 ORDER BY tag")?;
        let tags = stmt
            .query_map([id], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(tags)
    }

    /// Records what a push or check found: the version the device runs now (when known), its
    /// health, and that it was seen at `at_ms`. False when the device is unknown.
    pub fn record_seen(
        &mut self,
        id: &str,
        version: Option<&str>,
        health: Health,
        at_ms: i64,
    ) -> Result<bool, RegistryError> {
        let n = self.conn.execute(
            "UPDATE devices SET version = COALESCE(?2, version), health = ?3, last_seen_ms = ?4
             WHERE id = ?1",
            params![id, version, health.as_str(), at_ms],
        )?;
        Ok(n == 1)
    }

    /// Removes the device `id`; false when there was none.
    pub fn remove(&mut self, id: &str) -> Result<bool, RegistryError> {
        Ok(self
            .conn
            .execute("DELETE FROM devices WHERE id = ?1", [id])?
            == 1)
    }

    /// Devices matching `filter` in id order: `limit` of them after skipping `offset`, and how
    /// many match in all.
    pub fn list(
        &self,
        filter: &Filter,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<Device>, u64), RegistryError> {
        let mut page = Vec::new();
        let mut total = 0u64;
        self.each(filter, |d| {
            if total >= offset as u64 && page.len() < limit {
                page.push(d);
            }
            total += 1;
            Ok(())
        })?;
        for d in &mut page {
            d.tags = self.tags_of(&d.id)?;
        }
        Ok((page, total))
    }

    /// Calls `f` with every device matching `filter`, in id order (tags not filled in).
    fn each(
        &self,
        filter: &Filter,
        mut f: impl FnMut(Device) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        let mut sql = format!("SELECT {COLUMNS} FROM devices d WHERE 1 = 1");
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        for tag in &filter.tags {
            values.push(tag.clone().into());
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM device_tags t WHERE t.tag = ?{} AND t.device_id = d.id)",
                values.len()
            ));
        }
        if let Some(g) = &filter.group {
            values.push(g.clone().into());
            sql.push_str(&format!(" AND grp = ?{}", values.len()));
        }
        if let Some(l) = &filter.location {
            values.push(l.clone().into());
            sql.push_str(&format!(" AND location = ?{}", values.len()));
        }
        if let Some(t) = filter.seen_since {
            values.push(t.into());
            sql.push_str(&format!(" AND last_seen_ms >= ?{}", values.len()));
        }
        if let Some(t) = filter.unseen_since {
            values.push(t.into());
            sql.push_str(&format!(
                " AND (last_seen_ms IS NULL OR last_seen_ms < ?{})",
                values.len()
            ));
        }
        sql.push_str(" ORDER BY id");
        let mut stmt = self.conn.prepare(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(values))?;
        while let Some(row) = rows.next()? {
            let device = row_to_device(row)?;
            if let Some(req) = &filter.version {
                let matches = device
                    .version
                    .as_deref()
                    .and_then(|v| semver::Version::parse(v.trim_start_matches('v')).ok())
                    .is_some_and(|v| req.matches(&v));
                if !matches {
                    continue;
                }
            }
            f(device)?;
        }
        Ok(())
    }

    /// How many devices are registered.
    pub fn count(&self) -> Result<u64, RegistryError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM devices", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Device counts by health.
    pub fn count_by_health(&self) -> Result<Vec<(String, u64)>, RegistryError> {
        let mut stmt = self
            .conn
            .prepare("SELECT health, count(*) FROM devices GROUP BY health ORDER BY health")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (h, n) = row?;
            out.push((h, u64::try_from(n).unwrap_or(0)));
        }
        Ok(out)
    }

    /// Imports devices from `input` in one transaction: all of them, or none when a record is
    /// bad (the error names its line or position). Existing ids are replaced. Returns how many.
    pub fn import(&mut self, input: impl Read, format: Format) -> Result<u64, RegistryError> {
        let tx = self.conn.transaction()?;
        let mut n = 0u64;
        let mut put = |device: Device, at: &str| -> Result<(), RegistryError> {
            device
                .check()
                .map_err(|e| RegistryError::Invalid(format!("{at}: {e}")))?;
            write_device(&tx, &device)?;
            n += 1;
            Ok(())
        };
        match format {
            Format::Csv => {
                let mut reader = csv::ReaderBuilder::new()
                    .trim(csv::Trim::All)
                    .from_reader(input);
                let header: Vec<String> = reader
                    .headers()
                    .map_err(|e| RegistryError::Invalid(format!("line 1: {e}")))?
                    .iter()
                    .map(str::to_owned)
                    .collect();
                let col = |name: &str| header.iter().position(|h| h == name);
                if let Some(unknown) = header.iter().find(|h| !CSV_HEADER.contains(&h.as_str())) {
                    return Err(RegistryError::Invalid(format!(
                        "line 1: unknown column {unknown:?}; the columns are {}",
                        CSV_HEADER.join(",")
                    )));
                }
                let (Some(id_col), Some(address_col)) = (col("id"), col("address")) else {
                    return Err(RegistryError::Invalid(
                        "line 1: the header needs at least the columns id and address".into(),
                    ));
                };
                let cols: Vec<Option<usize>> = CSV_HEADER.iter().map(|h| col(h)).collect();
                let mut record = csv::StringRecord::new();
                loop {
                    let line = reader.position().line();
                    let more = reader
                        .read_record(&mut record)
                        .map_err(|e| RegistryError::Invalid(format!("line {line}: {e}")))?;
                    if !more {
                        break;
                    }
                    let at = format!("line {line}");
                    let field = |i: usize| cols[i].and_then(|c| record.get(c)).unwrap_or("");
                    let opt = |i: usize| Some(field(i).to_owned()).filter(|s| !s.is_empty());
                    let bad = |e: String| RegistryError::Invalid(format!("{at}: {e}"));
                    let id = record.get(id_col).unwrap_or("").to_owned();
                    let device = Device {
                        name: opt(1).unwrap_or_else(|| id.clone()),
                        address: record.get(address_col).unwrap_or("").to_owned(),
                        delivery: field(3).parse().map_err(bad)?,
                        tags: field(4)
                            .split(';')
                            .map(str::trim)
                            .filter(|t| !t.is_empty())
                            .map(str::to_owned)
                            .collect(),
                        group: opt(5),
                        location: opt(6),
                        version: opt(7),
                        last_seen: opt(8).map(|t| parse_time(&t)).transpose().map_err(bad)?,
                        health: field(9).parse().map_err(bad)?,
                        id,
                    };
                    put(device, &at)?;
                }
            }
            Format::Json => {
                let devices: Vec<serde_json::Value> = serde_json::from_reader(input)
                    .map_err(|e| RegistryError::Invalid(format!("JSON: {e}")))?;
                for (i, value) in devices.into_iter().enumerate() {
                    let at = format!("device [{i}]");
                    let mut device: Device = serde_json::from_value(value)
                        .map_err(|e| RegistryError::Invalid(format!("{at}: {e}")))?;
                    if device.name.is_empty() {
                        device.name.clone_from(&device.id);
                    }
                    put(device, &at)?;
                }
            }
        }
        tx.commit()?;
        Ok(n)
    }

    /// Writes every device matching `filter` to `out`, in id order.
    pub fn export(
        &self,
        filter: &Filter,
        format: Format,
        out: impl Write,
    ) -> Result<u64, RegistryError> {
        let io = |e: std::io::Error| RegistryError::Io(format!("cannot write the export: {e}"));
        let mut n = 0u64;
        match format {
            Format::Csv => {
                let mut w = csv::Writer::from_writer(out);
                w.write_record(CSV_HEADER)
                    .map_err(|e| RegistryError::Io(e.to_string()))?;
                self.each(filter, |mut d| {
                    d.tags = self.tags_of(&d.id)?;
                    let tags = d.tags.join(";");
                    let seen = d.last_seen.map(format_time).unwrap_or_default();
                    w.write_record([
                        d.id.as_str(),
                        &d.name,
                        &d.address,
                        d.delivery.as_str(),
                        &tags,
                        d.group.as_deref().unwrap_or(""),
                        d.location.as_deref().unwrap_or(""),
                        d.version.as_deref().unwrap_or(""),
                        &seen,
                        d.health.as_str(),
                    ])
                    .map_err(|e| RegistryError::Io(e.to_string()))?;
                    n += 1;
                    Ok(())
                })?;
                w.flush().map_err(io)?;
            }
            Format::Json => {
                let mut out = std::io::BufWriter::new(out);
                out.write_all(b"[").map_err(io)?;
                self.each(filter, |mut d| {
                    d.tags = self.tags_of(&d.id)?;
                    if n > 0 {
                        out.write_all(b",").map_err(io)?;
                    }
                    out.write_all(b"\n").map_err(io)?;
                    serde_json::to_writer(&mut out, &d)
                        .map_err(|e| RegistryError::Io(e.to_string()))?;
                    n += 1;
                    Ok(())
                })?;
                out.write_all(b"\n]\n").map_err(io)?;
                out.flush().map_err(io)?;
            }
        }
        Ok(n)
    }
}

fn write_device(tx: &Connection, d: &Device) -> Result<(), RegistryError> {
    tx.prepare_cached(&format!(
        "INSERT OR REPLACE INTO devices ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
    ))?
    .execute(params![
        d.id,
        if d.name.is_empty() { &d.id } else { &d.name },
        d.address,
        d.delivery.as_str(),
        d.group,
        d.location,
        d.version,
        d.last_seen,
        d.health.as_str(),
    ])?;
    tx.prepare_cached("DELETE FROM device_tags WHERE device_id = ?1")?
        .execute([&d.id])?;
    let mut insert =
        tx.prepare_cached("INSERT OR IGNORE INTO device_tags (tag, device_id) VALUES (?1, ?2)")?;
    for tag in &d.tags {
        insert.execute(params![tag, d.id])?;
    }
    Ok(())
}

fn row_to_artifact(r: &rusqlite::Row<'_>) -> rusqlite::Result<Artifact> {
    let path: String = r.get(1)?;
    let size: i64 = r.get(2)?;
    Ok(Artifact {
        version: r.get(0)?,
        path: PathBuf::from(path),
        size: u64::try_from(size).unwrap_or(0),
        sha256: r.get(3)?,
        signature: r.get(4)?,
        public_key: r.get(5)?,
        created_ms: r.get(6)?,
    })
}

fn row_to_device(r: &rusqlite::Row<'_>) -> rusqlite::Result<Device> {
    let text = |i: usize| -> rusqlite::Result<String> { r.get(i) };
    let delivery: String = text(3)?;
    let health: String = text(8)?;
    Ok(Device {
        id: text(0)?,
        name: text(1)?,
        address: text(2)?,
        delivery: delivery.parse().unwrap_or_default(),
        tags: Vec::new(),
        group: r.get(4)?,
        location: r.get(5)?,
        version: r.get(6)?,
        last_seen: r.get(7)?,
        health: health.parse().unwrap_or_default(),
    })
}
