//! The deployment's administration commands: `lockstep deploy init`,
//! `lockstep enroll`, `lockstep workers [clear]` and `lockstep verify`.

use std::path::Path;

use anyhow::{Context, Result};

use crate::auth::ConnectConfig;
use crate::cli::ConnectArgs;
use crate::coordinator::receipt::{parse_receipts, verify_receipt};
use crate::deploy::{Deployment, Role};
use crate::protocol::*;

/// `lockstep deploy init DIR` (with `--cluster N`: one configuration per
/// node).
pub fn deploy_init(
    dir: &Path,
    host: &str,
    port: u16,
    max_payload: Option<usize>,
    tls: Option<crate::deploy::ServerTls>,
    cluster: Option<Vec<crate::deploy::ClusterNode>>,
) -> Result<()> {
    let mut d = match cluster {
        Some(nodes) => Deployment::init_cluster(dir, host, nodes, max_payload)?,
        None => Deployment::init(dir, host, port, max_payload)?,
    };
    if tls.is_some() {
        d.file.tls = tls;
        d.save()?;
    }
    println!("deployment created in {}", dir.display());
    let configs = d.server_configs();
    if d.file.cluster.is_empty() {
        println!("  server configuration: {}", configs[0].display());
    } else {
        println!(
            "  a JetStream cluster of {} nodes, every store with 3 copies:",
            configs.len()
        );
        for (node, config) in d.file.cluster.iter().zip(&configs) {
            println!(
                "    {}: clients on {}:{}, routes on {}  ({})",
                node.name,
                d.node_host(node),
                node.port,
                node.route_port,
                config.display()
            );
        }
    }
    println!(
        "  coordinator key:      {}",
        d.key_path(Role::Coordinator, "coordinator").display()
    );
    println!("next:");
    for config in &configs {
        println!(
            "  nats-server -c {}          # start the server (JetStream, authorization on)",
            config.display()
        );
    }
    println!(
        "  lockstep enroll worker NAME --operator ORG --deployment {}",
        dir.display()
    );
    println!(
        "  lockstep worker --name NAME --nkey {} --nats {}  # on the worker's machine",
        d.key_path(Role::Worker, "NAME").display(),
        d.url()
    );
    println!(
        "  lockstep submit --deployment {} batch.jsonl",
        dir.display()
    );
    Ok(())
}

/// `lockstep enroll worker NAME --operator ORG`.
pub fn enroll_worker(connect: &ConnectArgs, name: &str, operator: &str) -> Result<()> {
    let dir = connect
        .deployment
        .clone()
        .context("enrolling needs the deployment folder: --deployment DIR")?;
    let mut d = Deployment::open(&dir)?;
    let member = d.enroll(Role::Worker, name, operator)?;
    let key = d.key_path(Role::Worker, name);
    println!(
        "enrolled worker {} (operator {}), public key {}",
        quote(name),
        quote(operator),
        member.public_key
    );
    println!(
        "  its key: {}  (copy it to the worker's machine; keep it secret)",
        key.display()
    );
    if d.reload_server() {
        println!("  the server running from this deployment reloaded its configuration");
    } else {
        let configs: Vec<String> = d
            .server_configs()
            .iter()
            .map(|c| c.display().to_string())
            .collect();
        println!(
            "  no server runs from this deployment here: reload yours (SIGHUP) with the new {}",
            configs.join(", ")
        );
    }
    let worker = d.connect_as(Role::Worker, name);
    let coordinator = connect.coordinator()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        // A reload leaves JetStream unanswering for a moment.
        let limits = crate::store::StoreLimits::from_env()?;
        let nats =
            crate::nats::connect_retrying(&coordinator, &limits, std::time::Duration::from_secs(30))
                .await?;
        let e = crate::deploy::register(&nats, &member, &limits).await?;
        println!("  registered: state {:?}", e.state);
        crate::deploy::wait_until_ready(&worker, name, std::time::Duration::from_secs(15), || {
            d.reload_server();
        })
        .await
        .context("the server does not take the worker's key yet")?;
        println!("  the server takes its key");
        anyhow::Ok(())
    })
    .with_context(|| {
        format!(
            "{} is enrolled in {}, but not registered on the server; run this again once the server runs with the new configuration",
            quote(name),
            dir.display()
        )
    })
}

