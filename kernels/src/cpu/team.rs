//! A fixed team of threads for the language-model engine: `run(f)` calls
//! `f(i)` once on each member i (the caller is member 0) and returns when
//! all are done. Members spin briefly between jobs, then park, so the ~120
//! short parallel steps of a decoded token cost a few atomics each instead
//! of a pool's wake-ups.
//!
//! Work is split by member index only, so which member computes what never
//! changes a bit: every output element has one owner and one order.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per job; members start when it changes.
    epoch: AtomicUsize,
    /// Members (other than the caller) still running the current job.
    pending: AtomicUsize,
    /// The current job; written before `epoch` is bumped, read after.
    job: UnsafeCell<Option<Job>>,
    panicked: AtomicBool,
    stop: AtomicBool,
}

// SAFETY: `job` is written only by the caller of `run` while no member reads
// it (all finished the previous job), and read only after the epoch bump.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A team of `size` threads (the caller and `size − 1` helpers).
pub struct Team {
    size: usize,
    shared: Arc<Shared>,
    members: Vec<JoinHandle<()>>,
}

/// Spins before a waiting thread yields its core (a team larger than the
/// machine, or other work, must not be starved by spinning)...
const SPINS: u32 = 1 << 12;
/// ...and yields before a waiting member parks.
const YIELDS: u32 = 1 << 8;

impl Team {
    pub fn new(size: usize) -> std::io::Result<Team> {
        let size = size.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let mut members = Vec::new();
        for i in 1..size {
            let s = shared.clone();
            members.push(
                std::thread::Builder::new()
                    .name(format!("lockstep-llm-{i}"))
                    .spawn(move || member(i, &s))?,
            );
        }
        Ok(Team {
            size,
            shared,
            members,
        })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Calls `f(i)` for every member i in 0..size, in parallel; returns
    /// when all have returned. Panics if any did.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.size == 1 {
            f(0);
            return;
        }
        let s = &*self.shared;
        // SAFETY: no member reads `job` now (the previous run waited for
        // all); the pointer outlives its use (this call waits below).
        unsafe {
            let f: &'static (dyn Fn(usize) + Sync) = std::mem::transmute(f);
            *s.job.get() = Some(f as Job);
        }
        s.pending.store(self.size - 1, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        for m in &self.members {
            m.thread().unpark();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins = spins.saturating_add(1);
            if spins < SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a thread of the engine's team panicked");
        }
    }
}

fn member(i: usize, s: &Shared) {
    let mut seen = 0;
    loop {
        let mut spins = 0u32;
        loop {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.saturating_add(1);
            if spins < SPINS {
                std::hint::spin_loop();
            } else if spins < SPINS + YIELDS {
                std::thread::yield_now();
            } else {
                std::thread::park_timeout(std::time::Duration::from_millis(5));
            }
        }
        // SAFETY: written before the epoch bump we just observed.
        let job = unsafe { (*s.job.get()).expect("a job") };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job)(i) }));
        if r.is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for m in self.members.drain(..) {
            m.thread().unpark();
            let _ = m.join();
        }
    }
}

/// A pointer the members of a team write through, each to its own part.
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: users write disjoint parts only (each says which in its SAFETY).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// The part `[lo, hi)` of `0..n` that member `i` of `size` owns.
pub fn share(n: usize, i: usize, size: usize) -> (usize, usize) {
    (n * i / size, n * (i + 1) / size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_member_runs_once_per_job() {
        let team = Team::new(3).unwrap();
        let hits = AtomicU64::new(0);
        for _ in 0..1000 {
            team.run(&|i| {
                hits.fetch_add(1 << (i * 16), Ordering::Relaxed);
            });
        }
        let h = hits.load(Ordering::Relaxed);
        assert_eq!(
            (h & 0xFFFF, (h >> 16) & 0xFFFF, h >> 32),
            (1000, 1000, 1000)
        );
    }
}
