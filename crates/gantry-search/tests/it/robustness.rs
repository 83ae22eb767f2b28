//! Parsers never panic: arbitrary JSON into the query DSL, search bodies, mappings, documents and
//! aggregation requests gets a value or an ES error.

use gantry_search::aggs::Plan;
use gantry_search::mapping::Mapping;
use gantry_search::query;
use gantry_search::search::SearchRequest;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// JSON built from the words the parsers look for, so generated input reaches deep paths.
fn json_value() -> impl Strategy<Value = Value> {
    let words = prop::sample::select(vec![
        "query",
        "match",
        "bool",
        "must",
        "should",
        "filter",
        "must_not",
        "term",
        "terms",
        "range",
        "gte",
        "lt",
        "field",
        "value",
        "type",
        "properties",
        "fields",
        "keyword",
        "text",
        "long",
        "date",
        "format",
        "aggs",
        "avg",
        "terms",
        "filters",
        "sort",
        "order",
        "desc",
        "size",
        "from",
        "_source",
        "includes",
        "a",
        "a.b",
        "",
        "*",
        "minimum_should_match",
        "boost",
        "dynamic",
        "strict",
        "ignore_above",
        "match_phrase",
        "slop",
        "ids",
        "values",
        "exists",
        "wildcard",
        "prefix",
        "multi_match",
        "search_after",
        "date_histogram",
        "fixed_interval",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        words.clone().prop_map(|w| json!(w)),
        "[a-z0-9*?.:|/ -]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((words.clone(), inner), 0..4).prop_map(|kv| Value::Object(
                kv.into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect::<Map<_, _>>()
            )),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parsers_return_values_or_errors(v in json_value()) {
        let _ = query::parse(&v);
        let _ = SearchRequest::parse(&v);
        let _ = Mapping::from_json(&v);
        let mapping = Mapping::from_json(&json!({"properties": {
            "n": {"type": "integer"}, "d": {"type": "date"}, "k": {"type": "keyword"}, "t": {"type": "text"}}}))
            .expect("valid");
        let _ = mapping.parse_document(&v, "id");
        let _ = Mapping::default().parse_document(&v, "id");
        let _ = Plan::parse(&v, &[mapping]);
    }
}
