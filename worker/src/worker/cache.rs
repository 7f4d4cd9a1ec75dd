//! Inputs and outputs of jobs: inline tensors decoded, objects fetched from
//! the object store through a local cache, every object re-hashed against
//! its name; large outputs stored in the outputs stream.

use lockstep_kernels::Digest;

use super::handler::{job_err, JobError};
use super::Ctx;
use crate::protocol::*;

/// The tensor's data: decoded inline, or fetched from the object store (or
/// the local cache) and re-hashed against its name.
pub(super) async fn fetch(ctx: &Ctx, t: &TensorRef) -> Result<Vec<f32>, JobError> {
    let n = t.elements().unwrap_or(0);
    if let Some(b64) = &t.inline {
        let data = decode_f32(b64).map_err(|e| job_err(ErrorCode::BadShape, e))?;
        if data.len() != n {
            return Err(job_err(
                ErrorCode::BadShape,
                format!(
                    "inline tensor {:?} has {} values, expected {n}",
                    t.shape,
                    data.len()
                ),
            ));
        }
        return Ok(data);
    }
    let digest = t.object.expect("checked: inline or object");
    let cached = ctx.cache.join(digest.to_hex());
    // The local copy is checked on every read; a damaged one (a flipped
    // byte, truncated, another blob's bytes) is this worker's own disk
    // trouble, never a verdict on the job: it is dropped and fetched again.
    if let Ok(bytes) = std::fs::read(&cached) {
        match decode_blob(&t.shape, &digest, &bytes) {
            Ok(data) => {
                // Used now: the last to go when the cache is trimmed.
                if let Ok(f) = std::fs::File::options().append(true).open(&cached) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                return Ok(data);
            }
            Err(e) => {
                tracing::warn!(%digest, "the local copy of an input is damaged ({e}); fetching it again");
                let _ = std::fs::remove_file(&cached);
            }
        }
    }
    let bytes = ctx.nats.blob(&digest).await.map_err(|e| {
        // Absent: the job names a blob nobody stored (its fault). Any
        // other failure to read it is the system's.
        let code = if crate::nats::blob_missing(&e) {
            ErrorCode::MissingBlob
        } else {
            ErrorCode::Unpublishable
        };
        job_err(code, format!("input {}", shorten(&format!("{e:#}"), 200)))
    })?;
    // Only what the store itself serves wrongly is `tampered_blob`.
    let data =
        decode_blob(&t.shape, &digest, &bytes).map_err(|e| job_err(ErrorCode::TamperedBlob, e))?;
    // Write then rename: a reader never sees a partial blob.
    let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, &bytes).is_ok() {
        let _ = std::fs::rename(&tmp, &cached);
        trim(&ctx.cache, ctx.opts.cache_bytes);
    }
    Ok(data)
}

/// Keeps the blob cache within `max` bytes: the least recently used
/// entries (oldest modification time; a read refreshes it) are removed
/// first.
pub(super) fn trim(dir: &std::path::Path, max: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, u64, std::path::PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok().filter(|m| m.is_file())?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    if total <= max {
        return;
    }
    files.sort();
    for (_, len, path) in files {
        if total <= max {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}

/// Stores an output too large for the result message in the outputs stream,
/// under this worker's name (the only place it may write; readers re-hash).
pub(super) async fn put_output(
    ctx: &Ctx,
    batch: &str,
    digest: &Digest,
    data: &[f32],
) -> Result<(), JobError> {
    ctx.nats
        .put_output(&ctx.opts.name, batch, digest, data)
        .await
        .map_err(|e| {
            job_err(
                ErrorCode::Unpublishable,
                format!(
                    "cannot store an output: {}",
                    shorten(&format!("{e:#}"), 200)
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cache_is_trimmed_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            let p = dir.path().join(name);
            std::fs::write(&p, vec![0u8; 1000]).unwrap();
            let f = std::fs::File::options().append(true).open(&p).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(10 * i as u64))
                .unwrap();
        }
        super::trim(dir.path(), 2500);
        assert!(!dir.path().join("old").exists());
        assert!(dir.path().join("mid").exists() && dir.path().join("new").exists());
        super::trim(dir.path(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
