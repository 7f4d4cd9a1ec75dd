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

/// A minimal WebDriver client: one JSON request per connection, the body
/// read by its Content-Length (or chunks), with a timeout so a silent
/// driver fails the test instead of hanging it.
fn webdriver(
    port: u16,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    use std::io::{BufRead, Read, Write};
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    write!(
        &s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(&s);
    let (mut length, mut chunked) = (None, false);
    loop {
        let mut line = String::new();
        r.read_line(&mut line)
            .unwrap_or_else(|e| panic!("webdriver {path}: {e}"));
        let l = line.trim().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        }
    }
    let mut json = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).unwrap();
            json.extend_from_slice(&chunk[..n]);
        }
    } else {
        let n = length.unwrap_or_else(|| panic!("webdriver {path}: no Content-Length"));
        json.resize(n, 0);
        r.read_exact(&mut json).unwrap();
    }
    serde_json::from_slice(&json)
        .unwrap_or_else(|e| panic!("webdriver {path}: {e}: {}", String::from_utf8_lossy(&json)))
}

/// The status page in a real headless Chromium (Debian's, through
/// chromedriver): it loads with no console errors and shows the
/// deployment's workers and a verified request; a screenshot goes to
/// target/test-artifacts/status-page.png.
#[test]
fn the_status_page_shows_workers_and_a_verified_request_in_a_browser() {
    let (chromium, driver) = ("/usr/bin/chromium", "/usr/bin/chromedriver");
    if !std::path::Path::new(driver).exists() || !std::path::Path::new(chromium).exists() {
        assert!(
            std::env::var_os("LOCKSTEP_REQUIRE_BROWSER").is_none(),
            "LOCKSTEP_REQUIRE_BROWSER is set but {driver} or {chromium} is missing"
        );
        eprintln!("SKIPPED: no Chromium/chromedriver (./dev setup installs them)");
        return;
    }
    let Some(server) = nats_server() else { return };
    let dir = server.dir();
    let dir_s = dir.to_str().unwrap();
    let mut procs = Procs::default();
    procs.worker(&server, "page-a", "cpu", &[]);
    procs.worker(&server, "page-b", "cpu", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let nats = server.connect().await.unwrap();
        wait_workers(&nats, &["page-a", "page-b"]).await;
    });
    let key = lockstep(&["keys", "add", "--deployment", dir_s, "--name", "page"]);
    let srv = serve(&dir, &[]);
    let root = srv.base.trim_end_matches("/v1").to_string();
    // One verified request, by plain HTTP.
    let hostport = root.trim_start_matches("http://").to_string();
    let body = r#"{"model":"stories260K","prompt":[1,403,407],"max_tokens":6,"temperature":0}"#;
    let resp = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&hostport).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            key.trim(),
            body.len()
        )
        .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    };
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let id = resp
        .split("\"id\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut chromedriver = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let session = webdriver(
        port,
        "POST",
        "/session",
        Some(serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"]},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}})),
    );
    let sid = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {session}"))
        .to_string();
    let result = std::panic::catch_unwind(|| {
        webdriver(
            port,
            "POST",
            &format!("/session/{sid}/url"),
            Some(serde_json::json!({"url": format!("{root}/")})),
        );
        // The page polls status.json every 2 s: wait for what it must show.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let text = loop {
            let v = webdriver(
                port,
                "POST",
                &format!("/session/{sid}/execute/sync"),
                Some(serde_json::json!({"script": "return document.body.innerText", "args": []})),
            );
            let text = v["value"].as_str().unwrap_or_default().to_string();
            if (text.contains("page-a") && text.contains("page-b") && text.contains(&id))
                || std::time::Instant::now() > deadline
            {
                break text;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        assert!(
            text.contains("page-a") && text.contains("page-b"),
            "workers missing:\n{text}"
        );
        assert!(text.contains(&id), "request {id} missing:\n{text}");
        assert!(text.contains("verified"), "{text}");
        let logs = webdriver(
            port,
            "POST",
            &format!("/session/{sid}/se/log"),
            Some(serde_json::json!({"type": "browser"})),
        );
        let errors: Vec<&serde_json::Value> = logs["value"]
            .as_array()
            .map(|a| a.iter().filter(|e| e["level"] == "SEVERE").collect())
            .unwrap_or_default();
        assert!(errors.is_empty(), "console errors: {errors:?}");
        let shot = webdriver(port, "GET", &format!("/session/{sid}/screenshot"), None);
        let png = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            shot["value"].as_str().unwrap(),
        )
        .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let out = lockstep_tests::models::repo_root().join("target/test-artifacts");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("status-page.png"), png).unwrap();
    });
    webdriver(port, "DELETE", &format!("/session/{sid}"), None);
    let _ = chromedriver.kill();
    let _ = chromedriver.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// POST a JSON body with a key over plain HTTP/1.1: (status, body), or
