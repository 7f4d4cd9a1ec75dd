//! Generate jobs over a real nats-server (authorization on) and real worker
//! processes: models pushed by digest and fetched by workers, generations
//! verified across workers of different thread counts, receipts that bind
//! the prompt and output ids, a corrupted generation caught, and bad
//! generate jobs answered with clear errors while the worker keeps serving.

use std::time::Duration;

use futures::StreamExt;
use lockstep::batch::{parse_batch_str, BatchJob};
use lockstep::coordinator::receipt::{parse_receipts, verify_receipt};
use lockstep::coordinator::{submit, SubmitOptions, Verdict};
use lockstep::protocol::*;
use lockstep_kernels::contract::Generate;
use lockstep_kernels::model::generate::generate_all;
use lockstep_kernels::model::{Engine, Model};
use lockstep_kernels::{outputs_digest, Op};
use lockstep_tests::{direct_job, nats_server, send_to_worker, wait_workers, watch_results, Procs};

fn opts(
    server: &lockstep::harness::NatsServer,
    batch: &str,
    out: Option<&std::path::Path>,
) -> SubmitOptions {
    SubmitOptions {
        signer: Some(std::sync::Arc::new(
            server.coordinator().identity().unwrap().unwrap(),
        )),
        redundancy: 2,
        batch_id: Some(batch.into()),
        worker_timeout: Duration::from_secs(3),
        job_timeout: Duration::from_secs(120),
        deadline: Some(Duration::from_secs(400)),
        progress: false,
        threads: 1,
        out_dir: out.map(|p| p.to_path_buf()),
        ..Default::default()
    }
}

fn smollm2_present() -> bool {
    lockstep::llm::models::resolve("smollm2").is_ok()
}

