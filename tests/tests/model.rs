//! Whole models under the contract: the engine against the scalar forward
//! pass, on every ISA and thread count; batch and prefill-chunk invariance;
//! a float64 forward pass written here as an independent check; bad files.

use lockstep_kernels::contract::argmax::argmax_spec;
use lockstep_kernels::cpu::Isa;
use lockstep_kernels::model::{spec, Engine, Model};
use lockstep_tests::models::{shared_model, smollm2};
use lockstep_tests::models::{write_hf, Shaped};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Greedy tokens from `prompt`, fed in chunks of `chunk`, and the last
/// sequence's trace.
fn greedy(
    engine: &Engine,
    prompt: &[u32],
    chunk: usize,
    steps: usize,
) -> (Vec<u32>, Vec<f32>, Vec<Vec<lockstep_kernels::Digest>>) {
    let mut seq = engine.sequence(prompt.len() + steps, true).unwrap();
    let mut logits = None;
    for c in prompt.chunks(chunk) {
        logits = engine
            .forward(&mut [&mut seq], &[c])
            .unwrap()
            .pop()
            .unwrap();
    }
    let mut out = Vec::new();
    let mut last = logits.unwrap();
    for _ in 0..steps {
        let t = argmax_spec(&last).unwrap() as u32;
        out.push(t);
        last = engine
            .forward(&mut [&mut seq], &[&[t]])
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
    }
    (out, last, seq.trace.unwrap())
}

fn isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|i| i.is_supported() && *i != Isa::Neon)
        .collect()
}

#[test]
fn llama2c_engine_matches_the_spec_on_every_isa_and_thread_count() {
    for name in ["stories260K.bin", "aidreams260K.bin"] {
        let model = Model::load(&shared_model(name)).unwrap();
        assert_engine_matches_spec(&model, &[1, 400, 45, 300, 7, 90], &[1, 2, 3], name);
    }
}

/// The engine's logits and trace for `prompt` in one pass equal the spec's,
/// bit for bit, on every ISA here and each thread count.
fn assert_engine_matches_spec(model: &Model, prompt: &[u32], threads: &[usize], what: &str) {
    let (spec_logits, spec_trace) = spec::forward_spec(model, prompt);
    for isa in isas() {
        for &t in threads {
            let engine = Engine::new(model, t, isa).unwrap();
            let mut seq = engine.sequence(prompt.len(), true).unwrap();
            let logits = engine
                .forward(&mut [&mut seq], &[prompt])
                .unwrap()
                .pop()
                .unwrap()
                .unwrap();
            assert_eq!(
                bits(&logits),
                bits(spec_logits.last().unwrap()),
                "{what} {isa:?} {t}"
            );
            assert_eq!(
                seq.trace.as_ref().unwrap(),
                &spec_trace,
                "{what} {isa:?} {t}"
            );
        }
    }
}

#[test]
fn smollm2_engine_matches_the_spec() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path).unwrap();
    let c = &model.config;
    assert_eq!(
        (
            c.dim,
            c.hidden_dim,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.vocab_size
        ),
        (576, 1536, 30, 9, 3, 49152)
    );
    // "The capital of France is" in SmolLM2's tokenizer.
    let prompt = [504u32, 3575, 282, 4649, 314];
    let (spec_logits, spec_trace) = spec::forward_spec(&model, &prompt[..3]);
    for isa in isas() {
        let engine = Engine::new(&model, 2, isa).unwrap();
        let mut seq = engine.sequence(8, true).unwrap();
        let logits = engine
            .forward(&mut [&mut seq], &[&prompt[..3]])
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        assert_eq!(bits(&logits), bits(spec_logits.last().unwrap()), "{isa:?}");
        assert_eq!(seq.trace.as_ref().unwrap(), &spec_trace, "{isa:?}");
    }
}

