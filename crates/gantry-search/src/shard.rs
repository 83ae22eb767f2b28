//! A shard: one tantivy index directory plus its translog, written by one dedicated thread.
//!
//! A shard is the unit a cluster will place, copy and recover: everything it needs is in its
//! directory (`index/` for tantivy, `translog` for the write-ahead log). It owns versioning
//! (`_seq_no`, `_version`, optimistic concurrency), realtime GET of not-yet-refreshed documents,
//! refresh and commit. It does not own mappings (the index does; a shard receives documents already
//! checked against the mapping) nor query parsing.
//!
//! Writes go through a bounded channel to the shard's writer thread, which owns the tantivy
//! `IndexWriter` and the translog. The thread batches the writes waiting in the channel, applies
//! them, appends them to the translog with one fsync, then answers each (group commit).
//!
//! **Invariant:** a write is acknowledged only after its translog append returned (fsynced under
//! `Durability::Request`). tantivy has no searcher over uncommitted documents, so a refresh is a
//! tantivy commit (payload: the highest `_seq_no` it holds) followed by a reader reload and a
//! translog truncation; replay at open applies the translog operations above the commit's
//! `_seq_no`, so a crash at any point loses nothing acknowledged and applies nothing twice.
//!
//! **Invariant:** `LiveState::docs` holds, for every id ever written since open (and every live
//! document found at open), the `_seq_no` and `_version` of its latest operation; sources written
//! since the last refresh are kept there too, for realtime GET and `_update`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tantivy::query::TermQuery;
use tantivy::schema::document::OwnedValue;
use tantivy::schema::{
    Field, INDEXED, IndexRecordOption, JsonObjectOptions, STORED, STRING, Schema,
    TextFieldIndexing, Value as _,
};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use crate::error::{ErrorKind, EsError};
use crate::mapping::{IndexValue, Mapping, ParsedDoc};
use crate::translog::{Durability, Op, OpKind, Translog};

/// The primary term of every shard copy until replication exists.
pub const PRIMARY_TERM: u64 = 1;
/// Writes waiting for a shard's writer thread before callers get a rejection.
const QUEUE: usize = 256;
/// Translog size that forces a commit (ES's `flush_threshold_size`).
const MAX_TRANSLOG: u64 = 512 * 1024 * 1024;
/// Indexing threads of a shard's tantivy writer (each takes its share of the memory budget).
const WRITER_THREADS: usize = 2;
/// Memory budget of a shard's tantivy writer.
const WRITER_MEMORY: usize = 128 * 1024 * 1024;

/// The shard's fixed tantivy schema. Mapped fields live inside two JSON fields keyed by their
/// full dotted path, so dynamic mapping never needs a schema change: `text` holds analysed text
/// (positions kept for phrases), `keyword` holds every exact value (keywords, numbers, booleans,
/// dates) indexed raw and as fast (columnar) values for ranges, sorting and aggregations.
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    /// `_id`: raw term, stored.
    pub id: Field,
    /// `_source`: the document's JSON bytes, stored.
    pub source: Field,
    /// `_seq_no`, stored.
    pub seq_no: Field,
    /// `_version`, stored.
    pub version: Field,
    /// Paths with a value in this document (for `exists`).
    pub field_names: Field,
    /// Analysed text by path.
    pub text: Field,
    /// Exact values by path.
    pub keyword: Field,
}

/// Name of the JSON field holding exact values; fast-field columns are `keyword.<path>`.
pub const KEYWORD_FIELD: &str = "keyword";

impl Fields {
    /// The schema and its field handles.
    pub fn schema() -> (Schema, Fields) {
        let mut b = Schema::builder();
        let id = b.add_text_field("_id", STRING | STORED);
        let source = b.add_bytes_field("_source", STORED);
        let seq_no = b.add_u64_field("_seq_no", STORED | INDEXED);
        let version = b.add_u64_field("_version", STORED);
        let field_names = b.add_text_field("_field_names", STRING);
        let text_options = JsonObjectOptions::default()
            .set_indexing_options(
                TextFieldIndexing::default()
                    .set_tokenizer("default")
                    .set_index_option(IndexRecordOption::WithFreqsAndPositions),
            )
            .set_expand_dots_enabled();
        let text = b.add_json_field("text", text_options);
        let keyword_options = JsonObjectOptions::default()
            .set_indexing_options(
                TextFieldIndexing::default()
                    .set_tokenizer("raw")
                    .set_index_option(IndexRecordOption::WithFreqs),
            )
            .set_fast("raw")
            .set_expand_dots_enabled();
        let keyword = b.add_json_field(KEYWORD_FIELD, keyword_options);
        (
            b.build(),
            Fields {
                id,
                source,
                seq_no,
                version,
                field_names,
                text,
                keyword,
            },
        )
    }

