//! A deployment: the NATS server's configuration, every party's key, and
//! what each role may do on the bus (docs/PROTOCOL.md, "Identities and
//! permissions").
//!
//! A deployment is a folder an operator of the system keeps:
//!
//! ```text
//! deployment.json        the server address and every enrolled party
//! nats-server.conf       generated from it: nkey users with permissions
//! keys/coordinator-<name>.nk, keys/worker-<name>.nk   seeds (mode 0600)
//! store/                 JetStream's files (when the server runs here)
//! ```
//!
//! The server knows each party by its public key and grants it only its
//! role's permissions, so the rules hold whatever a client sends:
//! - a **worker** pulls only its own consumer, publishes only its own
//!   results (`lockstep.result.*.<name>`), outputs (`lockstep.out.<name>.>`)
//!   and heartbeat (`$KV.lockstep_workers.<name>`), reads inputs from the
//!   object store, and receives only on its own inbox. It cannot read other
//!   workers' jobs or any result, nor write plans, faults, enrollments or
//!   objects;
//! - a **coordinator** uses the JetStream API, publishes jobs, and writes
//!   plans, faults, enrollments and objects.
//!
//! Static nkey users (rather than JWT operator mode) keep a deployment to
//! one file lockstep writes and one signal to reload it; the choice is
//! discussed in PROTOCOL.md.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::auth::{inbox_prefix, ConnectConfig, Identity};
use crate::protocol::*;

pub const DEPLOYMENT_FILE: &str = "deployment.json";
pub const SERVER_CONFIG: &str = "nats-server.conf";

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Coordinator,
    Worker,
}

/// An enrolled party.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub role: Role,
    /// Who runs it: replicas of a job go to workers of distinct operators.
    pub operator: String,
    pub public_key: String,
}

/// `deployment.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeploymentFile {
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub max_payload: Option<usize>,
    pub members: Vec<Member>,
    /// A JetStream cluster: one server per node (empty: a single server on
    /// `port`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<ClusterNode>,
}

/// One server of a cluster: its client port and its route port.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    pub port: u16,
    pub route_port: u16,
}

pub struct Deployment {
    pub dir: PathBuf,
    pub file: DeploymentFile,
}