/// What a dispute replays: one layer alone over given inputs, and the final
/// norm and classifier, on the engine's kernels, equal the scalar spec.
#[test]
fn one_layer_alone_and_the_final_step_match_the_spec() {
    let mut models = vec![Model::load(&shared_model("stories260K.bin")).unwrap()];
    if let Some(p) = smollm2() {
        models.push(Model::load(&p).unwrap());
    }
    for model in &models {
        let c = &model.config;
        let tokens: Vec<u32> = (0..9).map(|i| (i * 37 + 1) % c.vocab_size as u32).collect();
        for isa in isas() {
            let engine = Engine::new(model, 2, isa).unwrap();
            for layer in [0, c.n_layers / 2, c.n_layers - 1] {
                // The layer's inputs as a generation computes them.
                let mut seq = engine.sequence(tokens.len(), false).unwrap();
                seq.capture = Some((layer, Vec::new()));
                engine.forward(&mut [&mut seq], &[&tokens]).unwrap();
                let inputs = seq.capture.take().unwrap().1;
                let fast = engine.layer_alone(layer, &inputs).unwrap();
                let mut cache = spec::LayerCache::default();
                for (pos, row) in inputs.chunks_exact(c.dim).enumerate() {
                    let mut x = row.to_vec();
                    spec::layer_spec(model, layer, &mut x, pos, &mut cache);
                    assert_eq!(
                        bits(&x),
                        bits(&fast[pos * c.dim..(pos + 1) * c.dim]),
                        "{} layer {layer} position {pos} {isa:?}",
                        model.source
                    );
                }
            }
            let (spec_logits, _) = spec::forward_spec(model, &tokens[..3]);
            let mut seq = engine.sequence(3, false).unwrap();
            seq.capture = Some((c.n_layers, Vec::new()));
            engine.forward(&mut [&mut seq], &[&tokens[..3]]).unwrap();
            let last = seq.capture.take().unwrap().1;
            let logits = engine.logits(&last[2 * c.dim..]);
            assert_eq!(bits(&logits), bits(spec_logits.last().unwrap()), "{isa:?}");
        }
    }
}

#[test]
fn batch_and_prefill_chunking_do_not_change_a_bit() {
    for model in [Model::load(&shared_model("stories260K.bin")).unwrap()] {
        let engine = Engine::new(&model, 2, Isa::detect()).unwrap();
        let prompt: Vec<u32> = vec![1, 400, 45, 300, 7, 90, 12, 250, 33];
        let (alone, alone_logits, alone_trace) = greedy(&engine, &prompt, prompt.len(), 12);
        for chunk in [1, 2, 3, 5] {
            let (t, l, tr) = greedy(&engine, &prompt, chunk, 12);
            assert_eq!(t, alone, "chunk {chunk}");
            assert_eq!(bits(&l), bits(&alone_logits), "chunk {chunk}");
            assert_eq!(tr, alone_trace, "chunk {chunk}");
        }
        // The same prompt inside a batch with two others of other lengths.
        let others: [Vec<u32>; 2] = [
            vec![1, 5, 6],
            vec![1, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87],
        ];
        let mut seqs: Vec<_> = (0..3).map(|_| engine.sequence(64, true).unwrap()).collect();
        let feeds: Vec<&[u32]> = vec![&others[0], &prompt, &others[1]];
        let mut refs: Vec<_> = seqs.iter_mut().collect();
        let mut logits = engine.forward(&mut refs, &feeds).unwrap();
        let mut toks = Vec::new();
        for _ in 0..12 {
            let next: Vec<u32> = logits
                .iter()
                .map(|l| argmax_spec(l.as_ref().unwrap()).unwrap() as u32)
                .collect();
            toks.push(next[1]);
            let feeds: Vec<&[u32]> = next.iter().map(std::slice::from_ref).collect();
            let mut refs: Vec<_> = seqs.iter_mut().collect();
            logits = engine.forward(&mut refs, &feeds).unwrap();
        }
        assert_eq!(toks, alone, "in a batch");
        assert_eq!(
            bits(logits[1].as_ref().unwrap()),
            bits(&alone_logits),
            "in a batch"
        );
        assert_eq!(seqs[1].trace.as_ref().unwrap(), &alone_trace, "in a batch");
    }
}

