//! Aggregations: ES `aggs` requests run on tantivy's aggregation framework, merged across shards
//! as tantivy intermediate results (so percentiles merge sketches and cardinality merges
//! HyperLogLogs, never averaging or summing final values), then shaped like ES responses.
//!
//! Owns the request rewrite (ES field paths → the shard's fast-field columns), the `filter` and
//! `filters` aggregations (built here, at the top of the tree, from the query DSL), and the
//! response fixes where tantivy's shape differs from ES's. Does not own query meaning (`query`).
//!
//! Supported: `terms`, `stats`, `extended_stats`, `histogram`, `date_histogram`
//! (`fixed_interval`; `calendar_interval` of a minute, hour or day anywhere, and of a week,
//! month, quarter or year at the top level), `range`, `avg`, `min`,
//! `max`, `sum`, `value_count`, `percentiles`, `cardinality` at any depth; `filter` and `filters`
//! at the top level or under another `filter`/`filters`; `top_hits` at the top level and under
//! `terms`, `filter` and `filters`, each run as a search narrowed to its bucket (the bucket's key
//! or filter), so its hits carry `_source` and sort values exactly like search hits.

use serde_json::{Map, Value, json};
use tantivy::Searcher;
use tantivy::aggregation::agg_req::Aggregations;
use tantivy::aggregation::intermediate_agg_result::IntermediateAggregationResults;
use tantivy::aggregation::{
    AggContextParams, AggregationLimitsGuard, DistributedAggregationCollector,
};
use tantivy::collector::Count;
use tantivy::query::{BooleanQuery, Occur, Query};

use crate::error::EsError;
use crate::mapping::{FieldType, Mapping};
use crate::query::{self, QueryAst};
use crate::shard::KEYWORD_FIELD;

/// Turns a filter's query DSL into a tantivy query for one shard.
pub type BuildQuery<'a> = dyn FnMut(&QueryAst) -> Result<Box<dyn Query>, EsError> + 'a;

/// Aggregation types passed to tantivy.
const TANTIVY_TYPES: &[&str] = &[
    "terms",
    "stats",
    "extended_stats",
    "histogram",
    "date_histogram",
    "range",
    "avg",
    "min",
    "max",
    "sum",
    "value_count",
    "percentiles",
    "cardinality",
];

/// A checked aggregation request.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The part tantivy runs, with fields rewritten; `None` when empty.
    tantivy: Option<Aggregations>,
    /// The original ES request of the tantivy part, for shaping the response.
    es: Map<String, Value>,
    /// `filter` / `filters` aggregations built here.
    filters: Vec<FilterAgg>,
    /// `top_hits` at this level: name and body (`size`, `from`, `sort`, `_source`, ...).
    top_hits: Vec<(String, Value)>,
    /// The tantivy part as JSON, rebuilt into `tantivy` once calendar histograms are bound.
    tantivy_json: Map<String, Value>,
    /// Top-level `date_histogram`s with a week-or-longer `calendar_interval`, run as `range`
    /// aggregations over calendar boundaries found by a first pass (see [`Plan::bind`]).
    calendars: Vec<Calendar>,
}

#[derive(Debug, Clone)]
struct Calendar {
    name: String,
    /// The fast-field column.
    column: String,
    unit: String,
    min_doc_count: u64,
    /// Rewritten sub-aggregations for tantivy.
    sub: Option<Value>,
}