impl Deployment {
    /// Creates a deployment in `dir` with one coordinator identity
    /// (`coordinator`) and writes the server's configuration.
    pub fn init(dir: &Path, host: &str, port: u16, max_payload: Option<usize>) -> Result<Self> {
        if dir.join(DEPLOYMENT_FILE).exists() {
            bail!(
                "{} already holds a deployment ({DEPLOYMENT_FILE})",
                dir.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut d = Self {
            dir: dir.into(),
            file: DeploymentFile {
                host: host.into(),
                port,
                max_payload,
                members: Vec::new(),
                cluster: Vec::new(),
            },
        };
        d.enroll(Role::Coordinator, "coordinator", "lockstep")?;
        Ok(d)
    }

    /// Creates a deployment of a JetStream cluster, one server per node
    /// (`nats-server-<node>.conf` each; routes on loopback ports).
    pub fn init_cluster(dir: &Path, host: &str, nodes: Vec<ClusterNode>) -> Result<Self> {
        anyhow::ensure!(
            nodes.len() >= 3,
            "a JetStream cluster needs at least 3 nodes"
        );
        let mut d = Self::init(dir, host, nodes[0].port, None)?;
        d.file.cluster = nodes;
        d.save()?;
        Ok(d)
    }

    /// The configuration file of each server: one, or one per node.
    pub fn server_configs(&self) -> Vec<PathBuf> {
        if self.file.cluster.is_empty() {
            vec![self.dir.join(SERVER_CONFIG)]
        } else {
            self.file
                .cluster
                .iter()
                .map(|n| self.dir.join(format!("nats-server-{}.conf", n.name)))
                .collect()
        }
    }

    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(DEPLOYMENT_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no deployment at {} (create one with `lockstep deploy init {}`)",
                dir.display(),
                dir.display()
            )
        })?;
        let file = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid deployment file", path.display()))?;
        Ok(Self {
            dir: dir.into(),
            file,
        })
    }

    /// The server's URL; for a cluster, every node's, comma-separated.
    pub fn url(&self) -> String {
        if self.file.cluster.is_empty() {
            format!("nats://{}:{}", self.file.host, self.file.port)
        } else {
            let urls: Vec<String> = self
                .file
                .cluster
                .iter()
                .map(|n| format!("nats://{}:{}", self.file.host, n.port))
                .collect();
            urls.join(",")
        }
    }

    pub fn key_path(&self, role: Role, name: &str) -> PathBuf {
        let role = match role {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
        };
        self.dir.join("keys").join(format!("{role}-{name}.nk"))
    }

    pub fn member(&self, role: Role, name: &str) -> Option<&Member> {
        self.file
            .members
            .iter()
            .find(|m| m.role == role && m.name == name)
    }

    /// How `name` of `role` connects (its key file).
    pub fn connect_as(&self, role: Role, name: &str) -> ConnectConfig {
        ConnectConfig::with_nkey(&self.url(), &self.key_path(role, name))
    }

    /// How the deployment's own coordinator connects.
    pub fn coordinator(&self) -> ConnectConfig {
        self.connect_as(Role::Coordinator, "coordinator")
    }

    /// Enrolls a party: a new key (or the existing one, if `name` is
    /// already enrolled in this role under the same operator), saved under
    /// `keys/`, and the server configuration rewritten. Returns the member.
    pub fn enroll(&mut self, role: Role, name: &str, operator: &str) -> Result<Member> {
        anyhow::ensure!(
            valid_token(name),
            "name {} must be 1-64 characters of A-Z a-z 0-9 _ -",
            quote(name)
        );
        anyhow::ensure!(
            !operator.is_empty() && operator.len() <= 128 && !operator.contains(char::is_control),
            "operator {} must be 1-128 printable characters",
            quote(operator)
        );
        if let Some(m) = self.member(role, name) {
            anyhow::ensure!(
                m.operator == operator,
                "{} is already enrolled under operator {}",
                quote(name),
                quote(&m.operator)
            );
            return Ok(m.clone());
        }
        let id = Identity::generate();
        id.save(&self.key_path(role, name))?;
        let m = Member {
            name: name.into(),
            role,
            operator: operator.into(),
            public_key: id.public_key(),
        };
        self.file.members.push(m.clone());
        self.save()?;
        Ok(m)
    }

    /// Writes `deployment.json` and `nats-server.conf`.
    pub fn save(&self) -> Result<()> {
        let write = |name: &str, text: String| -> Result<()> {
            let path = self.dir.join(name);
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .with_context(|| format!("cannot write {}", path.display()))
        };
        write(
            DEPLOYMENT_FILE,
            serde_json::to_string_pretty(&self.file)? + "\n",
        )?;
        if self.file.cluster.is_empty() {
            return write(SERVER_CONFIG, self.server_config());
        }
        for i in 0..self.file.cluster.len() {
            let name = format!("nats-server-{}.conf", self.file.cluster[i].name);
            write(&name, self.node_config(i))?;
        }
        Ok(())
    }

    /// The configuration of node `i` of a cluster: its ports, its own store
    /// and pid file, routes to every other node, and the same users.
    pub fn node_config(&self, i: usize) -> String {
        let f = &self.file;
        let node = &f.cluster[i];
        let mut s = self.server_config();
        let own_port = format!("port: {}\n", f.port);
        s = s.replacen(
            &own_port,
            &format!("port: {}\nserver_name: {:?}\n", node.port, node.name),
            1,
        );
        s = s.replace(
            &format!("{:?}", self.pid_file().display().to_string()),
            &format!(
                "{:?}",
                self.dir
                    .join(format!("nats-server-{}.pid", node.name))
                    .display()
                    .to_string()
            ),
        );
        s = s.replace(
            &format!("{:?}", self.dir.join("store").display().to_string()),
            &format!(
                "{:?}",
                self.dir
                    .join(format!("store-{}", node.name))
                    .display()
                    .to_string()
            ),
        );
        let routes: Vec<String> = f
            .cluster
            .iter()
            .filter(|n| n.name != node.name)
            .map(|n| format!("\"nats-route://{}:{}\"", f.host, n.route_port))
            .collect();
        s += &format!(
            "cluster {{\n  name: \"lockstep\"\n  listen: \"{}:{}\"\n  routes: [{}]\n}}\n",
            f.host,
            node.route_port,
            routes.join(", ")
        );
        s
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("nats-server.pid")
    }

    /// The nats-server configuration: listen address, JetStream, and one
    /// nkey user per member with its role's permissions.
    pub fn server_config(&self) -> String {
        let f = &self.file;
        let mut s = String::from(
            "# Generated by lockstep from deployment.json: edit that, or use\n\
             # `lockstep enroll`, and reload the server (SIGHUP).\n",
        );
        s += &format!("host: {:?}\nport: {}\n", f.host, f.port);
        if let Some(p) = f.max_payload {
            s += &format!("max_payload: {p}\n");
        }
        s += &format!("pid_file: {:?}\n", self.pid_file().display().to_string());
        s += &format!(
            "jetstream {{\n  store_dir: {:?}\n}}\n",
            self.dir.join("store").display().to_string()
        );
        s += "authorization {\n  users = [\n";
        for m in &f.members {
            let p = permissions(m);
            s += &format!(
                "    # {:?} {} of {:?}\n    {{ nkey: {:?}, permissions: {{ publish: {{ allow: {} }}, subscribe: {{ allow: {} }} }} }}\n",
                m.name,
                match m.role {
                    Role::Coordinator => "coordinator",
                    Role::Worker => "worker",
                },
                m.operator,
                m.public_key,
                list(&p.publish),
                list(&p.subscribe)
            );
        }
        s += "  ]\n}\n";
        s
    }

    /// Asks a server running from this deployment (its pid file) to reload
    /// the configuration; false when none is running here.
    pub fn reload_server(&self) -> bool {
        let files = if self.file.cluster.is_empty() {
            vec![self.pid_file()]
        } else {
            self.file
                .cluster
                .iter()
                .map(|n| self.dir.join(format!("nats-server-{}.pid", n.name)))
                .collect()
        };
        let mut any = false;
        for file in files {
            let Some(pid) = std::fs::read_to_string(file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: a signal to a process id; no memory is involved.
            any |= unsafe { libc::kill(pid, libc::SIGHUP) == 0 };
        }
        any
    }
}

