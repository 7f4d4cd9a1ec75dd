//! The `lockstep` binary end to end: `matmul` gives the spec's digest on
//! every backend present, and every kind of bad input file is a clear error
//! with a non-zero exit, never a panic.

use std::path::Path;
use std::process::Output;

use lockstep_kernels::{matmul_spec, tensor_digest_f32, MatmulDims};
use lockstep_tests::{lockstep_bin, random_values, rng, Values};
use safetensors::{tensor::TensorView, Dtype};

fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn run(args: &[&str]) -> Output {
    std::process::Command::new(lockstep_bin())
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run lockstep")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn matmul_digest_matches_spec_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let dims = MatmulDims::new(37, 300, 29);
    let mut r = rng(5);
    let a = random_values(&mut r, dims.m * dims.k, Values::Specials);
    let b = random_values(&mut r, dims.k * dims.n, Values::Specials);
    let input = dir.path().join("ab.safetensors");
    write(
        &input,
        &[
            ("a", Dtype::F32, vec![dims.m, dims.k], f32_bytes(&a)),
            ("b", Dtype::F32, vec![dims.k, dims.n], f32_bytes(&b)),
        ],
    );
    let want = tensor_digest_f32(&[dims.m, dims.n], &matmul_spec(&a, &b, dims)).to_string();
    let mut ran = 0;
    for backend in ["cpu", "wgpu", "cuda"] {
        let out = dir.path().join(format!("c-{backend}.safetensors"));
        let o = run(&[
            "matmul",
            "--backend",
            backend,
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        if !o.status.success() {
            let t = text(&o);
            assert!(!t.contains("panicked"), "{backend} panicked: {t}");
            assert!(t.contains("not usable here"), "{backend} failed: {t}");
            assert!(
                !(backend == "cuda" && lockstep_tests::cuda_required()),
                "LOCKSTEP_REQUIRE_CUDA is set, but: {t}"
            );
            eprintln!("SKIPPED {backend}: {t}");
            continue;
        }
        ran += 1;
        let stdout = String::from_utf8_lossy(&o.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        assert_eq!(last, want, "{backend}: last line must be the digest");
        // The file holds exactly the spec's tensor.
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let c = st.tensor("c").unwrap();
        assert_eq!(c.shape(), &[dims.m, dims.n]);
        let vals = lockstep::protocol::f32_from_le_bytes(c.data());
        assert_eq!(
            tensor_digest_f32(&[dims.m, dims.n], &vals).to_string(),
            want
        );
    }
    assert!(ran >= 1, "the CPU backend must always run");
}

fn expect_error(
    dir: &Path,
    name: &str,
    tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
    needle: &str,
) {
    let input = dir.join(format!("{name}.safetensors"));
    write(&input, tensors);
    expect_error_file(dir, &input, needle);
}

fn expect_error_file(dir: &Path, input: &Path, needle: &str) {
    let out = dir.join("out.safetensors");
    let o = run(&[
        "matmul",
        "--backend",
        "cpu",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "expected failure for {input:?}: {t}");
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert!(
        t.contains("error:") && t.contains(needle),
        "message should mention `{needle}`: {t}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok_a = ("a", Dtype::F32, vec![2, 3], f32_bytes(&[1.0; 6]));
    let ok_b = ("b", Dtype::F32, vec![3, 2], f32_bytes(&[1.0; 6]));
    expect_error(
        d,
        "dtype",
        &[ok_a.clone(), ("b", Dtype::F16, vec![3, 2], vec![0; 12])],
        "needs F32",
    );
    expect_error(
        d,
        "rank",
        &[
            ("a", Dtype::F32, vec![6], f32_bytes(&[1.0; 6])),
            ok_b.clone(),
        ],
        "rank 2",
    );
    expect_error(
        d,
        "mismatch",
        &[
            ok_a.clone(),
            ("b", Dtype::F32, vec![2, 3], f32_bytes(&[1.0; 6])),
        ],
        "must equal b's rows",
    );
    expect_error(
        d,
        "missing",
        std::slice::from_ref(&ok_a),
        "no tensor named `b`",
    );
    // Truncated: a valid file cut short.
    let full = d.join("full.safetensors");
    write(&full, &[ok_a, ok_b]);
    let bytes = std::fs::read(&full).unwrap();
    let cut = d.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 7]).unwrap();
    expect_error_file(d, &cut, "truncated");
    // Not a file at all.
    expect_error_file(d, &d.join("nope.safetensors"), "cannot read");
    // Garbage.
    let junk = d.join("junk.safetensors");
    std::fs::write(&junk, b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
    expect_error_file(d, &junk, "not a valid safetensors file");
}

#[test]
fn bench_json_has_the_promised_fields() {
    let o = run(&[
        "bench",
        "matmul",
        "--backend",
        "cpu",
        "--m",
        "64",
        "--n",
        "48",
        "--k",
        "80",
        "--threads",
        "1",
        "--reps",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["lockstep_gflops", "baseline", "baseline_gflops", "ratio"] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert!(v["lockstep_gflops"].as_f64().unwrap() > 0.0);
    assert!(["faer", "matrixmultiply"].contains(&v["baseline"].as_str().unwrap()));
}

#[test]
fn backends_lists_cpu_and_the_contract_version() {
    let o = run(&["backends", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["contract_version"], lockstep_kernels::CONTRACT_VERSION);
    let cpu = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["backend"] == "cpu")
        .unwrap();
    assert_eq!(cpu["present"], true);
}

/// One `error:` line under 300 characters, nothing else on stderr, and no
/// part of the message said twice.
fn assert_one_short_line(o: &Output, what: &str, needle: &str) {
    let full = String::from_utf8_lossy(&o.stderr);
    // Failure messages quote at most 600 characters of what was printed.
    let err: String = full.chars().take(600).collect();
    assert_eq!(o.status.code(), Some(1), "{what}: {err}");
    let lines: Vec<&str> = full.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: one line expected:\n{err}");
    let count = lines[0].chars().count();
    let line = lines[0];
    assert!(line.starts_with("error: "), "{what}: {err}");
    assert!(count < 300, "{what}: {count} characters: {err}");
    assert!(
        line.contains(needle),
        "{what}: should mention `{needle}`: {line}"
    );
    let parts: Vec<&str> = line.split(": ").filter(|p| p.len() > 12).collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].contains(p),
            "{what}: `{p}` said twice: {line}"
        );
    }
    for cause in ["os error", "F16", "is it truncated"] {
        assert!(
            line.matches(cause).count() <= 1,
            "{what}: `{cause}` twice: {line}"
        );
    }
}

#[test]
fn every_error_line_for_bad_batches_and_tensors_is_short_and_says_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok = r#"{"shape":[1,1],"data":[1]}"#;
    // A safetensors file with a wrong dtype, and one that names a tensor twice.
    write(
        &d.join("f16.safetensors"),
        &[("b", Dtype::F16, vec![1, 1], vec![0; 2])],
    );
    let header = br#"{"b":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]}}"#;
    let mut dup = (header.len() as u64).to_le_bytes().to_vec();
    dup.extend_from_slice(header);
    dup.extend_from_slice(&1f32.to_le_bytes());
    std::fs::write(d.join("dup.safetensors"), &dup).unwrap();
    let long_id = "j".repeat(100_000);
    let long_shape = format!("[{}]", vec!["1"; 5000].join(","));
    let long_field = "f".repeat(50_000);
    let batches: Vec<(&str, String, &str)> = vec![
        (
            "long job id",
            format!(r#"{{"id":"{long_id}","op":"matmul","inputs":[{ok},{ok}]}}"#),
            "100000 characters",
        ),
        (
            "5000-dimension shape",
            format!(
                r#"{{"id":"s","op":"matmul","inputs":[{{"shape":{long_shape},"data":[1]}},{ok}]}}"#
            ),
            "rank 5000",
        ),
        (
            "a value outside f32",
            format!(
                r#"{{"id":"v","op":"matmul","inputs":[{{"shape":[1,1],"data":[1e39]}},{ok}]}}"#
            ),
            "outside f32's range",
        ),
        (
            "missing file",
            format!(
                r#"{{"id":"m","op":"matmul","inputs":[{ok},{{"file":"nope.safetensors","tensor":"b"}}]}}"#
            ),
            "No such file",
        ),
        (
            "wrong dtype",
            format!(
                r#"{{"id":"d","op":"matmul","inputs":[{ok},{{"file":"f16.safetensors","tensor":"b"}}]}}"#
            ),
            "F16",
        ),
        (
            "duplicate tensor name",
            format!(
                r#"{{"id":"t","op":"matmul","inputs":[{ok},{{"file":"dup.safetensors","tensor":"b"}}]}}"#
            ),
            "twice",
        ),
        (
            "unknown op",
            format!(r#"{{"id":"u","op":"{long_id}","inputs":[]}}"#),
            "unknown op",
        ),
        (
            "unknown field",
            format!(r#"{{"id":"f","{long_field}":1}}"#),
            "unknown field",
        ),
        ("not JSON", "{{{".to_string(), "not a valid job line"),
    ];
    for (what, line, needle) in &batches {
        let path = d.join("batch.jsonl");
        std::fs::write(&path, line).unwrap();
        let o = std::process::Command::new(lockstep_bin())
            .args(["submit", "--nats", "nats://127.0.0.1:1", "--quiet"])
            .arg(&path)
            .output()
            .unwrap();
        assert_one_short_line(&o, what, needle);
    }
    let o = run(&[
        "submit",
        "--nats",
        "nats://127.0.0.1:1",
        "/nonexistent/batch.jsonl",
    ]);
    assert_one_short_line(&o, "missing batch file", "No such file");
    // lockstep matmul on bad tensor files.
    write(
        &d.join("ab16.safetensors"),
        &[
            ("a", Dtype::F32, vec![1, 1], f32_bytes(&[1.0])),
            ("b", Dtype::F16, vec![1, 1], vec![0; 2]),
        ],
    );
    for (what, file, needle) in [
        ("missing input", "nope.safetensors", "No such file"),
        ("wrong dtype", "ab16.safetensors", "F16"),
        ("duplicate name", "dup.safetensors", "twice"),
    ] {
        let out = d.join("c.safetensors");
        let o = run(&[
            "matmul",
            "--input",
            d.join(file).to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert_one_short_line(&o, what, needle);
    }
}
