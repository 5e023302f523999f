//! The Prefect REST client: one method per endpoint the worker uses.
//!
//! Knows HTTP (reqwest) and Prefect's conventions (headers, auth, CSRF, retries with
//! `Retry-After`), nothing of Docker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use url::Url;

use super::models::{
    Deployment, Flow, FlowRun, OrchestrationResult, State, StateProposal, WorkPool, WorkerStatus,
};
use crate::backoff::Backoff;

/// The API version this client speaks (sent as `X-PREFECT-API-VERSION`).
pub const API_VERSION: &str = "0.8.4";

/// Statuses retried as the Python client does.
const RETRY_STATUSES: [u16; 4] = [408, 429, 502, 503];

/// How the client talks to the API.
#[derive(Clone)]
pub struct ClientConfig {
    /// `PREFECT_API_URL`, e.g. `http://127.0.0.1:4200/api`.
    pub api_url: Url,
    /// `PREFECT_API_KEY` (sent as a bearer token).
    pub api_key: Option<String>,
    /// `PREFECT_API_AUTH_STRING` (basic auth; wins over the key).
    pub auth_string: Option<String>,
    /// Per-request timeout (`PREFECT_API_REQUEST_TIMEOUT`).
    pub timeout: Duration,
    /// Retries for retryable failures (`PREFECT_CLIENT_MAX_RETRIES`).
    pub max_retries: u32,
    /// Sent as `X-Prefect-Worker-Name` for attribution.
    pub worker_name: Option<String>,
    /// Whether to use CSRF tokens on self-hosted servers.
    pub csrf_enabled: bool,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("api_url", &crate::redact::url(self.api_url.as_str()))
            .field("api_key", &self.api_key.as_ref().map(|_| "********"))
            .field(
                "auth_string",
                &self.auth_string.as_ref().map(|_| "********"),
            )
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .finish()
    }
}

/// What went wrong talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No HTTP response (connection refused, timeout, TLS, …).
    #[error("could not reach the Prefect API ({method} {path}): {source}")]
    Transport {
        /// HTTP method.
        method: Method,
        /// Path below the API URL.
        path: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The API answered with an error status.
    #[error("Prefect API answered {status} to {method} {path}: {body}")]
    Status {
        /// HTTP method.
        method: Method,
        /// Path below the API URL.
        path: String,
        /// HTTP status.
        status: u16,
        /// Response body (truncated).
        body: String,
    },
    /// The response was not the JSON we expected.
    #[error("unexpected response from the Prefect API ({path}): {message}")]
    Decode {
        /// Path below the API URL.
        path: String,
        /// What did not parse.
        message: String,
    },
    /// The client could not be built (bad URL or header value).
    #[error("invalid Prefect client configuration: {0}")]
    Config(String),
}

