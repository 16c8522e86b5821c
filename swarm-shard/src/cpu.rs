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

/// Best-of-three read of 256 MiB by every core at once (each sums its own
/// slice), in bytes per second: what a decode step, which only reads its
/// weights, can get from memory. A copy also writes, so it understates
/// this. (Here rather than in the bench so that debug builds, which
/// optimise the engine, measure it right.)
pub fn memory_read_bandwidth() -> f64 {
    use std::time::{Duration, Instant};
    const BYTES: usize = 256 << 20;
    let words: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = words.len().div_ceil(threads);
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        std::thread::scope(|scope| {
            for part in words.chunks(chunk) {
                scope.spawn(move || {
                    // Eight independent lanes, so the sum is not one long
                    // dependency chain and the compiler vectorizes it.
                    let mut lanes = [0u64; 8];
                    for c in std::hint::black_box(part).chunks_exact(8) {
                        for (l, v) in lanes.iter_mut().zip(c) {
                            *l = l.wrapping_add(*v);
                        }
                    }
                    std::hint::black_box(lanes);
                });
            }
        });
        best = best.min(started.elapsed());
    }
    BYTES as f64 / best.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_machine_runs_this_build() {
        super::check_cpu_features().unwrap();
    }
}
