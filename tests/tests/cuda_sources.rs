//! Every CUDA source compiles with NVRTC, with the production options
//! (`--fmad=false`, ...), for sm_90, and `ptxas` assembles it without
//! register spills. Runs wherever NVRTC is loadable (no GPU needed): `./dev
//! test` installs the pinned NVRTC and ptxas wheels and sets
//! `LOCKSTEP_REQUIRE_NVRTC=1` and `LOCKSTEP_PTXAS`, so in CI this check
//! cannot silently skip.

use lockstep_kernels::cuda::{compile, nvrtc_present, PRELUDE, SOURCES};

const ARCH: &str = "sm_90";

#[test]
fn cuda_sources_compile_for_sm90_without_spills() {
    if !nvrtc_present() {
        assert!(
            std::env::var_os("LOCKSTEP_REQUIRE_NVRTC").is_none(),
            "LOCKSTEP_REQUIRE_NVRTC is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)"
        );
        eprintln!("SKIPPED: NVRTC is not installed");
        return;
    }
    assert!(
        !PRELUDE.contains("K_CHUNK"),
        "prim.cuh uses K_CHUNK; it is compiled in front of every source, which get it from -DK_CHUNK"
    );
    let dir = tempfile::tempdir().unwrap();
    let ptxas = std::env::var_os("LOCKSTEP_PTXAS");
    for src in SOURCES {
        let name = src.name;
        // The contract's constants come from Rust (-DK_CHUNK), never typed
        // into a source.
        assert!(
            !src.text.contains("#define K_CHUNK") && !src.text.contains("CHUNK 256"),
            "{name}.cu defines the chunk length itself; use K_CHUNK from -DK_CHUNK"
        );
        let ptx = compile(name, src.text, ARCH).unwrap_or_else(|e| panic!("{e}"));
        let text = ptx.to_src();
        for k in src.kernels {
            assert!(
                text.contains(&format!(".entry {k}")),
                "{name}.cu: no kernel {k} in the PTX"
            );
        }
        // --fmad=false: the only fused multiply-adds are the explicit
        // __fmaf_rn, which NVRTC emits as fma.rn.f32; no mad/contracted forms.
        assert!(
            !text.contains("mad.f32") && !text.contains("mad.rn.f32"),
            "{name}.cu: contracted mad in PTX"
        );
        // Every float rounding is one of the contract's correctly rounded
        // primitives: no approximate or flush-to-zero instruction (a libm
        // call such as expf, or a plain `/`, would bring them), no float
        // min/max (whose ±0 and NaN rules are not the specs' comparisons).
        for bad in [".approx", ".ftz", "div.full", "max.f32", "min.f32"] {
            assert!(!text.contains(bad), "{name}.cu: `{bad}` in PTX");
        }
        let Some(ptxas) = &ptxas else {
            eprintln!("{name}.cu: NVRTC ok (LOCKSTEP_PTXAS not set, assembly not checked)");
            continue;
        };
        let path = dir.path().join(format!("{name}.ptx"));
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new(ptxas)
            .args(["-arch", ARCH, "-v", "-o"])
            .arg(dir.path().join(format!("{name}.cubin")))
            .arg(&path)
            .output()
            .expect("run ptxas");
        let log = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        eprintln!("{name}.cu:\n{log}");
        assert!(out.status.success(), "ptxas failed on {name}.cu:\n{log}");
        for line in log.lines().filter(|l| l.contains("spill")) {
            assert!(
                line.contains("0 bytes spill stores") && line.contains("0 bytes spill loads"),
                "{name}.cu spills registers: {line}"
            );
        }
    }
}