/// The batch: tiny llama2.c models by ids (greedy and sampled), and, when
/// SmolLM2 is installed, a text prompt and a chat.
fn batch_text() -> String {
    let mut lines = vec![
        r#"{"id": "stories-greedy", "op": "generate", "model": "stories260K", "prompt_ids": [1, 403, 407, 261, 378], "max_tokens": 24}"#.to_string(),
        r#"{"id": "stories-sampled", "op": "generate", "model": "stories260K", "prompt_ids": [1, 403], "max_tokens": 24, "temperature": 0.9, "top_p": 0.9, "seed": 11}"#.to_string(),
        r#"{"id": "aidreams-topk", "op": "generate", "model": "aidreams260K", "prompt_ids": [1, 300, 301], "max_tokens": 16, "temperature": 1.0, "top_k": 8, "seed": 5, "stop": [2]}"#.to_string(),
        // Text, through the llama2.c tokenizer file beside the checkpoint.
        r#"{"id": "aidreams-text", "op": "generate", "model": "aidreams260K", "prompt": "I dreamed of a blue house", "max_tokens": 12}"#.to_string(),
    ];
    if smollm2_present() {
        lines.push(r#"{"id": "smol-text", "op": "generate", "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6}"#.to_string());
        lines.push(r#"{"id": "smol-chat", "op": "generate", "model": "smollm2", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6}"#.to_string());
    }
    lines.join("\n")
}

/// Each job's outputs digest, computed here with the model engine.
fn expected(jobs: &[BatchJob]) -> Vec<lockstep_kernels::Digest> {
    jobs.iter()
        .map(|j| {
            let Op::Generate(g) = &j.op else {
                panic!("not generate")
            };
            let model = Model::load(j.model_file.as_ref().unwrap()).unwrap();
            let engine = Engine::new(&model, 1, lockstep_kernels::cpu::Isa::detect()).unwrap();
            let lockstep::batch::Tensor::Data { data, .. } = &j.inputs[0] else {
                panic!("inline prompt")
            };
            let ids = lockstep_kernels::contract::generate::prompt_ids(data).unwrap();
            let out = generate_all(&engine, &[(ids, g.clone())]).unwrap();
            let digests: Vec<_> = out[0].outputs().iter().map(|t| t.digest()).collect();
            outputs_digest(&digests)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_jobs_verify_across_thread_counts_and_receipts_bind_the_ids() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    procs.worker_args(&server, "gen-t1", "cpu", &["--threads", "1"], &[]);
    procs.worker_args(&server, "gen-t2", "cpu", &["--threads", "2"], &[]);
    procs.worker_args(&server, "gen-t3", "cpu", &["--threads", "3"], &[]);
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["gen-t1", "gen-t2", "gen-t3"]).await;
    let jobs = parse_batch_str(&batch_text(), std::path::Path::new(".")).unwrap();
    let want = expected(&jobs);
    let out = tempfile::tempdir().unwrap();
    let report = submit(
        &nats,
        jobs.clone(),
        &opts(&server, "gen-ok", Some(out.path())),
    )
    .await
    .unwrap();
    assert_eq!(report.verified, jobs.len(), "{report:#?}");
    for (j, w) in report.jobs.iter().zip(&want) {
        assert_eq!(j.digest, Some(*w), "{}: not the engine's generation", j.job);
        assert_eq!(j.results.len(), 2);
        let g = j.generation.as_ref().expect("a generation report");
        assert!(!g.output_ids.is_empty());
    }
    // The same request twice gives the same tokens; sampling really sampled
    // (the sampled job differs from greedy decoding of its prompt).
    let gen = |id: &str| {
        report
            .jobs
            .iter()
            .find(|j| j.job == id)
            .and_then(|j| j.generation.clone())
            .unwrap()
    };
    assert_eq!(gen("stories-greedy").output_ids.len(), 24);
    // Receipts verify offline against the deployment and bind the ids.
    let text = std::fs::read_to_string(out.path().join("receipts.jsonl")).unwrap();
    let receipts = parse_receipts(&text).unwrap();
    assert_eq!(receipts.len(), jobs.len());
    let dep = lockstep::deploy::Deployment::open(&server.dir()).unwrap();
    for r in &receipts {
        verify_receipt(r, Some(&dep)).unwrap();
        let op: Op = serde_json::from_value(r.op.clone()).unwrap();
        let Op::Generate(g) = op else {
            panic!("not generate")
        };
        if r.job.starts_with("smol") || r.job == "aidreams-text" {
            assert!(g.tokenizer.is_some(), "a text prompt binds its tokenizer");
        }
        // Any change to the ids or the sampling is caught.
        let mut bad = r.clone();
        bad.generation.as_mut().unwrap().output_ids[0] ^= 1;
        assert!(verify_receipt(&bad, Some(&dep)).is_err());
        let mut bad = r.clone();
        bad.generation.as_mut().unwrap().prompt_ids.push(5);
        assert!(verify_receipt(&bad, Some(&dep)).is_err());
        let mut bad = r.clone();
        bad.op["params"]["seed"] = serde_json::json!(12345);
        assert!(verify_receipt(&bad, Some(&dep)).is_err());
    }
    // The workers advertise the models they hold.
    let live = lockstep::nats::live_workers(&nats, Duration::from_secs(5))
        .await
        .unwrap();
    let held: usize = live
        .iter()
        .filter_map(|w| w.record.models.as_ref())
        .map(|m| m.loaded.len())
        .sum();
    assert!(held > 0, "no worker advertises a loaded model");
}

/// A WGSL worker (lavapipe in CI) and a CPU worker of another operator
/// compute every generation of the batch; their digests agree bit for bit,
/// so every job is verified with one result from each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wgsl_worker_and_a_cpu_worker_verify_generations_together() {
    if lockstep_tests::open_wgsl(None).is_none() {
        return;
    }
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    procs.worker(&server, "gen-cpu", "cpu", &[]);
    procs.worker(&server, "gen-wgsl", "wgpu", &[]);
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["gen-cpu", "gen-wgsl"]).await;
    let jobs = parse_batch_str(&batch_text(), std::path::Path::new(".")).unwrap();
    let want = expected(&jobs);
    let report = submit(&nats, jobs.clone(), &opts(&server, "gen-mixed", None))
        .await
        .unwrap();
    assert_eq!(report.verified, jobs.len(), "{report:#?}");
    for (j, w) in report.jobs.iter().zip(&want) {
        assert_eq!(j.digest, Some(*w), "{}: not the engine's generation", j.job);
        let mut backends: Vec<&str> = j.results.iter().map(|r| r.backend.as_str()).collect();
        backends.sort();
        assert_eq!(backends, ["cpu", "wgpu"], "{}: {:?}", j.job, j.results);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_generation_is_caught_and_the_honest_text_accepted() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    procs.worker(&server, "gen-honest-1", "cpu", &[]);
    procs.worker(&server, "gen-honest-2", "cpu", &[]);
    procs.worker(
        &server,
        "gen-faulty",
        "cpu",
        &[("LOCKSTEP_FAULT_INJECT_EVERY", "1")],
    );
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["gen-honest-1", "gen-honest-2", "gen-faulty"]).await;
    let lines: Vec<String> = (0..6)
        .map(|i| format!(
            r#"{{"id": "g{i}", "op": "generate", "model": "stories260K", "prompt_ids": [1, {}], "max_tokens": 12}}"#,
            300 + i
        ))
        .collect();
    let jobs = parse_batch_str(&lines.join("\n"), std::path::Path::new(".")).unwrap();
    let want = expected(&jobs);
    let report = submit(&nats, jobs, &opts(&server, "gen-fault", None))
        .await
        .unwrap();
    assert!(report.all_accepted(), "{report:#?}");
    let mut caught = 0;
    for (j, w) in report.jobs.iter().zip(&want) {
        assert_eq!(
            j.digest,
            Some(*w),
            "{}: the accepted text is not the honest one",
            j.job
        );
        if j.results.iter().any(|r| r.worker == "gen-faulty") {
            caught += 1;
            assert_eq!(j.verdict, Verdict::Resolved);
            assert_eq!(j.faulty_workers, vec!["gen-faulty".to_string()]);
        } else {
            assert!(j.faulty_workers.is_empty());
        }
    }
    assert!(
        caught >= 1,
        "the faulty worker computed nothing; the test proves nothing"
    );
    assert!(report.faults.iter().all(|f| f.worker == "gen-faulty"));
}

/// Sends one generate job straight to a worker and waits for its result.
async fn answer(
    nats: &lockstep::nats::Nats,
    results: &mut async_nats::jetstream::consumer::pull::Ordered,
    worker: &str,
    id: &str,
    g: Generate,
    prompt: &[u32],
) -> Outcome {
    let data: Vec<f32> = prompt.iter().map(|&t| t as f32).collect();
    let spec = JobSpec {
        op: Op::Generate(g),
        inputs: vec![TensorRef::inline(vec![data.len()], &data)],
    };
    let job = direct_job(worker, "gen-bad", id, spec);
    send_to_worker(nats, worker, "gen-bad", serde_json::to_vec(&job).unwrap()).await;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(120), results.next())
            .await
            .expect("a result in time")
            .unwrap()
            .unwrap();
        let rs = parse_results(&m.payload).unwrap();
        if let Some(r) = rs.into_iter().find(|r| r.job == id) {
            return r.outcome;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_generate_jobs_get_clear_errors_and_the_worker_keeps_serving() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    // A cache of its own: the model it fetches is the one stored below.
    let cache = tempfile::tempdir().unwrap();
    procs.worker(
        &server,
        "gen-w",
        "cpu",
        &[("LOCKSTEP_CACHE_DIR", cache.path().to_str().unwrap())],
    );
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["gen-w"]).await;
    let local = lockstep::llm::distribute::LocalModel::load("stories260K").unwrap();
    let digest = local.model.digest;
    lockstep::llm::distribute::push(&nats, &local)
        .await
        .unwrap();
    // A model of its own (stories260K with one norm weight changed: no other
    // test shares its digest, so no process-wide cache holds another file
    // of it) stored as a GGUF that carries a SentencePiece vocabulary: a
    // job naming another tokenizer is refused by the worker, and by a
    // coordinator.
    use lockstep_tests::models::{llama_vocabulary, shared_model, write_gguf, Meta};
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("own-spm.gguf");
    let mut own = lockstep_kernels::model::Model::load(&local.path).unwrap();
    own.final_norm[0] += 0.5;
    let (pieces, scores, types) = llama_vocabulary(&shared_model("aidreams260K-tok512.bin"));
    write_gguf(
        &own,
        &gguf,
        vec![
            ("tokenizer.ggml.model", Meta::Str("llama".into())),
            ("tokenizer.ggml.tokens", Meta::Strs(pieces)),
            ("tokenizer.ggml.scores", Meta::F32s(scores)),
            ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ],
    );
    let with_tok = lockstep::llm::distribute::LocalModel::load(gguf.to_str().unwrap()).unwrap();
    let own = with_tok.model.digest;
    assert_ne!(own, digest);
    lockstep::llm::distribute::push(&nats, &with_tok)
        .await
        .unwrap();
    // A model blob whose content does not match its name: stories260K's
    // bytes stored under another digest.
    let forged = lockstep_kernels::Digest([0x5a; 32]);
    let bytes = std::fs::read(&local.path).unwrap();
    nats.models
        .put(forged.to_hex().as_str(), &mut bytes.as_slice())
        .await
        .unwrap();
    let g = Generate::greedy;
    let mut results = watch_results(&nats, &results_filter("gen-bad")).await;
    let cases: Vec<(&str, Generate, Vec<u32>, ErrorCode, &str)> = vec![
        (
            "unknown-model",
            g(lockstep_kernels::Digest([1; 32]), 4),
            vec![1, 2],
            ErrorCode::MissingBlob,
            "not in the model store",
        ),
        (
            "forged-model",
            g(forged, 4),
            vec![1, 2],
            ErrorCode::TamperedBlob,
            "hashes to",
        ),
        (
            "over-context",
            g(digest, local.model.config.max_seq),
            vec![1, 2],
            ErrorCode::TooLarge,
            "context",
        ),
        (
            "outside-vocab",
            g(digest, 4),
            vec![1, 100_000],
            ErrorCode::BadShape,
            "vocabulary",
        ),
        (
            "zero-tokens",
            g(digest, 0),
            vec![1, 2],
            ErrorCode::BadShape,
            "max_tokens",
        ),
        (
            "wrong-tokenizer",
            Generate {
                tokenizer: Some(lockstep_kernels::Digest([9; 32])),
                ..g(own, 4)
            },
            vec![1, 2],
            ErrorCode::BadShape,
            "tokenizer",
        ),
        (
            "absurd-tokens",
            g(digest, 1 << 40),
            vec![1, 2],
            ErrorCode::TooLarge,
            "max_tokens",
        ),
    ];
    for (id, params, prompt, code, says) in cases {
        match answer(&nats, &mut results, "gen-w", id, params, &prompt).await {
            Outcome::Error { code: c, message } => {
                assert_eq!(c, code, "{id}: {message}");
                assert!(message.contains(says), "{id}: {message}");
                assert!(!message.contains('\n'), "{id}: not one line: {message}");
            }
            o => panic!("{id}: {o:?}"),
        }
    }
    // A worker that cannot hold the model says so ("not me").
    procs.worker_args(&server, "gen-small", "cpu", &["--max-model-mib", "0"], &[]);
    wait_workers(&nats, &["gen-small"]).await;
    match answer(
        &nats,
        &mut results,
        "gen-small",
        "small",
        g(digest, 4),
        &[1, 2],
    )
    .await
    {
        Outcome::Error { code, message } => {
            assert_eq!(code, ErrorCode::TooLarge, "{message}");
            assert!(message.contains("--max-model-mib"), "{message}");
        }
        o => panic!("small: {o:?}"),
    }
    // The forged file was dropped from the worker's cache, and the worker
    // still serves a good job.
    match answer(
        &nats,
        &mut results,
        "gen-w",
        "good",
        g(digest, 5),
        &[1, 403],
    )
    .await
    {
        Outcome::Ok { outputs, .. } => assert_eq!(outputs.len(), 2),
        o => panic!("good job: {o:?}"),
    }
    assert!(procs.is_running("gen-w"));
    // A coordinator checks jobs that name a stored model against it before
    // dispatching anything: a foreign tokenizer, ids outside the vocabulary.
    for (params, prompt, says) in [
        (
            format!(
                r#"{{"model":"{own}","tokenizer":"{}","max_tokens":4}}"#,
                lockstep_kernels::Digest([9; 32])
            ),
            "[1, 2]",
            "tokenizer",
        ),
        (
            format!(r#"{{"model":"{digest}","max_tokens":4}}"#),
            "[1, 99999]",
            "vocabulary",
        ),
    ] {
        let line = format!(
            r#"{{"id":"t","op":"generate","params":{params},"inputs":[{{"shape":[2],"data":{prompt}}}]}}"#
        );
        let jobs = parse_batch_str(&line, std::path::Path::new(".")).unwrap();
        let e = submit(&nats, jobs, &opts(&server, "gen-refused", None))
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains(says), "{e:#}");
    }
}

