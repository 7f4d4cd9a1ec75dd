//! The `lockstep` CLI, built as part of the tests crate so the end-to-end
//! tests run exactly the code under test (see `lockstep_tests::lockstep_bin`).
fn main() -> std::process::ExitCode {
    lockstep::cli::main()
}
