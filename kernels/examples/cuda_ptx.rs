//! Writes the PTX of every registered CUDA source, compiled by NVRTC with the
//! production options, to a folder: `cuda_ptx OUT_DIR [ARCH]` (default sm_90).
//! For reading the PTX, or feeding it to `ptxas -v` and `cuobjdump -sass`.
fn main() {
    let mut args = std::env::args().skip(1);
    let out = std::path::PathBuf::from(args.next().expect("usage: cuda_ptx OUT_DIR [ARCH]"));
    let arch = args.next().unwrap_or_else(|| "sm_90".into());
    std::fs::create_dir_all(&out).expect("create OUT_DIR");
    for src in lockstep_kernels::cuda::SOURCES {
        let name = src.name;
        match lockstep_kernels::cuda::compile(name, src.text, &arch) {
            Ok(ptx) => {
                let path = out.join(format!("{name}.ptx"));
                std::fs::write(&path, ptx.to_src()).expect("write PTX");
                println!("{}", path.display());
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
}
