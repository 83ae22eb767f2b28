//! The observer file: which tables are watched and by which observers.
//!
//! ```toml
//! [[observers]]
//! name = "order-created"
//! entity = "orders"            # a table: `name` (schema `public`) or `schema.name`
//! events = ["INSERT"]          # INSERT, UPDATE, DELETE; all three when left out
//! condition = "data.total >= 100 && data.status == 'new'"   # optional; see `condition`
//! ```
//!
//! Unknown keys and bad values are errors naming the file, line and key; an observer problem
//! (duplicate name, malformed entity) names the observer.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::time::Duration;

use gantry_runtime::circuit_breaker::CircuitBreakerConfig;
use gantry_runtime::retry::RetryConfig;
use serde::Deserialize;

use crate::Error;
use crate::action::{ActionConfig, Templates};
use crate::condition::Condition;

/// A row operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum EventType {
    /// A row was inserted.
    #[serde(rename = "INSERT")]
    Insert,
    /// A row was updated.
    #[serde(rename = "UPDATE")]
    Update,
    /// A row was deleted.
    #[serde(rename = "DELETE")]
    Delete,
}

impl EventType {
    /// Its name, as PostgreSQL's `TG_OP` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Insert => "INSERT",
            EventType::Update => "UPDATE",
            EventType::Delete => "DELETE",
        }
    }

    /// The inverse of [`EventType::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "INSERT" => Some(EventType::Insert),
            "UPDATE" => Some(EventType::Update),
            "DELETE" => Some(EventType::Delete),
            _ => None,
        }
    }
}

/// A watched table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entity {
    /// Its schema (`public` when the config names none).
    pub schema: String,
    /// The table.
    pub table: String,
}

impl Entity {
    /// Parses `table` or `schema.table`.
    pub fn parse(s: &str) -> Option<Self> {
        let (schema, table) = match s.split_once('.') {
            Some((schema, table)) => (schema, table),
            None => ("public", s),
        };
        let ok = |part: &str| !part.is_empty() && !part.contains(['.', '\0']);
        (ok(schema) && ok(table)).then(|| Entity {
            schema: schema.to_owned(),
            table: table.to_owned(),
        })
    }

    /// The entity name events carry: `table` for `public`, else `schema.table`.
    pub fn name(&self) -> String {
        if self.schema == "public" {
            self.table.clone()
        } else {
            format!("{}.{}", self.schema, self.table)
        }
    }

    /// The quoted, schema-qualified table for SQL.
    pub fn sql(&self) -> String {
        format!(
            "{}.{}",
            crate::ident(&self.schema),
            crate::ident(&self.table)
        )
    }
}

/// One observer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observer {
    /// Unique within the file.
    pub name: String,
    /// The table it watches.
    pub entity: String,
    /// The operations it reacts to.
    #[serde(default = "all_events")]
    pub events: Vec<EventType>,
    /// Only events for which this holds (see [`crate::condition`]); checked at load.
    #[serde(default)]
    pub condition: Option<String>,
    /// What to do with each matching event ([`crate::action`]). Each action of each event is
    /// its own job, retried on its own.
    #[serde(default)]
    pub actions: Vec<ActionConfig>,
    /// How a failed action is retried (attempts, backoff, delays).
    #[serde(default)]
    pub retry: RetryConfig,
    /// The per-attempt timeout of its actions (an action may set its own). Default: 30 s.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// What happens after an action's last attempt fails: `"dlq"`, the only choice and the
    /// default, keeps it in the dead-letter queue (`gantry observer dlq`).
    #[serde(default)]
    pub on_failure: OnFailure,
}

/// What happens to an action that failed for good.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// It stays in the dead-letter queue until retried or removed.
    #[default]
    Dlq,
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Observer {
    /// The parsed condition (`None`: every event matches). Loading checked it parses.
    pub fn parsed_condition(&self) -> Option<Condition> {
        self.condition
            .as_deref()
            .and_then(|c| Condition::parse(c).ok())
    }
}