impl ApiError {
    /// The HTTP status, when the API answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth trying again later: no answer, or a server-side error.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Status { status, .. } => *status >= 500 || RETRY_STATUSES.contains(status),
            Self::Decode { .. } | Self::Config(_) => false,
        }
    }

    /// 401 or 403: the worker's credentials are wrong; retrying will not help.
    pub fn is_auth(&self) -> bool {
        matches!(self.status(), Some(401 | 403))
    }

    /// 404.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// A 404 for the route itself (`{"detail":"Not Found"}`), not for a missing object: the
    /// server does not have this endpoint (an older Prefect).
    pub fn is_missing_endpoint(&self) -> bool {
        matches!(self, Self::Status { status: 404, body, .. }
            if body.replace(' ', "").contains(r#"{"detail":"NotFound"}"#))
    }
}

#[derive(Default)]
struct Csrf {
    disabled: bool,
    token: Option<String>,
    expires: Option<chrono::DateTime<chrono::Utc>>,
}

/// A Prefect API client. Cheap to share behind an `Arc`.
pub struct PrefectClient {
    http: reqwest::Client,
    base: Url,
    max_retries: u32,
    csrf_client_id: String,
    csrf: Mutex<Csrf>,
    /// Connection-refused is retried only once the server has answered at least once.
    had_success: AtomicBool,
}

fn header(name: &'static str, value: &str) -> Result<(HeaderName, HeaderValue), ApiError> {
    let value = HeaderValue::from_str(value.trim_matches([' ', '\t']))
        .map_err(|_| ApiError::Config(format!("invalid value for header {name}")))?;
    Ok((HeaderName::from_static(name), value))
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// `Retry-After` in seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return Some(Duration::from_secs_f64(seconds.clamp(0.0, 3600.0)));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or_default())
}

fn jittered(base: Duration, factor: f64) -> Duration {
    let spread = rand::random::<f64>() * factor;
    base.mul_f64(1.0 + spread)
}

/// The first wait of the request retry schedule: before any retry was counted (a maintenance
/// answer is retried without counting)…
const RETRY_MIN: Duration = Duration::from_secs(1);
/// … doubled per counted retry up to this (2^6 s).
const RETRY_MAX: Duration = Duration::from_secs(64);
/// The jitter on top of each wait: the Python client's `PREFECT_CLIENT_RETRY_JITTER_FACTOR`.
const RETRY_JITTER: f64 = 0.2;

/// The waits between the attempts of one request: 2^n s after the n-th counted retry (1 s
/// while none is counted), capped at 64 s, plus up to 20 % jitter. A server's `Retry-After`
/// replaces the schedule's delay (and is jittered the same way).
///
/// There is no shutdown token here: the client has none. A request, retry waits included,
/// lasts as long as its caller awaits it; the worker's poll and sync loops are dropped at
/// shutdown, which ends a wait mid-way, and the reports a run makes as it ends are meant to
/// finish.
struct RetryDelays {
    schedule: Backoff,
    /// The schedule's delay for the retries counted so far.
    current: Duration,
}

impl RetryDelays {
    fn new() -> Self {
        let mut schedule = Backoff::new(RETRY_MIN, RETRY_MAX);
        let current = schedule.next_delay();
        Self { schedule, current }
    }

    /// Moves on to the next delay: one more retry counts against `max_retries`.
    fn count_retry(&mut self) {
        self.current = self.schedule.next_delay();
    }

    /// The wait before the next attempt: the server's `Retry-After` when it sent one, else the
    /// schedule's delay; jittered.
    fn delay(&self, retry_after: Option<Duration>) -> Duration {
        jittered(retry_after.unwrap_or(self.current), RETRY_JITTER)
    }
}

impl PrefectClient {
    /// Builds a client.
    ///
    /// # Errors
    /// [`ApiError::Config`] for header values that cannot be sent.
    pub fn new(config: &ClientConfig) -> Result<Self, ApiError> {
        let mut headers = HeaderMap::new();
        let mut add = |(name, value): (HeaderName, HeaderValue)| {
            headers.insert(name, value);
        };
        add(header("x-prefect-api-version", API_VERSION)?);
        if let Some(auth) = config.auth_string.as_deref().filter(|s| !s.is_empty()) {
            let encoded = base64::engine::general_purpose::STANDARD.encode(auth);
            let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
                .map_err(|_| ApiError::Config("invalid PREFECT_API_AUTH_STRING".into()))?;
            value.set_sensitive(true);
            add((reqwest::header::AUTHORIZATION, value));
        } else if let Some(key) = config.api_key.as_deref().filter(|s| !s.is_empty()) {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| ApiError::Config("invalid PREFECT_API_KEY".into()))?;
            value.set_sensitive(true);
            add((reqwest::header::AUTHORIZATION, value));
        }
        if let Some(name) = config
            .worker_name
            .as_deref()
            .filter(|s| !s.trim().is_empty())
        {
            add(header("x-prefect-worker-name", name)?);
        }
        let mut builder = reqwest::Client::builder();
        if config.api_url.scheme() == "http" {
            // Plain HTTP never needs a root certificate: skip loading the system's store
            // (about 150 files), which is most of the worker's start-up time.
            builder = builder.tls_certs_only(Vec::new());
        }
        let http = builder
            // The server reads `prefect/<version> (API <version>)` to decide orchestration rules
            // for the client; we present as the Prefect release whose behaviour we implement.
            .user_agent(format!(
                "prefect/{} (API {API_VERSION})",
                crate::job::PREFECT_VERSION
            ))
            .default_headers(headers)
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .pool_max_idle_per_host(16)
            .pool_idle_timeout(Duration::from_secs(25))
            .build()
            .map_err(|e| ApiError::Config(format!("{e} ({})", error_chain(&e))))?;
        let mut base = config.api_url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let is_cloud = base.as_str().starts_with("https://api.prefect.cloud/");
        Ok(Self {
            http,
            base,
            max_retries: config.max_retries,
            csrf_client_id: uuid::Uuid::new_v4().to_string(),
            csrf: Mutex::new(Csrf {
                disabled: is_cloud || !config.csrf_enabled,
                ..Csrf::default()
            }),
            had_success: AtomicBool::new(false),
        })
    }

    fn url(&self, path: &str) -> Result<Url, ApiError> {
        self.base
            .join(path.trim_start_matches('/'))
            .map_err(|e| ApiError::Config(format!("bad path {path}: {e}")))
    }

    /// Fetches the CSRF token (or learns the server has CSRF off) ahead of the first state
    /// change, so start-up can overlap it with other round trips. Failures are left for the
    /// first mutating request to meet and report.
    pub async fn prefetch_csrf_token(&self) {
        if let Err(e) = self.csrf_token().await {
            tracing::debug!(error = %e, "could not prefetch the CSRF token");
        }
    }

    async fn csrf_token(&self) -> Result<Option<String>, ApiError> {
        let mut csrf = self.csrf.lock().await;
        if csrf.disabled {
            return Ok(None);
        }
        let fresh = csrf
            .expires
            .is_some_and(|e| e > chrono::Utc::now() + chrono::Duration::seconds(5));
        if let (Some(token), true) = (&csrf.token, fresh) {
            return Ok(Some(token.clone()));
        }
        let path = "csrf-token";
        let url = self.url(path)?;
        let resp = self
            .http
            .get(url)
            .query(&[("client", &self.csrf_client_id)])
            .send()
            .await
            .map_err(|source| ApiError::Transport {
                method: Method::GET,
                path: path.into(),
                source,
            })?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if status == StatusCode::NOT_FOUND
            || (status == StatusCode::UNPROCESSABLE_ENTITY
                && body.contains("CSRF protection is disabled"))
        {
            csrf.disabled = true;
            return Ok(None);
        }
        if !status.is_success() {
            return Err(ApiError::Status {
                method: Method::GET,
                path: path.into(),
                status: status.as_u16(),
                body: truncate(&body, 500),
            });
        }
        let parsed: Value = serde_json::from_str(&body).map_err(|e| ApiError::Decode {
            path: path.into(),
            message: e.to_string(),
        })?;
        csrf.token = parsed
            .get("token")
            .and_then(Value::as_str)
            .map(str::to_owned);
        csrf.expires = parsed
            .get("expiration")
            .and_then(Value::as_str)
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|d| d.with_timezone(&chrono::Utc));
        Ok(csrf.token.clone())
    }

    /// Sends one request with Prefect's retry policy; returns status and body of the final answer.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        self.request_with_headers(method, path, body)
            .await
            .map(|(status, _, bytes)| (status, bytes))
    }

    /// [`Self::request`] with the final answer's headers, for a caller that paces itself by
    /// them (`Retry-After`).
    async fn request_with_headers(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, HeaderMap, Vec<u8>), ApiError> {
        let url = self.url(path)?;
        let mutating = method != Method::GET;
        let mut csrf_retried = false;
        let mut attempt: u32 = 0;
        let mut delays = RetryDelays::new();
        loop {
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(body) = body {
                req = req.json(body);
            }
            if mutating && let Some(token) = self.csrf_token().await? {
                req = req
                    .header("Prefect-Csrf-Token", token)
                    .header("Prefect-Csrf-Client", &self.csrf_client_id);
            }
            match req.send().await {
                Ok(resp) => {
                    self.had_success.store(true, Ordering::Relaxed);
                    let status = resp.status().as_u16();
                    let headers = resp.headers().clone();
                    let bytes = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                    if status == 403
                        && !csrf_retried
                        && String::from_utf8_lossy(&bytes).contains("Invalid CSRF token")
                    {
                        csrf_retried = true;
                        *self.csrf.lock().await = Csrf::default();
                        continue;
                    }
                    if RETRY_STATUSES.contains(&status) {
                        let maintenance = headers
                            .get("prefect-maintenance")
                            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
                        if maintenance || attempt < self.max_retries {
                            if !maintenance {
                                attempt += 1;
                                delays.count_retry();
                            }
                            let delay = delays.delay(retry_after(&headers));
                            tracing::debug!(
                                path,
                                status,
                                delay_ms = delay.as_millis() as u64,
                                "retrying Prefect API request"
                            );
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                    }
                    return Ok((status, headers, bytes));
                }
                Err(source) => {
                    let retryable = source.is_timeout()
                        || (source.is_connect() && self.had_success.load(Ordering::Relaxed))
                        || (source.is_request() && !source.is_connect() && !source.is_builder());
                    if retryable && attempt < self.max_retries {
                        attempt += 1;
                        delays.count_retry();
                        let delay = delays.delay(None);
                        tracing::debug!(path, error = %source, delay_ms = delay.as_millis() as u64, "retrying Prefect API request");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    return Err(ApiError::Transport {
                        method,
                        path: path.into(),
                        source,
                    });
                }
            }
        }
    }

    /// A request whose non-2xx answer is an error; returns the body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Vec<u8>, ApiError> {
        let (status, bytes) = self.request(method.clone(), path, body).await?;
        if !(200..300).contains(&status) {
            return Err(ApiError::Status {
                method,
                path: path.into(),
                status,
                body: truncate(&String::from_utf8_lossy(&bytes), 1000),
            });
        }
        Ok(bytes)
    }

    async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, ApiError> {
        let bytes = self.call(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode {
            path: path.into(),
            message: e.to_string(),
        })
    }

    /// `GET /health`: whether the server answers at all.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn health(&self) -> Result<(), ApiError> {
        self.call(Method::GET, "health", None).await.map(|_| ())
    }

    /// One `GET /health` with a 2 s timeout and no retries: whether the API answers right
    /// now. For probing during an outage, where the normal retries would only add delay.
    pub async fn probe(&self) -> bool {
        let Ok(url) = self.url("health") else {
            return false;
        };
        let answer = self
            .http
            .get(url)
            .timeout(std::time::Duration::from_secs(2))
            .send()
            .await;
        answer.is_ok_and(|r| r.status().is_success())
    }

    /// `GET /work_pools/{name}`; `None` when it does not exist.
    ///
    /// # Errors
    /// Any [`ApiError`] but 404.
    pub async fn read_work_pool(&self, name: &str) -> Result<Option<WorkPool>, ApiError> {
        let path = format!("work_pools/{}", encode(name));
        match self.call_json(Method::GET, &path, None).await {
            Ok(pool) => Ok(Some(pool)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /work_pools/`: creates a pool of `pool_type`, with `base_job_template` if given.
    ///
    /// # Errors
    /// Any [`ApiError`]; 409 when it already exists.
    pub async fn create_work_pool(
        &self,
        name: &str,
        pool_type: &str,
        base_job_template: Option<&Value>,
    ) -> Result<WorkPool, ApiError> {
        let mut body = json!({"name": name, "type": pool_type});
        if let Some(template) = base_job_template {
            body["base_job_template"] = template.clone();
        }
        self.call_json(Method::POST, "work_pools/", Some(&body))
            .await
    }

    /// `PATCH /work_pools/{name}` with a base job template.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn update_work_pool_template(
        &self,
        name: &str,
        template: &Value,
    ) -> Result<(), ApiError> {
        let path = format!("work_pools/{}", encode(name));
        let body = json!({"base_job_template": template});
        self.call(Method::PATCH, &path, Some(&body))
            .await
            .map(|_| ())
    }

    /// `POST /work_pools/{pool}/workers/heartbeat`.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn send_worker_heartbeat(
        &self,
        pool: &str,
        worker_name: &str,
        heartbeat_interval_seconds: u64,
    ) -> Result<(), ApiError> {
        let path = format!("work_pools/{}/workers/heartbeat", encode(pool));
        let body =
            json!({"name": worker_name, "heartbeat_interval_seconds": heartbeat_interval_seconds});
        self.call(Method::POST, &path, Some(&body))
            .await
            .map(|_| ())
    }

    /// `POST /work_pools/{pool}/get_scheduled_flow_runs`: runs due before `scheduled_before`.
    /// A missing pool or queue (404) yields no runs, as in the reference.
    ///
    /// # Errors
    /// Any [`ApiError`] but 404; a malformed run is a [`ApiError::Decode`].
    pub async fn get_scheduled_flow_runs(
        &self,
        pool: &str,
        work_queue_names: &[String],
        scheduled_before: chrono::DateTime<chrono::Utc>,
        limit: Option<usize>,
    ) -> Result<Vec<FlowRun>, ApiError> {
        let path = format!("work_pools/{}/get_scheduled_flow_runs", encode(pool));
        let mut body = json!({
            "work_queue_names": work_queue_names,
            // Python's str(datetime): a space separator and +00:00.
            "scheduled_before": scheduled_before.format("%Y-%m-%d %H:%M:%S%.6f+00:00").to_string(),
        });
        if let Some(limit) = limit {
            body["limit"] = json!(limit);
        }
        let responses: Vec<Value> = match self.call_json(Method::POST, &path, Some(&body)).await {
            Ok(r) => r,
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        responses
            .into_iter()
            .map(|mut r| {
                FlowRun::from_value(r.get_mut("flow_run").map(Value::take).unwrap_or_default())
                    .map_err(|message| ApiError::Decode {
                        path: path.clone(),
                        message,
                    })
            })
            .collect()
    }

    /// `POST /deployments/filter`: every deployment of the pool (for pre-pulling their images).
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn pool_deployments(&self, pool: &str) -> Result<Vec<Deployment>, ApiError> {
        let mut all = Vec::new();
        loop {
            let body = json!({
                "work_pools": {"name": {"any_": [pool]}},
                "sort": "CREATED_DESC",
                "offset": all.len(),
                "limit": 200,
            });
            let page: Vec<Value> = self
                .call_json(Method::POST, "deployments/filter", Some(&body))
                .await?;
            let done = page.len() < 200;
            // A deployment without an id cannot be pulled for; it is skipped, not fatal.
            all.extend(
                page.into_iter()
                    .filter_map(|d| Deployment::from_value(d).ok()),
            );
            if done || all.len() >= 10_000 {
                return Ok(all);
            }
        }
    }

    /// `POST /work_pools/filter`: every work pool of the server, page by page (image garbage
    /// collection keeps the images of every pool's deployments).
    ///
    /// # Errors
    /// Any [`ApiError`]; a malformed pool is a [`ApiError::Decode`], since skipping it would
    /// leave its deployments' images unprotected.
    pub async fn read_work_pools(&self) -> Result<Vec<WorkPool>, ApiError> {
        const PAGE: usize = 200;
        let mut all: Vec<WorkPool> = Vec::new();
        loop {
            let body = json!({"offset": all.len(), "limit": PAGE});
            let page: Vec<WorkPool> = self
                .call_json(Method::POST, "work_pools/filter", Some(&body))
                .await?;
            let done = page.len() < PAGE;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// `POST /work_pools/{pool}/workers/filter`: the names of the pool's workers the server
    /// considers online (recent heartbeats).
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn online_workers(&self, pool: &str) -> Result<Vec<String>, ApiError> {
        let path = format!("work_pools/{}/workers/filter", encode(pool));
        let workers: Vec<Value> = self
            .call_json(Method::POST, &path, Some(&json!({})))
            .await?;
        Ok(workers
            .iter()
            .filter(|w| w.get("status").and_then(Value::as_str) == Some("ONLINE"))
            .filter_map(|w| w.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect())
    }

    /// `POST /work_pools/{pool}/workers/filter`: the pool's workers, with their status and
    /// last heartbeat.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn pool_workers(&self, pool: &str) -> Result<Vec<WorkerStatus>, ApiError> {
        let path = format!("work_pools/{}/workers/filter", encode(pool));
        let workers: Vec<Value> = self
            .call_json(Method::POST, &path, Some(&json!({})))
            .await?;
        Ok(workers
            .iter()
            .filter_map(WorkerStatus::from_value)
            .collect())
    }

    /// `POST /flow_runs/filter`: the pool's runs in one of `state_types`, every page of them.
    /// A run the worker cannot read is left out, so one odd run does not hide the others.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn read_pool_flow_runs(
        &self,
        pool: &str,
        state_types: &[&str],
    ) -> Result<Vec<FlowRun>, ApiError> {
        const PAGE: usize = 200;
        let mut all = Vec::new();
        loop {
            let body = json!({
                "flow_runs": {"state": {"type": {"any_": state_types}}},
                "work_pools": {"name": {"any_": [pool]}},
                "sort": "ID_DESC",
                "offset": all.len(),
                "limit": PAGE,
            });
            let page: Vec<Value> = self
                .call_json(Method::POST, "flow_runs/filter", Some(&body))
                .await?;
            let done = page.len() < PAGE;
            all.extend(page.into_iter().filter_map(|r| FlowRun::from_value(r).ok()));
            if done || all.len() >= 100_000 {
                return Ok(all);
            }
        }
    }

    /// `POST /flow_runs/filter`: which of `ids` are in one of `state_types` (`CANCELLING`, …).
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn flow_runs_in_states(
        &self,
        ids: &[String],
        state_types: &[&str],
    ) -> Result<Vec<String>, ApiError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let body = json!({
            "flow_runs": {"id": {"any_": ids}, "state": {"type": {"any_": state_types}}},
            "limit": ids.len(),
        });
        let runs: Vec<Value> = self
            .call_json(Method::POST, "flow_runs/filter", Some(&body))
            .await?;
        Ok(runs
            .iter()
            .filter_map(|r| r.get("id").and_then(Value::as_str).map(str::to_owned))
            .collect())
    }

    /// `GET /deployments/{id}`; `None` when it no longer exists.
    ///
    /// # Errors
    /// Any [`ApiError`] but 404.
    pub async fn read_deployment(&self, id: &str) -> Result<Option<Deployment>, ApiError> {
        let path = format!("deployments/{}", encode(id));
        match self.call_json(Method::GET, &path, None).await {
            Ok(v) => Deployment::from_value(v)
                .map(Some)
                .map_err(|message| ApiError::Decode { path, message }),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A block document's data with its secrets revealed (`GET /block_documents/{id}`);
    /// `None` when there is no such document.
    ///
    /// # Errors
    /// Any other [`ApiError`].
    pub async fn read_block_document(&self, id: &str) -> Result<Option<Value>, ApiError> {
        self.optional_data(&format!(
            "block_documents/{}?include_secrets=true",
            encode(id)
        ))
        .await
    }

    /// A block document's data by block type slug and document name, secrets revealed.
    ///
    /// # Errors
    /// Any [`ApiError`] but 404 (`None`).
    pub async fn read_block_document_by_name(
        &self,
        block_type_slug: &str,
        name: &str,
    ) -> Result<Option<Value>, ApiError> {
        self.optional_data(&format!(
            "block_types/slug/{}/block_documents/name/{}?include_secrets=true",
            encode(block_type_slug),
            encode(name)
        ))
        .await
    }

    async fn optional_data(&self, path: &str) -> Result<Option<Value>, ApiError> {
        match self.call_json::<Value>(Method::GET, path, None).await {
            Ok(mut doc) => Ok(Some(
                doc.get_mut("data").map(Value::take).unwrap_or_default(),
            )),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A variable's value (`GET /variables/name/{name}`); `None` when it does not exist.
    ///
    /// # Errors
    /// Any [`ApiError`] but 404.
    pub async fn read_variable(&self, name: &str) -> Result<Option<Value>, ApiError> {
        match self
            .call_json::<Value>(
                Method::GET,
                &format!("variables/name/{}", encode(name)),
                None,
            )
            .await
        {
            Ok(mut v) => Ok(Some(
                v.get_mut("value").map(Value::take).unwrap_or_default(),
            )),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /flows/{id}`.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn read_flow(&self, id: &str) -> Result<Flow, ApiError> {
        let path = format!("flows/{}", encode(id));
        let raw = self.call_json(Method::GET, &path, None).await?;
        Flow::from_value(raw).map_err(|message| ApiError::Decode { path, message })
    }

    /// `GET /flow_runs/{id}`.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn read_flow_run(&self, id: &str) -> Result<FlowRun, ApiError> {
        let path = format!("flow_runs/{}", encode(id));
        let raw: Value = self.call_json(Method::GET, &path, None).await?;
        FlowRun::from_value(raw).map_err(|message| ApiError::Decode { path, message })
    }

    /// `GET /flow_run_states/?flow_run_id=…`: the run's states, oldest first.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn read_flow_run_states(&self, flow_run_id: &str) -> Result<Vec<State>, ApiError> {
        let path = format!("flow_run_states/?flow_run_id={}", encode(flow_run_id));
        let mut states: Vec<State> = self.call_json(Method::GET, &path, None).await?;
        states.sort_by(|a, b| a.timestamp.cmp(&b.timestamp));
        Ok(states)
    }

    /// `POST /flow_runs/{id}/set_state`.
    ///
    /// # Errors
    /// Any [`ApiError`]; 404 when the run is gone.
    pub async fn set_flow_run_state(
        &self,
        flow_run_id: &str,
        state: &StateProposal,
        force: bool,
    ) -> Result<OrchestrationResult, ApiError> {
        let body = json!({
            "state": {
                "type": state.state_type,
                "name": state.name,
                "message": state.message,
                "state_details": {
                    "flow_run_id": flow_run_id, "task_run_id": null, "child_flow_run_id": null,
                    "scheduled_time": null, "cache_key": null, "cache_expiration": null,
                    "deferred": null, "untrackable_result": false, "pause_timeout": null,
                    "pause_reschedule": false, "pause_key": null, "run_input_keyset": null,
                    "refresh_cache": null, "retriable": null,
                    "transition_id": uuid::Uuid::new_v4().to_string(),
                    "task_parameters_id": null, "traceparent": null,
                    "deployment_concurrency_lease_id": null
                },
                "data": null
            },
            "force": force
        });
        self.call_json(
            Method::POST,
            &format!("flow_runs/{}/set_state", encode(flow_run_id)),
            Some(&body),
        )
        .await
    }

    /// `PATCH /flow_runs/{id}` setting `infrastructure_pid`.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn set_infrastructure_pid(
        &self,
        flow_run_id: &str,
        pid: &str,
    ) -> Result<(), ApiError> {
        let body = json!({"infrastructure_pid": pid});
        self.call(
            Method::PATCH,
            &format!("flow_runs/{}", encode(flow_run_id)),
            Some(&body),
        )
        .await
        .map(|_| ())
    }

    /// `PATCH /flow_runs/{id}/labels`.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn update_flow_run_labels(
        &self,
        flow_run_id: &str,
        labels: &Value,
    ) -> Result<(), ApiError> {
        self.call(
            Method::PATCH,
            &format!("flow_runs/{}/labels", encode(flow_run_id)),
            Some(labels),
        )
        .await
        .map(|_| ())
    }

    /// `POST /logs/`. Entries are anything that serialises as a log entry (the sender keeps
    /// bookkeeping beside each one).
    ///
    /// # Errors
    /// [`LogsNotTaken`], with the wait the API asked for (`Retry-After` of a 429 or 503 it
    /// still answered after the client's own retries).
    pub async fn create_logs<T: serde::Serialize>(&self, logs: &[T]) -> Result<(), LogsNotTaken> {
        let not_taken = |error| LogsNotTaken {
            error,
            retry_after: None,
        };
        let body = serde_json::to_value(logs).map_err(|e| {
            not_taken(ApiError::Decode {
                path: "logs/".into(),
                message: e.to_string(),
            })
        })?;
        let (status, headers, bytes) = self
            .request_with_headers(Method::POST, "logs/", Some(&body))
            .await
            .map_err(not_taken)?;
        if (200..300).contains(&status) {
            return Ok(());
        }
        Err(LogsNotTaken {
            error: ApiError::Status {
                method: Method::POST,
                path: "logs/".into(),
                status,
                body: truncate(&String::from_utf8_lossy(&bytes), 1000),
            },
            retry_after: retry_after(&headers),
        })
    }

    /// The newest log of a flow run written under one of `names` (`POST /logs/filter`, newest
    /// first, a page at a time): where forwarding of a container's output stands after a
    /// restart. Prefect's log filter has no name criterion (and refuses unknown ones), so the
    /// names are checked here, through up to [`LAST_LOG_SCAN`] of the run's newest logs.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn last_log_named(
        &self,
        flow_run_id: &str,
        names: &[&str],
    ) -> Result<LastLog, ApiError> {
        let mut offset = 0;
        while offset < LAST_LOG_SCAN {
            let page = json!({
                "logs": {"flow_run_id": {"any_": [flow_run_id]}},
                "sort": "TIMESTAMP_DESC",
                "limit": LAST_LOG_PAGE,
                "offset": offset,
            });
            let logs: Vec<LogRecord> = self
                .call_json(Method::POST, "logs/filter", Some(&page))
                .await?;
            if let Some(ours) = logs.iter().find(|l| names.contains(&l.name.as_str())) {
                return Ok(LastLog::At(ours.timestamp));
            }
            if logs.len() < LAST_LOG_PAGE {
                return Ok(LastLog::None);
            }
            offset += LAST_LOG_PAGE;
        }
        Ok(LastLog::Unknown)
    }
}

