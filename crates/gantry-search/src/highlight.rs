//! Basic highlighting (ES's `plain` highlighter, simplified): the query's terms for each
//! requested field are marked in the field's `_source` text, cut into fragments of about
//! `fragment_size` characters at token boundaries; fragments with a match are returned in text
//! order, at most `number_of_fragments` (0: the whole value, marked).
//!
//! Pure: works on the request, the query AST, the mapping and a `_source` value. Terms come from
//! the scoring and filtering clauses (`must_not` excluded) that target the highlighted field
//! (`require_field_match`, ES's default).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};
use tantivy::tokenizer::TextAnalyzer;

use crate::error::EsError;
use crate::mapping::{FieldType, Mapping};
use crate::node::glob;
use crate::query::QueryAst;

/// Options of one highlighted field.
#[derive(Debug, Clone, PartialEq)]
struct FieldOptions {
    fragment_size: usize,
    number_of_fragments: usize,
}

/// A parsed `highlight` request.
#[derive(Debug, Clone, PartialEq)]
pub struct Highlight {
    /// Field patterns and their options, in request order.
    fields: Vec<(String, FieldOptions)>,
    pre_tag: String,
    post_tag: String,
}

fn usize_opt(obj: &Map<String, Value>, key: &str, default: usize) -> Result<usize, EsError> {
    match obj.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                EsError::parsing(format!(
                    "[highlight] [{key}] must be a non-negative integer"
                ))
            }),
    }
}

fn tag(obj: &Map<String, Value>, key: &str, default: &str) -> Result<String, EsError> {
    match obj.get(key) {
        None => Ok(default.to_owned()),
        Some(Value::Array(tags)) => tags
            .first()
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                EsError::parsing(format!("[highlight] [{key}] must be an array of strings"))
            }),
        Some(_) => Err(EsError::parsing(format!(
            "[highlight] [{key}] must be an array of strings"
        ))),
    }
}

const GLOBAL_KEYS: &[&str] = &[
    "fields",
    "pre_tags",
    "post_tags",
    "fragment_size",
    "number_of_fragments",
    "require_field_match",
    "type",
    "order",
    "encoder",
];