/// An independent float64 forward pass of a llama2.c model, written from
/// ../shared/README.md.
fn forward_f64(model: &Model, tokens: &[u32]) -> Vec<Vec<f64>> {
    let c = &model.config;
    let (dim, hd, kvd) = (c.dim, c.head_dim(), c.kv_dim());
    let mat = |m: &lockstep_kernels::cpu::qmatvec::PackedMatrix, x: &[f64]| -> Vec<f64> {
        (0..m.rows)
            .map(|r| {
                m.dequantize_row(r)
                    .iter()
                    .zip(x)
                    .map(|(&w, &x)| w as f64 * x)
                    .sum()
            })
            .collect()
    };
    let norm = |x: &[f64], w: &[f32]| -> Vec<f64> {
        let ss = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ss + c.norm_eps as f64).sqrt();
        x.iter().zip(w).map(|(v, &w)| v * inv * w as f64).collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        for h in v.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let f = (c.rope_theta as f64).powf(-((2 * i) as f64) / hd as f64);
                let (s, co) = (pos as f64 * f).sin_cos();
                let (a, b) = (h[2 * i], h[2 * i + 1]);
                h[2 * i] = a * co - b * s;
                h[2 * i + 1] = a * s + b * co;
            }
        }
    };
    let mut keys = vec![Vec::new(); c.n_layers];
    let mut vals = vec![Vec::new(); c.n_layers];
    let mut out = Vec::new();
    for (pos, &t) in tokens.iter().enumerate() {
        let mut x: Vec<f64> = model
            .embedding
            .dequantize_row(t as usize)
            .iter()
            .map(|&v| v as f64)
            .collect();
        for (l, layer) in model.layers.iter().enumerate() {
            let xb = norm(&x, &layer.attn_norm);
            let (mut q, mut k, v) = (
                mat(&layer.wq, &xb),
                mat(&layer.wk, &xb),
                mat(&layer.wv, &xb),
            );
            rope(&mut q, pos);
            rope(&mut k, pos);
            keys[l].extend(k);
            vals[l].extend(v);
            let mut att = vec![0f64; dim];
            let group = c.n_heads / c.n_kv_heads;
            for h in 0..c.n_heads {
                let kh = h / group;
                let scores: Vec<f64> = (0..=pos)
                    .map(|t| {
                        (0..hd)
                            .map(|d| q[h * hd + d] * keys[l][t * kvd + kh * hd + d])
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    att[h * hd + d] = (0..=pos)
                        .map(|t| e[t] / sum * vals[l][t * kvd + kh * hd + d])
                        .sum();
                }
            }
            for (x, o) in x.iter_mut().zip(mat(&layer.wo, &att)) {
                *x += o;
            }
            let xb = norm(&x, &layer.ffn_norm);
            let (g, u) = (mat(&layer.w_gate, &xb), mat(&layer.w_up, &xb));
            let hh: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            for (x, o) in x.iter_mut().zip(mat(&layer.w_down, &hh)) {
                *x += o;
            }
        }
        out.push(mat(model.classifier(), &norm(&x, &model.final_norm)));
    }
    out
}

#[test]
fn llama2c_greedy_tokens_agree_with_a_float64_forward_pass() {
    for name in ["stories260K.bin", "aidreams260K.bin"] {
        let model = Model::load(&shared_model(name)).unwrap();
        let engine = Engine::new(&model, 1, Isa::detect()).unwrap();
        let steps = 40.min(model.config.max_seq - 2);
        let (ours, _, _) = greedy(&engine, &[1], 1, steps);
        // The float64 pass, fed our tokens (teacher forcing), predicts each next one.
        let mut fed = vec![1u32];
        fed.extend(&ours[..steps - 1]);
        let logits = forward_f64(&model, &fed);
        let mut agree = 0;
        for (i, l) in logits.iter().enumerate() {
            let best = (0..l.len()).fold(0, |b, j| if l[j] > l[b] { j } else { b });
            if best as u32 == ours[i] {
                agree += 1;
            } else {
                // A flip is only acceptable at a near-tie of the float64 logits.
                let gap = l[best] - l[ours[i] as usize];
                assert!(
                    gap < 1e-4 * l[best].abs().max(1.0),
                    "{name} step {i}: ours {} vs float64 {best}, gap {gap:e}",
                    ours[i]
                );
            }
        }
        println!("{name}: {agree}/{steps} greedy steps agree with float64");
        assert!(agree * 10 >= steps * 9, "{name}: only {agree}/{steps}");
    }
}

