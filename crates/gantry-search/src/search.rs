//! Search requests: parsing the body (`query`, `from`/`size`, `sort`, `_source`,
//! `track_total_hits`, `search_after`), running it over shards, merging and shaping hits.
//!
//! Owns sort semantics (ES's defaults: `_score` descending, fields ascending, `missing: _last`),
//! `_source` filtering and the hit-collection strategy. Does not own query meaning (`query`) nor
//! aggregations (`aggs`).

use std::cmp::Ordering;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tantivy::collector::{Collector, SegmentCollector};
use tantivy::columnar::{DynamicColumn, StrColumn};
use tantivy::{DocAddress, DocId, Score, SegmentOrdinal, SegmentReader, TantivyDocument};

use crate::error::EsError;
use crate::mapping::{FieldType, Mapping};
use crate::node::glob;
use crate::query::{self, QueryAst};
use crate::shard::KEYWORD_FIELD;

/// Largest `from + size` (ES's `index.max_result_window`).
pub const MAX_RESULT_WINDOW: usize = 10_000;

/// Sort direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Smallest first.
    Asc,
    /// Largest first.
    Desc,
}

/// One sort key.
#[derive(Debug, Clone, PartialEq)]
pub struct SortSpec {
    /// A field path, `_score` or `_doc`.
    pub field: String,
    /// Direction.
    pub order: Order,
    /// Documents without a value go first (`_first`) instead of last.
    pub missing_first: bool,
    /// `unmapped_type` was given: an unmapped field sorts as missing instead of failing.
    pub unmapped_ok: bool,
}

/// `_source` filtering.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SourceFilter {
    /// `false`: no `_source` in hits.
    pub disabled: bool,
    /// Paths (with `*`) to keep; empty keeps everything.
    pub includes: Vec<String>,
    /// Paths (with `*`) to drop.
    pub excludes: Vec<String>,
}

/// `track_total_hits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackTotal {
    /// No total in the response.
    Off,
    /// Exact up to this many, then `gte`.
    UpTo(u64),
    /// Always exact.
    Exact,
}

/// A parsed search body.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    /// The query.
    pub query: QueryAst,
    /// Hits to skip.
    pub from: usize,
    /// Hits to return.
    pub size: usize,
    /// Sort keys; empty means `_score` descending.
    pub sort: Vec<SortSpec>,
    /// `_source` filtering.
    pub source: SourceFilter,
    /// Total hit counting.
    pub track_total_hits: TrackTotal,
    /// Sort values of the last hit of the previous page.
    pub search_after: Option<Vec<Value>>,
    /// The raw `aggs` object.
    pub aggs: Option<Value>,
    /// Add `_version` to hits.
    pub version: bool,
    /// Add `_seq_no` and `_primary_term` to hits.
    pub seq_no_primary_term: bool,
    /// Compute scores even when sorting by fields.
    pub track_scores: bool,
    /// `highlight`.
    pub highlight: Option<crate::highlight::Highlight>,
}

fn usize_of(v: &Value, key: &str) -> Result<usize, EsError> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| EsError::parsing(format!("[{key}] must be a non-negative integer, got {v}")))
}