fn all_events() -> Vec<EventType> {
    vec![EventType::Insert, EventType::Update, EventType::Delete]
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObserverConfig {
    /// The observers.
    #[serde(default)]
    pub observers: Vec<Observer>,
    /// The Redis server of `cache` actions that name none.
    #[serde(default)]
    pub redis: RedisConfig,
    /// The circuit breaker every endpoint (`scheme://host:port`) of the HTTP actions gets.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// The action workers of `gantry observer run`.
    #[serde(default)]
    pub worker: WorkerConfig,
}

/// `[redis]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// E.g. `redis://127.0.0.1:6379`.
    pub url: Option<String>,
    /// Record each delivered action's result in Redis and skip an attempt whose action is
    /// recorded (see [`crate::runner::Runner::run`]). Default: true (when `url` is set).
    pub dedup: bool,
    /// How long a record is kept. Default: 24 h.
    #[serde(with = "humantime_serde")]
    pub dedup_ttl: Duration,
    /// The prefix of the records' keys. Default: `gantry:observer`; give database clusters
    /// sharing one Redis different prefixes.
    pub prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            dedup: true,
            dedup_ttl: Duration::from_secs(24 * 3600),
            prefix: "gantry:observer".into(),
        }
    }
}

/// `[worker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Actions run at once by one process. Default: 64.
    pub concurrency: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self { concurrency: 64 }
    }
}

