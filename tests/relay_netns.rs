//! WAN mode through the tracker's relay: three network namespaces made by
//! this test (root needed). The tracker's namespace is linked to the
//! server's and to the client's, and routes nothing between them, so the
//! client cannot reach the server directly — as with a server behind NAT.
//! The server listens through the tracker's relay (circuit relay v2), and
//! `sherpa nodes` in the client's namespace lists it and pings it through
//! the relay; a server that does not use the relay is listed but
//! unreachable, which shows the direct path really is closed.

#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::netns::Netns;

const SHERPA: &str = env!("CARGO_BIN_EXE_sherpa");
const TRACKER: usize = 0;
const SERVER: usize = 1;
const CLIENT: usize = 2;

#[test]
fn a_server_unreachable_from_the_client_is_reached_through_the_relay() {
    // Link 0: tracker - server; link 1: tracker - client.
    let Some(ns) = Netns::create_or_skip(3, &[(TRACKER, SERVER), (TRACKER, CLIENT)]) else {
        return;
    };
    let scratch = std::env::temp_dir().join(format!("sherpa-relay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let (server_side, client_side) = (ns.addr(0, TRACKER), ns.addr(1, TRACKER));
    let has = |lines: &[String], ip: &str| {
        lines
            .iter()
            .any(|l| l.starts_with(&format!("/ip4/{ip}/tcp/")))
    };
    let (_tracker, lines) = common::spawn_reading(
        ns.command(TRACKER, SHERPA)
            .args(["tracker", "--listen", "/ip4/0.0.0.0/tcp/0", "--data-dir"])
            .arg(scratch.join("t")),
        |lines| has(lines, &server_side) && has(lines, &client_side),
    );
    let tracker_at = |ip: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("/ip4/{ip}/tcp/")))
            .unwrap_or_else(|| panic!("tracker printed no {ip} address: {lines:?}"))
            .clone()
    };

    let serve = |name: &str, relay: &str| {
        common::spawn_first_line(
            ns.command(SERVER, SHERPA)
                .args(["serve", "--blocks", "0..30", "--relay", relay])
                .args(["--listen", "/ip4/0.0.0.0/tcp/0", "--name", name])
                .args(["--tracker", &tracker_at(&server_side)])
                .args(["--model-id", "smollm2-135m", "--model"])
                .arg(common::smollm2())
                .arg("--data-dir")
                .arg(scratch.join(name)),
        )
    };
    let (_server, server_addr) = serve("behind-nat", "always");
    assert!(server_addr.contains("/p2p/"), "{server_addr}");
    // The control: the same server without the relay is listed (its record
    // reaches the DHT through the tracker) but cannot be reached.
    let (_control, _) = serve("no-relay", "never");

    // A generous bound for loaded machines, not a speed goal.
    let started = Instant::now();
    let (server, control) = loop {
        let stdout = common::output_ok(ns.command(CLIENT, SHERPA).args([
            "nodes",
            "--json",
            "--tracker",
            &tracker_at(&client_side),
        ]));
        let listing: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
        let servers = listing["servers"].as_array().unwrap();
        let named = |name: &str| servers.iter().find(|s| s["name"] == name).cloned();
        if let (Some(server), Some(control)) = (named("behind-nat"), named("no-relay")) {
            if server["ping_ms"].as_f64().is_some() {
                break (server, control);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the server was never listed and pinged: {listing}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        control["ping_ms"].is_null(),
        "reached without a relay: {control}"
    );
    assert_eq!(server["blocks"], serde_json::json!({"start": 0, "end": 30}));
    assert!(server_addr.ends_with(server["peer_id"].as_str().unwrap()));

    // A generation through the relay: the server's direct port cannot be
    // reached, so the session stays on its (relayed) libp2p stream, and
    // the tokens are the local ones.
    let generate = |extra: &[&str]| {
        common::generated_ids(
            ns.command(CLIENT, SHERPA)
                .args([
                    "generate",
                    "--ids",
                    "--max-new-tokens",
                    "8",
                    "--wire",
                    "f32",
                ])
                .args([
                    "--prompt",
                    "Name three rivers.",
                    "--model-id",
                    "smollm2-135m",
                ])
                .arg("--model")
                .arg(common::smollm2())
                .args(extra),
        )
    };
    let (local, _) = generate(&["--local"]);
    let tracker = tracker_at(&client_side);
    let (relayed, stderr) = generate(&["--tracker", &tracker, "--exclude", "no-relay"]);
    assert_eq!(relayed, local, "{stderr}");
    assert!(
        stderr.contains("on behind-nat") && stderr.contains(", libp2p stream)"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
