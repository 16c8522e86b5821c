//! Signed, expiring announcements of what a server hosts.
//!
//! A server signs the exact bytes of its [`ServerInfo`] with its ed25519 node
//! key. Whoever receives a [`SignedRecord`] checks the signature, that the
//! key is the one of the peer it came from (the network layer derives the
//! peer id from [`ServerInfo::public_key`]), that it has not expired, and
//! that its fields are sane. Only then is it a [`VerifiedRecord`].

use bincode::{Decode, Encode};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::codec;
use crate::hardware::HardwareInfo;
use crate::{BlockRange, CoreError, ModelId};

/// Version of the record format.
/// - 2: `sessions` (open sessions when signed).
/// - 3: `block_digests` (weight identity of each hosted block) and
///   `places_itself`.
pub const RECORD_VERSION: u16 = 3;

/// Longest a record may live, in milliseconds: a dead server must vanish
/// from lookups within minutes.
pub const MAX_RECORD_TTL_MS: u64 = 10 * 60 * 1000;

/// How far in the future a record's issue time may be (clock skew), in ms.
pub const MAX_CLOCK_SKEW_MS: u64 = 60 * 1000;

/// Most blocks a model may have in a record (the largest open models have
/// under 200).
pub const MAX_MODEL_BLOCKS: u32 = 4096;

/// Longest public name, in bytes.
pub const MAX_PUBLIC_NAME: usize = 64;

/// A node's long-lived ed25519 identity.
#[derive(Clone)]
pub struct NodeKey(SigningKey);

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "NodeKey({})", hex(&self.public_key()))
    }
}

impl NodeKey {
    /// The key with this 32-byte secret seed (from a key file, or fresh
    /// random bytes from the caller's rng).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// The secret seed, to store in the node's key file.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public key, from which the network derives the peer id.
    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Signs `info` as it will travel.
    pub fn sign(&self, info: &ServerInfo) -> Result<SignedRecord, CoreError> {
        if info.public_key != self.public_key() {
            return Err(CoreError::BadRecord(
                "the record names another key than the one signing it".into(),
            ));
        }
        let body = codec::encode(info)?;
        let signature = self.0.sign(&body).to_bytes();
        Ok(SignedRecord { body, signature })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a server announces about itself.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct ServerInfo {
    /// [`RECORD_VERSION`] of the writer.
    pub record_version: u16,
    /// The server's ed25519 public key.
    pub public_key: [u8; 32],
    /// The model whose blocks it hosts.
    pub model: ModelId,
    /// The blocks it hosts.
    pub blocks: BlockRange,
    /// How many blocks the whole model has, so a client can tell which
    /// blocks still lack a host.
    pub model_blocks: u32,
    /// The SHA-256 digest of each hosted block's tensors (names, types,
    /// shapes, bytes), in block order; empty when the server does not say.
    /// A client routes only through blocks whose digests match its own
    /// copy of the model.
    pub block_digests: Vec<[u8; 32]>,
    /// Whether the server chose its blocks and may move to others when
    /// blocks lose their host (a server given its span never moves).
    pub places_itself: bool,
    /// Measured compute throughput: blocks x tokens per second for one
    /// token at a time (so a span's per-token time is `blocks / throughput`).
    pub throughput: f32,
    /// Tokens of KV cache it can still give new sessions.
    pub cache_tokens_free: u64,
    /// Sessions it was running when it signed this record.
    pub sessions: u32,
    /// Self-measured upload bandwidth, bytes per second.
    pub upload_bps: u64,
    /// Self-measured download bandwidth, bytes per second.
    pub download_bps: u64,
    /// Memory, cores and GPU.
    pub hardware: HardwareInfo,
    /// Name shown to people ("User45"); not unique, not trusted.
    pub public_name: String,
    /// Software version, e.g. "sherpa-swarm 0.1.0".
    pub software_version: String,
    /// Wire protocol version it speaks ([`crate::codec::WIRE_VERSION`]).
    pub protocol_version: u16,
    /// When it was signed, ms since the Unix epoch.
    pub issued_at_ms: u64,
    /// When it stops being valid, ms since the Unix epoch.
    pub expires_at_ms: u64,
}

impl ServerInfo {
    /// A record for `public_key` hosting `blocks` of a `model_blocks`-block
    /// `model`, with no measurements yet (zero throughput, bandwidth and
    /// cache) and no lifetime: set the figures you have, then sign with
    /// times filled in (`swarm_dht::announce_periodically` does).
    pub fn new(
        public_key: [u8; 32],
        model: ModelId,
        blocks: BlockRange,
        model_blocks: u32,
    ) -> Self {
        Self {
            record_version: RECORD_VERSION,
            public_key,
            model,
            blocks,
            model_blocks,
            block_digests: Vec::new(),
            places_itself: false,
            throughput: 0.0,
            cache_tokens_free: 0,
            sessions: 0,
            upload_bps: 0,
            download_bps: 0,
            hardware: HardwareInfo::default(),
            public_name: String::new(),
            software_version: concat!("sherpa-swarm ", env!("CARGO_PKG_VERSION")).to_owned(),
            protocol_version: crate::codec::WIRE_VERSION,
            issued_at_ms: 0,
            expires_at_ms: 0,
        }
    }

    fn check(&self, now_ms: u64) -> Result<(), CoreError> {
        let bad = |m: &str| Err(CoreError::BadRecord(m.to_owned()));
        if self.record_version != RECORD_VERSION {
            return Err(CoreError::UnsupportedVersion {
                what: "server record",
                got: self.record_version,
                supported: RECORD_VERSION,
            });
        }
        if self.blocks.end() > self.model_blocks || self.model_blocks > MAX_MODEL_BLOCKS {
            return bad("block range lies outside the model");
        }
        if !self.block_digests.is_empty() && self.block_digests.len() != self.blocks.len() as usize
        {
            return bad("block digests do not match the hosted blocks");
        }
        if !(self.throughput.is_finite() && self.throughput >= 0.0) {
            return bad("throughput is not a non-negative number");
        }
        if self.public_name.len() > MAX_PUBLIC_NAME
            || self.public_name.chars().any(char::is_control)
        {
            return bad("public name is too long or has control characters");
        }
        if self.software_version.len() > MAX_PUBLIC_NAME {
            return bad("software version is too long");
        }
        if self.expires_at_ms <= self.issued_at_ms
            || self.expires_at_ms - self.issued_at_ms > MAX_RECORD_TTL_MS
        {
            return bad("lifetime is empty or longer than the allowed maximum");
        }
        if self.issued_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return bad("issued in the future");
        }
        if now_ms >= self.expires_at_ms {
            return Err(CoreError::ExpiredRecord {
                expired_at_ms: self.expires_at_ms,
                now_ms,
            });
        }
        Ok(())
    }
}

/// A [`ServerInfo`] as signed bytes plus the signature: what travels.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SignedRecord {
    /// The encoded [`ServerInfo`], exactly as signed.
    pub body: Vec<u8>,
    /// ed25519 signature of `body`.
    pub signature: [u8; 64],
}

