//! Prometheus metrics (the `prometheus` crate's registry and text format)
//! of `lockstep serve` (`/metrics` beside the API) and of every worker
//! (`lockstep worker --metrics ADDR`). The names are documented in
//! docs/METRICS.md; a Grafana dashboard is in docs/grafana-lockstep.json.

use std::net::SocketAddr;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

/// Latency buckets, seconds: 5 ms to 5 minutes.
const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(SECONDS.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

/// The text exposition format of a registry.
pub fn render(r: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&r.gather(), &mut buf)
        .expect("text encoding cannot fail");
    String::from_utf8(buf).expect("the text format is UTF-8")
}

/// This process's resident memory, bytes (0 where /proc is absent).
pub fn resident_bytes() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or(0.0, |k| k * 1024.0)
}

/// `lockstep serve`'s metrics.
pub struct ServeMetrics {
    pub registry: Registry,
    /// By endpoint and HTTP status.
    pub requests: IntCounterVec,
    /// Request latency by endpoint (successful requests).
    pub latency: HistogramVec,
    /// Time from a request's arrival to its first verified token (today:
    /// the whole completion is verified first).
    pub first_token: HistogramVec,
    /// Completions (choices) by verdict: verified, resolved.
    pub completions: IntCounterVec,
    /// Tokens by kind: prompt, completion (verified only).
    pub tokens: IntCounterVec,
    /// Requests being verified now.
    pub inflight: IntGauge,
    /// Requests waiting for a verification slot.
    pub queued: IntGauge,
    /// Faults found while verifying, by worker and operator.
    pub faults: IntCounterVec,
    /// Disputes settled, and what settling them cost.
    pub disputes: IntCounter,
    pub dispute_seconds: Histogram,
    /// Live workers by backend and state, read from the bus at each scrape.
    pub workers: GaugeVec,
    pub resident: Gauge,
}

impl Default for ServeMetrics {
    fn default() -> Self {
        let r = Registry::new();
        let g = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            r.register(Box::new(g.clone())).expect("registered once");
            g
        };
        let inflight = g(
            "lockstep_serve_inflight_requests",
            "Requests being verified now",
        );
        let queued = g(
            "lockstep_serve_queued_requests",
            "Requests waiting for a verification slot",
        );
        let disputes = IntCounter::new(
            "lockstep_serve_disputes_total",
            "Disputes settled while verifying",
        )
        .expect("valid metric");
        r.register(Box::new(disputes.clone()))
            .expect("registered once");
        let workers = GaugeVec::new(
            Opts::new(
                "lockstep_workers",
                "Live workers on the bus, by backend and state",
            ),
            &["backend", "state"],
        )
        .expect("valid metric");
        r.register(Box::new(workers.clone()))
            .expect("registered once");
        let resident = Gauge::new(
            "lockstep_serve_resident_memory_bytes",
            "Resident memory of lockstep serve",
        )
        .expect("valid metric");
        r.register(Box::new(resident.clone()))
            .expect("registered once");
        Self {
            requests: counter(
                &r,
                "lockstep_serve_requests_total",
                "HTTP requests by endpoint and status",
                &["endpoint", "status"],
            ),
            latency: histogram(
                &r,
                "lockstep_serve_request_seconds",
                "Latency of successful requests",
                &["endpoint"],
            ),
            first_token: histogram(
                &r,
                "lockstep_serve_time_to_first_verified_token_seconds",
                "Arrival to first verified token",
                &["endpoint"],
            ),
            completions: counter(
                &r,
                "lockstep_serve_completions_total",
                "Choices returned, by verdict",
                &["verdict"],
            ),
            tokens: counter(
                &r,
                "lockstep_serve_tokens_total",
                "Verified tokens, by kind (prompt, completion)",
                &["kind"],
            ),
            faults: counter(
                &r,
                "lockstep_serve_faults_total",
                "Faults found while verifying, by worker and operator",
                &["worker", "operator"],
            ),
            dispute_seconds: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "lockstep_serve_dispute_seconds",
                        "Time to settle a dispute",
                    )
                    .buckets(SECONDS.to_vec()),
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("registered once");
                h
            },
            inflight,
            queued,
            disputes,
            workers,
            resident,
            registry: r,
        }
    }
}

/// A worker's metrics.
pub struct WorkerMetrics {
    pub registry: Registry,
    /// Jobs by op and outcome (ok, or the error code).
    pub jobs: IntCounterVec,
    pub job_seconds: HistogramVec,
    /// Tokens generated.
    pub tokens: IntCounter,
    pub models_loaded: IntGauge,
    pub inflight: IntGauge,
    /// 1, labelled with the backend, device and arithmetic path.
    pub backend: GaugeVec,
    pub resident: Gauge,
}

impl WorkerMetrics {
    pub fn new(backend: &str, device: &str, path: &str) -> Self {
        let r = Registry::new();
        let tokens = IntCounter::new("lockstep_worker_tokens_total", "Tokens generated")
            .expect("valid metric");
        r.register(Box::new(tokens.clone()))
            .expect("registered once");
        let models_loaded =
            IntGauge::new("lockstep_worker_models_loaded", "Models loaded").expect("valid metric");
        r.register(Box::new(models_loaded.clone()))
            .expect("registered once");
        let inflight = IntGauge::new("lockstep_worker_inflight_jobs", "Jobs being computed")
            .expect("valid metric");
        r.register(Box::new(inflight.clone()))
            .expect("registered once");
        let b = GaugeVec::new(
            Opts::new(
                "lockstep_worker_backend_info",
                "The backend this worker computes on (value 1)",
            ),
            &["backend", "device", "path"],
        )
        .expect("valid metric");
        r.register(Box::new(b.clone())).expect("registered once");
        b.with_label_values(&[backend, device, path]).set(1.0);
        let resident = Gauge::new(
            "lockstep_worker_resident_memory_bytes",
            "Resident memory of the worker",
        )
        .expect("valid metric");
        r.register(Box::new(resident.clone()))
            .expect("registered once");
        Self {
            jobs: counter(
                &r,
                "lockstep_worker_jobs_total",
                "Jobs answered, by op and outcome",
                &["op", "outcome"],
            ),
            job_seconds: histogram(
                &r,
                "lockstep_worker_job_seconds",
                "Time to answer a job, by op",
                &["op"],
            ),
            tokens,
            models_loaded,
            inflight,
            backend: b,
            resident,
            registry: r,
        }
    }
}

/// Serves `GET /metrics` (whatever `render` returns) on `addr` until the
/// process ends; returns the bound address.
pub async fn serve_metrics(
    addr: SocketAddr,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> anyhow::Result<SocketAddr> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let render = render.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], render()) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server failed: {e}");
        }
    });
    Ok(bound)
}
