//! Index mappings: ES field types, object paths, multi-fields, dynamic mapping, and turning a JSON
//! document into the values the shard indexes.
//!
//! Pure: no I/O. A [`Mapping`] is the ES mapping of one index (what `GET /{index}/_mapping`
//! shows). [`Mapping::parse_document`] checks a document against it, inferring new fields with ES's
//! dynamic rules, and returns a [`ParsedDoc`] (flat `path → value` lists) plus the mapping grown by
//! the new fields. It does not know tantivy's schema: the shard places the values into its
//! fixed schema (see `shard::Fields`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use crate::error::{ErrorKind, EsError};

/// An ES field type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// Analysed full text.
    Text,
    /// One exact term.
    Keyword,
    /// Signed 64-bit integer.
    Long,
    /// Signed 32-bit integer.
    Integer,
    /// Signed 16-bit integer.
    Short,
    /// Signed 8-bit integer.
    Byte,
    /// 64-bit float.
    Double,
    /// 32-bit float.
    Float,
    /// `true` / `false`.
    Boolean,
    /// A point in time, kept as epoch milliseconds.
    Date,
    /// A JSON object with its own properties.
    Object,
}

impl FieldType {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "text" => Self::Text,
            "keyword" => Self::Keyword,
            "long" => Self::Long,
            "integer" => Self::Integer,
            "short" => Self::Short,
            "byte" => Self::Byte,
            "double" => Self::Double,
            "float" | "half_float" | "scaled_float" => Self::Float,
            "boolean" => Self::Boolean,
            "date" => Self::Date,
            "object" => Self::Object,
            _ => return None,
        })
    }

    /// The ES type name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Keyword => "keyword",
            Self::Long => "long",
            Self::Integer => "integer",
            Self::Short => "short",
            Self::Byte => "byte",
            Self::Double => "double",
            Self::Float => "float",
            Self::Boolean => "boolean",
            Self::Date => "date",
            Self::Object => "object",
        }
    }

    /// Integer types (kept as `i64`).
    pub fn is_integer(self) -> bool {
        matches!(self, Self::Long | Self::Integer | Self::Short | Self::Byte)
    }

    /// Numeric types, integer or floating.
    pub fn is_numeric(self) -> bool {
        self.is_integer() || matches!(self, Self::Double | Self::Float)
    }

    fn integer_range(self) -> (i64, i64) {
        match self {
            Self::Integer => (i32::MIN.into(), i32::MAX.into()),
            Self::Short => (i16::MIN.into(), i16::MAX.into()),
            Self::Byte => (i8::MIN.into(), i8::MAX.into()),
            _ => (i64::MIN, i64::MAX),
        }
    }
}

/// Most leaf fields (multi-fields included) dynamic mapping may grow an index to (ES's
/// `index.mapping.total_fields.limit`).
pub const TOTAL_FIELDS_LIMIT: usize = 1000;

/// What to do with fields a document has and the mapping lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dynamic {
    /// Add them with ES's inference rules (the default).
    #[default]
    True,
    /// Keep them in `_source` only.
    False,
    /// Reject the document.
    Strict,
}

/// One field's mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldMapping {
    /// Its type.
    pub ty: FieldType,
    /// Multi-fields (`fields`), e.g. `keyword` under a text field.
    pub fields: BTreeMap<String, FieldMapping>,
    /// Sub-properties of an object.
    pub properties: BTreeMap<String, FieldMapping>,
    /// Keyword values longer than this many characters are not indexed.
    pub ignore_above: Option<usize>,
    /// Date formats, `||`-separated ES names or patterns.
    pub format: Option<String>,
}

impl FieldMapping {
    fn leaf(ty: FieldType) -> Self {
        Self {
            ty,
            fields: BTreeMap::new(),
            properties: BTreeMap::new(),
            ignore_above: None,
            format: None,
        }
    }

    fn object() -> Self {
        Self::leaf(FieldType::Object)
    }

