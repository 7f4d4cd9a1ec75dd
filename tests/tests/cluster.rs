//! lockstep on a real 3-node JetStream cluster on loopback (authorization
//! on every node): every stream, bucket and the object store replicated
//! three times, and the results leader killed mid-batch loses nothing and
//! costs seconds; `deploy init --cluster` and `enroll` serve every node.

use std::time::Duration;

use lockstep::coordinator::{submit, SubmitOptions};
use lockstep_tests::{nats_cluster, small_jobs, wait_workers, Procs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_no_job_when_the_results_leader_dies() {
    lockstep_tests::test_log();
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
    // The node leading the results stream dies: whoever was connected to
    // it reconnects to the others, the streams keep a quorum of two and
    // elect new leaders, and the coordinator's results feed, quiet, opens
    // again on the new leader.
    let leader = {
        let mut s = nats
            .js
            .get_stream(lockstep::protocol::RESULTS_STREAM)
            .await
            .unwrap();
        let info = s.info().await.unwrap();
        let name = info
            .cluster
            .clone()
            .and_then(|c| c.leader)
            .expect("a leader");
        name.trim_start_matches('n')
            .parse::<usize>()
            .expect("node n<i>")
    };
    server.kill_node(leader);
    let killed = std::time::Instant::now();
    let report = run.await.unwrap().unwrap();
    let took = killed.elapsed();
    eprintln!("the batch finished {took:?} after its results stream's leader died");
    // 5-9 s here: new leaders within ~5 s (the servers' election), then
    // the coordinator's quiet results feed opens again and reads the
    // workers' own streams directly (sourcing them into the results stream
    // again takes the server 10-30 s). It used to take 10-69 s.
    assert!(took < Duration::from_secs(25), "{took:?}");
    assert_eq!(report.verified, 40, "{report:#?}");
    assert_eq!(report.failed + report.unresolved, 0);
    assert!(report.faults.is_empty(), "{:?}", report.faults);
    // It comes back and catches up.
    server.start_node(leader).unwrap();
}

/// A base port with `n` free ports after it (loopback).
fn free_ports(n: u16) -> u16 {
    use rand::Rng as _;
    loop {
        let base: u16 = rand::rng().random_range(20_000..60_000);
        let free = (base..base + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return base;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_init_cluster_writes_every_node_and_enroll_reaches_them_all() {
    use lockstep::deploy::{wait_until_ready, Deployment, Role};
    if lockstep_tests::nats_server().is_none() {
        return;
    }
    // (`deploy init` takes an empty folder.)
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (port, route) = (free_ports(3), free_ports(3));
    let run = |args: &[&str]| {
        let o = std::process::Command::new(lockstep_tests::lockstep_bin())
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {text}");
        text
    };
    let out = run(&[
        "deploy",
        "init",
        dir.to_str().unwrap(),
        "--cluster",
        "3",
        "--port",
        &port.to_string(),
        "--route-port",
        &route.to_string(),
    ]);
    for n in ["n1", "n2", "n3"] {
        assert!(dir.join(format!("nats-server-{n}.conf")).exists(), "{out}");
    }
    // The three servers, from the files `deploy init` wrote.
    let server = lockstep::harness::NatsServer::from_deployment(tmp).unwrap();
    let dir = server.dir();
    let d = Deployment::open(&dir).unwrap();
    // A coordinator with default limits makes every store with 3 copies on
    // a cluster (the server says it is one).
    let nats = lockstep::nats::connect_retrying(
        &d.coordinator(),
        &lockstep::store::StoreLimits::default(),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    for name in lockstep::nats::STREAM_NAMES {
        let mut s = nats.js.get_stream(name).await.unwrap();
        assert_eq!(s.info().await.unwrap().config.num_replicas, 3, "{name}");
    }
    // `lockstep enroll` reloads every node: each one, alone, takes the new
    // worker's key and serves it its queue (no further reload here).
    let out = run(&[
        "enroll",
        "worker",
        "e1",
        "--operator",
        "acme",
        "--deployment",
        dir.to_str().unwrap(),
    ]);
    assert!(out.contains("the server takes its key"), "{out}");
    let d = Deployment::open(&dir).unwrap();
    for node in &d.file.cluster {
        let mut cfg = d.connect_as(Role::Worker, "e1");
        cfg.url = format!("nats://127.0.0.1:{}", node.port);
        wait_until_ready(&cfg, "e1", Duration::from_secs(10), || {})
            .await
            .unwrap_or_else(|e| panic!("node {}: {e:#}", node.name));
    }
}
