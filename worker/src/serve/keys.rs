//! API keys of `lockstep serve`: bearer tokens handed to clients, stored
//! only as SHA3-256 digests in `<deployment>/api-keys.json`, each with its
//! own rate and concurrency limits. `lockstep keys add|list|revoke`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::RngCore;
use sha3::{Digest as _, Sha3_256};

/// One key as stored: never the key itself.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct KeyRecord {
    /// A short public handle (`key-…`), for listing and revoking.
    pub id: String,
    /// Who holds it (free text).
    pub name: String,
    /// SHA3-256 of the key, hex.
    pub sha3: String,
    pub created_unix: u64,
    #[serde(default)]
    pub revoked: bool,
    /// Requests allowed per minute (0: no limit).
    pub requests_per_minute: u32,
    /// Requests in flight at once (0: no limit).
    pub concurrency: u32,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct KeyFile {
    pub keys: Vec<KeyRecord>,
}

pub fn path(deployment: &Path) -> PathBuf {
    deployment.join("api-keys.json")
}

pub fn hash(key: &str) -> String {
    hex::encode(Sha3_256::digest(key.as_bytes()))
}

impl KeyFile {
    pub fn load(deployment: &Path) -> Result<Self> {
        let p = path(deployment);
        match std::fs::read_to_string(&p) {
            Ok(s) => serde_json::from_str(&s)
                .with_context(|| format!("{} is not a key file", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    pub fn save(&self, deployment: &Path) -> Result<()> {
        let p = path(deployment);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)? + "\n")
            .and_then(|_| std::fs::rename(&tmp, &p))
            .with_context(|| format!("cannot write {}", p.display()))
    }

    /// The live record of a presented key.
    pub fn find(&self, key: &str) -> Option<&KeyRecord> {
        let h = hash(key);
        self.keys.iter().find(|k| !k.revoked && k.sha3 == h)
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// Make a key; prints it once (only its digest is kept).
    ///
    /// Example: lockstep keys add --deployment ./dep --name alice --rpm 60 --concurrency 4
    Add {
        #[arg(long)]
        deployment: PathBuf,
        /// Who holds it.
        #[arg(long)]
        name: String,
        /// Requests per minute (0: no limit).
        #[arg(long, default_value_t = 120)]
        rpm: u32,
        /// Requests in flight at once (0: no limit).
        #[arg(long, default_value_t = 8)]
        concurrency: u32,
    },
    /// List keys (ids, holders, limits; never the keys).
    List {
        #[arg(long)]
        deployment: PathBuf,
    },
    /// Revoke a key by id; a running `lockstep serve` refuses it within a second.
    Revoke {
        #[arg(long)]
        deployment: PathBuf,
        id: String,
    },
}

pub fn run(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Add {
            deployment,
            name,
            rpm,
            concurrency,
        } => {
            let mut file = KeyFile::load(&deployment)?;
            let mut raw = [0u8; 24];
            rand::rng().fill_bytes(&mut raw);
            let key = format!("lsk-{}", hex::encode(raw));
            let mut idb = [0u8; 4];
            rand::rng().fill_bytes(&mut idb);
            let id = format!("key-{}", hex::encode(idb));
            file.keys.push(KeyRecord {
                id: id.clone(),
                name,
                sha3: hash(&key),
                created_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                revoked: false,
                requests_per_minute: rpm,
                concurrency,
            });
            file.save(&deployment)?;
            eprintln!("{id} added; the key is shown once:");
            println!("{key}");
            Ok(())
        }
        KeysCommand::List { deployment } => {
            let file = KeyFile::load(&deployment)?;
            if file.keys.is_empty() {
                println!(
                    "no keys (lockstep keys add --deployment {} --name …)",
                    deployment.display()
                );
            }
            for k in &file.keys {
                println!(
                    "{}  {:<16} rpm {:<5} concurrency {:<3}{}",
                    k.id,
                    k.name,
                    k.requests_per_minute,
                    k.concurrency,
                    if k.revoked { "  REVOKED" } else { "" }
                );
            }
            Ok(())
        }
        KeysCommand::Revoke { deployment, id } => {
            let mut file = KeyFile::load(&deployment)?;
            let Some(k) = file.keys.iter_mut().find(|k| k.id == id) else {
                bail!("no key {id} in {}", path(&deployment).display());
            };
            k.revoked = true;
            file.save(&deployment)?;
            println!("{id} revoked");
            Ok(())
        }
    }
}
