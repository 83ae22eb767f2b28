//! Running one attempt of an action: templates rendered over the event, the request made, what
//! came back classified ([`Attempt`]).
//!
//! - `webhook`: the rendered request, with `Idempotency-Key: <event key>:<observer>:<action>`
//!   (the same on every attempt, so a receiver can drop repeats), `X-Gantry-Event-Id`,
//!   `X-Gantry-Timestamp` (Unix seconds) and, with a secret,
//!   `X-Gantry-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>`.
//! - `slack`: `{"text": …}` to the incoming webhook.
//! - `email`: one message over SMTP; a permanent (5xx) refusal gives up, anything else retries.
//! - `search`: the event as a document with `_id` = the event key (so a repeat overwrites, never
//!   duplicates) through `_bulk`; with daily rollover and a retention, indices past it are
//!   deleted (checked at most once an hour per action).
//! - `cache`: `DEL` of the rendered keys.
//!
//! HTTP actions share one connection pool and one circuit breaker per endpoint
//! (`scheme://host:port`): while an endpoint's breaker is open, its jobs are deferred at once
//! to the end of the open period without counting an attempt (a failed half-open probe too),
//! so a dead endpoint is not hammered, does not hold workers, and does not burn its events'
//! attempts: they wait for it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use gantry_runtime::circuit_breaker::{CircuitBreaker, State};
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

use crate::Error;
use crate::action::{
    ActionConfig, Attempt, CacheConfig, EmailConfig, JobEvent, Rollover, SearchConfig, Templates,
    WebhookConfig, classify_http,
};
use crate::config::ObserverConfig;
use crate::dispatch::job_name;
use crate::metrics::ObserverMetrics;

/// One configured action, ready to run.
struct Prepared {
    observer: String,
    name: String,
    config: ActionConfig,
    timeout: Duration,
    secret: Option<Vec<u8>>,
    smtp: Option<lettre::AsyncSmtpTransport<lettre::Tokio1Executor>>,
    redis_url: Option<String>,
    /// When retention last ran (search actions).
    retention_at: Mutex<Option<Instant>>,
}

/// Runs attempts of every action in a config.
pub struct Runner {
    actions: HashMap<String, Prepared>,
    templates: Templates,
    http: reqwest::Client,
    breaker: CircuitBreaker<String>,
    redis: HashMap<String, RedisServer>,
    /// The server action results are recorded in, and for how long.
    dedup: Option<(String, Duration)>,
    /// Where in Redis the records are.
    redis_prefix: String,
    metrics: ObserverMetrics,
}

/// A Redis server: one multiplexed connection that reconnects by itself, made on first use.
/// While it is down, calls fail fast: after a failure nothing is tried for a second.
struct RedisServer {
    url: String,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    down_until: Mutex<Option<Instant>>,
}

/// How long one Redis call may take before Redis counts as down.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

impl RedisServer {
    fn new(url: String) -> Self {
        Self {
            url,
            conn: tokio::sync::OnceCell::new(),
            down_until: Mutex::new(None),
        }
    }

