//! `lockstep serve`: a long-running coordinator behind an OpenAI-compatible
//! HTTP API (axum). Every completion it returns was computed by
//! `--redundancy` workers of distinct operators that agreed bit for bit
//! (or was settled by a dispute), and carries its receipts.
//!
//! - `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI's request
//!   and response shapes ([`api`]); `stream: true` sends server-sent events
//!   once the completion is verified (no unverified token is ever sent).
//! - `GET /v1/models`: the models this server was started with.
//! - `GET /v1/receipts/{id}`: a completion's receipts, for `lockstep verify`.
//! - `GET /`: a live status page (workers, recent requests, throughput and
//!   latency), fed by `GET /status.json`; `GET /metrics`: Prometheus.
//! - `GET /health`.
//!
//! Clients authenticate with API keys (`lockstep keys`, [`keys`]), each
//! with a rate and a concurrency limit; bodies and prompts are
//! size-limited; every error is an OpenAI-style JSON error.

pub mod api;
pub mod keys;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use axum::extract::{Path as UrlPath, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use self::api::{ApiError, ApiResult, Completion};
use crate::coordinator::SubmitOptions;
use crate::llm::distribute::LocalModel;
use crate::nats::Nats;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub connect: crate::cli::ConnectArgs,
    /// Where to listen for HTTP.
    #[arg(long, env = "LOCKSTEP_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A model to serve: a name (smollm2, stories260K, aidreams260K) or a
    /// file; repeat for several. Clients name it by what is given here
    /// (a file by its stem).
    #[arg(long = "model", required = true)]
    pub models: Vec<String>,
    /// Workers of distinct operators that must agree on each completion.
    #[arg(long, default_value_t = 2)]
    pub redundancy: u32,
    /// Give up on a request (503) after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout: f64,
    /// Most tokens a request may ask for.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Most choices (`n`) per request.
    #[arg(long, default_value_t = 8)]
    pub max_n: usize,
    /// Largest request body, in KiB.
    #[arg(long, default_value_t = 256)]
    pub max_body_kib: usize,
    /// Requests verified at once (more wait).
    #[arg(long, default_value_t = 64)]
    pub max_inflight: usize,
    /// Where receipts are kept (default: <deployment>/serve).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

pub struct Served {
    pub name: String,
    pub local: Arc<LocalModel>,
}

pub struct Limits {
    pub max_tokens: usize,
    pub max_n: usize,
    pub max_prompt_bytes: usize,
}

/// The key file, re-read when it changes (a revoked key stops working
/// within a second, without a restart).
pub struct KeyCache {
    deployment: PathBuf,
    loaded: Mutex<(Option<SystemTime>, Instant, keys::KeyFile)>,
}

impl KeyCache {
    fn new(deployment: PathBuf) -> Result<Self> {
        let file = keys::KeyFile::load(&deployment)?;
        let mtime = std::fs::metadata(keys::path(&deployment))
            .and_then(|m| m.modified())
            .ok();
        Ok(Self {
            deployment,
            loaded: Mutex::new((mtime, Instant::now(), file)),
        })
    }

    pub fn find(&self, key: &str) -> Option<keys::KeyRecord> {
        let mut l = self.loaded.lock().expect("not poisoned");
        if l.1.elapsed() > Duration::from_millis(500) {
            let mtime = std::fs::metadata(keys::path(&self.deployment))
                .and_then(|m| m.modified())
                .ok();
            if mtime != l.0 {
                match keys::KeyFile::load(&self.deployment) {
                    Ok(f) => l.2 = f,
                    Err(e) => tracing::warn!("key file unreadable, keeping the last one: {e:#}"),
                }
                l.0 = mtime;
            }
            l.1 = Instant::now();
        }
        l.2.find(key).cloned()
    }
}

/// Receipts by completion id, on disk.
pub struct Receipts {
    dir: PathBuf,
}

impl Receipts {
    fn put(&self, id: &str, bytes: &[u8]) -> ApiResult<()> {
        let p = self.dir.join(format!("{id}.json"));
        std::fs::write(&p, bytes)
            .map_err(|e| api::internal(format!("cannot store the receipt: {e}")))
    }

    fn get(&self, id: &str) -> Option<Vec<u8>> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return None;
        }
        std::fs::read(self.dir.join(format!("{id}.json"))).ok()
    }
}

