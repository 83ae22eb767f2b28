//! The ES query DSL: JSON → [`QueryAst`] (pure parsing, every error a `parsing_exception`), then
//! [`QueryAst`] → tantivy query against an index's mapping and the shard schema.
//!
//! Owns the meaning of each query type. Does not run queries (see `search`).

use std::ops::Bound;

use serde_json::{Map, Value};
use tantivy::Term;
use tantivy::query::{
    AllQuery, BooleanQuery, BoostQuery, ConstScoreQuery, DisjunctionMaxQuery, EmptyQuery,
    FuzzyTermQuery, Occur, PhraseQuery, Query, RangeQuery, RegexQuery, TermQuery, TermSetQuery,
};
use tantivy::schema::{Field, IndexRecordOption};
use tantivy::tokenizer::TextAnalyzer;

use crate::error::{ErrorKind, EsError};
use crate::mapping::{FieldType, IndexValue, Leaf, Mapping, coerce};
use crate::shard::Fields;

/// `operator` of match queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Operator {
    /// Any term (default).
    #[default]
    Or,
    /// Every term.
    And,
}

/// `minimum_should_match`: a count or a percentage, possibly negative.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinimumShouldMatch {
    /// `2`, `-1`.
    Count(i64),
    /// `75%`, `-25%`.
    Percent(f64),
}

impl MinimumShouldMatch {
    fn parse(v: &Value) -> Result<Self, EsError> {
        match v {
            Value::Number(n) => n
                .as_i64()
                .map(Self::Count)
                .ok_or_else(|| EsError::parsing(format!("invalid minimum_should_match [{v}]"))),
            Value::String(s) => {
                let s = s.trim();
                if let Some(p) = s.strip_suffix('%') {
                    p.parse().map(Self::Percent).map_err(|_| {
                        EsError::parsing(format!("invalid minimum_should_match [{s}]"))
                    })
                } else {
                    s.parse().map(Self::Count).map_err(|_| {
                        EsError::parsing(format!("invalid minimum_should_match [{s}]"))
                    })
                }
            }
            _ => Err(EsError::parsing(format!(
                "invalid minimum_should_match [{v}]"
            ))),
        }
    }

    /// How many of `n` optional clauses must match (ES's rounding: towards zero).
    pub fn required(self, n: usize) -> usize {
        let n_i = n as i64;
        let r = match self {
            Self::Count(c) if c < 0 => n_i + c,
            Self::Count(c) => c,
            Self::Percent(p) if p < 0.0 => n_i - ((n as f64) * (-p) / 100.0).trunc() as i64,
            Self::Percent(p) => ((n as f64) * p / 100.0).trunc() as i64,
        };
        r.clamp(0, n_i) as usize
    }
}

/// `fuzziness`: a fixed edit distance, or ES's `AUTO[:low,high]` by term length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fuzziness {
    /// 0, 1 or 2 edits.
    Fixed(u8),
    /// No edits below `low` characters, one below `high`, two from `high` on.
    Auto {
        /// Default 3.
        low: usize,
        /// Default 6.
        high: usize,
    },
}

impl Fuzziness {
    fn parse(v: &Value) -> Result<Self, EsError> {
        let bad = || EsError::parsing(format!("invalid fuzziness [{v}]; use 0, 1, 2 or AUTO"));
        let text = match v {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => return Err(bad()),
        };
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("AUTO") {
            if rest.is_empty() {
                return Ok(Self::Auto { low: 3, high: 6 });
            }
            let (low, high) = rest
                .strip_prefix(':')
                .and_then(|r| r.split_once(','))
                .ok_or_else(bad)?;
            return Ok(Self::Auto {
                low: low.trim().parse().map_err(|_| bad())?,
                high: high.trim().parse().map_err(|_| bad())?,
            });
        }
        match text.parse::<f64>().map_err(|_| bad())? {
            0.0 => Ok(Self::Fixed(0)),
            1.0 => Ok(Self::Fixed(1)),
            2.0 => Ok(Self::Fixed(2)),
            _ => Err(bad()),
        }
    }

