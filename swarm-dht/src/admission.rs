//! What a node agrees to store for others. Kademlia would keep any value
//! under any key; a Sherpa node keeps only the swarm's own entries:
//!
//! - a record under `sherpa/v1/<model>/peer/<peer id>` must be a server
//!   record for that model, signed by that peer, sane, and no older than
//!   the one already stored (so an old record replayed by anyone cannot
//!   replace a newer one). An expired one is kept only as a withdrawal
//!   replacing an older record;
//! - provider entries only under `sherpa/v1/` keys (Kademlia itself checks
//!   that a provider announces only itself).

use libp2p::kad::RecordKey;
use libp2p::PeerId;
use swarm_core::{codec, CoreError, ModelId, ServerInfo, SignedRecord};

use crate::keys::peer_id_of;

/// Prefix of every key the swarm uses.
pub const KEY_PREFIX: &str = "sherpa/v1/";

/// Why a record or provider entry was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The key is not one of the swarm's.
    ForeignKey,
    /// The value is not a valid record for the key.
    BadRecord(String),
    /// A newer record for the key is already stored.
    Stale,
}

/// The model and peer a server record key names.
pub fn parse_server_record_key(key: &RecordKey) -> Option<(ModelId, PeerId)> {
    let text = std::str::from_utf8(key.as_ref()).ok()?;
    let rest = text.strip_prefix(KEY_PREFIX)?;
    let (model, peer) = rest.rsplit_once("/peer/")?;
    Some((ModelId::new(model).ok()?, peer.parse().ok()?))
}

/// Decides whether to store `value` under `key`, given what is stored
/// there now.
pub fn admit_record(
    key: &RecordKey,
    value: &[u8],
    stored: Option<&[u8]>,
    now_ms: u64,
) -> Result<(), Refusal> {
    let (model, peer) = parse_server_record_key(key).ok_or(Refusal::ForeignKey)?;
    let bad = |e: &dyn std::fmt::Display| Refusal::BadRecord(e.to_string());
    let record = SignedRecord::from_bytes(value).map_err(|e| bad(&e))?;
    let info: ServerInfo = codec::decode(&record.body).map_err(|e| bad(&e))?;
    if peer_id_of(&info.public_key).map_err(|e| bad(&e))? != peer {
        return Err(Refusal::BadRecord(
            "signed by another peer than its key names".into(),
        ));
    }
    if info.model != model {
        return Err(Refusal::BadRecord(
            "for another model than its key names".into(),
        ));
    }
    let expired = match record.verify(Some(&info.public_key), now_ms) {
        Ok(_) => false,
        Err(CoreError::ExpiredRecord { .. }) => true,
        Err(e) => return Err(bad(&e)),
    };
    let stored_issued = stored
        .and_then(|bytes| SignedRecord::from_bytes(bytes).ok())
        .and_then(|r| codec::decode::<ServerInfo>(&r.body).ok())
        .map(|i| i.issued_at_ms);
    match stored_issued {
        Some(at) if info.issued_at_ms < at => Err(Refusal::Stale),
        // A withdrawal only replaces something.
        None if expired => Err(Refusal::Stale),
        _ => Ok(()),
    }
}

/// Decides whether to keep a provider entry under `key`.
pub fn admit_provider(key: &RecordKey) -> Result<(), Refusal> {
    if key.as_ref().starts_with(KEY_PREFIX.as_bytes()) {
        Ok(())
    } else {
        Err(Refusal::ForeignKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{keypair, model_key, server_record_key};
    use swarm_core::{BlockRange, NodeKey};

    const NOW: u64 = 1_800_000_000_000;

    fn signed(key: &NodeKey, model: &str, issued: u64, ttl: u64) -> Vec<u8> {
        let mut info = ServerInfo::new(
            key.public_key(),
            ModelId::new(model).unwrap(),
            BlockRange::new(0, 4).unwrap(),
            30,
        );
        info.issued_at_ms = issued;
        info.expires_at_ms = issued + ttl;
        key.sign(&info).unwrap().to_bytes().unwrap()
    }

    #[test]
    fn only_the_named_peers_fresh_records_are_kept() {
        let key = NodeKey::from_seed([1; 32]);
        let other = NodeKey::from_seed([2; 32]);
        let peer = keypair(&key).unwrap().public().to_peer_id();
        let model = ModelId::new("m").unwrap();
        let at = server_record_key(&model, &peer);
        assert_eq!(parse_server_record_key(&at), Some((model.clone(), peer)));

        let fresh = signed(&key, "m", NOW, 60_000);
        assert_eq!(admit_record(&at, &fresh, None, NOW), Ok(()));
        // Another key's record under this peer's key.
        let forged = signed(&other, "m", NOW, 60_000);
        assert!(matches!(
            admit_record(&at, &forged, None, NOW),
            Err(Refusal::BadRecord(_))
        ));
        // Another model's record.
        let wrong_model = signed(&key, "n", NOW, 60_000);
        assert!(matches!(
            admit_record(&at, &wrong_model, None, NOW),
            Err(Refusal::BadRecord(_))
        ));
        // Tampered bytes.
        let mut tampered = fresh.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            admit_record(&at, &tampered, None, NOW),
            Err(Refusal::BadRecord(_))
        ));
        assert!(matches!(
            admit_record(&at, b"garbage", None, NOW),
            Err(Refusal::BadRecord(_))
        ));
        // Foreign keys.
        let foreign = RecordKey::new(&"free-storage");
        assert_eq!(
            admit_record(&foreign, &fresh, None, NOW),
            Err(Refusal::ForeignKey)
        );
        assert_eq!(
            admit_record(&model_key(&model), &fresh, None, NOW),
            Err(Refusal::ForeignKey)
        );
        // An older record replayed over a newer one.
        let newer = signed(&key, "m", NOW + 1000, 60_000);
        assert_eq!(
            admit_record(&at, &fresh, Some(&newer), NOW + 1000),
            Err(Refusal::Stale)
        );
        assert_eq!(admit_record(&at, &newer, Some(&fresh), NOW + 1000), Ok(()));
        // A withdrawal (expired, newer) replaces a live record, but is not
        // stored where there was nothing.
        let tombstone = signed(&key, "m", NOW + 2000, 1);
        assert_eq!(
            admit_record(&at, &tombstone, Some(&newer), NOW + 3000),
            Ok(())
        );
        assert_eq!(
            admit_record(&at, &tombstone, None, NOW + 3000),
            Err(Refusal::Stale)
        );
    }

    #[test]
    fn providers_only_under_swarm_keys() {
        let model = ModelId::new("m").unwrap();
        assert_eq!(admit_provider(&model_key(&model)), Ok(()));
        assert_eq!(
            admit_provider(&RecordKey::new(&"other/app")),
            Err(Refusal::ForeignKey)
        );
    }
}