#[derive(Default)]
struct Usage {
    window: Option<Instant>,
    count: u32,
    in_flight: u32,
}

/// A 10-second slice of the status page's plots.
#[derive(Clone, Copy, Default)]
struct Bucket {
    start: u64,
    completions: u64,
    tokens: u64,
    latency_ms: f64,
}

/// What the status page shows besides the workers: recent requests and
/// the last 10 minutes in 10-second buckets.
#[derive(Default)]
struct Recent {
    requests: std::collections::VecDeque<Value>,
    series: std::collections::VecDeque<Bucket>,
}

const RECENT_REQUESTS: usize = 50;
const BUCKET_S: u64 = 10;
const SERIES_BUCKETS: usize = 60;

pub struct State {
    pub nats: Nats,
    pub metrics: crate::metrics::ServeMetrics,
    started: Instant,
    recent: Mutex<Recent>,
    pub submit: SubmitOptions,
    pub models: Vec<Served>,
    pub limits: Limits,
    pub keys: KeyCache,
    pub receipts: Receipts,
    pub inflight: tokio::sync::Semaphore,
    usage: Mutex<HashMap<String, Usage>>,
}

impl State {
    /// A server's state: keys from `deployment`, receipts kept in
    /// `receipts`, at most `max_inflight` requests verified at once.
    pub fn new(
        nats: Nats,
        submit: SubmitOptions,
        models: Vec<Served>,
        limits: Limits,
        deployment: &std::path::Path,
        receipts: PathBuf,
        max_inflight: usize,
    ) -> Result<Arc<Self>> {
        Ok(Arc::new(State {
            nats,
            submit,
            models,
            limits,
            keys: KeyCache::new(deployment.to_path_buf())?,
            receipts: Receipts { dir: receipts },
            inflight: tokio::sync::Semaphore::new(max_inflight.max(1)),
            usage: Mutex::new(HashMap::new()),
            metrics: Default::default(),
            started: Instant::now(),
            recent: Mutex::new(Recent::default()),
        }))
    }

    /// Notes a verified request for the status page.
    fn record(&self, model: &str, c: &Completion, latency: Duration) {
        let now = unix_now();
        let tokens: usize = c.choices.iter().map(|ch| ch.completion_tokens).sum();
        let verdict = if c
            .choices
            .iter()
            .any(|ch| ch.verdict == crate::coordinator::Verdict::Resolved)
        {
            "resolved"
        } else {
            "verified"
        };
        let mut workers: Vec<&str> = c
            .choices
            .iter()
            .flat_map(|ch| ch.workers.iter().map(String::as_str))
            .collect();
        workers.sort_unstable();
        workers.dedup();
        let mut r = self.recent.lock().expect("not poisoned");
        r.requests.push_front(json!({
            "unix": now,
            "id": c.id,
            "model": model,
            "choices": c.choices.len(),
            "completion_tokens": tokens,
            "latency_ms": latency.as_secs_f64() * 1e3,
            "verdict": verdict,
            "workers": workers,
            "receipt_digest": c.receipt_digest,
        }));
        r.requests.truncate(RECENT_REQUESTS);
        let start = now - now % BUCKET_S;
        if r.series.back().is_none_or(|b| b.start != start) {
            r.series.push_back(Bucket {
                start,
                ..Default::default()
            });
            while r.series.len() > SERIES_BUCKETS {
                r.series.pop_front();
            }
        }
        let b = r.series.back_mut().expect("pushed above");
        b.completions += c.choices.len() as u64;
        b.tokens += tokens as u64;
        b.latency_ms += latency.as_secs_f64() * 1e3;
    }
}

/// A request counted against its key until dropped.
struct Admitted {
    state: Arc<State>,
    key: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(u) = self
            .state
            .usage
            .lock()
            .expect("not poisoned")
            .get_mut(&self.key)
        {
            u.in_flight = u.in_flight.saturating_sub(1);
        }
    }
}