/// A record whose signature, publisher, expiry and fields were checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedRecord(ServerInfo);

impl VerifiedRecord {
    /// The checked contents.
    pub fn info(&self) -> &ServerInfo {
        &self.0
    }

    /// Gives up the contents.
    pub fn into_info(self) -> ServerInfo {
        self.0
    }
}

impl SignedRecord {
    /// The record as bytes (for the DHT).
    pub fn to_bytes(&self) -> Result<Vec<u8>, CoreError> {
        codec::encode(self)
    }

    /// Parses record bytes (nothing is checked yet; see [`Self::verify`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CoreError> {
        codec::decode(bytes)
    }

    /// Checks everything. `publisher` is the public key of the peer the
    /// record came from (or was stored under); `None` accepts any signer,
    /// for records read where the publisher is unknown.
    pub fn verify(
        &self,
        publisher: Option<&[u8; 32]>,
        now_ms: u64,
    ) -> Result<VerifiedRecord, CoreError> {
        let info: ServerInfo = codec::decode(&self.body)?;
        if let Some(expected) = publisher {
            if &info.public_key != expected {
                return Err(CoreError::WrongPublisher);
            }
        }
        let key =
            VerifyingKey::from_bytes(&info.public_key).map_err(|_| CoreError::BadSignature)?;
        key.verify(&self.body, &Signature::from_bytes(&self.signature))
            .map_err(|_| CoreError::BadSignature)?;
        info.check(now_ms)?;
        Ok(VerifiedRecord(info))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::GpuInfo;
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000_000;

    fn info(key: &NodeKey) -> ServerInfo {
        ServerInfo {
            record_version: RECORD_VERSION,
            public_key: key.public_key(),
            model: ModelId::new("smollm2-135m").unwrap(),
            blocks: BlockRange::new(10, 20).unwrap(),
            model_blocks: 30,
            block_digests: (10u8..20).map(|b| [b; 32]).collect(),
            places_itself: true,
            throughput: 812.5,
            cache_tokens_free: 4096,
            sessions: 3,
            upload_bps: 12_000_000,
            download_bps: 90_000_000,
            hardware: HardwareInfo {
                cpu_cores: 16,
                ram_free: 8 << 30,
                gpu: Some(GpuInfo {
                    name: "NVIDIA GeForce RTX 4090".into(),
                    compute_capability: (8, 9),
                    vram_total: 24 << 30,
                    vram_free: 20 << 30,
                }),
            },
            public_name: "User45".into(),
            software_version: "sherpa-swarm 0.1.0".into(),
            protocol_version: crate::codec::WIRE_VERSION,
            issued_at_ms: NOW,
            expires_at_ms: NOW + 120_000,
        }
    }

    #[test]
    fn a_signed_record_verifies_for_its_publisher() {
        let key = NodeKey::from_seed([7; 32]);
        let record = key.sign(&info(&key)).unwrap();
        let bytes = record.to_bytes().unwrap();
        let parsed = SignedRecord::from_bytes(&bytes).unwrap();
        let verified = parsed.verify(Some(&key.public_key()), NOW + 1).unwrap();
        assert_eq!(verified.info(), &info(&key));
        assert_eq!(
            verified.info().hardware.describe(),
            "NVIDIA GeForce RTX 4090 (8.9)"
        );
    }

    #[test]
    fn forged_records_are_rejected() {
        let key = NodeKey::from_seed([7; 32]);
        let other = NodeKey::from_seed([8; 32]);
        let record = key.sign(&info(&key)).unwrap();

        // Signed by another key than the one it names.
        let mut stolen = info(&key);
        stolen.public_key = key.public_key();
        let body = codec::encode(&stolen).unwrap();
        let forged = SignedRecord {
            signature: other.0.sign(&body).to_bytes(),
            body,
        };
        assert!(matches!(
            forged.verify(None, NOW),
            Err(CoreError::BadSignature)
        ));

        // Altered after signing.
        let mut altered = info(&key);
        altered.blocks = BlockRange::new(0, 30).unwrap();
        let tampered = SignedRecord {
            body: codec::encode(&altered).unwrap(),
            signature: record.signature,
        };
        assert!(matches!(
            tampered.verify(None, NOW),
            Err(CoreError::BadSignature)
        ));

        // Replayed under another peer.
        assert!(matches!(
            record.verify(Some(&other.public_key()), NOW),
            Err(CoreError::WrongPublisher)
        ));

        // Expired, and not yet valid.
        assert!(matches!(
            record.verify(None, NOW + 120_000),
            Err(CoreError::ExpiredRecord { .. })
        ));
        assert!(matches!(
            record.verify(None, NOW - 10 * 60_000),
            Err(CoreError::BadRecord(_))
        ));

        // A key cannot sign a record naming another key.
        assert!(other.sign(&info(&key)).is_err());
    }

    #[test]
    fn records_with_insane_fields_are_rejected() {
        let key = NodeKey::from_seed([3; 32]);
        let cases: [fn(&mut ServerInfo); 8] = [
            |i| i.throughput = f32::NAN,
            |i| i.block_digests.truncate(3),
            |i| i.model_blocks = 19,
            |i| i.model_blocks = MAX_MODEL_BLOCKS + 1,
            |i| i.public_name = "x".repeat(65),
            |i| i.public_name = "bell\u{7}".into(),
            |i| i.expires_at_ms = i.issued_at_ms + MAX_RECORD_TTL_MS + 1,
            |i| i.record_version = 99,
        ];
        for mutate in cases {
            let mut i = info(&key);
            mutate(&mut i);
            let record = key.sign(&i).unwrap();
            assert!(record.verify(None, NOW).is_err(), "{i:?}");
        }
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let key = NodeKey::from_seed([9; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&hex(&key.seed())));
    }

    proptest! {
        #[test]
        fn every_record_round_trips(
            seed in any::<[u8; 32]>(),
            start in 0u32..1000, len in 1u32..100, extra in 0u32..100,
            throughput in 0f32..1e6,
            cache in any::<u64>(), sessions in any::<u32>(), up in any::<u64>(), down in any::<u64>(),
            cores in any::<u16>(), ram in any::<u64>(),
            gpu in proptest::option::of(("[a-zA-Z0-9 ]{0,40}", any::<(u8, u8)>(), any::<u64>(), any::<u64>())),
            name in "[a-zA-Z0-9_ -]{0,64}",
            ttl in 1u64..MAX_RECORD_TTL_MS,
        ) {
            let key = NodeKey::from_seed(seed);
            let info = ServerInfo {
                record_version: RECORD_VERSION,
                public_key: key.public_key(),
                model: ModelId::new("m").unwrap(),
                blocks: BlockRange::new(start, start + len).unwrap(),
                model_blocks: start + len + extra,
                block_digests: (0..len).map(|b| [b as u8; 32]).collect(),
                places_itself: len % 2 == 0,
                throughput,
                cache_tokens_free: cache,
                sessions,
                upload_bps: up,
                download_bps: down,
                hardware: HardwareInfo {
                    cpu_cores: cores,
                    ram_free: ram,
                    gpu: gpu.map(|(name, cc, total, free)| GpuInfo { name, compute_capability: cc, vram_total: total, vram_free: free }),
                },
                public_name: name,
                software_version: "v".into(),
                protocol_version: 1,
                issued_at_ms: NOW,
                expires_at_ms: NOW + ttl,
            };
            let bytes = key.sign(&info).unwrap().to_bytes().unwrap();
            let verified = SignedRecord::from_bytes(&bytes).unwrap().verify(Some(&key.public_key()), NOW).unwrap();
            prop_assert_eq!(verified.into_info(), info);
        }

        #[test]
        fn garbage_never_verifies(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(record) = SignedRecord::from_bytes(&bytes) {
                prop_assert!(record.verify(None, NOW).is_err());
            }
        }
    }
}
