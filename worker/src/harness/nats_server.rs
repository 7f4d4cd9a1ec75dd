//! A local `nats-server` (>= 2.10, JetStream on) for the demo, benchmarks and
//! tests: random loopback port, its own store directory, killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct NatsServer {
    child: Option<Child>,
    bin: PathBuf,
    /// A config file for settings the command line lacks (max_payload).
    config: Option<PathBuf>,
    pub port: u16,
    /// JetStream store; kept across [`NatsServer::restart`].
    pub store: PathBuf,
    /// Owns `store` when we created it.
    _tmp: Option<tempfile::TempDir>,
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
    /// Starts a server with a fresh temporary store.
    pub fn start() -> Result<Self> {
        Self::start_with(&ServerOptions::default())
    }

    /// Starts a server with a fresh temporary store and these settings.
    pub fn start_with(options: &ServerOptions) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("lockstep-nats-")
            .tempdir()?;
        let store = tmp.path().join("store");
        let config = match options.max_payload {
            Some(bytes) => {
                let path = tmp.path().join("nats.conf");
                std::fs::write(&path, format!("max_payload: {bytes}\n"))?;
                Some(path)
            }
            None => None,
        };
        let mut s = Self {
            child: None,
            bin: find_nats_server()?,
            config,
            port: free_port()?,
            store,
            _tmp: Some(tmp),
        };
        s.spawn()?;
        Ok(s)
    }

    /// Starts a server on an existing store directory.
    pub fn start_with_store(store: &Path) -> Result<Self> {
        let mut s = Self {
            child: None,
            bin: find_nats_server()?,
            config: None,
            port: free_port()?,
            store: store.into(),
            _tmp: None,
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

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.bin);
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        let child = cmd
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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
