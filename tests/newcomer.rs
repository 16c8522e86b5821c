//! What people and scripts do with `sherpa` on one machine, with the
//! defaults (no `--data-dir`, one fresh `SHERPA_HOME`):
//! - three servers started at once by a script, and a client started one
//!   second after the last one printed its address, generate the local
//!   greedy tokens, 10 runs in a row; each run the servers have distinct
//!   identities, and restarted servers get the same three back;
//! - a client started before a span has a server waits for it, saying
//!   which blocks it waits for, and fails clearly when none comes;
//! - servers given the model as a file path are found under the model's
//!   name; asked for a model nobody serves, `nodes` and `generate` name the
//!   models the swarm does serve.

#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::ChildGuard;

const PROMPT: &str = "Name three colours.";
const TOKENS: &str = "16";

fn sherpa(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sherpa"));
    cmd.env("SHERPA_HOME", home).stdin(Stdio::null());
    cmd
}

/// A started daemon whose stdout lines arrive on a channel.
struct Daemon {
    child: ChildGuard,
    lines: mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts `cmd` without waiting for anything.
    fn start(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child: ChildGuard(child),
            lines,
        }
    }

    /// The address it prints first.
    fn addr(&self) -> String {
        let addr = self
            .lines
            .recv_timeout(Duration::from_secs(180))
            .expect("a daemon printed no address");
        assert!(addr.contains("/p2p/12D3"), "{addr}");
        addr
    }
}

fn peer_of(addr: &str) -> String {
    addr.rsplit("/p2p/").next().unwrap().to_owned()
}

fn tracker(home: &Path) -> (Daemon, String) {
    let tracker = Daemon::start(sherpa(home).args(["tracker", "--listen", "/ip4/127.0.0.1/tcp/0"]));
    let addr = tracker.addr();
    (tracker, addr)
}

fn serve(home: &Path, tracker: &str, blocks: &str, extra: &[&str]) -> Daemon {
    Daemon::start(
        sherpa(home)
            .args(["serve", "--blocks", blocks, "--tracker", tracker])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(extra),
    )
}

fn generate(home: &Path, tracker: &str, extra: &[&str]) -> Command {
    let mut cmd = sherpa(home);
    cmd.args(["generate", "--tracker", tracker, "--prompt", PROMPT])
        .args(["--max-new-tokens", TOKENS, "--ids"])
        .args(extra);
    cmd
}

fn local_ids(home: &Path) -> String {
    let (ids, _) = common::generated_ids(
        sherpa(home)
            .args(["generate", "--local", "--ids", "--prompt", PROMPT])
            .args(["--max-new-tokens", TOKENS]),
    );
    ids
}