#[test]
fn a_sampled_generation_repeats_exactly() {
    use lockstep_kernels::contract::sample::{sample_spec, Sampling};
    let model = Model::load(&shared_model("stories260K.bin")).unwrap();
    let run = |seed: u64, threads: usize| {
        let engine = Engine::new(&model, threads, Isa::detect()).unwrap();
        let s = Sampling {
            temperature: 0.9,
            top_k: 0,
            top_p: 0.95,
            seed,
        };
        let mut seq = engine.sequence(64, false).unwrap();
        let mut l = engine
            .forward(&mut [&mut seq], &[&[1]])
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        for pos in 1..40u64 {
            let t = sample_spec(&l, &s, pos).unwrap() as u32;
            out.push(t);
            l = engine
                .forward(&mut [&mut seq], &[&[t]])
                .unwrap()
                .pop()
                .unwrap()
                .unwrap();
        }
        out
    };
    assert_eq!(run(7, 1), run(7, 2));
    assert_ne!(run(7, 1), run(8, 1), "another seed draws another text");
}

#[test]
fn bad_model_files_give_clear_errors() {
    use lockstep_kernels::ErrorKind;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let err = |p: &std::path::Path| {
        let e = Model::load(p).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Model, "{e}");
        e.to_string()
    };
    assert!(err(&dir.path().join("absent.gguf")).contains("cannot read"));
    assert!(err(&write("empty.bin", b"")).contains("cannot read"));
    assert!(
        err(&write("text.bin", b"hello, this is not a model at all...."))
            .contains("neither a GGUF")
    );
    let good = std::fs::read(shared_model("stories260K.bin")).unwrap();
    assert!(err(&write("short.bin", &good[..good.len() / 2])).contains("truncated"));
    // GGUF: a valid header cut short, another version, another architecture.
    let mut g = b"GGUF".to_vec();
    g.extend(3u32.to_le_bytes());
    g.extend(1u64.to_le_bytes());
    g.extend(1u64.to_le_bytes());
    assert!(err(&write("cut.gguf", &g)).contains("not a valid GGUF"));
    let mut v9 = g.clone();
    v9[4] = 9;
    assert!(err(&write("v9.gguf", &v9)).contains("version 9"));
    let mut arch = b"GGUF".to_vec();
    arch.extend(3u32.to_le_bytes());
    arch.extend(0u64.to_le_bytes());
    arch.extend(1u64.to_le_bytes());
    let key = b"general.architecture";
    arch.extend((key.len() as u64).to_le_bytes());
    arch.extend(key);
    arch.extend(8u32.to_le_bytes());
    arch.extend(5u64.to_le_bytes());
    arch.extend(b"gpt2x");
    assert!(err(&write("arch.gguf", &arch)).contains("\"gpt2x\" is not supported"));
}