/// One generation (stories260K, 16 tokens) on an honest worker and a
/// faulty one (the test switches in `env`): the dispute's report, and the
/// faults it recorded.
async fn dispute_with(
    env: &[(&str, &str)],
    batch: &str,
) -> Option<(
    lockstep::coordinator::report::JobReport,
    Vec<FaultRecord>,
    lockstep_kernels::Digest,
)> {
    let server = nats_server()?;
    let mut procs = Procs::default();
    procs.worker(&server, "honest", "cpu", &[]);
    procs.worker(&server, "faulty", "cpu", env);
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["honest", "faulty"]).await;
    let line = r#"{"id": "story", "op": "generate", "model": "stories260K", "prompt_ids": [1, 403, 407, 261, 378, 300], "max_tokens": 16}"#;
    let jobs = parse_batch_str(line, std::path::Path::new(".")).unwrap();
    let want = expected(&jobs)[0];
    let mut o = opts(&server, batch, None);
    o.dispute_timeout = Duration::from_secs(8);
    let report = submit(&nats, jobs, &o).await.unwrap();
    assert!(report.all_accepted(), "{report:#?}");
    let j = report.jobs[0].clone();
    assert_eq!(j.verdict, Verdict::Resolved, "{j:#?}");
    assert_eq!(
        j.digest,
        Some(want),
        "the accepted generation is not the honest one"
    );
    assert_eq!(j.faulty_workers, vec!["faulty".to_string()], "{j:#?}");
    assert!(report.faults.iter().all(|f| f.worker == "faulty"));
    Some((j, report.faults, want))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_in_one_layer_is_pinned_by_replaying_that_layer_alone() {
    let Some((j, faults, _)) =
        dispute_with(&[("LOCKSTEP_FAULT_INJECT_LAYER", "7:2")], "gen-layer").await
    else {
        return;
    };
    let d = j.dispute.expect("settled by a one-layer replay");
    assert_eq!((d.position, d.layer), (7, Some(2)), "{d:?}");
    assert_eq!(d.positions_replayed, 8);
    assert!(
        faults[0].reason.contains("layer 2 at position 7"),
        "{}",
        faults[0].reason
    );
    eprintln!(
        "one-layer replay {:.2} ms; the generation {:.1} ms",
        d.replay_ms, d.generation_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_pinned_after_the_last_layer() {
    let Some((j, faults, _)) =
        dispute_with(&[("LOCKSTEP_FAULT_INJECT_TOKEN", "3")], "gen-token").await
    else {
        return;
    };
    let d = j.dispute.expect("settled by replaying the final step");
    // Token 3 is sampled at position prompt (6) + 3 − 1.
    assert_eq!((d.position, d.layer), (8, None), "{d:?}");
    assert!(
        faults[0].reason.contains("after the last layer"),
        "{}",
        faults[0].reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lies_in_a_dispute_is_at_fault() {
    let Some((_, faults, _)) = dispute_with(
        &[
            ("LOCKSTEP_FAULT_INJECT_LAYER", "2:0"),
            ("LOCKSTEP_TEST_DISPUTE", "lie"),
        ],
        "gen-lie",
    )
    .await
    else {
        return;
    };
    assert!(
        faults[0].reason.contains("does not hash to the trace root"),
        "{}",
        faults[0].reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_does_not_answer_a_dispute_is_at_fault() {
    let Some((_, faults, _)) = dispute_with(
        &[
            ("LOCKSTEP_FAULT_INJECT_LAYER", "2:0"),
            ("LOCKSTEP_TEST_DISPUTE", "silent"),
        ],
        "gen-silent",
    )
    .await
    else {
        return;
    };
    assert!(
        faults[0].reason.contains("no answer within"),
        "{}",
        faults[0].reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_workers_are_caught_on_generate_jobs() {
    use lockstep_tests::adversary::AdversaryProc;
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    let honest = ["gh1", "gh2", "gh3"];
    for w in honest {
        procs.worker(&server, w, "cpu", &[]);
    }
    let liars = [
        ("gliar-shape", "wrong-shape"),
        ("gliar-error", "false-error"),
        ("gliar-sig", "bad-signature"),
        ("gliar-wrong", "wrong"),
    ];
    let _adversaries: Vec<AdversaryProc> = liars
        .iter()
        .map(|(n, mode)| AdversaryProc::start(&server, n, &format!("op-{n}"), mode))
        .collect();
    let nats = server.connect().await.unwrap();
    let mut all: Vec<&str> = honest.to_vec();
    all.extend(liars.iter().map(|(n, _)| *n));
    wait_workers(&nats, &all).await;
    let lines: Vec<String> = (0..10)
        .map(|i| format!(
            r#"{{"id": "lie{i}", "op": "generate", "model": "stories260K", "prompt_ids": [1, {}, 407], "max_tokens": 10}}"#,
            300 + i
        ))
        .collect();
    let jobs = parse_batch_str(&lines.join("\n"), std::path::Path::new(".")).unwrap();
    let want = expected(&jobs);
    let report = submit(&nats, jobs, &opts(&server, "gen-liars", None))
        .await
        .unwrap();
    assert!(report.all_accepted(), "{report:#?}");
    for (j, w) in report.jobs.iter().zip(&want) {
        assert_eq!(j.digest, Some(*w), "{}: a lie was accepted", j.job);
        for h in honest {
            assert!(
                !j.faulty_workers.iter().any(|f| f == h),
                "{h} blamed: {j:#?}"
            );
        }
    }
    let caught: Vec<&str> = liars
        .iter()
        .map(|(l, _)| *l)
        .filter(|l| report.faults.iter().any(|f| f.worker == *l))
        .collect();
    for (liar, _) in liars {
        let answered = report
            .jobs
            .iter()
            .any(|j| j.results.iter().any(|r| r.worker == liar));
        assert!(
            !answered || caught.contains(&liar),
            "{liar} answered and was not caught"
        );
    }
    assert!(
        caught.len() >= 2,
        "too few liars got a job: {:?}",
        report.faults
    );
    assert!(report
        .faults
        .iter()
        .all(|f| !honest.contains(&f.worker.as_str())));
}

/// A lazy worker that answers generate jobs with the right tokens and trace
/// root (as if learned from another worker) but names outputs it never
/// stored gets no credit: every job is verified by the honest workers, no
/// result or receipt of the copier counts, and no honest worker is blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lazy_copier_gets_no_credit_for_generations() {
    use lockstep_tests::adversary::AdversaryProc;
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    let honest = ["gc1", "gc2"];
    for w in honest {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", "20")]);
    }
    let _copier = AdversaryProc::start(&server, "gcopier", "op-gcopier", "copy");
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["gc1", "gc2", "gcopier"]).await;
    let lines: Vec<String> = (0..8)
        .map(|i| format!(
            r#"{{"id": "copy{i}", "op": "generate", "model": "stories260K", "prompt_ids": [1, {}, 407], "max_tokens": 8}}"#,
            320 + i
        ))
        .collect();
    let jobs = parse_batch_str(&lines.join("\n"), std::path::Path::new(".")).unwrap();
    let want = expected(&jobs);
    let out = tempfile::tempdir().unwrap();
    let report = submit(&nats, jobs, &opts(&server, "gen-copier", Some(out.path())))
        .await
        .unwrap();
    assert!(report.all_accepted(), "{report:#?}");
    let mut copier_answers = 0;
    for (j, w) in report.jobs.iter().zip(&want) {
        assert_eq!(j.digest, Some(*w), "{}", j.job);
        for r in j.results.iter().filter(|r| r.worker == "gcopier") {
            copier_answers += 1;
            assert!(r.digest.is_none(), "the copier's digest counted: {j:#?}");
        }
        for h in honest {
            assert!(
                !j.faulty_workers.iter().any(|f| f == h),
                "{h} blamed: {j:#?}"
            );
        }
    }
    assert!(
        copier_answers > 0,
        "the copier was given no job: nothing was tested"
    );
    // Its digests were right (a wrong one would be a fault): it is refused
    // credit for outputs it never stored, not blamed for a wrong answer.
    assert!(
        !report.faults.iter().any(|f| f.worker == "gcopier"),
        "{:#?}",
        report.faults
    );
    let receipts =
        parse_receipts(&std::fs::read_to_string(out.path().join("receipts.jsonl")).unwrap())
            .unwrap();
    assert_eq!(receipts.len(), 8);
    for r in &receipts {
        verify_receipt(r, None).unwrap();
        assert!(
            r.workers.iter().all(|w| w.worker != "gcopier"),
            "a receipt names the copier: {r:#?}"
        );
    }
}

/// The batch of the crash tests: `n` stories260K generations.
fn story_lines(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"id": "s{i:02}", "op": "generate", "model": "stories260K", "prompt_ids": [1, {}, 407, 261], "max_tokens": 20}}"#,
                300 + i
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_generation_loses_no_job() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    for w in ["gk1", "gk2", "gk3"] {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", "150")]);
    }
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["gk1", "gk2", "gk3"]).await;
    let jobs = parse_batch_str(&story_lines(12), std::path::Path::new(".")).unwrap();
    let want = expected(&jobs);
    let task = {
        let (nats, o) = (nats.clone(), opts(&server, "gen-kill", None));
        tokio::spawn(async move { submit(&nats, jobs, &o).await })
    };
    // Mid-batch (each generation waits 150 ms first): SIGKILL a worker
    // that holds replicas.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let victim = lockstep_tests::holder_of_replicas(&nats, "gen-kill").await;
    procs.kill(&victim);
    let report = task.await.unwrap().unwrap();
    assert_eq!(report.verified, 12, "{report:#?}");
    for (j, w) in report.jobs.iter().zip(&want) {
        assert_eq!(j.digest, Some(*w));
        assert!(j
            .results
            .iter()
            .all(|r| r.worker != victim || j.results.len() == 2));
    }
    assert!(
        report
            .jobs
            .iter()
            .any(|j| j.reassigned_from.contains(&victim)),
        "{victim} held replicas when killed; they must have moved"
    );
}

#[test]
fn a_restarted_coordinator_resumes_a_generate_batch() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    for w in ["gc1", "gc2", "gc3"] {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", "400")]);
    }
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("batch.jsonl");
    // Model names resolve from the repository (the test's working folder).
    std::fs::write(&batch, story_lines(12)).unwrap();
    let out = dir.path().join("out");
    let submit_cmd = || lockstep_tests::resumable_submit(&server, "gen-resume", &out, &batch, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let nats = rt.block_on(server.connect()).unwrap();
    rt.block_on(wait_workers(&nats, &["gc1", "gc2", "gc3"]));
    let mut first = submit_cmd()
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        first.try_wait().unwrap().is_none(),
        "the batch finished before the kill; make jobs longer"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    let o = submit_cmd().output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["verified"], 12, "{report:#}");
    let jobs = parse_batch_str(&story_lines(12), std::path::Path::new(".")).unwrap();
    let want = expected(&jobs);
    for (j, w) in report["jobs"].as_array().unwrap().iter().zip(&want) {
        assert_eq!(j["results"].as_array().unwrap().len(), 2, "{j:#}");
        assert_eq!(j["digest"].as_str().unwrap(), w.to_string());
        assert!(j["generation"]["output_ids"]
            .as_array()
            .is_some_and(|a| !a.is_empty()));
    }
}

/// The README's first command, on the tiny model: verified text, a dispute
/// settled by one layer, receipts that verify.
#[test]
fn the_demo_shows_verified_text_and_a_one_layer_dispute() {
    if lockstep_tests::nats_server().is_none() {
        return;
    }
    let o = std::process::Command::new(lockstep_tests::lockstep_bin())
        .args(["demo", "--model", "stories260K", "--max-tokens", "12"])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("verified by") || text.contains("resolved by"),
        "{text}"
    );
    assert!(text.contains("4 receipts verify"), "{text}");
    // The faulty worker is given a job almost always; when it is, the
    // dispute names it and the layer.
    if !text.contains("no dispute") {
        assert!(
            text.contains("dispute on [")
                && text.contains("demo-faulty differed first at position 5, layer 2"),
            "{text}"
        );
    }
}
