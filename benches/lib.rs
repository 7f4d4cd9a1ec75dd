//! Benchmarks of lockstep. `cargo bench -p lockstep-benches` runs the
//! criterion suites in `benches/`; `lockstep bench ...` prints ratios
//! against baselines measured in the same run. Results measured on other
//! machines (the H200) are kept under `results/` with the scripts that made
//! them.