    /// Runs `cmd`; an error says why (down, refused, timed out).
    async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        limit: Duration,
    ) -> Result<T, String> {
        if let Some(until) = *self.down_until.lock().unwrap_or_else(|e| e.into_inner())
            && Instant::now() < until
        {
            return Err(format!("Redis {} is down", self.url));
        }
        let call = async {
            let conn = self
                .conn
                .get_or_try_init(|| async {
                    let client = redis::Client::open(self.url.as_str())?;
                    redis::aio::ConnectionManager::new(client).await
                })
                .await?;
            cmd.query_async::<T>(&mut conn.clone()).await
        };
        let result = match tokio::time::timeout(limit, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(format!("Redis {}: {e}", self.url)),
            Err(_) => Err(format!("Redis {}: no answer within {limit:?}", self.url)),
        };
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        match (&result, down.is_some()) {
            (Ok(_), true) => {
                tracing::info!(url = %self.url, "Redis answers again");
                *down = None;
            }
            (Err(e), false) => {
                tracing::warn!(url = %self.url, error = %e, "Redis is down; going on without it");
                *down = Some(Instant::now() + Duration::from_secs(1));
            }
            (Err(_), true) => *down = Some(Instant::now() + Duration::from_secs(1)),
            (Ok(_), false) => {}
        }
        result
    }
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("actions", &self.actions.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// Prepares every action of `config` (which loading checked).
    pub fn new(config: &ObserverConfig, metrics: ObserverMetrics) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        let policy = config
            .circuit_breaker
            .validate()
            .map_err(|e| Error::Config(format!("circuit_breaker: {e}")))?;
        let gauge = metrics.breaker_state.clone();
        let breaker =
            CircuitBreaker::with_transition_hook(policy, move |endpoint: &String, _from, to| {
                let value = match to {
                    State::Closed => 0,
                    State::HalfOpen => 1,
                    State::Open => 2,
                };
                gauge.with_label_values(&[endpoint.as_str()]).set(value);
                tracing::info!(%endpoint, state = to.as_str(), "circuit breaker");
            });
        let mut templates = Templates::default();
        let mut actions = HashMap::new();
        let mut redis = HashMap::new();
        for o in &config.observers {
            for a in &o.actions {
                let at = |e: String| {
                    Error::Config(format!("observer {:?}: action {:?}: {e}", o.name, a.name()))
                };
                for (key, source) in a.templates() {
                    templates
                        .add(template_name(&o.name, a.name(), &key), source)
                        .map_err(at)?;
                }
                let timeout = a.timeout().unwrap_or(o.timeout);
                let secret = match a {
                    ActionConfig::Webhook(w) => match (&w.secret, &w.secret_env) {
                        (Some(s), _) => Some(s.as_bytes().to_vec()),
                        (None, Some(var)) => Some(
                            std::env::var(var)
                                .map_err(|_| at(format!("secret_env: {var} is not set")))?
                                .into_bytes(),
                        ),
                        (None, None) => None,
                    },
                    _ => None,
                };
                let smtp = match a {
                    ActionConfig::Email(e) => Some(
                        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(&e.smtp)
                            .map_err(|err| at(format!("smtp: {err}")))?
                            .timeout(Some(timeout))
                            .build(),
                    ),
                    _ => None,
                };
                let redis_url = match a {
                    ActionConfig::Cache(c) => c.redis.clone().or_else(|| config.redis.url.clone()),
                    _ => None,
                };
                if let Some(url) = &redis_url {
                    redis
                        .entry(url.clone())
                        .or_insert_with(|| RedisServer::new(url.clone()));
                }
                actions.insert(
                    job_name(&o.name, a.name()),
                    Prepared {
                        observer: o.name.clone(),
                        name: a.name().to_owned(),
                        config: a.clone(),
                        timeout,
                        secret,
                        smtp,
                        redis_url,
                        retention_at: Mutex::new(None),
                    },
                );
            }
        }
        let dedup = match (&config.redis.url, config.redis.dedup) {
            (Some(url), true) => {
                redis
                    .entry(url.clone())
                    .or_insert_with(|| RedisServer::new(url.clone()));
                Some((url.clone(), config.redis.dedup_ttl))
            }
            _ => None,
        };
        Ok(Self {
            actions,
            templates,
            http,
            breaker,
            redis,
            dedup,
            redis_prefix: config.redis.prefix.clone(),
            metrics,
        })
    }

    /// The job names this runner handles, sorted.
    pub fn job_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.actions.keys().cloned().collect();
        names.sort();
        names
    }

    /// The circuit breakers' states, by endpoint.
    pub fn breakers(&self) -> Vec<(String, State)> {
        self.breaker.snapshot()
    }

    /// Whether the worker should hand this action's jobs over together ([`Runner::run_many`]):
    /// `search` actions, whose events go out in one `_bulk` request.
    pub fn batches(&self, job_name: &str) -> bool {
        self.actions
            .get(job_name)
            .is_some_and(|p| matches!(p.config, ActionConfig::Search(_)))
    }

    /// Runs one attempt of `job_name` on the event in `args`, within the action's timeout.
    ///
    /// With `[redis] url` set (and `dedup` on), a delivered action's result is recorded in
    /// Redis under `<prefix>:done:<job name>:<event key>` (`SET NX` with the TTL), and an
    /// attempt first looks it up: found, the action was delivered already — by this process or
    /// another, before an ack was lost — and it is not repeated. Redis down, the attempt goes
    /// on without the lookup: the jobs store (a SUCCESS job is never run again) is the ledger.
    pub async fn run(&self, job_name: &str, args: &[u8]) -> Attempt {
        self.run_many(job_name, &[args])
            .await
            .pop()
            .unwrap_or_else(|| Attempt::retry("no outcome"))
    }

    /// Runs one attempt of `job_name` for each event in `args` — for a `search` action, one
    /// `_bulk` request for all of them — and returns each one's outcome, in order.
    pub async fn run_many(&self, job_name: &str, args: &[&[u8]]) -> Vec<Attempt> {
        let Some(p) = self.actions.get(job_name) else {
            let why = format!("{job_name}: no such action in the config");
            return args.iter().map(|_| Attempt::GiveUp(why.clone())).collect();
        };
        let mut out: Vec<Option<Attempt>> = vec![None; args.len()];
        let mut events: Vec<(usize, JobEvent)> = Vec::with_capacity(args.len());
        for (i, a) in args.iter().enumerate() {
            match JobEvent::from_args(a) {
                Ok(e) => events.push((i, e)),
                Err(e) => out[i] = Some(Attempt::GiveUp(e)),
            }
        }
        let record = self
            .dedup
            .as_ref()
            .and_then(|(url, ttl)| Some((self.redis.get(url)?, *ttl)));
        let key = |e: &JobEvent| format!("{}:done:{job_name}:{}", self.redis_prefix, e.key());
        if let Some((redis, _)) = record
            && !events.is_empty()
        {
            let mut mget = redis::cmd("MGET");
            for (_, e) in &events {
                mget.arg(key(e));
            }
            match redis
                .query::<Vec<Option<String>>>(&mget, REDIS_TIMEOUT)
                .await
            {
                Ok(found) => {
                    self.metrics.redis_up.set(1);
                    let mut left = Vec::with_capacity(events.len());
                    for ((i, e), recorded) in events.into_iter().zip(found) {
                        match recorded {
                            Some(recorded) => {
                                self.metrics.dedup.with_label_values(&["hit"]).inc();
                                let result = serde_json::from_str(&recorded).unwrap_or(Value::Null);
                                out[i] = Some(Attempt::Done(
                                    json!({ "deduplicated": true, "result": result }),
                                ));
                            }
                            None => {
                                self.metrics.dedup.with_label_values(&["miss"]).inc();
                                left.push((i, e));
                            }
                        }
                    }
                    events = left;
                }
                Err(_) => self.metrics.redis_up.set(0),
            }
        }
        let started = Instant::now();
        // Each call bounds itself by the action's timeout (so a timeout is reported, to the
        // breaker too); this is the backstop.
        let backstop = p.timeout + Duration::from_secs(1);
        let only: Vec<JobEvent> = events.iter().map(|(_, e)| e.clone()).collect();
        let attempts = tokio::time::timeout(backstop, async {
            match &p.config {
                ActionConfig::Search(s) => self.search(p, s, &only).await,
                _ => {
                    let mut attempts = Vec::with_capacity(only.len());
                    for e in &only {
                        attempts.push(self.attempt(p, e).await);
                    }
                    attempts
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            let why = format!("timed out after {}", humantime::format_duration(p.timeout));
            only.iter().map(|_| Attempt::retry(why.clone())).collect()
        });
        let labels = [p.observer.as_str(), p.name.as_str()];
        let elapsed = started.elapsed().as_secs_f64();
        let now_ms = gantry_jobs::model::now_millis();
        for ((i, event), attempt) in events.iter().zip(attempts) {
            self.metrics
                .action_seconds
                .with_label_values(&labels)
                .observe(elapsed);
            let outcome = match &attempt {
                Attempt::Done(result) => {
                    #[allow(clippy::cast_precision_loss)]
                    self.metrics
                        .delivery_seconds
                        .observe((now_ms - event.changed_at_ms).max(0) as f64 / 1000.0);
                    if let Some((redis, ttl)) = record {
                        let set = redis
                            .query::<Option<String>>(
                                redis::cmd("SET")
                                    .arg(key(event))
                                    .arg(result.to_string())
                                    .arg("NX")
                                    .arg("EX")
                                    .arg(ttl.as_secs().max(1)),
                                REDIS_TIMEOUT,
                            )
                            .await;
                        self.metrics.redis_up.set(i64::from(set.is_ok()));
                    }
                    "delivered"
                }
                Attempt::Retry { .. } => "failed",
                Attempt::GiveUp(_) => "dead_lettered",
                Attempt::Deferred { .. } => "deferred",
            };
            self.metrics
                .actions
                .with_label_values(&[labels[0], labels[1], outcome])
                .inc();
            out[*i] = Some(attempt);
        }
        out.into_iter()
            .map(|a| a.unwrap_or_else(|| Attempt::retry("no outcome")))
            .collect()
    }

    async fn attempt(&self, p: &Prepared, event: &JobEvent) -> Attempt {
        // Made once, and only if a template needs it: it copies the event.
        let context = std::sync::OnceLock::new();
        let render = |key: &str| {
            self.templates
                .render_with(&template_name(&p.observer, &p.name, key), || {
                    context
                        .get_or_init(|| event.context(&p.observer, &p.name))
                        .clone()
                })
                .map_err(|e| Attempt::GiveUp(format!("template {key}: {e}")))
        };
        let result = match &p.config {
            ActionConfig::Webhook(w) => self.webhook(p, w, event, render).await,
            ActionConfig::Slack(s) => match render("text") {
                Ok(text) => {
                    let body = json!({ "text": text }).to_string();
                    self.http_call(&s.url, reqwest::Method::POST, Vec::new(), body, p.timeout)
                        .await
                        .map(|(attempt, _)| attempt)
                }
                Err(a) => Err(a),
            },
            ActionConfig::Email(e) => self.email(p, e, render).await,
            ActionConfig::Search(s) => Ok(self
                .search(p, s, std::slice::from_ref(event))
                .await
                .pop()
                .unwrap_or_else(|| Attempt::retry("no outcome"))),
            ActionConfig::Cache(c) => self.cache(p, c, render).await,
        };
        result.unwrap_or_else(|a| a)
    }

    async fn webhook(
        &self,
        p: &Prepared,
        w: &WebhookConfig,
        event: &JobEvent,
        render: impl Fn(&str) -> Result<String, Attempt>,
    ) -> Result<Attempt, Attempt> {
        let url = render("url")?;
        let body = match &w.body {
            Some(_) => render("body")?,
            None => event.document(&p.observer),
        };
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut headers = vec![
            (
                "idempotency-key".to_owned(),
                format!("{}:{}:{}", event.key(), p.observer, p.name),
            ),
            ("x-gantry-event-id".to_owned(), event.id.to_string()),
            ("x-gantry-timestamp".to_owned(), timestamp.to_string()),
        ];
        if let Some(secret) = &p.secret {
            headers.push((
                "x-gantry-signature".to_owned(),
                format!("v1={}", sign(secret, timestamp, body.as_bytes())),
            ));
        }
        for key in w.headers.keys() {
            headers.push((key.to_ascii_lowercase(), render(&format!("headers.{key}"))?));
        }
        let method = reqwest::Method::from_bytes(w.method.as_bytes())
            .map_err(|_| Attempt::GiveUp(format!("method {:?}", w.method)))?;
        self.http_call(&url, method, headers, body, p.timeout)
            .await
            .map(|(attempt, _)| attempt)
    }

    /// One HTTP request through the endpoint's breaker, answered within `timeout` (a timeout
    /// counts against the endpoint); on success, also the answer's body.
    async fn http_call(
        &self,
        url: &str,
        method: reqwest::Method,
        headers: Vec<(String, String)>,
        body: String,
        timeout: Duration,
    ) -> Result<(Attempt, Vec<u8>), Attempt> {
        let parsed =
            reqwest::Url::parse(url).map_err(|e| Attempt::GiveUp(format!("url {url:?}: {e}")))?;
        let endpoint = format!(
            "{}://{}:{}",
            parsed.scheme(),
            parsed.host_str().unwrap_or_default(),
            parsed.port_or_known_default().unwrap_or_default()
        );
        let permit = self
            .breaker
            .acquire(&endpoint)
            .map_err(|r| Attempt::Deferred {
                error: format!("{endpoint}: {r}"),
                after: r.retry_after,
            })?;
        let mut request = self.http.request(method, parsed).timeout(timeout);
        let has_type = headers.iter().any(|(k, _)| k == "content-type");
        for (k, v) in headers {
            request = request.header(k, v);
        }
        if !has_type {
            request = request.header("content-type", "application/json");
        }
        let (attempt, answer) = match request.body(body).send().await {
            Ok(response) => {
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let status = response.status().as_u16();
                // Reading the answer to its end lets the connection be reused.
                match response.bytes().await {
                    Ok(answer) => (
                        classify_http(status, retry_after.as_deref(), SystemTime::now()),
                        answer.to_vec(),
                    ),
                    Err(e) => (
                        Attempt::retry(format!(
                            "{endpoint}: reading the answer: {}",
                            error_chain(&e)
                        )),
                        Vec::new(),
                    ),
                }
            }
            Err(e) if e.is_timeout() => (
                Attempt::retry(format!(
                    "timed out after {}",
                    humantime::format_duration(timeout)
                )),
                Vec::new(),
            ),
            Err(e) => (
                Attempt::retry(format!("{endpoint}: {}", error_chain(&e))),
                Vec::new(),
            ),
        };
        // A refusal (4xx) means the endpoint is up: only what may pass with time counts
        // against it. A failed half-open probe says the endpoint is still down, not that this
        // event is at fault: it is deferred like the calls the open breaker refuses.
        let attempt = match attempt {
            Attempt::Retry { error, after } => {
                let probe = permit.is_probe();
                permit.failure();
                if probe {
                    Attempt::Deferred {
                        error: format!("{error} (probe of an open circuit)"),
                        after: after.unwrap_or(self.breaker.policy().open_duration()),
                    }
                } else {
                    Attempt::Retry { error, after }
                }
            }
            other => {
                permit.success();
                other
            }
        };
        Ok((attempt, answer))
    }

    async fn email(
        &self,
        p: &Prepared,
        e: &EmailConfig,
        render: impl Fn(&str) -> Result<String, Attempt>,
    ) -> Result<Attempt, Attempt> {
        use lettre::AsyncTransport;
        let address = |key: &str| -> Result<lettre::message::Mailbox, Attempt> {
            let text = render(key)?;
            text.parse()
                .map_err(|err| Attempt::GiveUp(format!("{key} {text:?}: {err}")))
        };
        let mut message = lettre::Message::builder()
            .from(address("from")?)
            .subject(render("subject")?)
            .header(lettre::message::header::ContentType::TEXT_PLAIN);
        for i in 0..e.to.len() {
            message = message.to(address(&format!("to[{i}]"))?);
        }
        let message = message
            .body(render("body")?)
            .map_err(|err| Attempt::GiveUp(format!("message: {err}")))?;
        let Some(smtp) = &p.smtp else {
            return Err(Attempt::GiveUp("no SMTP transport".into()));
        };
        Ok(match smtp.send(message).await {
            Ok(response) => Attempt::Done(json!({ "smtp": response.code().to_string() })),
            Err(err) if err.is_permanent() => {
                Attempt::GiveUp(format!("SMTP refused: {}", error_chain(&err)))
            }
            Err(err) => Attempt::retry(format!("SMTP: {}", error_chain(&err))),
        })
    }

    /// Indexes `events` in one `_bulk` request; each gets its item's outcome.
    async fn search(&self, p: &Prepared, s: &SearchConfig, events: &[JobEvent]) -> Vec<Attempt> {
        if events.is_empty() {
            return Vec::new();
        }
        let mut body = String::new();
        let mut indices = Vec::with_capacity(events.len());
        for event in events {
            let index = index_name(s, event.changed_at_ms);
            body.push_str(&json!({ "index": { "_index": index, "_id": event.key() } }).to_string());
            body.push('\n');
            body.push_str(&event.document(&p.observer));
            body.push('\n');
            indices.push(index);
        }
        let url = format!("{}/_bulk", s.url.trim_end_matches('/'));
        let headers = vec![("content-type".to_owned(), "application/x-ndjson".to_owned())];
        let (attempt, answer) = match self
            .http_call(&url, reqwest::Method::POST, headers, body, p.timeout)
            .await
        {
            Ok(done) => done,
            Err(refused) => return events.iter().map(|_| refused.clone()).collect(),
        };
        if !matches!(attempt, Attempt::Done(_)) {
            return events.iter().map(|_| attempt.clone()).collect();
        }
        let answers = bulk_items(&answer, &indices);
        if let (true, Some(retention)) = (
            answers.iter().any(|a| matches!(a, Attempt::Done(_))),
            s.retention,
        ) {
            let due = {
                let mut at = p.retention_at.lock().unwrap_or_else(|e| e.into_inner());
                let due = at.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600));
                if due {
                    *at = Some(Instant::now());
                }
                due
            };
            if due && let Err(e) = self.apply_retention(s, retention).await {
                tracing::warn!(action = %p.name, error = %e, "search retention failed");
            }
        }
        answers
    }

    async fn apply_retention(&self, s: &SearchConfig, retention: Duration) -> Result<u64, String> {
        let base = s.url.trim_end_matches('/');
        let listed: Vec<Value> = self
            .http
            .get(format!(
                "{base}/_cat/indices/{}-*?format=json&h=index",
                s.index
            ))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| error_chain(&e))?
            .json()
            .await
            .map_err(|e| error_chain(&e))?;
        let now: chrono::DateTime<chrono::Utc> = SystemTime::now().into();
        let keep = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let Some(cutoff) = now.checked_sub_signed(keep) else {
            // A retention longer than recorded time: nothing is past it.
            return Ok(0);
        };
        let mut deleted = 0;
        for name in listed.iter().filter_map(|v| v.get("index")?.as_str()) {
            let Some(day) = name
                .strip_prefix(&s.index)
                .and_then(|rest| rest.strip_prefix('-'))
                .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y.%m.%d").ok())
            else {
                continue;
            };
            // The index holds that whole day: it is past retention when the day's end is.
            let end = day.and_hms_opt(23, 59, 59).unwrap_or_default().and_utc();
            if end < cutoff {
                self.http
                    .delete(format!("{base}/{name}"))
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(|e| error_chain(&e))?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    async fn cache(
        &self,
        p: &Prepared,
        c: &CacheConfig,
        render: impl Fn(&str) -> Result<String, Attempt>,
    ) -> Result<Attempt, Attempt> {
        let keys = (0..c.keys.len())
            .map(|i| render(&format!("keys[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let url = p.redis_url.as_deref().unwrap_or_default();
        let Some(server) = self.redis.get(url) else {
            return Err(Attempt::GiveUp("no Redis server configured".into()));
        };
        let deleted: u64 = server
            .query(redis::cmd("DEL").arg(&keys), p.timeout)
            .await
            .map_err(Attempt::retry)?;
        Ok(Attempt::Done(json!({ "deleted": deleted, "keys": keys })))
    }
}

/// What a `_bulk` answer says about each of its items (sent to `indices`): `_bulk` answers 200
/// whatever became of the items, each with its own status (and `error`).
pub fn bulk_items(answer: &[u8], indices: &[String]) -> Vec<Attempt> {
    let Ok(answer) = serde_json::from_slice::<Value>(answer) else {
        return indices
            .iter()
            .map(|_| Attempt::retry("_bulk: the answer is not JSON"))
            .collect();
    };
    indices
        .iter()
        .enumerate()
        .map(|(i, index)| bulk_item(&answer, i, index))
        .collect()
}

fn bulk_item(answer: &Value, i: usize, index: &str) -> Attempt {
    let Some(item) = answer
        .get("items")
        .and_then(|items| items.get(i))
        .and_then(|item| item.get("index"))
    else {
        return Attempt::retry(format!("_bulk: the answer has no item {i}"));
    };
    let status = item
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .unwrap_or(500);
    match classify_http(status, None, SystemTime::now()) {
        Attempt::Done(_) => Attempt::Done(json!({
            "index": index,
            "result": item.get("result"),
        })),
        Attempt::Retry { error, after } => Attempt::Retry {
            error: format!("_bulk item: {error}: {}", item_error(item)),
            after,
        },
        Attempt::GiveUp(error) => {
            Attempt::GiveUp(format!("_bulk item: {error}: {}", item_error(item)))
        }
        deferred @ Attempt::Deferred { .. } => deferred,
    }
}

fn item_error(item: &Value) -> String {
    let error = item.get("error");
    let kind = error
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("error");
    let reason = error
        .and_then(|e| e.get("reason"))
        .and_then(Value::as_str)
        .unwrap_or("no reason given");
    format!("{kind}: {reason}")
}

fn template_name(observer: &str, action: &str, key: &str) -> String {
    format!("{observer}/{action}/{key}")
}

/// The index an event goes to.
pub fn index_name(s: &SearchConfig, changed_at_ms: i64) -> String {
    match s.rollover {
        Rollover::None => s.index.clone(),
        Rollover::Daily => {
            let day = chrono::DateTime::from_timestamp_millis(changed_at_ms).unwrap_or_default();
            format!("{}-{}", s.index, day.format("%Y.%m.%d"))
        }
    }
}

/// `hex(HMAC-SHA256(secret, "<timestamp>.<body>"))`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Computed elsewhere: Python's
        // hmac.new(b"Jefe", b"0.what do ya want for nothing?", hashlib.sha256).hexdigest()
        assert_eq!(
            sign(b"Jefe", 0, b"what do ya want for nothing?"),
            "37f471929915ccd2cbbe79feb84ffcff4f2bb25e15fc41c2506687331ae179cc"
        );
        assert_ne!(
            sign(b"Jefe", 0, b"what do ya want for nothing?"),
            sign(b"Jefe", 1, b"what do ya want for nothing?")
        );
    }

    #[test]
    fn bulk_items_are_read_one_by_one() {
        let one = |answer: &[u8]| bulk_items(answer, &["i".to_owned()]).remove(0);
        let ok = br#"{"took":1,"errors":false,"items":[{"index":{"_index":"i","_id":"1","status":201,"result":"created"}}]}"#;
        assert!(matches!(one(ok), Attempt::Done(_)));
        let bad = br#"{"errors":true,"items":[{"index":{"status":400,"error":{"type":"mapper_parsing_exception","reason":"failed to parse field [total]"}}}]}"#;
        assert_eq!(
            one(bad),
            Attempt::GiveUp(
                "_bulk item: HTTP 400: mapper_parsing_exception: failed to parse field [total]"
                    .into()
            )
        );
        let busy = br#"{"errors":true,"items":[{"index":{"status":429,"error":{"type":"es_rejected_execution_exception","reason":"queue full"}}}]}"#;
        assert!(matches!(one(busy), Attempt::Retry { .. }));
        assert!(matches!(one(b"<html>"), Attempt::Retry { .. }));
        // Items of one request, each with its own outcome; a missing one is retried.
        let mixed = br#"{"errors":true,"items":[{"index":{"status":201}},{"index":{"status":400,"error":{"type":"x","reason":"y"}}}]}"#;
        let three = bulk_items(mixed, &["a".into(), "b".into(), "c".into()]);
        assert!(matches!(three[0], Attempt::Done(_)));
        assert!(matches!(three[1], Attempt::GiveUp(_)));
        assert!(matches!(three[2], Attempt::Retry { .. }));
    }

    #[test]
    fn daily_indices_are_named_by_the_event_s_utc_day() {
        let s = SearchConfig {
            name: None,
            url: "http://x".into(),
            index: "orders".into(),
            rollover: Rollover::Daily,
            retention: None,
            timeout: None,
        };
        assert_eq!(index_name(&s, 86_400_000 * 365), "orders-1971.01.01");
        let none = SearchConfig {
            rollover: Rollover::None,
            ..s
        };
        assert_eq!(index_name(&none, 0), "orders");
    }
}
