//! What this machine offers a swarm.

use swarm_core::HardwareInfo;

/// What a node computing on `device` offers: cores and free RAM, and for
/// an NVIDIA GPU its name, compute capability and free VRAM (through NVML,
/// with the `nvml` feature; without it, or without a driver, the GPU is
/// not reported and the node scores as a CPU one).
pub fn detect_on(device: &crate::DeviceSpec) -> HardwareInfo {
    let mut info = detect();
    if let crate::DeviceSpec::Cuda(index) = device {
        info.gpu = u32::try_from(*index).ok().and_then(nvidia_gpu);
        if info.gpu.is_none() {
            tracing::warn!(
                "cannot read GPU {index} through NVML (build with --features nvml, and check the NVIDIA driver); announcing no GPU"
            );
        }
    }
    info
}

/// Detects cores and free memory, and no GPU: what a CPU node offers.
pub fn detect() -> HardwareInfo {
    let cpu_cores = std::thread::available_parallelism()
        .map(|n| n.get().min(u16::MAX as usize) as u16)
        .unwrap_or(1);
    HardwareInfo {
        cpu_cores,
        ram_free: available_memory().unwrap_or(0),
        gpu: None,
    }
}

/// Name, compute capability and memory of NVIDIA GPU `index`, read through
/// NVML (the driver's management library, loaded at run time). `None` when
/// the `nvml` feature is off, or there is no driver or no such GPU. A
/// server reports a GPU only when it computes its blocks on it.
#[cfg(feature = "nvml")]
pub fn nvidia_gpu(index: u32) -> Option<swarm_core::GpuInfo> {
    let nvml = nvml_wrapper::Nvml::init().ok()?;
    let device = nvml.device_by_index(index).ok()?;
    let cc = device.cuda_compute_capability().ok()?;
    let memory = device.memory_info().ok()?;
    Some(swarm_core::GpuInfo {
        name: device.name().ok()?,
        compute_capability: (
            u8::try_from(cc.major).unwrap_or(0),
            u8::try_from(cc.minor).unwrap_or(0),
        ),
        vram_total: memory.total,
        vram_free: memory.free,
    })
}

/// Without the `nvml` feature there is no GPU to report.
#[cfg(not(feature = "nvml"))]
pub fn nvidia_gpu(_index: u32) -> Option<swarm_core::GpuInfo> {
    None
}

/// `MemAvailable` from /proc/meminfo, in bytes (Linux); None elsewhere.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// This process's resident memory now and at its peak, in bytes (Linux:
/// `VmRSS` and `VmHWM` of /proc/self/status); `None` elsewhere.
pub fn resident_memory() -> Option<(u64, u64)> {
    resident_memory_of("self")
}

/// [`resident_memory`] of process `pid` (a number, or `self`).
pub fn resident_memory_of(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_cores_and_memory() {
        let hw = super::detect();
        assert!(hw.cpu_cores >= 1);
        #[cfg(target_os = "linux")]
        assert!(hw.ram_free > 0);
        assert!(hw.describe().starts_with("CPU ("));
    }
}