impl Highlight {
    /// Parses the `highlight` object of a search body.
    pub fn parse(v: &Value) -> Result<Self, EsError> {
        let obj = v
            .as_object()
            .ok_or_else(|| EsError::parsing("[highlight] must be an object"))?;
        for key in obj.keys() {
            if !GLOBAL_KEYS.contains(&key.as_str()) {
                return Err(EsError::illegal_argument(format!(
                    "[highlight] option [{key}] is not supported yet"
                )));
            }
        }
        if obj
            .get("require_field_match")
            .is_some_and(|v| v != &json!(true))
        {
            return Err(EsError::illegal_argument(
                "[highlight] require_field_match: false is not supported yet",
            ));
        }
        if obj
            .get("type")
            .is_some_and(|t| t != "plain" && t != "unified")
        {
            return Err(EsError::illegal_argument(
                "[highlight] only the plain highlighter is supported",
            ));
        }
        let defaults = FieldOptions {
            fragment_size: usize_opt(obj, "fragment_size", 100)?,
            number_of_fragments: usize_opt(obj, "number_of_fragments", 5)?,
        };
        let entries: Vec<(String, Value)> = match obj.get("fields") {
            Some(Value::Object(f)) => f.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Some(Value::Array(list)) => {
                let mut out = Vec::new();
                for item in list {
                    let Some(o) = item.as_object().filter(|o| o.len() == 1) else {
                        return Err(EsError::parsing(
                            "[highlight] [fields] entries must be single-field objects",
                        ));
                    };
                    out.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                out
            }
            _ => return Err(EsError::parsing("[highlight] requires [fields]")),
        };
        let mut fields = Vec::new();
        for (name, opts) in entries {
            let o = opts.as_object().ok_or_else(|| {
                EsError::parsing(format!("[highlight] options of [{name}] must be an object"))
            })?;
            for key in o.keys() {
                if !matches!(
                    key.as_str(),
                    "fragment_size" | "number_of_fragments" | "type"
                ) {
                    return Err(EsError::illegal_argument(format!(
                        "[highlight] option [{key}] on [{name}] is not supported yet"
                    )));
                }
            }
            fields.push((
                name,
                FieldOptions {
                    fragment_size: usize_opt(o, "fragment_size", defaults.fragment_size)?,
                    number_of_fragments: usize_opt(
                        o,
                        "number_of_fragments",
                        defaults.number_of_fragments,
                    )?,
                },
            ));
        }
        Ok(Self {
            fields,
            pre_tag: tag(obj, "pre_tags", "<em>")?,
            post_tag: tag(obj, "post_tags", "</em>")?,
        })
    }

    /// The `highlight` object of one hit (`None` when nothing matched).
    pub fn apply(
        &self,
        query: &QueryAst,
        mapping: &Mapping,
        analyzer: &mut TextAnalyzer,
        source: &Value,
    ) -> Option<Value> {
        let mut wanted = Terms::default();
        collect_terms(query, mapping, analyzer, &mut wanted);
        let leaves = mapping.leaves();
        let mut out = Map::new();
        for (pattern, opts) in &self.fields {
            for (path, leaf) in &leaves {
                if !glob(pattern, path) || out.contains_key(path) {
                    continue;
                }
                let Some(terms) = wanted.by_field.get(path) else {
                    continue;
                };
                let values = source_values(source, path);
                let mut fragments = Vec::new();
                for text in values {
                    let marked = match leaf.ty {
                        FieldType::Text => self.mark_text(&text, terms, analyzer, opts),
                        FieldType::Keyword if terms.exact.contains(&text) => {
                            vec![format!("{}{text}{}", self.pre_tag, self.post_tag)]
                        }
                        _ => Vec::new(),
                    };
                    fragments.extend(marked);
                }
                if opts.number_of_fragments > 0 {
                    fragments.truncate(opts.number_of_fragments);
                }
                if !fragments.is_empty() {
                    out.insert(path.clone(), json!(fragments));
                }
            }
        }
        (!out.is_empty()).then_some(Value::Object(out))
    }

    fn mark_text(
        &self,
        text: &str,
        terms: &FieldTerms,
        analyzer: &mut TextAnalyzer,
        opts: &FieldOptions,
    ) -> Vec<String> {
        // Token spans (byte offsets) and whether each matches.
        let mut spans = Vec::new();
        let mut stream = analyzer.token_stream(text);
        while stream.advance() {
            let t = stream.token();
            let hit = terms.exact.contains(&t.text)
                || terms
                    .prefixes
                    .iter()
                    .any(|p| t.text.starts_with(p.as_str()));
            spans.push((t.offset_from, t.offset_to, hit));
        }
        if !spans.iter().any(|s| s.2) {
            return Vec::new();
        }
        let mark = |from: usize, to: usize| -> String {
            let mut out = String::new();
            let mut at = from;
            for &(s, e, hit) in spans.iter().filter(|(s, e, _)| *s >= from && *e <= to) {
                if hit {
                    out.push_str(&text[at..s]);
                    out.push_str(&self.pre_tag);
                    out.push_str(&text[s..e]);
                    out.push_str(&self.post_tag);
                    at = e;
                }
            }
            out.push_str(&text[at..to]);
            out
        };
        if opts.number_of_fragments == 0 {
            return vec![mark(0, text.len())];
        }
        // Consecutive fragments of about `fragment_size` characters, cut before a token.
        let mut fragments = Vec::new();
        let mut start = 0;
        let mut has_hit = false;
        let mut end = 0;
        for &(s, e, hit) in &spans {
            if text[start..e].chars().count() > opts.fragment_size.max(1) && s > start {
                if has_hit {
                    fragments.push(mark(start, end));
                }
                start = s;
                has_hit = false;
            }
            has_hit |= hit;
            end = e;
        }
        if has_hit {
            fragments.push(mark(start, end));
        }
        fragments
    }
}

/// Terms to mark in one field.
#[derive(Debug, Default)]
struct FieldTerms {
    exact: BTreeSet<String>,
    prefixes: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct Terms {
    by_field: BTreeMap<String, FieldTerms>,
}

fn tokens(analyzer: &mut TextAnalyzer, text: &str) -> Vec<String> {
    let mut stream = analyzer.token_stream(text);
    let mut out = Vec::new();
    while stream.advance() {
        out.push(stream.token().text.clone());
    }
    out
}

fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn add_query_text(
    field: &str,
    text: &str,
    mapping: &Mapping,
    analyzer: &mut TextAnalyzer,
    out: &mut Terms,
) {
    match mapping.leaf(field).map(|l| l.ty) {
        Some(FieldType::Text) => {
            let entry = out.by_field.entry(field.to_owned()).or_default();
            entry.exact.extend(tokens(analyzer, text));
        }
        Some(FieldType::Keyword) => {
            out.by_field
                .entry(field.to_owned())
                .or_default()
                .exact
                .insert(text.to_owned());
        }
        _ => {}
    }
}

fn collect_terms(q: &QueryAst, mapping: &Mapping, analyzer: &mut TextAnalyzer, out: &mut Terms) {
    match q {
        QueryAst::Match { field, query, .. } => {
            if let Some(t) = value_text(query) {
                add_query_text(field, &t, mapping, analyzer, out);
            }
        }
        QueryAst::MatchPhrase { field, query, .. } => {
            add_query_text(field, query, mapping, analyzer, out)
        }
        QueryAst::MultiMatch { fields, query, .. } => {
            let Some(t) = value_text(query) else { return };
            for (path, leaf) in mapping.leaves() {
                let eligible = matches!(leaf.ty, FieldType::Text | FieldType::Keyword);
                if eligible && fields.iter().any(|(p, _)| glob(p, &path)) {
                    add_query_text(&path, &t, mapping, analyzer, out);
                }
            }
        }
        QueryAst::Term { field, value, .. } => {
            if let Some(t) = value_text(value) {
                out.by_field
                    .entry(field.clone())
                    .or_default()
                    .exact
                    .insert(t);
            }
        }
        QueryAst::Terms { field, values, .. } => {
            for t in values.iter().filter_map(value_text) {
                out.by_field
                    .entry(field.clone())
                    .or_default()
                    .exact
                    .insert(t);
            }
        }
        QueryAst::Prefix { field, value, .. } => {
            out.by_field
                .entry(field.clone())
                .or_default()
                .prefixes
                .insert(value.clone());
        }
        QueryAst::Bool {
            must,
            should,
            filter,
            ..
        } => {
            for c in must.iter().chain(should).chain(filter) {
                collect_terms(c, mapping, analyzer, out);
            }
        }
        QueryAst::ConstantScore { filter, .. } => collect_terms(filter, mapping, analyzer, out),
        QueryAst::MatchAll { .. }
        | QueryAst::MatchNone
        | QueryAst::Range { .. }
        | QueryAst::Exists { .. }
        | QueryAst::Wildcard { .. }
        | QueryAst::Ids { .. } => {}
    }
}

/// The string values at a dotted path of `_source` (arrays flattened; a multi-field such as
/// `title.keyword` reads its parent's value).
fn source_values(source: &Value, path: &str) -> Vec<String> {
    let mut current = vec![source];
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let mut next = Vec::new();
        for v in &current {
            let items: Vec<&Value> = match v {
                Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for item in items {
                if let Some(child) = item.get(*part) {
                    next.push(child);
                }
            }
        }
        if next.is_empty() && i + 1 == parts.len() && i > 0 {
            // A multi-field: the parent's value is the text.
            break;
        }
        current = next;
    }
    let mut out = Vec::new();
    for v in current {
        match v {
            Value::Array(a) => out.extend(a.iter().filter_map(value_text)),
            other => out.extend(value_text(other)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use tantivy::tokenizer::TokenizerManager;

    use super::*;
    use crate::query;

    fn analyzer() -> TextAnalyzer {
        TokenizerManager::default()
            .get("default")
            .expect("default tokenizer")
    }

    fn mapping() -> Mapping {
        Mapping::from_json(&json!({"properties": {
            "title": {"type": "text", "fields": {"keyword": {"type": "keyword"}}},
            "body": {"type": "text"}, "tag": {"type": "keyword"}}}))
        .expect("valid")
    }

    fn run(h: Value, q: Value, source: Value) -> Option<Value> {
        let h = Highlight::parse(&h).expect("valid highlight");
        let q = query::parse(&q).expect("valid query");
        h.apply(&q, &mapping(), &mut analyzer(), &source)
    }

    #[test]
    fn marks_query_terms_in_their_field_only() {
        let out = run(
            json!({"fields": {"title": {}, "body": {}}}),
            json!({"bool": {"must": {"match": {"title": "Quick fox"}}, "must_not": {"match": {"body": "dog"}}}}),
            json!({"title": "The quick brown fox", "body": "the quick dog"}),
        );
        assert_eq!(
            out,
            Some(json!({"title": ["The <em>quick</em> brown <em>fox</em>"]}))
        );
    }

    #[test]
    fn fragments_and_tags() {
        let body =
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron";
        let out = run(
            json!({"pre_tags": ["["], "post_tags": ["]"], "fields": {"body": {"fragment_size": 20, "number_of_fragments": 2}}}),
            json!({"match": {"body": "beta kappa omicron"}}),
            json!({"body": body}),
        );
        assert_eq!(
            out,
            Some(json!({"body": ["alpha [beta] gamma", "eta theta iota [kappa]"]}))
        );
        let whole = run(
            json!({"fields": {"body": {"number_of_fragments": 0}}}),
            json!({"prefix": {"body": "ome"}}),
            json!({"body": "omega omelet"}),
        );
        assert_eq!(
            whole,
            Some(json!({"body": ["<em>omega</em> <em>omelet</em>"]}))
        );
    }

    #[test]
    fn keywords_arrays_and_patterns() {
        let out = run(
            json!({"fields": [{"t*": {}}, {"tag": {}}]}),
            json!({"bool": {"should": [{"term": {"tag": "b"}}, {"match": {"title": "fox"}}]}}),
            json!({"title": ["red fox", "blue jay"], "tag": ["a", "b"]}),
        );
        assert_eq!(
            out,
            Some(json!({"title": ["red <em>fox</em>"], "tag": ["<em>b</em>"]}))
        );
        assert_eq!(
            run(
                json!({"fields": {"body": {}}}),
                json!({"match_all": {}}),
                json!({"body": "x"})
            ),
            None
        );
    }

    #[test]
    fn unsupported_options_are_refused() {
        for bad in [
            json!({"fields": {"a": {}}, "boundary_scanner": "sentence"}),
            json!({"fields": {"a": {"matched_fields": ["b"]}}}),
            json!({"fields": {"a": {}}, "require_field_match": false}),
            json!({"fields": {"a": {}}, "type": "fvh"}),
            json!({"pre_tags": "<b>", "fields": {"a": {}}}),
            json!({}),
        ] {
            assert!(Highlight::parse(&bad).is_err(), "{bad}");
        }
    }
}
