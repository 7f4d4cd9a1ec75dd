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

/// Runs the jobs with r = 2 on two CPU workers and checks every verdict,
/// digest and written output against the spec.
async fn run(server: &NatsServer, batch: &str, jobs: Vec<(BatchJob, lockstep_kernels::Digest)>) {
    let mut procs = Procs::default();
    let (w1, w2) = (format!("{batch}-1"), format!("{batch}-2"));
    procs.worker(&server.url(), &w1, "cpu", &[]);
    procs.worker(&server.url(), &w2, "cpu", &[]);
    let nats = lockstep::nats::connect(&server.url()).await.unwrap();
    lockstep::nats::wait_for_workers(&nats, &[&w1, &w2], Duration::from_secs(120))
        .await
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = SubmitOptions {
        redundancy: 2,
        batch_id: Some(batch.into()),
        out_dir: Some(out.path().to_path_buf()),
        worker_timeout: Duration::from_secs(5),
        job_timeout: Duration::from_secs(120),
        deadline: Some(Duration::from_secs(240)),
        progress: false,
        threads: 1,
    };
    let (batch_jobs, wants): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
    let n = batch_jobs.len();
    let report = submit(&nats, batch_jobs, &opts).await.unwrap();
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
    let Ok(server) = NatsServer::start_with(&ServerOptions {
        max_payload: Some(64 << 10),
    }) else {
        assert!(
            std::env::var_os("LOCKSTEP_REQUIRE_NATS").is_none(),
            "no nats-server"
        );
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