    /// ES's dynamic mapping for a string: text with a `keyword` sub-field (ignore_above 256).
    fn dynamic_string() -> Self {
        let mut keyword = Self::leaf(FieldType::Keyword);
        keyword.ignore_above = Some(256);
        let mut text = Self::leaf(FieldType::Text);
        text.fields.insert("keyword".into(), keyword);
        text
    }

    fn from_json(name: &str, body: &Value) -> Result<Self, EsError> {
        let Some(obj) = body.as_object() else {
            return Err(EsError::mapper_parsing(format!(
                "Expected map for property [fields] on field [{name}] but got a {}",
                json_kind(body)
            )));
        };
        let ty = match obj.get("type") {
            None if obj.contains_key("properties") => FieldType::Object,
            None => FieldType::Object,
            Some(Value::String(t)) => FieldType::parse(t).ok_or_else(|| {
                EsError::mapper_parsing(format!(
                    "No handler for type [{t}] declared on field [{name}]"
                ))
            })?,
            Some(other) => {
                return Err(EsError::mapper_parsing(format!(
                    "the [type] of field [{name}] must be a string, got {other}"
                )));
            }
        };
        let mut field = Self::leaf(ty);
        for (key, value) in obj {
            match key.as_str() {
                "type" => {}
                "properties" if ty == FieldType::Object => {
                    field.properties = parse_properties(value)?;
                }
                "fields" if ty != FieldType::Object => {
                    let Some(subs) = value.as_object() else {
                        return Err(EsError::mapper_parsing(format!(
                            "the [fields] of field [{name}] must be an object"
                        )));
                    };
                    for (sub, body) in subs {
                        let sub_field = Self::from_json(sub, body)?;
                        if sub_field.ty == FieldType::Object {
                            return Err(EsError::mapper_parsing(format!(
                                "multi-field [{name}.{sub}] cannot be an object"
                            )));
                        }
                        field.fields.insert(sub.clone(), sub_field);
                    }
                }
                "ignore_above" if ty == FieldType::Keyword => {
                    let n = value.as_u64().ok_or_else(|| {
                        EsError::mapper_parsing(format!(
                            "[ignore_above] on field [{name}] must be a non-negative integer"
                        ))
                    })?;
                    field.ignore_above = Some(usize::try_from(n).unwrap_or(usize::MAX));
                }
                "format" if ty == FieldType::Date => {
                    let format = value.as_str().ok_or_else(|| {
                        EsError::mapper_parsing(format!(
                            "[format] on field [{name}] must be a string"
                        ))
                    })?;
                    crate::date::check_format(format).map_err(|e| {
                        EsError::mapper_parsing(format!(
                            "Invalid format: [{format}] on field [{name}]: {e}"
                        ))
                    })?;
                    field.format = Some(format.to_owned());
                }
                // Accepted and without effect here: every field is indexed with doc values.
                "index"
                | "doc_values"
                | "store"
                | "norms"
                | "coerce"
                | "dynamic"
                | "boost"
                | "similarity"
                | "index_options"
                | "eager_global_ordinals"
                | "scaling_factor" => {}
                "analyzer" | "search_analyzer" => {
                    if !matches!(value.as_str(), Some("standard" | "default")) {
                        return Err(EsError::mapper_parsing(format!(
                            "analyzer {value} on field [{name}] is not supported yet; only the standard analyzer is"
                        )));
                    }
                }
                "enabled" if value.as_bool() != Some(true) => {
                    return Err(EsError::mapper_parsing(format!(
                        "[enabled: false] on field [{name}] is not supported yet"
                    )));
                }
                "enabled" => {}
                "null_value" => {
                    return Err(EsError::mapper_parsing(format!(
                        "[null_value] on field [{name}] is not supported yet"
                    )));
                }
                other => {
                    return Err(EsError::mapper_parsing(format!(
                        "unknown parameter [{other}] on mapper [{name}] of type [{}]",
                        ty.as_str()
                    )));
                }
            }
        }
        Ok(field)
    }

