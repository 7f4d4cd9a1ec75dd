//! Models a worker holds: files fetched from the model store by digest
//! and cached on disk (least recently used go first past a size limit),
//! and a few loaded in memory, each with its own decoding thread that runs
//! every generate job for that model as one batch (sequences join and
//! leave between passes: [`lockstep_kernels::model::generate::Batch`]).

use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use lockstep_kernels::contract::Generate;
use lockstep_kernels::cpu::Isa;
use lockstep_kernels::model::generate::{Batch, Generation, Replay, TestFault};
use lockstep_kernels::model::{Engine, Forward, Model};
use lockstep_kernels::wgpu::{WgpuBackend, WgpuModel};
use lockstep_kernels::Digest;
use tokio::sync::oneshot;

use super::handler::{job_err, JobError};
use super::Ctx;
use crate::protocol::ErrorCode;

/// One generation asked of a model's thread.
struct Request {
    prompt: Vec<u32>,
    params: Generate,
    fault: TestFault,
    reply: oneshot::Sender<lockstep_kernels::Result<Generation>>,
}

/// Where a worker's models decode: the CPU engine, or the WGSL or CUDA
/// engine on the worker's device (the same bits). Dispute replays run on the
/// CPU engine either way: a replay's bits are the generation's, whichever
/// engine produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Cpu,
    Wgpu,
    Cuda,
}

/// A loaded model and the thread that decodes for it.
pub struct Runner {
    pub digest: Digest,
    pub bytes: u64,
    pub model: Arc<Model>,
    /// The tokenizer digest of the model file's tokenizer (GGUF), if any.
    pub tokenizer: Option<Digest>,
    threads: usize,
    tx: Mutex<mpsc::Sender<Request>>,
}