impl ObserverConfig {
    /// Parses and checks a config's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, Error> {
        let config: ObserverConfig = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("{line}:{col}: ")
                })
                .unwrap_or_default();
            Error::Config(format!("{origin}:{at}{}", e.message()))
        })?;
        let mut names = HashSet::new();
        for o in &config.observers {
            if o.name.trim().is_empty() {
                return Err(Error::Config(format!(
                    "{origin}: an observer has an empty name"
                )));
            }
            if !names.insert(o.name.as_str()) {
                return Err(Error::Config(format!(
                    "{origin}: observer {:?}: the name is used twice",
                    o.name
                )));
            }
            if Entity::parse(&o.entity).is_none() {
                return Err(Error::Config(format!(
                    "{origin}: observer {:?}: entity {:?} is not `table` or `schema.table`",
                    o.name, o.entity
                )));
            }
            if o.events.is_empty() {
                return Err(Error::Config(format!(
                    "{origin}: observer {:?}: events is empty",
                    o.name
                )));
            }
            o.retry.validate().map_err(|e| {
                Error::Config(format!("{origin}: observer {:?}: retry: {e}", o.name))
            })?;
            if o.timeout.is_zero() {
                return Err(Error::Config(format!(
                    "{origin}: observer {:?}: timeout: must be greater than zero",
                    o.name
                )));
            }
            let mut actions = HashSet::new();
            for a in &o.actions {
                let at = format!("{origin}: observer {:?}: action {:?}", o.name, a.name());
                if !actions.insert(a.name()) {
                    return Err(Error::Config(format!(
                        "{at}: the name is used twice (give each a `name`)"
                    )));
                }
                a.check().map_err(|e| Error::Config(format!("{at}: {e}")))?;
                if let ActionConfig::Cache(c) = a
                    && c.redis.is_none()
                    && config.redis.url.is_none()
                {
                    return Err(Error::Config(format!(
                        "{at}: redis: not set here nor in [redis] url"
                    )));
                }
                let mut templates = Templates::default();
                for (key, source) in a.templates() {
                    templates
                        .add(key.clone(), source)
                        .map_err(|e| Error::Config(format!("{at}: {key}: {e}")))?;
                }
            }
            if let Some(source) = &o.condition {
                let condition = Condition::parse(source).map_err(|e| {
                    Error::Config(format!(
                        "{origin}: observer {:?}: condition {source:?}: {e}",
                        o.name
                    ))
                })?;
                let needs = condition.needs();
                if let Some(why) = o.events.iter().find_map(|&op| needs.refuses(op)) {
                    return Err(Error::Config(format!(
                        "{origin}: observer {:?}: condition {source:?}: {why}",
                        o.name
                    )));
                }
            }
        }
        config
            .circuit_breaker
            .validate()
            .map_err(|e| Error::Config(format!("{origin}: circuit_breaker: {e}")))?;
        if config.worker.concurrency == 0 {
            return Err(Error::Config(format!(
                "{origin}: worker: concurrency must be at least 1"
            )));
        }
        if let Some(url) = &config.redis.url {
            redis::Client::open(url.as_str())
                .map_err(|e| Error::Config(format!("{origin}: redis: url {url:?}: {e}")))?;
        }
        Ok(config)
    }

    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The tables some observer watches.
    pub fn entities(&self) -> BTreeSet<Entity> {
        self.observers
            .iter()
            .filter_map(|o| Entity::parse(&o.entity))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_observers_and_defaults_events() {
        let c = ObserverConfig::parse(
            "[[observers]]\nname = \"a\"\nentity = \"orders\"\nevents = [\"INSERT\"]\n\n\
             [[observers]]\nname = \"b\"\nentity = \"shop.items\"\n",
            "t.toml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.observers[0].events, vec![EventType::Insert]);
        assert_eq!(c.observers[1].events.len(), 3);
        let entities: Vec<String> = c.entities().iter().map(Entity::name).collect();
        assert_eq!(entities, vec!["orders", "shop.items"]);
    }

    #[test]
    fn errors_name_the_line_key_or_observer() {
        let e = ObserverConfig::parse(
            "[[observers]]\nname = \"a\"\nentity = \"orders\"\nevnts = []\n",
            "t.toml",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.starts_with("t.toml:4:1: unknown field `evnts`"), "{e}");
        let e = ObserverConfig::parse(
            "[[observers]]\nname = \"a\"\nentity = \"orders\"\nevents = [\"UPSERT\"]\n",
            "t.toml",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.starts_with("t.toml:4:"), "{e}");
        let e = ObserverConfig::parse(
            "[[observers]]\nname = \"a\"\nentity = \"orders\"\n[[observers]]\nname = \"a\"\nentity = \"x\"\n",
            "t.toml",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert_eq!(e, "t.toml: observer \"a\": the name is used twice");
        let e = ObserverConfig::parse(
            "[[observers]]\nname = \"a\"\nentity = \"a.b.c\"\n",
            "t.toml",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("observer \"a\": entity \"a.b.c\""), "{e}");
    }

    #[test]
    fn conditions_are_checked_at_load() {
        let load = |events: &str, condition: &str| {
            ObserverConfig::parse(
                &format!(
                    "[[observers]]\nname = \"a\"\nentity = \"orders\"\nevents = {events}\n\
                     condition = {condition:?}\n"
                ),
                "t.toml",
            )
            .map_err(|e| e.to_string())
        };
        let ok = load("[\"UPDATE\"]", "changed_to('status', 'shipped')").unwrap();
        assert!(ok.observers[0].parsed_condition().is_some());
        let e = load("[\"UPDATE\"]", "data.total => 1").unwrap_err();
        assert!(
            e.starts_with("t.toml: observer \"a\": condition \"data.total => 1\": column 12: unexpected character"),
            "{e}"
        );
        let e = load("[\"UPDATE\"]", "shipped(data.a)").unwrap_err();
        assert!(e.contains("unknown function shipped()"), "{e}");
        let e = load("[\"INSERT\", \"UPDATE\"]", "field_changed('status')").unwrap_err();
        assert!(e.contains("INSERT events have only one"), "{e}");
        let e = load("[\"INSERT\"]", "before.status == 'x'").unwrap_err();
        assert!(e.contains("INSERT events have none"), "{e}");
    }
}
