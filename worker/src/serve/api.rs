//! The OpenAI-compatible endpoints of `lockstep serve`: request and
//! response shapes, OpenAI-style errors, and the path from a request to
//! verified generate jobs and back.
//!
//! A request becomes one batch of generate jobs (one per choice, `n`), in
//! the batch-line format (`batch.rs`), so the prompt is tokenised and the
//! chat template applied exactly as for `lockstep submit`; the batch runs
//! through the coordinator (`coordinator::submit`) with the deployment's
//! redundancy, and the response is written only once every choice is
//! verified (or resolved by a dispute). Each choice's receipt comes back in
//! the body (`lockstep.receipts`) and is kept for `GET /v1/receipts/{id}`.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::State;
use crate::coordinator::{SubmitOptions, Verdict};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param: None,
            message: message.into(),
        }
    }

    pub fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }

    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code: Some(code),
            param: None,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        (self.status, axum::Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The request body as JSON, or a 400 that says why not.
pub fn parse_body(body: &[u8]) -> ApiResult<serde_json::Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad("the request body must be a JSON object")),
        Err(e) => Err(ApiError::bad(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// What a request asks to be completed.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Chat(Vec<(String, String)>),
}

/// The sampling and length parameters shared by both endpoints.
pub struct Params {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
}

fn num(m: &serde_json::Map<String, Value>, key: &'static str) -> ApiResult<Option<f64>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("`{key}` must be a number")).param(key)),
    }
}

/// Fields lockstep cannot honour exactly are refused, not ignored: a
/// completion must mean what its receipt says.
const UNSUPPORTED: &[&str] = &[
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "best_of",
    "echo",
    "suffix",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
];

pub fn params(m: &serde_json::Map<String, Value>, limits: &super::Limits) -> ApiResult<Params> {
    for k in UNSUPPORTED {
        if m.get(*k)
            .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
        {
            return Err(
                ApiError::bad(format!("`{k}` is not supported by lockstep serve")).param(k),
            );
        }
    }
    for k in ["presence_penalty", "frequency_penalty"] {
        if num(m, k)?.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad(format!("`{k}` is not supported (only 0)")).param(k));
        }
    }
    let max_tokens = num(m, "max_completion_tokens")?
        .or(num(m, "max_tokens")?)
        .unwrap_or(16.0);
    if !(max_tokens >= 1.0 && max_tokens.fract() == 0.0) || max_tokens > limits.max_tokens as f64 {
        return Err(ApiError::bad(format!(
            "`max_tokens` must be a whole number from 1 to {}",
            limits.max_tokens
        ))
        .param("max_tokens"));
    }
    let temperature = num(m, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad("`temperature` must be between 0 and 2").param("temperature"));
    }
    let top_p = num(m, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("`top_p` must be in (0, 1]").param("top_p"));
    }
    let n = num(m, "n")?.unwrap_or(1.0);
    if !(n >= 1.0 && n.fract() == 0.0 && n <= limits.max_n as f64) {
        return Err(ApiError::bad(format!("`n` must be from 1 to {}", limits.max_n)).param("n"));
    }
    let seed = match m.get("seed") {
        None | Some(Value::Null) => rand::random::<u32>() as u64,
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|s| s as u64))
            .ok_or_else(|| ApiError::bad("`seed` must be an integer").param("seed"))?,
    };
    let stop = match m.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::bad("`stop` must be a string or up to 4 strings").param("stop")
            })?,
        Some(_) => {
            return Err(ApiError::bad("`stop` must be a string or up to 4 strings").param("stop"))
        }
    };
    let stream = match m.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("`stream` must be true or false").param("stream")),
    };
    Ok(Params {
        max_tokens: max_tokens as usize,
        temperature: temperature as f32,
        top_p: top_p as f32,
        seed,
        n: n as usize,
        stop,
        stream,
    })
}

/// The prompt of a completions request: a string, or token ids.
pub fn completion_prompt(m: &serde_json::Map<String, Value>) -> ApiResult<Prompt> {
    let bad = || {
        ApiError::bad("`prompt` must be a string or an array of token ids (one prompt per request)")
            .param("prompt")
    };
    match m.get("prompt") {
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(Prompt::Text(a[0].as_str().unwrap_or_default().to_string()))
        }
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect::<Option<Vec<u32>>>()
            .map(Prompt::Ids)
            .ok_or_else(bad),
        None => Err(ApiError::bad("`prompt` is required").param("prompt")),
        _ => Err(bad()),
    }
}