/// `None` when the server takes no connection or answers nothing.
fn post(base: &str, path: &str, key: &str, body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let hostport = base
        .trim_start_matches("http://")
        .split('/')
        .next()?
        .to_string();
    let mut s = std::net::TcpStream::connect(&hostport).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .ok()?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// A deployment whose workers `names` take `delay_ms` per job (so a request
/// is in flight long enough to interrupt), an API key, and `lockstep serve`
/// on it; `None` where the model or nats-server is missing.
struct Slow {
    server: lockstep::harness::NatsServer,
    procs: Procs,
    rt: tokio::runtime::Runtime,
    nats: lockstep::nats::Nats,
    key: String,
    srv: Server,
}

fn slow_deployment(names: &[&str], delay_ms: &str) -> Option<Slow> {
    lockstep_tests::models::smollm2()?;
    let server = nats_server()?;
    let dir = server.dir();
    let mut procs = Procs::default();
    for w in names {
        procs.worker(&server, w, "cpu", &[("LOCKSTEP_TEST_DELAY_MS", delay_ms)]);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let nats = rt.block_on(async {
        let nats = server.connect().await.unwrap();
        wait_workers(&nats, names).await;
        nats
    });
    let key = lockstep(&[
        "keys",
        "add",
        "--deployment",
        dir.to_str().unwrap(),
        "--name",
        "slow",
    ]);
    let srv = serve(&dir, &[]);
    Some(Slow {
        server,
        procs,
        rt,
        nats,
        key: key.trim().to_string(),
        srv,
    })
}

/// SIGTERM drains: a request in flight when `lockstep serve` is told to
/// stop is still answered, verified, with its receipt; no new request is
/// taken; the process exits cleanly.
#[test]
fn sigterm_lets_requests_in_flight_finish_verified() {
    // Slow workers: each job takes 3 s, so the request is in flight when
    // the signal comes.
    let Some(Slow {
        mut srv,
        key,
        server: _server,
        procs: _procs,
        ..
    }) = slow_deployment(&["drain-a", "drain-b"], "3000")
    else {
        return;
    };
    let base = srv.base.clone();
    let body = r#"{"model": "stories260K", "prompt": [1, 300, 400], "max_tokens": 6}"#;
    let in_flight = {
        let (base, key) = (base.clone(), key.clone());
        std::thread::spawn(move || post(&base, "/v1/completions", &key, body))
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let pid = srv.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(std::time::Duration::from_millis(500));
    // No new request is taken once draining.
    let late = post(&base, "/v1/completions", &key, body);
    assert!(
        late.as_ref().is_none_or(|(s, _)| *s != 200),
        "a request after SIGTERM was served: {late:?}"
    );
    let (status, answer) = in_flight
        .join()
        .unwrap()
        .expect("the in-flight request got no answer");
    assert_eq!(status, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    assert!(v["lockstep"].to_string().contains("receipt"), "{v}");
    // And the process ends by itself, cleanly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = srv.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lockstep serve did not exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
}

/// A worker killed while it holds a streamed request's replica: its work
/// moves to another worker and the stream completes, verified.
#[test]
fn a_worker_killed_mid_stream_leaves_the_stream_complete() {
    let names = ["kill-a", "kill-b", "kill-c"];
    let Some(Slow {
        mut procs,
        rt,
        nats,
        key,
        srv,
        server: _server,
    }) = slow_deployment(&names, "2500")
    else {
        return;
    };
    let body = r#"{"model": "stories260K", "prompt": [1, 300, 400], "max_tokens": 6, "temperature": 0, "stream": true}"#;
    let stream = {
        let (base, key) = (srv.base.clone(), key.clone());
        std::thread::spawn(move || post(&base, "/v1/completions", &key, body))
    };
    // The worker holding the request's first replica (serve's batches are
    // named cmpl-…), killed while it waits.
    let victim = rt.block_on(async {
        use futures::StreamExt;
        for _ in 0..100 {
            let mut keys = nats.assign.keys().await.unwrap();
            while let Some(k) = keys.next().await {
                let k = k.unwrap();
                if !k.starts_with("cmpl-") {
                    continue;
                }
                if let Ok(Some(v)) = nats.assign.get(&k).await {
                    let entries: Vec<lockstep::protocol::PlanEntry> =
                        serde_json::from_slice(&v).unwrap();
                    if let Some(e) = entries.first() {
                        return e.assignment.worker.clone();
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("serve's request was never planned");
    });
    procs.kill(&victim);
    let (status, events) = stream.join().unwrap().expect("the stream got no answer");
    assert_eq!(status, 200, "{events}");
    let data: Vec<&str> = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{events}");
    // The last chunk carries the verdict and receipt: verified by the two
    // workers left, the victim not among them.
    let last: serde_json::Value = serde_json::from_str(data[data.len() - 2]).unwrap();
    let choice = &last["lockstep"]["choices"][0];
    assert_eq!(choice["verdict"], "verified", "{last}");
    let workers: Vec<&str> = choice["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(workers.len(), 2, "{last}");
    // The victim's replica moved: its new holder signed as attempt 1.
    let signed = &last["lockstep"]["receipts"][0]["workers"];
    assert!(
        signed
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["attempt"].as_u64() >= Some(1)),
        "{victim} held a replica when killed; it must have moved: {signed}"
    );
    assert!(
        !workers.contains(&victim.as_str()),
        "{victim} killed, yet counted: {last}"
    );
    // The same ids as an unstreamed request of the same (greedy) prompt.
    let (status, answer) = post(
        &srv.base,
        "/v1/completions",
        &key,
        &body.replace(r#", "stream": true"#, ""),
    )
    .expect("no answer");
    assert_eq!(status, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        v["lockstep"]["choices"][0]["output_ids"], choice["output_ids"],
        "{v}"
    );
    assert!(names.contains(&victim.as_str()));
}