    /// The edit distance for a term.
    pub fn distance(self, term: &str) -> u8 {
        match self {
            Self::Fixed(d) => d,
            Self::Auto { low, high } => {
                let len = term.chars().count();
                if len < low {
                    0
                } else if len < high {
                    1
                } else {
                    2
                }
            }
        }
    }
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryAst {
    /// Every document.
    MatchAll {
        /// Score of every hit.
        boost: f32,
    },
    /// No document.
    MatchNone,
    /// Full-text match.
    Match {
        /// Field path.
        field: String,
        /// The query text (or value for exact fields).
        query: Value,
        /// `and`/`or`.
        operator: Operator,
        /// For `or`.
        minimum_should_match: Option<MinimumShouldMatch>,
        /// Edit distance per term.
        fuzziness: Option<Fuzziness>,
        /// Boost.
        boost: f32,
    },
    /// Terms in order.
    MatchPhrase {
        /// Field path.
        field: String,
        /// The phrase.
        query: String,
        /// Allowed distance.
        slop: u32,
        /// Boost.
        boost: f32,
    },
    /// A match over several fields.
    MultiMatch {
        /// Fields with their boosts.
        fields: Vec<(String, f32)>,
        /// The query text.
        query: Value,
        /// `best_fields` (dis-max), `most_fields` (sum) or `phrase`.
        kind: MultiMatchKind,
        /// `and`/`or` within each field.
        operator: Operator,
        /// Within each field.
        minimum_should_match: Option<MinimumShouldMatch>,
        /// Edit distance per term.
        fuzziness: Option<Fuzziness>,
        /// Dis-max tie breaker.
        tie_breaker: f32,
        /// Boost.
        boost: f32,
    },
    /// An exact value.
    Term {
        /// Field path.
        field: String,
        /// The value.
        value: Value,
        /// Boost.
        boost: f32,
    },
    /// Any of several exact values.
    Terms {
        /// Field path.
        field: String,
        /// The values.
        values: Vec<Value>,
        /// Boost.
        boost: f32,
    },
    /// A range.
    Range {
        /// Field path.
        field: String,
        /// Lower bound.
        lower: Bound<Value>,
        /// Upper bound.
        upper: Bound<Value>,
        /// Date format of the bounds.
        format: Option<String>,
        /// Boost.
        boost: f32,
    },
    /// Documents with a value.
    Exists {
        /// Field path.
        field: String,
        /// Boost.
        boost: f32,
    },
    /// Terms starting with a prefix.
    Prefix {
        /// Field path.
        field: String,
        /// The prefix.
        value: String,
        /// Boost.
        boost: f32,
    },
    /// Terms matching `*` / `?` patterns.
    Wildcard {
        /// Field path.
        field: String,
        /// The pattern.
        value: String,
        /// Boost.
        boost: f32,
    },
    /// Documents by `_id`.
    Ids {
        /// The ids.
        values: Vec<String>,
        /// Boost.
        boost: f32,
    },
    /// Boolean combination.
    Bool {
        /// Must match, scored.
        must: Vec<QueryAst>,
        /// Optional (required when alone), scored.
        should: Vec<QueryAst>,
        /// Must not match.
        must_not: Vec<QueryAst>,
        /// Must match, not scored.
        filter: Vec<QueryAst>,
        /// Of the `should` clauses.
        minimum_should_match: Option<MinimumShouldMatch>,
        /// Boost.
        boost: f32,
    },
    /// A filter with a constant score.
    ConstantScore {
        /// The filter.
        filter: Box<QueryAst>,
        /// The score.
        boost: f32,
    },
}

/// `multi_match` `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiMatchKind {
    /// Best field's score (dis-max).
    BestFields,
    /// Sum of the fields' scores.
    MostFields,
    /// A phrase in any field.
    Phrase,
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, EsError> {
    v.as_object()
        .ok_or_else(|| EsError::parsing(format!("[{what}] query malformed, expected an object")))
}

/// The single `field: body` entry of a field-level query.
fn single_field<'a>(v: &'a Value, what: &str) -> Result<(&'a str, &'a Value), EsError> {
    let obj = object(v, what)?;
    let mut fields = obj
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "boost" | "_name"));
    let (Some((field, body)), None) = (fields.next(), fields.next()) else {
        return Err(EsError::parsing(format!(
            "[{what}] query doesn't support multiple fields, found none or several"
        )));
    };
    Ok((field.as_str(), body))
}

fn boost_of(obj: &Map<String, Value>) -> Result<f32, EsError> {
    match obj.get("boost") {
        None => Ok(1.0),
        Some(v) => v
            .as_f64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .map(|b| b as f32)
            .ok_or_else(|| EsError::parsing(format!("[boost] must be a number, got {v}"))),
    }
}

fn check_keys(obj: &Map<String, Value>, what: &str, allowed: &[&str]) -> Result<(), EsError> {
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) && key != "boost" && key != "_name" {
            return Err(EsError::parsing(format!(
                "[{what}] query does not support [{key}]"
            )));
        }
    }
    Ok(())
}

/// Options this engine accepts only at their default, refused otherwise rather than ignored.
fn check_text_options(obj: &Map<String, Value>, what: &str) -> Result<(), EsError> {
    if let Some(p) = obj.get("prefix_length") {
        if p.as_u64() != Some(0) {
            return Err(EsError::illegal_argument(format!(
                "[{what}] prefix_length {p} is not supported yet"
            )));
        }
    }
    if let Some(a) = obj.get("analyzer") {
        if !matches!(a.as_str(), Some("standard" | "default")) {
            return Err(EsError::illegal_argument(format!(
                "[{what}] analyzer {a} is not supported yet; only the standard analyzer is"
            )));
        }
    }
    if let Some(z) = obj.get("zero_terms_query") {
        if z.as_str() != Some("none") {
            return Err(EsError::illegal_argument(format!(
                "[{what}] zero_terms_query {z} is not supported yet"
            )));
        }
    }
    Ok(())
}

fn parse_list(v: &Value) -> Result<Vec<QueryAst>, EsError> {
    match v {
        Value::Array(items) => items.iter().map(parse).collect(),
        Value::Object(_) => Ok(vec![parse(v)?]),
        _ => Err(EsError::parsing(
            "[bool] clause must be an object or an array",
        )),
    }
}

fn parse_operator(v: Option<&Value>) -> Result<Operator, EsError> {
    match v.map(|v| v.as_str().map(str::to_ascii_lowercase)) {
        None => Ok(Operator::Or),
        Some(Some(s)) if s == "or" => Ok(Operator::Or),
        Some(Some(s)) if s == "and" => Ok(Operator::And),
        Some(_) => Err(EsError::parsing("[operator] must be [and] or [or]")),
    }
}

fn string_value(v: &Value, what: &str) -> Result<String, EsError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(EsError::parsing(format!(
            "[{what}] expects a string value, got {v}"
        ))),
    }
}