    /// The tantivy document for a parsed ES document.
    pub fn document(
        &self,
        id: &str,
        source: &str,
        seq_no: u64,
        version: u64,
        parsed: &ParsedDoc,
    ) -> TantivyDocument {
        let mut doc = TantivyDocument::default();
        doc.add_text(self.id, id);
        doc.add_bytes(self.source, source.as_bytes());
        doc.add_u64(self.seq_no, seq_no);
        doc.add_u64(self.version, version);
        for name in &parsed.field_names {
            doc.add_text(self.field_names, name);
        }
        let mut text: BTreeMap<String, Vec<OwnedValue>> = BTreeMap::new();
        let mut exact: BTreeMap<String, Vec<OwnedValue>> = BTreeMap::new();
        for (path, value) in &parsed.values {
            let (map, v) = match value {
                IndexValue::Text(s) => (&mut text, OwnedValue::Str(s.clone())),
                IndexValue::Keyword(s) => (&mut exact, OwnedValue::Str(s.clone())),
                IndexValue::I64(n) => (&mut exact, OwnedValue::I64(*n)),
                IndexValue::F64(f) => (&mut exact, OwnedValue::F64(*f)),
                IndexValue::Bool(b) => (&mut exact, OwnedValue::Bool(*b)),
                IndexValue::Date(ms) => (
                    &mut exact,
                    OwnedValue::Date(tantivy::DateTime::from_timestamp_millis(*ms)),
                ),
            };
            map.entry(escape_path(path)).or_default().push(v);
        }
        let collapse = |m: BTreeMap<String, Vec<OwnedValue>>| {
            m.into_iter()
                .map(|(k, mut v)| {
                    let v = if v.len() == 1 {
                        v.pop().unwrap_or(OwnedValue::Null)
                    } else {
                        OwnedValue::Array(v)
                    };
                    (k, v)
                })
                .collect::<BTreeMap<_, _>>()
        };
        if !text.is_empty() {
            doc.add_object(self.text, collapse(text));
        }
        if !exact.is_empty() {
            doc.add_object(self.keyword, collapse(exact));
        }
        doc
    }

    /// The `_id` term.
    pub fn id_term(&self, id: &str) -> Term {
        Term::from_field_text(self.id, id)
    }
}

/// Mapped paths are dotted; a dot inside a path segment cannot occur (objects split on dots), so
/// paths pass through unchanged. Kept as one function so the rule has one home.
fn escape_path(path: &str) -> String {
    path.to_owned()
}

/// Shard settings.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// How often writes become searchable; `None` disables periodic refresh.
    pub refresh_interval: Option<Duration>,
    /// When the translog is fsynced.
    pub durability: Durability,
    /// Observes the duration of every refresh (commit plus reader reload).
    pub refresh_seconds: Option<prometheus::Histogram>,
}

impl Default for ShardOptions {
    fn default() -> Self {
        Self {
            refresh_interval: Some(Duration::from_secs(1)),
            durability: Durability::Request,
            refresh_seconds: None,
        }
    }
}

/// Optimistic-concurrency conditions on a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conditions {
    /// `if_seq_no`.
    pub if_seq_no: Option<u64>,
    /// `if_primary_term`.
    pub if_primary_term: Option<u64>,
}

/// One write to a shard.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Index (or create) a document whose source was already checked against the mapping.
    Index {
        /// Document id.
        id: String,
        /// `_source` JSON text.
        source: String,
        /// Its index values.
        parsed: ParsedDoc,
        /// `op_type=create`: fail if the document exists.
        create: bool,
        /// Concurrency conditions.
        cond: Conditions,
    },
    /// Delete a document.
    Delete {
        /// Document id.
        id: String,
        /// Concurrency conditions.
        cond: Conditions,
    },
    /// Merge `doc` into the current source, or insert the upsert document.
    Update {
        /// Document id.
        id: String,
        /// Partial document.
        doc: Option<Value>,
        /// Document to insert when missing.
        upsert: Option<Value>,
        /// Insert `doc` itself when missing.
        doc_as_upsert: bool,
        /// Concurrency conditions.
        cond: Conditions,
    },
}

