//! Refusing, with a clear message, to run on a CPU that lacks the vector
//! instructions this build was compiled for.

use crate::error::{Result, ShardError};

/// Checks that the CPU has the instructions the build assumes (AVX2, FMA
/// and F16C on x86_64 builds made with the workspace's default
/// `target-cpu=x86-64-v3`). Call it first thing in a program.
pub fn check_cpu_features() -> Result<()> {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        let missing: Vec<&str> = [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("f16c", std::arch::is_x86_feature_detected!("f16c")),
        ]
        .into_iter()
        .filter(|(_, present)| !present)
        .map(|(name, _)| name)
        .collect();
        if !missing.is_empty() {
            return Err(ShardError::UnsupportedCpu(format!(
                "this build uses AVX2/FMA/F16C but the CPU lacks {}; rebuild with RUSTFLAGS=\"-C target-cpu=x86-64\" (portable, about 3x slower)",
                missing.join(", ")
            )));
        }
    }
    Ok(())
}

/// Whether this build uses the fast x86_64 vector kernels.
pub fn built_with_simd() -> bool {
    cfg!(any(
        all(target_arch = "x86_64", target_feature = "avx2"),
        target_arch = "aarch64"
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_machine_runs_this_build() {
        super::check_cpu_features().unwrap();
    }
}