impl Runner {
    fn start(
        model: Model,
        bytes: u64,
        threads: usize,
        kind: EngineKind,
    ) -> Result<Arc<Self>, String> {
        let digest = model.digest;
        let tokenizer = model
            .gguf
            .as_ref()
            .map(crate::llm::tokenizer::tokenizer_digest);
        let model = Arc::new(model);
        let shared = model.clone();
        let (tx, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("model-{}", &digest.to_hex()[..8]))
            .spawn(move || {
                let fail = |e: lockstep_kernels::Error| {
                    let _ = ready_tx.send(Err(e.to_string()));
                };
                match kind {
                    EngineKind::Cpu => match Engine::new(&model, threads, Isa::detect()) {
                        Ok(engine) => {
                            let _ = ready_tx.send(Ok(()));
                            decode_loop(&engine, rx);
                        }
                        Err(e) => fail(e),
                    },
                    EngineKind::Wgpu => {
                        let gpu = match WgpuBackend::new(Default::default()) {
                            Ok(g) => g,
                            Err(e) => return fail(e),
                        };
                        match WgpuModel::new(&gpu, &model) {
                            Ok(engine) => {
                                tracing::info!(engine = %engine.describe(), "model on the GPU");
                                let _ = ready_tx.send(Ok(()));
                                decode_loop(&engine, rx);
                            }
                            Err(e) => fail(e),
                        }
                    }
                    EngineKind::Cuda => {
                        let gpu = match lockstep_kernels::cuda::CudaBackend::new(0) {
                            Ok(g) => g,
                            Err(e) => return fail(e),
                        };
                        match lockstep_kernels::cuda::CudaModel::new(&gpu, &model) {
                            Ok(engine) => {
                                tracing::info!(engine = %engine.describe(), "model on the GPU");
                                let _ = ready_tx.send(Ok(()));
                                decode_loop(&engine, rx);
                            }
                            Err(e) => fail(e),
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start a decoding thread: {e}"))?;
        ready_rx
            .recv()
            .map_err(|_| "the decoding thread died".to_string())??;
        Ok(Arc::new(Self {
            digest,
            bytes,
            model: shared,
            tokenizer,
            threads,
            tx: Mutex::new(tx),
        }))
    }

    /// Replays a generation's fed tokens (a dispute query) on a team of its
    /// own, beside the decoding thread.
    pub async fn replay(
        &self,
        tokens: Vec<u32>,
        capture: Option<usize>,
        fault: TestFault,
    ) -> lockstep_kernels::Result<Replay> {
        let (model, threads) = (self.model.clone(), self.threads);
        tokio::task::spawn_blocking(move || {
            let engine = Engine::new(&model, threads, Isa::detect())?;
            lockstep_kernels::model::generate::replay(&engine, &tokens, capture, fault)
        })
        .await
        .unwrap_or_else(|e| {
            Err(lockstep_kernels::Error::device(format!(
                "replay task failed: {e}"
            )))
        })
    }

    /// Generates on this model's thread, beside whatever else it decodes.
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        params: Generate,
        fault: TestFault,
    ) -> lockstep_kernels::Result<Generation> {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.lock().expect("not poisoned").send(Request {
            prompt,
            params,
            fault,
            reply,
        });
        if sent.is_err() {
            return Err(lockstep_kernels::Error::device(
                "the decoding thread stopped",
            ));
        }
        rx.await.unwrap_or_else(|_| {
            Err(lockstep_kernels::Error::device(
                "the decoding thread stopped",
            ))
        })
    }
}

/// Continuous batching: wait for work when idle; before every pass, let
/// in every request that arrived; after it, answer those that finished.
fn decode_loop<E: Forward>(engine: &E, rx: mpsc::Receiver<Request>) {
    let mut batch: Batch<'_, _, oneshot::Sender<_>> = Batch::new(engine);
    loop {
        let first = if batch.is_empty() {
            match rx.recv() {
                Ok(r) => Some(r),
                Err(_) => return,
            }
        } else {
            None
        };
        for r in first.into_iter().chain(rx.try_iter()) {
            // A request the model cannot run is answered at once.
            if let Err((e, reply)) = batch.join(r.reply, r.prompt, r.params, r.fault) {
                let _ = reply.send(Err(e));
            }
        }
        match batch.step() {
            Ok(done) => {
                for (reply, g) in done {
                    let _ = reply.send(Ok(g));
                }
            }
            Err(e) => {
                // A pass failed (it should not: requests were checked at
                // join): every sequence in it fails.
                tracing::error!("decoding pass failed: {e}");
                for reply in batch.drain() {
                    let _ = reply.send(Err(lockstep_kernels::Error::device(e.to_string())));
                }
            }
        }
    }
}

/// The worker's models: on disk and loaded.
pub struct Models {
    dir: PathBuf,
    /// Most bytes of model files kept on disk.
    disk_bytes: u64,
    /// The largest model file this worker takes.
    max_model_bytes: u64,
    /// Models kept loaded (least recently used unloaded first).
    max_loaded: usize,
    threads: usize,
    engine: EngineKind,
    /// Loaded, most recently used last.
    loaded: Mutex<Vec<Arc<Runner>>>,
    /// One fetch or load at a time (a second job for the same model then
    /// finds it loaded).
    loading: tokio::sync::Mutex<()>,
}

impl Models {
    pub fn new(
        dir: PathBuf,
        disk_bytes: u64,
        max_model_bytes: u64,
        max_loaded: usize,
        threads: usize,
        engine: EngineKind,
    ) -> Self {
        Self {
            dir,
            disk_bytes,
            max_model_bytes,
            max_loaded: max_loaded.max(1),
            threads,
            engine,
            loaded: Mutex::new(Vec::new()),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// Digests of the models loaded now, for the worker's record.
    pub fn loaded(&self) -> Vec<Digest> {
        self.loaded
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|r| r.digest)
            .collect()
    }

    /// Digests of the model files on disk.
    pub fn on_disk(&self) -> Vec<Digest> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().to_string();
                Digest::parse(name.strip_suffix(".model")?)
            })
            .collect()
    }

    pub fn max_model_bytes(&self) -> u64 {
        self.max_model_bytes
    }

    fn find(&self, digest: &Digest) -> Option<Arc<Runner>> {
        let mut loaded = self.loaded.lock().expect("not poisoned");
        let i = loaded.iter().position(|r| r.digest == *digest)?;
        let r = loaded.remove(i);
        loaded.push(r.clone());
        Some(r)
    }

    /// The model, loaded: from memory, from the disk cache, or fetched from
    /// the model store (and checked: it must load and hash to `digest`).
    pub(super) async fn get(&self, ctx: &Ctx, digest: &Digest) -> Result<Arc<Runner>, JobError> {
        if let Some(r) = self.find(digest) {
            return Ok(r);
        }
        let _guard = self.loading.lock().await;
        if let Some(r) = self.find(digest) {
            return Ok(r);
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            job_err(
                ErrorCode::Backend,
                format!("cannot create the model cache {}: {e}", self.dir.display()),
            )
        })?;
        let path = self.dir.join(format!("{}.model", digest.to_hex()));
        if !path.is_file() {
            let missing = |e: anyhow::Error| {
                if crate::nats::blob_missing(&e) {
                    job_err(
                        ErrorCode::MissingBlob,
                        format!("model {digest} is not in the model store"),
                    )
                } else {
                    job_err(
                        ErrorCode::Backend,
                        format!("cannot fetch model {digest}: {e:#}"),
                    )
                }
            };
            // Refused before a byte is fetched when it is too large (the
            // read checks that the bytes are as many as the metadata says).
            let info = ctx.nats.model_info(digest).await.map_err(missing)?;
            self.check_size(digest, info.size as u64)?;
            let bytes = ctx.nats.model_file(digest, &info).await.map_err(missing)?;
            let tmp = self
                .dir
                .join(format!(".{}.{}", digest.to_hex(), std::process::id()));
            std::fs::write(&tmp, &bytes)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| {
                    job_err(
                        ErrorCode::Backend,
                        format!("cannot cache model {digest}: {e}"),
                    )
                })?;
            tracing::info!(%digest, bytes = bytes.len(), "model fetched");
        }
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        self.check_size(digest, bytes)?;
        // Touch: the disk cache drops the least recently used first.
        if let Ok(f) = std::fs::File::options().append(true).open(&path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        let (p, d, threads, kind) = (path.clone(), *digest, self.threads, self.engine);
        let started = tokio::task::spawn_blocking(move || {
            let model = crate::llm::distribute::load_checked(&p, &d)?;
            Runner::start(model, bytes, threads, kind)
        })
        .await
        .unwrap_or_else(|e| Err(format!("loading task failed: {e}")));
        let runner = match started {
            Ok(r) => r,
            Err(why) => {
                // A file that does not hash to its name is dropped, so the
                // next job fetches it again (the store may have been fixed).
                let _ = std::fs::remove_file(&path);
                tracing::error!(%digest, "model refused: {why}");
                return Err(job_err(ErrorCode::TamperedBlob, why));
            }
        };
        tracing::info!(%digest, "model loaded");
        {
            let mut loaded = self.loaded.lock().expect("not poisoned");
            loaded.push(runner.clone());
            while loaded.len() > self.max_loaded {
                let old = loaded.remove(0);
                tracing::info!(digest = %old.digest, "model unloaded (least recently used)");
            }
        }
        self.evict_disk(digest);
        Ok(runner)
    }

    fn check_size(&self, digest: &Digest, bytes: u64) -> Result<(), JobError> {
        if bytes > self.max_model_bytes {
            return Err(job_err(
                ErrorCode::TooLarge,
                format!(
                    "model {digest} is {bytes} bytes, over this worker's limit of {} (--max-model-mib)",
                    self.max_model_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Drops the least recently used model files past the disk limit
    /// (never `keep`, the one just used).
    fn evict_disk(&self, keep: &Digest) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let m = e.metadata().ok().filter(|m| m.is_file())?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        files.sort();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        let keep = format!("{}.model", keep.to_hex());
        for (_, len, path) in files {
            if total <= self.disk_bytes {
                break;
            }
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy() == keep)
            {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}