impl WriteOp {
    /// The document id.
    pub fn id(&self) -> &str {
        match self {
            Self::Index { id, .. } | Self::Delete { id, .. } | Self::Update { id, .. } => id,
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    /// A new document.
    Created,
    /// A document replaced.
    Updated,
    /// A document deleted.
    Deleted,
    /// Nothing to delete.
    NotFound,
    /// An update that changed nothing.
    Noop,
}

impl WriteResult {
    /// ES's `result` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Deleted => "deleted",
            Self::NotFound => "not_found",
            Self::Noop => "noop",
        }
    }
}

/// The outcome of one successful write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    /// What happened.
    pub result: WriteResult,
    /// `_seq_no` of the operation (of the current document for a noop or not-found).
    pub seq_no: u64,
    /// `_version` after it.
    pub version: u64,
}

/// A realtime document.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDoc {
    /// `_source` JSON text.
    pub source: Arc<str>,
    /// `_seq_no`.
    pub seq_no: u64,
    /// `_version`.
    pub version: u64,
}

#[derive(Debug, Clone)]
struct DocState {
    seq_no: u64,
    version: u64,
    deleted: bool,
    /// The source, while the operation is not refreshed yet (`None` once searchable).
    pending: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct LiveState {
    docs: HashMap<String, DocState>,
    /// Next `_seq_no` to assign.
    next_seq_no: u64,
    /// Operations since the last refresh.
    dirty: u64,
}

type Reply<T> = tokio::sync::oneshot::Sender<T>;
type WriteReply = Reply<Vec<Result<WriteOutcome, EsError>>>;

enum Command {
    Write(Vec<WriteOp>, WriteReply),
    Refresh(Reply<Result<(), EsError>>),
}

struct Shared {
    index: Index,
    reader: IndexReader,
    fields: Fields,
    state: Mutex<LiveState>,
    mapping: Arc<RwLock<Mapping>>,
    /// Every `_seq_no` below this value is searchable (updated after each refresh).
    visible: tokio::sync::watch::Sender<u64>,
    /// Set when a translog append failed: the in-memory state may hold operations that are not
    /// durable, so the shard refuses reads and writes until the node restarts (and recovers
    /// from the last commit and the translog's valid frames).
    failed: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, LiveState> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_failed(&self) -> Result<(), EsError> {
        if self.failed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(EsError::internal(
                "shard failed after a translog write error; restart the node to recover it",
            ));
        }
        Ok(())
    }

    /// The current source of `id`: realtime (unrefreshed) first, then the searcher.
    fn current(&self, id: &str) -> Result<Option<StoredDoc>, EsError> {
        self.check_failed()?;
        {
            let state = self.state();
            match state.docs.get(id) {
                None => return Ok(None),
                Some(d) if d.deleted => return Ok(None),
                Some(DocState {
                    pending: Some(source),
                    seq_no,
                    version,
                    ..
                }) => {
                    return Ok(Some(StoredDoc {
                        source: source.clone(),
                        seq_no: *seq_no,
                        version: *version,
                    }));
                }
                Some(_) => {}
            }
        }
        let searcher = self.reader.searcher();
        let query = TermQuery::new(self.fields.id_term(id), IndexRecordOption::Basic);
        let hits = searcher.search(
            &query,
            &tantivy::collector::TopDocs::with_limit(1).order_by_score(),
        )?;
        let Some((_, addr)) = hits.first() else {
            return Ok(None);
        };
        let doc: TantivyDocument = searcher.doc(*addr)?;
        Ok(Some(stored_doc(&doc, &self.fields)))
    }
}

/// Reads `_source`, `_seq_no` and `_version` from a stored document.
pub fn stored_doc(doc: &TantivyDocument, fields: &Fields) -> StoredDoc {
    let source = doc
        .get_first(fields.source)
        .and_then(|v| v.as_bytes())
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_else(|| "{}".to_owned());
    StoredDoc {
        source: source.into(),
        seq_no: doc
            .get_first(fields.seq_no)
            .and_then(|v| v.as_u64())
            .unwrap_or(0),
        version: doc
            .get_first(fields.version)
            .and_then(|v| v.as_u64())
            .unwrap_or(1),
    }
}