/// Checks the key and its limits (requests per minute, in flight).
fn admit(state: &Arc<State>, headers: &HeaderMap) -> ApiResult<Admitted> {
    let key = api::authorize(state, headers)?;
    let mut usage = state.usage.lock().expect("not poisoned");
    let u = usage.entry(key.id.clone()).or_default();
    let now = Instant::now();
    if u.window
        .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(60))
    {
        u.window = Some(now);
        u.count = 0;
    }
    let limited = |m: String| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            "rate_limit_exceeded",
            m,
        )
    };
    if key.requests_per_minute > 0 && u.count >= key.requests_per_minute {
        return Err(limited(format!(
            "Rate limit reached for {}: {} requests per minute",
            key.id, key.requests_per_minute
        )));
    }
    if key.concurrency > 0 && u.in_flight >= key.concurrency {
        return Err(limited(format!(
            "Rate limit reached for {}: {} requests in flight at once",
            key.id, key.concurrency
        )));
    }
    u.count += 1;
    u.in_flight += 1;
    Ok(Admitted {
        state: state.clone(),
        key: key.id,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn model_of(m: &serde_json::Map<String, Value>) -> ApiResult<String> {
    m.get("model")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ApiError::bad("`model` is required").param("model"))
}

/// Counts a finished request by endpoint and status (and its latency when
/// it succeeded).
fn observed(state: &State, endpoint: &str, start: Instant, r: ApiResult<Response>) -> Response {
    let r = r.unwrap_or_else(IntoResponse::into_response);
    let status = r.status();
    state
        .metrics
        .requests
        .with_label_values(&[endpoint, status.as_str()])
        .inc();
    if status.is_success() {
        state
            .metrics
            .latency
            .with_label_values(&[endpoint])
            .observe(start.elapsed().as_secs_f64());
    }
    r
}

async fn models(AxState(state): AxState<Arc<State>>, headers: HeaderMap) -> Response {
    let t = Instant::now();
    let r = models_inner(&state, headers).await;
    observed(&state, "/v1/models", t, r)
}

async fn models_inner(state: &Arc<State>, headers: HeaderMap) -> ApiResult<Response> {
    let _admitted = admit(state, &headers)?;
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|m| {
            json!({
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": "lockstep",
                "lockstep": {
                    "model_digest": m.local.model.digest.to_string(),
                    "tokenizer_digest": m.local.tokenizer.as_ref().map(|t| t.digest.to_string()),
                    "context": m.local.model.config.max_seq,
                },
            })
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn receipt(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let t = Instant::now();
    let r = receipt_inner(&state, headers, id).await;
    observed(&state, "/v1/receipts", t, r)
}

async fn receipt_inner(state: &Arc<State>, headers: HeaderMap, id: String) -> ApiResult<Response> {
    let _admitted = admit(state, &headers)?;
    match state.receipts.get(&id) {
        Some(bytes) => Ok(([("content-type", "application/json")], bytes).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "receipt_not_found",
            format!("no receipt {id:?}"),
        )),
    }
}

async fn completions(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let t = Instant::now();
    let r = complete_request(&state, headers, body, t, false).await;
    observed(&state, "/v1/completions", t, r)
}

async fn chat_completions(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let t = Instant::now();
    let r = complete_request(&state, headers, body, t, true).await;
    observed(&state, "/v1/chat/completions", t, r)
}

/// One completions (`chat` false) or chat completions request: the same
/// path, differing only in how the prompt is read and how a choice is
/// written.
async fn complete_request(
    state: &Arc<State>,
    headers: HeaderMap,
    body: axum::body::Bytes,
    start: Instant,
    chat: bool,
) -> ApiResult<Response> {
    let (endpoint, kind, object) = if chat {
        ("/v1/chat/completions", "chatcmpl", "chat.completion")
    } else {
        ("/v1/completions", "cmpl", "text_completion")
    };
    let _admitted = admit(state, &headers)?;
    let m = api::parse_body(&body)?;
    let model = model_of(&m)?;
    let p = api::params(&m, &state.limits)?;
    let prompt = if chat {
        api::chat_prompt(&m)?
    } else {
        api::completion_prompt(&m)?
    };
    let c = api::complete(state, &model, prompt, &p, kind).await?;
    state
        .metrics
        .first_token
        .with_label_values(&[endpoint])
        .observe(start.elapsed().as_secs_f64());
    state.record(&model, &c, start.elapsed());
    let created = unix_now();
    if p.stream {
        return Ok(stream(state, &model, &c, created, chat));
    }
    let choices: Vec<Value> = c
        .choices
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            if chat {
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": ch.text},
                    "logprobs": null,
                    "finish_reason": ch.finish_reason,
                })
            } else {
                json!({"text": ch.text, "index": i, "logprobs": null, "finish_reason": ch.finish_reason})
            }
        })
        .collect();
    let body = json!({
        "id": c.id,
        "object": object,
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint(),
        "choices": choices,
        "usage": usage(&c),
        "lockstep": api::lockstep_field(&c),
    });
    Ok(api::with_receipt_header(
        axum::Json(body).into_response(),
        &c,
    ))
}

