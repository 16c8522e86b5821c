//! A node's persistent identity: the ed25519 key that signs its records and
//! names it as a libp2p peer. It lives in the node's data directory as 32
//! raw secret bytes, readable by its owner only.
//!
//! Two running nodes must never share an identity: their records would
//! overwrite each other and the swarm would see one node where there are
//! two. A running node therefore holds a lock on its key
//! ([`NodeIdentity::claim`]); another process reaching for the same
//! directory takes the next free key beside it (`node-1.key`,
//! `node-2.key`, ...), so several servers started on one machine with the
//! same data directory all get distinct identities, and each keeps its own
//! across restarts (a restarted server finds its old key free again).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use swarm_core::NodeKey;

use crate::error::DhtError;

/// File name of the key inside a data directory.
pub const KEY_FILE: &str = "node.key";

/// Reads the key at `path`, or creates a fresh random one there when
/// there is none. A corrupt key file is an error, never silently replaced:
/// replacing it would change the node's identity.
fn load_or_create_key_file(path: &Path) -> Result<NodeKey, DhtError> {
    let path = path.to_owned();
    match std::fs::read(&path) {
        Ok(bytes) => {
            let seed: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| DhtError::BadKeyFile {
                    path: path.clone(),
                    reason: format!("{} bytes, expected 32", bytes.len()),
                })?;
            Ok(NodeKey::from_seed(seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            rand::rng().fill_bytes(&mut seed);
            write_private(&path, &seed)?;
            Ok(NodeKey::from_seed(seed))
        }
        Err(source) => Err(DhtError::Io { path, source }),
    }
}

/// How many keys a data directory holds for nodes running at once.
pub const MAX_INSTANCES: u32 = 64;

/// A node key claimed by this process: the key, the file it was read from,
/// and a lock on it that lasts as long as this value (and ends with the
/// process, however it ends).
#[derive(Debug)]
pub struct NodeIdentity {
    key: NodeKey,
    path: PathBuf,
    /// Key files that other running nodes hold, skipped to get this one.
    skipped: Vec<PathBuf>,
    _lock: File,
}

impl NodeIdentity {
    /// Claims the first key in `dir` that no running node holds: `node.key`,
    /// else `node-1.key`, `node-2.key`, ...; each is created (with the
    /// directory) on first use. A corrupt key file is an error, never
    /// silently replaced.
    pub fn claim(dir: &Path) -> Result<Self, DhtError> {
        std::fs::create_dir_all(dir).map_err(|source| DhtError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let mut skipped = Vec::new();
        for instance in 0..MAX_INSTANCES {
            let name = match instance {
                0 => KEY_FILE.to_owned(),
                n => format!("node-{n}.key"),
            };
            let path = dir.join(&name);
            let lock_path = dir.join(format!("{name}.lock"));
            let Some(lock) = try_lock(&lock_path)? else {
                skipped.push(path);
                continue;
            };
            let key = load_or_create_key_file(&path)?;
            return Ok(Self {
                key,
                path,
                skipped,
                _lock: lock,
            });
        }
        Err(DhtError::Identity(format!(
            "all {MAX_INSTANCES} node keys in {} are held by running nodes; give this one its own --data-dir",
            dir.display()
        )))
    }

    /// The key.
    pub fn key(&self) -> &NodeKey {
        &self.key
    }

    /// The key's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Key files held by other running nodes that this claim passed over
    /// (empty when it got the directory's first key).
    pub fn skipped(&self) -> &[PathBuf] {
        &self.skipped
    }
}

/// Opens (creating) `path` and takes an exclusive lock on it without
/// waiting: `None` when another open file holds it.
fn try_lock(path: &Path) -> Result<Option<File>, DhtError> {
    let io = |source| DhtError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(source)) => Err(io(source)),
    }
}

/// A fresh random key kept nowhere, for one-off clients.
pub fn ephemeral_node_key() -> NodeKey {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    NodeKey::from_seed(seed)
}

/// A private swarm's pre-shared key (libp2p pnet, the same file format as
/// IPFS's `swarm.key`). Every connection of a node holding it is encrypted
/// with it underneath Noise, so nodes without the key cannot even finish a
/// handshake with the swarm. QUIC cannot carry it: private swarms run on TCP.
#[derive(Clone, Copy)]
pub struct SwarmKey(libp2p::pnet::PreSharedKey);

