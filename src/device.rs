//! Where a node computes: `cpu`, `cuda[:N]` or `metal[:N]`, as users
//! write it, carried to every model load.

use std::fmt;
use std::str::FromStr;

use swarm_shard::Device;

use crate::SherpaError;

/// A compute device, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DeviceSpec {
    /// The CPU (the default, and what the tests run on).
    #[default]
    Cpu,
    /// NVIDIA GPU number `N` (needs a build with `--features cuda`).
    Cuda(usize),
    /// Apple GPU number `N` (needs a build with `--features metal`).
    Metal(usize),
}

impl DeviceSpec {
    /// Opens the device; a GPU this build cannot drive is a clear error.
    pub fn open(&self) -> Result<Device, SherpaError> {
        let unavailable = |feature: &str, e: &dyn fmt::Display| {
            SherpaError::Device(format!(
                "cannot use {self}: {e} (GPU support is built in with `--features {feature}`)"
            ))
        };
        match *self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Device::new_cuda(n).map_err(|e| unavailable("cuda", &e)),
            Self::Metal(n) => Device::new_metal(n).map_err(|e| unavailable("metal", &e)),
        }
    }

    /// The GPU index, for GPU devices.
    pub fn gpu_index(&self) -> Option<usize> {
        match *self {
            Self::Cpu => None,
            Self::Cuda(n) | Self::Metal(n) => Some(n),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = SherpaError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            SherpaError::Device(format!(
                "{text:?} is not a device; use cpu, cuda, cuda:N, metal or metal:N"
            ))
        };
        let (kind, index) = match text.split_once(':') {
            Some((kind, n)) => (kind, n.parse::<usize>().map_err(|_| bad())?),
            None => (text, 0),
        };
        match kind {
            "cpu" if !text.contains(':') => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(index)),
            "metal" => Ok(Self::Metal(index)),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_as_written_and_round_trip() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:1", DeviceSpec::Cuda(1)),
            ("metal", DeviceSpec::Metal(0)),
            ("metal:2", DeviceSpec::Metal(2)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
        for bad in ["gpu", "cuda:x", "cpu:1", "", "cuda:-1"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("not a device"), "{bad}: {err}");
        }
        assert!(matches!(DeviceSpec::Cpu.open(), Ok(Device::Cpu)));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_this_build_cannot_drive_is_a_clear_error() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(
            err.contains("cuda:0") && err.contains("--features cuda"),
            "{err}"
        );
    }
}
