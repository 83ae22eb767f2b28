//! Actions: what an observer does with a matching event — their configuration, templates, and
//! the classification of what happened into "done", "try again" and "give up".
//!
//! ```toml
//! [[observers.actions]]
//! type = "webhook"                 # webhook, slack, email, search, cache
//! name = "notify"                  # unique within the observer; the type when left out
//! url = "https://example.com/hooks/orders"
//! body = '{"order": {{ data.id }}, "email": {{ data.email | tojson }}}'
//! secret = "…"                     # signs the body (HMAC-SHA256); or secret_env = "VAR"
//! timeout = "10s"
//! ```
//!
//! Templates are [MiniJinja](https://docs.rs/minijinja) (Jinja2) over the event: `data` (the row
//! after the change; for a DELETE the deleted row), `before` (UPDATE and DELETE), `op`, `entity`,
//! `event_id` (the change-log id), `event_key` (`<xid>-<id>`, unique for good), `changed_at` (RFC 3339), `observer` and `action`. They are compiled when the file
//! loads, so a syntax error is a config error naming the observer, the action and the key. A
//! template that names a field the event lacks fails the attempt for good (the job goes to the
//! dead-letter queue) instead of sending an empty value; `{{ data.x | default('') }}` makes a
//! field optional.

use std::collections::BTreeMap;
use std::time::Duration;

use minijinja::{Environment, UndefinedBehavior};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::EventType;

/// One action of an observer, as the file spells it.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ActionConfig {
    /// An HTTP request.
    Webhook(WebhookConfig),
    /// A message to a Slack incoming webhook.
    Slack(SlackConfig),
    /// An email over SMTP.
    Email(EmailConfig),
    /// The event indexed into an Elasticsearch-compatible server.
    Search(SearchConfig),
    /// Redis keys deleted.
    Cache(CacheConfig),
}

/// `type = "webhook"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Unique within the observer; `webhook` when left out.
    pub name: Option<String>,
    /// The endpoint (a template).
    pub url: String,
    /// `POST` (the default), `PUT`, `PATCH`, `DELETE` or `GET`.
    #[serde(default = "post")]
    pub method: String,
    /// Extra headers (values are templates).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The body (a template); the event as JSON when left out.
    pub body: Option<String>,
    /// The HMAC-SHA256 key that signs `timestamp + "." + body`.
    pub secret: Option<String>,
    /// The environment variable holding the key, instead of `secret`.
    pub secret_env: Option<String>,
    /// Per-attempt timeout; the observer's `timeout` when left out.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

/// `type = "slack"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// Unique within the observer; `slack` when left out.
    pub name: Option<String>,
    /// The incoming-webhook URL.
    pub url: String,
    /// The message (a template).
    pub text: String,
    /// Per-attempt timeout; the observer's `timeout` when left out.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

/// `type = "email"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// Unique within the observer; `email` when left out.
    pub name: Option<String>,
    /// The SMTP server: `smtp://host:port` (plain), `smtp://host:port?tls=required`
    /// (STARTTLS), `smtps://host:port` (TLS from the start); credentials as
    /// `smtp://user:password@host`.
    pub smtp: String,
    /// The sender (a template).
    pub from: String,
    /// The recipients (templates).
    pub to: Vec<String>,
    /// The subject (a template).
    pub subject: String,
    /// The plain-text body (a template).
    pub body: String,
    /// Per-attempt timeout; the observer's `timeout` when left out.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

/// `type = "search"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    /// Unique within the observer; `search` when left out.
    pub name: Option<String>,
    /// The server's base URL, e.g. `http://127.0.0.1:9200` (credentials as `http://user:pw@…`).
    pub url: String,
    /// The index, or with `rollover = "daily"` the prefix of `<index>-YYYY.MM.DD` (the event's
    /// UTC day).
    pub index: String,
    /// `"daily"` (the default) or `"none"`.
    #[serde(default)]
    pub rollover: Rollover,
    /// With daily rollover: indices older than this are deleted, e.g. `"30d"`.
    #[serde(default, with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// Per-attempt timeout; the observer's `timeout` when left out.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

/// How a search action names indices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rollover {
    /// One index per UTC day of the event.
    #[default]
    Daily,
    /// One index.
    None,
}

/// `type = "cache"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Unique within the observer; `cache` when left out.
    pub name: Option<String>,
    /// The Redis server; the file's `[redis] url` when left out.
    pub redis: Option<String>,
    /// The keys to delete (templates).
    pub keys: Vec<String>,
    /// Per-attempt timeout; the observer's `timeout` when left out.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

