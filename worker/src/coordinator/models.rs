//! The models a batch's generate jobs name: in the model store before any
//! replica goes out (pushed from the batch's files, or already there), and
//! loaded on the coordinator when it must recompute a generation itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use lockstep_kernels::model::generate::generate_all;
use lockstep_kernels::model::{Engine, Model};
use lockstep_kernels::{Digest, Op};

use crate::batch::BatchJob;
use crate::nats::Nats;
use crate::protocol::*;

/// Pushes every model file the batch names (once each), checks that every
/// other model a generate job names is in the store, and checks every
/// generate job against its model (prompt ids within the vocabulary,
/// prompt and max tokens within the context, the tokenizer digest the
/// model's own), so a worker's claim that a job does not fit its model can
/// be judged.
pub(super) async fn ensure_models(nats: &Nats, jobs: &[BatchJob]) -> Result<()> {
    let mut models: HashMap<Digest, (Arc<Model>, Option<Digest>)> = HashMap::new();
    for j in jobs {
        let Op::Generate(g) = &j.op else { continue };
        if let std::collections::hash_map::Entry::Vacant(slot) = models.entry(g.model) {
            let entry = match &j.model_file {
                Some(path) => {
                    let local = crate::llm::distribute::LocalModel::load_shared(
                        &path.display().to_string(),
                    )?;
                    anyhow::ensure!(
                        local.model.digest == g.model,
                        "{} changed since the batch was read",
                        path.display()
                    );
                    let p = crate::llm::distribute::push(nats, &local).await?;
                    tracing::info!(digest = %p.digest, bytes = p.bytes, present = p.present, "model in the store");
                    let tokenizer = local.tokenizer.as_ref().map(|t| t.digest);
                    remember(local.model.clone());
                    (local.model.clone(), tokenizer)
                }
                None => {
                    if !crate::llm::distribute::exists(nats, &g.model).await {
                        bail!(
                            "job `{}`: model {} is not in the model store (push it first: lockstep model push FILE)",
                            j.id,
                            g.model
                        );
                    }
                    let m = model(nats, &g.model).await?;
                    let tokenizer = m.gguf.as_ref().map(crate::llm::tokenizer::tokenizer_digest);
                    (m, tokenizer)
                }
            };
            slot.insert(entry);
        }
        let (model, tokenizer) = &models[&g.model];
        if let Some(crate::batch::Tensor::Data { data, .. }) = j.inputs.first() {
            let prompt = lockstep_kernels::contract::generate::prompt_ids(data)
                .map_err(|e| anyhow::anyhow!("job `{}`: {e}", j.id))?;
            lockstep_kernels::model::generate::check(model, &prompt, g)
                .map_err(|e| anyhow::anyhow!("job `{}`: {e}", j.id))?;
        }
        // Checked where the model's files say: a GGUF carries its
        // tokenizer; a local model's tokenizer files were read above.
        if let (Some(t), Some(have)) = (g.tokenizer, tokenizer) {
            anyhow::ensure!(
                t == *have,
                "job `{}`: tokenizer {t} is not the tokenizer of model {}",
                j.id,
                g.model
            );
        }
    }
    Ok(())
}

/// Models the coordinator loaded to recompute with (the last two).
fn loaded() -> &'static Mutex<Vec<Arc<Model>>> {
    static LOADED: OnceLock<Mutex<Vec<Arc<Model>>>> = OnceLock::new();
    LOADED.get_or_init(Default::default)
}

/// The model named `digest`, from the model store, checked.
pub(super) async fn model(nats: &Nats, digest: &Digest) -> Result<Arc<Model>> {
    if let Some(m) = loaded()
        .lock()
        .expect("not poisoned")
        .iter()
        .find(|m| m.digest == *digest)
    {
        return Ok(m.clone());
    }
    let bytes = crate::worker::bus::read_object(&nats.models_stream, MODELS_BUCKET, digest)
        .await
        .with_context(|| format!("cannot fetch model {digest}"))?;
    let d = *digest;
    let model = tokio::task::spawn_blocking(move || -> Result<Model> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("model");
        std::fs::write(&path, &bytes)?;
        crate::llm::distribute::load_checked(&path, &d).map_err(anyhow::Error::msg)
    })
    .await??;
    let model = Arc::new(model);
    remember(model.clone());
    Ok(model)
}

/// Keeps a loaded model for disputes (the last two).
fn remember(model: Arc<Model>) {
    let mut l = loaded().lock().expect("not poisoned");
    l.retain(|m| m.digest != model.digest);
    l.push(model);
    if l.len() > 2 {
        l.remove(0);
    }
}

/// A generate job's outputs, recomputed on the coordinator's CPU.
pub(super) async fn reference_generation(
    nats: &Nats,
    g: &lockstep_kernels::contract::Generate,
    prompt: Vec<f32>,
    threads: usize,
) -> Result<Vec<lockstep_kernels::Tensor>> {
    let model = model(nats, &g.model).await?;
    let prompt = lockstep_kernels::contract::generate::prompt_ids(&prompt)?;
    let g = g.clone();
    tokio::task::spawn_blocking(move || -> Result<Vec<lockstep_kernels::Tensor>> {
        let engine = Engine::new(&model, threads, lockstep_kernels::cpu::Isa::detect())?;
        let out = generate_all(&engine, &[(prompt, g)])?;
        Ok(out[0].outputs())
    })
    .await?
}
