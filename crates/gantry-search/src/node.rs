//! The node: the registry of indices on disk under one data directory.
//!
//! Owns index metadata (settings, mappings, uuid), index-name validation, pattern resolution,
//! document routing to shards, and applying dynamic-mapping growth before a write reaches a shard.
//! It does not own shard internals (see `shard`) nor the wire format (see `api`).
//!
//! Layout:
//! ```text
//! DATA/node.json                       node name, cluster uuid
//! DATA/indices/<uuid>/meta.json        name, uuid, creation date, settings, mappings
//! DATA/indices/<uuid>/<shard>/index/   tantivy
//! DATA/indices/<uuid>/<shard>/translog
//! ```
//!
//! **Invariant:** `meta.json` is replaced atomically (write, fsync, rename, fsync directory), and a
//! mapping change is saved before any document needing it is written to a shard, so a replayed
//! translog always finds its fields mapped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ErrorKind, EsError};
use crate::mapping::{Mapping, ParsedDoc};
use crate::shard::{Shard, ShardOptions};
use crate::translog::Durability;

/// The settings of an index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexSettings {
    /// Primary shards (fixed at creation).
    pub number_of_shards: u32,
    /// Replicas (recorded; a single node allocates none).
    pub number_of_replicas: u32,
    /// Refresh interval as given (`1s`, `-1`, `500ms`).
    pub refresh_interval: String,
    /// `request` or `async`.
    pub durability: Durability,
}

impl Default for IndexSettings {
    fn default() -> Self {
        Self {
            number_of_shards: 1,
            number_of_replicas: 1,
            refresh_interval: "1s".into(),
            durability: Durability::Request,
        }
    }
}

fn setting<'a>(settings: &'a Value, key: &str) -> Option<&'a Value> {
    // Accept `{"index": {"number_of_shards": 1}}`, `{"number_of_shards": 1}` and
    // `{"index.number_of_shards": 1}`.
    settings
        .get("index")
        .and_then(|i| i.get(key))
        .or_else(|| settings.get(key))
        .or_else(|| settings.get(format!("index.{key}")))
}

fn as_u32(v: &Value, key: &str) -> Result<u32, EsError> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            EsError::illegal_argument(format!(
                "Failed to parse value [{v}] for setting [index.{key}]"
            ))
        })
}

/// Parses a time value (`1s`, `500ms`, `2m`, `-1`).
pub fn parse_interval(s: &str) -> Result<Option<Duration>, EsError> {
    if s == "-1" {
        return Ok(None);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad_interval(s))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "" if n == 0 => Duration::ZERO,
        _ => return Err(bad_interval(s)),
    };
    Ok(Some(d))
}

fn bad_interval(s: &str) -> EsError {
    EsError::illegal_argument(format!(
        "failed to parse setting [index.refresh_interval] with value [{s}] as a time value: unit is missing or unrecognized"
    ))
}

