//! lockstep on a real 3-node JetStream cluster on loopback (authorization
//! on every node): every stream, bucket and the object store replicated
//! three times, and a node killed mid-batch loses nothing.

use std::time::Duration;

use lockstep::coordinator::{submit, SubmitOptions};
use lockstep_tests::{nats_cluster, small_jobs, wait_workers, Procs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_no_job_when_a_node_dies() {
    let Some(mut server) = nats_cluster() else {
        return;
    };
    let nats = server.connect().await.unwrap();
    // Every store has three copies.
    for name in lockstep::nats::STREAM_NAMES {
        let mut s = nats.js.get_stream(name).await.unwrap();
        let info = s.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3, "{name}");
    }
    let mut procs = Procs::default();
    let slow = [("LOCKSTEP_TEST_DELAY_MS", "40")];
    for w in ["k1", "k2", "k3"] {
        procs.worker(&server, w, "cpu", &slow);
    }
    wait_workers(&nats, &["k1", "k2", "k3"]).await;
    let jobs = small_jobs(40, 61);
    let opts = SubmitOptions {
        redundancy: 2,
        batch_id: Some("b-cluster".into()),
        worker_timeout: Duration::from_secs(5),
        job_timeout: Duration::from_secs(60),
        deadline: Some(Duration::from_secs(240)),
        progress: false,
        threads: 1,
        ..Default::default()
    };
    let run = {
        let nats = nats.clone();
        tokio::spawn(async move { submit(&nats, jobs, &opts).await })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!run.is_finished(), "the batch finished before the kill");
    // A node dies: whoever was connected to it reconnects to the others,
    // and the streams keep a quorum of two.
    server.kill_node(1);
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.verified, 40, "{report:#?}");
    assert_eq!(report.failed + report.unresolved, 0);
    assert!(report.faults.is_empty(), "{:?}", report.faults);
    // It comes back and catches up.
    server.start_node(1).unwrap();
}
