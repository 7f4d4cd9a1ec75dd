//! Many batches one after another through a real nats-server (authorization
//! on) and four worker processes, no fault injected: no batch may stall.
//! Workers once pulled nothing for ~30 s now and then (a long-lived pull
//! stream believed a request open that the server had already answered);
//! each pull request is now short and independent.

use std::time::{Duration, Instant};

use lockstep::coordinator::{submit, SubmitOptions};
use lockstep_tests::{nats_server, small_jobs, wait_workers, Procs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_batches_and_none_stalls() {
    let Some(server) = nats_server() else { return };
    let mut procs = Procs::default();
    let names = ["s1", "s2", "s3", "s4"];
    for w in names {
        procs.worker(&server, w, "cpu", &[]);
    }
    let nats = server.connect().await.unwrap();
    wait_workers(&nats, &names).await;
    const BATCHES: usize = 120;
    let mut took = Vec::with_capacity(BATCHES);
    for b in 0..BATCHES {
        // Jobs in bundles of a few, so each worker pulls many messages.
        let jobs = small_jobs(300, 1000 + b as u64);
        let want = lockstep_tests::adversary::reference(&jobs);
        let opts = SubmitOptions {
            redundancy: 2,
            batch_id: Some(format!("soak-{b}")),
            worker_timeout: Duration::from_secs(5),
            job_timeout: Duration::from_secs(120),
            deadline: Some(Duration::from_secs(120)),
            progress: false,
            threads: 1,
            ..Default::default()
        };
        let t = Instant::now();
        let report = submit(&nats, jobs, &opts).await.unwrap();
        took.push(t.elapsed());
        assert!(report.all_accepted(), "batch {b}: {report:#?}");
        assert!(report.faults.is_empty(), "batch {b}: {:?}", report.faults);
        for j in &report.jobs {
            assert_eq!(j.digest, Some(want[&j.job]), "batch {b}: {}", j.job);
        }
    }
    let mut sorted = took.clone();
    sorted.sort();
    let median = sorted[BATCHES / 2];
    // Ten times the median, but at least 3 s: a loaded 2-core machine
    // wobbles; a stalled pull (30 s) does not hide under either.
    let limit = (median * 10).max(Duration::from_secs(3));
    let slow: Vec<(usize, Duration)> = took
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, d)| *d > limit)
        .collect();
    eprintln!(
        "{BATCHES} batches: median {median:?}, slowest {:?}",
        sorted[BATCHES - 1]
    );
    assert!(
        slow.is_empty(),
        "batches over {limit:?} (10x the median {median:?}): {slow:?}"
    );
}
