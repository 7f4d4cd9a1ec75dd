//! A short run of the fuzzer over everything lockstep reads from outside
//! (`lockstep bench fuzz` runs millions): no panic, every error a clear
//! line, and each target both accepts and rejects inputs (so it reaches the
//! code past the parser).

#[test]
fn mutated_inputs_never_panic_and_always_get_a_clear_error() {
    // A fixed seed, and one from the clock (printed, to reproduce a failure
    // with `lockstep bench fuzz --seed`).
    let clock = lockstep::protocol::now_ms();
    for seed in [1, clock] {
        eprintln!("fuzz seed {seed}");
        let report = lockstep::fuzz::run(5_000, seed, |_| {});
        assert_eq!(report.targets.len(), 8);
        for t in &report.targets {
            assert_eq!(t.panics, 0, "seed {seed}: {t:?}");
            assert_eq!(t.unclear_errors, 0, "seed {seed}: {t:?}");
            assert!(t.accepted > 0 && t.rejected > 0, "seed {seed}: {t:?}");
        }
    }
}
