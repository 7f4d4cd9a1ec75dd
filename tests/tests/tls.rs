//! TLS with client certificates: a deployment whose server requires TLS and
//! verifies every client's certificate. Workers and the coordinator connect
//! with `--tls-ca`, `--tls-cert`, `--tls-key` (certificates made here with
//! rcgen); a batch verifies; a client without a certificate, or without
//! TLS, is refused.

use std::time::Duration;

use lockstep::coordinator::{submit, SubmitOptions};
use lockstep::deploy::ServerTls;
use lockstep::harness::{NatsServer, ServerOptions};
use lockstep_tests::{lockstep_bin, small_jobs, Procs};

struct Certs {
    _dir: tempfile::TempDir,
    tls: ServerTls,
}

fn certs() -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |san: &str, usage: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(vec![san.to_string()]).unwrap();
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf("lockstep-client", ExtendedKeyUsagePurpose::ClientAuth);
    let tls = ServerTls {
        cert: write("server.pem", server_cert),
        key: write("server.key", server_key),
        ca: write("ca.pem", ca.pem()),
        verify_clients: true,
        client_cert: Some(write("client.pem", client_cert)),
        client_key: Some(write("client.key", client_key)),
    };
    Certs { _dir: dir, tls }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_end_to_end() {
    let certs = certs();
    let Some(server) = lockstep_tests::started(NatsServer::start_with(&ServerOptions {
        tls: Some(certs.tls.clone()),
        ..Default::default()
    })) else {
        return;
    };
    let nats = server.connect().await.unwrap();
    let mut procs = Procs::default();
    procs.worker(&server, "tls-1", "cpu", &[]);
    procs.worker(&server, "tls-2", "cpu", &[]);
    lockstep::nats::wait_for_workers(&nats, &["tls-1", "tls-2"], Duration::from_secs(120))
        .await
        .unwrap();
    let report = submit(
        &nats,
        small_jobs(4, 71),
        &SubmitOptions {
            redundancy: 2,
            batch_id: Some("b-tls".into()),
            deadline: Some(Duration::from_secs(120)),
            progress: false,
            threads: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(report.verified, 4, "{report:#?}");
    // The CLI with the flags (and the deployment only for the key).
    let coordinator = server.coordinator();
    let ok = std::process::Command::new(lockstep_bin())
        .args(["workers", "--json", "--nats", &server.url(), "--nkey"])
        .arg(coordinator.nkey.as_ref().unwrap())
        .arg("--tls-ca")
        .arg(&certs.tls.ca)
        .arg("--tls-cert")
        .arg(certs.tls.client_cert.as_ref().unwrap())
        .arg("--tls-key")
        .arg(certs.tls.client_key.as_ref().unwrap())
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("tls-1"));
    // Refused: TLS without a client certificate, and no TLS at all.
    let mut no_cert = coordinator.clone();
    no_cert.tls_cert = None;
    no_cert.tls_key = None;
    let mut plain = coordinator.clone();
    plain.tls_ca = None;
    plain.tls_cert = None;
    plain.tls_key = None;
    for cfg in [no_cert, plain] {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            cfg.options_once().await.unwrap().connect(cfg.urls()),
        )
        .await;
        assert!(
            !matches!(r, Ok(Ok(_))),
            "connected without a client certificate or TLS"
        );
    }
}