    fn to_json(&self) -> Value {
        let mut obj = Map::new();
        if self.ty == FieldType::Object {
            obj.insert("properties".into(), properties_json(&self.properties));
            return Value::Object(obj);
        }
        obj.insert("type".into(), json!(self.ty.as_str()));
        if let Some(n) = self.ignore_above {
            obj.insert("ignore_above".into(), json!(n));
        }
        if let Some(f) = &self.format {
            obj.insert("format".into(), json!(f));
        }
        if !self.fields.is_empty() {
            obj.insert("fields".into(), properties_json(&self.fields));
        }
        Value::Object(obj)
    }

    /// Adds what `other` has and `self` lacks; a changed type is an error.
    fn merge(&mut self, path: &str, other: &FieldMapping) -> Result<(), EsError> {
        if self.ty != other.ty {
            return Err(EsError::illegal_argument(format!(
                "mapper [{path}] cannot be changed from type [{}] to [{}]",
                self.ty.as_str(),
                other.ty.as_str()
            )));
        }
        merge_maps(path, &mut self.properties, &other.properties)?;
        merge_maps(path, &mut self.fields, &other.fields)?;
        if other.ignore_above.is_some() {
            self.ignore_above = other.ignore_above;
        }
        if other.format.is_some() && self.format != other.format && self.format.is_some() {
            return Err(EsError::illegal_argument(format!(
                "mapper [{path}] cannot change its [format]"
            )));
        }
        if self.format.is_none() {
            self.format.clone_from(&other.format);
        }
        Ok(())
    }
}

fn merge_maps(
    prefix: &str,
    ours: &mut BTreeMap<String, FieldMapping>,
    theirs: &BTreeMap<String, FieldMapping>,
) -> Result<(), EsError> {
    for (name, field) in theirs {
        let path = join(prefix, name);
        match ours.get_mut(name) {
            Some(existing) => existing.merge(&path, field)?,
            None => {
                ours.insert(name.clone(), field.clone());
            }
        }
    }
    Ok(())
}

fn parse_properties(value: &Value) -> Result<BTreeMap<String, FieldMapping>, EsError> {
    let Some(obj) = value.as_object() else {
        return Err(EsError::mapper_parsing("[properties] must be an object"));
    };
    let mut out = BTreeMap::new();
    for (name, body) in obj {
        if name.is_empty() {
            return Err(EsError::mapper_parsing(
                "field name cannot be an empty string",
            ));
        }
        // `a.b` in a mapping is shorthand for an object `a` with a property `b`.
        let mut parts = name.split('.').rev();
        let last = parts.next().unwrap_or(name);
        let mut field = FieldMapping::from_json(name, body)?;
        let mut key = last.to_owned();
        for parent in parts {
            let mut obj = FieldMapping::object();
            obj.properties.insert(key, field);
            field = obj;
            key = parent.to_owned();
        }
        match out.get_mut(&key) {
            Some(existing) => FieldMapping::merge(existing, &key, &field)?,
            None => {
                out.insert(key, field);
            }
        }
    }
    Ok(out)
}

fn properties_json(props: &BTreeMap<String, FieldMapping>) -> Value {
    Value::Object(
        props
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect(),
    )
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A leaf field (or multi-field) as queries see it: its full dotted path and type.
#[derive(Debug, Clone, PartialEq)]
pub struct Leaf {
    /// Its type (never `Object`).
    pub ty: FieldType,
    /// Date formats, for dates.
    pub format: Option<String>,
    /// For keywords: values longer than this are not indexed.
    pub ignore_above: Option<usize>,
}

/// The mapping of one index.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Mapping {
    /// Handling of unmapped fields.
    pub dynamic: Dynamic,
    /// Top-level properties.
    pub properties: BTreeMap<String, FieldMapping>,
}

/// A value ready for the index, typed by its field's mapping.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// Analysed text.
    Text(String),
    /// An exact term.
    Keyword(String),
    /// An integer.
    I64(i64),
    /// A float.
    F64(f64),
    /// A boolean.
    Bool(bool),
    /// Epoch milliseconds.
    Date(i64),
}

/// A document checked against its mapping: flat `(path, value)` pairs for every leaf and
/// multi-field, and the set of paths that have a value (for `exists`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedDoc {
    /// Leaf values, in document order.
    pub values: Vec<(String, IndexValue)>,
    /// Paths with at least one value.
    pub field_names: BTreeSet<String>,
}