fn post() -> String {
    "POST".into()
}

impl ActionConfig {
    /// Its type, as the file spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            ActionConfig::Webhook(_) => "webhook",
            ActionConfig::Slack(_) => "slack",
            ActionConfig::Email(_) => "email",
            ActionConfig::Search(_) => "search",
            ActionConfig::Cache(_) => "cache",
        }
    }

    /// Its name: the one given, else its type.
    pub fn name(&self) -> &str {
        let given = match self {
            ActionConfig::Webhook(c) => c.name.as_deref(),
            ActionConfig::Slack(c) => c.name.as_deref(),
            ActionConfig::Email(c) => c.name.as_deref(),
            ActionConfig::Search(c) => c.name.as_deref(),
            ActionConfig::Cache(c) => c.name.as_deref(),
        };
        given.unwrap_or(self.kind())
    }

    /// Its own timeout, if it sets one.
    pub fn timeout(&self) -> Option<Duration> {
        match self {
            ActionConfig::Webhook(c) => c.timeout,
            ActionConfig::Slack(c) => c.timeout,
            ActionConfig::Email(c) => c.timeout,
            ActionConfig::Search(c) => c.timeout,
            ActionConfig::Cache(c) => c.timeout,
        }
    }

    /// Every template it holds: (key, source).
    pub fn templates(&self) -> Vec<(String, &str)> {
        let mut out: Vec<(String, &str)> = Vec::new();
        match self {
            ActionConfig::Webhook(c) => {
                out.push(("url".into(), &c.url));
                out.extend(
                    c.headers
                        .iter()
                        .map(|(k, v)| (format!("headers.{k}"), v.as_str())),
                );
                if let Some(body) = &c.body {
                    out.push(("body".into(), body));
                }
            }
            ActionConfig::Slack(c) => out.push(("text".into(), &c.text)),
            ActionConfig::Email(c) => {
                out.push(("from".into(), &c.from));
                out.extend(
                    c.to.iter()
                        .enumerate()
                        .map(|(i, t)| (format!("to[{i}]"), t.as_str())),
                );
                out.push(("subject".into(), &c.subject));
                out.push(("body".into(), &c.body));
            }
            ActionConfig::Search(_) => {}
            ActionConfig::Cache(c) => {
                out.extend(
                    c.keys
                        .iter()
                        .enumerate()
                        .map(|(i, t)| (format!("keys[{i}]"), t.as_str())),
                );
            }
        }
        out
    }

    /// Checks what serde cannot: returns why not, naming the key.
    pub fn check(&self) -> Result<(), String> {
        let name = self.name();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "name {name:?}: use letters, digits, '-', '_' and '.'"
            ));
        }
        if self.timeout() == Some(Duration::ZERO) {
            return Err("timeout: must be greater than zero".into());
        }
        match self {
            ActionConfig::Webhook(c) => {
                if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&c.method.as_str()) {
                    return Err(format!(
                        "method {:?}: use GET, POST, PUT, PATCH or DELETE",
                        c.method
                    ));
                }
                if c.secret.is_some() && c.secret_env.is_some() {
                    return Err("secret and secret_env: set one, not both".into());
                }
                if let Some(var) = &c.secret_env {
                    std::env::var(var).map_err(|_| {
                        format!("secret_env: environment variable {var} is not set")
                    })?;
                }
                for key in c.headers.keys() {
                    reqwest::header::HeaderName::from_bytes(key.as_bytes())
                        .map_err(|_| format!("headers: {key:?} is not a header name"))?;
                }
            }
            ActionConfig::Slack(c) => check_url("url", &c.url)?,
            ActionConfig::Email(c) => {
                if c.to.is_empty() {
                    return Err("to: at least one recipient".into());
                }
                lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(&c.smtp)
                    .map_err(|e| format!("smtp {:?}: {e}", c.smtp))?;
            }
            ActionConfig::Search(c) => {
                check_url("url", &c.url)?;
                let ok = !c.index.is_empty()
                    && c.index.chars().all(|ch| {
                        ch.is_ascii_lowercase() || ch.is_ascii_digit() || "-_.".contains(ch)
                    })
                    && !c.index.starts_with(['-', '_', '.']);
                if !ok {
                    return Err(format!(
                        "index {:?}: lowercase letters, digits, '-', '_' and '.', not first",
                        c.index
                    ));
                }
                if c.retention.is_some() && c.rollover != Rollover::Daily {
                    return Err("retention: needs rollover = \"daily\"".into());
                }
            }
            ActionConfig::Cache(c) => {
                if c.keys.is_empty() {
                    return Err("keys: at least one key".into());
                }
                if let Some(url) = &c.redis {
                    redis::Client::open(url.as_str()).map_err(|e| format!("redis {url:?}: {e}"))?;
                }
            }
        }
        Ok(())
    }
}