/// `lockstep workers`.
pub fn list_workers(cfg: &ConnectConfig, json: bool) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let nats = crate::nats::connect(cfg).await?;
        let enrolled = crate::nats::enrollments(&nats).await?;
        let live =
            crate::nats::live_workers_of(&nats, &enrolled, std::time::Duration::from_secs(5))
                .await?;
        let faults = fault_counts(&nats).await;
        let rows: Vec<serde_json::Value> = enrolled
            .values()
            .map(|e| {
                serde_json::json!({
                    "name": e.name,
                    "operator": e.operator,
                    "state": e.state,
                    "live": live.iter().any(|w| w.id == e.name),
                    "faults": faults.get(&e.name).copied().unwrap_or(0),
                    "reason": e.reason,
                    "public_key": e.public_key,
                })
            })
            .collect();
        if json {
            println!("{}", serde_json::Value::Array(rows));
            return Ok(());
        }
        println!(
            "{:<24} {:<16} {:<12} {:<5} {:>6}  reason",
            "worker", "operator", "state", "live", "faults"
        );
        for r in &rows {
            println!(
                "{:<24} {:<16} {:<12} {:<5} {:>6}  {}",
                r["name"].as_str().unwrap_or_default(),
                r["operator"].as_str().unwrap_or_default(),
                r["state"].as_str().unwrap_or_default(),
                if r["live"] == true { "yes" } else { "no" },
                r["faults"],
                r["reason"].as_str().unwrap_or("")
            );
        }
        anyhow::Ok(())
    })
}

async fn fault_counts(nats: &crate::nats::Nats) -> std::collections::BTreeMap<String, u64> {
    use futures::StreamExt;
    let mut out = std::collections::BTreeMap::new();
    if let Ok(mut keys) = nats.faults.keys().await {
        while let Some(Ok(k)) = keys.next().await {
            if let Some(w) = k.split('.').next() {
                *out.entry(w.to_string()).or_default() += 1;
            }
        }
    }
    out
}

/// `lockstep workers clear NAME`.
pub fn clear_worker(cfg: &ConnectConfig, name: &str) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let nats = crate::nats::connect(cfg).await?;
        let mut e = crate::nats::enrollments(&nats)
            .await?
            .remove(name)
            .with_context(|| format!("no enrolled worker {}", quote(name)))?;
        e.state = EnrollmentState::Active;
        e.reason = None;
        crate::nats::put_enrollment(&nats, &e).await?;
        println!("{} is active again", quote(name));
        anyhow::Ok(())
    })
}

/// `lockstep verify RECEIPTS`.
pub fn verify(
    path: &Path,
    deployment: Option<&Path>,
    coordinator_key: Option<&str>,
    self_consistent_only: bool,
) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let receipts = parse_receipts(&text)?;
    anyhow::ensure!(!receipts.is_empty(), "{} holds no receipts", path.display());
    let trust = deployment.map(Deployment::open).transpose()?;
    let mut bad = 0;
    for r in &receipts {
        let checked = verify_receipt(r, trust.as_ref()).and_then(|()| match coordinator_key {
            Some(k) if r.coordinator.public_key != k => Err(anyhow::anyhow!(
                "signed by coordinator {}, not the one trusted ({})",
                quote(&r.coordinator.public_key),
                quote(k)
            )),
            _ => Ok(()),
        });
        match checked {
            Ok(()) => println!(
                "ok    {} {} {:?} {} by {}",
                quote(&r.batch),
                quote(&r.job),
                r.verdict,
                r.output_digest,
                r.workers
                    .iter()
                    .map(|w| format!("{} ({})", quote(&w.worker), quote(&w.operator)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => {
                bad += 1;
                println!("FAIL  {} {}: {e:#}", quote(&r.batch), quote(&r.job));
            }
        }
    }
    anyhow::ensure!(
        bad == 0,
        "{bad} of {} receipts do not verify",
        receipts.len()
    );
    if trust.is_none() && coordinator_key.is_none() {
        println!(
            "{} receipts are consistent in themselves; no trust anchor was given",
            receipts.len()
        );
        anyhow::ensure!(
            self_consistent_only,
            "checked self-consistency only: without --deployment or --coordinator-key anyone can make receipts that pass (add --self-consistent-only if that is all you want)"
        );
        return Ok(());
    }
    println!("{} receipts verify", receipts.len());
    Ok(())
}
