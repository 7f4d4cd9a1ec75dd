//! Where the tests find models: `../shared/models` beside the repository,
//! and the pinned SmolLM2 GGUF that `./dev` unpacks under `.tools/`.

use std::path::PathBuf;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A model from `../shared/models` (present in CI and here).
pub fn shared_model(name: &str) -> PathBuf {
    let p = repo_root()
        .parent()
        .unwrap()
        .join("shared/models")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: ../shared must sit beside the repository",
        p.display()
    );
    p
}

/// The SmolLM2-135M Q4_1 GGUF, when `./dev` has fetched it; a test that
/// needs it fails under `LOCKSTEP_REQUIRE_MODELS=1` (as `./dev test` sets)
/// and skips otherwise.
pub fn smollm2() -> Option<PathBuf> {
    match lockstep::llm::models::resolve("smollm2") {
        Ok(p) => Some(p),
        Err(e) => {
            if std::env::var_os("LOCKSTEP_REQUIRE_MODELS").is_some() {
                panic!("{e:#}");
            }
            eprintln!("skipped: {e:#}");
            None
        }
    }
}
