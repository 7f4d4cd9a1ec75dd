//! Identities, connections and signatures (docs/PROTOCOL.md, "Trust").
//!
//! Every worker and coordinator holds its own ed25519 key, as a NATS nkey
//! seed (`SU…`) in a file. The same key
//! - authenticates the connection: the server knows each public key and
//!   grants it only its role's permissions ([`crate::deploy`]);
//! - signs what that party asserts: a worker its results
//!   ([`result_signing_bytes`]), a coordinator its receipts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use nkeys::KeyPair;

use crate::protocol::quote;

/// A party's key pair, read from an nkey seed file.
pub struct Identity {
    key: KeyPair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.public_key())
    }
}

impl Identity {
    /// A fresh user key.
    pub fn generate() -> Self {
        Self {
            key: KeyPair::new_user(),
        }
    }

    /// Reads a seed file (one line `SU…`; blank lines and `#` comments, as
    /// in NATS credentials files, are skipped; so is a `.creds` file's JWT).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the key file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("key file {}", path.display()))
    }

    /// Parses a seed file's text (see [`Identity::load`]).
    pub fn parse(text: &str) -> Result<Self> {
        let seed = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("SU"))
            .context("no nkey user seed (a line starting with `SU`) in it")?;
        let key = KeyPair::from_seed(seed)
            .map_err(|e| anyhow::anyhow!("not a valid nkey user seed: {e}"))?;
        Ok(Self { key })
    }

    /// Writes the seed to `path`, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let seed = self.seed();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot write the key file {}", path.display()))?;
        writeln!(
            f,
            "# lockstep identity (NATS nkey user seed). Keep it secret.\n{seed}"
        )?;
        Ok(())
    }

    pub fn seed(&self) -> String {
        self.key
            .seed()
            .expect("a key pair made from a seed has one")
    }

    /// The public key (`U…`, 56 characters): what the server and the
    /// registry know this party by.
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// An ed25519 signature of `bytes`, base64.
    pub fn sign(&self, bytes: &[u8]) -> String {
        let sig = self.key.sign(bytes).expect("a key with a seed signs");
        base64::engine::general_purpose::STANDARD.encode(sig)
    }
}

/// Checks an ed25519 signature (base64) of `bytes` by `public_key` (`U…`).
/// Parsed keys are cached (a coordinator checks every result against a few
/// enrolled keys).
pub fn verify(public_key: &str, bytes: &[u8], signature: &str) -> Result<()> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static KEYS: Mutex<Option<HashMap<String, ed25519_dalek::VerifyingKey>>> = Mutex::new(None);
    let key = {
        let mut cache = KEYS.lock().unwrap_or_else(|p| p.into_inner());
        let cache = cache.get_or_insert_with(HashMap::new);
        match cache.get(public_key) {
            Some(k) => *k,
            None => {
                let (_, raw) = nkeys::from_public_key(public_key).map_err(|e| {
                    anyhow::anyhow!("not a valid public key {}: {e}", quote(public_key))
                })?;
                anyhow::ensure!(
                    public_key.starts_with('U'),
                    "{} is not a user key",
                    quote(public_key)
                );
                let k = ed25519_dalek::VerifyingKey::from_bytes(&raw).map_err(|e| {
                    anyhow::anyhow!("not a valid public key {}: {e}", quote(public_key))
                })?;
                if cache.len() >= 4096 {
                    cache.clear();
                }
                cache.insert(public_key.to_string(), k);
                k
            }
        }
    };
    // Results signed together share one signature of one root: remember
    // what verified, so the rest of a message costs a hash each.
    static VERIFIED: Mutex<Option<std::collections::HashSet<[u8; 32]>>> = Mutex::new(None);
    let fingerprint: [u8; 32] = {
        use sha3::Digest as _;
        let mut h = sha3::Sha3_256::new();
        for part in [public_key.as_bytes(), bytes, signature.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().into()
    };
    if VERIFIED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|v| v.contains(&fingerprint))
    {
        return Ok(());
    }
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .context("signature is not base64")?;
    let sig = ed25519_dalek::Signature::from_slice(&sig).context("not an ed25519 signature")?;
    use ed25519_dalek::Verifier as _;
    key.verify(bytes, &sig)
        .map_err(|_| anyhow::anyhow!("signature does not verify against {}", quote(public_key)))?;
    let mut verified = VERIFIED.lock().unwrap_or_else(|p| p.into_inner());
    let verified = verified.get_or_insert_with(Default::default);
    if verified.len() >= 1 << 16 {
        verified.clear();
    }
    verified.insert(fingerprint);
    Ok(())
}

