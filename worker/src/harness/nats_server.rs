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
    /// One process per node (one, unless a cluster).
    children: Vec<Option<Child>>,
    bin: PathBuf,
    /// Client port of each node.
    ports: Vec<u16>,
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

/// `start` again (three tries in all) while a server cannot bind its port.
fn retry_ports<T>(start: impl Fn() -> Result<T>) -> Result<T> {
    let mut tries = 0;
    loop {
        match start() {
            Err(e) if tries < 2 && format!("{e:#}").contains("port") => {
                tries += 1;
                tracing::debug!("{e:#}; trying other ports");
            }
            r => return r,
        }
    }
}

/// Settings of a local server beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// The largest message the server accepts (its default is 1 MiB).
    pub max_payload: Option<usize>,
    /// TLS on client connections.
    pub tls: Option<crate::deploy::ServerTls>,
}

impl NatsServer {
    /// Starts a server with a fresh deployment (authorization on, one
    /// coordinator identity) in a temporary folder.
    pub fn start() -> Result<Self> {
        Self::start_with(&ServerOptions::default())
    }

    /// Starts a server with a fresh deployment and these settings. (A port
    /// found free can be taken before the server binds it: tried again on
    /// new ports.)
    pub fn start_with(options: &ServerOptions) -> Result<Self> {
        retry_ports(|| Self::start_with_once(options))
    }

    fn start_with_once(options: &ServerOptions) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("lockstep-nats-")
            .tempdir()?;
        let port = free_port()?;
        let mut deployment = Deployment::init(tmp.path(), "127.0.0.1", port, options.max_payload)?;
        if options.tls.is_some() {
            deployment.file.tls = options.tls.clone();
            deployment.save()?;
        }
        Self::launch(tmp, deployment, vec![port])
    }

    /// Starts a JetStream cluster of `nodes` servers on loopback (one
    /// deployment: the same users and permissions on every node).
    pub fn start_cluster(nodes: usize) -> Result<Self> {
        retry_ports(|| Self::start_cluster_once(nodes))
    }

    fn start_cluster_once(nodes: usize) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("lockstep-nats-cluster-")
            .tempdir()?;
        let mut spec = Vec::new();
        for i in 0..nodes {
            spec.push(crate::deploy::ClusterNode {
                name: format!("n{i}"),
                host: None,
                port: free_port()?,
                route_port: free_port()?,
            });
        }
        let ports = spec.iter().map(|n| n.port).collect();
        let deployment = Deployment::init_cluster(tmp.path(), "127.0.0.1", spec, None)?;
        Self::launch(tmp, deployment, ports)
    }

    /// Starts the server(s) of the deployment `lockstep deploy init` wrote
    /// in `dir` (every node of a cluster), on its ports.
    pub fn from_deployment(dir: tempfile::TempDir) -> Result<Self> {
        let deployment = Deployment::open(dir.path())?;
        let ports = if deployment.file.cluster.is_empty() {
            vec![deployment.file.port]
        } else {
            deployment.file.cluster.iter().map(|n| n.port).collect()
        };
        Self::launch(dir, deployment, ports)
    }

    fn launch(tmp: tempfile::TempDir, mut deployment: Deployment, ports: Vec<u16>) -> Result<Self> {
        // Streams reserve their byte limits against JetStream's store
        // limit, which nats-server otherwise sizes by the free disk: many
        // local servers at once (parallel tests) on a fuller disk would
        // refuse streams. These servers hold little; their streams'
        // limits are reservations, not use.
        if deployment.file.max_file_store.is_none() {
            deployment.file.max_file_store = Some("4T".into());
            deployment.save()?;
        }
        let mut s = Self {
            children: ports.iter().map(|_| None).collect(),
            bin: find_nats_server()?,
            ports,
            deployment: Mutex::new(deployment),
            _tmp: tmp,
        };
        for i in 0..s.ports.len() {
            s.spawn(i)?;
        }
        Ok(s)
    }

    /// The (first) server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.children[0].as_ref().map(|c| c.id())
    }

    /// The server's URL; for a cluster, every node's, comma-separated.
    pub fn url(&self) -> String {
        let urls: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        urls.join(",")
    }

    /// The deployment's folder (`deployment.json`, keys, store).
    pub fn dir(&self) -> PathBuf {
        self._tmp.path().into()
    }

    /// How the deployment's coordinator connects.
    pub fn coordinator(&self) -> ConnectConfig {
        self.deployment.lock().expect("not poisoned").coordinator()
    }

    /// The store limits of this server's coordinator: the defaults (and
    /// `$LOCKSTEP_STORE_LIMITS`), with 3 replicas on a cluster.
    pub fn limits(&self) -> Result<crate::store::StoreLimits> {
        let mut limits = crate::store::StoreLimits::from_env()?;
        if self.ports.len() >= 3 {
            limits.replicas = 3;
        }
        Ok(limits)
    }

    /// Connects as the coordinator (creating every store). A new cluster
    /// elects its JetStream leader first: this waits up to 30 s for it.
    pub async fn connect(&self) -> Result<crate::nats::Nats> {
        let limits = self.limits()?;
        crate::nats::connect_retrying(&self.coordinator(), &limits, Duration::from_secs(30)).await
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
        let pids: Vec<i32> = self
            .children
            .iter()
            .flatten()
            .map(|c| c.id() as i32)
            .collect();
        let reload = move || {
            for &pid in &pids {
                // SAFETY: a signal to our own child.
                unsafe { libc::kill(pid, libc::SIGHUP) };
            }
        };
        reload();
        let (coordinator, worker) = (d.coordinator(), cfg.clone());
        drop(d);
        let limits = self.limits()?;
        // (A reload leaves JetStream unanswering for a moment; a new cluster
        // elects its leader.)
        let patience = Duration::from_secs(30);
        // Its own thread and runtime: callers may be inside a runtime.
        std::thread::spawn(move || -> Result<()> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let nats =
                        crate::nats::connect_retrying(&coordinator, &limits, patience).await?;
                    crate::deploy::register(&nats, &member, &limits).await?;
                    crate::deploy::wait_until_ready(
                        &worker,
                        &member.name,
                        Duration::from_secs(30),
                        reload,
                    )
                    .await?;
                    Ok(())
                })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("enrolling panicked"))??;
        Ok(cfg)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let config = self
            .deployment
            .lock()
            .expect("not poisoned")
            .server_configs()[i]
            .clone();
        let port = self.ports[i];
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
        self.children[i] = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.children[i]
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("nats-server exited at start ({status}); port {port} taken?");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("nats-server did not listen on port {port} within 15 s")
    }

    /// Kills every node (SIGKILL) and waits for them.
    pub fn kill(&mut self) {
        for i in 0..self.children.len() {
            self.kill_node(i);
        }
    }

    /// Kills node `i` of a cluster (SIGKILL).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on its port and store.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        self.kill_node(i);
        self.spawn(i)
    }

    /// Kills the server and starts it again on the same ports and stores.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        for i in 0..self.children.len() {
            self.spawn(i)?;
        }
        Ok(())
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