/// Parses an ES query object (`{"match": {...}}`).
pub fn parse(v: &Value) -> Result<QueryAst, EsError> {
    let obj = v
        .as_object()
        .ok_or_else(|| EsError::parsing(format!("query malformed, expected an object, got {v}")))?;
    let mut entries = obj.iter();
    let (Some((kind, body)), None) = (entries.next(), entries.next()) else {
        return Err(EsError::parsing(if obj.is_empty() {
            "query malformed, empty clause found".to_owned()
        } else {
            "[_na] query malformed, no start_object after query name".to_owned()
        }));
    };
    match kind.as_str() {
        "match_all" => {
            let o = object(body, kind)?;
            check_keys(o, kind, &[])?;
            Ok(QueryAst::MatchAll {
                boost: boost_of(o)?,
            })
        }
        "match_none" => Ok(QueryAst::MatchNone),
        "match" | "match_phrase" => {
            let (field, inner) = single_field(body, kind)?;
            let (query, o) = match inner {
                Value::Object(o) => (
                    o.get("query").cloned().ok_or_else(|| {
                        EsError::parsing(format!("[{kind}] requires query value"))
                    })?,
                    Some(o),
                ),
                other => (other.clone(), None),
            };
            let empty = Map::new();
            let o = o.unwrap_or(&empty);
            let boost = boost_of(o)?;
            check_text_options(o, kind)?;
            if kind == "match" {
                check_keys(
                    o,
                    kind,
                    &[
                        "query",
                        "operator",
                        "minimum_should_match",
                        "analyzer",
                        "fuzziness",
                        "prefix_length",
                        "max_expansions",
                        "lenient",
                        "zero_terms_query",
                        "auto_generate_synonyms_phrase_query",
                    ],
                )?;
                Ok(QueryAst::Match {
                    field: field.to_owned(),
                    query,
                    operator: parse_operator(o.get("operator"))?,
                    minimum_should_match: o
                        .get("minimum_should_match")
                        .map(MinimumShouldMatch::parse)
                        .transpose()?,
                    fuzziness: o.get("fuzziness").map(Fuzziness::parse).transpose()?,
                    boost,
                })
            } else {
                check_keys(o, kind, &["query", "slop", "analyzer", "zero_terms_query"])?;
                let slop = match o.get("slop") {
                    None => 0,
                    Some(s) => s
                        .as_u64()
                        .and_then(|s| u32::try_from(s).ok())
                        .ok_or_else(|| EsError::parsing("[slop] must be a non-negative integer"))?,
                };
                Ok(QueryAst::MatchPhrase {
                    field: field.to_owned(),
                    query: string_value(&query, kind)?,
                    slop,
                    boost,
                })
            }
        }
        "multi_match" => {
            let o = object(body, kind)?;
            check_text_options(o, kind)?;
            check_keys(
                o,
                kind,
                &[
                    "query",
                    "fields",
                    "type",
                    "operator",
                    "minimum_should_match",
                    "tie_breaker",
                    "analyzer",
                    "lenient",
                    "fuzziness",
                    "prefix_length",
                    "max_expansions",
                ],
            )?;
            let query = o
                .get("query")
                .cloned()
                .ok_or_else(|| EsError::parsing("[multi_match] requires query value"))?;
            let fields = match o.get("fields") {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|f| {
                        let f = f
                            .as_str()
                            .ok_or_else(|| EsError::parsing("[fields] must be strings"))?;
                        Ok(match f.split_once('^') {
                            Some((name, boost)) => (
                                name.to_owned(),
                                boost.parse().map_err(|_| {
                                    EsError::parsing(format!("invalid boost in field [{f}]"))
                                })?,
                            ),
                            None => (f.to_owned(), 1.0),
                        })
                    })
                    .collect::<Result<Vec<_>, EsError>>()?,
                Some(Value::String(f)) => vec![(f.clone(), 1.0)],
                None => vec![("*".to_owned(), 1.0)],
                Some(_) => return Err(EsError::parsing("[fields] must be an array")),
            };
            let kind_ = match o.get("type").and_then(Value::as_str) {
                None | Some("best_fields") => MultiMatchKind::BestFields,
                Some("most_fields") => MultiMatchKind::MostFields,
                Some("phrase") => MultiMatchKind::Phrase,
                Some(other) => {
                    return Err(EsError::parsing(format!(
                        "failed to parse [multi_match] query type [{other}]. unknown type."
                    )));
                }
            };
            let fuzziness = o.get("fuzziness").map(Fuzziness::parse).transpose()?;
            if fuzziness.is_some() && kind_ == MultiMatchKind::Phrase {
                return Err(EsError::parsing("fuzziness not allowed for type [phrase]"));
            }
            Ok(QueryAst::MultiMatch {
                fields,
                query,
                kind: kind_,
                fuzziness,
                operator: parse_operator(o.get("operator"))?,
                minimum_should_match: o
                    .get("minimum_should_match")
                    .map(MinimumShouldMatch::parse)
                    .transpose()?,
                tie_breaker: o.get("tie_breaker").and_then(Value::as_f64).unwrap_or(0.0) as f32,
                boost: boost_of(o)?,
            })
        }
        "term" | "prefix" | "wildcard" => {
            let (field, inner) = single_field(body, kind)?;
            let (value, boost) = match inner {
                Value::Object(o) => {
                    check_keys(
                        o,
                        kind,
                        &["value", "case_insensitive", "rewrite", "wildcard"],
                    )?;
                    let v = o
                        .get("value")
                        .or_else(|| o.get("wildcard"))
                        .cloned()
                        .ok_or_else(|| {
                            EsError::parsing(format!("[{kind}] query requires a value"))
                        })?;
                    (v, boost_of(o)?)
                }
                Value::Array(_) => {
                    return Err(EsError::parsing(format!(
                        "[{kind}] query does not support array of values"
                    )));
                }
                other => (other.clone(), 1.0),
            };
            let field = field.to_owned();
            Ok(match kind.as_str() {
                "term" => QueryAst::Term {
                    field,
                    value,
                    boost,
                },
                "prefix" => QueryAst::Prefix {
                    field,
                    value: string_value(&value, kind)?,
                    boost,
                },
                _ => QueryAst::Wildcard {
                    field,
                    value: string_value(&value, kind)?,
                    boost,
                },
            })
        }
        "terms" => {
            let o = object(body, kind)?;
            let boost = boost_of(o)?;
            let (field, values) = single_field(body, kind)?;
            let values = values
                .as_array()
                .ok_or_else(|| EsError::parsing("[terms] query requires an array of values"))?;
            Ok(QueryAst::Terms {
                field: field.to_owned(),
                values: values.clone(),
                boost,
            })
        }
        "range" => {
            let (field, inner) = single_field(body, kind)?;
            let o = object(inner, kind)?;
            check_keys(
                o,
                kind,
                &[
                    "gt",
                    "gte",
                    "lt",
                    "lte",
                    "from",
                    "to",
                    "include_lower",
                    "include_upper",
                    "format",
                    "time_zone",
                    "relation",
                ],
            )?;
            let get = |k: &str| o.get(k).filter(|v| !v.is_null()).cloned();
            let include_lower = o
                .get("include_lower")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let include_upper = o
                .get("include_upper")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let lower = match (get("gt"), get("gte"), get("from")) {
                (Some(v), _, _) => Bound::Excluded(v),
                (None, Some(v), _) => Bound::Included(v),
                (None, None, Some(v)) if include_lower => Bound::Included(v),
                (None, None, Some(v)) => Bound::Excluded(v),
                _ => Bound::Unbounded,
            };
            let upper = match (get("lt"), get("lte"), get("to")) {
                (Some(v), _, _) => Bound::Excluded(v),
                (None, Some(v), _) => Bound::Included(v),
                (None, None, Some(v)) if include_upper => Bound::Included(v),
                (None, None, Some(v)) => Bound::Excluded(v),
                _ => Bound::Unbounded,
            };
            Ok(QueryAst::Range {
                field: field.to_owned(),
                lower,
                upper,
                format: o.get("format").and_then(Value::as_str).map(str::to_owned),
                boost: boost_of(o)?,
            })
        }
        "exists" => {
            let o = object(body, kind)?;
            check_keys(o, kind, &["field"])?;
            let field = o
                .get("field")
                .and_then(Value::as_str)
                .ok_or_else(|| EsError::parsing("[exists] must be provided with a [field]"))?;
            Ok(QueryAst::Exists {
                field: field.to_owned(),
                boost: boost_of(o)?,
            })
        }
        "ids" => {
            let o = object(body, kind)?;
            check_keys(o, kind, &["values"])?;
            let values = o
                .get("values")
                .and_then(Value::as_array)
                .ok_or_else(|| EsError::parsing("[ids] query requires [values] array"))?
                .iter()
                .map(|v| string_value(v, "ids"))
                .collect::<Result<_, _>>()?;
            Ok(QueryAst::Ids {
                values,
                boost: boost_of(o)?,
            })
        }
        "bool" => {
            let o = object(body, kind)?;
            check_keys(
                o,
                kind,
                &[
                    "must",
                    "should",
                    "must_not",
                    "filter",
                    "minimum_should_match",
                    "adjust_pure_negative",
                ],
            )?;
            let list = |k: &str| {
                o.get(k)
                    .map(parse_list)
                    .transpose()
                    .map(Option::unwrap_or_default)
            };
            Ok(QueryAst::Bool {
                must: list("must")?,
                should: list("should")?,
                must_not: list("must_not")?,
                filter: list("filter")?,
                minimum_should_match: o
                    .get("minimum_should_match")
                    .map(MinimumShouldMatch::parse)
                    .transpose()?,
                boost: boost_of(o)?,
            })
        }
        "constant_score" => {
            let o = object(body, kind)?;
            check_keys(o, kind, &["filter"])?;
            let filter = o
                .get("filter")
                .ok_or_else(|| EsError::parsing("[constant_score] requires a 'filter' element"))?;
            Ok(QueryAst::ConstantScore {
                filter: Box::new(parse(filter)?),
                boost: boost_of(o)?,
            })
        }
        other => Err(EsError::parsing(format!("unknown query [{other}]"))),
    }
}