impl Mapping {
    /// Parses the `mappings` body of `PUT /{index}` or `PUT /{index}/_mapping`.
    pub fn from_json(body: &Value) -> Result<Self, EsError> {
        let Some(obj) = body.as_object() else {
            return Err(EsError::mapper_parsing("[mappings] must be an object"));
        };
        let mut mapping = Mapping::default();
        for (key, value) in obj {
            match key.as_str() {
                "properties" => mapping.properties = parse_properties(value)?,
                "dynamic" => {
                    mapping.dynamic = match value {
                        Value::Bool(true) => Dynamic::True,
                        Value::Bool(false) => Dynamic::False,
                        Value::String(s) if s == "true" => Dynamic::True,
                        Value::String(s) if s == "false" => Dynamic::False,
                        Value::String(s) if s == "strict" => Dynamic::Strict,
                        other => {
                            return Err(EsError::mapper_parsing(format!(
                                "unknown value for [dynamic]: {other}"
                            )));
                        }
                    }
                }
                "_source" | "_meta" | "date_detection" | "numeric_detection"
                | "dynamic_templates" | "_routing" => {}
                other => {
                    return Err(EsError::mapper_parsing(format!(
                        "Root mapping definition has unsupported parameters:  [{other} : {}]",
                        obj.get(other).map(Value::to_string).unwrap_or_default()
                    )));
                }
            }
        }
        Ok(mapping)
    }

    /// The ES JSON form (`{"properties": {...}}`).
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        match self.dynamic {
            Dynamic::True => {}
            Dynamic::False => {
                obj.insert("dynamic".into(), json!("false"));
            }
            Dynamic::Strict => {
                obj.insert("dynamic".into(), json!("strict"));
            }
        }
        if !self.properties.is_empty() {
            obj.insert("properties".into(), properties_json(&self.properties));
        }
        Value::Object(obj)
    }

    /// Adds `other`'s fields; changing an existing field's type is `illegal_argument_exception`.
    pub fn merge(&mut self, other: &Mapping) -> Result<(), EsError> {
        let mut merged = self.properties.clone();
        merge_maps("", &mut merged, &other.properties)?;
        self.properties = merged;
        if other.dynamic != Dynamic::True {
            self.dynamic = other.dynamic;
        }
        Ok(())
    }

    /// Every leaf and multi-field by full dotted path.
    pub fn leaves(&self) -> BTreeMap<String, Leaf> {
        let mut out = BTreeMap::new();
        collect_leaves("", &self.properties, &mut out);
        out
    }

    /// The leaf at `path` (`a.b`, `title.keyword`), if mapped.
    pub fn leaf(&self, path: &str) -> Option<Leaf> {
        let mut props = &self.properties;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let field = props.get(part)?;
            if field.ty == FieldType::Object {
                props = &field.properties;
                continue;
            }
            let rest: Vec<&str> = parts.collect();
            let target = match rest.as_slice() {
                [] => field,
                [sub] => field.fields.get(*sub)?,
                _ => return None,
            };
            return Some(Leaf {
                ty: target.ty,
                format: target.format.clone(),
                ignore_above: target.ignore_above,
            });
        }
        None
    }

    /// Whether `path` names an object.
    pub fn is_object(&self, path: &str) -> bool {
        let mut props = &self.properties;
        for part in path.split('.') {
            match props.get(part) {
                Some(f) if f.ty == FieldType::Object => props = &f.properties,
                _ => return false,
            }
        }
        true
    }

    /// Checks `source` (a document's `_source`) and flattens it into index values, growing the
    /// mapping with dynamically mapped fields. Returns the values and, when fields were added, the
    /// new mapping. `id` only names the document in errors.
    pub fn parse_document(
        &self,
        source: &Value,
        id: &str,
    ) -> Result<(ParsedDoc, Option<Mapping>), EsError> {
        let Some(obj) = source.as_object() else {
            return Err(EsError::mapper_parsing(format!(
                "failed to parse, document is empty or not an object (got {})",
                json_kind(source)
            )));
        };
        let mut grown = self.clone();
        let mut doc = ParsedDoc::default();
        let dynamic = self.dynamic;
        parse_object(&mut grown.properties, dynamic, "", obj, id, &mut doc)?;
        let changed = grown.properties != self.properties;
        if changed {
            let fields = grown.leaves().len();
            if fields > TOTAL_FIELDS_LIMIT {
                return Err(EsError::illegal_argument(format!(
                    "Limit of total fields [{TOTAL_FIELDS_LIMIT}] has been exceeded while adding new fields [{}]",
                    fields - self.leaves().len()
                )));
            }
        }
        Ok((doc, changed.then_some(grown)))
    }
}

