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
    /// TLS for client connections (none: plain TCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// A JetStream cluster: one server per node (empty: a single server on
    /// `port`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<ClusterNode>,
    /// JetStream's `max_file_store` (e.g. `"1T"`). Every stream reserves its
    /// `max_bytes` against it; unset, nats-server takes 75% of the free
    /// disk at start, so a full disk refuses streams ("insufficient storage
    /// resources"). The local servers of tests and the demo set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file_store: Option<String>,
}

/// The server's TLS: its certificate and key, and the CA clients'
/// certificates must chain to when `verify_clients`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub verify_clients: bool,
    /// The client certificate and key this deployment's own tools present
    /// (`lockstep enroll`, `--deployment`), when clients are verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
}

/// One server of a cluster: its address (the deployment's host unless
/// given), its client port and its route port.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub port: u16,
    pub route_port: u16,
}

impl ClusterNode {
    /// Nodes `n1..=nN`: client ports `port + i`, route ports
    /// `route_port + i`, on `hosts[i]` where given (else the deployment's
    /// host).
    pub fn spread(n: usize, port: u16, route_port: u16, hosts: &[String]) -> Result<Vec<Self>> {
        anyhow::ensure!(
            (3..=9).contains(&n),
            "--cluster {n}: a JetStream cluster has 3 to 9 nodes (3 keep a quorum when one dies)"
        );
        anyhow::ensure!(
            hosts.is_empty() || hosts.len() == n,
            "--node-hosts names {} hosts for {n} nodes",
            hosts.len()
        );
        let last = |p: u16| p.checked_add(n as u16 - 1);
        anyhow::ensure!(
            last(port).is_some() && last(route_port).is_some(),
            "ports {port} and {route_port} leave no room for {n} nodes"
        );
        let (ports, routes) = (port..port + n as u16, route_port..route_port + n as u16);
        anyhow::ensure!(
            !ports.clone().any(|p| routes.contains(&p)),
            "the client ports ({port}..) and route ports ({route_port}..) overlap"
        );
        Ok((0..n)
            .map(|i| Self {
                name: format!("n{}", i + 1),
                host: hosts.get(i).cloned(),
                port: port + i as u16,
                route_port: route_port + i as u16,
            })
            .collect())
    }
}

pub struct Deployment {
    pub dir: PathBuf,
    pub file: DeploymentFile,
}