/// The messages of a chat request, as (role, text).
pub fn chat_prompt(m: &serde_json::Map<String, Value>) -> ApiResult<Prompt> {
    let Some(Value::Array(msgs)) = m.get("messages") else {
        return Err(
            ApiError::bad("`messages` must be an array of {role, content}").param("messages"),
        );
    };
    let mut out = Vec::new();
    for msg in msgs {
        let role = msg.get("role").and_then(Value::as_str);
        let content = match msg.get("content") {
            Some(Value::String(s)) => Some(s.clone()),
            // [{"type": "text", "text": …}, …]
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => Some(t.to_string()),
                        _ => None,
                    }
                })
                .collect::<Option<Vec<_>>>()
                .map(|v| v.concat()),
            _ => None,
        };
        match (role, content) {
            (Some(r), Some(c)) => out.push((r.to_string(), c)),
            _ => {
                return Err(
                    ApiError::bad("each message needs a `role` and a text `content`")
                        .param("messages"),
                )
            }
        }
    }
    if out.is_empty() {
        return Err(ApiError::bad("`messages` is empty").param("messages"));
    }
    Ok(Prompt::Chat(out))
}

/// One verified choice.
pub struct Choice {
    pub text: String,
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub output_ids: Vec<u32>,
    pub verdict: Verdict,
    pub workers: Vec<String>,
}

/// A request's verified choices and its receipts.
pub struct Completion {
    pub id: String,
    pub choices: Vec<Choice>,
    pub receipts: Vec<Value>,
    /// SHA3-256 of the stored receipt file.
    pub receipt_digest: String,
    pub seed: u64,
}

