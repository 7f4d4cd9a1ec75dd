//! Prints every backend this machine has, with its conformance findings.
fn main() {
    for (kind, r) in lockstep_kernels::detect_all() {
        match r {
            Ok(b) => println!("{kind}: {:#?}", b.info()),
            Err(e) => println!("{kind}: unavailable: {e}"),
        }
    }
}