fn collect_leaves(
    prefix: &str,
    props: &BTreeMap<String, FieldMapping>,
    out: &mut BTreeMap<String, Leaf>,
) {
    for (name, field) in props {
        let path = join(prefix, name);
        if field.ty == FieldType::Object {
            collect_leaves(&path, &field.properties, out);
            continue;
        }
        for (sub, sub_field) in &field.fields {
            out.insert(
                join(&path, sub),
                Leaf {
                    ty: sub_field.ty,
                    format: sub_field.format.clone(),
                    ignore_above: sub_field.ignore_above,
                },
            );
        }
        out.insert(
            path,
            Leaf {
                ty: field.ty,
                format: field.format.clone(),
                ignore_above: field.ignore_above,
            },
        );
    }
}

fn parse_object(
    props: &mut BTreeMap<String, FieldMapping>,
    dynamic: Dynamic,
    prefix: &str,
    obj: &Map<String, Value>,
    id: &str,
    doc: &mut ParsedDoc,
) -> Result<(), EsError> {
    for (key, value) in obj {
        if key.is_empty() {
            return Err(EsError::mapper_parsing(
                "field name cannot be an empty string",
            ));
        }
        if prefix.is_empty() && key.starts_with('_') && is_metadata_field(key) {
            return Err(EsError::mapper_parsing(format!(
                "Field [{key}] is a metadata field and cannot be added inside a document. Use the index API request parameters."
            )));
        }
        // `{"a.b": 1}` is the same as `{"a": {"b": 1}}`.
        if let Some((head, tail)) = key.split_once('.') {
            let mut inner = Map::new();
            inner.insert(tail.to_owned(), value.clone());
            let mut outer = Map::new();
            outer.insert(head.to_owned(), Value::Object(inner));
            parse_object(props, dynamic, prefix, &outer, id, doc)?;
            continue;
        }
        parse_value(props, dynamic, prefix, key, value, id, doc)?;
    }
    Ok(())
}

fn is_metadata_field(name: &str) -> bool {
    matches!(
        name,
        "_id"
            | "_index"
            | "_source"
            | "_version"
            | "_seq_no"
            | "_primary_term"
            | "_routing"
            | "_field_names"
            | "_ignored"
    )
}

fn parse_value(
    props: &mut BTreeMap<String, FieldMapping>,
    dynamic: Dynamic,
    prefix: &str,
    key: &str,
    value: &Value,
    id: &str,
    doc: &mut ParsedDoc,
) -> Result<(), EsError> {
    let path = join(prefix, key);
    match value {
        Value::Null => return Ok(()),
        Value::Array(items) => {
            for item in items {
                if item.is_array() {
                    // ES flattens nested arrays.
                    parse_value(props, dynamic, prefix, key, item, id, doc)?;
                } else {
                    parse_value(props, dynamic, prefix, key, item, id, doc)?;
                }
            }
            return Ok(());
        }
        _ => {}
    }
    if !props.contains_key(key) {
        match dynamic {
            Dynamic::False => return Ok(()),
            Dynamic::Strict => {
                return Err(EsError::new(
                    ErrorKind::StrictDynamicMapping,
                    format!(
                        "mapping set to strict, dynamic introduction of [{key}] within [{}] is not allowed",
                        if prefix.is_empty() { "_doc" } else { prefix }
                    ),
                ));
            }
            Dynamic::True => {
                let inferred = infer(value);
                props.insert(key.to_owned(), inferred);
            }
        }
    }
    let Some(field) = props.get_mut(key) else {
        return Ok(());
    };
    if let Value::Object(inner) = value {
        if field.ty != FieldType::Object {
            return Err(EsError::mapper_parsing(format!(
                "failed to parse field [{path}] of type [{}] in document with id '{id}'. Preview of field's value: '{value}'",
                field.ty.as_str()
            )));
        }
        return parse_object(&mut field.properties, dynamic, &path, inner, id, doc);
    }
    if field.ty == FieldType::Object {
        return Err(EsError::mapper_parsing(format!(
            "object mapping for [{path}] tried to parse field [{key}] as object, but found a concrete value"
        )));
    }
    let field = field.clone();
    push_leaf(&path, &field, value, id, doc)?;
    for (sub, sub_field) in &field.fields {
        push_leaf(&join(&path, sub), sub_field, value, id, doc)?;
    }
    Ok(())
}

