//! Volume against a real nats-server and real workers: result bundles
//! larger than one message, outputs at and around the inline threshold, and
//! a server whose `max_payload` is 64 KiB. Every job must verify, with the
//! spec's digest, and the outputs written must be the spec's.

use std::time::Duration;

use lockstep::batch::{BatchJob, Tensor};
use lockstep::coordinator::{submit, SubmitOptions};
use lockstep::harness::{NatsServer, ServerOptions};
use lockstep::protocol::inline_limit;
use lockstep_kernels::{matmul_spec, tensor_digest_f32, MatmulDims};
use lockstep_tests::{random_values, rng, Procs, Values};

/// A matmul job of the given shape with random values, and the spec's
/// digest of its output.
fn job(id: &str, dims: MatmulDims, seed: u64) -> (BatchJob, lockstep_kernels::Digest) {
    let mut r = rng(seed);
    let a = random_values(&mut r, dims.m * dims.k, Values::MixedMagnitudes);
    let b = random_values(&mut r, dims.k * dims.n, Values::MixedMagnitudes);
    let want = tensor_digest_f32(&[dims.m, dims.n], &matmul_spec(&a, &b, dims));
    let t = |shape: Vec<usize>, data: Vec<f32>| Tensor::Data { shape, data };
    (
        BatchJob::matmul(id, t(vec![dims.m, dims.k], a), t(vec![dims.k, dims.n], b)),
        want,
    )
}

/// Starts two CPU workers and submits the jobs with r = 2; returns the
/// report and the output folder.
async fn submit_on_two_workers(
    server: &NatsServer,
    batch: &str,
    jobs: Vec<BatchJob>,
    tweak: impl FnOnce(&mut SubmitOptions),
) -> (
    lockstep::coordinator::Report,
    tempfile::TempDir,
    lockstep::nats::Nats,
) {
    let mut procs = Procs::default();
    let (w1, w2) = (format!("{batch}-1"), format!("{batch}-2"));
    procs.worker(server, &w1, "cpu", &[]);
    procs.worker(server, &w2, "cpu", &[]);
    let nats = server.connect().await.unwrap();
    lockstep::nats::wait_for_workers(&nats, &[&w1, &w2], Duration::from_secs(120))
        .await
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut opts = SubmitOptions {
        redundancy: 2,
        batch_id: Some(batch.into()),
        out_dir: Some(out.path().to_path_buf()),
        worker_timeout: Duration::from_secs(5),
        job_timeout: Duration::from_secs(120),
        deadline: Some(Duration::from_secs(240)),
        progress: false,
        threads: 1,
        ..Default::default()
    };
    tweak(&mut opts);
    let report = submit(&nats, jobs, &opts).await.unwrap();
    (report, out, nats)
}

/// Runs the jobs with r = 2 on two CPU workers and checks every verdict,
/// digest and written output against the spec.
async fn run(server: &NatsServer, batch: &str, jobs: Vec<(BatchJob, lockstep_kernels::Digest)>) {
    let (batch_jobs, wants): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
    let n = batch_jobs.len();
    let (report, out, _) = submit_on_two_workers(server, batch, batch_jobs, |_| {}).await;
    assert_eq!(report.verified, n, "{report:#?}");
    for (j, want) in report.jobs.iter().zip(&wants) {
        assert_eq!(j.digest, Some(*want), "{}", j.job);
        assert!(
            j.faulty_workers.is_empty(),
            "{}: {:?}",
            j.job,
            j.faulty_workers
        );
        let file = out
            .path()
            .join("outputs")
            .join(format!("{}.safetensors", j.job));
        let (shape, data) = lockstep::tensors::read_f32_tensor(&file, "c").unwrap();
        assert_eq!(
            tensor_digest_f32(&shape, &data),
            *want,
            "{} as written",
            j.job
        );
    }
}

/// Messages the server holds on these subjects of a stream.
async fn held(stream: &mut async_nats::jetstream::stream::Stream, filter: &str) -> usize {
    use futures::StreamExt;
    stream
        .info_with_subjects(filter)
        .await
        .unwrap()
        .collect::<Vec<_>>()
        .await
        .len()
}