#[test]
fn smollm2_file_faults_give_clear_errors() {
    let Some(path) = smollm2() else { return };
    let bytes = std::fs::read(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Truncated inside the tensor data.
    let p = dir.path().join("cut.gguf");
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = Model::load(&p).unwrap_err().to_string();
    assert!(e.contains("past the end of the file"), "{e}");
    // An unknown quantisation type on the first tensor: find its type field
    // (the u32 after token_embd.weight's two dims) and make it 2 (Q4_0).
    let g = lockstep_kernels::model::gguf::Gguf::open(&path).unwrap();
    assert_eq!(g.tensors[0].name, "token_embd.weight");
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16;
    let mut bad = bytes[..(g.tensors.iter().map(|t| t.offset).min().unwrap() as usize)].to_vec();
    bad[at..at + 4].copy_from_slice(&2u32.to_le_bytes());
    bad.extend(&bytes[bad.len()..]);
    std::fs::write(&p, &bad).unwrap();
    let e = Model::load(&p).unwrap_err().to_string();
    assert!(e.contains("GGML type 2, which is not supported"), "{e}");
    // A tensor named twice (blk.0.attn_k renamed blk.0.attn_q): refused,
    // never the first or the last by chance.
    let (k, q) = (b"blk.0.attn_k.weight", b"blk.0.attn_q.weight");
    let at = bytes.windows(k.len()).position(|w| w == k).unwrap();
    let mut twice = bytes.clone();
    twice[at..at + k.len()].copy_from_slice(q);
    std::fs::write(&p, &twice).unwrap();
    let e = Model::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("tensor blk.0.attn_q.weight is named twice"),
        "{e}"
    );
    // A metadata key given twice, likewise.
    let tiny = Model::load(&shared_model("stories260K.bin")).unwrap();
    lockstep_tests::models::write_gguf(
        &tiny,
        &p,
        vec![("llama.block_count", lockstep_tests::models::Meta::U32(1))],
    );
    let e = Model::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("metadata key llama.block_count appears twice"),
        "{e}"
    );
    // Mutated headers never panic (a small fuzz of the parser).
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let header = &bytes[..1 << 20];
    for _ in 0..300 {
        let mut h = header.to_vec();
        for _ in 0..rng.random_range(1..8) {
            let i = rng.random_range(0..h.len().min(4096));
            h[i] = rng.random();
        }
        let _ = lockstep_kernels::model::gguf::Gguf::parse(&h, bytes.len() as u64);
    }
}

#[test]
fn a_hugging_face_checkpoint_of_the_same_weights_is_the_same_model() {
    let model = Model::load(&shared_model("stories260K.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_hf(&model, dir.path());
    for path in [
        dir.path().to_path_buf(),
        dir.path().join("model.safetensors"),
    ] {
        let hf = Model::load(&path).unwrap();
        assert_eq!(hf.config, model.config);
        assert_eq!(hf.digest, model.digest, "same weights, same digest");
        let prompt = [1u32, 400, 45];
        let a = spec::forward_spec(&model, &prompt);
        let b = spec::forward_spec(&hf, &prompt);
        assert_eq!(bits(a.0.last().unwrap()), bits(b.0.last().unwrap()));
    }
    // Impossible hyper-parameters are refused clearly, never a panic.
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let zero_heads = cfg.replace("\"num_attention_heads\":8", "\"num_attention_heads\":0");
    assert_ne!(zero_heads, cfg);
    std::fs::write(dir.path().join("config.json"), zero_heads).unwrap();
    let e = Model::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("unsupported hyper-parameters"), "{e}");
    std::fs::write(dir.path().join("config.json"), &cfg).unwrap();
    // A checkpoint of another architecture is refused clearly.
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"llama\"", "\"gpt_neox\""),
    )
    .unwrap();
    let e = Model::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("\"gpt_neox\" is not supported"), "{e}");
}

/// The tensors of a single-file checkpoint, by name (shape, F32 bytes).
fn hf_tensors(dir: &std::path::Path) -> Vec<(String, Shaped)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = st.tensor(&n).unwrap();
            (n, (t.shape().to_vec(), t.data().to_vec()))
        })
        .collect()
}

fn write_safetensors(path: &std::path::Path, tensors: &[(String, Shaped)]) {
    lockstep_tests::models::write_safetensors(path, safetensors::Dtype::F32, tensors);
}

