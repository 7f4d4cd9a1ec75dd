//! Test-only switches of a worker: deterministic fault injection and an
//! artificial delay, so the system tests can prove that a coordinator
//! catches wrong bits and survives slow or dying workers. The CLI hides
//! their flags (`--fault-inject-every`, `--test-delay-ms`); nothing in
//! production sets them.

use std::time::Duration;

use sha3::Digest as _;

/// Every test switch, off by default.
#[derive(Clone, Copy, Debug, Default)]
pub struct TestSwitches {
    pub fault: Option<FaultInjection>,
    /// Sleep this long before each computation (to make jobs long).
    pub delay: Duration,
    /// Faults injected into every generation (a layer output bit, a token).
    pub generation: lockstep_kernels::model::generate::TestFault,
    /// How dispute queries are answered (`None`: honestly).
    pub dispute: Option<DisputeBehaviour>,
}

/// A dishonest way of answering dispute queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DisputeBehaviour {
    /// A trace with one digest changed: it does not hash to the signed root.
    Lie,
    /// No answer at all.
    Silent,
}

/// Deterministic test-only fault injection: flip the lowest bit of the first
/// output value of every job whose id hashes into 1 of `every` buckets.
#[derive(Clone, Copy, Debug)]
pub struct FaultInjection {
    pub every: u64,
}

impl FaultInjection {
    /// Whether this job is one the faulty worker corrupts. Public so tests
    /// know the ground truth.
    pub fn selects(&self, job: &str) -> bool {
        let h = sha3::Sha3_256::digest(job.as_bytes());
        u64::from_le_bytes(h[..8].try_into().unwrap()) % self.every.max(1) == 0
    }

    /// Corrupts the outputs of a selected job: flips the lowest bit of the
    /// first output's first value. Returns whether it did.
    pub fn apply(&self, job: &str, outputs: &mut [lockstep_kernels::Tensor]) -> bool {
        match outputs.first_mut().and_then(|t| t.data.first_mut()) {
            Some(x) if self.selects(job) => {
                *x = f32::from_bits(x.to_bits() ^ 1);
                tracing::warn!(%job, "FAULT INJECTED: flipped one output bit (test switch)");
                true
            }
            _ => false,
        }
    }
}
