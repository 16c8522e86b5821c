//! What a server brings: memory, cores, and a GPU if it has one.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

/// A GPU and what it offers.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Marketing name, e.g. "NVIDIA GeForce RTX 4090".
    pub name: String,
    /// CUDA compute capability (major, minor), or (0, 0) when not CUDA.
    pub compute_capability: (u8, u8),
    /// Total memory in bytes.
    pub vram_total: u64,
    /// Memory free for blocks and cache, in bytes.
    pub vram_free: u64,
}

/// A server's hardware as it reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct HardwareInfo {
    /// Logical CPU cores.
    pub cpu_cores: u16,
    /// RAM free for blocks and cache, in bytes (the budget on CPU-only nodes).
    pub ram_free: u64,
    /// The GPU computing the blocks, if any.
    pub gpu: Option<GpuInfo>,
}

impl HardwareInfo {
    /// Memory available for blocks and cache: VRAM when a GPU computes, RAM otherwise.
    pub fn memory_free(&self) -> u64 {
        self.gpu.as_ref().map_or(self.ram_free, |g| g.vram_free)
    }

    /// "RTX 4090 (8.9)" or "CPU (16 cores)", for people.
    pub fn describe(&self) -> String {
        match &self.gpu {
            Some(g) => format!(
                "{} ({}.{})",
                g.name, g.compute_capability.0, g.compute_capability.1
            ),
            None => format!("CPU ({} cores)", self.cpu_cores),
        }
    }
}