/// Rewrites a single-file checkpoint as two shards and an index; `extra`
/// tensors go into the second shard without being listed, and `listed`
/// ones are listed under the first shard.
fn shard(dir: &std::path::Path, extra: &[(String, Shaped)]) {
    let all = hf_tensors(dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let (a, b) = all.split_at(all.len() / 2);
    let mut b = b.to_vec();
    b.extend_from_slice(extra);
    write_safetensors(&dir.join("model-00001-of-00002.safetensors"), a);
    write_safetensors(&dir.join("model-00002-of-00002.safetensors"), &b);
    let mut map = serde_json::Map::new();
    for (n, _) in a {
        map.insert(n.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (n, _) in &all[all.len() / 2..] {
        map.insert(n.clone(), "model-00002-of-00002.safetensors".into());
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
}

/// A checkpoint loads to one model or not at all: a tensor in two shards,
/// or one the index does not list, is an error (never a choice by hash
/// order); so is any setting or tensor lockstep would otherwise ignore.
#[test]
fn a_hugging_face_checkpoint_is_loaded_strictly() {
    let model = Model::load(&shared_model("stories260K.bin")).unwrap();
    let fresh = || {
        let dir = tempfile::tempdir().unwrap();
        write_hf(&model, dir.path());
        dir
    };
    // Sharded: the same model, every time.
    let dir = fresh();
    shard(dir.path(), &[]);
    for _ in 0..4 {
        assert_eq!(Model::load(dir.path()).unwrap().digest, model.digest);
    }
    let err = |dir: &std::path::Path| Model::load(dir).unwrap_err().to_string();
    // A tensor in both shards (the index names one of them).
    let dir = fresh();
    let first = hf_tensors(dir.path()).remove(0);
    let changed = (
        first.0.clone(),
        (first.1 .0.clone(), vec![0u8; first.1 .1.len()]),
    );
    shard(dir.path(), &[changed]);
    let e = err(dir.path());
    assert!(e.contains(&format!("tensor {} is in both", first.0)), "{e}");
    // A tensor the index does not list.
    let dir = fresh();
    let bias = (
        "model.layers.0.self_attn.q_proj.bias".to_string(),
        (vec![model.config.dim], vec![0u8; model.config.dim * 4]),
    );
    shard(dir.path(), std::slice::from_ref(&bias));
    let e = err(dir.path());
    assert!(e.contains("does not list it"), "{e}");
    // A norm weight shaped [1, dim] (a matrix where the model has a vector).
    let dir = fresh();
    let mut t = hf_tensors(dir.path());
    let norm = t
        .iter_mut()
        .find(|(n, _)| n == "model.norm.weight")
        .unwrap();
    norm.1 .0 = vec![1, norm.1 .0[0]];
    write_safetensors(&dir.path().join("model.safetensors"), &t);
    let e = err(dir.path());
    assert!(
        e.contains("model.norm.weight has shape [1, 64], the model needs [64]"),
        "{e}"
    );
    // A truncated shard: the tensor it cuts is named.
    let dir = fresh();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = err(dir.path());
    assert!(
        e.contains("past the end of the file") && e.contains("the file is truncated"),
        "{e}"
    );
    // A tensor the architecture does not use (a bias), single file.
    let dir = fresh();
    let mut t = hf_tensors(dir.path());
    t.push(bias);
    write_safetensors(&dir.path().join("model.safetensors"), &t);
    let e = err(dir.path());
    assert!(
        e.contains("q_proj.bias is not part of the llama architecture"),
        "{e}"
    );
    // Settings that change the maths: refused, never ignored.
    for (key, value, says) in [
        (
            "attention_bias",
            serde_json::json!(true),
            "attention_bias = true is not supported",
        ),
        (
            "hidden_act",
            serde_json::json!("gelu"),
            "hidden_act = \"gelu\" is not supported",
        ),
        (
            "rope_interleaved",
            serde_json::json!(true),
            "rope_interleaved",
        ),
        (
            "sliding_window",
            serde_json::json!(4096),
            "unknown key \"sliding_window\"",
        ),
        (
            "tie_word_embeddings",
            serde_json::json!(false),
            "no lm_head.weight",
        ),
    ] {
        let dir = fresh();
        let path = dir.path().join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg[key] = value;
        std::fs::write(&path, cfg.to_string()).unwrap();
        let e = err(dir.path());
        assert!(e.contains(says), "{key}: {e}");
        assert!(!e.contains('\n'));
    }
    // Settings at the values lockstep computes, and bookkeeping, load.
    let dir = fresh();
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (k, v) in [
        ("hidden_act", serde_json::json!("silu")),
        ("attention_bias", serde_json::json!(false)),
        ("mlp_bias", serde_json::json!(false)),
        ("pretraining_tp", serde_json::json!(1)),
        ("architectures", serde_json::json!(["LlamaForCausalLM"])),
        ("torch_dtype", serde_json::json!("float32")),
        ("eos_token_id", serde_json::json!(2)),
    ] {
        cfg[k] = v;
    }
    std::fs::write(&path, cfg.to_string()).unwrap();
    let loaded = Model::load(dir.path()).unwrap();
    assert_eq!(loaded.digest, model.digest);
    // Its end of text comes from config.json, or generation_config.json
    // when that says.
    assert_eq!(loaded.end_ids, vec![2]);
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 7]}"#,
    )
    .unwrap();
    assert_eq!(Model::load(dir.path()).unwrap().end_ids, vec![2, 7]);
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": "x"}"#,
    )
    .unwrap();
    assert!(Model::load(dir.path())
        .unwrap_err()
        .to_string()
        .contains("eos_token_id"));
}

