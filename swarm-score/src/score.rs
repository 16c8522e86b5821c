//! The Performance Score: one number from 0 to 100 that ranks servers for a
//! client, made of five components a person can read.
//!
//! Each component maps a figure onto 0..=1 with a fixed, absolute scale (so
//! a node's score does not change when other nodes join):
//!
//! | component | figure | 0 at | 1 at | shape |
//! |-----------|--------|------|------|-------|
//! | ping | the client's RTT | - | 0 ms | `1 / (1 + rtt / 50 ms)`: 50 ms gives 0.5, 200 ms 0.2; unmeasured counts as 200 ms |
//! | upload, download | bytes/s | 100 kB/s | 1 GB/s | log10 |
//! | memory | free VRAM (RAM on CPU nodes) | 512 MiB | 128 GiB | log2 |
//! | compute | throughput, and the device | 10 blocks x tokens/s, CPU | 100 000, compute capability 9 | 0.85 x log10 of throughput + 0.15 x device class |
//!
//! The device class is 0 for a CPU, `(major - 3) / 6` for a CUDA compute
//! capability (3.x gives 0, 9.x gives 1), and 0.5 for a GPU without one.
//! Throughput dominates because it is measured; the class breaks ties and
//! ranks a newer GPU above an older one at equal measurements. The
//! throughput scored is what a new session can expect: the measured one
//! divided by `1 + sessions` the server announced running, so a busy
//! server ranks below an idle one of the same speed.
//!
//! The total is `100 x sum(weight x component) / sum(weights)`. Default
//! weights: compute 0.35, ping 0.25, upload 0.15, memory 0.15, download 0.10.

use crate::candidate::Candidate;
use crate::error::ScoreError;

/// RTT assumed for a server the client has not pinged, in ms.
pub const UNMEASURED_PING_MS: f64 = 200.0;
/// RTT at which the ping component is one half, in ms.
pub const HALF_PING_MS: f64 = 50.0;
/// Bandwidth scoring 0 and 1, bytes/s.
pub const BANDWIDTH_RANGE: (f64, f64) = (1e5, 1e9);
/// Free memory scoring 0 and 1, bytes.
pub const MEMORY_RANGE: (f64, f64) = (512.0 * 1048576.0, 128.0 * 1073741824.0);
/// Throughput scoring 0 and 1, blocks x tokens/s.
pub const THROUGHPUT_RANGE: (f64, f64) = (10.0, 1e5);
/// Share of the device class in the compute component.
pub const DEVICE_SHARE: f64 = 0.15;

/// How much each component counts. Any non-negative finite values, not all
/// zero; only their ratios matter.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct ScoreWeights {
    /// Weight of the client's ping.
    pub ping: f64,
    /// Weight of the server's upload bandwidth.
    pub upload: f64,
    /// Weight of the server's download bandwidth.
    pub download: f64,
    /// Weight of free VRAM (or RAM).
    pub memory: f64,
    /// Weight of compute.
    pub compute: f64,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        Self {
            ping: 0.25,
            upload: 0.15,
            download: 0.10,
            memory: 0.15,
            compute: 0.35,
        }
    }
}

impl ScoreWeights {
    fn all(&self) -> [f64; 5] {
        [
            self.ping,
            self.upload,
            self.download,
            self.memory,
            self.compute,
        ]
    }

    /// Checks the weights are usable.
    pub fn validate(&self) -> Result<(), ScoreError> {
        let all = self.all();
        if all.iter().any(|w| !w.is_finite() || *w < 0.0) || all.iter().sum::<f64>() <= 0.0 {
            return Err(ScoreError::BadWeights(format!("{self:?}")));
        }
        Ok(())
    }
}

/// The five components, each in 0..=1.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ScoreComponents {
    /// From the client's RTT.
    pub ping: f64,
    /// From upload bandwidth.
    pub upload: f64,
    /// From download bandwidth.
    pub download: f64,
    /// From free VRAM or RAM.
    pub memory: f64,
    /// From measured throughput and the device.
    pub compute: f64,
}

/// A candidate's score with the reasons for it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PerformanceScore {
    /// 0 to 100; higher is better.
    pub total: f64,
    /// What it is made of.
    pub components: ScoreComponents,
}

/// Where `x` falls between `lo` (0) and `hi` (1) on a log scale, clamped.
fn log_scale(x: f64, (lo, hi): (f64, f64)) -> f64 {
    if !(x.is_finite() && x > lo) {
        return 0.0;
    }
    ((x / lo).ln() / (hi / lo).ln()).clamp(0.0, 1.0)
}

/// The device class: 0 for a CPU, up to 1 for the newest GPUs.
pub fn device_class(candidate: &Candidate) -> f64 {
    match &candidate.hardware.gpu {
        None => 0.0,
        Some(gpu) if gpu.compute_capability == (0, 0) => 0.5,
        Some(gpu) => ((f64::from(gpu.compute_capability.0) - 3.0) / 6.0
            + f64::from(gpu.compute_capability.1) / 60.0)
            .clamp(0.0, 1.0),
    }
}

impl ScoreComponents {
    /// The components of `candidate`.
    pub fn of(candidate: &Candidate) -> Self {
        let rtt_ms = candidate
            .rtt
            .map_or(UNMEASURED_PING_MS, |d| d.as_secs_f64() * 1000.0);
        Self {
            ping: 1.0 / (1.0 + rtt_ms / HALF_PING_MS),
            upload: log_scale(candidate.upload_bps as f64, BANDWIDTH_RANGE),
            download: log_scale(candidate.download_bps as f64, BANDWIDTH_RANGE),
            memory: log_scale(candidate.hardware.memory_free() as f64, MEMORY_RANGE),
            compute: (1.0 - DEVICE_SHARE)
                * log_scale(candidate.throughput_for_new_session(), THROUGHPUT_RANGE)
                + DEVICE_SHARE * device_class(candidate),
        }
    }
}

/// Scores `candidate` with `weights` (assumed valid; see
/// [`ScoreWeights::validate`]).
pub fn score(candidate: &Candidate, weights: &ScoreWeights) -> PerformanceScore {
    let c = ScoreComponents::of(candidate);
    let w = weights.all();
    let parts = [c.ping, c.upload, c.download, c.memory, c.compute];
    let sum: f64 = w.iter().sum();
    let total = if sum > 0.0 {
        100.0 * w.iter().zip(parts).map(|(w, p)| w * p).sum::<f64>() / sum
    } else {
        0.0
    };
    PerformanceScore {
        total,
        components: c,
    }
}

swarm_core::with_setters!(ScoreWeights {
    ping: f64 => with_ping,
    upload: f64 => with_upload,
    download: f64 => with_download,
    memory: f64 => with_memory,
    compute: f64 => with_compute,
});
