//! TEST ONLY: a malicious worker (see `lockstep_tests::adversary`).
//!
//! `lockstep-adversary --mode wrong-shape|false-error|wrong|bad-signature
//!  --nats URL --nkey FILE --name NAME`

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{flag} is required"))
    };
    let mode: lockstep_tests::adversary::Mode =
        arg("--mode")?.parse().map_err(anyhow::Error::msg)?;
    let cfg = lockstep::auth::ConnectConfig::with_nkey(&arg("--nats")?, arg("--nkey")?.as_ref());
    let name = arg("--name")?;
    tokio::runtime::Runtime::new()?.block_on(lockstep_tests::adversary::run(mode, cfg, name))
}
