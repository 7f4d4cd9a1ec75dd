//! Which job messages this worker was computing when it last stopped, kept on
//! disk, so that a restarted worker can take its unacked messages back at
//! once (instead of after the 30 s ack wait) and still give up on a message
//! that keeps killing it.
//!
//! Taking a message back means a negative acknowledgement on its
//! acknowledgement subject, kept here with the count of the times this
//! worker started it (one small file per stream sequence, under
//! `<cache>/.inflight/<worker>/<queue>/`, where `<queue>` names the
//! worker's consumer by its creation time, since a new one delivers anew).

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

    /// Records that the message at `seq` is being computed (with `reply`,
    /// the subject that acknowledges it), and returns how many times this
    /// worker has started it (this time included).
    pub fn start(&self, seq: u64, reply: &str) -> i64 {
        let path = self.dir.join(seq.to_string());
        let before: i64 = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
            .unwrap_or(0);
        let _ = std::fs::write(&path, format!("{}\n{reply}\n", before + 1));
        before + 1
    }

    /// The acknowledgement subjects of the messages started and not done
    /// (a previous run of this worker died on them).
    pub fn unfinished(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|s| s.lines().nth(1).map(str::to_string))
            // Only this worker's own queue's acknowledgements.
            .filter(|r| r.starts_with("$JS.ACK.") && !r.contains(char::is_whitespace))
            .collect()
    }

    /// Forgets every record: the queue holds nothing this worker took and
    /// did not ack (records of messages purged meanwhile would otherwise
    /// stay for good).
    pub fn clear(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
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
        let r = "$JS.ACK.LOCKSTEP_JOBS.w-w.1.7.7.0.0";
        assert_eq!(a.start(7, r), 1);
        // A restarted worker (a new Inflight over the same folder) sees the
        // count, and what to acknowledge.
        let b = super::Inflight::new(dir.path(), "w", "s1");
        assert_eq!(b.unfinished(), vec![r.to_string()]);
        assert_eq!(b.start(7, r), 2);
        assert_eq!(b.start(8, r), 1);
        b.done(7);
        assert_eq!(b.start(7, r), 1);
        // Another worker's counts are its own.
        assert_eq!(super::Inflight::new(dir.path(), "v", "s1").start(8, r), 1);
        // A new stream (sequence numbers start again) starts from nothing,
        // and the old stream's records are gone.
        // Nothing pending on the server: every record goes.
        b.clear();
        assert!(b.unfinished().is_empty());
        assert_eq!(b.start(7, r), 1);
        let c = super::Inflight::new(dir.path(), "w", "s2");
        assert_eq!(c.start(8, r), 1);
        assert_eq!(super::Inflight::new(dir.path(), "w", "s1").start(8, r), 1);
    }
}