/// F16 and BF16 checkpoints are held as stored (half of F32) and widened
/// in the kernels: the engine gives the spec's bits on every ISA, and the
/// digest is that of the same values as F32.
#[test]
fn half_precision_checkpoints_are_held_packed_and_match_the_spec() {
    let model = Model::load(&shared_model("stories260K.bin")).unwrap();
    let prompt = [1u32, 400, 45, 300, 7, 90];
    for dtype in [safetensors::Dtype::BF16, safetensors::Dtype::F16] {
        let dir = tempfile::tempdir().unwrap();
        write_hf(&model, dir.path());
        // The same tensors in 16 bits (BF16: the upper half of each f32;
        // F16: the f32 rounded toward zero, the weights being normal f16s).
        let halves: Vec<(String, Shaped)> = hf_tensors(dir.path())
            .into_iter()
            .map(|(n, (shape, bytes))| {
                let h: Vec<u8> = bytes
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let b = u32::from_le_bytes(c.try_into().unwrap());
                        let h = match dtype {
                            safetensors::Dtype::BF16 => (b >> 16) as u16,
                            _ => {
                                let (s, e, m) = (b >> 31, (b >> 23) & 0xFF, b & 0x7F_FFFF);
                                if e < 113 {
                                    (s << 15) as u16
                                } else {
                                    ((s << 15) | ((e - 112).min(30) << 10) | (m >> 13)) as u16
                                }
                            }
                        };
                        h.to_le_bytes()
                    })
                    .collect();
                (n, (shape, h))
            })
            .collect();
        lockstep_tests::models::write_safetensors(
            &dir.path().join("model.safetensors"),
            dtype,
            &halves,
        );
        let half = Model::load(dir.path()).unwrap();
        let f32_bytes: usize = half.layers.iter().map(|l| l.wq.rows * l.wq.cols * 4).sum();
        let held: usize = half.layers.iter().map(|l| l.wq.bytes()).sum();
        assert!(
            held * 2 <= f32_bytes + 64 * 4 * half.layers.len(),
            "{dtype:?}: {held} bytes held"
        );
        assert_ne!(
            half.digest, model.digest,
            "{dtype:?}: other values, other digest"
        );
        // The same values written as F32: the same model digest.
        let format = match dtype {
            safetensors::Dtype::BF16 => lockstep_kernels::contract::quant::Format::BF16,
            _ => lockstep_kernels::contract::quant::Format::F16,
        };
        let widened: Vec<(String, Shaped)> = halves
            .iter()
            .map(|(n, (s, b))| {
                let v = lockstep_kernels::contract::quant::dequantize(format, b, b.len() / 2);
                (
                    n.clone(),
                    (s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                )
            })
            .collect();
        let f32_dir = tempfile::tempdir().unwrap();
        write_hf(&model, f32_dir.path());
        write_safetensors(&f32_dir.path().join("model.safetensors"), &widened);
        assert_eq!(
            Model::load(f32_dir.path()).unwrap().digest,
            half.digest,
            "{dtype:?}"
        );
        assert_engine_matches_spec(&half, &prompt, &[2], &format!("{dtype:?}"));
    }
}