impl SearchRequest {
    /// Parses a `_search` body (`Value::Null` for none) plus URL parameters already merged in.
    pub fn parse(body: &Value) -> Result<Self, EsError> {
        let empty = Map::new();
        let obj = match body {
            Value::Null => &empty,
            Value::Object(o) => o,
            _ => return Err(EsError::parsing("request body must be a JSON object")),
        };
        let mut req = SearchRequest {
            query: QueryAst::MatchAll { boost: 1.0 },
            from: 0,
            size: 10,
            sort: Vec::new(),
            source: SourceFilter::default(),
            track_total_hits: TrackTotal::UpTo(MAX_RESULT_WINDOW as u64),
            search_after: None,
            aggs: None,
            version: false,
            seq_no_primary_term: false,
            track_scores: false,
            highlight: None,
        };
        for (key, value) in obj {
            match key.as_str() {
                "query" => req.query = query::parse(value)?,
                "from" => req.from = usize_of(value, key)?,
                "size" => req.size = usize_of(value, key)?,
                "sort" => req.sort = parse_sort(value)?,
                "_source" => req.source = parse_source(value)?,
                "track_total_hits" => {
                    req.track_total_hits = match value {
                        Value::Bool(true) => TrackTotal::Exact,
                        Value::Bool(false) => TrackTotal::Off,
                        v => TrackTotal::UpTo(usize_of(v, key)? as u64),
                    }
                }
                "search_after" => {
                    req.search_after = Some(
                        value
                            .as_array()
                            .cloned()
                            .ok_or_else(|| EsError::parsing("[search_after] must be an array"))?,
                    )
                }
                "aggs" | "aggregations" => {
                    if !value.is_object() {
                        return Err(EsError::parsing("[aggs] must be an object"));
                    }
                    req.aggs = Some(value.clone());
                }
                "version" => req.version = value.as_bool().unwrap_or(false),
                "seq_no_primary_term" => req.seq_no_primary_term = value.as_bool().unwrap_or(false),
                "track_scores" => req.track_scores = value.as_bool().unwrap_or(false),
                "timeout" | "stored_fields" => {}
                "highlight" => req.highlight = Some(crate::highlight::Highlight::parse(value)?),
                "explain" | "profile" | "suggest" | "rescore" | "collapse" | "post_filter"
                | "min_score" | "script_fields" | "docvalue_fields" | "pit"
                | "runtime_mappings" | "knn" => {
                    return Err(EsError::illegal_argument(format!(
                        "[{key}] is not supported yet"
                    )));
                }
                other => {
                    return Err(EsError::parsing(format!(
                        "Unknown key for a START_OBJECT in [{other}]."
                    )));
                }
            }
        }
        let window = req.from.saturating_add(req.size);
        if window > MAX_RESULT_WINDOW {
            return Err(EsError::illegal_argument(format!(
                "Result window is too large, from + size must be less than or equal to: [{MAX_RESULT_WINDOW}] but was [{}]. See the scroll api for a more efficient way to request large data sets.",
                window
            )));
        }
        if let Some(after) = &req.search_after {
            if req.sort.is_empty() && after.len() != 1 {
                return Err(EsError::illegal_argument(
                    "search_after has 1 value(s) but sort has 0 when sorting by _score",
                ));
            }
            if !req.sort.is_empty() && after.len() != req.sort.len() {
                return Err(EsError::illegal_argument(format!(
                    "search_after has {} value(s) but sort has {}.",
                    after.len(),
                    req.sort.len()
                )));
            }
        }
        Ok(req)
    }

    /// The effective sort (default `_score` descending).
    pub fn effective_sort(&self) -> Vec<SortSpec> {
        if self.sort.is_empty() {
            vec![SortSpec {
                field: "_score".into(),
                order: Order::Desc,
                missing_first: false,
                unmapped_ok: false,
            }]
        } else {
            self.sort.clone()
        }
    }

    /// Checks the sort fields against the mappings of the searched indices: text fields cannot
    /// be sorted on, and a field no index maps needs `unmapped_type`.
    pub fn check_sort(&self, mappings: &[Mapping]) -> Result<(), EsError> {
        for spec in &self.sort {
            if matches!(spec.field.as_str(), "_score" | "_doc") {
                continue;
            }
            let leaves: Vec<_> = mappings
                .iter()
                .filter_map(|m| m.leaf(&spec.field))
                .collect();
            if leaves.iter().any(|l| l.ty == FieldType::Text) {
                return Err(EsError::illegal_argument(format!(
                    "Text fields are not optimised for operations that require per-document field data like aggregations and sorting, so these operations are disabled by default. Please use a keyword field instead. Alternatively, set fielddata=true on [{}] in order to load field data by uninverting the inverted index. Note that this can use significant memory.",
                    spec.field
                )));
            }
            if leaves.is_empty() && !spec.unmapped_ok && !mappings.is_empty() {
                return Err(EsError::new(
                    crate::error::ErrorKind::QueryShard,
                    format!("No mapping found for [{}] in order to sort on", spec.field),
                ));
            }
        }
        Ok(())
    }