/// What building a tantivy query needs.
pub struct Context<'a> {
    /// The index mapping.
    pub mapping: &'a Mapping,
    /// The shard schema.
    pub fields: Fields,
    /// The analyzer of text fields.
    pub analyzer: TextAnalyzer,
    /// "now" for date math, epoch milliseconds.
    pub now_ms: i64,
}

fn shard_error(reason: String) -> EsError {
    EsError::new(ErrorKind::QueryShard, reason)
}

/// A term query, or a fuzzy one (transpositions count as one edit, as in ES) when `distance > 0`.
fn fuzzy_or_exact(term: Term, distance: u8) -> Box<dyn Query> {
    if distance == 0 {
        Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs))
    } else {
        Box::new(FuzzyTermQuery::new(term, distance, true))
    }
}

fn boosted(q: Box<dyn Query>, boost: f32) -> Box<dyn Query> {
    if (boost - 1.0).abs() < f32::EPSILON {
        q
    } else {
        Box::new(BoostQuery::new(q, boost))
    }
}

/// A term on a JSON field at `path`, with no value yet.
fn path_term(field: Field, path: &str) -> Term {
    Term::from_field_json_path(field, path, true)
}

/// The exact-value term for `value` of a keyword/numeric/boolean/date leaf.
fn exact_term(fields: &Fields, path: &str, v: &IndexValue) -> Term {
    let mut t = path_term(fields.keyword, path);
    match v {
        IndexValue::Text(s) | IndexValue::Keyword(s) => t.append_type_and_str(s),
        IndexValue::I64(n) => t.append_type_and_fast_value(*n),
        IndexValue::F64(f) => {
            // The inverted index keeps integral floats as i64 (tantivy normalises JSON numbers).
            if f.fract() == 0.0 && *f >= -9.0e18 && *f <= 9.0e18 {
                t.append_type_and_fast_value(*f as i64);
            } else {
                t.append_type_and_fast_value(*f);
            }
        }
        IndexValue::Bool(b) => t.append_type_and_fast_value(*b),
        IndexValue::Date(ms) => {
            t.append_type_and_fast_value(tantivy::DateTime::from_timestamp_millis(*ms))
        }
    }
    t
}

/// Escapes bytes for tantivy's regex syntax.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:x}}}", c as u32));
        }
    }
    out
}