/// The inbox prefix of a party: replies to its requests come to
/// `_INBOX_<public key>.>`, which only it may subscribe to.
pub fn inbox_prefix(public_key: &str) -> String {
    format!("_INBOX_{public_key}")
}

/// How to reach and log in to the NATS server: the URL, the identity (an
/// nkey seed file, or a NATS `.creds` file for operator-mode servers), and
/// TLS.
#[derive(Clone, Debug, Default)]
pub struct ConnectConfig {
    pub url: String,
    /// An nkey seed file (`lockstep enroll` writes these).
    pub nkey: Option<PathBuf>,
    /// A NATS credentials file (JWT and seed), for servers in operator mode.
    pub creds: Option<PathBuf>,
    /// CA certificate(s) (PEM) to trust for the server's TLS certificate;
    /// setting it requires TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl ConnectConfig {
    /// The server URLs: `url` may list several, comma-separated (the nodes
    /// of a cluster).
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// No identity: only servers without authorization accept it.
    pub fn anonymous(url: &str) -> Self {
        Self {
            url: url.into(),
            ..Default::default()
        }
    }

    pub fn with_nkey(url: &str, nkey: &Path) -> Self {
        Self {
            url: url.into(),
            nkey: Some(nkey.into()),
            ..Default::default()
        }
    }

    /// The identity this configuration logs in as (needed to sign).
    pub fn identity(&self) -> Result<Option<Identity>> {
        match (&self.nkey, &self.creds) {
            (Some(p), _) | (None, Some(p)) => Identity::load(p).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The async-nats options for this configuration (retrying the first
    /// connection until the server is there).
    pub async fn options(&self) -> Result<async_nats::ConnectOptions> {
        Ok(self.options_once().await?.retry_on_initial_connect())
    }

    /// The async-nats options for this configuration, without retrying the
    /// first connection: `connect` fails at once on a refused login.
    pub async fn options_once(&self) -> Result<async_nats::ConnectOptions> {
        let mut o = match &self.creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .with_context(|| format!("cannot read the credentials file {}", path.display()))?,
            None => async_nats::ConnectOptions::new(),
        }
        .name("lockstep")
        .connection_timeout(Duration::from_secs(5));
        if let Some(path) = &self.nkey {
            let id = Identity::load(path)?;
            o = o
                .nkey(id.seed())
                .custom_inbox_prefix(inbox_prefix(&id.public_key()));
        } else if let Some(Some(id)) = self.creds.as_ref().map(|p| Identity::load(p).ok()) {
            o = o.custom_inbox_prefix(inbox_prefix(&id.public_key()));
        }
        if let Some(ca) = &self.tls_ca {
            anyhow::ensure!(ca.exists(), "no CA file {}", ca.display());
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => o = o.add_client_certificate(c.clone(), k.clone()),
            (None, None) => {}
            _ => bail!("--tls-cert and --tls-key go together"),
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_signatures_bind_bytes() {
        let id = Identity::generate();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.nk");
        id.save(&path).unwrap();
        let back = Identity::load(&path).unwrap();
        assert_eq!(back.public_key(), id.public_key());
        assert!(back.public_key().starts_with('U') && back.public_key().len() == 56);
        let sig = id.sign(b"hello");
        verify(&id.public_key(), b"hello", &sig).unwrap();
        assert!(verify(&id.public_key(), b"hellO", &sig).is_err());
        let other = Identity::generate();
        assert!(verify(&other.public_key(), b"hello", &sig).is_err());
        assert!(verify(&id.public_key(), b"hello", "not base64!").is_err());
        assert!(verify("UNOTAKEY", b"hello", &sig).is_err());
        let e = Identity::parse("# nothing\n").err().unwrap().to_string();
        assert!(e.contains("no nkey user seed"), "{e}");
        assert!(Identity::parse("SUAAAA\n").is_err());
    }
}