fn check_url(key: &str, url: &str) -> Result<(), String> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        Ok(_) => Err(format!("{key} {url:?}: not http or https")),
        Err(e) => Err(format!("{key} {url:?}: {e}")),
    }
}

/// Compiled templates, by name (`observer/action/key`).
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
    /// Sources with no template syntax: used as they are, without a context.
    fixed: std::collections::HashMap<String, String>,
}

impl Default for Templates {
    fn default() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Nothing is HTML here: never escape.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        Self {
            env,
            fixed: std::collections::HashMap::new(),
        }
    }
}

impl Templates {
    /// Compiles `source` under `name`.
    pub fn add(&mut self, name: String, source: &str) -> Result<(), String> {
        if !["{{", "{%", "{#"].iter().any(|open| source.contains(open)) {
            self.fixed.insert(name, source.to_owned());
            return Ok(());
        }
        self.env
            .add_template_owned(name, source.to_owned())
            .map_err(|e| template_error(&e))
    }

    /// Renders the template `name` over `context`.
    pub fn render(&self, name: &str, context: &minijinja::Value) -> Result<String, String> {
        self.render_with(name, || context.clone())
    }

    /// Renders the template `name`, making its context only if it needs one (a source with
    /// no template syntax does not: an event is not copied for it).
    pub fn render_with(
        &self,
        name: &str,
        context: impl FnOnce() -> minijinja::Value,
    ) -> Result<String, String> {
        if let Some(fixed) = self.fixed.get(name) {
            return Ok(fixed.clone());
        }
        let template = self
            .env
            .get_template(name)
            .map_err(|e| template_error(&e))?;
        template.render(context()).map_err(|e| template_error(&e))
    }
}

fn template_error(e: &minijinja::Error) -> String {
    let mut out = e.to_string();
    if let Some(line) = e.line() {
        out = format!("line {line}: {out}");
    }
    out
}

/// The event an action job carries (its argument).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JobEvent {
    /// The change-log id.
    pub id: i64,
    /// The writing transaction.
    #[serde(default)]
    pub xid: u64,
    /// The table.
    pub entity: String,
    /// The operation.
    pub op: EventType,
    /// The row before.
    pub before: Option<Value>,
    /// The row after.
    pub after: Option<Value>,
    /// When the row changed (ms since the Unix epoch).
    pub changed_at_ms: i64,
}

impl JobEvent {
    /// Decodes a job's arguments: `[event]`.
    pub fn from_args(args: &[u8]) -> Result<Self, String> {
        let (event,): (JobEvent,) =
            serde_json::from_slice(args).map_err(|e| format!("not an observer event: {e}"))?;
        Ok(event)
    }

    /// Its key, unique in the database cluster for good: `<xid>-<id>` (see
    /// [`crate::capture::Event::key`]).
    pub fn key(&self) -> String {
        format!("{}-{}", self.xid, self.id)
    }

    /// `data`: the row after, or for a DELETE the deleted row.
    pub fn data(&self) -> &Value {
        match (&self.after, &self.before) {
            (Some(after), _) => after,
            (None, Some(before)) => before,
            (None, None) => &Value::Null,
        }
    }