fn fingerprint() -> String {
    format!("lockstep-contract-v{}", lockstep_kernels::CONTRACT_VERSION)
}

fn usage(c: &Completion) -> Value {
    let prompt = c.choices.first().map_or(0, |ch| ch.prompt_tokens);
    let completion: usize = c.choices.iter().map(|ch| ch.completion_tokens).sum();
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A verified completion as server-sent events, the way OpenAI streams:
/// text pieces token by token, each choice's finish, then `[DONE]`. Sent
/// only after verification, so every token streamed is an agreed one.
fn stream(state: &Arc<State>, model: &str, c: &Completion, created: u64, chat: bool) -> Response {
    let served = state.models.iter().find(|m| m.name == model);
    let tok = served.and_then(|m| m.local.tokenizer.as_ref());
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = |i: usize, piece: Option<&str>, finish: Option<&str>, first: bool| {
        let choice = if chat {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(p) = piece {
                delta.insert("content".into(), json!(p));
            }
            json!({"index": i, "delta": delta, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": i, "text": piece.unwrap_or(""), "logprobs": null, "finish_reason": finish})
        };
        json!({"id": c.id, "object": object, "created": created, "model": model,
               "system_fingerprint": fingerprint(), "choices": [choice]})
    };
    let mut events: Vec<Value> = Vec::new();
    for (i, ch) in c.choices.iter().enumerate() {
        if chat {
            events.push(chunk(i, Some(""), None, true));
        }
        let mut ids = ch.output_ids.clone();
        if ch.finish_reason == "stop" {
            ids.pop();
        }
        match tok {
            Some(t) => {
                let mut text = crate::llm::tokenizer::TextStream::default();
                for n in 1..=ids.len() {
                    let piece = text.next(t, &ids[..n]).unwrap_or_default();
                    if !piece.is_empty() {
                        events.push(chunk(i, Some(&piece), None, false));
                    }
                }
            }
            None => events.push(chunk(i, Some(&ch.text), None, false)),
        }
        let mut last = chunk(i, None, Some(ch.finish_reason), false);
        if i + 1 == c.choices.len() {
            last["usage"] = usage(c);
            last["lockstep"] = api::lockstep_field(c);
        }
        events.push(last);
    }
    let mut sse: Vec<Result<Event, std::convert::Infallible>> = events
        .into_iter()
        .map(|v| Ok(Event::default().data(v.to_string())))
        .collect();
    sse.push(Ok(Event::default().data("[DONE]")));
    let r = Sse::new(futures::stream::iter(sse)).into_response();
    api::with_receipt_header(r, c)
}

/// The Prometheus text format; live workers are read from the bus here.
async fn metrics(AxState(state): AxState<Arc<State>>) -> Response {
    let m = &state.metrics;
    m.resident.set(crate::metrics::resident_bytes());
    if let Ok(live) = crate::nats::live_workers(&state.nats, Duration::from_secs(10)).await {
        m.workers.reset();
        for w in &live {
            let backend = w
                .record
                .backends
                .first()
                .map_or("none".to_string(), |b| b.kind.to_string());
            let st = format!("{:?}", w.record.state).to_lowercase();
            m.workers.with_label_values(&[&backend, &st]).inc();
        }
    }
    (
        [("content-type", "text/plain; version=0.0.4")],
        crate::metrics::render(&m.registry),
    )
        .into_response()
}

/// The status page (`GET /`): a static page that polls `status.json`.
async fn status_page() -> Response {
    (
        [("content-type", "text/html; charset=utf-8")],
        include_str!("status.html"),
    )
        .into_response()
}

/// What the status page shows: workers (read from the bus now), recent
/// requests, and the last 10 minutes of throughput and latency.
async fn status_json(AxState(state): AxState<Arc<State>>) -> Response {
    let live = crate::nats::live_workers(&state.nats, Duration::from_secs(10))
        .await
        .unwrap_or_default();
    let enrolled = crate::nats::enrollments(&state.nats)
        .await
        .unwrap_or_default();
    let workers: Vec<Value> = live
        .iter()
        .map(|w| {
            let b = w.record.backends.first();
            json!({
                "name": w.id,
                "operator": w.operator,
                "backend": b.map(|b| b.kind.to_string()),
                "device": b.map(|b| b.device.clone()),
                "path": b.map(|b| b.path.clone()),
                "models_loaded": w.record.models.as_ref().map_or(0, |m| m.loaded.len()),
                "state": format!("{:?}", w.record.state).to_lowercase(),
                "enrollment": enrolled
                    .get(&w.id)
                    .map_or("unknown".to_string(), |e| format!("{:?}", e.state).to_lowercase()),
                "jobs_done": w.record.jobs_done,
                "jobs_failed": w.record.jobs_failed,
            })
        })
        .collect();
    let (requests, series) = {
        let r = state.recent.lock().expect("not poisoned");
        let series: Vec<Value> = r
            .series
            .iter()
            .map(|b| {
                json!({
                    "t": b.start + BUCKET_S / 2,
                    "tokens_per_s": b.tokens as f64 / BUCKET_S as f64,
                    "latency_ms": if b.completions == 0 { 0.0 } else { b.latency_ms / b.completions as f64 },
                })
            })
            .collect();
        (r.requests.iter().cloned().collect::<Vec<_>>(), series)
    };
    axum::Json(json!({
        "redundancy": state.submit.redundancy,
        "uptime_s": state.started.elapsed().as_secs_f64(),
        "workers": workers,
        "recent": requests,
        "series": series,
    }))
    .into_response()
}

async fn health() -> &'static str {
    "ok\n"
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        "Unknown request URL",
    )
}

pub fn router(state: Arc<State>, max_body: usize) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/receipts/{id}", get(receipt))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/", get(status_page))
        .route("/status.json", get(status_json))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state)
}