/// An open shard.
pub struct Shard {
    dir: PathBuf,
    options: ShardOptions,
    shared: Arc<Shared>,
    tx: Option<SyncSender<Command>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("dir", &self.dir).finish()
    }
}

/// What opening a shard found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovery {
    /// Live documents in the last commit.
    pub committed_docs: u64,
    /// Translog operations replayed.
    pub replayed_ops: usize,
}

impl Shard {
    /// Opens the shard in `dir` (creating it when empty), replays its translog and starts its
    /// writer thread. Blocking: call from a blocking context.
    pub fn open(
        dir: &Path,
        mapping: Arc<RwLock<Mapping>>,
        options: ShardOptions,
    ) -> Result<(Self, Recovery), EsError> {
        let index_dir = dir.join("index");
        std::fs::create_dir_all(&index_dir)?;
        let (schema, fields) = Fields::schema();
        let directory = tantivy::directory::MmapDirectory::open(&index_dir)
            .map_err(|e| EsError::internal(format!("cannot open shard directory: {e}")))?;
        let index = Index::open_or_create(directory, schema)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let writer: IndexWriter = index.writer_with_num_threads(WRITER_THREADS, WRITER_MEMORY)?;
        let committed_seq_no = index
            .load_metas()?
            .payload
            .and_then(|p| serde_json::from_str::<Value>(&p).ok())
            .and_then(|v| v["max_seq_no"].as_u64());

        // Rebuild the id → (seq_no, version) map from the committed documents.
        let mut state = LiveState::default();
        let searcher = reader.searcher();
        let mut committed_docs = 0;
        for segment in searcher.segment_readers() {
            let store = segment.get_store_reader(1)?;
            for doc_id in segment.doc_ids_alive() {
                let doc: TantivyDocument = store.get(doc_id)?;
                let id = doc
                    .get_first(fields.id)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned();
                let stored = stored_doc(&doc, &fields);
                state.next_seq_no = state.next_seq_no.max(stored.seq_no + 1);
                state.docs.insert(
                    id,
                    DocState {
                        seq_no: stored.seq_no,
                        version: stored.version,
                        deleted: false,
                        pending: None,
                    },
                );
                committed_docs += 1;
            }
        }
        if let Some(s) = committed_seq_no {
            state.next_seq_no = state.next_seq_no.max(s + 1);
        }

        let (translog, ops) = Translog::open(&dir.join("translog"), options.durability)?;
        let mut replayed_ops = 0;
        {
            let mapping = mapping.read().unwrap_or_else(|e| e.into_inner());
            for op in ops {
                if committed_seq_no.is_some_and(|c| op.seq_no <= c) {
                    continue;
                }
                replayed_ops += 1;
                writer.delete_term(fields.id_term(&op.id));
                let pending = match &op.kind {
                    OpKind::Index { source } => {
                        let value: Value = serde_json::from_str(source)
                            .map_err(|e| EsError::internal(format!("bad translog source: {e}")))?;
                        // The mapping was saved before the operation was logged; growth here
                        // can only come from `dynamic: false`-style leftovers and is ignored.
                        let (parsed, _) = mapping.parse_document(&value, &op.id)?;
                        writer.add_document(
                            fields.document(&op.id, source, op.seq_no, op.version, &parsed),
                        )?;
                        Some(Arc::<str>::from(source.as_str()))
                    }
                    OpKind::Delete => None,
                };
                state.next_seq_no = state.next_seq_no.max(op.seq_no + 1);
                state.dirty += 1;
                state.docs.insert(
                    op.id.clone(),
                    DocState {
                        seq_no: op.seq_no,
                        version: op.version,
                        deleted: pending.is_none(),
                        pending,
                    },
                );
            }
        }
        let visible = tokio::sync::watch::Sender::new(committed_seq_no.map_or(0, |s| s + 1));
        let shared = Arc::new(Shared {
            index,
            reader,
            fields,
            state: Mutex::new(state),
            mapping,
            visible,
            failed: std::sync::atomic::AtomicBool::new(false),
        });
        let mut worker = Worker {
            shared: shared.clone(),
            writer,
            translog,
            options: options.clone(),
            last_refresh: Instant::now(),
        };
        if replayed_ops > 0 {
            worker.refresh()?;
        } else {
            worker.translog.truncate()?;
        }
        let (tx, rx) = sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("search-shard-writer".into())
            .spawn(move || worker.run(rx))?;
        Ok((
            Self {
                dir: dir.to_owned(),
                options,
                shared,
                tx: Some(tx),
                thread: Some(thread),
            },
            Recovery {
                committed_docs,
                replayed_ops,
            },
        ))
    }

