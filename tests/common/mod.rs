//! Shared set-up of the integration tests: the real model.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use sherpa_swarm::model_store::{fetch_model, known_model, DEFAULT_MODEL};

/// Path of SmolLM2-135M-Instruct Q4_1, fetched into the cache on first use.
/// Fails loudly when it cannot be had: these tests never skip.
pub fn smollm2() -> PathBuf {
    let model = known_model(DEFAULT_MODEL).expect("default model is known");
    match fetch_model(model, &Default::default(), &mut |_| {}) {
        Ok(path) => path,
        Err(e) => panic!(
            "the real test model could not be fetched ({e}). These tests need it: \
             run `cargo run --features cli -- fetch-model smollm2-135m` or set SHERPA_HOME to a cache that has it"
        ),
    }
}

/// The reference outputs written by `reference/gguf_reference.py`.
pub fn reference() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/reference/expected/smollm2-135m-q4_1.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Max |a - b| over |a|'s max.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

/// Kills a child process on drop, so a failing test leaves nothing running.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command to completion, requiring success (stderr shown if not),
/// and returns its stdout.
pub fn output_ok(cmd: &mut std::process::Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
