//! A server as a client sees it: what it announced plus what the client
//! measured itself.

use std::time::Duration;

use swarm_core::{BlockRange, HardwareInfo, ServerInfo};

/// A server's identity: its ed25519 public key (its peer id derives from it).
pub type ServerId = [u8; 32];

/// A server a client could use.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Its identity.
    pub id: ServerId,
    /// The name it shows people; not unique, not trusted.
    pub name: String,
    /// The blocks it hosts.
    pub blocks: BlockRange,
    /// Its memory, cores and GPU, as it reports them.
    pub hardware: HardwareInfo,
    /// Compute throughput in blocks x tokens per second (one token at a
    /// time), measured by the server at start-up.
    pub throughput: f64,
    /// Tokens of KV cache it can still give new sessions.
    pub cache_tokens_free: u64,
    /// Sessions it runs (as of its last record): its compute is shared
    /// among them, so a new session's steps take longer there.
    pub sessions: u32,
    /// Bytes per second it can send: the client's probe when there is one,
    /// else what the server reports; 0 when unknown.
    pub upload_bps: u64,
    /// Bytes per second it can receive, likewise.
    pub download_bps: u64,
    /// Round-trip time the client measured to it; `None` when not measured.
    pub rtt: Option<Duration>,
}

impl Candidate {
    /// A candidate from a verified record and the client's own ping.
    pub fn from_info(info: &ServerInfo, rtt: Option<Duration>) -> Self {
        Self {
            id: info.public_key,
            name: info.public_name.clone(),
            blocks: info.blocks,
            hardware: info.hardware.clone(),
            throughput: f64::from(info.throughput),
            cache_tokens_free: info.cache_tokens_free,
            sessions: info.sessions,
            upload_bps: info.upload_bps,
            download_bps: info.download_bps,
            rtt,
        }
    }

    /// Replaces the self-reported bandwidth with what the client measured.
    pub fn with_probe(mut self, upload_bps: u64, download_bps: u64) -> Self {
        self.upload_bps = upload_bps;
        self.download_bps = download_bps;
        self
    }

    /// "User45 - 24GB VRAM - 12ms Ping", for a node selector.
    pub fn summary(&self) -> String {
        let memory = match &self.hardware.gpu {
            Some(gpu) => format!("{}GB VRAM", gib(gpu.vram_free)),
            None => format!("{}GB RAM", gib(self.hardware.ram_free)),
        };
        let ping = match self.rtt {
            // Whole milliseconds, as people say them; below 10 ms (a LAN,
            // one machine) a tenth, so 0.4 ms does not read as "0ms".
            Some(rtt) if rtt.as_millis() >= 10 => format!("{}ms Ping", rtt.as_millis()),
            Some(rtt) => format!("{:.1}ms Ping", rtt.as_secs_f64() * 1000.0),
            None => "ping unknown".to_owned(),
        };
        format!("{} - {memory} - {ping}", self.name)
    }

    /// Blocks x tokens per second a new session can expect here: the
    /// measured throughput shared with the sessions already running.
    pub fn throughput_for_new_session(&self) -> f64 {
        self.throughput / (1.0 + f64::from(self.sessions))
    }

    /// Seconds one token spends in one block here, `None` when the server
    /// has no measured throughput.
    pub fn secs_per_block(&self) -> Option<f64> {
        (self.throughput.is_finite() && self.throughput > 0.0).then(|| 1.0 / self.throughput)
    }
}

fn gib(bytes: u64) -> u64 {
    (bytes as f64 / f64::from(1u32 << 30)).round() as u64
}
