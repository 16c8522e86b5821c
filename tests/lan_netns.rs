//! LAN mode across two network namespaces joined by a veth pair, made by
//! this test (root needed): a server in one and `sherpa nodes --lan` in the
//! other find each other by mDNS with no address given. mDNS traffic stays
//! inside the namespaces: the processes run in them and see only their veth
//! and loopback.
//!
//! Private swarms: with a swarm key, only nodes holding the same key pair;
//! a node without it, or with another key, lists nothing.
//!
//! A LAN client (`sherpa generate --lan`) finds two servers splitting the
//! model and generates what the local model does, token for token.
//!
//! The dashboard in LAN mode (`sherpa dashboard --lan`) shows servers in
//! its node list as they pair, one and then the other, and chats through
//! them.

#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::netns::Netns;

const SHERPA: &str = env!("CARGO_BIN_EXE_sherpa");

/// Starts a LAN server hosting blocks 0..15 in namespace 0.
fn serve(ns: &Netns, scratch: &Path, swarm_key: Option<&Path>) -> common::ChildGuard {
    serve_span(ns, scratch, swarm_key, "0..15", "lan-a")
}

/// Starts a LAN server hosting `blocks` in namespace 0.
fn serve_span(
    ns: &Netns,
    scratch: &Path,
    swarm_key: Option<&Path>,
    blocks: &str,
    name: &str,
) -> common::ChildGuard {
    let mut cmd = ns.command(0, SHERPA);
    cmd.args(["serve", "--lan", "--blocks", blocks])
        .args(["--listen", "/ip4/0.0.0.0/tcp/0"])
        .args(["--model-id", "smollm2-135m", "--name", name])
        .arg("--model")
        .arg(common::smollm2())
        .arg("--data-dir")
        .arg(scratch.join(name));
    if let Some(key) = swarm_key {
        cmd.arg("--swarm-key").arg(key);
    }
    let (server, first) = common::spawn_first_line(&mut cmd);
    assert!(first.contains("/p2p/"), "{first}");
    server
}

