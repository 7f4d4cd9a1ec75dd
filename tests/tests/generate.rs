//! `lockstep generate` and `lockstep replay-layer` end to end: a sensible
//! completion from the real model, the same tokens on every ISA, thread
//! count and backend (CPU, WGSL, and CUDA where a device is present), one batch equal to separate
//! runs, one layer replayed alone equal to its trace entry, and clear errors.

use std::process::Output;

use lockstep_tests::lockstep_bin;
use lockstep_tests::models::{shared_model, smollm2};

fn run(args: &[&str]) -> Output {
    std::process::Command::new(lockstep_bin())
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run lockstep")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    let s = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "lockstep {args:?} failed:\n{s}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    s
}

fn failure(args: &[&str]) -> String {
    let o = run(args);
    let s = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "lockstep {args:?} should fail:\n{s}");
    assert!(!s.contains("panicked"), "{s}");
    s
}

fn json(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_capital_of_france_is_paris_on_every_isa_and_thread_count() {
    let Some(model) = smollm2() else { return };
    let model = model.to_str().unwrap();
    let text = ok(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
    ]);
    assert!(text.starts_with(" Paris"), "{text}");
    // The tokenizer as the model's own (tokenizer.json) splits this prompt.
    let r = &json(&ok(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "1",
        "--json",
    ]))[0];
    assert_eq!(
        r["prompt_tokens"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    // The chat template, and generation stopping at the end of the turn.
    let r = &json(&ok(&[
        "generate",
        "--model",
        model,
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "40",
        "--json",
    ]))[0];
    assert!(r["text"].as_str().unwrap().contains("Paris"), "{r}");
    assert!(
        r["tokens"].as_array().unwrap().len() < 40,
        "stops at <|im_end|>: {r}"
    );
    let mut digests = std::collections::BTreeSet::new();
    for isa in ["avx512", "avx2", "portable"] {
        for threads in ["1", "2", "3"] {
            let o = run(&[
                "generate",
                "--model",
                model,
                "--prompt",
                "The capital of France is",
                "--max-tokens",
                "8",
                "--isa",
                isa,
                "--threads",
                threads,
                "--json",
                "--trace",
                "/dev/null",
            ]);
            if !o.status.success() {
                let e = String::from_utf8_lossy(&o.stderr);
                assert!(e.contains("this CPU lacks"), "{e}");
                continue;
            }
            let r = &json(&String::from_utf8_lossy(&o.stdout))[0];
            digests.insert((
                r["token_digest"].as_str().unwrap().to_string(),
                r["trace_root"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert_eq!(digests.len(), 1, "{digests:?}");
}

#[test]
fn a_batch_equals_separate_runs_and_sampling_repeats() {
    let Some(model) = smollm2() else { return };
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prompts = [
        "Once upon a time",
        "The best way to learn Rust is",
        "2 + 2 =",
    ];
    let file = dir.path().join("prompts.txt");
    std::fs::write(&file, prompts.join("\n")).unwrap();
    let sampled = [
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "11",
        "--max-tokens",
        "6",
        "--json",
    ];
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompts",
        file.to_str().unwrap(),
    ];
    args.extend(sampled);
    let batch = json(&ok(&args));
    assert_eq!(batch.len(), 3);
    for (p, b) in prompts.iter().zip(&batch) {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            p,
            "--threads",
            "1",
        ];
        args.extend(sampled);
        let alone = &json(&ok(&args))[0];
        assert_eq!(alone["token_digest"], b["token_digest"], "{p}");
        assert_eq!(alone["tokens"], b["tokens"], "{p}");
    }
}

#[test]
fn one_layer_replayed_alone_matches_the_trace() {
    // The tiny model keeps this quick; the path is the same for any model.
    let model = shared_model("stories260K.bin");
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (trace, dump) = (
        dir.path().join("trace.jsonl"),
        dir.path().join("l3.safetensors"),
    );
    ok(&[
        "generate",
        "--model",
        model,
        "--tokens",
        "1 400 45 300",
        "--max-tokens",
        "5",
        "--trace",
        trace.to_str().unwrap(),
        "--dump-layer",
        "3",
        "--dump",
        dump.to_str().unwrap(),
    ]);
    let entries = json(&std::fs::read_to_string(&trace).unwrap());
    // Positions 0..=7 were computed (4 prompt tokens, then 4 fed back).
    let want: Vec<String> = entries
        .iter()
        .filter(|e| e["layer"] == 3)
        .map(|e| e["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(want.len(), 8);
    let out = ok(&[
        "replay-layer",
        "--model",
        model,
        "--layer",
        "3",
        "--inputs",
        dump.to_str().unwrap(),
        "--all",
    ]);
    let got: Vec<String> = out
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(got, want);
}

/// Runs `generate --json --trace` with `args` on the CPU and on WGSL
/// (lavapipe in CI) and asserts the same results and traces.
fn same_on_cpu_and_wgpu(args: &[&str]) {
    same_on_cpu_and("wgpu", args);
}

/// Runs `generate --json --trace` with `args` on the CPU and on `device`
/// and asserts the same results and traces.
fn same_on_cpu_and(device: &str, args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for backend in ["cpu", device] {
        let trace = dir.path().join(format!("{backend}.jsonl"));
        let mut all = vec!["generate", "--json", "--backend", backend, "--trace"];
        all.push(trace.to_str().unwrap());
        all.extend_from_slice(args);
        let out = json(&ok(&all));
        outs.push((out, std::fs::read_to_string(&trace).unwrap()));
    }
    assert!(!outs[0].1.is_empty());
    assert_eq!(outs[0].0, outs[1].0, "{args:?}: results differ");
    assert_eq!(outs[0].1, outs[1].1, "{args:?}: traces differ");
}

/// `--backend wgpu` gives the CPU's tokens, token digest and trace: the
/// tiny model greedy and sampled, and SmolLM2 on a batch of two prompts.
#[test]
fn wgpu_generates_the_cpus_bits() {
    let tiny = shared_model("aidreams260K.bin");
    let tiny = tiny.to_str().unwrap();
    let base = [
        "--model",
        tiny,
        "--tokens",
        "1 300 301 45",
        "--max-tokens",
        "16",
    ];
    same_on_cpu_and_wgpu(&base);
    same_on_cpu_and_wgpu(
        &[
            &base[..],
            &["--temperature", "0.9", "--top-k", "40", "--seed", "7"],
        ]
        .concat(),
    );
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "The capital of France is\nOnce upon a time\n").unwrap();
    same_on_cpu_and_wgpu(&[
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-tokens",
        "5",
        "--temperature",
        "0.7",
        "--seed",
        "3",
    ]);
}

/// `--backend cuda` gives the CPU's tokens, token digest and trace on the
/// tiny model, greedy and sampled (skipped without a CUDA device; a
/// failure then with `LOCKSTEP_REQUIRE_CUDA=1`).
#[test]
fn cuda_generates_the_cpus_bits() {
    // Only to learn whether CUDA device 0 opens here; the CLI opens its own.
    if lockstep_tests::open_cuda().is_none() {
        return;
    }
    let tiny = shared_model("aidreams260K.bin");
    let tiny = tiny.to_str().unwrap();
    let base = [
        "--model",
        tiny,
        "--tokens",
        "1 300 301 45",
        "--max-tokens",
        "16",
    ];
    same_on_cpu_and("cuda", &base);
    same_on_cpu_and(
        "cuda",
        &[
            &base[..],
            &["--temperature", "0.9", "--top-k", "40", "--seed", "7"],
        ]
        .concat(),
    );
}

#[test]
fn bad_requests_are_clear_errors() {
    let tiny = shared_model("stories260K.bin");
    let tiny = tiny.to_str().unwrap();
    assert!(failure(&[
        "generate",
        "--model",
        tiny,
        "--tokens",
        "1 2",
        "--max-tokens",
        "0"
    ])
    .contains("--max-tokens must be at least 1"));
    assert!(failure(&[
        "generate",
        "--model",
        tiny,
        "--tokens",
        "1 2",
        "--max-tokens",
        "600"
    ])
    .contains("exceeds the model's context of 512"));
    assert!(
        failure(&["generate", "--model", tiny, "--tokens", "1 99999"])
            .contains("outside the vocabulary")
    );
    assert!(failure(&["generate", "--model", tiny, "--prompt", "hello"]).contains("no tokenizer"));
    // Without a CUDA driver, --backend cuda says so in one line (with one,
    // it runs: `cuda_generates_the_cpus_bits`).
    if !lockstep_kernels::cuda::driver_present() {
        let err = failure(&[
            "generate",
            "--model",
            tiny,
            "--tokens",
            "1",
            "--backend",
            "cuda",
        ]);
        assert!(err.contains("no CUDA driver (libcuda)"), "{err}");
    }
    assert!(failure(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "x"
    ])
    .contains("no model file"));
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\0\0\0garbage").unwrap();
    assert!(failure(&[
        "generate",
        "--model",
        junk.to_str().unwrap(),
        "--prompt",
        "x"
    ])
    .contains("not a valid GGUF"));
    assert!(failure(&[
        "replay-layer",
        "--model",
        tiny,
        "--layer",
        "9",
        "--inputs",
        "x"
    ])
    .contains("has 5 layers"));
}
