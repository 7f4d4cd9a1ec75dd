//! Quick decode/prefill timing of the engine (the full benchmark is
//! `lockstep bench generate`): `cargo run --release --example llm_speed -- MODEL [THREADS]`.
use lockstep_kernels::contract::argmax::argmax_spec;
use lockstep_kernels::cpu::Isa;
use lockstep_kernels::model::{Engine, Model};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let t0 = std::time::Instant::now();
    let model = Model::load(std::path::Path::new(&a[1])).unwrap();
    println!(
        "load {:?} weights {} MB digest {}",
        t0.elapsed(),
        model.weight_bytes() >> 20,
        model.digest
    );
    let threads: usize = a.get(2).map_or(1, |s| s.parse().unwrap());
    let engine = Engine::new(&model, threads, Isa::detect()).unwrap();
    let prompt: Vec<u32> = (0..64).map(|i| 100 + i * 7).collect();
    let mut seq = engine.sequence(256, false).unwrap();
    let t = std::time::Instant::now();
    let mut last = engine
        .forward(&mut [&mut seq], &[&prompt])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    let pf = t.elapsed();
    let t = std::time::Instant::now();
    let n = 64;
    for _ in 0..n {
        let tok = argmax_spec(&last).unwrap() as u32;
        last = engine
            .forward(&mut [&mut seq], &[&[tok]])
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
    }
    let dc = t.elapsed();
    println!(
        "prefill {:.1} tok/s, decode {:.1} tok/s",
        64.0 / pf.as_secs_f64(),
        n as f64 / dc.as_secs_f64()
    );
}