fn push_leaf(
    path: &str,
    field: &FieldMapping,
    value: &Value,
    id: &str,
    doc: &mut ParsedDoc,
) -> Result<(), EsError> {
    let leaf = Leaf {
        ty: field.ty,
        format: field.format.clone(),
        ignore_above: field.ignore_above,
    };
    match coerce(&leaf, value) {
        Ok(Some(v)) => {
            doc.field_names.insert(path.to_owned());
            doc.values.push((path.to_owned(), v));
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(why) => Err(EsError::mapper_parsing(format!(
            "failed to parse field [{path}] of type [{}] in document with id '{id}'. Preview of field's value: '{}'{}",
            field.ty.as_str(),
            value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned),
            if why.is_empty() {
                String::new()
            } else {
                format!(": {why}")
            }
        ))),
    }
}

/// Converts a JSON scalar to the value a leaf of this mapping indexes. `Ok(None)`: nothing to
/// index (a keyword over `ignore_above`). `Err`: the value does not fit the type.
pub fn coerce(leaf: &Leaf, value: &Value) -> Result<Option<IndexValue>, String> {
    let as_text = || match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    match leaf.ty {
        FieldType::Text => as_text()
            .map(|s| Some(IndexValue::Text(s)))
            .ok_or_else(String::new),
        FieldType::Keyword => {
            let s = as_text().ok_or_else(String::new)?;
            if leaf.ignore_above.is_some_and(|n| s.chars().count() > n) {
                return Ok(None);
            }
            Ok(Some(IndexValue::Keyword(s)))
        }
        ty if ty.is_integer() => {
            let n = match value {
                Value::Number(n) => match n.as_i64() {
                    Some(i) => i,
                    None => {
                        let f = n.as_f64().ok_or("out of range")?;
                        float_to_integer(f)?
                    }
                },
                Value::String(s) => match s.trim().parse::<i64>() {
                    Ok(i) => i,
                    Err(_) => float_to_integer(
                        s.trim()
                            .parse::<f64>()
                            .map_err(|_| format!("For input string: \"{s}\""))?,
                    )?,
                },
                _ => return Err(String::new()),
            };
            let (lo, hi) = ty.integer_range();
            if n < lo || n > hi {
                return Err(format!("Value [{n}] is out of range for {}", ty.as_str()));
            }
            Ok(Some(IndexValue::I64(n)))
        }
        FieldType::Double | FieldType::Float => {
            let f = match value {
                Value::Number(n) => n.as_f64().ok_or("not a number")?,
                Value::String(s) => s
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| format!("For input string: \"{s}\""))?,
                _ => return Err(String::new()),
            };
            if !f.is_finite() {
                return Err("[float] supports only finite values".into());
            }
            Ok(Some(IndexValue::F64(f)))
        }
        FieldType::Boolean => match value {
            Value::Bool(b) => Ok(Some(IndexValue::Bool(*b))),
            Value::String(s) if s == "true" => Ok(Some(IndexValue::Bool(true))),
            Value::String(s) if s == "false" || s.is_empty() => Ok(Some(IndexValue::Bool(false))),
            _ => Err("Failed to parse value, only [true] or [false] are allowed".into()),
        },
        FieldType::Date => {
            let millis = match value {
                Value::Number(n) => n
                    .as_i64()
                    .or_else(|| n.as_f64().map(|f| f as i64))
                    .ok_or("not a date")?,
                Value::String(s) => crate::date::parse(s, leaf.format.as_deref())?,
                _ => return Err(String::new()),
            };
            Ok(Some(IndexValue::Date(millis)))
        }
        FieldType::Object => Err("an object field has no value".into()),
        _ => Err(String::new()),
    }
}