/// A page of logs read while looking for the newest forwarded one (Prefect's default limit).
const LAST_LOG_PAGE: usize = 200;
/// How many of a run's newest logs are looked through for one of ours, at most: the worker's
/// and the flow's own messages logged after the last forwarded line, with room to spare.
const LAST_LOG_SCAN: usize = 5_000;

/// A log as `POST /logs/filter` returns it: the two fields a resume needs.
#[derive(Debug, serde::Deserialize)]
struct LogRecord {
    name: String,
    timestamp: chrono::DateTime<chrono::Utc>,
}

/// Where a run's logs under some names stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastLog {
    /// The newest is at this time.
    At(chrono::DateTime<chrono::Utc>),
    /// The run has none.
    None,
    /// Not found among the run's newest [`LAST_LOG_SCAN`] logs.
    Unknown,
}

/// A `POST /logs/` that did not go through.
#[derive(Debug, thiserror::Error)]
#[error("the Prefect API did not take a batch of flow-run logs")]
pub struct LogsNotTaken {
    /// Why.
    #[source]
    pub error: ApiError,
    /// How long the API asked to wait before the next try.
    pub retry_after: Option<Duration>,
}

/// The causes under an error, so "builder error" says what failed.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    if causes.is_empty() {
        "no further detail".to_owned()
    } else {
        causes.join(": ")
    }
}