    /// Whether hits carry scores.
    pub fn scores(&self) -> bool {
        self.track_scores || self.sort.is_empty() || self.sort.iter().any(|s| s.field == "_score")
    }
}

fn parse_order(v: &Value) -> Result<Order, EsError> {
    match v.as_str() {
        Some("asc") => Ok(Order::Asc),
        Some("desc") => Ok(Order::Desc),
        _ => Err(EsError::parsing(format!(
            "[sort] order must be [asc] or [desc], got {v}"
        ))),
    }
}

fn default_order(field: &str) -> Order {
    if field == "_score" {
        Order::Desc
    } else {
        Order::Asc
    }
}

fn parse_sort(v: &Value) -> Result<Vec<SortSpec>, EsError> {
    let items = match v {
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    };
    let mut out = Vec::new();
    for item in items {
        match item {
            Value::String(field) => {
                // `field:desc` is the URL form.
                let (field, order) = match field.split_once(':') {
                    Some((f, o)) => (f.to_owned(), parse_order(&json!(o))?),
                    None => {
                        let o = default_order(&field);
                        (field, o)
                    }
                };
                out.push(SortSpec {
                    field,
                    order,
                    missing_first: false,
                    unmapped_ok: false,
                });
            }
            Value::Object(o) if o.len() == 1 => {
                let Some((field, spec)) = o.iter().next() else {
                    continue;
                };
                let mut s = SortSpec {
                    field: field.clone(),
                    order: default_order(field),
                    missing_first: false,
                    unmapped_ok: false,
                };
                match spec {
                    Value::String(_) => s.order = parse_order(spec)?,
                    Value::Object(opts) => {
                        for (k, v) in opts {
                            match k.as_str() {
                                "order" => s.order = parse_order(v)?,
                                "missing" => {
                                    s.missing_first = match v.as_str() {
                                        Some("_first") => true,
                                        Some("_last") => false,
                                        _ => {
                                            return Err(EsError::illegal_argument(format!(
                                                "unsupported [missing] value {v}; use _first or _last"
                                            )));
                                        }
                                    }
                                }
                                "unmapped_type" => s.unmapped_ok = true,
                                "mode" | "format" | "numeric_type" => {}
                                other => {
                                    return Err(EsError::parsing(format!(
                                        "[field_sort] unknown field [{other}]"
                                    )));
                                }
                            }
                        }
                    }
                    _ => return Err(EsError::parsing(format!("malformed sort for [{field}]"))),
                }
                out.push(s);
            }
            other => return Err(EsError::parsing(format!("malformed sort {other}"))),
        }
    }
    Ok(out)
}

fn string_list(v: &Value) -> Result<Vec<String>, EsError> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| EsError::parsing("[_source] patterns must be strings"))
            })
            .collect(),
        _ => Err(EsError::parsing("[_source] patterns must be strings")),
    }
}

/// Parses `_source` (boolean, pattern, list, or includes/excludes object).
pub fn parse_source(v: &Value) -> Result<SourceFilter, EsError> {
    match v {
        Value::Bool(b) => Ok(SourceFilter {
            disabled: !b,
            ..Default::default()
        }),
        Value::String(_) | Value::Array(_) => Ok(SourceFilter {
            includes: string_list(v)?,
            ..Default::default()
        }),
        Value::Object(o) => {
            let mut f = SourceFilter::default();
            for (k, v) in o {
                match k.as_str() {
                    "includes" | "include" => f.includes = string_list(v)?,
                    "excludes" | "exclude" => f.excludes = string_list(v)?,
                    other => {
                        return Err(EsError::parsing(format!(
                            "unknown key [{other}] in [_source]"
                        )));
                    }
                }
            }
            Ok(f)
        }
        _ => Err(EsError::parsing(
            "[_source] must be a boolean, string, array or object",
        )),
    }
}

