//! LAN mode: two network namespaces joined by a veth pair, made by this test
//! (root needed). A server in one and `sherpa nodes --lan` in the other find
//! each other by mDNS with no address given. mDNS traffic stays inside the
//! two namespaces: the processes run in them and see only their veth and
//! loopback.

#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

struct Namespaces {
    names: [String; 2],
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Creates namespaces `a` and `b` with 10.231.7.1/24 and .2/24 on a veth
/// pair, or says why it cannot.
fn namespaces() -> Result<Namespaces, String> {
    let tag = std::process::id() % 100_000;
    let ns = Namespaces {
        names: [format!("sherpa-{tag}-a"), format!("sherpa-{tag}-b")],
    };
    let [a, b] = &ns.names;
    let (va, vb) = (format!("shA{tag}"), format!("shB{tag}"));
    let steps: Vec<Vec<&str>> = vec![
        vec!["netns", "add", a],
        vec!["netns", "add", b],
        vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
        vec!["link", "set", &va, "netns", a],
        vec!["link", "set", &vb, "netns", b],
        vec!["-n", a, "addr", "add", "10.231.7.1/24", "dev", &va],
        vec!["-n", b, "addr", "add", "10.231.7.2/24", "dev", &vb],
        vec!["-n", a, "link", "set", "lo", "up"],
        vec!["-n", b, "link", "set", "lo", "up"],
        vec!["-n", a, "link", "set", &va, "up"],
        vec!["-n", b, "link", "set", &vb, "up"],
        vec!["-n", a, "route", "add", "224.0.0.0/4", "dev", &va],
        vec!["-n", b, "route", "add", "224.0.0.0/4", "dev", &vb],
    ];
    for step in steps {
        if !ip(&step) {
            return Err(format!(
                "`ip {}` failed (needs root and iproute2)",
                step.join(" ")
            ));
        }
    }
    Ok(ns)
}

#[test]
fn nodes_in_separate_namespaces_pair_by_mdns() {
    let ns = match namespaces() {
        Ok(ns) => ns,
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: network namespaces unavailable here: {why}. CI runs this test.");
            return;
        }
        Err(why) => panic!("CI must run the LAN test, but: {why}"),
    };
    let model = common::smollm2();
    let sherpa = env!("CARGO_BIN_EXE_sherpa");
    let scratch = std::env::temp_dir().join(format!("sherpa-lan-{}", std::process::id()));

    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.names[0],
            sherpa,
            "serve",
            "--lan",
            "--blocks",
            "0..15",
        ])
        .args([
            "--listen",
            "/ip4/0.0.0.0/tcp/0",
            "--model-id",
            "smollm2-135m",
            "--name",
            "lan-a",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--data-dir")
        .arg(scratch.join("a"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let _server = common::ChildGuard(server);
    assert!(first.contains("/p2p/"), "{first}");

    let stdout = common::output_ok(Command::new("ip").args([
        "netns",
        "exec",
        &ns.names[1],
        sherpa,
        "nodes",
        "--lan",
        "--json",
    ]));
    let listing: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let servers = listing["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{listing}");
    assert_eq!(servers[0]["name"], "lan-a");
    assert_eq!(
        servers[0]["blocks"],
        serde_json::json!({"start": 0, "end": 15})
    );
    let _ = std::fs::remove_dir_all(&scratch);
    drop(ns);
}
