//! Errors in Elasticsearch's wire shape.
//!
//! Every failure the engine reports to a client is an [`EsError`]: an ES error type
//! (`index_not_found_exception`, `parsing_exception`, ...), a reason, an HTTP status and optionally
//! the index it concerns. This module owns the one mapping from those errors to the JSON body
//! `{"error":{"root_cause":[...],"type":...,"reason":...},"status":N}`; it does not decide which
//! error a situation deserves (the modules that detect them do).

use serde_json::{Value, json};

/// The ES error types this engine emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The named index does not exist (404).
    IndexNotFound,
    /// The request body or query DSL could not be parsed (400).
    Parsing,
    /// An argument is invalid (400).
    IllegalArgument,
    /// A document value does not fit its field's mapping (400).
    MapperParsing,
    /// `if_seq_no`/`if_primary_term` or `_create` conflict (409).
    VersionConflict,
    /// `PUT /{index}` for an index that exists (400).
    ResourceAlreadyExists,
    /// `_update` of a document that does not exist (404).
    DocumentMissing,
    /// A bad index name (400).
    InvalidIndexName,
    /// A new field under `dynamic: strict` (400).
    StrictDynamicMapping,
    /// A resource (e.g. a document's source) that does not exist (404).
    ResourceNotFound,
    /// A query that cannot run against the mapping (400).
    QueryShard,
    /// A queue is full; retry later (429).
    Rejected,
    /// A request that fails validation (400).
    ActionRequestValidation,
    /// A failure inside the engine (500); details go to the log, not the client.
    Internal,
}

impl ErrorKind {
    /// The ES `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IndexNotFound => "index_not_found_exception",
            Self::Parsing => "parsing_exception",
            Self::IllegalArgument => "illegal_argument_exception",
            Self::MapperParsing => "mapper_parsing_exception",
            Self::VersionConflict => "version_conflict_engine_exception",
            Self::ResourceAlreadyExists => "resource_already_exists_exception",
            Self::DocumentMissing => "document_missing_exception",
            Self::InvalidIndexName => "invalid_index_name_exception",
            Self::StrictDynamicMapping => "strict_dynamic_mapping_exception",
            Self::Rejected => "es_rejected_execution_exception",
            Self::QueryShard => "query_shard_exception",
            Self::ResourceNotFound => "resource_not_found_exception",
            Self::ActionRequestValidation => "action_request_validation_exception",
            Self::Internal => "exception",
        }
    }

    /// The HTTP status ES answers with.
    pub fn status(self) -> u16 {
        match self {
            Self::IndexNotFound | Self::DocumentMissing | Self::ResourceNotFound => 404,
            Self::VersionConflict => 409,
            Self::Internal => 500,
            Self::Rejected => 429,
            Self::Parsing
            | Self::IllegalArgument
            | Self::MapperParsing
            | Self::ResourceAlreadyExists
            | Self::InvalidIndexName
            | Self::StrictDynamicMapping
            | Self::ActionRequestValidation
            | Self::QueryShard => 400,
        }
    }
}

/// An error to send to a client in ES's shape.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {reason}", kind.as_str())]
pub struct EsError {
    /// The ES error type.
    pub kind: ErrorKind,
    /// What was wrong, naming the thing.
    pub reason: String,
    /// The index concerned, when there is one.
    pub index: Option<String>,
}

impl EsError {
    /// An error of `kind` with `reason`.
    pub fn new(kind: ErrorKind, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
            index: None,
        }
    }

    /// Names the index the error concerns.
    pub fn with_index(mut self, index: impl Into<String>) -> Self {
        self.index = Some(index.into());
        self
    }

    /// `index_not_found_exception` for `index`.
    pub fn index_not_found(index: &str) -> Self {
        Self::new(ErrorKind::IndexNotFound, format!("no such index [{index}]")).with_index(index)
    }

    /// `parsing_exception`.
    pub fn parsing(reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::Parsing, reason)
    }

    /// `illegal_argument_exception`.
    pub fn illegal_argument(reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::IllegalArgument, reason)
    }

    /// `mapper_parsing_exception`.
    pub fn mapper_parsing(reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::MapperParsing, reason)
    }

    /// An engine failure; the detail is logged by the caller, the client sees a generic reason.
    pub fn internal(reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, reason)
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The inner `error` object (also used for per-item bulk failures).
    pub fn cause_json(&self) -> Value {
        let mut cause = json!({ "type": self.kind.as_str(), "reason": self.reason });
        if let Some(index) = &self.index {
            cause["index"] = json!(index);
            cause["index_uuid"] = json!("_na_");
        }
        cause
    }

    /// The full response body.
    pub fn to_json(&self) -> Value {
        let cause = self.cause_json();
        let mut error = cause.clone();
        error["root_cause"] = json!([cause]);
        json!({ "error": error, "status": self.status() })
    }
}

impl From<tantivy::TantivyError> for EsError {
    fn from(e: tantivy::TantivyError) -> Self {
        tracing::error!(error = %e, "tantivy failure");
        Self::internal("index engine failure")
    }
}

impl From<std::io::Error> for EsError {
    fn from(e: std::io::Error) -> Self {
        tracing::error!(error = %e, "i/o failure");
        Self::internal("storage failure")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_matches_elasticsearch() {
        let body = EsError::index_not_found("logs").to_json();
        assert_eq!(body["status"], 404);
        assert_eq!(body["error"]["type"], "index_not_found_exception");
        assert_eq!(body["error"]["index"], "logs");
        assert_eq!(
            body["error"]["root_cause"][0]["reason"],
            "no such index [logs]"
        );
    }
}