    /// Applies `ops` in order and returns one outcome per op. Waits for the translog append.
    pub async fn write(
        &self,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<Result<WriteOutcome, EsError>>, EsError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Write(ops, reply))?;
        rx.await
            .map_err(|_| EsError::internal("shard writer stopped"))
    }

    /// Makes every acknowledged write searchable (and durable in a tantivy commit).
    pub async fn refresh(&self) -> Result<(), EsError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Refresh(reply))?;
        rx.await
            .map_err(|_| EsError::internal("shard writer stopped"))?
    }

    /// Waits until the write with `seq_no` is searchable (`refresh=wait_for`): until the next
    /// periodic refresh, or forces one when periodic refresh is disabled.
    pub async fn wait_for(&self, seq_no: u64) -> Result<(), EsError> {
        if self.options.refresh_interval.is_none() {
            return self.refresh().await;
        }
        let mut visible = self.shared.visible.subscribe();
        visible
            .wait_for(|v| *v > seq_no)
            .await
            .map(|_| ())
            .map_err(|_| EsError::internal("shard writer stopped"))
    }

    fn send(&self, command: Command) -> Result<(), EsError> {
        let Some(tx) = &self.tx else {
            return Err(EsError::internal("shard is closed"));
        };
        match tx.try_send(command) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(EsError::new(
                ErrorKind::Rejected,
                "shard write queue is full; retry later",
            )),
            Err(TrySendError::Disconnected(_)) => Err(EsError::internal("shard writer stopped")),
        }
    }

    /// Realtime GET.
    pub fn get(&self, id: &str) -> Result<Option<StoredDoc>, EsError> {
        self.shared.current(id)
    }

    /// A searcher over the last refresh.
    pub fn searcher(&self) -> tantivy::Searcher {
        self.shared.reader.searcher()
    }

    /// The schema's field handles.
    pub fn fields(&self) -> Fields {
        self.shared.fields
    }

    /// The tantivy index (for its tokenizers).
    pub fn index(&self) -> &Index {
        &self.shared.index
    }

    /// Live documents visible to search.
    pub fn doc_count(&self) -> u64 {
        self.searcher().num_docs()
    }

    /// Deleted (or replaced) documents still held by segments visible to search.
    pub fn deleted_count(&self) -> u64 {
        self.searcher()
            .segment_readers()
            .iter()
            .map(|r| u64::from(r.num_deleted_docs()))
            .sum()
    }

    /// Bytes the shard uses on disk.
    pub fn size_in_bytes(&self) -> u64 {
        dir_size(&self.dir)
    }

    /// Stops the writer thread (refreshing first, so the translog ends empty) and waits for it.
    pub fn close(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.close();
    }
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

struct Worker {
    shared: Arc<Shared>,
    writer: IndexWriter,
    translog: Translog,
    options: ShardOptions,
    last_refresh: Instant,
}