impl SourceFilter {
    /// Builds a filter from `_source`, `_source_includes`, `_source_excludes` URL parameters.
    pub fn from_params(
        source: Option<&str>,
        includes: Option<&str>,
        excludes: Option<&str>,
    ) -> Self {
        let split = |s: &str| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let mut f = SourceFilter::default();
        match source {
            Some("false") => f.disabled = true,
            Some("true") | None => {}
            Some(list) => f.includes = split(list),
        }
        if let Some(i) = includes {
            f.includes = split(i);
        }
        if let Some(e) = excludes {
            f.excludes = split(e);
        }
        f
    }

    /// Whether nothing is filtered.
    pub fn is_identity(&self) -> bool {
        !self.disabled && self.includes.is_empty() && self.excludes.is_empty()
    }

    /// Applies the filter to a `_source` object.
    pub fn apply(&self, source: &Value) -> Value {
        let Value::Object(obj) = source else {
            return source.clone();
        };
        Value::Object(self.filter_object(obj, ""))
    }

    fn filter_object(&self, obj: &Map<String, Value>, prefix: &str) -> Map<String, Value> {
        self.filter_inner(obj, prefix, self.includes.is_empty())
    }

    fn filter_inner(
        &self,
        obj: &Map<String, Value>,
        prefix: &str,
        all: bool,
    ) -> Map<String, Value> {
        let mut out = Map::new();
        for (k, v) in obj {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if self.excludes.iter().any(|p| glob(p, &path)) {
                continue;
            }
            let included = all || self.includes.iter().any(|p| glob(p, &path));
            match v {
                Value::Object(inner) if included => {
                    out.insert(
                        k.clone(),
                        Value::Object(self.filter_inner(inner, &path, true)),
                    );
                }
                _ if included => {
                    out.insert(k.clone(), v.clone());
                }
                Value::Object(inner) if self.may_include_below(&path) => {
                    let sub = self.filter_inner(inner, &path, false);
                    if !sub.is_empty() {
                        out.insert(k.clone(), Value::Object(sub));
                    }
                }
                _ => {}
            }
        }
        out
    }

    fn may_include_below(&self, path: &str) -> bool {
        let below = format!("{path}.");
        self.includes.iter().any(|p| {
            let fixed = p.split('*').next().unwrap_or_default();
            p.starts_with(&below)
                || (p.contains('*') && (below.starts_with(fixed) || fixed.starts_with(&below)))
        })
    }
}

/// A sort value read from a fast field.
#[derive(Debug, Clone, PartialEq)]
pub enum SortValue {
    /// A number (dates are epoch milliseconds).
    Num(f64),
    /// A string.
    Str(String),
    /// No value.
    Missing,
}

impl SortValue {
    /// A `search_after` value, read as the sort field's type (`None`: `_score`, `_doc` or
    /// unmapped).
    fn from_json(v: &Value, ty: Option<FieldType>) -> Self {
        match (v, ty) {
            (Value::String(s), Some(FieldType::Keyword)) => Self::Str(s.clone()),
            (Value::Number(n), Some(FieldType::Keyword)) => Self::Str(n.to_string()),
            (Value::String(s), Some(FieldType::Date)) => {
                crate::date::parse(s, None).map_or(Self::Missing, |ms| Self::Num(ms as f64))
            }
            (Value::Number(n), _) => Self::Num(n.as_f64().unwrap_or(0.0)),
            (Value::String(s), _) => s
                .parse::<f64>()
                .map_or_else(|_| Self::Str(s.clone()), Self::Num),
            (Value::Bool(b), _) => Self::Num(if *b { 1.0 } else { 0.0 }),
            _ => Self::Missing,
        }
    }

    fn to_json(&self, integral: bool) -> Value {
        match self {
            Self::Num(f) if integral && f.fract() == 0.0 => json!(*f as i64),
            Self::Num(f) => json!(f),
            Self::Str(s) => json!(s),
            Self::Missing => Value::Null,
        }
    }
}