pub fn run(args: ServeArgs) -> Result<()> {
    let deployment = args.connect.deployment.clone().context(
        "lockstep serve needs --deployment DIR (its keys, API keys and receipts live there)",
    )?;
    let cfg = args.connect.coordinator()?;
    let signer = cfg
        .identity()?
        .context("a coordinator signs its receipts: the deployment must hold its key")?;
    let mut models = Vec::new();
    for spec in &args.models {
        let local = LocalModel::load_shared(spec).with_context(|| format!("--model {spec}"))?;
        let name = if std::path::Path::new(spec).exists() {
            std::path::Path::new(spec)
                .file_stem()
                .map_or(spec.clone(), |s| s.to_string_lossy().to_string())
        } else {
            spec.clone()
        };
        tracing::info!(%name, digest = %local.model.digest, "serving model");
        models.push(Served { name, local });
    }
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| deployment.join("serve"));
    let receipts = state_dir.join("receipts");
    std::fs::create_dir_all(&receipts)
        .with_context(|| format!("cannot create {}", receipts.display()))?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let nats = crate::nats::connect(&cfg).await?;
        let state = State::new(
            nats,
            SubmitOptions {
                redundancy: args.redundancy,
                deadline: Some(Duration::from_secs_f64(args.request_timeout)),
                job_timeout: Duration::from_secs(120),
                dispute_timeout: Duration::from_secs(60),
                progress: false,
                signer: Some(Arc::new(signer)),
                ..Default::default()
            },
            models,
            Limits {
                max_tokens: args.max_tokens,
                max_n: args.max_n,
                max_prompt_bytes: args.max_body_kib * 1024,
            },
            &deployment,
            receipts,
            args.max_inflight,
        )?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "serving");
        eprintln!(
            "lockstep serve: http://{addr}/v1 (redundancy {})",
            args.redundancy
        );
        axum::serve(listener, router(state, args.max_body_kib * 1024))
            .with_graceful_shutdown(crate::cli::shutdown_signal())
            .await
            .context("the HTTP server failed")?;
        eprintln!("lockstep serve: stopped");
        Ok(())
    })
}