/// A `generate --wait 1` that must fail; its stderr.
fn generate_fails(home: &Path, tracker: &str) -> String {
    let out = generate(home, tracker, &["--wait", "1"]).output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `sherpa nodes --json --no-probe` against `tracker`.
fn nodes_json(home: &Path, tracker: &str) -> serde_json::Value {
    let stdout = common::output_ok(sherpa(home).args([
        "nodes",
        "--json",
        "--no-probe",
        "--tracker",
        tracker,
    ]));
    serde_json::from_slice(&stdout).unwrap()
}

struct Home(PathBuf);

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_script_starting_three_servers_and_a_client_works_every_time() {
    let home = Home(common::fresh_home("script"));
    let home = home.0.as_path();
    let expected = local_ids(home);
    let mut identities: Option<Vec<String>> = None;
    for run in 0..10 {
        let started = Instant::now();
        let (mut tracker, tracker_addr) = tracker(home);
        // A script: all three at once, no data directories, then read what
        // they print.
        let mut servers: Vec<Daemon> = ["0..10", "10..20", "20..30"]
            .iter()
            .map(|blocks| serve(home, &tracker_addr, blocks, &[]))
            .collect();
        let mut peers: Vec<String> = servers.iter().map(|s| peer_of(&s.addr())).collect();
        std::thread::sleep(Duration::from_secs(1));
        let (ids, stderr) = common::generated_ids(&mut generate(home, &tracker_addr, &[]));
        assert_eq!(ids, expected, "run {run}:\n{stderr}");
        peers.sort();
        let distinct = {
            let mut d = peers.clone();
            d.dedup();
            d.len()
        };
        assert_eq!(
            distinct, 3,
            "run {run}: servers share an identity: {peers:?}"
        );
        match &identities {
            None => identities = Some(peers),
            Some(first) => assert_eq!(
                &peers, first,
                "run {run}: restarted servers did not get their identities back"
            ),
        }
        for server in &mut servers {
            common::interrupt(&mut server.child);
        }
        common::interrupt(&mut tracker.child);
        eprintln!(
            "run {run}: identical output, 3 distinct identities ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
    }
}

#[test]
fn a_client_waits_for_blocks_that_have_no_server_yet() {
    let home = Home(common::fresh_home("wait"));
    let home = home.0.as_path();
    let expected = local_ids(home);
    let (_tracker, tracker_addr) = tracker(home);
    let first = serve(home, &tracker_addr, "0..15", &[]);
    first.addr();

    // Nothing hosts 15..30 and nothing comes: a clear error after --wait.
    let stderr = generate_fails(home, &tracker_addr);
    assert!(
        stderr.contains("blocks 15..30 of smollm2-135m have no host yet"),
        "{stderr}"
    );
    assert!(
        stderr.contains("no server hosts blocks 15..30 of smollm2-135m"),
        "{stderr}"
    );

    // A client started first waits, says so, and goes on once a server of
    // the missing blocks appears.
    let mut client = generate(home, &tracker_addr, &["--wait", "120"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(client.stderr.take().unwrap());
    let mut client = ChildGuard(client);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut said = Vec::new();
    while !said
        .iter()
        .any(|l: &String| l.contains("blocks 15..30 of smollm2-135m have no host yet"))
    {
        match lines.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => said.push(line),
            Err(_) => panic!("the client never said what it waits for: {said:?}"),
        }
    }
    let second = serve(home, &tracker_addr, "15..30", &[]);
    second.addr();
    let status = client.0.wait().unwrap();
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(status.success(), "{}", rest.join("\n"));
    let ids = rest
        .iter()
        .find_map(|l| l.strip_prefix("ids: "))
        .unwrap_or_else(|| panic!("no ids in {rest:?}"));
    assert_eq!(ids, expected);
}

#[test]
fn servers_given_a_file_are_found_and_other_models_are_named() {
    let home = Home(common::fresh_home("files"));
    let home = home.0.as_path();
    let model = common::smollm2();
    // The real weights under another name and place.
    let renamed = home.join("elsewhere").join("my weights.gguf");
    std::fs::create_dir_all(renamed.parent().unwrap()).unwrap();
    std::fs::hard_link(&model, &renamed)
        .or_else(|_| std::fs::copy(&model, &renamed).map(|_| ()))
        .unwrap();
    let renamed = renamed.to_str().unwrap();
    let (_tracker, tracker_addr) = tracker(home);

    // A swarm serving only a model of its own naming.
    let custom = ["--model", renamed, "--model-id", "lab-llama"];
    let a = serve(home, &tracker_addr, "0..15", &custom);
    let b = serve(home, &tracker_addr, "15..30", &custom);
    let (a, b) = (a.addr(), b.addr());
    assert_ne!(peer_of(&a), peer_of(&b));

    // `nodes` with no --model: the default has no servers, so it shows
    // what the swarm serves, in full.
    let text = String::from_utf8(common::output_ok(sherpa(home).args([
        "nodes",
        "--no-probe",
        "--tracker",
        &tracker_addr,
    ])))
    .unwrap();
    assert!(text.contains("0 servers of smollm2-135m"), "{text}");
    assert!(
        text.contains("the swarm serves: lab-llama (30 blocks, 2 servers)"),
        "{text}"
    );
    assert!(
        text.contains("2 servers of lab-llama (30 blocks)"),
        "{text}"
    );
    let json = nodes_json(home, &tracker_addr);
    assert_eq!(
        json["served_models"],
        serde_json::json!([{"model": "lab-llama", "model_blocks": 30, "servers": 2}]),
        "{json}"
    );
    assert_eq!(json["listings"][0]["servers"].as_array().unwrap().len(), 2);

    // Asked for the default by name: waits, then names what is served.
    let text = String::from_utf8(common::output_ok(sherpa(home).args([
        "nodes",
        "--no-probe",
        "--tracker",
        &tracker_addr,
        "--model",
        "smollm2-135m",
        "--wait",
        "1",
    ])))
    .unwrap();
    assert!(
        text.contains("the swarm serves: lab-llama (30 blocks, 2 servers)"),
        "{text}"
    );

    // A client of the default model fails, naming what the swarm serves.
    let stderr = generate_fails(home, &tracker_addr);
    assert!(
        stderr.contains("no server of smollm2-135m")
            && stderr.contains("lab-llama (30 blocks, 2 servers)"),
        "{stderr}"
    );

    // A server given the renamed file without an id is announced under the
    // model's own name, so the default finds it.
    let c = serve(home, &tracker_addr, "0..30", &["--model", renamed]);
    c.addr();
    let json = nodes_json(home, &tracker_addr);
    let servers = json["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{json}");
    assert_eq!(servers[0]["model"], "smollm2-135m");
    assert_eq!(json["listings"], serde_json::Value::Null);
}
