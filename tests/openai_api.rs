//! OpenAI's own Python client (the `openai` package, installed into a venv
//! under `target/` on first use) against `sherpa dashboard` on a loopback
//! swarm of real servers (tracker and servers in this process, the
//! dashboard and the reference `sherpa generate` as the binary users run):
//! streamed and non-streamed chat completions equal `sherpa generate`'s
//! greedy text, an unknown model is a 404 the client understands, and a
//! stream the client closes mid-way frees the servers' caches while the
//! client process is still alive.

#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::ChildGuard;
use sherpa_swarm::{LocalSwarm, ModelId};

const OPENAI: &str = "openai==3.60.0";
const PROMPT: &str = "What is the tallest mountain on Earth?";
const TOKENS: &str = "24";

fn sherpa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sherpa"))
}

/// A venv holding the `openai` package, made once per target directory.
fn openai_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/openai-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(format!("{OPENAI}.installed"));
    if ready.exists() {
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    common::run_ok(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    common::run_ok(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        OPENAI,
    ]));
    std::fs::write(&ready, b"").unwrap();
    python
}

#[test]
fn openais_python_client_gets_sherpa_generates_text_and_a_closed_stream_frees_the_servers() {
    let python = openai_python();
    let model = common::smollm2();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let swarm = runtime
        .block_on(LocalSwarm::start(
            &model.to_string_lossy(),
            ModelId::new("smollm2-135m").unwrap(),
            3,
        ))
        .unwrap();
    let tracker = swarm.tracker.addr().to_string();
    let home = common::fresh_home("openai");

    // The reference: `sherpa generate` through the same swarm.
    let reference = common::output_ok(
        sherpa()
            .env("SHERPA_HOME", &home)
            .args(["generate", "--tracker", &tracker, "--prompt", PROMPT])
            .args(["--max-new-tokens", TOKENS]),
    );
    let reference = String::from_utf8(reference).unwrap();

    let (_dashboard, url) = common::spawn_first_line(sherpa().env("SHERPA_HOME", &home).args([
        "dashboard",
        "--listen",
        "127.0.0.1:0",
        "--tracker",
        &tracker,
    ]));
    assert!(url.starts_with("http://127.0.0.1:"), "{url:?}");
    common::wait_healthy(&url, Duration::from_secs(120));

    let mut client = ChildGuard(
        Command::new(&python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_check.py"))
            .args([&format!("{url}v1"), "smollm2-135m", PROMPT, TOKENS])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(client.0.stdout.take().unwrap()).lines();
    let report: serde_json::Value =
        serde_json::from_str(&lines.next().expect("the client printed nothing").unwrap()).unwrap();

    assert_eq!(
        report["whole"].as_str().unwrap().trim(),
        reference.trim(),
        "non-streamed reply differs from `sherpa generate`"
    );
    assert_eq!(
        report["streamed"].as_str().unwrap().trim(),
        reference.trim(),
        "streamed reply differs from `sherpa generate`"
    );
    assert_eq!(report["whole_finish"], "length");
    assert_eq!(report["streamed_finish"], "length");
    assert_eq!(report["whole_usage"]["completion_tokens"], 24);
    assert_eq!(report["streamed_usage"], report["whole_usage"]);
    assert_eq!(report["unknown_model"]["status"], 404, "{report}");
    assert_eq!(
        report["unknown_model"]["code"], "model_not_found",
        "{report}"
    );
    assert_eq!(report["models"], serde_json::json!(["smollm2-135m"]));

    // The client closed a long stream after a few chunks and is still
    // running: the servers must drop the session.
    assert_eq!(lines.next().unwrap().unwrap(), "closed");
    common::wait_servers_idle(&swarm.servers, None, Duration::from_secs(20));
    let (status, metrics) = common::http("GET", &format!("{url}metrics"), None);
    assert_eq!(status, 200);
    assert!(
        metrics.contains("sherpa_completions_cancelled_total 1"),
        "{metrics}"
    );
    client.0.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(client.0.wait().unwrap().success());
    runtime.block_on(swarm.shutdown());
}