#[derive(Debug, Clone)]
struct FilterAgg {
    name: String,
    /// One query for `filter`; one per bucket for `filters`.
    buckets: Vec<(String, QueryAst)>,
    /// `filters` (plural) with keyed buckets, with an array of anonymous buckets, or `filter`.
    kind: FilterKind,
    sub: Plan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FilterKind {
    Single,
    Keyed,
    Anonymous,
}

/// One shard's partial result.
#[derive(Debug)]
pub struct Partial {
    tantivy: Option<IntermediateAggregationResults>,
    /// Per filter aggregation, per bucket: document count and sub-aggregations.
    filters: Vec<Vec<(u64, Partial)>>,
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, EsError> {
    v.as_object()
        .ok_or_else(|| EsError::parsing(format!("[{what}] must be an object")))
}

/// Rewrites `field` of one aggregation body to the fast-field column of its path.
fn rewrite_field(
    kind: &str,
    body: &mut Map<String, Value>,
    mappings: &[Mapping],
) -> Result<(), EsError> {
    let Some(field) = body.get("field").and_then(Value::as_str).map(str::to_owned) else {
        return Err(EsError::parsing(format!(
            "[{kind}] aggregation requires a [field]"
        )));
    };
    for mapping in mappings {
        if let Some(leaf) = mapping.leaf(&field) {
            if leaf.ty == FieldType::Text {
                return Err(EsError::illegal_argument(format!(
                    "Text fields are not optimised for operations that require per-document field data like aggregations and sorting, so these operations are disabled by default. Please use a keyword field instead. Alternatively, set fielddata=true on [{field}] in order to load field data by uninverting the inverted index. Note that this can use significant memory."
                )));
            }
        }
    }
    body.insert("field".into(), json!(format!("{KEYWORD_FIELD}.{field}")));
    let is_date = mappings
        .iter()
        .any(|m| m.leaf(&field).is_some_and(|l| l.ty == FieldType::Date));
    if is_date {
        // tantivy computes date metrics and ranges in nanoseconds; ES speaks milliseconds.
        match kind {
            "terms" | "extended_stats" => {
                return Err(EsError::illegal_argument(format!(
                    "[{kind}] on date field [{field}] is not supported yet"
                )));
            }
            "range" => {
                if let Some(Value::Array(ranges)) = body.get_mut("ranges") {
                    for range in ranges.iter_mut() {
                        for bound in ["from", "to"] {
                            if let Some(v) = range.get(bound) {
                                let ms = match v {
                                    Value::Number(n) => n.as_f64(),
                                    Value::String(s) => {
                                        crate::date::parse(s, None).ok().map(|ms| ms as f64)
                                    }
                                    _ => None,
                                }
                                .ok_or_else(|| {
                                    EsError::parsing(format!("[range] invalid date bound {v}"))
                                })?;
                                range[bound] = json!(ms * 1e6);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        body.insert("_es_date".into(), json!(true));
    }
    if kind == "date_histogram" {
        if let Some(tz) = body.remove("time_zone") {
            if !matches!(
                tz.as_str(),
                Some("UTC" | "Z" | "+00:00" | "Etc/UTC" | "GMT")
            ) {
                return Err(EsError::illegal_argument(format!(
                    "[date_histogram] time_zone {tz} is not supported yet (only UTC)"
                )));
            }
        }
        if let Some(format) = body.remove("format") {
            let Some(f) = format.as_str() else {
                return Err(EsError::parsing(
                    "[date_histogram] [format] must be a string",
                ));
            };
            crate::date::check_format(f).map_err(|e| {
                EsError::illegal_argument(format!("[date_histogram] invalid format [{f}]: {e}"))
            })?;
            // Kept for the response's `key_as_string`; tantivy does not take it.
            body.insert("_es_format".into(), format);
        }
        if let Some(calendar) = body.remove("calendar_interval") {
            let fixed = match calendar.as_str() {
                Some("minute" | "1m") => "1m",
                Some("hour" | "1h") => "1h",
                Some("day" | "1d") => "1d",
                Some(
                    unit @ ("week" | "1w" | "month" | "1M" | "quarter" | "1q" | "year" | "1y"),
                ) => {
                    body.insert("_es_calendar".into(), json!(unit));
                    return Ok(());
                }
                _ => {
                    return Err(EsError::illegal_argument(format!(
                        "[date_histogram] calendar_interval {calendar} is not supported"
                    )));
                }
            };
            body.insert("fixed_interval".into(), json!(fixed));
        }
        if body.contains_key("interval") {
            return Err(EsError::illegal_argument(
                "[interval] on [date_histogram] is deprecated; use fixed_interval",
            ));
        }
    }
    Ok(())
}

impl Plan {
    /// Checks an ES `aggs` object against the mappings of the searched indices.
    pub fn parse(aggs: &Value, mappings: &[Mapping]) -> Result<Self, EsError> {
        Self::parse_level(aggs, mappings, true)
    }

    fn parse_level(aggs: &Value, mappings: &[Mapping], top: bool) -> Result<Self, EsError> {
        let obj = object(aggs, "aggs")?;
        let mut calendars = Vec::new();
        let mut tantivy = Map::new();
        let mut es = Map::new();
        let mut filters = Vec::new();
        let mut top_hits = Vec::new();
        for (name, spec) in obj {
            let spec = object(spec, name)?;
            let mut kind = None;
            let mut sub = None;
            for (key, value) in spec {
                match key.as_str() {
                    "aggs" | "aggregations" => sub = Some(value),
                    "meta" => {}
                    k if kind.is_none() => kind = Some((k.to_owned(), value)),
                    k => {
                        return Err(EsError::parsing(format!(
                            "Found two aggregation type definitions in [{name}]: [{}] and [{k}]",
                            kind.as_ref().map(|(k, _)| k.as_str()).unwrap_or_default()
                        )));
                    }
                }
            }
            let Some((kind, body)) = kind else {
                return Err(EsError::parsing(format!(
                    "Missing definition for aggregation [{name}]"
                )));
            };
            match kind.as_str() {
                "filter" | "filters" => {
                    let buckets_and_kind = if kind == "filter" {
                        (
                            vec![(String::new(), query::parse(body)?)],
                            FilterKind::Single,
                        )
                    } else {
                        let filters_body = object(body, "filters")?;
                        match filters_body.get("filters") {
                            Some(Value::Object(named)) => (
                                named
                                    .iter()
                                    .map(|(k, q)| Ok((k.clone(), query::parse(q)?)))
                                    .collect::<Result<Vec<_>, EsError>>()?,
                                FilterKind::Keyed,
                            ),
                            Some(Value::Array(list)) => (
                                list.iter()
                                    .map(|q| Ok((String::new(), query::parse(q)?)))
                                    .collect::<Result<Vec<_>, EsError>>()?,
                                FilterKind::Anonymous,
                            ),
                            _ => {
                                return Err(EsError::parsing(
                                    "[filters] requires a [filters] object or array",
                                ));
                            }
                        }
                    };
                    let sub = match sub {
                        Some(s) => Plan::parse_level(s, mappings, false)?,
                        None => Plan::parse_level(&json!({}), mappings, false)?,
                    };
                    filters.push(FilterAgg {
                        name: name.clone(),
                        buckets: buckets_and_kind.0,
                        kind: buckets_and_kind.1,
                        sub,
                    });
                }
                "top_hits" => {
                    if sub.is_some() {
                        return Err(EsError::parsing(format!(
                            "Aggregator [{name}] of type [top_hits] cannot accept sub-aggregations"
                        )));
                    }
                    check_top_hits(name, body)?;
                    top_hits.push((name.clone(), body.clone()));
                }
                k if TANTIVY_TYPES.contains(&k) => {
                    let mut body = object(body, k)?.clone();
                    let es_field = body.get("field").cloned();
                    rewrite_field(k, &mut body, mappings)?;
                    let es_format = body.remove("_es_format");
                    let es_date = body.remove("_es_date");
                    let mut rewritten = Map::new();
                    rewritten.insert(k.to_owned(), Value::Object(body));
                    let mut es_entry = Map::new();
                    es_entry.insert("type".into(), json!(k));
                    if let Some(f) = es_format {
                        es_entry.insert("format".into(), f);
                    }
                    if let Some(d) = es_date {
                        es_entry.insert("date".into(), d);
                    }
                    let calendar = match rewritten.get_mut(k).and_then(Value::as_object_mut) {
                        Some(b) => b.remove("_es_calendar"),
                        None => None,
                    };
                    if let Some(sub) = sub {
                        // `top_hits` under `terms` runs as a search per bucket (the bucket key
                        // as a filter); tantivy's own top_hits returns no `_source`.
                        let mut sub = object(sub, "aggs")?.clone();
                        let hits: Map<String, Value> = sub
                            .iter()
                            .filter(|(_, spec)| spec.get("top_hits").is_some())
                            .map(|(n, spec)| (n.clone(), spec.clone()))
                            .collect();
                        if !hits.is_empty() {
                            if k != "terms" {
                                return Err(EsError::illegal_argument(format!(
                                    "[top_hits] is supported at the top level and under [terms], [filter] and [filters], not under [{k}]"
                                )));
                            }
                            for n in hits.keys() {
                                sub.remove(n);
                            }
                        }
                        let sub_plan = Plan::parse_level(&Value::Object(sub), mappings, false)?;
                        if !hits.is_empty() {
                            for (n, spec) in &hits {
                                check_top_hits(n, &spec["top_hits"])?;
                            }
                            es_entry.insert("field".into(), es_field.unwrap_or(Value::Null));
                            es_entry.insert(
                                "top_hits".into(),
                                Value::Object(
                                    hits.into_iter()
                                        .map(|(n, spec)| (n, spec["top_hits"].clone()))
                                        .collect(),
                                ),
                            );
                        }
                        if !sub_plan.filters.is_empty() {
                            return Err(EsError::illegal_argument(format!(
                                "[filter] and [filters] aggregations are supported only at the top level or under each other, not under [{name}]"
                            )));
                        }
                        if let Some(t) = &sub_plan.tantivy {
                            rewritten.insert(
                                "aggs".into(),
                                serde_json::to_value(t)
                                    .map_err(|e| EsError::internal(e.to_string()))?,
                            );
                        }
                        es_entry.insert("aggs".into(), Value::Object(sub_plan.es));
                    }
                    if let Some(unit) = calendar {
                        if !top {
                            return Err(EsError::illegal_argument(format!(
                                "[date_histogram] calendar_interval {unit} is supported only at the top level of aggs"
                            )));
                        }
                        let body = &rewritten[k];
                        for key in body.as_object().into_iter().flat_map(|b| b.keys()) {
                            if !matches!(key.as_str(), "field" | "min_doc_count") {
                                return Err(EsError::illegal_argument(format!(
                                    "[date_histogram] [{key}] with a calendar_interval of [{unit}] is not supported yet"
                                )));
                            }
                        }
                        calendars.push(Calendar {
                            name: name.clone(),
                            column: body["field"].as_str().unwrap_or_default().to_owned(),
                            unit: unit.as_str().unwrap_or_default().to_owned(),
                            min_doc_count: body
                                .get("min_doc_count")
                                .and_then(Value::as_u64)
                                .unwrap_or(0),
                            sub: rewritten.get("aggs").cloned(),
                        });
                        es_entry.insert("type".into(), json!("calendar_histogram"));
                        es.insert(name.clone(), Value::Object(es_entry));
                        continue;
                    }
                    tantivy.insert(name.clone(), Value::Object(rewritten));
                    es.insert(name.clone(), Value::Object(es_entry));
                }
                "composite" | "multi_terms" => {
                    return Err(EsError::illegal_argument(format!(
                        "the [{kind}] aggregation is not supported yet"
                    )));
                }
                other => {
                    return Err(EsError::parsing(format!(
                        "Unknown aggregation type [{other}] did you mean one of [terms, stats, histogram, ...]?"
                    )));
                }
            }
        }
        let mut plan = Self {
            tantivy: None,
            es,
            filters,
            top_hits,
            tantivy_json: tantivy,
            calendars,
        };
        plan.rebuild()?;
        Ok(plan)
    }

    fn rebuild(&mut self) -> Result<(), EsError> {
        self.tantivy = if self.tantivy_json.is_empty() {
            None
        } else {
            Some(
                serde_json::from_value::<Aggregations>(Value::Object(self.tantivy_json.clone()))
                    .map_err(|e| EsError::parsing(format!("invalid aggregation: {e}")))?,
            )
        };
        Ok(())
    }

    /// The first pass calendar histograms need: the date range of each one's field, as a tantivy
    /// request (`None` when there is no calendar histogram).
    pub fn bounds_request(&self) -> Option<Aggregations> {
        if self.calendars.is_empty() {
            return None;
        }
        let mut req = Map::new();
        for (i, c) in self.calendars.iter().enumerate() {
            req.insert(format!("b{i}"), json!({ "stats": { "field": c.column } }));
        }
        serde_json::from_value(Value::Object(req)).ok()
    }

    /// Runs the bounds request over one shard.
    pub fn collect_bounds(
        searcher: &Searcher,
        query: &dyn Query,
        request: &Aggregations,
    ) -> Result<IntermediateAggregationResults, EsError> {
        let context = AggContextParams::new(
            AggregationLimitsGuard::default(),
            searcher.index().tokenizers().clone(),
        );
        let collector = DistributedAggregationCollector::from_aggs(request.clone(), context);
        searcher.search(query, &collector).map_err(agg_error)
    }

    /// Merges the shards' bounds into the final result [`Plan::bind`] takes.
    pub fn merge_bounds(
        request: &Aggregations,
        parts: Vec<IntermediateAggregationResults>,
    ) -> Result<Value, EsError> {
        let mut merged: Option<IntermediateAggregationResults> = None;
        for p in parts {
            match &mut merged {
                None => merged = Some(p),
                Some(m) => m.merge_fruits(p).map_err(agg_error)?,
            }
        }
        let result = merged
            .unwrap_or_default()
            .into_final_result(request.clone(), AggregationLimitsGuard::default())
            .map_err(agg_error)?;
        serde_json::to_value(&result).map_err(|e| EsError::internal(e.to_string()))
    }

    /// Turns each calendar histogram into a `range` aggregation over its calendar boundaries,
    /// given the final result of [`Plan::bounds_request`].
    pub fn bind(&mut self, bounds: &Value) -> Result<(), EsError> {
        for (i, c) in self.calendars.iter().enumerate() {
            let stats = &bounds[format!("b{i}")];
            // tantivy reports date statistics in nanoseconds.
            let (Some(min), Some(max)) = (stats["min"].as_f64(), stats["max"].as_f64()) else {
                continue;
            };
            let (min, max) = ((min / 1e6).floor() as i64, (max / 1e6).floor() as i64);
            let edges = crate::date::calendar_buckets(min, max, &c.unit).ok_or_else(|| {
                EsError::illegal_argument(format!(
                    "[date_histogram] [{}] would create more than {} buckets",
                    c.name,
                    crate::date::MAX_CALENDAR_BUCKETS
                ))
            })?;
            let ranges: Vec<Value> = edges
                .windows(2)
                .map(|w| json!({ "from": w[0] as f64 * 1e6, "to": w[1] as f64 * 1e6 }))
                .collect();
            let mut agg = json!({ "range": { "field": c.column, "ranges": ranges } });
            if let Some(sub) = &c.sub {
                agg["aggs"] = sub.clone();
            }
            self.tantivy_json.insert(c.name.clone(), agg);
        }
        self.rebuild()
    }

    /// Runs the aggregations over one shard's documents matching `query`. `build` turns a filter's
    /// query DSL into a tantivy query for this shard.
    pub fn collect(
        &self,
        searcher: &Searcher,
        query: &dyn Query,
        build: &mut BuildQuery<'_>,
    ) -> Result<Partial, EsError> {
        let tantivy = match &self.tantivy {
            Some(aggs) => {
                let context = AggContextParams::new(
                    AggregationLimitsGuard::default(),
                    searcher.index().tokenizers().clone(),
                );
                let collector = DistributedAggregationCollector::from_aggs(aggs.clone(), context);
                Some(searcher.search(query, &collector).map_err(agg_error)?)
            }
            None => None,
        };
        let mut filters = Vec::new();
        for filter in &self.filters {
            let mut buckets = Vec::new();
            for (_, ast) in &filter.buckets {
                let filtered = BooleanQuery::new(vec![
                    (Occur::Must, query.box_clone()),
                    (Occur::Must, build(ast)?),
                ]);
                let count = searcher.search(&filtered, &Count)? as u64;
                let sub = filter.sub.collect(searcher, &filtered, build)?;
                buckets.push((count, sub));
            }
            filters.push(buckets);
        }
        Ok(Partial { tantivy, filters })
    }

    /// Merges shard partials into the ES `aggregations` object.
    pub fn finish(&self, parts: Vec<Partial>) -> Result<Value, EsError> {
        let mut out = Map::new();
        let mut tantivy_parts = Vec::new();
        let mut filter_parts: Vec<Vec<Vec<(u64, Partial)>>> = Vec::new();
        for part in parts {
            if let Some(t) = part.tantivy {
                tantivy_parts.push(t);
            }
            filter_parts.push(part.filters);
        }
        if let Some(aggs) = &self.tantivy {
            let mut merged: Option<IntermediateAggregationResults> = None;
            for p in tantivy_parts {
                match &mut merged {
                    None => merged = Some(p),
                    Some(m) => m.merge_fruits(p).map_err(agg_error)?,
                }
            }
            let merged = merged.unwrap_or_default();
            let result = merged
                .into_final_result(aggs.clone(), AggregationLimitsGuard::default())
                .map_err(agg_error)?;
            let value =
                serde_json::to_value(&result).map_err(|e| EsError::internal(e.to_string()))?;
            if let Value::Object(results) = value {
                for (name, mut v) in results {
                    if let Some(es) = self.es.get(&name) {
                        shape(es, &mut v);
                    }
                    out.insert(name, v);
                }
            }
        }
        for c in &self.calendars {
            if let Some(v) = out.get_mut(&c.name) {
                if let Some(buckets) = v.get_mut("buckets").and_then(Value::as_array_mut) {
                    buckets.retain(|b| b["doc_count"].as_u64().unwrap_or(0) >= c.min_doc_count);
                }
            } else {
                out.insert(c.name.clone(), json!({ "buckets": [] }));
            }
        }
        for (i, filter) in self.filters.iter().enumerate() {
            let mut bucket_values = Vec::new();
            for (b, (key, _)) in filter.buckets.iter().enumerate() {
                let mut count = 0;
                let mut subs = Vec::new();
                for shard in filter_parts.iter_mut() {
                    if let Some(buckets) = shard.get_mut(i) {
                        if b < buckets.len() {
                            let (c, p) = std::mem::replace(
                                &mut buckets[b],
                                (
                                    0,
                                    Partial {
                                        tantivy: None,
                                        filters: Vec::new(),
                                    },
                                ),
                            );
                            count += c;
                            subs.push(p);
                        }
                    }
                }
                let mut bucket = match filter.sub.finish(subs)? {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                bucket.insert("doc_count".into(), json!(count));
                bucket_values.push((key.clone(), Value::Object(bucket)));
            }
            let value = match filter.kind {
                FilterKind::Single => bucket_values
                    .pop()
                    .map(|(_, v)| v)
                    .unwrap_or(json!({"doc_count": 0})),
                FilterKind::Keyed => {
                    json!({ "buckets": Value::Object(bucket_values.into_iter().collect()) })
                }
                FilterKind::Anonymous => {
                    json!({ "buckets": bucket_values.into_iter().map(|(_, v)| v).collect::<Vec<_>>() })
                }
            };
            out.insert(filter.name.clone(), value);
        }
        Ok(Value::Object(out))
    }
}

/// Checks a `top_hits` body: the keys a search page takes.
fn check_top_hits(name: &str, body: &Value) -> Result<(), EsError> {
    let obj = object(body, name)?;
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "size"
                | "from"
                | "sort"
                | "_source"
                | "version"
                | "seq_no_primary_term"
                | "track_scores"
        ) {
            return Err(EsError::illegal_argument(format!(
                "[top_hits] option [{key}] is not supported yet"
            )));
        }
    }
    Ok(())
}

/// Runs one `top_hits`: the request's query, narrowed by `filters`, with the page in `body`;
/// returns the ES `hits` object.
pub type RunTopHits<'a> = dyn FnMut(&[QueryAst], &Value) -> Result<Value, EsError> + 'a;

impl Plan {
    /// Fills the `top_hits` results into `out` (the `aggregations` object at this plan's level),
    /// each a search narrowed by the enclosing filters and terms buckets.
    pub fn fill_top_hits(
        &self,
        out: &mut Value,
        filters: &[QueryAst],
        run: &mut RunTopHits<'_>,
    ) -> Result<(), EsError> {
        for (name, body) in &self.top_hits {
            out[name.as_str()] = json!({ "hits": run(filters, body)? });
        }
        for (name, es) in &self.es {
            let (Some(hits), Some(field)) = (
                es.get("top_hits").and_then(Value::as_object),
                es.get("field").and_then(Value::as_str),
            ) else {
                continue;
            };
            let Some(buckets) = out
                .get_mut(name.as_str())
                .and_then(|v| v.get_mut("buckets"))
                .and_then(Value::as_array_mut)
            else {
                continue;
            };
            for bucket in buckets {
                let key = bucket["key"].clone();
                let mut narrowed = filters.to_vec();
                narrowed.push(QueryAst::Term {
                    field: field.to_owned(),
                    value: key,
                    boost: 1.0,
                });
                for (hits_name, body) in hits {
                    bucket[hits_name.as_str()] = json!({ "hits": run(&narrowed, body)? });
                }
            }
        }
        for filter in &self.filters {
            for (b, (key, ast)) in filter.buckets.iter().enumerate() {
                let mut narrowed = filters.to_vec();
                narrowed.push(ast.clone());
                let slot = match filter.kind {
                    FilterKind::Single => out.get_mut(filter.name.as_str()),
                    FilterKind::Keyed => out
                        .get_mut(filter.name.as_str())
                        .and_then(|v| v.get_mut("buckets"))
                        .and_then(|v| v.get_mut(key.as_str())),
                    FilterKind::Anonymous => out
                        .get_mut(filter.name.as_str())
                        .and_then(|v| v.get_mut("buckets"))
                        .and_then(|v| v.get_mut(b)),
                };
                if let Some(slot) = slot {
                    filter.sub.fill_top_hits(slot, &narrowed, run)?;
                }
            }
        }
        Ok(())
    }
}

/// Converts tantivy's nanosecond date results to ES's milliseconds with `*_as_string` forms.
fn date_units(kind: &str, v: &mut Value) {
    let to_ms = |x: &Value| x.as_f64().map(|ns| (ns / 1e6).round());
    let as_string = |ms: f64| json!(crate::date::format_millis(ms as i64, None));
    match kind {
        "min" | "max" | "avg" => {
            if let Some(ms) = to_ms(&v["value"]) {
                v["value"] = json!(ms);
                v["value_as_string"] = as_string(ms);
            }
        }
        "sum" => {
            if let Some(ms) = to_ms(&v["value"]) {
                v["value"] = json!(ms);
            }
        }
        "stats" => {
            for key in ["min", "max", "avg", "sum"] {
                if let Some(ms) = to_ms(&v[key]) {
                    v[key] = json!(ms);
                    if key != "sum" {
                        v[format!("{key}_as_string")] = as_string(ms);
                    }
                }
            }
        }
        "percentiles" => {
            if let Some(values) = v.get_mut("values").and_then(Value::as_object_mut) {
                for x in values.values_mut() {
                    if let Some(ms) = to_ms(x) {
                        *x = json!(ms);
                    }
                }
            }
        }
        "range" => {
            if let Some(buckets) = v.get_mut("buckets").and_then(Value::as_array_mut) {
                for b in buckets {
                    let mut key = String::new();
                    for (i, bound) in ["from", "to"].into_iter().enumerate() {
                        if i == 1 {
                            key.push('-');
                        }
                        match to_ms(&b[bound]) {
                            Some(ms) => {
                                b[bound] = json!(ms);
                                let s = as_string(ms);
                                key.push_str(s.as_str().unwrap_or_default());
                                b[format!("{bound}_as_string")] = s;
                            }
                            None => key.push('*'),
                        }
                    }
                    b["key"] = json!(key);
                }
            }
        }
        _ => {}
    }
}

fn agg_error(e: tantivy::TantivyError) -> EsError {
    match e {
        tantivy::TantivyError::InvalidArgument(m) => EsError::illegal_argument(m),
        tantivy::TantivyError::AggregationError(a) => EsError::illegal_argument(a.to_string()),
        other => EsError::from(other),
    }
}

/// Fixes the places where tantivy's result shape differs from ES's.
fn shape(es: &Value, v: &mut Value) {
    let kind = es["type"].as_str().unwrap_or_default();
    if kind == "date_histogram" {
        if let Some(buckets) = v.get_mut("buckets").and_then(Value::as_array_mut) {
            for b in buckets {
                if let Some(ms) = b.get("key").and_then(Value::as_f64) {
                    let ms = ms as i64;
                    b["key"] = json!(ms);
                    b["key_as_string"] =
                        json!(crate::date::format_millis(ms, es["format"].as_str()));
                }
            }
        }
    }
    if kind == "calendar_histogram" {
        if let Some(buckets) = v.get_mut("buckets").and_then(Value::as_array_mut) {
            // The open-ended buckets tantivy adds around the ranges hold no documents.
            buckets.retain(|b| b.get("from").is_some() && b.get("to").is_some());
            for b in buckets.iter_mut() {
                let ms = (b["from"].as_f64().unwrap_or(0.0) / 1e6).round() as i64;
                if let Some(o) = b.as_object_mut() {
                    for k in ["from", "to", "from_as_string", "to_as_string"] {
                        o.remove(k);
                    }
                }
                b["key"] = json!(ms);
                b["key_as_string"] = json!(crate::date::format_millis(ms, es["format"].as_str()));
            }
        }
    }
    if es["date"] == json!(true)
        && !matches!(kind, "date_histogram" | "histogram" | "calendar_histogram")
    {
        date_units(kind, v);
    }
    if kind == "value_count" && v["value"].is_null() {
        v["value"] = json!(0);
    }
    if kind == "cardinality" {
        if let Some(f) = v["value"].as_f64() {
            v["value"] = json!(f.round() as u64);
        }
    }
    let Some(subs) = es.get("aggs").and_then(Value::as_object) else {
        return;
    };
    if let Some(buckets) = v.get_mut("buckets") {
        let list: Vec<&mut Value> = match buckets {
            Value::Array(a) => a.iter_mut().collect(),
            Value::Object(o) => o.values_mut().collect(),
            _ => Vec::new(),
        };
        for bucket in list {
            for (name, sub_es) in subs {
                if let Some(sub_v) = bucket.get_mut(name) {
                    shape(sub_es, sub_v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping() -> Mapping {
        Mapping::from_json(&json!({"properties": {
            "tag": {"type": "keyword"}, "n": {"type": "long"}, "body": {"type": "text"}, "at": {"type": "date"}}}))
        .expect("valid")
    }

    #[test]
    fn rewrites_fields_and_nests() {
        let plan = Plan::parse(
            &json!({"by_tag": {"terms": {"field": "tag"}, "aggs": {"avg_n": {"avg": {"field": "n"}}}},
                    "only_a": {"filter": {"term": {"tag": "a"}}, "aggs": {"s": {"stats": {"field": "n"}}}}}),
            &[mapping()],
        )
        .expect("valid");
        let t = serde_json::to_value(plan.tantivy.expect("tantivy part")).expect("json");
        assert_eq!(t["by_tag"]["terms"]["field"], "keyword.tag");
        assert_eq!(t["by_tag"]["aggs"]["avg_n"]["avg"]["field"], "keyword.n");
        assert_eq!(plan.filters.len(), 1);
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let m = [mapping()];
        for (bad, kind) in [
            (
                json!({"x": {"terms": {"field": "body"}}}),
                crate::error::ErrorKind::IllegalArgument,
            ),
            (
                json!({"x": {"nonsense": {"field": "n"}}}),
                crate::error::ErrorKind::Parsing,
            ),
            (
                json!({"x": {"terms": {"field": "n"}, "avg": {"field": "n"}}}),
                crate::error::ErrorKind::Parsing,
            ),
            (
                json!({"x": {"terms": {"field": "tag"}, "aggs": {"m": {"date_histogram": {"field": "at", "calendar_interval": "month"}}}}}),
                crate::error::ErrorKind::IllegalArgument,
            ),
            (
                json!({"x": {"terms": {"field": "tag"}, "aggs": {"f": {"filter": {"match_all": {}}}}}}),
                crate::error::ErrorKind::IllegalArgument,
            ),
            (
                json!({"x": {"top_hits": {"highlight": {}}}}),
                crate::error::ErrorKind::IllegalArgument,
            ),
            (
                json!({"x": {"histogram": {"field": "n", "interval": 1}, "aggs": {"h": {"top_hits": {}}}}}),
                crate::error::ErrorKind::IllegalArgument,
            ),
            (json!({"x": {"avg": {}}}), crate::error::ErrorKind::Parsing),
        ] {
            let err = Plan::parse(&bad, &m).expect_err("refused");
            assert_eq!(err.kind, kind, "{bad}");
        }
    }
}
