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

/// Writes `bytes` to a new file only its owner can read, atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DhtError> {
    let io = |path: &PathBuf| {
        let path = path.clone();
        move |source| DhtError::Io { path, source }
    };
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
}
