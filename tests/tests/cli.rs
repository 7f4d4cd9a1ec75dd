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
