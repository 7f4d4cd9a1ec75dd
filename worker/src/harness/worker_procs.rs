//! `lockstep worker` processes, for the demo and the system tests: started
//! with a name, a backend and extra environment; SIGTERM, SIGKILL and wait.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use super::NatsServer;

/// `lockstep worker` processes (the demo's, and the tests'): when dropped,
/// each gets SIGTERM (it drains and exits), then SIGKILL after 5 s.
pub struct WorkerProcs {
    /// The `lockstep` executable to run.
    exe: std::path::PathBuf,
    procs: Vec<(String, Child)>,
}

impl WorkerProcs {
    pub fn new(exe: impl Into<std::path::PathBuf>) -> Self {
        Self {
            exe: exe.into(),
            procs: Vec::new(),
        }
    }

    /// Enrolls `name` on the server (its own operator, `op-<name>`) and
    /// starts `lockstep worker --nats URL --nkey KEY --name NAME --backend
    /// BACKEND --threads 1 ARGS…` with extra environment.
    pub fn spawn(
        &mut self,
        server: &NatsServer,
        name: &str,
        backend: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        self.spawn_as(server, name, &format!("op-{name}"), backend, args, env)
    }

    /// [`WorkerProcs::spawn`], enrolled under `operator`.
    pub fn spawn_as(
        &mut self,
        server: &NatsServer,
        name: &str,
        operator: &str,
        backend: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let cfg = server.enroll(name, operator)?;
        let key = cfg.nkey.expect("enrolled workers have a key");
        let mut tls = Vec::new();
        for (flag, path) in [
            ("--tls-ca", &cfg.tls_ca),
            ("--tls-cert", &cfg.tls_cert),
            ("--tls-key", &cfg.tls_key),
        ] {
            if let Some(p) = path {
                tls.push(std::ffi::OsString::from(flag));
                tls.push(p.clone().into_os_string());
            }
        }
        let child = Command::new(&self.exe)
            .args(["worker", "--nats", &cfg.url, "--nkey"])
            .arg(&key)
            .args(&tls)
            .args(["--name", name, "--backend", backend])
            // One thread unless the caller says otherwise.
            .args(if args.contains(&"--threads") {
                &[][..]
            } else {
                &["--threads", "1"][..]
            })
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start worker {name}"))?;
        // Starting a name again (a restart after `kill`) replaces the old entry.
        self.procs.retain_mut(|(n, c)| {
            n != name || {
                let _ = c.kill();
                let _ = c.wait();
                false
            }
        });
        self.procs.push((name.to_string(), child));
        Ok(())
    }

    fn child(&mut self, name: &str) -> &mut Child {
        &mut self
            .procs
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("a worker of that name")
            .1
    }

    /// Process ids of every worker started.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|(_, c)| c.id()).collect()
    }

    /// SIGTERM: the worker drains and exits by itself.
    pub fn terminate(&mut self, name: &str) {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child(name).id() as i32, libc::SIGTERM) };
    }

    /// SIGKILL, and wait for the process: no chance to drain.
    pub fn kill(&mut self, name: &str) {
        let c = self.child(name);
        let _ = c.kill();
        let _ = c.wait();
    }

    pub fn is_running(&mut self, name: &str) -> bool {
        self.child(name).try_wait().ok().flatten().is_none()
    }

    /// Waits up to `timeout` for a worker to exit; its status if it did.
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child(name);
        let t = std::time::Instant::now();
        while t.elapsed() < timeout {
            if let Some(s) = c.try_wait().ok().flatten() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for WorkerProcs {
    fn drop(&mut self) {
        let names: Vec<String> = self.procs.iter().map(|(n, _)| n.clone()).collect();
        for n in &names {
            self.terminate(n);
        }
        for n in &names {
            self.wait_exit(n, Duration::from_secs(5));
            self.kill(n);
        }
    }
}