/// What `sherpa nodes --lan` in namespace 1 lists.
fn list(ns: &Netns, swarm_key: Option<&Path>) -> Vec<serde_json::Value> {
    let mut cmd = ns.command(1, SHERPA);
    cmd.args(["nodes", "--lan", "--json"]);
    if let Some(key) = swarm_key {
        cmd.arg("--swarm-key").arg(key);
    }
    let listing: serde_json::Value = serde_json::from_slice(&common::output_ok(&mut cmd)).unwrap();
    listing["servers"].as_array().unwrap().clone()
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sherpa-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn nodes_in_separate_namespaces_pair_by_mdns() {
    let Some(ns) = Netns::create_or_skip(2, &[(0, 1)]) else {
        return;
    };
    let scratch = scratch("lan");
    let _server = serve(&ns, &scratch, None);
    let servers = list(&ns, None);
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(servers[0]["name"], "lan-a");
    assert_eq!(
        servers[0]["blocks"],
        serde_json::json!({"start": 0, "end": 15})
    );
    assert!(servers[0]["ping_ms"].as_f64().is_some(), "{servers:?}");
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn only_holders_of_the_swarm_key_pair() {
    let Some(ns) = Netns::create_or_skip(2, &[(0, 1)]) else {
        return;
    };
    let scratch = scratch("private");
    let key = scratch.join("swarm.key");
    let other_key = scratch.join("other.key");
    for path in [&key, &other_key] {
        let out = common::output_ok(
            std::process::Command::new(SHERPA)
                .args(["swarm-key", "--out"])
                .arg(path),
        );
        assert!(String::from_utf8(out).unwrap().contains("key"));
    }
    let _server = serve(&ns, &scratch, Some(&key));

    let servers = list(&ns, Some(&key));
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(servers[0]["name"], "lan-a");

    // mDNS still tells them a node is there, but they cannot connect to it.
    assert!(list(&ns, None).is_empty());
    assert!(list(&ns, Some(&other_key)).is_empty());
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn a_lan_client_generates_through_lan_servers() {
    let Some(ns) = Netns::create_or_skip(2, &[(0, 1)]) else {
        return;
    };
    let scratch = scratch("lan-generate");
    let _a = serve_span(&ns, &scratch, None, "0..15", "lan-a");
    let _b = serve_span(&ns, &scratch, None, "15..30", "lan-b");
    let generate = |extra: &[&str]| {
        let mut cmd = ns.command(1, SHERPA);
        cmd.args(["generate", "--ids", "--max-new-tokens", "16"])
            .args(["--prompt", "Name three rivers."])
            .args(["--model-id", "smollm2-135m", "--model"])
            .arg(common::smollm2())
            .args(extra);
        common::generated_ids(&mut cmd)
    };
    let (local, _) = generate(&["--local"]);
    let (lan, stderr) = generate(&["--lan", "--wire", "f32"]);
    assert_eq!(lan, local, "{stderr}");
    assert!(
        stderr.contains("on lan-a") && stderr.contains("on lan-b"),
        "{stderr}"
    );
    // Both hops moved to their direct connections across the link.
    assert_eq!(stderr.matches(", direct)").count(), 2, "{stderr}");
    // And without them, on the libp2p streams, the same tokens.
    let (streams, stderr) = generate(&["--lan", "--wire", "f32", "--no-direct"]);
    assert_eq!(streams, local, "{stderr}");
    assert_eq!(stderr.matches(", libp2p stream)").count(), 2, "{stderr}");
    let _ = std::fs::remove_dir_all(&scratch);
}

/// `GET url` (or `POST` with a JSON body) from inside namespace `node`,
/// where the dashboard's loopback address is: (status, body).
fn http_in(ns: &Netns, node: usize, url: &str, body: Option<&serde_json::Value>) -> (u16, String) {
    const SCRIPT: &str = r#"
import sys, urllib.request, urllib.error
data = sys.argv[2].encode() if len(sys.argv) > 2 else None
req = urllib.request.Request(sys.argv[1], data=data, headers={"Content-Type": "application/json"})
try:
    r = urllib.request.urlopen(req, timeout=120)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"#;
    let mut cmd = ns.command(node, "python3");
    cmd.args(["-c", SCRIPT, url]);
    if let Some(body) = body {
        cmd.arg(body.to_string());
    }
    let out = String::from_utf8(common::output_ok(&mut cmd)).unwrap();
    let (status, body) = out.split_once('\n').unwrap();
    (status.trim().parse().unwrap(), body.to_owned())
}

/// Asks the dashboard for its nodes, as the page polls them (no forced
/// survey), until `enough` holds.
fn nodes_until(
    ns: &Netns,
    url: &str,
    what: &str,
    enough: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let (status, body) = http_in(ns, 1, &format!("{url}api/nodes"), None);
        if status == 200 {
            let nodes: serde_json::Value = serde_json::from_str(&body).unwrap();
            if enough(&nodes) {
                return nodes;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dashboard never showed {what}: {status} {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

#[test]
fn the_dashboard_in_lan_mode_shows_servers_as_they_pair() {
    let Some(ns) = Netns::create_or_skip(2, &[(0, 1)]) else {
        return;
    };
    let scratch = scratch("lan-dashboard");
    let _a = serve_span(&ns, &scratch, None, "0..15", "lan-a");
    let mut cmd = ns.command(1, SHERPA);
    cmd.args(["dashboard", "--lan", "--listen", "127.0.0.1:0", "--model"])
        .arg(common::smollm2())
        .arg("--state-file")
        .arg(scratch.join("dashboard.json"));
    let (_dashboard, url) = common::spawn_first_line(&mut cmd);
    assert!(url.starts_with("http://127.0.0.1:"), "{url:?}");

    let names = |nodes: &serde_json::Value| -> Vec<String> {
        let mut names: Vec<String> = nodes["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    let one = nodes_until(&ns, &url, "lan-a", |n| names(n) == ["lan-a"]);
    assert_eq!(one["coverage"]["covered"], false, "{one}");
    assert_eq!(
        one["coverage"]["missing"],
        serde_json::json!([{"start": 15, "end": 30}])
    );
    assert_eq!(one["servers"][0]["reachability"]["path"], "direct");

    // A second server appears as it pairs, and the model is covered.
    let _b = serve_span(&ns, &scratch, None, "15..30", "lan-b");
    let two = nodes_until(&ns, &url, "lan-a and lan-b", |n| {
        names(n) == ["lan-a", "lan-b"]
    });
    assert_eq!(two["coverage"]["covered"], true, "{two}");

    let (status, state) = http_in(&ns, 1, &format!("{url}api/state"), None);
    assert_eq!(status, 200);
    assert!(state.contains("\"mode\":\"lan\""), "{state}");
    let (status, answer) = http_in(
        &ns,
        1,
        &format!("{url}v1/chat/completions"),
        Some(&serde_json::json!({
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "Name three rivers."}],
            "max_tokens": 8,
            "temperature": 0,
        })),
    );
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 8, "{answer}");
    let _ = std::fs::remove_dir_all(&scratch);
}
