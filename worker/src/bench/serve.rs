//! `lockstep bench serve`: completions through the HTTP API at several
//! numbers of concurrent clients, verified (r = 2) against the same two
//! workers answering unverified (r = 1), in the same run; plus what the
//! HTTP layer adds, as the median of the same request over HTTP against
//! the same request handed to the server's code directly, interleaved.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::coordinator::SubmitOptions;
use crate::llm::distribute::LocalModel;
use crate::serve::{api, keys, Limits, Served, State};

use super::llm::TEXTS as PROMPTS;

#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub clients: usize,
    pub redundancy: u32,
    pub requests: usize,
    pub completions_per_s: f64,
    pub completion_tok_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Arrival to the first verified token (today the whole completion).
    pub ttft_p50_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct ServeBench {
    pub model: String,
    pub max_tokens: usize,
    pub points: Vec<Point>,
    /// Verified ÷ unverified completions/s, per number of clients.
    pub ratios: Vec<(usize, f64)>,
    pub direct_p50_ms: f64,
    pub http_p50_ms: f64,
    /// What the HTTP layer adds to a request's median latency.
    pub http_overhead_p50_ms: f64,
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// One POST over a fresh connection; the status and body.
async fn post(
    addr: std::net::SocketAddr,
    path: &str,
    key: &str,
    body: &str,
) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).await?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = resp.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    Ok((status, body))
}

fn request(model: &str, i: usize, max_tokens: usize) -> String {
    serde_json::json!({
        "model": model,
        "prompt": PROMPTS[i % PROMPTS.len()],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
    .to_string()
}

pub fn bench_serve(
    model: &str,
    clients: &[usize],
    requests: usize,
    max_tokens: usize,
    threads: usize,
    mut progress: impl FnMut(&str),
) -> Result<ServeBench> {
    if clients.is_empty() || clients.contains(&0) || requests == 0 || max_tokens == 0 {
        bail!("--clients, --requests and --max-tokens must be at least 1");
    }
    let local = LocalModel::load_shared(model)?;
    if local.tokenizer.is_none() {
        bail!("bench serve sends text prompts: give a model with a tokenizer (smollm2)");
    }
    let server = crate::harness::NatsServer::start().context("cannot start a local nats-server")?;
    let mut procs = crate::harness::WorkerProcs::new(std::env::current_exe()?);
    let names = ["bench-serve-1", "bench-serve-2"];
    let (threads_arg, conc_arg) = (threads.to_string(), "8".to_string());
    for n in names {
        procs.spawn(
            &server,
            n,
            "cpu",
            &["--threads", &threads_arg, "--concurrency", &conc_arg],
            &[],
        )?;
    }
    let dir = server.dir();
    let key = "lsk-bench";
    keys::KeyFile {
        keys: vec![keys::KeyRecord {
            id: "key-bench".into(),
            name: "bench".into(),
            sha3: keys::hash(key),
            created_unix: 0,
            revoked: false,
            requests_per_minute: 0,
            concurrency: 0,
        }],
    }
    .save(&dir)?;
    let signer = Arc::new(
        server
            .coordinator()
            .identity()?
            .context("the harness's coordinator has a key")?,
    );
    let name = "model".to_string();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let nats = server.connect().await?;
        crate::nats::wait_for_workers(&nats, &names, Duration::from_secs(120)).await?;
        let mut addrs = Vec::new();
        let mut states = Vec::new();
        for r in [1u32, 2] {
            let receipts = tempfile::tempdir()?.keep();
            let state = State::new(
                nats.clone(),
                SubmitOptions {
                    redundancy: r,
                    deadline: Some(Duration::from_secs(600)),
                    progress: false,
                    signer: Some(signer.clone()),
                    ..Default::default()
                },
                vec![Served {
                    name: name.clone(),
                    local: local.clone(),
                }],
                Limits {
                    max_tokens: 4096,
                    max_n: 8,
                    max_prompt_bytes: 1 << 20,
                },
                &dir,
                receipts,
                256,
            )?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(listener.local_addr()?);
            let app = crate::serve::router(state.clone(), 1 << 20);
            tokio::spawn(async move { axum::serve(listener, app).await });
            states.push(state);
        }
        // Warm up: both workers load the model.
        let (status, body) = post(addrs[1], "/v1/completions", key, &request(&name, 0, 2)).await?;
        anyhow::ensure!(status == 200, "warm-up failed: {status} {body}");
        let mut points = Vec::new();
        for &c in clients {
            for (ri, r) in [(0usize, 1u32), (1, 2)] {
                let t = Instant::now();
                let tasks: Vec<_> = (0..c)
                    .map(|client| {
                        let (addr, name) = (addrs[ri], name.clone());
                        tokio::spawn(async move {
                            let mut lat = Vec::new();
                            let mut tokens = 0u64;
                            for i in 0..requests {
                                let t = Instant::now();
                                let (status, body) =
                                    post(addr, "/v1/completions", key, &request(&name, client + i, max_tokens)).await?;
                                anyhow::ensure!(status == 200, "request failed: {status} {body}");
                                lat.push(t.elapsed().as_secs_f64() * 1e3);
                                let v: serde_json::Value = serde_json::from_str(&body)?;
                                tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                            }
                            anyhow::Ok((lat, tokens))
                        })
                    })
                    .collect();
                let mut lat = Vec::new();
                let mut tokens = 0;
                for task in tasks {
                    let (l, n) = task.await??;
                    lat.extend(l);
                    tokens += n;
                }
                let secs = t.elapsed().as_secs_f64();
                let p = Point {
                    clients: c,
                    redundancy: r,
                    requests: lat.len(),
                    completions_per_s: lat.len() as f64 / secs,
                    completion_tok_s: tokens as f64 / secs,
                    p50_ms: quantile(&lat, 0.5),
                    p99_ms: quantile(&lat, 0.99),
                    ttft_p50_ms: quantile(&lat, 0.5),
                };
                progress(&format!(
                    "{c} client(s), r = {r}: {:.2} completions/s, {:.1} tok/s, p50 {:.0} ms, p99 {:.0} ms",
                    p.completions_per_s, p.completion_tok_s, p.p50_ms, p.p99_ms
                ));
                points.push(p);
            }
        }
        // The HTTP layer's cost: the same request directly and over HTTP,
        // interleaved, one at a time, r = 1.
        let (mut direct, mut http) = (Vec::new(), Vec::new());
        let p = api::Params {
            max_tokens: 1,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            n: 1,
            stop: Vec::new(),
            stream: false,
        };
        for i in 0..15 {
            let t = Instant::now();
            api::complete(&states[0], &name, api::Prompt::Text(PROMPTS[i % PROMPTS.len()].into()), &p, "cmpl")
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            direct.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let (status, body) = post(addrs[0], "/v1/completions", key, &request(&name, i, 1)).await?;
            anyhow::ensure!(status == 200, "request failed: {status} {body}");
            http.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (d, h) = (quantile(&direct, 0.5), quantile(&http, 0.5));
        let ratios = clients
            .iter()
            .map(|&c| {
                let get = |r| {
                    points
                        .iter()
                        .find(|p| p.clients == c && p.redundancy == r)
                        .map_or(0.0, |p| p.completions_per_s)
                };
                (c, get(2) / get(1))
            })
            .collect();
        Ok(ServeBench {
            model: local.path.display().to_string(),
            max_tokens,
            points,
            ratios,
            direct_p50_ms: d,
            http_p50_ms: h,
            http_overhead_p50_ms: h - d,
        })
    })
}
