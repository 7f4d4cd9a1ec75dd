//! The trust model, second round (docs/PROTOCOL.md, "Trust"): a lazy
//! worker that names outputs it never stored, workers that refuse jobs
//! as too large (truly or falsely), and colluders whose cheats must not
//! survive their being caught. A real nats-server with authorization on,
//! real worker processes, `lockstep-adversary` processes.

use std::time::Duration;

use lockstep::coordinator::receipt::{parse_receipts, verify_receipt};
use lockstep::coordinator::{submit, Verdict};
use lockstep::protocol::*;
use lockstep_tests::adversary::{assert_all_correct, enrollment, opts, reference, AdversaryProc};
use lockstep_tests::{matmul_jobs, nats_server, small_jobs, wait_workers, Procs};

/// `n` matmul jobs whose output (140×140 f32, 78 KB) is too large to
/// travel inline, so honest workers store it in their outputs streams.
fn stored_output_jobs(n: usize, seed: u64) -> Vec<lockstep::batch::BatchJob> {
    matmul_jobs(n, seed, (140, 16, 140))
}

/// Every accepted job's output file exists and hashes to the correct digest.
fn assert_outputs_written(
    dir: &std::path::Path,
    want: &std::collections::BTreeMap<String, lockstep_kernels::Digest>,
) {
    for (job, digest) in want {
        let path = dir.join("outputs").join(format!("{job}.safetensors"));
        let t = lockstep::tensors::read_f32_tensor(&path, "c")
            .unwrap_or_else(|e| panic!("{job}: no output written: {e}"));
        let d =
            lockstep_kernels::outputs_digest(&[lockstep_kernels::tensor_digest_f32(&t.0, &t.1)]);
        assert_eq!(
            d, *digest,
            "{job}: the output written is not the accepted one"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_worker_gets_no_credit_for_outputs_it_never_stored() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    for w in ["h1", "h2"] {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", "20")]);
    }
    // A worker that flips bits on every job, next to the copier: before,
    // the copier named the flipper's stored output and got it verified.
    procs.worker(
        &server,
        "flipper",
        "cpu",
        &[
            ("LOCKSTEP_FAULT_INJECT_EVERY", "1"),
            ("LOCKSTEP_TEST_DELAY_MS", "20"),
        ],
    );
    let _copier = AdversaryProc::start(&server, "copier", "op-copier", "copy");
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["h1", "h2", "flipper", "copier"]).await;

    let jobs = stored_output_jobs(8, 61);
    let want = reference(&jobs);
    let out = tempfile::tempdir().unwrap();
    let report = submit(&nats, jobs, &opts(&server, "b-lazy", Some(out.path())))
        .await
        .unwrap();
    assert_all_correct(&report, &want, &["h1", "h2"]);
    assert_outputs_written(out.path(), &want);
    // The copier never counts: no job lists it with a digest, no receipt
    // names it, and it is not blamed for what it cannot be shown to have
    // done (its output is simply not there).
    let mut copier_answers = 0;
    for j in &report.jobs {
        for r in j.results.iter().filter(|r| r.worker == "copier") {
            copier_answers += 1;
            assert!(r.digest.is_none(), "the copier's digest counted: {j:#?}");
        }
    }
    assert!(
        copier_answers > 0,
        "the copier was given no job: nothing was tested"
    );
    let receipts =
        parse_receipts(&std::fs::read_to_string(out.path().join("receipts.jsonl")).unwrap())
            .unwrap();
    assert_eq!(receipts.len(), 8);
    for r in &receipts {
        verify_receipt(r, None).unwrap();
        for w in &r.workers {
            assert!(
                w.worker == "h1" || w.worker == "h2",
                "{} credited in a receipt",
                w.worker
            );
        }
    }
    assert_ne!(
        enrollment(&nats, "h1").await.state,
        EnrollmentState::Quarantined
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_refusals_move_a_replica_and_false_ones_are_faults() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    let honest = ["h1", "h2", "h3"];
    for w in honest {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", "20")]);
    }
    // Two operators that refuse every job they share ("over my limits",
    // stating none), and one that refuses jobs its record says it takes.
    let _x = AdversaryProc::start(&server, "refuser-x", "op-x", "too-large");
    let _y = AdversaryProc::start(&server, "refuser-y", "op-y", "too-large");
    let _l = AdversaryProc::start(&server, "liar", "op-liar", "lying-too-large");
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["h1", "h2", "h3", "refuser-x", "refuser-y", "liar"]).await;
    let jobs = small_jobs(12, 71);
    let want = reference(&jobs);
    let mut o = opts(&server, "b-refuse", None);
    o.audit_rate = 1.0;
    let report = submit(&nats, jobs, &o).await.unwrap();
    // No job fails by the workers' votes; every one is computed by honest
    // workers and correct.
    assert_all_correct(&report, &want, &honest);
    // Refusing is not a fault; refusing what its own record admits is.
    for f in &report.faults {
        assert_eq!(f.worker, "liar", "only the liar is at fault: {f:?}");
    }
    let refused = |w: &str| {
        report
            .jobs
            .iter()
            .any(|j| j.results.iter().any(|r| r.worker == w))
    };
    assert!(
        refused("refuser-x") || refused("refuser-y"),
        "no refuser was given a job: nothing was tested"
    );
    for w in ["refuser-x", "refuser-y"] {
        assert_eq!(enrollment(&nats, w).await.state, EnrollmentState::Active);
    }
    if refused("liar") {
        assert!(report.faults.iter().any(|f| f.worker == "liar"));
        assert_eq!(
            enrollment(&nats, "liar").await.state,
            EnrollmentState::Quarantined
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_worker_s_pending_and_verified_results_are_rechecked() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    // Two colluding operators that return the same wrong bits on every
    // job; no audits. One is caught the first time it meets an honest
    // worker; what the pair verified together before (and signs after)
    // must not survive that.
    let wrong = [
        ("LOCKSTEP_FAULT_INJECT_EVERY", "1"),
        ("LOCKSTEP_TEST_DELAY_MS", "40"),
    ];
    procs.worker_as(&server, "colluder-x", "op-x", "cpu", &wrong);
    procs.worker_as(&server, "colluder-y", "op-y", "cpu", &wrong);
    for w in ["h1", "h2"] {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", "40")]);
    }
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["colluder-x", "colluder-y", "h1", "h2"]).await;
    let jobs = small_jobs(30, 81);
    let want = reference(&jobs);
    let out = tempfile::tempdir().unwrap();
    let mut o = opts(&server, "b-recheck", Some(out.path()));
    o.job_timeout = Duration::from_secs(30);
    let report = submit(&nats, jobs, &o).await.unwrap();
    assert_all_correct(&report, &want, &["h1", "h2"]);
    for j in &report.jobs {
        if j.verdict == Verdict::Verified {
            // Verified jobs were computed by the two honest operators.
            let mut ws: Vec<&str> = j
                .results
                .iter()
                .filter(|r| r.digest.is_some())
                .map(|r| r.worker.as_str())
                .collect();
            ws.sort();
            assert!(
                ws.iter().all(|w| *w == "h1" || *w == "h2"),
                "{}: verified by {ws:?}",
                j.job
            );
        }
    }
    // Receipts name only honest workers.
    let receipts =
        parse_receipts(&std::fs::read_to_string(out.path().join("receipts.jsonl")).unwrap())
            .unwrap();
    assert_eq!(receipts.len(), 30);
    for r in &receipts {
        assert!(r
            .workers
            .iter()
            .all(|w| w.worker == "h1" || w.worker == "h2"));
    }
    // Both colluders were caught (each met an honest worker, or a job they
    // had verified together was re-run on one).
    for w in ["colluder-x", "colluder-y"] {
        assert_eq!(
            enrollment(&nats, w).await.state,
            EnrollmentState::Quarantined,
            "{w}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_fills_only_the_flooder_s_own_share() {
    let Some(server) = nats_server() else { return };
    let nats = server.connect().await.unwrap();
    // Small quotas, so the flood is quick: 8 MiB of results and 16 MiB of
    // outputs per worker (every worker's streams, made at enrollment, take
    // them here).
    let flooder_cfg = server.enroll("flooder", "op-flood").unwrap();
    let mut procs = Procs::default();
    for w in ["h1", "h2"] {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", "20")]);
    }
    wait_workers(&nats, &["h1", "h2"]).await;
    let limits =
        lockstep::store::StoreLimits::parse("quota_results.bytes=8M,quota_outputs.bytes=16M")
            .unwrap();
    lockstep::store::apply_limits(&nats, &limits).await.unwrap();
    // The flood, as the flooder's own client, before any batch: it stops
    // where the server refuses it, at its quotas.
    let flood_nats = lockstep::nats::connect_worker(&flooder_cfg, "flooder")
        .await
        .unwrap();
    let (results, outputs) = lockstep_tests::adversary::flood(&flood_nats, "flooder").await;
    assert!(
        (7 << 20..=8 << 20).contains(&results) && (15 << 20..=16 << 20).contains(&outputs),
        "the flood stored {results} bytes of results and {outputs} of outputs"
    );
    let _flooder = AdversaryProc::start(&server, "flooder", "op-flood", "flood");
    wait_workers(&nats, &["h1", "h2", "flooder"]).await;
    // Batches run on: the honest workers store their results and outputs
    // in their own shares, every output is written, nobody honest is blamed.
    for (batch, seed) in [("b-flood-1", 91), ("b-flood-2", 92)] {
        let jobs = stored_output_jobs(6, seed);
        let want = reference(&jobs);
        let out = tempfile::tempdir().unwrap();
        let report = submit(&nats, jobs, &opts(&server, batch, Some(out.path())))
            .await
            .unwrap();
        assert_all_correct(&report, &want, &["h1", "h2"]);
        assert_outputs_written(out.path(), &want);
    }
    // Once caught (it answers wrongly), what it published is purged: its
    // flood costs nobody anything afterwards.
    assert_eq!(
        enrollment(&nats, "flooder").await.state,
        EnrollmentState::Quarantined,
        "the flooder was given no job in 12: nothing caught it"
    );
    for stream in [
        worker_results_stream("flooder"),
        worker_outputs_stream("flooder"),
    ] {
        let mut s = nats.js.get_stream(&stream).await.unwrap();
        assert_eq!(s.info().await.unwrap().state.messages, 0, "{stream}");
    }
    let mut shared = nats.js.get_stream(RESULTS_STREAM).await.unwrap();
    let held = shared.info().await.unwrap().state.bytes;
    assert!(
        held < 8 << 20,
        "the shared results stream holds {held} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_holds_jobs_and_never_answers_loses_them_in_seconds() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    for w in ["h1", "h2"] {
        procs.worker(&server, w, "cpu", &[]);
    }
    // Heartbeats, pulls its replicas, never answers.
    let _silent = AdversaryProc::start(&server, "silent", "op-silent", "silent");
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["h1", "h2", "silent"]).await;
    let jobs = small_jobs(10, 101);
    let want = reference(&jobs);
    let mut o = opts(&server, "b-silent", None);
    o.job_timeout = Duration::from_secs(120);
    o.stall_timeout = Duration::from_secs(2);
    let report = submit(&nats, jobs, &o).await.unwrap();
    assert_all_correct(&report, &want, &["h1", "h2"]);
    assert!(
        report
            .jobs
            .iter()
            .any(|j| j.reassigned_from.iter().any(|w| w == "silent")),
        "the silent worker was given nothing: nothing was tested"
    );
    // Long before the job timeout: it was its silence, not the clock.
    assert!(
        report.elapsed_s < 60.0,
        "the batch waited {:.0} s for a silent worker",
        report.elapsed_s
    );
    // Silence is not a fault: it is only taken off the jobs.
    assert!(report.faults.is_empty(), "{:?}", report.faults);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_dated_ahead_keeps_no_silent_worker_alive() {
    let Some(server) = nats_server() else { return };
    let nats = server.connect().await.unwrap();
    let cfg = server.enroll("clock-cheat", "op-clock").unwrap();
    let bus = lockstep::nats::connect_worker(&cfg, "clock-cheat")
        .await
        .unwrap();
    // One heartbeat that says "a day from now", then silence.
    let rec = WorkerRecord {
        protocol: PROTOCOL_VERSION,
        id: "clock-cheat".into(),
        backends: vec![],
        contract_version: lockstep_kernels::CONTRACT_VERSION,
        concurrency: 1,
        started_ms: 0,
        heartbeat_ms: now_ms() + 24 * 3600 * 1000,
        state: WorkerState::Up,
        jobs_done: 0,
        jobs_failed: 0,
        limits: None,
        models: None,
    };
    bus.put_heartbeat("clock-cheat", &serde_json::to_vec(&rec).unwrap())
        .await
        .unwrap();
    let timeout = Duration::from_secs(1);
    let live = |n: Vec<lockstep::nats::LiveWorker>| n.iter().any(|w| w.id == "clock-cheat");
    assert!(live(
        lockstep::nats::live_workers(&nats, timeout).await.unwrap()
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !live(lockstep::nats::live_workers(&nats, timeout).await.unwrap()),
        "a heartbeat dated ahead kept a silent worker live"
    );
}
