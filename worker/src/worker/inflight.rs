//! Which job messages this worker was computing when it last stopped, kept on
//! disk, so that a restarted worker can take its unacked messages back at
//! once (instead of after the 30 s ack wait) and still give up on a message
//! that keeps killing it.
//!
//! Taking the messages back means re-creating the worker's consumer, which
//! resets the server's delivery count; the count kept here (one small file
//! per stream sequence, under `<cache>/.inflight/<worker>/<stream>/`, where
//! `<stream>` names the jobs stream by its creation time, since sequence
//! numbers start again in a new stream) survives that.

use std::path::PathBuf;

/// The in-flight records of one worker.
#[derive(Clone, Debug)]
pub(super) struct Inflight {
    dir: PathBuf,
}

impl Inflight {
    /// The records of `worker` for the jobs stream identified by `stream`
    /// (anything that differs between streams, e.g. its creation time).
    /// Records for other streams (a server since re-created) are removed.
    pub fn new(cache: &std::path::Path, worker: &str, stream: &str) -> Self {
        use sha3::Digest as _;
        let tag = hex::encode(&sha3::Sha3_256::digest(stream.as_bytes())[..8]);
        let base = cache.join(".inflight").join(worker);
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy() != tag {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(tag);
        let _ = std::fs::create_dir_all(&dir);
        Self { dir }
    }

    /// Records that the message at `seq` is being computed, and returns how
    /// many times this worker has started it (this time included).
    pub fn start(&self, seq: u64) -> i64 {
        let path = self.dir.join(seq.to_string());
        let before: i64 = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let _ = std::fs::write(&path, (before + 1).to_string());
        before + 1
    }

    /// The message at `seq` is answered and acked.
    pub fn done(&self, seq: u64) {
        let _ = std::fs::remove_file(self.dir.join(seq.to_string()));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn starts_are_counted_across_restarts_until_done() {
        let dir = tempfile::tempdir().unwrap();
        let a = super::Inflight::new(dir.path(), "w", "s1");
        assert_eq!(a.start(7), 1);
        // A restarted worker (a new Inflight over the same folder) sees the count.
        let b = super::Inflight::new(dir.path(), "w", "s1");
        assert_eq!(b.start(7), 2);
        assert_eq!(b.start(8), 1);
        b.done(7);
        assert_eq!(b.start(7), 1);
        // Another worker's counts are its own.
        assert_eq!(super::Inflight::new(dir.path(), "v", "s1").start(8), 1);
        // A new stream (sequence numbers start again) starts from nothing,
        // and the old stream's records are gone.
        let c = super::Inflight::new(dir.path(), "w", "s2");
        assert_eq!(c.start(8), 1);
        assert_eq!(super::Inflight::new(dir.path(), "w", "s1").start(8), 1);
    }
}
