//! The trust model against a malicious worker that speaks the protocol
//! (docs/PROTOCOL.md, "Threat model"): a real nats-server with
//! authorization on, real worker processes, and `lockstep-adversary`
//! processes or one-shot attacks made with an enrolled worker's own key.
//!
//! For every attack: no wrong output is accepted, no honest worker is
//! blamed, the batch completes where an honest majority exists, and the
//! server refuses what the permissions forbid.

use std::time::Duration;

use lockstep::coordinator::receipt::{parse_receipts, verify_receipt, Receipt};
use lockstep::coordinator::{submit, Verdict};
use lockstep::protocol::*;
use lockstep_tests::adversary::{
    assert_all_correct, enrollment, opts, publish, publish_on, reference, signed_result, Adversary,
    AdversaryProc,
};
use lockstep_tests::{lockstep_bin, nats_server, small_jobs, wait_workers, Procs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_what_a_worker_may_not_do() {
    let Some(server) = nats_server() else { return };
    let nats = server.connect().await.unwrap();
    let alice = server.enroll("alice", "op-a").unwrap();
    let mallory_cfg = server.enroll("mallory", "op-m").unwrap();
    let m = Adversary::connect(&mallory_cfg, "mallory").await.unwrap();
    let alice_key = lockstep::auth::Identity::load(alice.nkey.as_ref().unwrap()).unwrap();

    // What its role allows works (so the refusals below mean something).
    assert!(m.can_publish("lockstep.result.b1.mallory", b"{}").await);
    assert!(
        m.can_publish("JSL.API.$KV.lockstep_workers.mallory", b"{}")
            .await
    );
    assert!(m.can_publish("lockstep.out.mallory.b1.00.0", b"x").await);
    assert!(
        m.api_ok(
            "CONSUMER.INFO.LOCKSTEP_JOBS.w-mallory",
            serde_json::json!({})
        )
        .await
    );
    // Impersonation: results, outputs and heartbeats under another name.
    assert!(!m.can_publish("lockstep.result.b1.alice", b"{}").await);
    assert!(!m.can_publish("lockstep.out.alice.b1.00.0", b"x").await);
    assert!(!m.can_publish("$KV.lockstep_workers.alice", b"{}").await);
    assert!(
        !m.can_publish("JSL.API.$KV.lockstep_workers.alice", b"{}")
            .await
    );
    // Shared state: enrollments (its own too), faults, plans, references,
    // objects, jobs.
    for subject in [
        "$KV.lockstep_enrolled.mallory",
        "JSL.API.$KV.lockstep_enrolled.mallory",
        "$KV.lockstep_enrolled.alice",
        "$KV.lockstep_faults.alice.b1.j1",
        "$KV.lockstep_assign.b1.x",
        "$KV.lockstep_blob_refs.x.b1",
        "$O.lockstep_blobs.C.abc",
        "$O.lockstep_blobs.M.abc",
        // The model store: only coordinators put models there.
        "$O.lockstep_models.C.abc",
        "$O.lockstep_models.M.abc",
        "JSL.API.$O.lockstep_models.M.abc",
        "lockstep.job.alice.b1",
        "lockstep.job.mallory.b1",
    ] {
        assert!(!m.can_publish(subject, b"{}").await, "{subject} allowed");
    }
    // Reading what others see: jobs, results, another party's inbox.
    for subject in [
        "lockstep.job.>".to_string(),
        "lockstep.result.>".to_string(),
        format!("_INBOX_{}.>", alice_key.public_key()),
    ] {
        assert!(
            !m.can_read(&subject, &nats.client).await,
            "{subject} readable"
        );
    }
    // The JetStream API: consumers on results or on another worker's jobs,
    // direct reads of results, deleting or purging streams.
    for api in [
        "CONSUMER.CREATE.LOCKSTEP_RESULTS.spy",
        "CONSUMER.CREATE.LOCKSTEP_JOBS.w-alice.lockstep.job.alice.>",
        "CONSUMER.CREATE.LOCKSTEP_JOBS.spy.lockstep.job.>",
        "CONSUMER.DURABLE.CREATE.LOCKSTEP_JOBS.w-mallory",
        "CONSUMER.DELETE.LOCKSTEP_JOBS.w-alice",
        // Its own queue is made at enrollment: as a push consumer it could
        // deliver its jobs into anyone's results.
        "CONSUMER.CREATE.LOCKSTEP_JOBS.w-mallory.lockstep.job.mallory.>",
        "CONSUMER.DELETE.LOCKSTEP_JOBS.w-mallory",
        "DIRECT.GET.LOCKSTEP_RESULTS",
        "STREAM.MSG.GET.LOCKSTEP_RESULTS",
        "STREAM.PURGE.LOCKSTEP_RESULTS",
        "STREAM.PURGE.OBJ_lockstep_models",
        "STREAM.DELETE.OBJ_lockstep_models",
        "STREAM.DELETE.LOCKSTEP_JOBS",
        "STREAM.UPDATE.LOCKSTEP_JOBS",
        "STREAM.CREATE.EVIL",
    ] {
        assert!(
            !m.api_ok(api, serde_json::json!({"stream_name": "x"})).await,
            "{api} allowed"
        );
    }
    // No stream's metadata: subject names would tell other workers'
    // batches, bundles, output digests and faults.
    for stream in lockstep::nats::STREAM_NAMES
        .iter()
        .map(|s| s.to_string())
        .chain([
            worker_results_stream("alice"),
            worker_outputs_stream("alice"),
            worker_outputs_stream("mallory"),
            "LOCKSTEP_OUTPUTS".into(),
        ])
    {
        for body in [
            serde_json::json!({}),
            serde_json::json!({"subjects_filter": ">"}),
        ] {
            assert!(
                !m.api_ok(&format!("STREAM.INFO.{stream}"), body).await,
                "STREAM.INFO.{stream} allowed"
            );
        }
    }
    // Nobody without an enrolled key gets in.
    let stranger = lockstep::auth::Identity::generate();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stranger.nk");
    stranger.save(&path).unwrap();
    for cfg in [
        lockstep::auth::ConnectConfig::anonymous(&server.url()),
        lockstep::auth::ConnectConfig::with_nkey(&server.url(), &path),
    ] {
        let r = cfg
            .options_once()
            .await
            .unwrap()
            .connect(server.url())
            .await;
        assert!(r.is_err(), "a client without an enrolled key connected");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unassigned_forged_and_preseeded_results_are_not_counted() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    let slow = [("LOCKSTEP_TEST_DELAY_MS", "150")];
    procs.worker(&server, "alice", "cpu", &slow);
    procs.worker(&server, "bob", "cpu", &slow);
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["alice", "bob"]).await;
    // Mallory is enrolled but never heartbeats: it is assigned nothing.
    let mcfg = server.enroll("mallory", "op-m").unwrap();
    let m = lockstep::nats::connect_worker(&mcfg, "mallory")
        .await
        .unwrap();
    let mkey = mcfg.identity().unwrap().unwrap();

    let jobs = small_jobs(6, 41);
    let want = reference(&jobs);
    let batch = "b-forged";
    // Forged results for every replica and attempt, published before the
    // batch exists (it learned the id somehow) and while it runs: under its
    // own name, under alice's name on its own subject, and signed by a key
    // that is not alice's.
    let forge =
        |job: &str, replica: u32, attempt: u32, worker: &str, key: &lockstep::auth::Identity| {
            let spec = JobSpec::matmul(
                TensorRef::inline(vec![1, 1], &[1.0]),
                TensorRef::inline(vec![1, 1], &[1.0]),
            );
            let msg = lockstep_tests::direct_job(worker, batch, job, spec);
            let msg = JobMessage {
                replica,
                attempt,
                ..msg
            };
            let d = TensorRef::digest_of(&[1, 1], &[9.0]);
            signed_result(
                key,
                worker,
                &msg,
                Outcome::Ok {
                    digest: d,
                    outputs: vec![TensorRef::inline(vec![1, 1], &[9.0])],
                },
            )
        };
    let seed = |m: lockstep::worker::bus::WorkerNats| {
        let jobs: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        let mkey = mkey.seed();
        async move {
            let mkey = lockstep::auth::Identity::parse(&mkey).unwrap();
            for j in &jobs {
                for replica in 0..2 {
                    for attempt in 0..2 {
                        let own = forge(j, replica, attempt, "mallory", &mkey);
                        publish(&m, &own).await.unwrap();
                        let posing = forge(j, replica, attempt, "alice", &mkey);
                        publish_on(&m, &result_subject(batch, "mallory"), &posing)
                            .await
                            .unwrap();
                    }
                }
            }
        }
    };
    seed(m.clone()).await;
    let run = {
        let (nats, o) = (nats.clone(), opts(&server, batch, None));
        let jobs = jobs.clone();
        tokio::spawn(async move { submit(&nats, jobs, &o).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    seed(m.clone()).await;
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.verified, 6, "{report:#?}");
    assert_all_correct(&report, &want, &["alice", "bob"]);
    for j in &report.jobs {
        assert!(
            j.results.iter().all(|r| r.worker != "mallory"),
            "a result of mallory counted: {j:#?}"
        );
    }
    // Unassigned results are ignored, not faults: nobody was blamed.
    assert!(report.faults.is_empty(), "{:?}", report.faults);
    assert_eq!(
        enrollment(&nats, "alice").await.state,
        EnrollmentState::Active
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_workers_are_caught_quarantined_and_the_batch_completes() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    let honest = ["h1", "h2", "h3"];
    for w in honest {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", "30")]);
    }
    let liars = [
        ("liar-shape", "wrong-shape"),
        ("liar-error", "false-error"),
        ("liar-sig", "bad-signature"),
        ("liar-wrong", "wrong"),
    ];
    let _adversaries: Vec<AdversaryProc> = liars
        .iter()
        .map(|(n, mode)| AdversaryProc::start(&server, n, &format!("op-{n}"), mode))
        .collect();
    let nats = server.connect().await.unwrap();
    let mut all: Vec<&str> = honest.to_vec();
    all.extend(liars.iter().map(|(n, _)| *n));
    wait_workers(&nats, &all).await;

    let jobs = small_jobs(16, 42);
    let want = reference(&jobs);
    let out = tempfile::tempdir().unwrap();
    let report = submit(&nats, jobs, &opts(&server, "b-liars", Some(out.path())))
        .await
        .unwrap();
    assert_all_correct(&report, &want, &honest);
    // Every liar that answered anything was caught, and is quarantined.
    for (liar, _) in liars {
        let answered = report
            .jobs
            .iter()
            .any(|j| j.results.iter().any(|r| r.worker == liar));
        if answered {
            assert!(
                report.faults.iter().any(|f| f.worker == liar),
                "{liar} answered and was not caught: {:?}",
                report.faults
            );
            let e = enrollment(&nats, liar).await;
            assert_eq!(e.state, EnrollmentState::Quarantined, "{liar}");
            assert!(e.reason.is_some());
        }
    }
    assert!(
        liars
            .iter()
            .filter(|(l, _)| report.faults.iter().any(|f| f.worker == *l))
            .count()
            >= 2,
        "too few liars were given a job to test anything: {:?}",
        report.faults
    );
    // A quarantined worker gets nothing more: a second batch runs on the
    // honest ones only.
    let jobs = small_jobs(6, 43);
    let want = reference(&jobs);
    let report2 = submit(&nats, jobs, &opts(&server, "b-after", None))
        .await
        .unwrap();
    assert_all_correct(&report2, &want, &honest);
    let caught: Vec<&str> = report.faults.iter().map(|f| f.worker.as_str()).collect();
    for j in &report2.jobs {
        for r in &j.results {
            assert!(
                !caught.contains(&r.worker.as_str()),
                "{} got a job",
                r.worker
            );
        }
    }
    // Receipts name only honest workers, and verify.
    let receipts =
        parse_receipts(&std::fs::read_to_string(out.path().join("receipts.jsonl")).unwrap())
            .unwrap();
    assert_eq!(receipts.len(), 16);
    for r in &receipts {
        verify_receipt(r, None).unwrap();
        assert!(r
            .workers
            .iter()
            .all(|w| honest.contains(&w.worker.as_str())));
    }
    // `lockstep workers` shows the quarantine; `clear` lifts it.
    let caught_one = caught[0];
    let listed = std::process::Command::new(lockstep_bin())
        .args(["workers", "--json", "--deployment"])
        .arg(server.dir())
        .output()
        .unwrap();
    assert!(listed.status.success());
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == caught_one)
        .unwrap();
    assert_eq!(row["state"], "quarantined");
    assert!(row["faults"].as_u64().unwrap() >= 1);
    let cleared = std::process::Command::new(lockstep_bin())
        .args(["workers", "clear", caught_one, "--deployment"])
        .arg(server.dir())
        .output()
        .unwrap();
    assert!(cleared.status.success(), "{cleared:?}");
    assert_eq!(
        enrollment(&nats, caught_one).await.state,
        EnrollmentState::Active
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sybils_of_one_operator_never_verify_each_other() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    // Two workers of one operator that return the same wrong bits (the
    // fault switch flips the same bit for every job): paired, they would
    // agree.
    let wrong = [
        ("LOCKSTEP_FAULT_INJECT_EVERY", "1"),
        ("LOCKSTEP_TEST_DELAY_MS", "20"),
    ];
    procs.worker_as(&server, "sybil-1", "evil", "cpu", &wrong);
    procs.worker_as(&server, "sybil-2", "evil", "cpu", &wrong);
    procs.worker(
        &server,
        "fair-1",
        "cpu",
        &[("LOCKSTEP_TEST_DELAY_MS", "20")],
    );
    procs.worker(
        &server,
        "fair-2",
        "cpu",
        &[("LOCKSTEP_TEST_DELAY_MS", "20")],
    );
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["sybil-1", "sybil-2", "fair-1", "fair-2"]).await;
    let jobs = small_jobs(12, 44);
    let want = reference(&jobs);
    let report = submit(&nats, jobs, &opts(&server, "b-sybil", None))
        .await
        .unwrap();
    assert_all_correct(&report, &want, &["fair-1", "fair-2"]);
    for j in &report.jobs {
        let sybils = j
            .results
            .iter()
            .filter(|r| r.worker.starts_with("sybil"))
            .count();
        assert!(sybils <= 1, "two workers of one operator on {}", j.job);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_verify_offline_and_any_change_is_caught() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    procs.worker(&server, "r1", "cpu", &[]);
    procs.worker(&server, "r2", "cpu", &[]);
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["r1", "r2"]).await;
    let out = tempfile::tempdir().unwrap();
    let report = submit(
        &nats,
        small_jobs(3, 45),
        &opts(&server, "b-rcpt", Some(out.path())),
    )
    .await
    .unwrap();
    assert_eq!(report.verified, 3);
    assert_eq!(report.receipts, 3);
    let path = out.path().join("receipts.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let receipts = parse_receipts(&text).unwrap();
    let dep = lockstep::deploy::Deployment::open(&server.dir()).unwrap();
    for r in &receipts {
        verify_receipt(r, Some(&dep)).unwrap();
        assert_eq!(r.workers.len(), 2);
    }
    let verify_cli = |file: &std::path::Path| {
        std::process::Command::new(lockstep_bin())
            .arg("verify")
            .arg(file)
            .arg("--deployment")
            .arg(server.dir())
            .output()
            .unwrap()
    };
    assert!(verify_cli(&path).status.success());
    // Without a trust anchor: self-consistency only, said, and not a pass
    // unless asked for; a pinned coordinator key is an anchor.
    let bare = |extra: &[&str]| {
        std::process::Command::new(lockstep_bin())
            .arg("verify")
            .arg(&path)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = bare(&[]);
    assert!(!o.status.success(), "verify passed with no trust anchor");
    assert!(String::from_utf8_lossy(&o.stderr).contains("self-consistency only"));
    assert!(bare(&["--self-consistent-only"]).status.success());
    let coordinator = receipts[0].coordinator.public_key.clone();
    assert!(bare(&["--coordinator-key", &coordinator]).status.success());
    let stranger = lockstep::auth::Identity::generate().public_key();
    let o = bare(&["--coordinator-key", &stranger]);
    assert!(
        !o.status.success(),
        "a receipt of another coordinator passed"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL"));
    // Every kind of change is caught, by the library and by the CLI.
    let other = lockstep::auth::Identity::generate();
    type Tamper = Box<dyn Fn(&mut Receipt)>;
    let tampers: Vec<(&str, Tamper)> = vec![
        ("output digest", Box::new(|r| r.output_digest.0[0] ^= 1)),
        ("job digest", Box::new(|r| r.job_digest.0[5] ^= 1)),
        ("an input", Box::new(|r| r.inputs[0].digest.0[1] ^= 1)),
        (
            "a worker signature",
            Box::new(|r| r.workers[0].signature = r.workers[1].signature.clone()),
        ),
        (
            "a worker's operator",
            Box::new(|r| r.workers[1].operator = r.workers[0].operator.clone()),
        ),
        (
            "a worker dropped",
            Box::new(|r| {
                r.workers.pop();
            }),
        ),
        ("the verdict's redundancy", Box::new(|r| r.redundancy = 3)),
        ("the batch", Box::new(|r| r.batch.push('x'))),
        (
            "the coordinator's key",
            Box::new(move |r| r.coordinator.public_key = other.public_key()),
        ),
    ];
    for (what, tamper) in tampers {
        let mut r = receipts[0].clone();
        tamper(&mut r);
        assert!(
            verify_receipt(&r, Some(&dep)).is_err(),
            "{what}: not caught"
        );
        let bad = out.path().join("bad.jsonl");
        std::fs::write(&bad, serde_json::to_string(&r).unwrap()).unwrap();
        let o = verify_cli(&bad);
        assert!(!o.status.success(), "{what}: lockstep verify passed");
        assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL"));
    }
    // A receipt re-signed by a coordinator outside the deployment verifies
    // on its own, but not against the deployment.
    let stranger = lockstep::auth::Identity::generate();
    let mut r = receipts[0].clone();
    r.coordinator.public_key = stranger.public_key();
    r.coordinator.signature = stranger.sign(&r.signing_bytes());
    verify_receipt(&r, None).unwrap();
    assert!(verify_receipt(&r, Some(&dep)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_catches_colluders_of_distinct_operators_who_agree() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    // Two operators colluding: the same wrong bits on every job. Distinct
    // operators may share a job, so only the audit can catch them.
    let wrong = [("LOCKSTEP_FAULT_INJECT_EVERY", "1")];
    procs.worker_as(&server, "colluder-x", "op-x", "cpu", &wrong);
    procs.worker_as(&server, "colluder-y", "op-y", "cpu", &wrong);
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &["colluder-x", "colluder-y"]).await;
    let jobs = small_jobs(1, 46);
    let want = reference(&jobs);
    let out = tempfile::tempdir().unwrap();
    let mut o = opts(&server, "b-audit", Some(out.path()));
    o.audit_rate = 1.0;
    let report = submit(&nats, jobs, &o).await.unwrap();
    assert_all_correct(&report, &want, &[]);
    let j = &report.jobs[0];
    assert!(j.audited, "{j:#?}");
    assert_eq!(j.verdict, Verdict::Resolved);
    // Every worker was wrong: the output written is the coordinator's own.
    let (shape, data) = lockstep::tensors::read_f32_tensor(
        &out.path().join("outputs").join("job-000.safetensors"),
        "c",
    )
    .expect("the resolved job's output is written");
    assert_eq!(
        lockstep_kernels::outputs_digest(&[lockstep_kernels::tensor_digest_f32(&shape, &data)]),
        want["job-000"]
    );
    let mut faulty = j.faulty_workers.clone();
    faulty.sort();
    assert_eq!(faulty, ["colluder-x", "colluder-y"]);
    for w in ["colluder-x", "colluder-y"] {
        assert_eq!(
            enrollment(&nats, w).await.state,
            EnrollmentState::Quarantined
        );
    }
    // Without an audit the same agreement is accepted: that is what the
    // audit rate is for (PROTOCOL.md gives the odds).
    for w in ["colluder-x", "colluder-y"] {
        let mut e = enrollment(&nats, w).await;
        e.state = EnrollmentState::Active;
        lockstep::nats::put_enrollment(&nats, &e).await.unwrap();
    }
    let jobs = small_jobs(1, 47);
    let want = reference(&jobs);
    let report = submit(&nats, jobs, &opts(&server, "b-no-audit", None))
        .await
        .unwrap();
    assert_eq!(report.verified, 1);
    assert_ne!(report.jobs[0].digest, Some(want["job-000"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_cannot_write_where_the_requester_may_not() {
    // A request's reply subject is not checked against the requester's
    // permissions, so a worker could make the server answer (and a stream
    // store the answer) on any subject. Each worker has an account of its
    // own: replies land there, where nothing is stored.
    let Some(server) = nats_server() else { return };
    let nats = server.connect().await.unwrap();
    server.enroll("alice", "op-a").unwrap();
    let mcfg = server.enroll("mallory", "op-m").unwrap();
    let m = Adversary::connect(&mcfg, "mallory").await.unwrap();
    let alice_before = enrollment(&nats, "alice").await;
    // Mallory's own heartbeat holds bytes of its choice, which a direct get
    // echoes.
    let forged = br#"{"name":"alice","operator":"op-m","public_key":"UX","state":"quarantined","enrolled_ms":0}"#;
    assert!(
        m.can_publish("JSL.API.$KV.lockstep_workers.mallory", forged)
            .await
    );
    let mut results = lockstep_tests::watch_results(&nats, "lockstep.result.>").await;
    for reply in [
        "lockstep.result.b1.alice",
        "$KV.lockstep_enrolled.alice",
        "$KV.lockstep_faults.alice.b1.j1",
        "lockstep.job.alice.b1",
    ] {
        m.client
            .publish_with_reply(
                "JSL.API.DIRECT.GET.KV_lockstep_workers.$KV.lockstep_workers.mallory",
                reply,
                "".into(),
            )
            .await
            .unwrap();
    }
    m.client.flush().await.unwrap();
    use futures::StreamExt;
    let got = tokio::time::timeout(Duration::from_secs(2), results.next()).await;
    assert!(got.is_err(), "a reply was stored as a result: {got:?}");
    assert_eq!(enrollment(&nats, "alice").await, alice_before);
    let mut faults = nats.faults.keys().await.unwrap();
    assert!(faults.next().await.is_none(), "a fault record appeared");
    let mut jobs = nats.js.get_stream("LOCKSTEP_JOBS").await.unwrap();
    assert_eq!(jobs.info().await.unwrap().state.messages, 0);
    // A heartbeat with a rollup header would purge every other worker's.
    let alice_beat = br#"{"alice":1}"#;
    nats.workers
        .put("alice", alice_beat.to_vec().into())
        .await
        .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "all");
    let rollup =
        m.js.send_publish(
            "JSL.API.$KV.lockstep_workers.mallory",
            async_nats::jetstream::message::PublishMessage::build()
                .payload("x".into())
                .headers(headers),
        )
        .await;
    if let Ok(ack) = rollup {
        assert!(ack.await.is_err(), "a rollup was stored");
    }
    assert_eq!(
        nats.workers.get("alice").await.unwrap().unwrap().as_ref(),
        alice_beat
    );
}
