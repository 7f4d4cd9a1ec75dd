//! Models by digest: `lockstep model push` stores a model file in the
//! model store ([`MODELS_BUCKET`]) under its model digest; workers fetch
//! it on first use ([`crate::worker::models`]) and check it before
//! computing with it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::object_store;
use lockstep_kernels::model::Model;
use lockstep_kernels::Digest;

use crate::nats::Nats;
use crate::protocol::*;

/// A model as the coordinator knows it: loaded, with its file and
/// tokenizer.
pub struct LocalModel {
    pub path: PathBuf,
    pub model: std::sync::Arc<Model>,
    pub tokenizer: Option<super::tokenizer::TextTokenizer>,
}

impl LocalModel {
    /// [`LocalModel::load`], once per file in this process: a batch's lines
    /// and the coordinator's push share one load (and one hash of the
    /// weights) while the file's size and modification time stay the same.
    pub fn load_shared(spec: &str) -> Result<std::sync::Arc<Self>> {
        use std::sync::{Arc, Mutex, OnceLock};
        type Key = (PathBuf, u64, Option<std::time::SystemTime>);
        type Loaded = Mutex<Vec<(Key, Arc<LocalModel>)>>;
        static LOADED: OnceLock<Loaded> = OnceLock::new();
        let path = super::models::resolve(spec)?;
        let meta =
            std::fs::metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let key: Key = (path.clone(), meta.len(), meta.modified().ok());
        let loaded = LOADED.get_or_init(Default::default);
        if let Some((_, m)) = loaded
            .lock()
            .expect("not poisoned")
            .iter()
            .find(|(k, _)| *k == key)
        {
            return Ok(m.clone());
        }
        let m = Arc::new(Self::load(&path.display().to_string())?);
        let mut l = loaded.lock().expect("not poisoned");
        l.push((key, m.clone()));
        if l.len() > 4 {
            l.remove(0);
        }
        Ok(m)
    }

    pub fn load(spec: &str) -> Result<Self> {
        let path = super::models::resolve(spec)?;
        if path.is_dir() {
            bail!(
                "{}: a folder (Hugging Face) cannot be pushed yet: give one file (a .gguf or llama2.c .bin)",
                path.display()
            );
        }
        let (model, tokenizer) = super::generate::load(&path.display().to_string())?;
        Ok(Self {
            path,
            model: std::sync::Arc::new(model),
            tokenizer,
        })
    }
}

/// What [`push`] did.
pub struct Pushed {
    pub digest: Digest,
    pub bytes: u64,
    /// It was already in the store (nothing was written).
    pub present: bool,
}

/// Whether the model store holds a model under this digest.
pub async fn exists(nats: &Nats, digest: &Digest) -> bool {
    nats.models
        .info(digest.to_hex())
        .await
        .is_ok_and(|i| !i.deleted)
}

/// Stores the file of `model` under its digest, unless it is there already
/// with the same size.
pub async fn push(nats: &Nats, model: &LocalModel) -> Result<Pushed> {
    let digest = model.model.digest;
    let bytes = std::fs::metadata(&model.path)
        .with_context(|| format!("cannot read {}", model.path.display()))?
        .len();
    if let Ok(info) = nats.models.info(digest.to_hex()).await {
        if !info.deleted && info.size as u64 == bytes {
            return Ok(Pushed {
                digest,
                bytes,
                present: true,
            });
        }
    }
    let file = tokio::fs::File::open(&model.path)
        .await
        .with_context(|| format!("cannot open {}", model.path.display()))?;
    let meta = object_store::ObjectMetadata {
        name: digest.to_hex(),
        description: Some(
            model
                .path
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default(),
        ),
        chunk_size: Some((128 << 10).min(message_limit(nats.max_payload()))),
        ..Default::default()
    };
    let mut reader = tokio::io::BufReader::new(file);
    nats.models
        .put(meta, &mut reader)
        .await
        .map_err(|e| anyhow::anyhow!("cannot store model {digest}: {e}"))?;
    Ok(Pushed {
        digest,
        bytes,
        present: false,
    })
}

/// `lockstep model push` and `lockstep model list`.
#[derive(clap::Subcommand, Debug)]
pub enum ModelCommand {
    /// Store a model file in the model store under its model digest, so
    /// workers can fetch it. Coordinators and admins only.
    Push {
        /// A .gguf file, a llama2.c checkpoint, or a name: smollm2,
        /// stories260K, aidreams260K.
        model: String,
    },
    /// The models in the store: digest, size, file name.
    List,
}

pub async fn run(cfg: &crate::auth::ConnectConfig, cmd: ModelCommand) -> Result<()> {
    let nats = crate::nats::connect(cfg).await?;
    match cmd {
        ModelCommand::Push { model } => {
            let local = LocalModel::load(&model)?;
            let p = push(&nats, &local).await?;
            println!(
                "{} {} ({} bytes, {}){}",
                if p.present { "present" } else { "stored" },
                p.digest,
                p.bytes,
                local.path.display(),
                local
                    .tokenizer
                    .as_ref()
                    .map(|t| format!("; tokenizer {}", t.digest))
                    .unwrap_or_default()
            );
        }
        ModelCommand::List => {
            use futures::StreamExt;
            let mut list = nats
                .models
                .list()
                .await
                .map_err(|e| anyhow::anyhow!("cannot list models: {e}"))?;
            while let Some(info) = list.next().await {
                let info = info.map_err(|e| anyhow::anyhow!("cannot list models: {e}"))?;
                if info.deleted {
                    continue;
                }
                println!(
                    "sha3-256:{}  {:>12} bytes  {}",
                    info.name,
                    info.size,
                    info.description.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// Checks a model file fetched from the store: loads it from `path` and
/// compares its model digest with the name it was fetched by.
pub fn load_checked(path: &Path, digest: &Digest) -> Result<Model, String> {
    let model = Model::load(path).map_err(|e| format!("model {digest} does not load: {e}"))?;
    if model.digest != *digest {
        return Err(format!(
            "the model stored as {digest} hashes to {}",
            model.digest
        ));
    }
    Ok(model)
}
