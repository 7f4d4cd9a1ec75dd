//! The whole system against a real nats-server (started per test on a random
//! loopback port with its own store) and real worker processes: redundancy
//! on distinct workers, crashes, faults, restarts and bad input.

use std::time::Duration;

use futures::StreamExt;
use lockstep::coordinator::{submit, SubmitOptions, Verdict};
use lockstep::protocol::*;
use lockstep_tests::{
    direct_job, holder_of_replicas, lockstep_bin, nats_server, resumable_submit, send_to_worker,
    small_jobs, wait_workers, Procs,
};

fn opts(batch: &str) -> SubmitOptions {
    SubmitOptions {
        redundancy: 2,
        batch_id: Some(batch.into()),
        worker_timeout: Duration::from_secs(2),
        job_timeout: Duration::from_secs(60),
        deadline: Some(Duration::from_secs(240)),
        progress: false,
        threads: 1,
        ..Default::default()
    }
}

/// Every job's results come from distinct workers and at most one each.
fn assert_distinct(report: &lockstep::coordinator::Report) {
    for j in &report.jobs {
        let mut ws: Vec<&str> = j.results.iter().map(|r| r.worker.as_str()).collect();
        let n = ws.len();
        ws.sort();
        ws.dedup();
        assert_eq!(ws.len(), n, "{}: two results from one worker", j.job);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_verifies_on_mixed_cpu_and_wgsl_workers() {
    let Some(server) = nats_server() else { return };
    let wgpu = lockstep_kernels::wgpu::WgpuBackend::new(Default::default()).is_ok();
    let mut procs = Procs::default();
    procs.worker(&server, "cpu-a", "cpu", &[]);
    procs.worker(&server, "cpu-b", "cpu", &[]);
    procs.worker(&server, "third", if wgpu { "wgpu" } else { "cpu" }, &[]);
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["cpu-a", "cpu-b", "third"]).await;
    let report = submit(&nats, small_jobs(24, 1), &opts("mixed"))
        .await
        .unwrap();
    assert_eq!(report.verified, 24, "{report:#?}");
    assert_distinct(&report);
    assert!(report.jobs.iter().all(|j| j.results.len() == 2));
    if wgpu {
        // Cross-hardware agreement is visible: CPU and WGSL digests matched.
        let mixed = report.jobs.iter().filter(|j| {
            let b: Vec<&str> = j.results.iter().map(|r| r.backend.as_str()).collect();
            b.contains(&"cpu") && b.contains(&"wgpu")
        });
        assert!(mixed.count() > 0, "no job ran on both CPU and WGSL");
    }
    // Every worker is in the registry with its self-tested backends.
    let live = lockstep::nats::live_workers(&nats, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(live.iter().all(|w| !w.record.backends.is_empty()
        && w.record.contract_version == lockstep_kernels::CONTRACT_VERSION));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_loses_no_job() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    for w in ["w1", "w2", "w3"] {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", "60")]);
    }
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["w1", "w2", "w3"]).await;
    let n = 30;
    let task = {
        let nats = nats.clone();
        tokio::spawn(async move { submit(&nats, small_jobs(n, 2), &opts("kill")).await })
    };
    // Mid-batch (each replica takes >= 60 ms; ~20 per worker queued):
    // SIGKILL a worker that holds replicas (read from the plan: under load a
    // worker may miss the first dispatch round and hold none).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let victim = holder_of_replicas(&nats, "kill").await;
    procs.kill(&victim);
    let report = task.await.unwrap().unwrap();
    eprintln!("kill test: batch took {:.1} s", report.elapsed_s);
    assert_eq!(report.verified, n, "{report:#?}");
    assert_distinct(&report);
    let moved = report
        .jobs
        .iter()
        .filter(|j| j.reassigned_from.contains(&victim))
        .count();
    assert!(
        moved > 0,
        "{victim} held queued replicas when killed; they must have been reassigned: {:#?}",
        report
            .jobs
            .iter()
            .map(|j| (
                &j.job,
                j.results
                    .iter()
                    .map(|r| r.worker.clone())
                    .collect::<Vec<_>>(),
                &j.reassigned_from,
                j.latency_ms
            ))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_injected_fault_is_caught_and_attributed() {
    let Some(server) = nats_server() else { return };
    let every = 3;
    let mut procs = Procs::default();
    procs.worker(&server, "honest-1", "cpu", &[]);
    procs.worker(&server, "honest-2", "cpu", &[]);
    procs.worker(
        &server,
        "faulty",
        "cpu",
        &[("LOCKSTEP_FAULT_INJECT_EVERY", "3")],
    );
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["honest-1", "honest-2", "faulty"]).await;
    let report = submit(&nats, small_jobs(45, 3), &opts("faults"))
        .await
        .unwrap();
    assert!(report.all_accepted(), "{report:#?}");
    let fault = lockstep::worker::FaultInjection { every };
    let mut injected = 0;
    for j in &report.jobs {
        let faulty_ran = j.results.iter().any(|r| r.worker == "faulty");
        if faulty_ran && fault.selects(&j.job) {
            injected += 1;
            assert_eq!(
                j.verdict,
                Verdict::Resolved,
                "{}: fault not detected",
                j.job
            );
            assert_eq!(
                j.faulty_workers,
                vec!["faulty".to_string()],
                "{}: wrong attribution",
                j.job
            );
            // The accepted digest is the honest one.
            let honest = j.results.iter().find(|r| r.worker != "faulty").unwrap();
            assert_eq!(honest.digest, j.digest);
        } else {
            assert_eq!(
                j.verdict,
                Verdict::Verified,
                "{}: honest job flagged",
                j.job
            );
            assert!(j.faulty_workers.is_empty());
        }
    }
    // Once caught, the faulty worker is quarantined and its word counts
    // for nothing (its pending results are dropped), so usually one fault
    // is caught, sometimes a few that were decided together.
    assert!(
        injected >= 1,
        "no fault was injected; the test proves nothing"
    );
    assert_eq!(report.faults.len(), injected);
    // Recorded in the registry.
    let mut keys = nats.faults.keys().await.unwrap();
    let mut recorded = 0;
    while let Some(k) = keys.next().await {
        let k = k.unwrap();
        assert!(
            k.starts_with("faulty.faults."),
            "an honest worker was recorded: {k}"
        );
        recorded += 1;
    }
    assert_eq!(recorded, injected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restart_mid_batch() {
    let Some(mut server) = nats_server() else {
        return;
    };
    let mut procs = Procs::default();
    for w in ["r1", "r2", "r3"] {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", "40")]);
    }
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["r1", "r2", "r3"]).await;
    let n = 30;
    let mut o = opts("restart-server");
    o.worker_timeout = Duration::from_secs(8);
    let task = {
        let nats = nats.clone();
        tokio::spawn(async move { submit(&nats, small_jobs(n, 4), &o).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.restart().unwrap(); // SIGKILL, then the same port and store
    let report = task.await.unwrap().unwrap();
    assert_eq!(report.verified, n, "{report:#?}");
    assert_distinct(&report);
    for name in ["r1", "r2", "r3"] {
        assert!(procs.is_running(name), "{name} died with the server");
    }
}

/// `lockstep submit` of `batch` under a fixed batch id (so a second run
/// resumes the first), quiet, with a 3 s worker timeout.
#[test]
fn coordinator_restart_resumes_without_duplicates() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    for w in ["c1", "c2", "c3"] {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", "50")]);
    }
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("batch.jsonl");
    lockstep::demo::write_demo_batch(&batch, 30, 5).unwrap();
    let out = dir.path().join("out");
    let submit_cmd = || resumable_submit(&server, "resumable", &out, &batch, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let nats = rt.block_on(server.connect()).unwrap();
    rt.block_on(wait_workers(&nats, &["c1", "c2", "c3"]));
    // First coordinator: killed mid-batch.
    let mut first = submit_cmd()
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        first.try_wait().unwrap().is_none(),
        "the batch finished before the kill; make jobs longer"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // Second coordinator: same batch, resumes.
    let o = submit_cmd().output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["verified"], 30, "{report:#}");
    for j in report["jobs"].as_array().unwrap() {
        // No duplicated work: exactly r results, from distinct workers.
        assert_eq!(j["results"].as_array().unwrap().len(), 2, "{j:#}");
        assert!(out
            .join("outputs")
            .join(format!("{}.safetensors", j["job"].as_str().unwrap()))
            .exists());
    }
}

#[test]
fn a_resume_after_a_server_restart_computes_nothing_again() {
    // A coordinator killed mid-batch, the server killed and restarted from
    // its store, the batch resumed: replicas already answered must not be
    // sent again (the acked bundles are gone from the work queue, and the
    // restarted server has forgotten their ids).
    let Some(mut server) = nats_server() else {
        return;
    };
    let mut procs = Procs::default();
    for w in ["r1", "r2", "r3"] {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", "30")]);
    }
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("batch.jsonl");
    lockstep::demo::write_demo_batch(&batch, 120, 7).unwrap();
    let out = dir.path().join("out");
    let submit_cmd = |server: &lockstep::harness::NatsServer| {
        resumable_submit(server, "restarted", &out, &batch, &["--keep-batch"])
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let nats = rt.block_on(server.connect()).unwrap();
    rt.block_on(wait_workers(&nats, &["r1", "r2", "r3"]));
    let mut first = submit_cmd(&server)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        first.try_wait().unwrap().is_none(),
        "the batch finished before the kill; make jobs longer"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    drop(nats);
    server.restart().unwrap();
    let o = submit_cmd(&server).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["verified"], 120, "{report:#}");
    // Every result the workers published for the batch: one per job and
    // worker, nothing computed twice.
    let nats = rt.block_on(server.connect()).unwrap();
    let counts = rt.block_on(async {
        let mut seen = std::collections::BTreeMap::<(String, String), usize>::new();
        let mut results = lockstep_tests::watch_results(&nats, "lockstep.result.restarted.*").await;
        while let Ok(Some(Ok(m))) =
            tokio::time::timeout(Duration::from_secs(2), results.next()).await
        {
            for r in parse_results(&m.payload).unwrap() {
                *seen.entry((r.job, r.worker)).or_default() += 1;
            }
        }
        seen
    });
    let again: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        again.is_empty(),
        "computed again after the resume: {again:?}"
    );
    assert!(counts.len() >= 240, "only {} results", counts.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_get_error_results() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    procs.worker(
        &server,
        "tough",
        "cpu",
        &[("LOCKSTEP_MAX_ELEMENTS", "100000")],
    );
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["tough"]).await;
    let mut results = lockstep_tests::watch_results(&nats, "lockstep.result.>").await;
    let job = |id: &str, a: TensorRef, b: TensorRef| {
        serde_json::to_vec(&direct_job("tough", "bad", id, JobSpec::matmul(a, b))).unwrap()
    };
    let ok_a = TensorRef::inline(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]);
    // A blob stored under a name that is not its digest.
    let claimed = lockstep_kernels::tensor_digest_f32(&[2, 2], &[9.0; 4]);
    nats.blobs
        .put(
            claimed.to_hex().as_str(),
            &mut f32_bytes(&[1.0; 4]).as_slice(),
        )
        .await
        .unwrap();
    let mut wrong_contract: serde_json::Value =
        serde_json::from_slice(&job("v9", ok_a.clone(), ok_a.clone())).unwrap();
    wrong_contract["contract_version"] = 999.into();
    let mut unknown_op: serde_json::Value =
        serde_json::from_slice(&job("k", ok_a.clone(), ok_a.clone())).unwrap();
    unknown_op["op"] = "conv3d".into();
    let mut bad_params: serde_json::Value =
        serde_json::from_slice(&job("p", ok_a.clone(), ok_a.clone())).unwrap();
    bad_params["params"] = serde_json::json!({"transpose": true});
    let mut three_inputs: serde_json::Value =
        serde_json::from_slice(&job("three", ok_a.clone(), ok_a.clone())).unwrap();
    three_inputs["inputs"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::to_value(&ok_a).unwrap());
    let cases: Vec<(Vec<u8>, ErrorCode)> = vec![
        (b"\xff not json {".to_vec(), ErrorCode::BadMessage),
        (
            br#"{"batch":"bad","job":"half"}"#.to_vec(),
            ErrorCode::BadMessage,
        ),
        (
            serde_json::to_vec(&unknown_op).unwrap(),
            ErrorCode::UnknownOp,
        ),
        (
            serde_json::to_vec(&bad_params).unwrap(),
            ErrorCode::BadMessage,
        ),
        (
            serde_json::to_vec(&three_inputs).unwrap(),
            ErrorCode::BadShape,
        ),
        (
            serde_json::to_vec(&wrong_contract).unwrap(),
            ErrorCode::WrongContract,
        ),
        (
            job(
                "huge",
                TensorRef::inline(vec![100_000, 100_000], &[1.0]),
                ok_a.clone(),
            ),
            ErrorCode::TooLarge,
        ),
        (
            job("rank", TensorRef::inline(vec![4], &[1.0; 4]), ok_a.clone()),
            ErrorCode::BadShape,
        ),
        (
            job(
                "short",
                TensorRef::inline(vec![2, 2], &[1.0; 3]),
                ok_a.clone(),
            ),
            ErrorCode::BadShape,
        ),
        (
            job(
                "k-mismatch",
                TensorRef::inline(vec![2, 3], &[1.0; 6]),
                ok_a.clone(),
            ),
            ErrorCode::BadShape,
        ),
        (
            job(
                "missing",
                TensorRef::object(
                    vec![2, 2],
                    lockstep_kernels::tensor_digest_f32(&[2, 2], &[7.0; 4]),
                ),
                ok_a.clone(),
            ),
            ErrorCode::MissingBlob,
        ),
        (
            job(
                "tampered",
                TensorRef::object(vec![2, 2], claimed),
                ok_a.clone(),
            ),
            ErrorCode::TamperedBlob,
        ),
        (
            job("fine", ok_a.clone(), ok_a.clone()),
            ErrorCode::BadMessage,
        ), // placeholder: expects success
    ];
    // Also a payload near NATS's 1 MiB limit: valid JSON, over the worker's limit.
    let big = TensorRef::inline(vec![300, 500], &vec![0.5; 150_000]);
    let mut cases = cases;
    cases.insert(
        cases.len() - 1,
        (job("big", big, ok_a.clone()), ErrorCode::TooLarge),
    );
    let n = cases.len();
    for (payload, _) in &cases {
        send_to_worker(&nats, "tough", "bad", payload.clone()).await;
    }
    // Results arrive in order (one worker, concurrency 1).
    for (i, (_, want)) in cases.iter().enumerate() {
        let m = tokio::time::timeout(Duration::from_secs(60), results.next())
            .await
            .expect("a result")
            .unwrap()
            .unwrap();
        let r: ResultMessage = serde_json::from_slice(&m.payload).unwrap();
        if i == n - 1 {
            assert!(
                matches!(r.outcome, Outcome::Ok { .. }),
                "the good job after the bad ones: {:?}",
                r.outcome
            );
            assert_eq!(r.job, "fine");
        } else {
            match &r.outcome {
                Outcome::Error { code, message } => {
                    assert_eq!(code, want, "case {i}: {message}");
                    assert!(!message.is_empty());
                }
                o => panic!("case {i} should fail with {want:?}, got {o:?}"),
            }
        }
        if i == 0 {
            assert_eq!(
                m.subject.as_str(),
                result_subject(UNROUTABLE_BATCH, "tough")
            );
        }
    }
    assert!(procs.is_running("tough"), "the worker crashed");
}

#[test]
fn submit_rejects_a_bad_batch_file_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("bad.jsonl");
    std::fs::write(&batch, "{\"id\":\"ok\",\"kind\":\"matmul\",\"a\":{\"shape\":[1,1],\"data\":[1]},\"b\":{\"shape\":[1,1],\"data\":[1]}}\n{\"id\":\"x\",\"kind\":\"matmul\",\"a\":{\"shape\":[2,2],\"data\":[1]}}\n").unwrap();
    let o = std::process::Command::new(lockstep_bin())
        .args(["submit", "--nats", "nats://127.0.0.1:1", "--quiet"])
        .arg(&batch)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("line 2") && !err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_s_replicas_move_within_two_operators() {
    // Four workers of two operators, alternating; one drains mid-batch. Its
    // queued replicas must go to the live worker of its own operator (the
    // other replica of each job is on the other operator).
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    let slow = [("LOCKSTEP_TEST_DELAY_MS", "20")];
    for (w, op) in [
        ("w1", "op-a"),
        ("w2", "op-b"),
        ("w3", "op-a"),
        ("w4", "op-b"),
    ] {
        procs.worker_as(&server, w, op, "cpu", &slow);
    }
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["w1", "w2", "w3", "w4"]).await;
    // ~200 replicas each, in bundles of at most 64: w2 drains with
    // bundles still queued for it.
    let jobs = small_jobs(400, 17);
    let want = lockstep_tests::adversary::reference(&jobs);
    let mut o = opts("drain-two-ops");
    o.deadline = Some(Duration::from_secs(90));
    let task = {
        let nats = nats.clone();
        tokio::spawn(async move { submit(&nats, jobs, &o).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    procs.terminate("w2");
    let status = tokio::task::block_in_place(|| procs.wait_exit("w2", Duration::from_secs(30)));
    assert!(status.expect("w2 exits after draining").success());
    let report = task.await.unwrap().unwrap();
    assert!(report.all_accepted(), "{report:#?}");
    assert_distinct(&report);
    for j in &report.jobs {
        assert_eq!(j.digest, Some(want[&j.job]), "{}", j.job);
    }
    assert!(
        report
            .jobs
            .iter()
            .any(|j| j.reassigned_from.iter().any(|w| w == "w2")),
        "w2 held nothing when it drained: nothing was tested"
    );
    assert!(report.faults.is_empty(), "{:?}", report.faults);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_blob_cache_is_healed_and_blames_nobody() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    let caches = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for (w, cache) in ["cache-1", "cache-2"].iter().zip(&caches) {
        procs.worker(
            &server,
            w,
            "cpu",
            &[("LOCKSTEP_CACHE_DIR", cache.path().to_str().unwrap())],
        );
    }
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["cache-1", "cache-2"]).await;
    // Inputs `a` of 140×130 (73 KB) travel as objects, so workers cache them.
    let jobs = lockstep_tests::matmul_jobs(6, 23, (140, 130, 16));
    let report = submit(&nats, jobs.clone(), &opts("cache-1st"))
        .await
        .unwrap();
    assert_eq!(report.verified, 6, "{report:#?}");
    // Every kind of disk damage, in both workers' caches: a flipped byte,
    // truncated, swapped under each other's names, deleted, garbage.
    for cache in &caches {
        let mut files: Vec<_> = std::fs::read_dir(cache.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(files.len() >= 5, "only {} blobs cached", files.len());
        let mut b = std::fs::read(&files[0]).unwrap();
        b[100] ^= 0x40;
        std::fs::write(&files[0], b).unwrap();
        let b = std::fs::read(&files[1]).unwrap();
        std::fs::write(&files[1], &b[..b.len() / 2]).unwrap();
        let (x, y) = (
            std::fs::read(&files[2]).unwrap(),
            std::fs::read(&files[3]).unwrap(),
        );
        std::fs::write(&files[2], y).unwrap();
        std::fs::write(&files[3], x).unwrap();
        std::fs::remove_file(&files[4]).unwrap();
        if let Some(f) = files.get(5) {
            std::fs::write(f, b"not a tensor").unwrap();
        }
    }
    let report = submit(&nats, jobs, &opts("cache-2nd")).await.unwrap();
    assert_eq!(report.verified, 6, "{report:#?}");
    assert!(report.faults.is_empty(), "{:?}", report.faults);
    for w in ["cache-1", "cache-2"] {
        let e = lockstep::nats::enrollments(&nats).await.unwrap()[w].clone();
        assert_eq!(e.state, EnrollmentState::Active, "{w}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_and_exits_cleanly() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    procs.worker(
        &server,
        "drainer",
        "cpu",
        &[("LOCKSTEP_TEST_DELAY_MS", "1500")],
    );
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["drainer"]).await;
    let mut o = opts("drain");
    o.redundancy = 1;
    let task = {
        let nats = nats.clone();
        tokio::spawn(async move { submit(&nats, small_jobs(1, 6), &o).await })
    };
    // The job is in flight (1.5 s); ask the worker to stop.
    tokio::time::sleep(Duration::from_millis(600)).await;
    procs.terminate("drainer");
    let status =
        tokio::task::block_in_place(|| procs.wait_exit("drainer", Duration::from_secs(30)));
    assert!(status.expect("the worker exits after draining").success());
    // The in-flight job's result was published before the exit.
    let report = task.await.unwrap().unwrap();
    assert_eq!(report.verified, 1, "{report:#?}");
    let rec: WorkerRecord =
        serde_json::from_slice(&nats.workers.get("drainer").await.unwrap().unwrap()).unwrap();
    assert_eq!(rec.state, WorkerState::Stopped);
    assert_eq!(rec.jobs_done, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_job_in_a_bundle_fails_alone() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    procs.worker(&server, "bundled", "cpu", &[]);
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["bundled"]).await;
    let mut results = lockstep_tests::watch_results(&nats, &results_filter("bun")).await;
    let a = TensorRef::inline(vec![1, 2], &[1.0, 2.0]);
    let b = TensorRef::inline(vec![2, 1], &[3.0, 4.0]);
    let job = |id: &str| direct_job("bundled", "bun", id, JobSpec::matmul(a.clone(), b.clone()));
    let mut bad = serde_json::to_value(job("bad")).unwrap();
    bad["op"] = "conv3d".into();
    let bundle = serde_json::json!({
        "protocol": PROTOCOL_VERSION, "batch": "bun", "id": "b1", "worker": "bundled",
        "jobs": [serde_json::to_value(job("good")).unwrap(), bad, serde_json::to_value(job("good2")).unwrap()],
    });
    send_to_worker(
        &nats,
        "bundled",
        "bun",
        serde_json::to_vec(&bundle).unwrap(),
    )
    .await;
    let m = tokio::time::timeout(Duration::from_secs(60), results.next())
        .await
        .expect("a result bundle")
        .unwrap()
        .unwrap();
    let r: ResultBundle = serde_json::from_slice(&m.payload).unwrap();
    let by_job: std::collections::HashMap<&str, &Outcome> = r
        .results
        .iter()
        .map(|r| (r.job.as_str(), &r.outcome))
        .collect();
    assert!(matches!(by_job["good"], Outcome::Ok { .. }), "{r:?}");
    assert!(matches!(by_job["good2"], Outcome::Ok { .. }), "{r:?}");
    assert!(
        matches!(
            by_job["bad"],
            Outcome::Error {
                code: ErrorCode::UnknownOp,
                ..
            }
        ),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_takes_its_unfinished_jobs_back_at_once() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    let slow = [("LOCKSTEP_TEST_DELAY_MS", "250")];
    procs.worker(&server, "phoenix", "cpu", &slow);
    procs.worker(&server, "steady", "cpu", &slow);
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["phoenix", "steady"]).await;
    // No third worker, and a long worker timeout: the replicas of the killed
    // worker can only be finished by that worker itself after its restart.
    let o = SubmitOptions {
        worker_timeout: Duration::from_secs(25),
        ..opts("phoenix")
    };
    let n = 12;
    let task = {
        let nats = nats.clone();
        tokio::spawn(async move { submit(&nats, small_jobs(n, 9), &o).await })
    };
    // Mid-bundle (12 replicas of 250 ms each): SIGKILL, then start again
    // under the same name.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    procs.kill("phoenix");
    procs.worker(&server, "phoenix", "cpu", &slow);
    let report = task.await.unwrap().unwrap();
    eprintln!("restart test: batch took {:.1} s", report.elapsed_s);
    assert_eq!(report.verified, n, "{report:#?}");
    assert_distinct(&report);
    assert!(
        report.jobs.iter().all(|j| j.reassigned_from.is_empty()),
        "nothing should have been reassigned: {report:#?}"
    );
    // Without the take-over the bundle would wait out the 30 s ack wait.
    assert!(
        report.elapsed_s < 20.0,
        "the restarted worker took {:.1} s to finish the batch",
        report.elapsed_s
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_under_a_live_name_is_refused() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    procs.worker(&server, "twin", "cpu", &[]);
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["twin"]).await;
    let tmp = std::env::temp_dir();
    let out = tokio::process::Command::new(lockstep_bin())
        .args([
            "worker",
            "--deployment",
            server.dir().to_str().unwrap(),
            "--name",
            "twin",
            "--backend",
            "cpu",
        ])
        .args(["--threads", "1", "--heartbeat-ms", "250"])
        .env("XDG_CACHE_HOME", tmp.join("lockstep-test-cache"))
        .env("XDG_RUNTIME_DIR", &tmp)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the second worker exits by itself")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("already running") && err.contains("twin"),
        "{err}"
    );
    // The first one was not disturbed.
    assert!(procs.is_running("twin"));
    let report = submit(&nats, small_jobs(2, 3), &{
        let mut o = opts("twin");
        o.redundancy = 1;
        o
    })
    .await
    .unwrap();
    assert_eq!(report.verified, 2, "{report:#?}");
}

#[test]
fn an_impossible_payload_limit_is_refused_with_one_line() {
    // `deploy init` refuses it.
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(lockstep_bin())
        .args(["deploy", "init"])
        .arg(dir.path().join("d"))
        .args(["--max-payload", "6144"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("--max-payload 6144 is too small") && err.lines().count() == 1,
        "{err}"
    );
    // A server configured by hand below the floor: the coordinator stops at
    // connect, at once, with one line naming the setting (it once computed
    // a job ~400 times, or forever without a deadline).
    let Some(mut server) = nats_server() else {
        return;
    };
    let worker = server.enroll("p1", "op-p1").unwrap();
    let config = &lockstep::deploy::Deployment::open(&server.dir())
        .unwrap()
        .server_configs()[0];
    let text = std::fs::read_to_string(config).unwrap() + "max_payload: 6144\n";
    std::fs::write(config, text).unwrap();
    server.restart().unwrap();
    let batch = dir.path().join("b.jsonl");
    std::fs::write(&batch, "{\"id\":\"ok\",\"kind\":\"matmul\",\"a\":{\"shape\":[2,3],\"data\":[1,2,3,4,5,6]},\"b\":{\"shape\":[3,2],\"data\":[1,2,3,4,5,6]}}\n").unwrap();
    let t = std::time::Instant::now();
    let o = std::process::Command::new(lockstep_bin())
        .args(["submit", "--quiet", "--deployment"])
        .arg(server.dir())
        .arg(&batch)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("max_payload is 6144 bytes") && !err.contains("panicked"),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.contains("max_payload")).count(),
        1,
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    // So does a worker.
    let t = std::time::Instant::now();
    let o = std::process::Command::new(lockstep_bin())
        .args([
            "worker",
            "--name",
            "p1",
            "--backend",
            "cpu",
            "--nats",
            &worker.url,
        ])
        .arg("--nkey")
        .arg(worker.nkey.as_ref().unwrap())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("max_payload is 6144 bytes") && !err.contains("panicked"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}