impl SwarmKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(libp2p::pnet::PreSharedKey::new(bytes))
    }

    /// The key file's text (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits).
    pub fn to_file_text(&self) -> String {
        self.0.to_string()
    }

    /// Parses a key file's text.
    pub fn parse(text: &str) -> Result<Self, DhtError> {
        text.trim()
            .parse()
            .map(Self)
            .map_err(|e| DhtError::Identity(format!("not a swarm key ({e})")))
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Self, DhtError> {
        let text = std::fs::read_to_string(path).map_err(|source| DhtError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| DhtError::BadKeyFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Writes a new random key to `path`, readable by its owner only. An
    /// existing file is left alone and is an error.
    pub fn create(path: &Path) -> Result<Self, DhtError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| DhtError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let key = Self::generate();
        let mut text = key.to_file_text();
        text.push('\n');
        write_private(path, text.as_bytes())?;
        Ok(key)
    }

    /// A short public fingerprint, to check two nodes hold the same key
    /// without showing it.
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint().to_string()
    }

    pub(crate) fn psk(&self) -> libp2p::pnet::PreSharedKey {
        self.0
    }
}

impl std::fmt::Debug for SwarmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SwarmKey({})", self.fingerprint())
    }
}

/// Writes `bytes` to a new file only its owner can read, atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DhtError> {
    let io = |path: &PathBuf| {
        let path = path.clone();
        move |source| DhtError::Io { path, source }
    };
    if path.exists() {
        return Err(DhtError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; not overwriting it",
            ),
        });
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(&path.to_owned()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_and_then_reused() {
        let dir = std::env::temp_dir().join(format!("sherpa-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = NodeIdentity::claim(&dir).unwrap().key().clone();
        let again = NodeIdentity::claim(&dir).unwrap().key().clone();
        assert_eq!(first.public_key(), again.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.join(KEY_FILE), b"short").unwrap();
        let err = NodeIdentity::claim(&dir).unwrap_err();
        assert!(err.to_string().contains("expected 32"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn running_nodes_never_share_a_key_and_a_restart_gets_its_own_back() {
        let dir = std::env::temp_dir().join(format!("sherpa-claim-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Three nodes at once (flock locks are per open file, so one
        // process shows what separate processes see).
        let first = NodeIdentity::claim(&dir).unwrap();
        let second = NodeIdentity::claim(&dir).unwrap();
        let third = NodeIdentity::claim(&dir).unwrap();
        let ids = [&first, &second, &third].map(|i| i.key().public_key());
        assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
        assert_eq!(first.path(), dir.join(KEY_FILE));
        assert!(first.skipped().is_empty());
        assert_eq!(second.path(), dir.join("node-1.key"));
        assert_eq!(second.skipped(), [dir.join(KEY_FILE)]);
        assert_eq!(third.path(), dir.join("node-2.key"));
        // The second stops and starts again: it gets its own key back, not
        // the first's or the third's.
        drop(second);
        let again = NodeIdentity::claim(&dir).unwrap();
        assert_eq!(again.key().public_key(), ids[1]);
        // Everyone stopped: the next run is the first node again.
        drop((first, third, again));
        let alone = NodeIdentity::claim(&dir).unwrap();
        assert_eq!(alone.key().public_key(), ids[0]);
        // A corrupt key is an error, not a new identity.
        drop(alone);
        std::fs::write(dir.join(KEY_FILE), b"short").unwrap();
        let err = NodeIdentity::claim(&dir).unwrap_err();
        assert!(err.to_string().contains("expected 32"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn swarm_keys_round_trip_and_bad_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("sherpa-psk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("swarm.key");
        let key = SwarmKey::create(&path).unwrap();
        let again = SwarmKey::load(&path).unwrap();
        assert_eq!(key.fingerprint(), again.fingerprint());
        assert_ne!(key.fingerprint(), SwarmKey::generate().fingerprint());
        // Never overwritten.
        assert!(SwarmKey::create(&path).is_err());
        assert_eq!(
            SwarmKey::load(&path).unwrap().fingerprint(),
            key.fingerprint()
        );
        // The secret stays out of logs.
        assert!(!format!("{key:?}").contains(&key.to_file_text()[40..]));
        std::fs::write(&path, "/key/swarm/psk/1.0.0/\n/base16/\nzz").unwrap();
        let err = SwarmKey::load(&path).unwrap_err();
        assert!(err.to_string().contains("not a swarm key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
