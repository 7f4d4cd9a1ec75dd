//! A local `nats-server` (>= 2.10, JetStream on) for the demo, benchmarks and
//! tests: a deployment of its own in a temporary folder (authorization on,
//! every party enrolled with its key and permissions), a random loopback
//! port, killed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::auth::ConnectConfig;
use crate::deploy::{Deployment, Role};

pub struct NatsServer {
    child: Option<Child>,
    bin: PathBuf,
    pub port: u16,
    /// The deployment the server runs: its configuration (nkey users with
    /// permissions), every key, and the JetStream store (`store/`), kept
    /// across [`NatsServer::restart`].
    deployment: Mutex<Deployment>,
    /// Owns the deployment's folder.
    _tmp: tempfile::TempDir,
}

/// Finds a nats-server binary: `$LOCKSTEP_NATS_SERVER`, then the one `./dev`
/// installs under `.tools/`, then `nats-server` on PATH. Checks it is >= 2.10.
pub fn find_nats_server() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("LOCKSTEP_NATS_SERVER") {
        candidates.push(PathBuf::from(p));
    }
    // Walk up from the executable to a checkout's .tools/ folder.
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(5) {
            candidates.push(dir.join(".tools/bin/nats-server"));
        }
    }
    candidates.push(PathBuf::from("nats-server"));
    let mut tried = Vec::new();
    for c in candidates {
        match Command::new(&c).arg("--version").output() {
            Ok(out) if out.status.success() => {
                let v = String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr);
                if version_ok(&v) {
                    return Ok(c);
                }
                tried.push(format!("{} is {} (need >= 2.10)", c.display(), v.trim()));
            }
            _ => tried.push(format!("{}: not found", c.display())),
        }
    }
    bail!(
        "no usable nats-server (>= 2.10 with JetStream): {}. Run ./dev setup, or set LOCKSTEP_NATS_SERVER",
        tried.join("; ")
    )
}

fn version_ok(v: &str) -> bool {
    // "nats-server: v2.15.1"
    let Some(rest) = v
        .rsplit(" v")
        .next()
        .filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    else {
        return false;
    };
    let mut parts = rest
        .trim()
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 10)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Settings of a local server beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// The largest message the server accepts (its default is 1 MiB).
    pub max_payload: Option<usize>,
}

impl NatsServer {
    /// Starts a server with a fresh deployment (authorization on, one
    /// coordinator identity) in a temporary folder.
    pub fn start() -> Result<Self> {
        Self::start_with(&ServerOptions::default())
    }

    /// Starts a server with a fresh deployment and these settings.
    pub fn start_with(options: &ServerOptions) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("lockstep-nats-")
            .tempdir()?;
        let port = free_port()?;
        let deployment = Deployment::init(tmp.path(), "127.0.0.1", port, options.max_payload)?;
        let mut s = Self {
            child: None,
            bin: find_nats_server()?,
            port,
            deployment: Mutex::new(deployment),
            _tmp: tmp,
        };
        s.spawn()?;
        Ok(s)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The deployment's folder (`deployment.json`, keys, store).
    pub fn dir(&self) -> PathBuf {
        self._tmp.path().into()
    }

    /// How the deployment's coordinator connects.
    pub fn coordinator(&self) -> ConnectConfig {
        self.deployment.lock().expect("not poisoned").coordinator()
    }

    /// Connects as the coordinator (creating every store).
    pub async fn connect(&self) -> Result<crate::nats::Nats> {
        crate::nats::connect(&self.coordinator()).await
    }

    /// Enrolls a worker (idempotent) the way `lockstep enroll` does: its key,
    /// the server's configuration reloaded, its registry entry written.
    /// Returns how the worker connects.
    pub fn enroll(&self, name: &str, operator: &str) -> Result<ConnectConfig> {
        let mut d = self.deployment.lock().expect("not poisoned");
        let known = d.member(Role::Worker, name).is_some();
        let member = d.enroll(Role::Worker, name, operator)?;
        let cfg = d.connect_as(Role::Worker, name);
        if known {
            return Ok(cfg);
        }
        if let Some(child) = &self.child {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
        }
        let (coordinator, worker) = (d.coordinator(), cfg.clone());
        drop(d);
        // Its own thread and runtime: callers may be inside a runtime.
        std::thread::spawn(move || -> Result<()> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    crate::deploy::wait_until_accepted(&worker, Duration::from_secs(10)).await?;
                    let nats = crate::nats::connect(&coordinator).await?;
                    crate::deploy::register(&nats, &member).await?;
                    Ok(())
                })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("enrolling panicked"))??;
        Ok(cfg)
    }

    fn spawn(&mut self) -> Result<()> {
        let config = self._tmp.path().join(crate::deploy::SERVER_CONFIG);
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("LOCKSTEP_NATS_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "nats-server exited at start ({status}); port {} taken?",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "nats-server did not listen on port {} within 15 s",
            self.port
        )
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server and starts it again on the same port and store.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions() {
        assert!(super::version_ok("nats-server: v2.15.1"));
        assert!(super::version_ok("nats-server: v2.10.0\n"));
        assert!(!super::version_ok("nats-server: v2.9.10"));
        assert!(!super::version_ok("garbage"));
    }
}