/// Writes a member's enrollment to the registry (KV `lockstep_enrolled`).
/// Enrolling the same key again keeps its state: it does not clear a
/// quarantine (`lockstep workers clear` does).
pub async fn register(nats: &crate::nats::Nats, m: &Member) -> Result<Enrollment> {
    anyhow::ensure!(m.role == Role::Worker, "only workers are registered");
    let existing = crate::nats::enrollments(nats).await?.remove(&m.name);
    let e = match existing {
        Some(e) if e.public_key == m.public_key && e.operator == m.operator => return Ok(e),
        _ => Enrollment {
            name: m.name.clone(),
            operator: m.operator.clone(),
            public_key: m.public_key.clone(),
            state: EnrollmentState::Active,
            enrolled_ms: now_ms(),
            reason: None,
        },
    };
    crate::nats::put_enrollment(nats, &e).await?;
    Ok(e)
}

/// Waits until the server accepts this identity (a reload takes effect).
pub async fn wait_until_accepted(cfg: &ConnectConfig, timeout: std::time::Duration) -> Result<()> {
    let t = std::time::Instant::now();
    // A reload takes a moment; a first try before it would log a refusal.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    loop {
        let options = cfg.options_once().await?;
        match tokio::time::timeout(
            std::time::Duration::from_secs(2),
            options.connect(cfg.urls()),
        )
        .await
        {
            Ok(Ok(c)) => {
                let _ = c.drain().await;
                return Ok(());
            }
            _ if t.elapsed() > timeout => {
                bail!("the server did not accept the new key within {timeout:?}")
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Subjects one member may publish and subscribe to.
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The least each role needs (see the module docs).
pub fn permissions(m: &Member) -> Permissions {
    let inbox = format!("{}.>", inbox_prefix(&m.public_key));
    match m.role {
        Role::Coordinator => Permissions {
            publish: vec![
                "$JS.API.>".into(),
                "$JS.ACK.>".into(),
                "$JS.FC.>".into(),
                format!("{JOB_SUBJECT_PREFIX}.>"),
                "$KV.>".into(),
                "$O.>".into(),
                // `lockstep bench dispatch`'s raw JetStream baseline.
                "lockstep_bench.>".into(),
            ],
            subscribe: vec![inbox],
        },
        Role::Worker => {
            let w = &m.name;
            let consumer = worker_consumer(w);
            let api = "$JS.API";
            // Stream metadata (limits, sizes) is readable; contents are not.
            let mut publish: Vec<String> = crate::nats::STREAM_NAMES
                .iter()
                .map(|s| format!("{api}.STREAM.INFO.{s}"))
                .collect();
            publish.extend([
                format!("{api}.CONSUMER.INFO.{JOBS_STREAM}.{consumer}"),
                format!("{api}.CONSUMER.DELETE.{JOBS_STREAM}.{consumer}"),
                format!(
                    "{api}.CONSUMER.CREATE.{JOBS_STREAM}.{consumer}.{}",
                    worker_filter(w)
                ),
                format!("{api}.CONSUMER.MSG.NEXT.{JOBS_STREAM}.{consumer}"),
                format!("$JS.ACK.{JOBS_STREAM}.{consumer}.>"),
                // Its own heartbeat record, read and written.
                format!("{api}.DIRECT.GET.KV_{WORKERS_BUCKET}.$KV.{WORKERS_BUCKET}.{w}"),
                format!("$KV.{WORKERS_BUCKET}.{w}"),
                // Inputs: read only.
                format!("{api}.DIRECT.GET.OBJ_{BLOBS_BUCKET}"),
                format!("{api}.DIRECT.GET.OBJ_{BLOBS_BUCKET}.>"),
                format!("{api}.STREAM.MSG.GET.OBJ_{BLOBS_BUCKET}"),
                // Its answers, under its own name only.
                format!("{RESULT_SUBJECT_PREFIX}.*.{w}"),
                format!("{OUTPUT_SUBJECT_PREFIX}.{w}.>"),
            ]);
            Permissions {
                publish,
                subscribe: vec![inbox],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolling_writes_keys_and_a_config_with_each_role() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Deployment::init(dir.path(), "127.0.0.1", 4333, Some(65536)).unwrap();
        let w = d.enroll(Role::Worker, "gpu-1", "acme").unwrap();
        // Enrolling again is idempotent; another operator is refused.
        assert_eq!(d.enroll(Role::Worker, "gpu-1", "acme").unwrap(), w);
        assert!(d.enroll(Role::Worker, "gpu-1", "evil").is_err());
        assert!(d.enroll(Role::Worker, "bad.name", "acme").is_err());
        let id = Identity::load(&d.key_path(Role::Worker, "gpu-1")).unwrap();
        assert_eq!(id.public_key(), w.public_key);
        let again = Deployment::open(dir.path()).unwrap();
        assert_eq!(again.file.members.len(), 2);
        let conf = std::fs::read_to_string(dir.path().join(SERVER_CONFIG)).unwrap();
        assert!(conf.contains(&w.public_key));
        assert!(conf.contains("\"lockstep.result.*.gpu-1\""));
        assert!(conf.contains("max_payload: 65536"));
        assert!(!conf.contains("lockstep.result.>"), "{conf}");
        assert!(Deployment::init(dir.path(), "127.0.0.1", 1, None).is_err());
    }
}
