//! The `sherpa` binary, as scripts use it.

#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use swarm_shard::{ModelFiles, TextTokenizer};

fn sherpa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sherpa"))
}

#[test]
fn generate_local_prints_the_reference_continuation() {
    let path = common::smollm2();
    let reference = common::reference();
    let case = &reference["modes"]["dequantized"][1];
    let expected_ids: Vec<u32> = case["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let files = ModelFiles::open(&path).unwrap();
    let tokenizer = TextTokenizer::from_model(&files).unwrap();
    let expected = tokenizer.decode(&expected_ids).unwrap();

    let out = common::run_ok(
        sherpa()
            .args([
                "generate",
                "--local",
                "--temperature",
                "0",
                "--max-new-tokens",
            ])
            .arg(expected_ids.len().to_string())
            .arg("--model")
            .arg(&path)
            .arg("--prompt")
            .arg(case["prompt"].as_str().unwrap()),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim_end(), expected.trim_end());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("tokens/s"), "{stderr}");
}

#[test]
fn fetch_model_prints_the_cached_path() {
    let path = common::smollm2();
    let stdout = common::output_ok(sherpa().args(["fetch-model", "smollm2-135m"]));
    let stdout = String::from_utf8(stdout).unwrap();
    assert_eq!(stdout.trim(), path.display().to_string());
}

#[test]
fn bad_model_arguments_fail_with_one_clear_line() {
    let dir = std::env::temp_dir().join(format!("sherpa-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bogus = dir.join("bogus.gguf");
    std::fs::write(&bogus, b"GGUF but not really").unwrap();
    for model in [bogus.display().to_string(), "no-such-model".to_string()] {
        let out = sherpa()
            .args(["generate", "--local", "--prompt", "hi", "--model", &model])
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

/// `--device` reaches the model load: the CPU works, a GPU this build
/// cannot drive is refused with what to do, and a typo is named.
#[test]
fn devices_are_chosen_on_the_command_line() {
    let path = common::smollm2();
    let out = common::output_ok(
        sherpa()
            .args(["generate", "--device", "cpu", "--ids"])
            .args(["--max-new-tokens", "4", "--prompt", "Hi", "--model"])
            .arg(&path),
    );
    assert!(!out.is_empty());
    #[cfg(not(feature = "cuda"))]
    {
        let out = sherpa()
            .args([
                "generate", "--device", "cuda:0", "--prompt", "Hi", "--model",
            ])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("cannot use cuda:0") && stderr.contains("--features cuda"),
            "{stderr}"
        );
    }
    let out = sherpa()
        .args(["serve", "--device", "gpu", "--blocks", "0..1", "--lan"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("\"gpu\" is not a device"), "{stderr}");
}