fn cmp_value(a: &SortValue, b: &SortValue, spec: &SortSpec) -> Ordering {
    use SortValue::*;
    let ordered = |o: Ordering| {
        if spec.order == Order::Desc {
            o.reverse()
        } else {
            o
        }
    };
    match (a, b) {
        (Missing, Missing) => Ordering::Equal,
        (Missing, _) => {
            if spec.missing_first {
                Ordering::Less
            } else {
                Ordering::Greater
            }
        }
        (_, Missing) => {
            if spec.missing_first {
                Ordering::Greater
            } else {
                Ordering::Less
            }
        }
        (Num(x), Num(y)) => ordered(x.total_cmp(y)),
        (Str(x), Str(y)) => ordered(x.cmp(y)),
        (Num(_), Str(_)) => ordered(Ordering::Less),
        (Str(_), Num(_)) => ordered(Ordering::Greater),
    }
}

fn cmp_keys(a: &[SortValue], b: &[SortValue], sort: &[SortSpec]) -> Ordering {
    for ((x, y), spec) in a.iter().zip(b).zip(sort) {
        let o = cmp_value(x, y, spec);
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// One collected hit.
#[derive(Debug, Clone)]
pub struct Hit {
    /// Relevance score.
    pub score: Score,
    /// Sort values, one per sort spec.
    pub keys: Vec<SortValue>,
    /// Where it is.
    pub address: DocAddress,
    /// Which (index, shard) it came from, set by the caller.
    pub origin: (usize, usize),
}

enum SortSource {
    Score,
    Doc,
    Columns(Vec<DynamicColumn>),
    None,
}

/// Collects the top `limit` hits by the sort (after `search_after`), and counts every match.
pub struct HitCollector {
    sort: Arc<Vec<SortSpec>>,
    mapping: Arc<Mapping>,
    limit: usize,
    after: Option<Arc<Vec<SortValue>>>,
    scoring: bool,
}

impl HitCollector {
    /// A collector for `sort` over documents of `mapping`.
    pub fn new(req: &SearchRequest, mapping: Arc<Mapping>) -> Self {
        let after = req.search_after.as_ref().map(|a| {
            let sort = req.effective_sort();
            Arc::new(
                a.iter()
                    .zip(&sort)
                    .map(|(v, spec)| {
                        SortValue::from_json(v, mapping.leaf(&spec.field).map(|l| l.ty))
                    })
                    .collect(),
            )
        });
        Self {
            sort: Arc::new(req.effective_sort()),
            mapping,
            limit: req.from + req.size,
            after,
            scoring: req.scores(),
        }
    }
}

/// Per-segment state of [`HitCollector`].
pub struct SegmentHits {
    segment: SegmentOrdinal,
    sources: Vec<SortSource>,
    sort: Arc<Vec<SortSpec>>,
    limit: usize,
    after: Option<Arc<Vec<SortValue>>>,
    hits: Vec<Hit>,
    count: u64,
}

impl Collector for HitCollector {
    type Fruit = (Vec<Hit>, u64);
    type Child = SegmentHits;

    fn for_segment(
        &self,
        segment: SegmentOrdinal,
        reader: &SegmentReader,
    ) -> tantivy::Result<SegmentHits> {
        let mut sources = Vec::new();
        for spec in self.sort.iter() {
            let source = match spec.field.as_str() {
                "_score" => SortSource::Score,
                "_doc" => SortSource::Doc,
                path => match self.mapping.leaf(path) {
                    Some(leaf) if leaf.ty != FieldType::Text => {
                        let name = format!("{KEYWORD_FIELD}.{path}");
                        let mut columns = Vec::new();
                        for handle in reader.fast_fields().dynamic_column_handles(&name)? {
                            columns.push(handle.open()?);
                        }
                        SortSource::Columns(columns)
                    }
                    _ => SortSource::None,
                },
            };
            sources.push(source);
        }
        Ok(SegmentHits {
            segment,
            sources,
            sort: self.sort.clone(),
            limit: self.limit,
            after: self.after.clone(),
            hits: Vec::new(),
            count: 0,
        })
    }

    fn requires_scoring(&self) -> bool {
        self.scoring
    }

    fn merge_fruits(&self, fruits: Vec<(Vec<Hit>, u64)>) -> tantivy::Result<(Vec<Hit>, u64)> {
        let mut all = Vec::new();
        let mut count = 0;
        for (hits, c) in fruits {
            all.extend(hits);
            count += c;
        }
        sort_hits(&mut all, &self.sort);
        all.truncate(self.limit);
        Ok((all, count))
    }
}

fn str_values(col: &StrColumn, doc: DocId, out: &mut Vec<String>) {
    for ord in col.term_ords(doc) {
        let mut s = String::new();
        if col.ord_to_str(ord, &mut s).unwrap_or(false) {
            out.push(s);
        }
    }
}

fn column_value(columns: &[DynamicColumn], doc: DocId, order: Order) -> SortValue {
    let mut nums: Vec<f64> = Vec::new();
    let mut strs: Vec<String> = Vec::new();
    for col in columns {
        match col {
            DynamicColumn::I64(c) => nums.extend(c.values_for_doc(doc).map(|v| v as f64)),
            DynamicColumn::U64(c) => nums.extend(c.values_for_doc(doc).map(|v| v as f64)),
            DynamicColumn::F64(c) => nums.extend(c.values_for_doc(doc)),
            DynamicColumn::Bool(c) => {
                nums.extend(c.values_for_doc(doc).map(|b| if b { 1.0 } else { 0.0 }))
            }
            DynamicColumn::DateTime(c) => nums.extend(
                c.values_for_doc(doc)
                    .map(|d| d.into_timestamp_millis() as f64),
            ),
            DynamicColumn::Str(c) => str_values(c, doc, &mut strs),
            DynamicColumn::Bytes(_) | DynamicColumn::IpAddr(_) => {}
        }
    }
    // ES sorts multi-valued fields by their minimum ascending, maximum descending.
    let pick_num = |v: &[f64]| match order {
        Order::Asc => v.iter().copied().reduce(f64::min),
        Order::Desc => v.iter().copied().reduce(f64::max),
    };
    if let Some(n) = pick_num(&nums) {
        return SortValue::Num(n);
    }
    let s = match order {
        Order::Asc => strs.into_iter().min(),
        Order::Desc => strs.into_iter().max(),
    };
    s.map_or(SortValue::Missing, SortValue::Str)
}

fn sort_hits(hits: &mut [Hit], sort: &[SortSpec]) {
    hits.sort_by(|a, b| {
        cmp_keys(&a.keys, &b.keys, sort)
            .then(a.origin.cmp(&b.origin))
            .then(a.address.segment_ord.cmp(&b.address.segment_ord))
            .then(a.address.doc_id.cmp(&b.address.doc_id))
    });
}

impl SegmentCollector for SegmentHits {
    type Fruit = (Vec<Hit>, u64);

    fn collect(&mut self, doc: DocId, score: Score) {
        self.count += 1;
        let keys: Vec<SortValue> = self
            .sources
            .iter()
            .zip(self.sort.iter())
            .map(|(source, spec)| match source {
                SortSource::Score => SortValue::Num(f64::from(score)),
                SortSource::Doc => SortValue::Num(f64::from(doc)),
                SortSource::Columns(cols) => column_value(cols, doc, spec.order),
                SortSource::None => SortValue::Missing,
            })
            .collect();
        if let Some(after) = &self.after {
            if cmp_keys(&keys, after, &self.sort) != Ordering::Greater {
                return;
            }
        }
        if self.limit == 0 {
            return;
        }
        self.hits.push(Hit {
            score,
            keys,
            address: DocAddress::new(self.segment, doc),
            origin: (0, 0),
        });
        if self.hits.len() >= self.limit * 2 + 64 {
            sort_hits(&mut self.hits, &self.sort);
            self.hits.truncate(self.limit);
        }
    }

    fn harvest(mut self) -> (Vec<Hit>, u64) {
        sort_hits(&mut self.hits, &self.sort);
        self.hits.truncate(self.limit);
        (self.hits, self.count)
    }
}

/// Sorts hits merged from several shards and keeps the page `[from, from + size)`.
pub fn merge_page(mut hits: Vec<Hit>, req: &SearchRequest) -> Vec<Hit> {
    let sort = req.effective_sort();
    sort_hits(&mut hits, &sort);
    hits.into_iter().skip(req.from).take(req.size).collect()
}

/// The `sort` array ES puts on each hit when the request sorts.
pub fn sort_json(hit: &Hit, req: &SearchRequest, mapping: &Mapping) -> Value {
    Value::Array(
        hit.keys
            .iter()
            .zip(req.effective_sort())
            .map(|(k, spec)| {
                let integral = match spec.field.as_str() {
                    "_score" => false,
                    "_doc" => true,
                    f => mapping.leaf(f).is_some_and(|l| {
                        l.ty.is_integer() || l.ty == FieldType::Date || l.ty == FieldType::Boolean
                    }),
                };
                if let SortValue::Missing = k {
                    // ES shows the substitute value for a missing key.
                    let asc = spec.order == Order::Asc;
                    return if spec.missing_first == asc {
                        json!(i64::MIN)
                    } else {
                        json!(i64::MAX)
                    };
                }
                k.to_json(integral)
            })
            .collect(),
    )
}

/// The `_source` of a stored document, filtered.
pub fn hit_source(
    doc: &TantivyDocument,
    fields: &crate::shard::Fields,
    filter: &SourceFilter,
) -> Option<Value> {
    if filter.disabled {
        return None;
    }
    let stored = crate::shard::stored_doc(doc, fields);
    let value: Value = serde_json::from_str(&stored.source).unwrap_or(Value::Null);
    Some(if filter.is_identity() {
        value
    } else {
        filter.apply(&value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_forms() {
        let s = parse_sort(
            &json!(["a", {"b": "desc"}, {"c": {"order": "asc", "missing": "_first"}}, "_score"]),
        )
        .expect("parses");
        assert_eq!(s.len(), 4);
        assert_eq!(
            s[0],
            SortSpec {
                field: "a".into(),
                order: Order::Asc,
                missing_first: false,
                unmapped_ok: false,
            }
        );
        assert_eq!(s[1].order, Order::Desc);
        assert!(s[2].missing_first);
        assert_eq!(s[3].order, Order::Desc);
        assert!(parse_sort(&json!({"a": "sideways"})).is_err());
    }

    #[test]
    fn missing_values_go_last_in_both_orders() {
        let asc = SortSpec {
            field: "a".into(),
            order: Order::Asc,
            missing_first: false,
            unmapped_ok: false,
        };
        let desc = SortSpec {
            order: Order::Desc,
            ..asc.clone()
        };
        assert_eq!(
            cmp_value(&SortValue::Missing, &SortValue::Num(1.0), &asc),
            Ordering::Greater
        );
        assert_eq!(
            cmp_value(&SortValue::Missing, &SortValue::Num(1.0), &desc),
            Ordering::Greater
        );
        assert_eq!(
            cmp_value(&SortValue::Num(2.0), &SortValue::Num(1.0), &desc),
            Ordering::Less
        );
    }

    #[test]
    fn source_filtering() {
        let src = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": {"f": 4}});
        let f = parse_source(&json!(["a", "b.c"])).expect("ok");
        assert_eq!(f.apply(&src), json!({"a": 1, "b": {"c": 2}}));
        let f = parse_source(&json!({"includes": ["b.*"], "excludes": ["b.d"]})).expect("ok");
        assert_eq!(f.apply(&src), json!({"b": {"c": 2}}));
        let f = parse_source(&json!({"excludes": ["e"]})).expect("ok");
        assert_eq!(f.apply(&src), json!({"a": 1, "b": {"c": 2, "d": 3}}));
        let f = parse_source(&json!("b")).expect("ok");
        assert_eq!(f.apply(&src), json!({"b": {"c": 2, "d": 3}}));
        assert!(parse_source(&json!(false)).expect("ok").disabled);
    }

    #[test]
    fn request_validation() {
        assert!(SearchRequest::parse(&json!({"from": 9990, "size": 20})).is_err());
        assert!(SearchRequest::parse(&json!({"bogus": 1})).is_err());
        assert!(SearchRequest::parse(&json!({"sort": ["a"], "search_after": [1, 2]})).is_err());
        let r = SearchRequest::parse(&json!({"size": 0, "track_total_hits": true})).expect("ok");
        assert_eq!(r.track_total_hits, TrackTotal::Exact);
    }
}
