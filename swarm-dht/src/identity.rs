//! A node's persistent identity: the ed25519 key that signs its records and
//! (from the network issue on) names it as a libp2p peer. It lives in the
//! node's data directory as 32 raw secret bytes, readable by its owner only.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use swarm_core::NodeKey;

use crate::error::DhtError;

/// File name of the key inside a data directory.
pub const KEY_FILE: &str = "node.key";

/// Loads the key from `dir`, creating a fresh random one (and the
/// directory) on first use. A corrupt key file is an error, never silently
/// replaced: replacing it would change the node's identity.
pub fn load_or_create_node_key(dir: &Path) -> Result<NodeKey, DhtError> {
    let path = dir.join(KEY_FILE);
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
            std::fs::create_dir_all(dir).map_err(|source| DhtError::Io {
                path: dir.to_owned(),
                source,
            })?;
            let mut seed = [0u8; 32];
            rand::rng().fill_bytes(&mut seed);
            write_private(&path, &seed)?;
            Ok(NodeKey::from_seed(seed))
        }
        Err(source) => Err(DhtError::Io { path, source }),
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
        let first = load_or_create_node_key(&dir).unwrap();
        let again = load_or_create_node_key(&dir).unwrap();
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
        let err = load_or_create_node_key(&dir).unwrap_err();
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