/// A batch whose inputs and outputs travel as objects.
fn object_jobs(prefix: &str, n: usize) -> Vec<BatchJob> {
    (0..n)
        .map(|i| {
            job(
                &format!("{prefix}{i}"),
                MatmulDims::new(130, 140, 130),
                500 + i as u64,
            )
            .0
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_batch_is_purged_from_the_server_unless_kept() {
    let Some(server) = lockstep_tests::nats_server() else {
        return;
    };
    let (report, _out, nats) =
        submit_on_two_workers(&server, "gone", object_jobs("g", 4), |_| {}).await;
    assert_eq!(report.verified, 4, "{report:#?}");
    let purged = report.purged.expect("purged");
    assert!(purged.results > 0 && purged.plans > 0, "{purged:?}");
    // 4 inputs a and 4 b: every blob was this batch's alone; 4 outputs
    // stored by each of the 2 workers, one chunk each.
    assert_eq!(purged.blobs, 8, "{purged:?}");
    assert_eq!(purged.outputs, 8, "{purged:?}");
    let mut results = nats.js.get_stream("LOCKSTEP_RESULTS").await.unwrap();
    assert_eq!(held(&mut results, "lockstep.result.gone.*").await, 0);
    // Each worker's own streams too.
    for w in ["gone-1", "gone-2"] {
        let mut outputs = nats
            .js
            .get_stream(lockstep::protocol::worker_outputs_stream(w))
            .await
            .unwrap();
        assert_eq!(held(&mut outputs, "lockstep.out.*.gone.>").await, 0);
        let mut results = nats
            .js
            .get_stream(lockstep::protocol::worker_results_stream(w))
            .await
            .unwrap();
        assert_eq!(held(&mut results, "lockstep.result.gone.*").await, 0);
    }
    let mut plans = nats.js.get_stream("KV_lockstep_assign").await.unwrap();
    assert_eq!(held(&mut plans, "$KV.lockstep_assign.gone.>").await, 0);
    // No object left, and no chunk either (replicas store the same output
    // at the same moment; that must not leave chunks behind).
    let mut blobs = nats.js.get_stream("OBJ_lockstep_blobs").await.unwrap();
    assert_eq!(held(&mut blobs, "$O.lockstep_blobs.C.>").await, 0);
    // The same jobs again, kept: everything stays.
    let (report, _out, nats) = submit_on_two_workers(&server, "kept", object_jobs("g", 4), |o| {
        o.keep_batch = true
    })
    .await;
    assert_eq!(report.verified, 4, "{report:#?}");
    assert!(report.purged.is_none());
    // Inputs and outputs were stored again after the first batch deleted
    // them: every output could be fetched and written.
    for j in &report.jobs {
        let file = _out
            .path()
            .join("outputs")
            .join(format!("{}.safetensors", j.job));
        assert!(file.exists(), "{} not written", j.job);
    }
    let mut results = nats.js.get_stream("LOCKSTEP_RESULTS").await.unwrap();
    assert!(held(&mut results, "lockstep.result.kept.*").await > 0);
    let mut blobs = nats.js.get_stream("OBJ_lockstep_blobs").await.unwrap();
    assert!(held(&mut blobs, "$O.lockstep_blobs.C.>").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_results_stream_fails_the_batch_clearly() {
    let Some(server) = lockstep_tests::nats_server() else {
        return;
    };
    // 128 results of about 22 KB each from each of two workers (5.6 MB),
    // into a stream that holds 3 MiB.
    let jobs = (0..128)
        .map(|i| job(&format!("f{i:03}"), MatmulDims::new(64, 8, 64), i).0)
        .collect();
    let (report, _out, _) = submit_on_two_workers(&server, "full", jobs, |o| {
        o.store_limits = Some(lockstep::store::StoreLimits::parse("results.bytes=3M").unwrap());
    })
    .await;
    let why = report.stopped.clone().expect("the batch must stop");
    assert!(
        why.contains("results stream") && why.contains("full"),
        "{why}"
    );
    assert!(report.failed > 0 && report.unresolved == 0, "{report:#?}");
    for j in report
        .jobs
        .iter()
        .filter(|j| j.verdict == lockstep::coordinator::Verdict::Failed)
    {
        assert_eq!(j.reason.as_deref(), Some(why.as_str()));
        assert!(j.faulty_workers.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_bundles_larger_than_a_message_are_split() {
    let Some(server) = lockstep_tests::nats_server() else {
        return;
    };
    // 64 outputs of 16 KiB: about 1.4 MB of results for one bundle, over the
    // server's 1 MiB limit.
    let jobs = (0..64)
        .map(|i| job(&format!("j{i:02}"), MatmulDims::new(64, 8, 64), i))
        .collect();
    run(&server, "split", jobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_at_and_around_the_inline_threshold() {
    let Some(server) = lockstep_tests::nats_server() else {
        return;
    };
    let floats = inline_limit(1 << 20) / 4;
    let jobs = [floats - 1, floats, floats + 1]
        .into_iter()
        .enumerate()
        .map(|(i, n)| job(&format!("t{i}"), MatmulDims::new(1, 3, n), 100 + i as u64))
        .collect();
    run(&server, "threshold", jobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_64_kib_payload_limit() {
    let Some(server) = lockstep_tests::started(NatsServer::start_with(&ServerOptions {
        max_payload: Some(64 << 10),
        ..Default::default()
    })) else {
        return;
    };
    let floats = inline_limit(64 << 10) / 4;
    let mut jobs: Vec<_> = (0..24)
        .map(|i| job(&format!("m{i:02}"), MatmulDims::new(64, 8, 64), i))
        .collect();
    // Inputs and outputs at and around this server's inline threshold, and
    // inputs far over it (objects).
    for (i, n) in [floats - 1, floats, floats + 1].into_iter().enumerate() {
        jobs.push(job(
            &format!("t{i}"),
            MatmulDims::new(1, 2, n),
            200 + i as u64,
        ));
        jobs.push(job(
            &format!("in{i}"),
            MatmulDims::new(2, n, 3),
            300 + i as u64,
        ));
    }
    jobs.push(job("big", MatmulDims::new(100, 300, 90), 400));
    run(&server, "small", jobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_splits_a_result_bundle_of_several_mib() {
    use futures::StreamExt;
    use lockstep::protocol::*;
    let Some(server) = lockstep_tests::nats_server() else {
        return;
    };
    let mut procs = Procs::default();
    procs.worker(&server, "splitter", "cpu", &[]);
    let nats = server.connect().await.unwrap();
    lockstep::nats::wait_for_workers(&nats, &["splitter"], Duration::from_secs(120))
        .await
        .unwrap();
    let mut results = lockstep_tests::watch_results(&nats, &results_filter("many")).await;
    // One bundle of 64 jobs whose outputs (64×200 f32, 51 KB each, inline)
    // come to about 4.4 MB of results: far over one 1 MiB message. (The
    // coordinator sizes its bundles so this does not happen; a worker must
    // cope anyway.)
    let dims = MatmulDims::new(64, 8, 200);
    let mut wants = std::collections::HashMap::new();
    let jobs: Vec<JobMessage> = (0..64)
        .map(|i| {
            let mut r = rng(700 + i);
            let a = random_values(&mut r, dims.m * dims.k, Values::Plain);
            let b = random_values(&mut r, dims.k * dims.n, Values::Plain);
            wants.insert(
                format!("s{i}"),
                tensor_digest_f32(&[dims.m, dims.n], &matmul_spec(&a, &b, dims)),
            );
            lockstep_tests::direct_job(
                "splitter",
                "many",
                &format!("s{i}"),
                JobSpec::matmul(
                    TensorRef::inline(vec![dims.m, dims.k], &a),
                    TensorRef::inline(vec![dims.k, dims.n], &b),
                ),
            )
        })
        .collect();
    let bundle = JobBundle {
        protocol: PROTOCOL_VERSION,
        batch: "many".into(),
        id: "big".into(),
        worker: "splitter".into(),
        jobs,
    };
    lockstep_tests::send_to_worker(
        &nats,
        "splitter",
        "many",
        serde_json::to_vec(&bundle).unwrap(),
    )
    .await;
    let (mut parts, mut seen) = (0, 0);
    while seen < 64 {
        let m = tokio::time::timeout(Duration::from_secs(60), results.next())
            .await
            .expect("all results")
            .unwrap()
            .unwrap();
        assert!(m.payload.len() <= nats.max_payload());
        let r: ResultBundle = serde_json::from_slice(&m.payload).unwrap();
        parts += 1;
        for res in r.results {
            let Outcome::Ok { digest, .. } = res.outcome else {
                panic!("{}: {:?}", res.job, res.outcome)
            };
            assert_eq!(Some(&digest), wants.get(&res.job), "{}", res.job);
            seen += 1;
        }
    }
    assert!(parts >= 4, "4.4 MB of results in {parts} messages");
    assert!(procs.is_running("splitter"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_batch_runs_again_and_named_objects_survive_the_clean_up() {
    let Some(server) = lockstep_tests::nats_server() else {
        return;
    };
    // A tensor already in the object store, named by the batch (shared
    // weights, say): the batch's clean-up must leave it there.
    let nats = server.connect().await.unwrap();
    let w = random_values(&mut rng(900), 140 * 130, Values::Plain);
    let wd = tensor_digest_f32(&[140, 130], &w);
    lockstep::nats::put_blob(&nats, &wd, &w).await.unwrap();
    let jobs = || {
        (0..3)
            .map(|i| {
                let (j, _) = job(&format!("w{i}"), MatmulDims::new(130, 140, 130), 910 + i);
                let a = j.inputs[0].clone();
                BatchJob::matmul(
                    j.id,
                    a,
                    Tensor::Object {
                        shape: vec![140, 130],
                        digest: wd,
                    },
                )
            })
            .collect::<Vec<_>>()
    };
    // The same batch twice in a row: the first run is purged, and the second
    // must not be taken for a duplicate of it (same batch id, same jobs).
    for run in 0..2 {
        let (report, _out, nats) = submit_on_two_workers(&server, "again", jobs(), |_| {}).await;
        assert_eq!(report.verified, 3, "run {run}: {report:#?}");
        assert!(report.purged.is_some(), "run {run}");
        assert!(
            lockstep::nats::blob_exists(&nats, &wd).await,
            "run {run}: the named object was deleted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_arriving_after_a_purge_are_swept() {
    use lockstep::protocol::{result_subject, worker_results_stream};
    let Some(server) = lockstep_tests::nats_server() else {
        return;
    };
    let (report, _out, nats) =
        submit_on_two_workers(&server, "early", lockstep_tests::small_jobs(4, 7), |_| {}).await;
    assert!(report.purged.is_some(), "{report:#?}");
    // A worker answers a replica of it after the purge (it had taken the
    // replica just before): the result lands in its own stream, and is
    // sourced into the results stream.
    let cfg = server.enroll("early-1", "op-early-1").unwrap();
    let bus = lockstep::worker::bus::WorkerNats::connect(&cfg, "early-1")
        .await
        .unwrap();
    bus.js
        .publish(result_subject("early", "early-1"), "late".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut own = nats
        .js
        .get_stream(worker_results_stream("early-1"))
        .await
        .unwrap();
    assert_eq!(held(&mut own, "lockstep.result.early.*").await, 1);
    // The next batch to finish sweeps it, from both.
    let (report, _out, nats) =
        submit_on_two_workers(&server, "after", lockstep_tests::small_jobs(4, 8), |_| {}).await;
    let purged = report.purged.expect("purged");
    assert!(purged.late >= 1, "{purged:?}");
    assert_eq!(held(&mut own, "lockstep.result.early.*").await, 0);
    let mut results = nats.js.get_stream("LOCKSTEP_RESULTS").await.unwrap();
    assert_eq!(held(&mut results, "lockstep.result.early.*").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_of_a_refused_object_put_are_swept() {
    use lockstep::store::{sweep_orphan_chunks, StoreLimits, ORPHAN_CHUNK_AGE};
    let Some(server) = lockstep_tests::nats_server() else {
        return;
    };
    let limits = StoreLimits::parse("blobs.bytes=1M").unwrap();
    let nats = lockstep::nats::connect_with(&server.coordinator(), &limits)
        .await
        .unwrap();
    let small: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    let small_digest = tensor_digest_f32(&[1000], &small);
    lockstep::nats::put_blob(&nats, &small_digest, &small)
        .await
        .unwrap();
    // 1.6 MB into a store of 1 MiB: refused partway, its first chunks
    // stored and named by no object.
    let large: Vec<f32> = (0..400_000).map(|i| i as f32).collect();
    let large_digest = tensor_digest_f32(&[400_000], &large);
    assert!(lockstep::nats::put_blob(&nats, &large_digest, &large)
        .await
        .is_err());
    let mut blobs = nats.js.get_stream("OBJ_lockstep_blobs").await.unwrap();
    assert_eq!(held(&mut blobs, "$O.lockstep_blobs.C.>").await, 2);
    // Young chunks may be a put in progress: kept.
    assert_eq!(
        sweep_orphan_chunks(&nats, ORPHAN_CHUNK_AGE).await.unwrap(),
        0
    );
    // Old enough, they go; the stored object stays whole.
    assert!(sweep_orphan_chunks(&nats, Duration::ZERO).await.unwrap() > 0);
    assert_eq!(held(&mut blobs, "$O.lockstep_blobs.C.>").await, 1);
    let bytes = lockstep::nats::get_blob(&nats, &small_digest)
        .await
        .unwrap();
    assert_eq!(bytes.len(), 4000);
}