impl Worker {
    fn run(mut self, rx: Receiver<Command>) {
        loop {
            let timeout = match self.options.refresh_interval {
                Some(interval) => interval.saturating_sub(self.last_refresh.elapsed()),
                None => Duration::from_secs(3600),
            };
            match rx.recv_timeout(timeout) {
                Ok(Command::Write(ops, reply)) => {
                    let mut batch = vec![(ops, reply)];
                    let mut refreshes = Vec::new();
                    // Group commit: everything already waiting shares one translog fsync.
                    while batch.len() < 64 {
                        match rx.try_recv() {
                            Ok(Command::Write(ops, reply)) => batch.push((ops, reply)),
                            Ok(Command::Refresh(reply)) => {
                                refreshes.push(reply);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.write_batch(batch);
                    for reply in refreshes {
                        let _ = reply.send(self.refresh());
                    }
                }
                Ok(Command::Refresh(reply)) => {
                    let _ = reply.send(self.refresh());
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.options.refresh_interval.is_some() {
                        if let Err(e) = self.refresh() {
                            tracing::error!(error = %e, "periodic refresh failed");
                        }
                        self.last_refresh = Instant::now();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if let Err(e) = self.refresh() {
            tracing::error!(error = %e, "final refresh failed");
        }
        if let Err(e) = self.writer.wait_merging_threads() {
            tracing::warn!(error = %e, "merge threads ended with an error");
        }
    }

    fn write_batch(&mut self, batch: Vec<(Vec<WriteOp>, WriteReply)>) {
        if let Err(e) = self.shared.check_failed() {
            for (ops, reply) in batch {
                let _ = reply.send(ops.iter().map(|_| Err(e.clone())).collect());
            }
            return;
        }
        let mut logged = Vec::new();
        let mut answers = Vec::with_capacity(batch.len());
        for (ops, reply) in batch {
            let results: Vec<_> = ops
                .into_iter()
                .map(|op| self.apply(op, &mut logged))
                .collect();
            answers.push((reply, results));
        }
        if let Err(e) = self.translog.append(&logged) {
            tracing::error!(error = %e, "translog append failed");
            // The operations are in the writer and the id map but not durable: fail them all,
            // drop them from the writer, and fail the shard (its id map can no longer be trusted).
            let _ = self.writer.rollback();
            self.shared
                .failed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            for (reply, results) in answers {
                let failed = results
                    .into_iter()
                    .map(|r| r.and(Err(EsError::internal("translog write failed"))))
                    .collect();
                let _ = reply.send(failed);
            }
            return;
        }
        for (reply, results) in answers {
            let _ = reply.send(results);
        }
        // Bound the translog (and replay time) when refreshes are rare or disabled.
        if self.translog.len() > MAX_TRANSLOG {
            if let Err(e) = self.refresh() {
                tracing::error!(error = %e, "commit of a full translog failed");
            }
        }
    }

    fn apply(&mut self, op: WriteOp, logged: &mut Vec<Op>) -> Result<WriteOutcome, EsError> {
        let shared = self.shared.clone();
        let fields = shared.fields;
        match op {
            WriteOp::Index {
                id,
                source,
                parsed,
                create,
                cond,
            } => {
                let prior = self.check(&id, cond)?;
                if create && prior.as_ref().is_some_and(|p| !p.deleted) {
                    let version = prior.map_or(0, |p| p.version);
                    return Err(conflict(format!(
                        "[{id}]: version conflict, document already exists (current version [{version}])"
                    )));
                }
                Ok(self.index(id, source, &parsed, prior, logged)?)
            }
            WriteOp::Delete { id, cond } => {
                let prior = self.check(&id, cond)?;
                match prior {
                    Some(p) if !p.deleted => {
                        let mut state = shared.state();
                        let seq_no = state.next_seq_no;
                        state.next_seq_no += 1;
                        state.dirty += 1;
                        let version = p.version + 1;
                        self.writer.delete_term(fields.id_term(&id));
                        logged.push(Op {
                            seq_no,
                            version,
                            id: id.clone(),
                            kind: OpKind::Delete,
                        });
                        state.docs.insert(
                            id,
                            DocState {
                                seq_no,
                                version,
                                deleted: true,
                                pending: None,
                            },
                        );
                        Ok(WriteOutcome {
                            result: WriteResult::Deleted,
                            seq_no,
                            version,
                        })
                    }
                    other => Ok(WriteOutcome {
                        result: WriteResult::NotFound,
                        seq_no: other.as_ref().map_or(0, |p| p.seq_no),
                        version: other.map_or(1, |p| p.version),
                    }),
                }
            }
            WriteOp::Update {
                id,
                doc,
                upsert,
                doc_as_upsert,
                cond,
            } => {
                let prior = self.check(&id, cond)?;
                let current = shared.current(&id)?;
                let new_source = match current {
                    Some(current) => {
                        let mut merged: Value =
                            serde_json::from_str(&current.source).map_err(|e| {
                                EsError::internal(format!("stored source is not JSON: {e}"))
                            })?;
                        let Some(doc) = doc else {
                            return Err(EsError::new(
                                ErrorKind::ActionRequestValidation,
                                "Validation Failed: 1: script or doc is missing;",
                            ));
                        };
                        let before = merged.clone();
                        merge_json(&mut merged, &doc);
                        if merged == before {
                            return Ok(WriteOutcome {
                                result: WriteResult::Noop,
                                seq_no: current.seq_no,
                                version: current.version,
                            });
                        }
                        merged
                    }
                    None => match (doc_as_upsert, doc, upsert) {
                        (_, _, Some(upsert)) => upsert,
                        (true, Some(doc), None) => doc,
                        _ => {
                            return Err(EsError::new(
                                ErrorKind::DocumentMissing,
                                format!("[{id}]: document missing"),
                            ));
                        }
                    },
                };
                let parsed = {
                    let mapping = shared.mapping.read().unwrap_or_else(|e| e.into_inner());
                    mapping.parse_document(&new_source, &id)?.0
                };
                let source = new_source.to_string();
                self.index(id, source, &parsed, prior, logged)
            }
        }
    }

    /// The document's current state, after checking `if_seq_no`/`if_primary_term`.
    fn check(&self, id: &str, cond: Conditions) -> Result<Option<DocState>, EsError> {
        let prior = self.shared.state().docs.get(id).cloned();
        if let Some(expected) = cond.if_seq_no {
            let term = cond.if_primary_term.unwrap_or(PRIMARY_TERM);
            match &prior {
                Some(p) if !p.deleted => {
                    if p.seq_no != expected || term != PRIMARY_TERM {
                        return Err(conflict(format!(
                            "[{id}]: version conflict, required seqNo [{expected}], primary term [{term}]. current document has seqNo [{}] and primary term [{PRIMARY_TERM}]",
                            p.seq_no
                        )));
                    }
                }
                _ => {
                    return Err(conflict(format!(
                        "[{id}]: version conflict, required seqNo [{expected}], primary term [{term}]. but no document was found"
                    )));
                }
            }
        }
        Ok(prior)
    }

    fn index(
        &mut self,
        id: String,
        source: String,
        parsed: &ParsedDoc,
        prior: Option<DocState>,
        logged: &mut Vec<Op>,
    ) -> Result<WriteOutcome, EsError> {
        let fields = self.shared.fields;
        let shared = self.shared.clone();
        let mut state = shared.state();
        let seq_no = state.next_seq_no;
        let version = prior.as_ref().map_or(1, |p| p.version + 1);
        let result = match &prior {
            Some(p) if !p.deleted => WriteResult::Updated,
            _ => WriteResult::Created,
        };
        // Only a live document has something to replace: a delete of an id the shard never held
        // would cost a term lookup in every segment at the next commit (the id map holds every
        // document of the shard, so `prior` says).
        if prior.as_ref().is_some_and(|p| !p.deleted) {
            self.writer.delete_term(fields.id_term(&id));
        }
        self.writer
            .add_document(fields.document(&id, &source, seq_no, version, parsed))?;
        state.next_seq_no += 1;
        state.dirty += 1;
        let source: Arc<str> = source.into();
        logged.push(Op {
            seq_no,
            version,
            id: id.clone(),
            kind: OpKind::Index {
                source: source.to_string(),
            },
        });
        state.docs.insert(
            id,
            DocState {
                seq_no,
                version,
                deleted: false,
                pending: Some(source),
            },
        );
        Ok(WriteOutcome {
            result,
            seq_no,
            version,
        })
    }

    /// Commits, reloads the reader, drops realtime sources now searchable, truncates the translog.
    fn refresh(&mut self) -> Result<(), EsError> {
        self.shared.check_failed()?;
        let (dirty, max_seq_no) = {
            let state = self.shared.state();
            (state.dirty, state.next_seq_no.checked_sub(1))
        };
        if dirty == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let mut prepared = self.writer.prepare_commit()?;
        let payload = serde_json::json!({ "max_seq_no": max_seq_no }).to_string();
        prepared.set_payload(&payload);
        prepared.commit()?;
        self.shared.reader.reload()?;
        {
            let mut state = self.shared.state();
            self.shared.visible.send_replace(state.next_seq_no);
            state.dirty = 0;
            for d in state.docs.values_mut() {
                d.pending = None;
            }
        }
        self.translog.truncate()?;
        self.last_refresh = Instant::now();
        if let Some(h) = &self.options.refresh_seconds {
            h.observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }
}

fn conflict(reason: String) -> EsError {
    EsError::new(ErrorKind::VersionConflict, reason)
}

/// ES's partial-document merge: objects merge recursively, everything else is replaced.
pub fn merge_json(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_json(existing, v)
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::translog::encode;

    fn index_op(mapping: &Mapping, id: &str, source: Value) -> WriteOp {
        let (parsed, _) = mapping.parse_document(&source, id).expect("valid document");
        WriteOp::Index {
            id: id.to_owned(),
            source: source.to_string(),
            parsed,
            create: false,
            cond: Conditions::default(),
        }
    }

    fn options() -> ShardOptions {
        ShardOptions {
            refresh_interval: None,
            ..ShardOptions::default()
        }
    }

    /// A crash after a commit and before the translog truncation leaves frames the commit already
    /// holds: replay skips them and applies only the later ones.
    #[tokio::test]
    async fn replay_skips_operations_the_commit_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mapping = Mapping::default();
        let shared_mapping = Arc::new(RwLock::new(mapping.clone()));
        {
            let (shard, _) =
                Shard::open(dir.path(), shared_mapping.clone(), options()).expect("open");
            let out = shard
                .write(vec![index_op(&mapping, "x", json!({"v": "committed"}))])
                .await
                .expect("written");
            assert_eq!(out[0].as_ref().map(|o| o.seq_no).ok(), Some(0));
            shard.refresh().await.expect("refresh");
        }
        // Frames as the crash would leave them: seq_no 0 (already committed, with a different
        // source to prove it is skipped) and seq_no 1 (acknowledged, not committed).
        let mut frames = encode(&Op {
            seq_no: 0,
            version: 1,
            id: "x".into(),
            kind: OpKind::Index {
                source: r#"{"v":"stale"}"#.into(),
            },
        });
        frames.extend(encode(&Op {
            seq_no: 1,
            version: 1,
            id: "y".into(),
            kind: OpKind::Index {
                source: r#"{"v":"logged"}"#.into(),
            },
        }));
        std::fs::write(dir.path().join("translog"), frames).expect("translog");

        let (shard, recovery) = Shard::open(dir.path(), shared_mapping, options()).expect("open");
        assert_eq!(recovery.committed_docs, 1);
        assert_eq!(recovery.replayed_ops, 1);
        let x = shard.get("x").expect("get").expect("x exists");
        assert_eq!(&*x.source, r#"{"v":"committed"}"#);
        let y = shard.get("y").expect("get").expect("y replayed");
        assert_eq!((y.seq_no, y.version), (1, 1));
        assert_eq!(
            shard.doc_count(),
            2,
            "replayed operations are committed at open"
        );
        // New writes continue after the highest sequence number seen.
        let out = shard
            .write(vec![index_op(&mapping, "x", json!({"v": "new"}))])
            .await
            .expect("written");
        let o = out[0].as_ref().expect("ok");
        assert_eq!(
            (o.seq_no, o.version, o.result),
            (2, 2, WriteResult::Updated)
        );
    }

    #[tokio::test]
    async fn conditions_and_create_conflicts_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mapping = Mapping::default();
        let (shard, _) = Shard::open(
            dir.path(),
            Arc::new(RwLock::new(mapping.clone())),
            options(),
        )
        .expect("open");
        let mut create = index_op(&mapping, "a", json!({"n": 1}));
        if let WriteOp::Index { create: c, .. } = &mut create {
            *c = true;
        }
        let mut stale = index_op(&mapping, "a", json!({"n": 3}));
        if let WriteOp::Index { cond, .. } = &mut stale {
            cond.if_seq_no = Some(7);
        }
        let out = shard
            .write(vec![
                create.clone(),
                create,
                stale,
                WriteOp::Delete {
                    id: "missing".into(),
                    cond: Conditions::default(),
                },
            ])
            .await
            .expect("written");
        assert!(out[0].is_ok());
        assert_eq!(
            out[1].as_ref().err().map(|e| e.kind),
            Some(ErrorKind::VersionConflict)
        );
        assert_eq!(
            out[2].as_ref().err().map(|e| e.kind),
            Some(ErrorKind::VersionConflict)
        );
        assert_eq!(
            out[3].as_ref().map(|o| o.result).ok(),
            Some(WriteResult::NotFound)
        );
        let a = shard.get("a").expect("get").expect("a");
        assert_eq!((a.seq_no, a.version, &*a.source), (0, 1, r#"{"n":1}"#));
    }
}