fn float_to_integer(f: f64) -> Result<i64, String> {
    if !(-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f) {
        return Err(format!("Value [{f}] is out of range for a long"));
    }
    // ES coerces by truncation.
    Ok(f.trunc() as i64)
}

/// ES's dynamic mapping for a value seen for the first time.
fn infer(value: &Value) -> FieldMapping {
    match value {
        Value::Bool(_) => FieldMapping::leaf(FieldType::Boolean),
        Value::Number(n) if n.is_i64() || n.is_u64() => FieldMapping::leaf(FieldType::Long),
        Value::Number(_) => FieldMapping::leaf(FieldType::Float),
        Value::String(s) if crate::date::looks_like_date(s) => FieldMapping::leaf(FieldType::Date),
        Value::String(_) => FieldMapping::dynamic_string(),
        Value::Object(_) => FieldMapping::object(),
        Value::Array(items) => items
            .iter()
            .find(|v| !v.is_null())
            .map_or_else(FieldMapping::dynamic_string, infer),
        Value::Null => FieldMapping::dynamic_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(mapping: &Mapping, doc: Value) -> (ParsedDoc, Option<Mapping>) {
        mapping.parse_document(&doc, "1").expect("document parses")
    }

    #[test]
    fn dynamic_mapping_follows_es_inference() {
        let (doc, grown) = parse(
            &Mapping::default(),
            json!({"title": "Hello", "n": 3, "f": 1.5, "ok": true,
                   "at": "2024-05-01T10:00:00Z", "day": "2024-05-01", "user": {"name": "ann"}}),
        );
        let grown = grown.expect("fields were added");
        assert_eq!(
            grown.to_json(),
            json!({"properties": {
                "at": {"type": "date"},
                "day": {"type": "date"},
                "f": {"type": "float"},
                "n": {"type": "long"},
                "ok": {"type": "boolean"},
                "title": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}},
                "user": {"properties": {"name": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}}}}
            }})
        );
        assert!(
            doc.values
                .contains(&("title".into(), IndexValue::Text("Hello".into())))
        );
        assert!(
            doc.values
                .contains(&("title.keyword".into(), IndexValue::Keyword("Hello".into())))
        );
        assert!(doc.values.contains(&(
            "user.name.keyword".into(),
            IndexValue::Keyword("ann".into())
        )));
        assert!(doc.values.contains(&("n".into(), IndexValue::I64(3))));
        assert!(
            doc.values
                .contains(&("at".into(), IndexValue::Date(1_714_557_600_000)))
        );
        assert!(doc.field_names.contains("user.name"));
    }

    #[test]
    fn second_parse_adds_nothing() {
        let (_, grown) = parse(&Mapping::default(), json!({"a": "x", "b": [1, 2]}));
        let grown = grown.expect("grown");
        let (doc, again) = parse(&grown, json!({"a": "y", "b": 7}));
        assert!(again.is_none());
        assert_eq!(doc.values.len(), 3);
    }

    #[test]
    fn long_keyword_is_not_indexed_past_ignore_above() {
        let (doc, _) = parse(&Mapping::default(), json!({"a": "x".repeat(300)}));
        assert_eq!(doc.values.len(), 1, "only the text value");
    }

    #[test]
    fn explicit_mapping_rejects_wrong_types() {
        let mapping = Mapping::from_json(&json!({"properties": {
            "n": {"type": "integer"}, "b": {"type": "boolean"}, "d": {"type": "date", "format": "yyyy-MM-dd"}
        }}))
        .expect("valid");
        for bad in [
            json!({"n": "abc"}),
            json!({"n": 1e20}),
            json!({"b": "yes"}),
            json!({"d": "01/02/2024"}),
            json!({"n": {"x": 1}}),
        ] {
            let err = mapping.parse_document(&bad, "1").expect_err("rejected");
            assert_eq!(err.kind, ErrorKind::MapperParsing, "{bad}");
        }
        let (doc, _) = parse(&mapping, json!({"n": "42", "d": "2024-01-02"}));
        assert!(doc.values.contains(&("n".into(), IndexValue::I64(42))));
        assert!(
            doc.values
                .contains(&("d".into(), IndexValue::Date(1_704_153_600_000)))
        );
    }

    #[test]
    fn mapping_json_round_trips_and_dotted_names_expand() {
        let body = json!({"properties": {"a.b": {"type": "keyword"}, "t": {"type": "text", "fields": {"raw": {"type": "keyword"}}}}});
        let mapping = Mapping::from_json(&body).expect("valid");
        assert_eq!(
            mapping.to_json(),
            json!({"properties": {"a": {"properties": {"b": {"type": "keyword"}}},
                                  "t": {"type": "text", "fields": {"raw": {"type": "keyword"}}}}})
        );
        assert_eq!(
            mapping.leaf("t.raw").map(|l| l.ty),
            Some(FieldType::Keyword)
        );
        assert_eq!(mapping.leaf("a.b").map(|l| l.ty), Some(FieldType::Keyword));
        assert!(mapping.is_object("a"));
        assert_eq!(
            Mapping::from_json(&mapping.to_json()).expect("reparse"),
            mapping
        );
    }

    #[test]
    fn bad_mappings_are_mapper_parsing_errors() {
        for bad in [
            json!({"properties": {"a": {"type": "nope"}}}),
            json!({"properties": {"a": {"type": "keyword", "bogus": 1}}}),
            json!({"wat": 1}),
            json!({"properties": {"d": {"type": "date", "format": "qqq"}}}),
            json!({"properties": {"t": {"type": "text", "analyzer": "english"}}}),
            json!({"properties": {"k": {"type": "keyword", "null_value": "NULL"}}}),
            json!({"properties": {"o": {"type": "object", "enabled": false}}}),
        ] {
            let err = Mapping::from_json(&bad).expect_err("rejected");
            assert_eq!(err.kind, ErrorKind::MapperParsing, "{bad}");
        }
    }

    #[test]
    fn changing_a_field_type_is_refused() {
        let mut a =
            Mapping::from_json(&json!({"properties": {"x": {"type": "long"}}})).expect("ok");
        let b = Mapping::from_json(
            &json!({"properties": {"x": {"type": "text"}, "y": {"type": "long"}}}),
        )
        .expect("ok");
        let err = a.merge(&b).expect_err("type change");
        assert_eq!(err.kind, ErrorKind::IllegalArgument);
        assert!(a.leaf("y").is_none(), "a failed merge changes nothing");
    }

    #[test]
    fn dynamic_mapping_stops_at_the_field_limit() {
        let mut doc = serde_json::Map::new();
        for n in 0..600 {
            doc.insert(format!("f{n}"), json!("text"));
        }
        let err = Mapping::default()
            .parse_document(&Value::Object(doc), "1")
            .expect_err("1200 fields with their keyword sub-fields");
        assert_eq!(err.kind, ErrorKind::IllegalArgument);
        assert!(
            err.reason.contains("Limit of total fields [1000]"),
            "{}",
            err.reason
        );
    }

    #[test]
    fn strict_dynamic_rejects_new_fields() {
        let m = Mapping::from_json(
            &json!({"dynamic": "strict", "properties": {"a": {"type": "long"}}}),
        )
        .expect("ok");
        let err = m.parse_document(&json!({"b": 1}), "1").expect_err("strict");
        assert_eq!(err.kind, ErrorKind::StrictDynamicMapping);
    }
}
