//! `lockstep serve` end to end: a real nats-server (authorization on), two
//! CPU workers of distinct operators, the server started as a process, and
//! the official `openai` Python client (pinned wheels, `./dev` puts them in
//! `.tools/py`) asking for completions, chats, a stream, n = 2 with a seed,
//! and the errors a client can cause (401, 404, 400, 429). Every receipt
//! the responses carry then verifies offline with `lockstep verify`, and
//! the server's and a worker's `/metrics`, parsed by prometheus_client,
//! match the work the client did.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lockstep_tests::{lockstep_bin, nats_server, wait_workers, Procs};

/// The Python path holding the `openai` client, or `None` (skip) when
/// `./dev` has not fetched it; `LOCKSTEP_REQUIRE_PYTHON=1` makes that a
/// failure.
fn python_path() -> Option<String> {
    match std::env::var("LOCKSTEP_PYTHONPATH") {
        Ok(p) if std::path::Path::new(&p).join("openai").is_dir() => Some(p),
        _ => {
            assert!(
                std::env::var_os("LOCKSTEP_REQUIRE_PYTHON").is_none(),
                "LOCKSTEP_REQUIRE_PYTHON is set but LOCKSTEP_PYTHONPATH has no openai package"
            );
            eprintln!("SKIPPED: no openai client (./dev setup fetches it into .tools/py)");
            None
        }
    }
}

fn lockstep(args: &[&str]) -> String {
    let o = Command::new(lockstep_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "lockstep {args:?}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// A running `lockstep serve` and its base URL.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &std::path::Path, extra: &[&str]) -> Server {
    let mut child = Command::new(lockstep_bin())
        .args(["serve", "--deployment"])
        .arg(dir)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--model",
            "smollm2",
            "--model",
            "stories260K",
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("lockstep serve exited before listening")
            .unwrap();
        eprintln!("serve: {line}");
        if let Some(rest) = line.strip_prefix("lockstep serve: ") {
            if let Some(url) = rest.split_whitespace().next() {
                if url.starts_with("http://") {
                    break url.to_string();
                }
            }
        }
    };
    // Keep draining its stderr so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Server { child, base }
}

#[test]
fn the_openai_client_gets_verified_completions_with_receipts() {
    let Some(pythonpath) = python_path() else {
        return;
    };
    if lockstep_tests::models::smollm2().is_none() {
        return;
    }
    let Some(server) = nats_server() else { return };
    let dir = server.dir();
    let dir_s = dir.to_str().unwrap();
    let mut procs = Procs::default();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    procs.worker_args(
        &server,
        "serve-a",
        "cpu",
        &["--metrics", &metrics_addr],
        &[],
    );
    procs.worker(&server, "serve-b", "cpu", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let nats = server.connect().await.unwrap();
        wait_workers(&nats, &["serve-a", "serve-b"]).await;
    });
    let key = lockstep(&["keys", "add", "--deployment", dir_s, "--name", "tests"]);
    let slow = lockstep(&[
        "keys",
        "add",
        "--deployment",
        dir_s,
        "--name",
        "slow",
        "--rpm",
        "2",
    ]);
    let listed = lockstep(&["keys", "list", "--deployment", dir_s]);
    assert!(
        listed.contains("tests") && listed.contains("slow"),
        "{listed}"
    );
    assert!(!listed.contains(key.trim()), "keys list must not show keys");
    let srv = serve(&dir, &[]);
    let receipts = tempfile::NamedTempFile::new().unwrap();
    let o = Command::new("python3")
        .arg(lockstep_tests::models::repo_root().join("tests/python/serve_client.py"))
        .env("PYTHONPATH", &pythonpath)
        .env(
            "LOCKSTEP_BASE_URL",
            format!("{}/v1", srv.base.trim_end_matches("/v1")),
        )
        .env("LOCKSTEP_KEY", key.trim())
        .env("LOCKSTEP_SLOW_KEY", slow.trim())
        .env("LOCKSTEP_RECEIPTS", receipts.path())
        .env(
            "LOCKSTEP_WORKER_METRICS",
            format!("http://{metrics_addr}/metrics"),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "the openai client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let found: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    eprintln!("{found:#}");
    // "The capital of France is" → Paris, as `lockstep generate` says.
    assert!(
        found["completion"].as_str().unwrap().contains("Paris"),
        "{found}"
    );
    assert_eq!(found["bad_key"][0], 401, "{found}");
    assert_eq!(found["bad_key"][1]["code"], "invalid_api_key", "{found}");
    assert_eq!(found["unknown_model"][0], 404, "{found}");
    assert_eq!(
        found["unknown_model"][1]["code"], "model_not_found",
        "{found}"
    );
    assert_eq!(found["long_prompt"][0], 400, "{found}");
    assert!(
        found["long_prompt"][1]["message"]
            .as_str()
            .unwrap()
            .contains("context"),
        "{found}"
    );
    assert_eq!(found["bad_param"][0], 400, "{found}");
    assert_eq!(
        found["slow_key"],
        serde_json::json!([200, 200, 429]),
        "{found}"
    );
    // Every receipt verifies offline against the deployment's keys.
    let text = std::fs::read_to_string(receipts.path()).unwrap();
    assert!(text.lines().count() >= 8, "{text}");
    let out = lockstep(&[
        "verify",
        receipts.path().to_str().unwrap(),
        "--deployment",
        dir_s,
    ]);
    eprintln!("{out}");
    // A revoked key stops working without a restart.
    let id = lockstep(&["keys", "list", "--deployment", dir_s])
        .lines()
        .find(|l| l.contains("tests"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    lockstep(&["keys", "revoke", "--deployment", dir_s, &id]);
    std::thread::sleep(Duration::from_millis(1200));
    let status = ureq_status(&srv.base, key.trim());
    assert_eq!(status, 401);
}

/// GET /v1/models with a key, by curl-less plain HTTP: the status code.
fn ureq_status(base: &str, key: &str) -> u16 {
    use std::io::{Read, Write};
    let hostport = base
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut s = std::net::TcpStream::connect(&hostport).unwrap();
    write!(
        s,
        "GET /v1/models HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_whitespace().nth(1).unwrap().parse().unwrap()
}