/// Runs a request as verified generate jobs.
pub async fn complete(
    state: &Arc<State>,
    model_name: &str,
    prompt: Prompt,
    p: &Params,
    kind: &str,
) -> ApiResult<Completion> {
    let served = state
        .models
        .iter()
        .find(|m| m.name == model_name)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!(
                    "The model `{model_name}` does not exist (served: {})",
                    state
                        .models
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
    let local = &served.local;
    let tok = local.tokenizer.as_ref();
    // Stop strings must each be one token of the model's vocabulary.
    let mut stop: Vec<u32> = local.model.end_ids.clone();
    stop.extend(tok.and_then(|t| t.eos));
    for s in &p.stop {
        let ids = tok
            .ok_or_else(|| {
                ApiError::bad("this model has no tokenizer: `stop` strings cannot be read")
                    .param("stop")
            })?
            .encode(s)
            .map_err(|e| ApiError::bad(format!("{e:#}")).param("stop"))?;
        let ids: Vec<u32> = ids
            .into_iter()
            .filter(|&i| Some(i) != tok.and_then(|t| t.bos) || s.is_empty())
            .collect();
        match ids.as_slice() {
            [one] => stop.push(*one),
            _ => {
                return Err(ApiError::bad(format!(
                    "stop sequence {s:?} is {} tokens; lockstep stops on single tokens only",
                    ids.len()
                ))
                .param("stop"))
            }
        }
    }
    stop.sort_unstable();
    stop.dedup();
    let prompt_json = match &prompt {
        Prompt::Text(t) => {
            if tok.is_none() {
                return Err(ApiError::bad(
                    "this model has no tokenizer: give the prompt as token ids",
                )
                .param("prompt"));
            }
            if t.len() > state.limits.max_prompt_bytes {
                return Err(ApiError::bad(format!(
                    "the prompt is {} bytes; this server takes at most {}",
                    t.len(),
                    state.limits.max_prompt_bytes
                ))
                .param("prompt"));
            }
            ("prompt", json!(t))
        }
        Prompt::Ids(ids) => ("prompt_ids", json!(ids)),
        Prompt::Chat(msgs) => {
            let bytes: usize = msgs.iter().map(|(_, c)| c.len()).sum();
            if bytes > state.limits.max_prompt_bytes {
                return Err(ApiError::bad(format!(
                    "the messages are {bytes} bytes; this server takes at most {}",
                    state.limits.max_prompt_bytes
                ))
                .param("messages"));
            }
            (
                "messages",
                Value::Array(
                    msgs.iter()
                        .map(|(r, c)| json!({"role": r, "content": c}))
                        .collect(),
                ),
            )
        }
    };
    let mut lines = Vec::new();
    for i in 0..p.n {
        let mut line = json!({
            "id": format!("c{i}"),
            "op": "generate",
            "model": local.path.display().to_string(),
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "seed": p.seed.wrapping_add(i as u64),
            "stop": stop,
        });
        line[prompt_json.0] = prompt_json.1.clone();
        lines.push(line.to_string());
    }
    let jobs = crate::batch::parse_batch_str(&lines.join("\n"), std::path::Path::new("."))
        .map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let id = format!("{kind}-{}", hex::encode(rand::random::<[u8; 12]>()));
    let out =
        tempfile::tempdir().map_err(|e| internal(format!("cannot make a scratch folder: {e}")))?;
    let opts = SubmitOptions {
        batch_id: Some(id.replace('_', "-")),
        out_dir: Some(out.path().to_path_buf()),
        progress: false,
        ..state.submit.clone()
    };
    let m = &state.metrics;
    m.queued.inc();
    let permit = state.inflight.acquire().await;
    m.queued.dec();
    let _permit = permit.map_err(|_| internal("shutting down"))?;
    m.inflight.inc();
    let report = crate::coordinator::submit(&state.nats, jobs, &opts).await;
    m.inflight.dec();
    if let Ok(r) = &report {
        if !r.faults.is_empty() {
            let enrolled = crate::nats::enrollments(&state.nats)
                .await
                .unwrap_or_default();
            for f in &r.faults {
                let operator = enrolled.get(&f.worker).map_or("", |e| e.operator.as_str());
                m.faults.with_label_values(&[&f.worker, operator]).inc();
            }
        }
        for j in &r.jobs {
            if let Some(d) = &j.dispute {
                m.disputes.inc();
                m.dispute_seconds.observe(d.total_ms / 1e3);
            }
        }
    }
    let report = report.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "not_verified",
            format!("the request could not be verified: {e:#}"),
        )
    })?;
    let receipts_text =
        std::fs::read_to_string(out.path().join("receipts.jsonl")).unwrap_or_default();
    let receipts: Vec<Value> = receipts_text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut choices = Vec::new();
    for i in 0..p.n {
        let job = format!("c{i}");
        let j = report
            .jobs
            .iter()
            .find(|j| j.job == job)
            .ok_or_else(|| internal(format!("choice {i} is missing from the report")))?;
        if !matches!(j.verdict, Verdict::Verified | Verdict::Resolved) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "not_verified",
                format!(
                    "choice {i} was not verified ({:?}): {}",
                    j.verdict,
                    j.reason
                        .clone()
                        .unwrap_or_else(|| "no agreeing workers in time".into())
                ),
            ));
        }
        let g = j
            .generation
            .as_ref()
            .ok_or_else(|| internal(format!("choice {i} has no generation")))?;
        let mut ids = g.output_ids.clone();
        let stopped = ids.last().is_some_and(|t| stop.contains(t));
        if stopped {
            ids.pop();
        }
        let text = match tok {
            Some(t) => t.decode(&ids).map_err(|e| internal(format!("{e:#}")))?,
            None => String::new(),
        };
        choices.push(Choice {
            text,
            finish_reason: if stopped { "stop" } else { "length" },
            prompt_tokens: g.prompt_ids.len(),
            completion_tokens: g.output_ids.len(),
            output_ids: g.output_ids.clone(),
            verdict: j.verdict,
            workers: j.results.iter().map(|r| r.worker.clone()).collect(),
        });
    }
    for ch in &choices {
        let v = format!("{:?}", ch.verdict).to_lowercase();
        m.completions.with_label_values(&[&v]).inc();
        m.tokens
            .with_label_values(&["completion"])
            .inc_by(ch.completion_tokens as u64);
    }
    m.tokens
        .with_label_values(&["prompt"])
        .inc_by(choices.first().map_or(0, |c| c.prompt_tokens) as u64);
    let stored = json!({"id": id, "receipts": receipts});
    let bytes = serde_json::to_vec(&stored).map_err(|e| internal(e.to_string()))?;
    let digest = hex::encode(<sha3::Sha3_256 as sha3::Digest>::digest(&bytes));
    state.receipts.put(&id, &bytes)?;
    Ok(Completion {
        id,
        choices,
        receipts,
        receipt_digest: format!("sha3-256:{digest}"),
        seed: p.seed,
    })
}

pub fn internal(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "internal",
        message,
    )
}

/// The `lockstep` field of a response: what makes it checkable.
pub fn lockstep_field(c: &Completion) -> Value {
    json!({
        "verified": true,
        "receipt_id": c.id,
        "receipt_digest": c.receipt_digest,
        "receipts": c.receipts,
        "seed": c.seed,
        "choices": c.choices.iter().map(|ch| json!({
            "verdict": ch.verdict,
            "workers": ch.workers,
            "output_ids": ch.output_ids,
        })).collect::<Vec<_>>(),
    })
}

pub fn with_receipt_header(mut r: Response, c: &Completion) -> Response {
    if let Ok(v) = HeaderValue::from_str(&c.receipt_digest) {
        r.headers_mut().insert("x-lockstep-receipt", v);
    }
    r
}

/// The bearer key of a request, checked against the key file.
pub fn authorize(state: &State, headers: &HeaderMap) -> ApiResult<super::keys::KeyRecord> {
    let unauthorized = |m: &str| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            m.to_string(),
        )
    };
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            unauthorized("no API key: send `Authorization: Bearer <key>` (lockstep keys add)")
        })?;
    state
        .keys
        .find(key)
        .ok_or_else(|| unauthorized("Incorrect API key provided"))
}