impl Deployment {
    /// Creates a deployment in `dir` with one coordinator identity
    /// (`coordinator`) and writes the server's configuration.
    pub fn init(dir: &Path, host: &str, port: u16, max_payload: Option<usize>) -> Result<Self> {
        if let Some(p) = max_payload {
            anyhow::ensure!(
                p >= MIN_MAX_PAYLOAD,
                "--max-payload {p} is too small: lockstep needs at least {MIN_MAX_PAYLOAD} bytes per message"
            );
        }
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
                tls: None,
                cluster: Vec::new(),
                max_file_store: None,
            },
        };
        d.enroll(Role::Coordinator, "coordinator", "lockstep")?;
        Ok(d)
    }

    /// Creates a deployment of a JetStream cluster, one server per node
    /// (`nats-server-<node>.conf` each; routes on loopback ports).
    pub fn init_cluster(
        dir: &Path,
        host: &str,
        nodes: Vec<ClusterNode>,
        max_payload: Option<usize>,
    ) -> Result<Self> {
        anyhow::ensure!(
            nodes.len() >= 3,
            "a JetStream cluster needs at least 3 nodes"
        );
        let mut d = Self::init(dir, host, nodes[0].port, max_payload)?;
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
                .map(|n| format!("nats://{}:{}", self.node_host(n), n.port))
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

    /// How `name` of `role` connects (its key file, and the deployment's
    /// TLS settings).
    pub fn connect_as(&self, role: Role, name: &str) -> ConnectConfig {
        let mut c = ConnectConfig::with_nkey(&self.url(), &self.key_path(role, name));
        if let Some(t) = &self.file.tls {
            c.tls_ca = Some(t.ca.clone());
            c.tls_cert = t.client_cert.clone();
            c.tls_key = t.client_key.clone();
        }
        c
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

    /// Where a node of the cluster listens.
    pub fn node_host<'a>(&'a self, node: &'a ClusterNode) -> &'a str {
        node.host.as_deref().unwrap_or(&self.file.host)
    }

    /// The configuration of node `i` of a cluster: its address and ports,
    /// its own store and pid file, routes to every other node, and the same
    /// users.
    pub fn node_config(&self, i: usize) -> String {
        let f = &self.file;
        let node = &f.cluster[i];
        let mut s = self.server_config();
        let own = format!("host: {:?}\nport: {}\n", f.host, f.port);
        s = s.replacen(
            &own,
            &format!(
                "host: {:?}\nport: {}\nserver_name: {:?}\n",
                self.node_host(node),
                node.port,
                node.name
            ),
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
            .map(|n| format!("\"nats-route://{}:{}\"", self.node_host(n), n.route_port))
            .collect();
        s += &format!(
            "cluster {{\n  name: \"lockstep\"\n  listen: \"{}:{}\"\n  routes: [{}]\n}}\n",
            self.node_host(node),
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
        if let Some(t) = &f.tls {
            s += &format!(
                "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {}\n}}\n",
                t.cert.display().to_string(),
                t.key.display().to_string(),
                t.ca.display().to_string(),
                t.verify_clients
            );
        }
        s += &format!(
            "jetstream {{\n  store_dir: {:?}\n",
            self.dir.join("store").display().to_string()
        );
        if let Some(m) = &f.max_file_store {
            s += &format!("  max_file_store: {m}\n");
        }
        s += "}\n";
        // One account holds every stream (JetStream on) and the
        // coordinators; each worker has an account of its own that imports
        // only the services it needs. A reply subject names a subject in
        // the requester's own account, so a worker cannot make the server
        // answer (and a stream store) onto anyone else's subjects.
        s += "accounts {\n  LOCKSTEP {\n    jetstream: enabled\n    users: [\n";
        for m in f.members.iter().filter(|m| m.role == Role::Coordinator) {
            s += &user_entry(m);
        }
        s += "    ]\n    exports: [\n";
        for m in f.members.iter().filter(|m| m.role == Role::Worker) {
            for (subject, stream) in worker_services(&m.name) {
                s += &format!(
                    "      {{ service: {subject:?}, accounts: [{:?}]{} }}\n",
                    worker_account(&m.name),
                    if stream {
                        ", response_type: \"stream\""
                    } else {
                        ""
                    }
                );
            }
        }
        s += "    ]\n  }\n";
        for m in f.members.iter().filter(|m| m.role == Role::Worker) {
            s += &format!("  {} {{\n    users: [\n", worker_account(&m.name));
            s += &user_entry(m);
            s += "    ]\n    imports: [\n";
            for (subject, _) in worker_services(&m.name) {
                s += &format!(
                    "      {{ service: {{ account: \"LOCKSTEP\", subject: {subject:?} }}, to: {:?} }}\n",
                    local_subject(&subject)
                );
            }
            s += "    ]\n  }\n";
        }
        s += "}\n";
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
pub async fn register(
    nats: &crate::nats::Nats,
    m: &Member,
    limits: &crate::store::StoreLimits,
) -> Result<Enrollment> {
    anyhow::ensure!(m.role == Role::Worker, "only workers are registered");
    let limits = &crate::nats::resolve_replicas(&nats.client, limits).await;
    // Its queue, and its own results and outputs streams within its quotas.
    crate::nats::ensure_worker_streams(&nats.js, &m.name, limits).await?;
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

/// Waits until a newly enrolled worker can log in and reach the jobs
/// stream through its account's imports (the stores must exist). nats-server
/// 2.15 wires a new account's imports only on the reload after the one that
/// adds it, so `reload` is called again while they are not wired yet.
pub async fn wait_until_ready(
    cfg: &ConnectConfig,
    name: &str,
    timeout: std::time::Duration,
    reload: impl Fn(),
) -> Result<()> {
    let t = std::time::Instant::now();
    // A reload takes a moment; a first try before it would log a refusal.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut reloaded = std::time::Instant::now();
    loop {
        let options = cfg.options_once().await?;
        let connected = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            options.connect(cfg.urls()),
        )
        .await;
        if let Ok(Ok(c)) = connected {
            let js = async_nats::jetstream::with_prefix(c.clone(), WORKER_API_PREFIX);
            let queue = async {
                js.get_stream_no_info(JOBS_STREAM)
                    .await?
                    .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                        &worker_consumer(name),
                    )
                    .await
            };
            let wired = tokio::time::timeout(std::time::Duration::from_secs(2), queue)
                .await
                .is_ok_and(|r| r.is_ok());
            let _ = c.drain().await;
            if wired {
                return Ok(());
            }
            if reloaded.elapsed() > std::time::Duration::from_secs(1) {
                reload();
                reloaded = std::time::Instant::now();
            }
        }
        if t.elapsed() > timeout {
            bail!("the server did not take the new worker within {timeout:?} (was its configuration reloaded?)")
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// What a worker's account calls an imported subject: the JetStream API
/// under [`WORKER_API_PREFIX`] (its own `$JS.API` answers "not enabled"),
/// everything else as it is.
pub fn local_subject(subject: &str) -> String {
    if let Some(rest) = subject.strip_prefix("$JS.API.") {
        format!("{WORKER_API_PREFIX}.{rest}")
    } else if subject.starts_with("$KV.") {
        // async-nats puts to a bucket under the API prefix of its context.
        format!("{WORKER_API_PREFIX}.{subject}")
    } else {
        subject.to_string()
    }
}

/// A worker's own account.
pub fn worker_account(name: &str) -> String {
    format!("W_{name}")
}

/// The services a worker's account imports from the LOCKSTEP account (the
/// subject, and whether it answers with a stream of messages).
fn worker_services(w: &str) -> Vec<(String, bool)> {
    let consumer = worker_consumer(w);
    let api = "$JS.API";
    // No stream info (subject names would reveal other workers' batches,
    // bundles, output digests and faults), and no consumer management: its
    // queue is made at enrollment (a worker that could create it could
    // make it a push consumer delivering anywhere).
    vec![
        (
            format!("{api}.CONSUMER.INFO.{JOBS_STREAM}.{consumer}"),
            false,
        ),
        (
            format!("{api}.CONSUMER.MSG.NEXT.{JOBS_STREAM}.{consumer}"),
            true,
        ),
        (format!("$JS.ACK.{JOBS_STREAM}.{consumer}.>"), false),
        (
            format!("{api}.DIRECT.GET.KV_{WORKERS_BUCKET}.$KV.{WORKERS_BUCKET}.{w}"),
            false,
        ),
        (format!("$KV.{WORKERS_BUCKET}.{w}"), false),
        (format!("{api}.DIRECT.GET.OBJ_{BLOBS_BUCKET}"), false),
        (format!("{api}.DIRECT.GET.OBJ_{BLOBS_BUCKET}.>"), false),
        (format!("{api}.STREAM.MSG.GET.OBJ_{BLOBS_BUCKET}"), false),
        (format!("{api}.DIRECT.GET.OBJ_{MODELS_BUCKET}"), false),
        (format!("{api}.DIRECT.GET.OBJ_{MODELS_BUCKET}.>"), false),
        (format!("{RESULT_SUBJECT_PREFIX}.*.{w}"), false),
        (format!("{OUTPUT_SUBJECT_PREFIX}.{w}.>"), false),
    ]
}

/// A member's entry in its account's `users`.
fn user_entry(m: &Member) -> String {
    let p = permissions(m);
    format!(
        "      # {:?} {} of {:?}\n      {{ nkey: {:?}, permissions: {{ publish: {{ allow: {} }}, subscribe: {{ allow: {} }} }} }}\n",
        m.name,
        match m.role {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
        },
        m.operator,
        m.public_key,
        list(&p.publish),
        list(&p.subscribe)
    )
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
        Role::Worker => Permissions {
            // What its account imports, and nothing else.
            publish: worker_services(&m.name)
                .into_iter()
                .map(|(subject, _)| local_subject(&subject))
                .collect(),
            subscribe: vec![inbox],
        },
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
        // A payload limit below what the protocol needs is refused, naming it.
        let small = tempfile::tempdir().unwrap();
        let Err(e) = Deployment::init(small.path(), "127.0.0.1", 4333, Some(6144)) else {
            panic!("a 6144-byte payload limit was accepted");
        };
        assert!(format!("{e}").contains("--max-payload 6144"), "{e}");
    }
}
