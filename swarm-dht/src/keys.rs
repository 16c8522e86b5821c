//! How things are named in the DHT, and how node keys map to peer ids.
//!
//! Kademlia stores one value per key at each node, so servers cannot share
//! one record key without overwriting each other. Instead:
//! - `sherpa/v1/<model>/block/<i>` is a *provider* key per block: every
//!   server hosting block `i` provides it;
//! - `sherpa/v1/<model>` is a provider key every server of the model
//!   provides, which tells a client the model's size from the first records
//!   it finds;
//! - `sherpa/v1/<model>/peer/<peer id>` holds that server's signed record.
//!
//! Why per block: a Kademlia node answers a provider query with at most
//! `k` = 20 providers, so one key per model would hide servers once a model
//! has more than 20. Per block, a key lists the replicas of that block,
//! which is what a route needs, and a model of any size is fully covered.

use libp2p::identity::{self, PublicKey};
use libp2p::kad::RecordKey;
use libp2p::PeerId;
use swarm_core::{ModelId, NodeKey};

use crate::error::DhtError;

/// Provider key under which all servers of `model` announce themselves.
pub fn model_key(model: &ModelId) -> RecordKey {
    RecordKey::new(&format!("sherpa/v1/{model}"))
}

/// Provider key of the servers hosting `block` of `model`.
pub fn block_key(model: &ModelId, block: u32) -> RecordKey {
    RecordKey::new(&format!("sherpa/v1/{model}/block/{block}"))
}

/// Key of the signed record of `peer` for `model`.
pub fn server_record_key(model: &ModelId, peer: &PeerId) -> RecordKey {
    RecordKey::new(&format!("sherpa/v1/{model}/peer/{peer}"))
}

/// The libp2p identity of a node key (the same ed25519 key).
pub fn keypair(key: &NodeKey) -> Result<identity::Keypair, DhtError> {
    let mut seed = key.seed();
    identity::Keypair::ed25519_from_bytes(&mut seed).map_err(|e| DhtError::Identity(e.to_string()))
}

/// The peer id of an ed25519 public key, as found in a server record.
pub fn peer_id_of(public_key: &[u8; 32]) -> Result<PeerId, DhtError> {
    let key = identity::ed25519::PublicKey::try_from_bytes(public_key)
        .map_err(|e| DhtError::Identity(e.to_string()))?;
    Ok(PeerId::from_public_key(&PublicKey::from(key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_key_and_peer_id_agree() {
        let key = NodeKey::from_seed([42; 32]);
        let libp2p_id = keypair(&key).unwrap().public().to_peer_id();
        assert_eq!(peer_id_of(&key.public_key()).unwrap(), libp2p_id);
        let other = NodeKey::from_seed([43; 32]);
        assert_ne!(peer_id_of(&other.public_key()).unwrap(), libp2p_id);
    }
}
