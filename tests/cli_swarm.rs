//! Separate `sherpa` processes on loopback: a tracker, two servers hosting
//! halves of the real model, and `sherpa nodes` listing them; Ctrl-C on a
//! server withdraws it.

#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

fn sherpa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sherpa"))
}

fn list(tracker: &str) -> serde_json::Value {
    let stdout = common::output_ok(sherpa().args(["nodes", "--json", "--tracker", tracker]));
    serde_json::from_slice(&stdout).unwrap()
}

#[test]
fn tracker_servers_and_nodes_as_separate_processes() {
    let model = common::smollm2();
    let scratch = std::env::temp_dir().join(format!("sherpa-swarm-cli-{}", std::process::id()));
    let (_tracker, tracker) = common::spawn_first_line(
        sherpa()
            .args(["tracker", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
            .arg(scratch.join("t")),
    );
    assert!(
        tracker.starts_with("/ip4/127.0.0.1/tcp/") && tracker.contains("/p2p/12D3"),
        "{tracker}"
    );

    let serve = |blocks: &str, name: &str| {
        common::spawn_first_line(
            sherpa()
                .args([
                    "serve",
                    "--blocks",
                    blocks,
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--name",
                    name,
                ])
                .args(["--tracker", &tracker, "--model"])
                .arg(&model)
                .args(["--model-id", "smollm2-135m"])
                .arg("--data-dir")
                .arg(scratch.join(name)),
        )
    };
    let (mut first, first_addr) = serve("0..15", "alpha");
    let (_second, second_addr) = serve("15..30", "beta");
    assert!(first_addr.contains("/p2p/") && second_addr.contains("/p2p/"));

    // A generous bound for loaded machines (each server first measures its
    // throughput), not a speed goal.
    let started = Instant::now();
    let listing = loop {
        let listing = list(&tracker);
        if listing["servers"].as_array().unwrap().len() == 2
            || started.elapsed() > Duration::from_secs(90)
        {
            break listing;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let servers = listing["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "{listing}");
    let by_name = |name: &str| servers.iter().find(|s| s["name"] == name).unwrap().clone();
    assert_eq!(
        by_name("alpha")["blocks"],
        serde_json::json!({"start": 0, "end": 15})
    );
    assert_eq!(
        by_name("beta")["blocks"],
        serde_json::json!({"start": 15, "end": 30})
    );
    assert!(first_addr.ends_with(by_name("alpha")["peer_id"].as_str().unwrap()));
    assert!(by_name("beta")["throughput"].as_f64().unwrap() > 0.0);
    assert_eq!(by_name("alpha")["model"], "smollm2-135m");
    // `nodes` connects to every server it lists, measures a ping and the
    // bandwidth, scores them, selects both (each alone covers half), and
    // routes through them in block order.
    for server in servers {
        assert!(server["ping_ms"].as_f64().unwrap() > 0.0, "{server}");
        assert!(
            server["upload_bps"].as_u64().unwrap() > 0,
            "probed: {server}"
        );
        let score = server["score"]["total"].as_f64().unwrap();
        assert!(score > 0.0 && score <= 100.0, "{server}");
        assert_eq!(server["status"], "selected", "{server}");
    }
    assert_eq!(listing["model_blocks"], 30);
    assert_eq!(listing["selection"]["uncovered"], serde_json::json!([]));
    let hops = listing["route"]["hops"].as_array().unwrap();
    let route: Vec<_> = hops.iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(route, ["alpha", "beta"], "{listing}");
    // Unchecking a server: the selection says which blocks lost their host.
    let stdout = common::output_ok(sherpa().args([
        "nodes",
        "--json",
        "--no-probe",
        "--tracker",
        &tracker,
        "--exclude",
        "alpha",
    ]));
    let excluded: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(
        excluded["selection"]["uncovered"],
        serde_json::json!([{"start": 0, "end": 15}])
    );
    let notes = excluded["selection"]["notes"].to_string();
    assert!(
        notes.contains("0..15") && notes.contains("alpha"),
        "{notes}"
    );
    assert!(excluded["route"].is_null());
    // The text view shows the same.
    let text = String::from_utf8(common::output_ok(sherpa().args([
        "nodes",
        "--no-probe",
        "--tracker",
        &tracker,
    ])))
    .unwrap();
    assert!(text.contains("route: alpha 0..15 -> beta 15..30"), "{text}");

    // Ctrl-C withdraws: the server is gone from listings at once, not at expiry.
    let pid = first.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    assert!(
        first.0.wait().unwrap().success(),
        "serve exits cleanly on Ctrl-C"
    );
    let listing = list(&tracker);
    let servers = listing["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{listing}");
    assert_eq!(servers[0]["name"], "beta");
    let _ = std::fs::remove_dir_all(&scratch);
}