impl IndexSettings {
    /// Parses the `settings` object of `PUT /{index}`.
    pub fn from_json(settings: &Value) -> Result<Self, EsError> {
        let mut out = Self::default();
        if let Some(v) = setting(settings, "number_of_shards") {
            out.number_of_shards = as_u32(v, "number_of_shards")?;
            if out.number_of_shards == 0 || out.number_of_shards > 1024 {
                return Err(EsError::illegal_argument(format!(
                    "Failed to parse value [{}] for setting [index.number_of_shards] must be >= 1 and <= 1024",
                    out.number_of_shards
                )));
            }
        }
        if let Some(v) = setting(settings, "number_of_replicas") {
            out.number_of_replicas = as_u32(v, "number_of_replicas")?;
        }
        if let Some(v) = setting(settings, "refresh_interval") {
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return Err(bad_interval(&v.to_string())),
            };
            parse_interval(&s)?;
            out.refresh_interval = s;
        }
        if let Some(v) = settings
            .get("index")
            .and_then(|i| i.get("translog"))
            .and_then(|t| t.get("durability"))
            .or_else(|| settings.get("index.translog.durability"))
        {
            out.durability = match v.as_str() {
                Some("request") => Durability::Request,
                Some("async") => Durability::Async,
                _ => {
                    return Err(EsError::illegal_argument(format!(
                        "illegal value [{v}] for [index.translog.durability]"
                    )));
                }
            };
        }
        Ok(out)
    }

    /// ES's `GET /{index}/_settings` form (values as strings, as ES prints them).
    pub fn to_json(&self, name: &str, uuid: &str, created: i64) -> Value {
        json!({
            "index": {
                "number_of_shards": self.number_of_shards.to_string(),
                "number_of_replicas": self.number_of_replicas.to_string(),
                "refresh_interval": self.refresh_interval,
                "translog": { "durability": match self.durability {
                    Durability::Request => "request",
                    Durability::Async => "async",
                }},
                "provided_name": name,
                "uuid": uuid,
                "creation_date": created.to_string(),
                "version": { "created": "8512000" },
            }
        })
    }

    fn shard_options(&self, refresh_seconds: Option<prometheus::Histogram>) -> ShardOptions {
        ShardOptions {
            refresh_interval: parse_interval(&self.refresh_interval)
                .ok()
                .flatten()
                .map(|d| d.max(Duration::from_millis(10))),
            durability: self.durability,
            refresh_seconds,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct MetaFile {
    name: String,
    uuid: String,
    creation_date: i64,
    settings: Value,
    mappings: Value,
}

/// One open index.
#[derive(Debug)]
pub struct IndexHandle {
    /// Its name.
    pub name: String,
    /// Its uuid (also its directory name).
    pub uuid: String,
    /// Creation time, epoch milliseconds.
    pub created: i64,
    settings: RwLock<IndexSettings>,
    mapping: Arc<RwLock<Mapping>>,
    shards: Vec<Shard>,
    dir: PathBuf,
    meta_lock: Mutex<()>,
    deleted: std::sync::atomic::AtomicBool,
}

impl Drop for IndexHandle {
    fn drop(&mut self) {
        // Stop the writer threads first, then remove the files they wrote.
        drop(std::mem::take(&mut self.shards));
        if self.deleted.load(std::sync::atomic::Ordering::SeqCst) {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove a deleted index");
            }
        }
    }
}

/// A stable shard choice for a document id.
pub fn route(id: &str, shards: usize) -> usize {
    (crc32fast::hash(id.as_bytes()) as usize) % shards.max(1)
}

impl IndexHandle {
    /// Its shards.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The shard holding `id`.
    pub fn shard_for(&self, id: &str) -> &Shard {
        &self.shards[route(id, self.shards.len())]
    }

    /// A snapshot of the mapping.
    pub fn mapping(&self) -> Mapping {
        self.mapping
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A snapshot of the settings.
    pub fn settings(&self) -> IndexSettings {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Merges `update` into the mapping and saves it. Blocking.
    pub fn put_mapping(&self, update: &Mapping) -> Result<(), EsError> {
        let _guard = self.meta_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut merged = self.mapping();
        merged.merge(update)?;
        self.save(&self.settings(), &merged)?;
        *self.mapping.write().unwrap_or_else(|e| e.into_inner()) = merged;
        Ok(())
    }

    /// Checks `source` against the mapping, saving any dynamic growth first. Blocking.
    pub fn prepare_document(&self, source: &Value, id: &str) -> Result<ParsedDoc, EsError> {
        let (parsed, grown) = self.mapping().parse_document(source, id)?;
        if grown.is_none() {
            return Ok(parsed);
        }
        let _guard = self.meta_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Another writer may have grown the mapping meanwhile: parse again under the lock.
        let current = self.mapping();
        let (parsed, grown) = current.parse_document(source, id)?;
        if let Some(grown) = grown {
            self.save(&self.settings(), &grown)?;
            *self.mapping.write().unwrap_or_else(|e| e.into_inner()) = grown;
        }
        Ok(parsed)
    }

    /// Grows the mapping for fields a partial update or upsert will bring. Blocking.
    pub fn prepare_fields(&self, value: &Value) -> Result<(), EsError> {
        self.prepare_document(value, "_update").map(|_| ())
    }

    fn save(&self, settings: &IndexSettings, mapping: &Mapping) -> Result<(), EsError> {
        let meta = MetaFile {
            name: self.name.clone(),
            uuid: self.uuid.clone(),
            creation_date: self.created,
            settings: settings.to_json(&self.name, &self.uuid, self.created),
            mappings: mapping.to_json(),
        };
        write_atomic(
            &self.dir.join("meta.json"),
            &serde_json::to_vec_pretty(&meta).unwrap_or_default(),
        )?;
        Ok(())
    }

    /// Live documents visible to search, over all shards.
    pub fn doc_count(&self) -> u64 {
        self.shards.iter().map(Shard::doc_count).sum()
    }

    /// Deleted documents not yet merged away, over all shards.
    pub fn deleted_count(&self) -> u64 {
        self.shards.iter().map(Shard::deleted_count).sum()
    }

    /// Bytes on disk.
    pub fn size_in_bytes(&self) -> u64 {
        self.shards.iter().map(Shard::size_in_bytes).sum()
    }

    /// Refreshes every shard.
    pub async fn refresh(&self) -> Result<(), EsError> {
        for shard in &self.shards {
            shard.refresh().await?;
        }
        Ok(())
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Checks an index name against ES's rules.
pub fn validate_index_name(name: &str) -> Result<(), EsError> {
    let bad = |why: &str| {
        Err(EsError::new(
            ErrorKind::InvalidIndexName,
            format!("Invalid index name [{name}], {why}"),
        )
        .with_index(name))
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name != name.to_lowercase() {
        return bad("must be lowercase");
    }
    if name.starts_with(['_', '-', '+']) {
        return bad("must not start with '_', '-', or '+'");
    }
    if name == "." || name == ".." {
        return bad("must not be '.' or '..'");
    }
    if name.contains(['\\', '/', '*', '?', '"', '<', '>', '|', ' ', ',', '#', ':']) {
        return bad(
            r#"must not contain the following characters ['\','/','*','?','"','<','>','|',' ',',','#',':']"#,
        );
    }
    if name.len() > 255 {
        return bad("index name is too long");
    }
    Ok(())
}

/// Glob match with `*` only.
pub fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// The node: every index under the data directory.
#[derive(Debug)]
pub struct Node {
    data: PathBuf,
    /// Node name.
    pub name: String,
    /// Cluster uuid (stable across restarts).
    pub cluster_uuid: String,
    /// Node id.
    pub node_id: String,
    indices: RwLock<BTreeMap<String, Arc<IndexHandle>>>,
    create_lock: Mutex<()>,
    refresh_seconds: Option<prometheus::Histogram>,
}

#[derive(Debug, Serialize, Deserialize)]
struct NodeFile {
    name: String,
    cluster_uuid: String,
    node_id: String,
}

impl Node {
    /// Opens the data directory, reopening every index (and replaying its translogs). Blocking.
    pub fn open(data: &Path) -> Result<Self, EsError> {
        Self::open_with(data, None)
    }

    /// [`Node::open`], observing every shard refresh's duration on `refresh_seconds`.
    pub fn open_with(
        data: &Path,
        refresh_seconds: Option<prometheus::Histogram>,
    ) -> Result<Self, EsError> {
        std::fs::create_dir_all(data.join("indices"))?;
        let node_file = data.join("node.json");
        let node: NodeFile = match std::fs::read(&node_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| EsError::internal(format!("bad node.json: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let node = NodeFile {
                    name: "gantry".into(),
                    cluster_uuid: short_uuid(),
                    node_id: short_uuid(),
                };
                write_atomic(
                    &node_file,
                    &serde_json::to_vec_pretty(&node).unwrap_or_default(),
                )?;
                node
            }
            Err(e) => return Err(e.into()),
        };
        let mut indices = BTreeMap::new();
        for entry in std::fs::read_dir(data.join("indices"))? {
            let dir = entry?.path();
            let meta_path = dir.join("meta.json");
            let Ok(bytes) = std::fs::read(&meta_path) else {
                // An index whose creation never finished: nothing was acknowledged in it.
                tracing::warn!(dir = %dir.display(), "removing an index directory without metadata");
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            };
            let meta: MetaFile = serde_json::from_slice(&bytes)
                .map_err(|e| EsError::internal(format!("bad {}: {e}", meta_path.display())))?;
            let settings = IndexSettings::from_json(&meta.settings)?;
            let mapping = Mapping::from_json(&meta.mappings)?;
            let handle = open_index(
                &dir,
                meta.name.clone(),
                meta.uuid,
                meta.creation_date,
                settings,
                mapping,
                refresh_seconds.clone(),
            )?;
            indices.insert(meta.name, Arc::new(handle));
        }
        Ok(Self {
            data: data.to_owned(),
            name: node.name,
            cluster_uuid: node.cluster_uuid,
            node_id: node.node_id,
            indices: RwLock::new(indices),
            create_lock: Mutex::new(()),
            refresh_seconds,
        })
    }

    /// The index called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<IndexHandle>> {
        self.indices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every index, by name.
    pub fn all(&self) -> Vec<Arc<IndexHandle>> {
        self.indices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Resolves a comma-separated list of names and `*` patterns (`_all` for every index). A
    /// missing concrete name is `index_not_found_exception`; a pattern may match nothing.
    pub fn resolve(&self, expr: &str) -> Result<Vec<Arc<IndexHandle>>, EsError> {
        let all = self.all();
        let mut out: Vec<Arc<IndexHandle>> = Vec::new();
        for part in expr.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some(excluded) = part.strip_prefix('-') {
                out.retain(|i| !glob(excluded, &i.name));
                continue;
            }
            if part == "_all" || part.contains('*') {
                let pattern = if part == "_all" { "*" } else { part };
                for index in all.iter().filter(|i| glob(pattern, &i.name)) {
                    if !out.iter().any(|o| o.name == index.name) {
                        out.push(index.clone());
                    }
                }
                continue;
            }
            match self.get(part) {
                Some(index) => {
                    if !out.iter().any(|o| o.name == index.name) {
                        out.push(index);
                    }
                }
                None => return Err(EsError::index_not_found(part)),
            }
        }
        Ok(out)
    }

    /// Creates an index. Blocking.
    pub fn create(
        &self,
        name: &str,
        settings: IndexSettings,
        mapping: Mapping,
    ) -> Result<Arc<IndexHandle>, EsError> {
        validate_index_name(name)?;
        let _guard = self.create_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = self.get(name) {
            return Err(EsError::new(
                ErrorKind::ResourceAlreadyExists,
                format!("index [{name}/{}] already exists", existing.uuid),
            )
            .with_index(name));
        }
        let uuid = short_uuid();
        let dir = self.data.join("indices").join(&uuid);
        std::fs::create_dir_all(&dir)?;
        let created = chrono::Utc::now().timestamp_millis();
        let handle = open_index(
            &dir,
            name.to_owned(),
            uuid,
            created,
            settings,
            mapping,
            self.refresh_seconds.clone(),
        )?;
        handle.save(&handle.settings(), &handle.mapping())?;
        let handle = Arc::new(handle);
        self.indices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), handle.clone());
        tracing::info!(index = name, uuid = %handle.uuid, "index created");
        Ok(handle)
    }

    /// The index called `name`, created with defaults when it does not exist (ES's auto-create on
    /// first write). Blocking.
    pub fn get_or_create(&self, name: &str) -> Result<Arc<IndexHandle>, EsError> {
        if let Some(index) = self.get(name) {
            return Ok(index);
        }
        match self.create(name, IndexSettings::default(), Mapping::default()) {
            Err(e) if e.kind == ErrorKind::ResourceAlreadyExists => {
                self.get(name).ok_or_else(|| EsError::index_not_found(name))
            }
            other => other,
        }
    }

    /// Deletes an index; its files go once the last request using it is done. Blocking.
    pub fn delete(&self, name: &str) -> Result<(), EsError> {
        let removed = self
            .indices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let Some(index) = removed else {
            return Err(EsError::index_not_found(name));
        };
        // Remove the metadata now so a crash before the files go does not bring it back.
        let _ = std::fs::remove_file(index.dir.join("meta.json"));
        index
            .deleted
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(index = name, "index deleted");
        Ok(())
    }

    /// Closes every index (final refresh of every shard).
    pub fn close(&self) {
        let all = std::mem::take(&mut *self.indices.write().unwrap_or_else(|e| e.into_inner()));
        drop(all);
    }
}

fn open_index(
    dir: &Path,
    name: String,
    uuid: String,
    created: i64,
    settings: IndexSettings,
    mapping: Mapping,
    refresh_seconds: Option<prometheus::Histogram>,
) -> Result<IndexHandle, EsError> {
    let mapping = Arc::new(RwLock::new(mapping));
    let mut shards = Vec::new();
    for n in 0..settings.number_of_shards {
        let (shard, recovery) = Shard::open(
            &dir.join(n.to_string()),
            mapping.clone(),
            settings.shard_options(refresh_seconds.clone()),
        )?;
        if recovery.replayed_ops > 0 {
            tracing::info!(index = %name, shard = n, replayed = recovery.replayed_ops, "translog replayed");
        }
        shards.push(shard);
    }
    Ok(IndexHandle {
        name,
        uuid,
        created,
        settings: RwLock::new(settings),
        mapping,
        shards,
        dir: dir.to_owned(),
        meta_lock: Mutex::new(()),
        deleted: std::sync::atomic::AtomicBool::new(false),
    })
}

/// A 22-character url-safe id, like ES's uuids.
pub fn short_uuid() -> String {
    let bytes = uuid::Uuid::now_v7().into_bytes();
    let mut out = String::with_capacity(22);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(ALPHABET[((acc >> bits) & 63) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (6 - bits)) & 63) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_follow_es_rules() {
        assert!(validate_index_name("logs-2024.01").is_ok());
        for bad in ["", "Logs", "_x", "-x", "a*b", "a b", "a,b", ".."] {
            assert!(validate_index_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob("log*", "logs"));
        assert!(glob("*", "x"));
        assert!(glob("a*c*e", "abcde"));
        assert!(!glob("a*c", "abd"));
        assert!(glob("x", "x"));
    }

    #[test]
    fn intervals() {
        assert_eq!(
            parse_interval("1s").ok().flatten(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            parse_interval("250ms").ok().flatten(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_interval("-1").ok(), Some(None));
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn settings_accept_es_spellings() {
        let s = IndexSettings::from_json(
            &json!({"index": {"number_of_shards": 3, "refresh_interval": "-1"}}),
        )
        .expect("valid");
        assert_eq!(s.number_of_shards, 3);
        assert_eq!(s.refresh_interval, "-1");
        let s =
            IndexSettings::from_json(&json!({"number_of_shards": "2", "number_of_replicas": 0}))
                .expect("valid");
        assert_eq!((s.number_of_shards, s.number_of_replicas), (2, 0));
        assert!(IndexSettings::from_json(&json!({"number_of_shards": 0})).is_err());
        let round = IndexSettings::from_json(&s.to_json("x", "u", 0)).expect("round trip");
        assert_eq!(round, s);
    }
}