impl Context<'_> {
    /// Builds the tantivy query.
    pub fn build(&mut self, ast: &QueryAst) -> Result<Box<dyn Query>, EsError> {
        Ok(match ast {
            QueryAst::MatchAll { boost } => boosted(Box::new(AllQuery), *boost),
            QueryAst::MatchNone => Box::new(EmptyQuery),
            QueryAst::Match {
                field,
                query,
                operator,
                minimum_should_match,
                fuzziness,
                boost,
            } => boosted(
                self.match_query(field, query, *operator, *minimum_should_match, *fuzziness)?,
                *boost,
            ),
            QueryAst::MatchPhrase {
                field,
                query,
                slop,
                boost,
            } => boosted(self.phrase(field, query, *slop)?, *boost),
            QueryAst::MultiMatch {
                fields,
                query,
                kind,
                operator,
                minimum_should_match,
                fuzziness,
                tie_breaker,
                boost,
            } => {
                let mut paths: Vec<(String, f32)> = Vec::new();
                let leaves = self.mapping.leaves();
                for (pattern, b) in fields {
                    for (path, leaf) in &leaves {
                        // A pattern only reaches string fields; a named field is taken as is.
                        let eligible = !pattern.contains('*')
                            || leaf.ty == FieldType::Text
                            || leaf.ty == FieldType::Keyword;
                        if crate::node::glob(pattern, path) && eligible {
                            paths.push((path.clone(), *b));
                        }
                    }
                }
                let mut parts = Vec::new();
                for (path, b) in &paths {
                    let q = match kind {
                        MultiMatchKind::Phrase => {
                            self.phrase(path, &string_value(query, "multi_match")?, 0)?
                        }
                        _ => self.match_query(
                            path,
                            query,
                            *operator,
                            *minimum_should_match,
                            *fuzziness,
                        )?,
                    };
                    parts.push(boosted(q, *b));
                }
                let q: Box<dyn Query> = match (parts.len(), kind) {
                    (0, _) => Box::new(EmptyQuery),
                    (1, _) => parts.pop().unwrap_or_else(|| Box::new(EmptyQuery)),
                    (_, MultiMatchKind::MostFields) => Box::new(BooleanQuery::union(parts)),
                    _ => Box::new(DisjunctionMaxQuery::with_tie_breaker(parts, *tie_breaker)),
                };
                boosted(q, *boost)
            }
            QueryAst::Term {
                field,
                value,
                boost,
            } => {
                let q = match self.mapping.leaf(field) {
                    None if field == "_id" => self.ids(&[string_value(value, "term")?]),
                    None => Box::new(EmptyQuery),
                    Some(leaf) if leaf.ty == FieldType::Text => {
                        let s = string_value(value, "term")?;
                        let mut t = path_term(self.fields.text, field);
                        t.append_type_and_str(&s);
                        Box::new(TermQuery::new(t, IndexRecordOption::WithFreqs))
                    }
                    Some(leaf) => self.exact(field, &leaf, value)?,
                };
                boosted(q, *boost)
            }
            QueryAst::Terms {
                field,
                values,
                boost,
            } => {
                if field == "_id" {
                    let ids = values
                        .iter()
                        .map(|v| string_value(v, "terms"))
                        .collect::<Result<Vec<_>, _>>()?;
                    return Ok(boosted(self.ids(&ids), *boost));
                }
                let q: Box<dyn Query> = match self.mapping.leaf(field) {
                    None => Box::new(EmptyQuery),
                    Some(leaf) if leaf.ty == FieldType::Date => {
                        let parts = values
                            .iter()
                            .map(|v| self.exact(field, &leaf, v))
                            .collect::<Result<Vec<_>, _>>()?;
                        Box::new(BooleanQuery::union(parts))
                    }
                    Some(leaf) => {
                        let mut terms = Vec::new();
                        for v in values {
                            if leaf.ty == FieldType::Text {
                                let mut t = path_term(self.fields.text, field);
                                t.append_type_and_str(&string_value(v, "terms")?);
                                terms.push(t);
                            } else {
                                match coerce(&leaf, v) {
                                    Ok(Some(iv)) => {
                                        terms.push(exact_term(&self.fields, field, &iv))
                                    }
                                    Ok(None) => {}
                                    Err(why) => {
                                        return Err(shard_error(format!(
                                            "failed to create query: {why} (field [{field}], value {v})"
                                        )));
                                    }
                                }
                            }
                        }
                        Box::new(ConstScoreQuery::new(
                            Box::new(TermSetQuery::new(terms)),
                            1.0,
                        ))
                    }
                };
                boosted(q, *boost)
            }
            QueryAst::Range {
                field,
                lower,
                upper,
                format,
                boost,
            } => {
                let q = self.range(field, lower, upper, format.as_deref())?;
                boosted(Box::new(ConstScoreQuery::new(q, 1.0)), *boost)
            }
            QueryAst::Exists { field, boost } => {
                let mut parts: Vec<Box<dyn Query>> = vec![Box::new(TermQuery::new(
                    Term::from_field_text(self.fields.field_names, field),
                    IndexRecordOption::Basic,
                ))];
                if self.mapping.is_object(field) {
                    let pattern = format!("{}\\x{{2e}}.*", regex_escape(field));
                    parts.push(Box::new(
                        RegexQuery::from_pattern(&pattern, self.fields.field_names)
                            .map_err(|e| shard_error(e.to_string()))?,
                    ));
                }
                boosted(
                    Box::new(ConstScoreQuery::new(
                        Box::new(BooleanQuery::union(parts)),
                        1.0,
                    )),
                    *boost,
                )
            }
            QueryAst::Prefix {
                field,
                value,
                boost,
            } => {
                let pattern = format!("{}.*", regex_escape(value));
                boosted(self.pattern(field, &pattern)?, *boost)
            }
            QueryAst::Wildcard {
                field,
                value,
                boost,
            } => {
                let mut pattern = String::new();
                for c in value.chars() {
                    match c {
                        '*' => pattern.push_str(".*"),
                        '?' => pattern.push('.'),
                        c => pattern.push_str(&regex_escape(&c.to_string())),
                    }
                }
                boosted(self.pattern(field, &pattern)?, *boost)
            }
            QueryAst::Ids { values, boost } => boosted(self.ids(values), *boost),
            QueryAst::Bool {
                must,
                should,
                must_not,
                filter,
                minimum_should_match,
                boost,
            } => {
                let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
                for q in must {
                    clauses.push((Occur::Must, self.build(q)?));
                }
                for q in filter {
                    clauses.push((
                        Occur::Must,
                        Box::new(ConstScoreQuery::new(self.build(q)?, 0.0)),
                    ));
                }
                for q in must_not {
                    clauses.push((Occur::MustNot, self.build(q)?));
                }
                let required = match minimum_should_match {
                    Some(m) => m.required(should.len()),
                    // ES: with must/filter, should clauses are optional; alone, one must match.
                    None if must.is_empty() && filter.is_empty() && !should.is_empty() => 1,
                    None => 0,
                };
                let mut should_clauses = Vec::new();
                for q in should {
                    should_clauses.push(self.build(q)?);
                }
                if required > should_clauses.len() {
                    return Ok(Box::new(EmptyQuery));
                }
                if !should_clauses.is_empty() {
                    if required == 0 {
                        for q in should_clauses {
                            clauses.push((Occur::Should, q));
                        }
                    } else {
                        // Required should clauses become one scored must clause.
                        let group = BooleanQuery::with_minimum_required_clauses(
                            should_clauses
                                .into_iter()
                                .map(|q| (Occur::Should, q))
                                .collect(),
                            required,
                        );
                        clauses.push((Occur::Must, Box::new(group)));
                    }
                }
                if !clauses
                    .iter()
                    .any(|(o, _)| matches!(o, Occur::Must | Occur::Should))
                {
                    // Only must_not (or nothing): everything but the excluded.
                    clauses.push((
                        Occur::Must,
                        Box::new(ConstScoreQuery::new(Box::new(AllQuery), 0.0)),
                    ));
                }
                boosted(Box::new(BooleanQuery::new(clauses)), *boost)
            }
            QueryAst::ConstantScore { filter, boost } => {
                Box::new(ConstScoreQuery::new(self.build(filter)?, *boost))
            }
        })
    }

    fn ids(&self, ids: &[String]) -> Box<dyn Query> {
        let terms = ids.iter().map(|id| self.fields.id_term(id));
        Box::new(ConstScoreQuery::new(
            Box::new(TermSetQuery::new(terms)),
            1.0,
        ))
    }

    fn tokens(&mut self, text: &str) -> Vec<(usize, String)> {
        let mut stream = self.analyzer.token_stream(text);
        let mut out = Vec::new();
        while stream.advance() {
            let t = stream.token();
            out.push((t.position, t.text.clone()));
        }
        out
    }

    fn exact(&self, field: &str, leaf: &Leaf, value: &Value) -> Result<Box<dyn Query>, EsError> {
        let iv = match (leaf.ty, value) {
            (FieldType::Date, Value::String(s)) => IndexValue::Date(
                crate::date::parse_bound(s, leaf.format.as_deref(), self.now_ms)
                    .map_err(shard_error)?,
            ),
            _ => match coerce(leaf, value) {
                Ok(Some(v)) => v,
                Ok(None) => return Ok(Box::new(EmptyQuery)),
                Err(why) => {
                    return Err(shard_error(format!(
                        "failed to create query: {} (field [{field}] of type [{}], value {value})",
                        if why.is_empty() {
                            "value does not fit the field"
                        } else {
                            &why
                        },
                        leaf.ty.as_str()
                    )));
                }
            },
        };
        if let IndexValue::Date(ms) = iv {
            // Dates are compared through their fast values (the inverted index keeps seconds).
            let t = exact_term(&self.fields, field, &IndexValue::Date(ms));
            return Ok(Box::new(ConstScoreQuery::new(
                Box::new(RangeQuery::new(
                    Bound::Included(t.clone()),
                    Bound::Included(t),
                )),
                1.0,
            )));
        }
        Ok(Box::new(TermQuery::new(
            exact_term(&self.fields, field, &iv),
            IndexRecordOption::WithFreqs,
        )))
    }

    fn match_query(
        &mut self,
        field: &str,
        query: &Value,
        operator: Operator,
        msm: Option<MinimumShouldMatch>,
        fuzziness: Option<Fuzziness>,
    ) -> Result<Box<dyn Query>, EsError> {
        let Some(leaf) = self.mapping.leaf(field) else {
            return Ok(Box::new(EmptyQuery));
        };
        if leaf.ty == FieldType::Keyword {
            if let (Some(f), Some(text)) = (fuzziness, query.as_str()) {
                let mut t = path_term(self.fields.keyword, field);
                t.append_type_and_str(text);
                return Ok(fuzzy_or_exact(t, f.distance(text)));
            }
        }
        if leaf.ty != FieldType::Text {
            return self.exact(field, &leaf, query);
        }
        let text = string_value(query, "match")?;
        let tokens = self.tokens(&text);
        let mut terms: Vec<Box<dyn Query>> = Vec::new();
        for (_, token) in &tokens {
            let mut t = path_term(self.fields.text, field);
            t.append_type_and_str(token);
            let distance = fuzziness.map_or(0, |f| f.distance(token));
            terms.push(fuzzy_or_exact(t, distance));
        }
        Ok(match (terms.len(), operator) {
            (0, _) => Box::new(EmptyQuery),
            (1, _) => terms.pop().unwrap_or_else(|| Box::new(EmptyQuery)),
            (_, Operator::And) => Box::new(BooleanQuery::new(
                terms.into_iter().map(|q| (Occur::Must, q)).collect(),
            )),
            (n, Operator::Or) => {
                let required = msm.map_or(1, |m| m.required(n).max(1));
                Box::new(BooleanQuery::with_minimum_required_clauses(
                    terms.into_iter().map(|q| (Occur::Should, q)).collect(),
                    required,
                ))
            }
        })
    }

    fn phrase(&mut self, field: &str, text: &str, slop: u32) -> Result<Box<dyn Query>, EsError> {
        let Some(leaf) = self.mapping.leaf(field) else {
            return Ok(Box::new(EmptyQuery));
        };
        if leaf.ty != FieldType::Text {
            return self.exact(field, &leaf, &Value::String(text.to_owned()));
        }
        let tokens = self.tokens(text);
        let terms: Vec<(usize, Term)> = tokens
            .into_iter()
            .map(|(pos, tok)| {
                let mut t = path_term(self.fields.text, field);
                t.append_type_and_str(&tok);
                (pos, t)
            })
            .collect();
        Ok(match terms.len() {
            0 => Box::new(EmptyQuery),
            1 => Box::new(TermQuery::new(
                terms[0].1.clone(),
                IndexRecordOption::WithFreqs,
            )),
            _ => Box::new(PhraseQuery::new_with_offset_and_slop(terms, slop)),
        })
    }

    fn range(
        &self,
        field: &str,
        lower: &Bound<Value>,
        upper: &Bound<Value>,
        format: Option<&str>,
    ) -> Result<Box<dyn Query>, EsError> {
        let Some(leaf) = self.mapping.leaf(field) else {
            return Ok(Box::new(EmptyQuery));
        };
        let convert =
            |v: &Value, is_lower: bool, inclusive: bool| -> Result<Bound<Term>, EsError> {
                let iv = match leaf.ty {
                    FieldType::Date => {
                        let ms = match v {
                            // ES rounds `gt` and `lte` up to the end of the unit.
                            Value::String(s) => crate::date::parse_bound_rounding(
                                s,
                                format.or(leaf.format.as_deref()),
                                self.now_ms,
                                is_lower != inclusive,
                            )
                            .map_err(shard_error)?,
                            Value::Number(n) => n
                                .as_i64()
                                .ok_or_else(|| shard_error(format!("invalid date bound {v}")))?,
                            _ => return Err(shard_error(format!("invalid date bound {v}"))),
                        };
                        IndexValue::Date(ms)
                    }
                    ty if ty.is_integer() => {
                        let f = match v {
                            Value::Number(n) => n.as_f64(),
                            Value::String(s) => s.trim().parse::<f64>().ok(),
                            _ => None,
                        }
                        .ok_or_else(|| {
                            shard_error(format!(
                                "failed to create query: For input string: {v} (field [{field}])"
                            ))
                        })?;
                        // Integer fields: round fractional bounds inward.
                        let (n, inclusive) = if f.fract() == 0.0 {
                            (f as i64, inclusive)
                        } else if is_lower {
                            (f.ceil() as i64, true)
                        } else {
                            (f.floor() as i64, true)
                        };
                        let t = exact_term(&self.fields, field, &IndexValue::I64(n));
                        return Ok(if inclusive {
                            Bound::Included(t)
                        } else {
                            Bound::Excluded(t)
                        });
                    }
                    FieldType::Text => IndexValue::Keyword(string_value(v, "range")?),
                    _ => coerce(&leaf, v)
                        .map_err(|why| {
                            shard_error(format!(
                                "failed to create query: {why} (field [{field}], value {v})"
                            ))
                        })?
                        .ok_or_else(|| shard_error(format!("invalid bound {v}")))?,
                };
                let t = match (&iv, leaf.ty) {
                    (IndexValue::Keyword(s), FieldType::Text) => {
                        let mut t = path_term(self.fields.text, field);
                        t.append_type_and_str(s);
                        t
                    }
                    (IndexValue::F64(f), _) => {
                        let mut t = path_term(self.fields.keyword, field);
                        t.append_type_and_fast_value(*f);
                        t
                    }
                    _ => exact_term(&self.fields, field, &iv),
                };
                Ok(if inclusive {
                    Bound::Included(t)
                } else {
                    Bound::Excluded(t)
                })
            };
        let lo = match lower {
            Bound::Included(v) => convert(v, true, true)?,
            Bound::Excluded(v) => convert(v, true, false)?,
            Bound::Unbounded => Bound::Unbounded,
        };
        let hi = match upper {
            Bound::Included(v) => convert(v, false, true)?,
            Bound::Excluded(v) => convert(v, false, false)?,
            Bound::Unbounded => Bound::Unbounded,
        };
        if matches!((&lo, &hi), (Bound::Unbounded, Bound::Unbounded)) {
            return Ok(self.build_exists(field));
        }
        if leaf.ty == FieldType::Boolean {
            return Err(shard_error(format!(
                "range queries on boolean field [{field}] are not supported; use a term query"
            )));
        }
        if leaf.ty == FieldType::Text {
            // Text has no fast values; a term range over its tokens via the inverted index
            // is not supported on JSON fields by tantivy.
            return Err(shard_error(format!(
                "range queries on text field [{field}] are not supported; use its keyword sub-field"
            )));
        }
        Ok(Box::new(RangeQuery::new(lo, hi)))
    }

    fn build_exists(&self, field: &str) -> Box<dyn Query> {
        Box::new(TermQuery::new(
            Term::from_field_text(self.fields.field_names, field),
            IndexRecordOption::Basic,
        ))
    }

    fn pattern(&self, field: &str, value_pattern: &str) -> Result<Box<dyn Query>, EsError> {
        let (json_field, leaf_ok) = match self.mapping.leaf(field) {
            None if field == "_id" => {
                let q = RegexQuery::from_pattern(value_pattern, self.fields.id)
                    .map_err(|e| shard_error(e.to_string()))?;
                return Ok(Box::new(ConstScoreQuery::new(Box::new(q), 1.0)));
            }
            None => return Ok(Box::new(EmptyQuery)),
            Some(leaf) if leaf.ty == FieldType::Text => (self.fields.text, true),
            Some(leaf) => (self.fields.keyword, leaf.ty == FieldType::Keyword),
        };
        if !leaf_ok {
            return Err(shard_error(format!(
                "Can only use prefix and wildcard queries on keyword and text fields - not on [{field}]"
            )));
        }
        let mut prefix = path_term(json_field, field);
        prefix.append_type_and_str("");
        let mut pattern = String::new();
        for b in prefix.serialized_value_bytes() {
            let c = *b as char;
            if c.is_ascii_alphanumeric() {
                pattern.push(c);
            } else {
                pattern.push_str(&format!("\\x{{{:x}}}", b));
            }
        }
        pattern.push_str(value_pattern);
        let q = RegexQuery::from_pattern(&pattern, json_field)
            .map_err(|e| shard_error(e.to_string()))?;
        Ok(Box::new(ConstScoreQuery::new(Box::new(q), 1.0)))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parses_every_supported_type() {
        let cases = [
            json!({"match_all": {}}),
            json!({"match_none": {}}),
            json!({"match": {"title": "quick fox"}}),
            json!({"match": {"title": {"query": "quick fox", "operator": "and", "minimum_should_match": "50%"}}}),
            json!({"match_phrase": {"title": {"query": "quick fox", "slop": 1}}}),
            json!({"multi_match": {"query": "fox", "fields": ["title^2", "body"], "type": "most_fields"}}),
            json!({"term": {"tag": "a"}}),
            json!({"term": {"tag": {"value": "a", "boost": 2.0}}}),
            json!({"terms": {"tag": ["a", "b"]}}),
            json!({"range": {"n": {"gte": 1, "lt": 5}}}),
            json!({"exists": {"field": "n"}}),
            json!({"prefix": {"tag": "ab"}}),
            json!({"wildcard": {"tag": {"value": "a*c"}}}),
            json!({"ids": {"values": ["1", "2"]}}),
            json!({"bool": {"must": {"match_all": {}}, "filter": [{"term": {"a": 1}}], "should": [], "must_not": [], "minimum_should_match": 1}}),
            json!({"constant_score": {"filter": {"term": {"a": 1}}, "boost": 3}}),
        ];
        for case in cases {
            parse(&case).unwrap_or_else(|e| panic!("{case}: {e}"));
        }
    }

    #[test]
    fn range_bounds() {
        let q = parse(&json!({"range": {"n": {"gt": 1, "lte": 5}}})).expect("parses");
        let QueryAst::Range { lower, upper, .. } = q else {
            panic!("not a range")
        };
        assert_eq!(lower, Bound::Excluded(json!(1)));
        assert_eq!(upper, Bound::Included(json!(5)));
    }

    #[test]
    fn malformed_queries_are_parsing_exceptions() {
        let cases = [
            (json!({"frobnicate": {}}), "unknown query [frobnicate]"),
            (json!({}), "empty clause"),
            (json!({"match": {}, "term": {}}), "malformed"),
            (json!([1]), "expected an object"),
            (json!({"match": {"a": "x", "b": "y"}}), "multiple fields"),
            (
                json!({"match": {"a": {"operator": "and"}}}),
                "requires query",
            ),
            (
                json!({"match": {"a": {"query": "x", "operator": "xor"}}}),
                "operator",
            ),
            (
                json!({"term": {"a": {"valu": 1}}}),
                "does not support [valu]",
            ),
            (json!({"terms": {"a": "x"}}), "array"),
            (
                json!({"range": {"a": {"gte": 1, "bogus": 2}}}),
                "does not support [bogus]",
            ),
            (json!({"exists": {}}), "field"),
            (json!({"bool": {"must": 7}}), "clause"),
            (json!({"bool": {"shoud": []}}), "does not support [shoud]"),
            (
                json!({"match": {"a": {"query": "x", "minimum_should_match": "lots"}}}),
                "minimum_should_match",
            ),
            (json!({"constant_score": {}}), "filter"),
            (
                json!({"multi_match": {"query": "x", "type": "weird"}}),
                "unknown type",
            ),
        ];
        for (case, needle) in cases {
            let err = parse(&case).expect_err("must fail");
            assert_eq!(err.kind, ErrorKind::Parsing, "{case}");
            assert!(err.reason.contains(needle), "{case}: {}", err.reason);
        }
    }

    #[test]
    fn fuzziness_follows_es() {
        let auto = Fuzziness::parse(&json!("AUTO")).expect("auto");
        assert_eq!(
            (
                auto.distance("ab"),
                auto.distance("abc"),
                auto.distance("abcdef")
            ),
            (0, 1, 2)
        );
        let custom = Fuzziness::parse(&json!("AUTO:2,4")).expect("custom");
        assert_eq!(
            (
                custom.distance("a"),
                custom.distance("ab"),
                custom.distance("abcd")
            ),
            (0, 1, 2)
        );
        assert_eq!(
            Fuzziness::parse(&json!(1)).expect("one"),
            Fuzziness::Fixed(1)
        );
        assert_eq!(
            Fuzziness::parse(&json!("2")).expect("two"),
            Fuzziness::Fixed(2)
        );
        for bad in [json!(3), json!("AUTO:x"), json!("lots"), json!(true)] {
            assert!(Fuzziness::parse(&bad).is_err(), "{bad}");
        }
        let err = parse(&json!({"multi_match": {"query": "x", "type": "phrase", "fuzziness": 1}}))
            .expect_err("phrase");
        assert_eq!(err.kind, ErrorKind::Parsing);
    }

    #[test]
    fn options_not_honoured_are_refused() {
        for unsupported in [
            json!({"match": {"a": {"query": "x", "fuzziness": "AUTO", "prefix_length": 2}}}),
            json!({"match": {"a": {"query": "x", "analyzer": "english"}}}),
            json!({"match_phrase": {"a": {"query": "x", "zero_terms_query": "all"}}}),
        ] {
            let err = parse(&unsupported).expect_err("refused, not ignored");
            assert_eq!(err.kind, ErrorKind::IllegalArgument, "{unsupported}");
        }
    }

    #[test]
    fn minimum_should_match_rounds_like_es() {
        use MinimumShouldMatch::*;
        assert_eq!(Count(2).required(3), 2);
        assert_eq!(Count(-1).required(3), 2);
        assert_eq!(Percent(75.0).required(3), 2);
        assert_eq!(Percent(-25.0).required(3), 3);
        assert_eq!(Count(5).required(3), 3);
        assert_eq!(Count(-5).required(3), 0);
    }
}