/// Percent-encodes one path segment (pool names may contain spaces or slashes).
fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_two_to_the_attempt_seconds_up_to_64_plus_a_fifth_at_most() {
        let mut delays = RetryDelays::new();
        // A maintenance answer before any counted retry waits 1 s.
        let mut schedule = vec![delays.current.as_secs()];
        for _ in 0..8 {
            delays.count_retry();
            schedule.push(delays.current.as_secs());
        }
        assert_eq!(schedule, vec![1, 2, 4, 8, 16, 32, 64, 64, 64]);
        let d = delays.delay(None);
        assert!(d >= RETRY_MAX && d <= RETRY_MAX.mul_f64(1.2), "{d:?}");
        let told = Duration::from_secs(3);
        let d = delays.delay(Some(told));
        assert!(d >= told && d <= told.mul_f64(1.2), "{d:?}");
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
    }

    #[test]
    fn encodes_segments() {
        assert_eq!(encode("my pool/x"), "my%20pool%2Fx");
    }

    #[test]
    fn debug_hides_secrets() {
        let c = ClientConfig {
            api_url: Url::parse("http://x/api").unwrap(),
            api_key: Some("pnu_secret".into()),
            auth_string: Some("admin:pass".into()),
            timeout: Duration::from_secs(1),
            max_retries: 0,
            worker_name: None,
            csrf_enabled: true,
        };
        let text = format!("{c:?}");
        assert!(!text.contains("pnu_secret") && !text.contains("admin:pass"));
    }

    #[test]
    fn error_classes() {
        let e = ApiError::Status {
            method: Method::GET,
            path: "x".into(),
            status: 503,
            body: String::new(),
        };
        assert!(e.is_transient() && !e.is_auth());
        let e = ApiError::Status {
            method: Method::GET,
            path: "x".into(),
            status: 401,
            body: String::new(),
        };
        assert!(e.is_auth() && !e.is_transient());
    }
}
