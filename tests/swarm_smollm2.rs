//! Distributed generation with the real model, every node a separate
//! `sherpa` process on loopback:
//! - three servers of 10 blocks each give the local greedy output, token
//!   for token;
//! - with two replicas per span, a server killed (SIGKILL) in the middle of
//!   a 64-token generation, 20 runs in a row, never changes the output;
//! - a stopped (SIGSTOP) server is replaced after the step timeout.
//!
//! The failovers' added latency is printed for the record; speed goals live
//! in the benchmarks, not here.

#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::ChildGuard;

const PROMPT: &str = "Write a short story about a robot who learns to paint.";
const TOKENS: &str = "64";

fn sherpa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sherpa"))
}

struct Swarm {
    model: PathBuf,
    scratch: PathBuf,
    tracker: String,
    _tracker: ChildGuard,
    servers: Vec<(String, ChildGuard)>,
}

impl Swarm {
    fn new(name: &str) -> Self {
        let model = common::smollm2();
        let scratch = std::env::temp_dir().join(format!("sherpa-{name}-{}", std::process::id()));
        let (guard, tracker) = common::spawn_first_line(
            sherpa()
                .args(["tracker", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
                .arg(scratch.join("tracker")),
        );
        assert!(tracker.contains("/p2p/"), "tracker address: {tracker:?}");
        Self {
            model,
            scratch,
            tracker,
            _tracker: guard,
            servers: Vec::new(),
        }
    }

    /// Starts a server of `blocks` called `name`, with a fresh identity.
    fn serve(&mut self, name: &str, blocks: &str) {
        let (guard, addr) = common::spawn_first_line(
            sherpa()
                .args(["serve", "--blocks", blocks, "--name", name])
                .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--cache-mib", "64"])
                .args(["--tracker", &self.tracker, "--model-id", "smollm2-135m"])
                .arg("--model")
                .arg(&self.model)
                .arg("--data-dir")
                .arg(self.scratch.join(name)),
        );
        assert!(addr.contains("/p2p/"), "server {name} address: {addr:?}");
        self.servers.push((name.to_owned(), guard));
    }

    /// Waits (bounded) until `sherpa nodes` lists at least `n` servers.
    fn wait_listed(&self, n: usize) {
        let started = Instant::now();
        loop {
            let out = common::output_ok(sherpa().args([
                "nodes",
                "--json",
                "--no-probe",
                "--tracker",
                &self.tracker,
            ]));
            let listing: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let found = listing["servers"].as_array().map_or(0, Vec::len);
            if found >= n {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "only {found} of {n} servers listed"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn generate(&self) -> Command {
        let mut cmd = sherpa();
        cmd.args(["generate", "--tracker", &self.tracker, "--model"])
            .arg(&self.model)
            .args(["--model-id", "smollm2-135m", "--ids", "--temperature", "0"])
            .args(["--max-new-tokens", TOKENS, "--prompt", PROMPT]);
        cmd
    }

    fn process(&mut self, name: &str) -> &mut ChildGuard {
        &mut self
            .servers
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no server called {name}"))
            .1
    }
}

/// What a generation printed: the text, the ids, the route (server names
/// in order) and each failover's milliseconds.
#[derive(Debug, Default)]
struct Printed {
    text: String,
    ids: String,
    route: Vec<String>,
    failover_ms: Vec<u64>,
    stderr: String,
}

fn parse_stderr(stderr: &str, printed: &mut Printed) {
    for line in stderr.lines() {
        if let Some(ids) = line.strip_prefix("ids: ") {
            printed.ids = ids.to_owned();
        } else if let Some(rest) = line.trim().strip_prefix("blocks ") {
            // "blocks 0..10 on NAME (12D3...)"
            if let Some(name) = rest.split(" on ").nth(1) {
                printed
                    .route
                    .push(name.split(' ').next().unwrap().to_owned());
            }
        } else if line.starts_with("failover:") {
            let ms = line
                .split(" in ")
                .last()
                .and_then(|r| r.split(" ms").next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("unparsable failover line: {line}"));
            printed.failover_ms.push(ms);
        }
    }
    printed.stderr = stderr.to_owned();
}

/// Local greedy output, the reference.
fn local(model: &Path) -> Printed {
    let out = common::run_ok(
        sherpa()
            .args(["generate", "--local", "--model"])
            .arg(model)
            .args(["--ids", "--temperature", "0", "--max-new-tokens", TOKENS])
            .args(["--prompt", PROMPT]),
    );
    let mut printed = Printed {
        text: String::from_utf8(out.stdout).unwrap(),
        ..Printed::default()
    };
    parse_stderr(&String::from_utf8_lossy(&out.stderr), &mut printed);
    assert!(!printed.ids.is_empty());
    printed
}

/// Runs a distributed generation; once its route is printed and `after`
/// bytes of text have arrived, calls `interrupt` with the route.
fn run(cmd: &mut Command, after: usize, interrupt: impl FnOnce(&[String])) -> Printed {
    let mut child = ChildGuard(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdout = child.0.stdout.take().unwrap();
    let stderr = child.0.stderr.take().unwrap();
    let (route_tx, route_rx) = mpsc::channel();
    let err_reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut route = Vec::new();
        let mut sent = false;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let mut p = Printed::default();
            parse_stderr(&line, &mut p);
            route.extend(p.route);
            if !sent && route.len() == 3 {
                let _ = route_tx.send(route.clone());
                sent = true;
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut text = Vec::new();
    let mut buf = [0u8; 256];
    let mut interrupt = Some(interrupt);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
        if text.len() >= after {
            if let Some(f) = interrupt.take() {
                let route = route_rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the route is printed before the tokens");
                f(&route);
            }
        }
        assert!(Instant::now() < deadline, "the generation takes too long");
    }
    let status = child.0.wait().unwrap();
    let stderr = err_reader.join().unwrap();
    assert!(status.success(), "generate failed:\n{stderr}");
    assert!(
        interrupt.is_none(),
        "the text ended before the interruption:\n{stderr}"
    );
    let mut printed = Printed {
        text: String::from_utf8(text).unwrap(),
        ..Printed::default()
    };
    parse_stderr(&stderr, &mut printed);
    printed
}

fn signal(guard: &ChildGuard, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &guard.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

#[test]
fn three_servers_then_failover_under_kill_and_stop() {
    let mut swarm = Swarm::new("swarm-gen");
    let want = local(&swarm.model);
    for (name, blocks) in [("a0", "0..10"), ("b0", "10..20"), ("c0", "20..30")] {
        swarm.serve(name, blocks);
    }
    swarm.wait_listed(3);

    // Three separate servers of 10 blocks each: the local output, token
    // for token, with exact f32 activations and with the default f16.
    let got = run(swarm.generate().args(["--wire", "f32"]), 0, |_| {});
    assert_eq!(got.route, ["a0", "b0", "c0"], "{}", got.stderr);
    assert_eq!(got.ids, want.ids, "f32: {}", got.stderr);
    assert_eq!(got.text, want.text);
    assert!(got.failover_ms.is_empty(), "{}", got.stderr);
    let got = run(&mut swarm.generate(), 0, |_| {});
    assert_eq!(got.ids, want.ids, "f16: {}", got.stderr);

    // A second replica of every span.
    for (name, blocks) in [("a1", "0..10"), ("b1", "10..20"), ("c1", "20..30")] {
        swarm.serve(name, blocks);
    }
    swarm.wait_listed(6);

    // 20 runs, each killing (SIGKILL) one server of the route mid-way,
    // then starting a new replica in its place.
    let mut added: Vec<u64> = Vec::new();
    for run_no in 0..20 {
        let hop = run_no % 3;
        let mut victim = String::new();
        let got = run(&mut swarm.generate(), 40, |route| {
            victim = route[hop].clone();
            swarm.process(&victim).0.kill().unwrap();
        });
        assert_eq!(got.ids, want.ids, "run {run_no}: {}", got.stderr);
        assert_eq!(got.text, want.text, "run {run_no}");
        assert_eq!(got.failover_ms.len(), 1, "run {run_no}: {}", got.stderr);
        added.extend(&got.failover_ms);
        let blocks = ["0..10", "10..20", "20..30"][hop];
        swarm.servers.retain(|(n, _)| n != &victim);
        swarm.serve(&format!("{}{}", &victim[..1], run_no + 2), blocks);
    }
    added.sort_unstable();
    eprintln!(
        "failover added latency over 20 kills: median {} ms, max {} ms, all {:?}",
        added[added.len() / 2],
        added[added.len() - 1],
        added
    );

    // A stopped server: replaced once its step is overdue.
    let mut stopped = String::new();
    let got = run(
        swarm.generate().args(["--step-timeout", "1"]),
        40,
        |route| {
            stopped = route[1].clone();
            signal(swarm.process(&stopped), "-STOP");
        },
    );
    signal(swarm.process(&stopped), "-CONT");
    assert_eq!(got.ids, want.ids, "{}", got.stderr);
    assert_eq!(got.failover_ms.len(), 1, "{}", got.stderr);
    assert!(got.stderr.contains("timed out"), "{}", got.stderr);
    eprintln!("SIGSTOP failover took {} ms", got.failover_ms[0]);
}