    /// When the row changed, as RFC 3339.
    pub fn changed_at(&self) -> String {
        chrono::DateTime::from_timestamp_millis(self.changed_at_ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    /// The event as JSON text: the default webhook body and the indexed document. Written
    /// from the event's own images, without copying them.
    pub fn document(&self, observer: &str) -> String {
        #[derive(serde::Serialize)]
        struct Document<'a> {
            event_id: i64,
            event_key: String,
            observer: &'a str,
            entity: &'a str,
            op: &'static str,
            data: &'a Value,
            before: &'a Option<Value>,
            #[serde(rename = "@timestamp")]
            timestamp: String,
        }
        serde_json::to_string(&Document {
            event_id: self.id,
            event_key: self.key(),
            observer,
            entity: &self.entity,
            op: self.op.as_str(),
            data: self.data(),
            before: &self.before,
            timestamp: self.changed_at(),
        })
        .unwrap_or_default()
    }

    /// What templates see.
    pub fn context(&self, observer: &str, action: &str) -> minijinja::Value {
        minijinja::Value::from_serialize(json!({
            "data": self.data(),
            "before": self.before,
            "op": self.op.as_str(),
            "entity": self.entity,
            "event_id": self.id,
            "event_key": self.key(),
            "changed_at": self.changed_at(),
            "observer": observer,
            "action": action,
        }))
    }
}

/// How one attempt of an action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Done; a short JSON result for the job.
    Done(Value),
    /// Failed; another attempt may succeed (after at least `after`, when the server said).
    Retry {
        /// What went wrong.
        error: String,
        /// The server's `Retry-After`, if any.
        after: Option<Duration>,
    },
    /// Failed for good: to the dead-letter queue.
    GiveUp(String),
    /// Not tried (the endpoint's circuit breaker is open): again after `after`, and it does
    /// not count as an attempt.
    Deferred {
        /// Why not.
        error: String,
        /// When to try again.
        after: Duration,
    },
}

impl Attempt {
    /// A retryable failure.
    pub fn retry(error: impl Into<String>) -> Self {
        Attempt::Retry {
            error: error.into(),
            after: None,
        }
    }
}

/// What an HTTP answer means: 2xx done; 408, 429 and 5xx retried (honouring `Retry-After`);
/// any other status (other 4xx, an unfollowed redirect) given up.
pub fn classify_http(
    status: u16,
    retry_after: Option<&str>,
    now: std::time::SystemTime,
) -> Attempt {
    if (200..300).contains(&status) {
        return Attempt::Done(json!({ "status": status }));
    }
    let error = format!("HTTP {status}");
    if status == 408 || status == 429 || status >= 500 {
        Attempt::Retry {
            error,
            after: retry_after.and_then(|v| parse_retry_after(v, now)),
        }
    } else {
        Attempt::GiveUp(error)
    }
}

/// `Retry-After`: delay-seconds or an HTTP date. At most a day.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(delay.min(Duration::from_secs(86_400)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_as_the_issue_says() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(matches!(classify_http(204, None, now), Attempt::Done(_)));
        for s in [408, 429, 500, 502, 503] {
            assert!(
                matches!(classify_http(s, None, now), Attempt::Retry { .. }),
                "{s}"
            );
        }
        for s in [301, 400, 401, 404, 410, 422] {
            assert!(
                matches!(classify_http(s, None, now), Attempt::GiveUp(_)),
                "{s}"
            );
        }
        assert_eq!(
            classify_http(429, Some("7"), now),
            Attempt::Retry {
                error: "HTTP 429".into(),
                after: Some(Duration::from_secs(7))
            }
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(
            parse_retry_after("99999999", now),
            Some(Duration::from_secs(86_400))
        );
    }

    #[test]
    fn templates_see_the_event_and_refuse_missing_fields() {
        let event = JobEvent {
            id: 7,
            xid: 9,
            entity: "orders".into(),
            op: EventType::Update,
            before: Some(json!({"status": "new"})),
            after: Some(json!({"status": "paid", "email": "a@b.c", "total": 100.5})),
            changed_at_ms: 0,
        };
        let mut t = Templates::default();
        t.add("a".into(), "{{ op }} {{ entity }}#{{ event_id }}: {{ before.status }} -> {{ data.status }} {{ data.total }}")
            .unwrap();
        t.add("b".into(), "{{ data.missing }}").unwrap();
        t.add(
            "c".into(),
            "{{ data.missing | default('none') }} {{ data | tojson }}",
        )
        .unwrap();
        let ctx = event.context("o", "w");
        assert_eq!(
            t.render("a", &ctx).unwrap(),
            "UPDATE orders#7: new -> paid 100.5"
        );
        assert!(t.render("b", &ctx).unwrap_err().contains("undefined"));
        let c = t.render("c", &ctx).unwrap();
        assert!(c.starts_with("none {"), "{c}");
        assert!(
            t.add("d".into(), "{{ data.x ")
                .unwrap_err()
                .contains("line 1")
        );
        assert_eq!(event.changed_at(), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn a_delete_event_s_data_is_the_deleted_row() {
        let event = JobEvent::from_args(
            br#"[{"id":1,"entity":"t","op":"DELETE","before":{"a":1},"after":null,"changed_at_ms":5}]"#,
        )
        .unwrap();
        assert_eq!(event.data(), &json!({"a": 1}));
        assert!(JobEvent::from_args(b"[1]").is_err());
    }
}
