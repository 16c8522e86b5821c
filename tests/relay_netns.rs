//! WAN mode through the tracker's relay: three network namespaces made by
//! this test (root needed). The tracker's namespace is linked to the
//! server's and to the client's, and routes nothing between them, so the
//! client cannot reach the server directly — as with a server behind NAT.
//!
//! With `--relay always`, the server listens through the tracker's relay
//! (circuit relay v2), and `sherpa nodes` in the client's namespace lists
//! it and pings it through the relay; a server that does not use the relay
//! is listed but unreachable, which shows the direct path really is
//! closed. With `--relay auto` (the default), AutoNAT decides: a server
//! the tracker cannot dial back (it listens on its own loopback only, as
//! a machine behind NAT takes no inbound connections) learns it is
//! private and takes a relay, and one the tracker can dial does not.

#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::ChildGuard;

const SHERPA: &str = env!("CARGO_BIN_EXE_sherpa");
const TRACKER: usize = 0;
const SERVER: usize = 1;
const CLIENT: usize = 2;

/// The three namespaces with a tracker running: link 0 joins the tracker
/// and the server, link 1 the tracker and the client.
struct Wan {
    ns: Netns,
    scratch: PathBuf,
    _tracker: ChildGuard,
    tracker_lines: Vec<String>,
}

impl Wan {
    fn start(name: &str) -> Option<Self> {
        let ns = Netns::create_or_skip(3, &[(TRACKER, SERVER), (TRACKER, CLIENT)])?;
        let scratch = std::env::temp_dir().join(format!("sherpa-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        let (server_side, client_side) = (ns.addr(0, TRACKER), ns.addr(1, TRACKER));
        let has = |lines: &[String], ip: &str| {
            lines
                .iter()
                .any(|l| l.starts_with(&format!("/ip4/{ip}/tcp/")))
        };
        let (tracker, tracker_lines) = common::spawn_reading(
            ns.command(TRACKER, SHERPA)
                .args(["tracker", "--listen", "/ip4/0.0.0.0/tcp/0", "--data-dir"])
                .arg(scratch.join("t")),
            |lines| has(lines, &server_side) && has(lines, &client_side),
        );
        Some(Self {
            ns,
            scratch,
            _tracker: tracker,
            tracker_lines,
        })
    }

    /// The tracker's address as seen from `link`'s far end.
    fn tracker_at(&self, link: usize) -> String {
        let ip = self.ns.addr(link, TRACKER);
        self.tracker_lines
            .iter()
            .find(|l| l.starts_with(&format!("/ip4/{ip}/tcp/")))
            .unwrap_or_else(|| panic!("tracker printed no {ip} address: {:?}", self.tracker_lines))
            .clone()
    }

    /// Starts a server of the whole model in the server's namespace;
    /// returns it with the address it printed.
    fn serve(&self, name: &str, relay: &str, listen: &str) -> (ChildGuard, String) {
        common::spawn_first_line(
            self.ns
                .command(SERVER, SHERPA)
                .args(["serve", "--blocks", "0..30", "--relay", relay])
                .args(["--listen", listen, "--name", name])
                .args(["--tracker", &self.tracker_at(0)])
                .args(["--model-id", "smollm2-135m", "--model"])
                .arg(common::smollm2())
                .arg("--data-dir")
                .arg(self.scratch.join(name)),
        )
    }

    /// `sherpa nodes --json` from the client's namespace, until every one
    /// of `names` is listed and `ready` holds for the listing.
    fn listed(
        &self,
        names: &[&str],
        ready: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        // A generous bound for loaded machines, not a speed goal.
        let started = Instant::now();
        loop {
            let stdout = common::output_ok(self.ns.command(CLIENT, SHERPA).args([
                "nodes",
                "--json",
                "--tracker",
                &self.tracker_at(1),
            ]));
            let listing: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
            let servers = listing["servers"].as_array().unwrap();
            let found: Vec<_> = names
                .iter()
                .filter_map(|n| servers.iter().find(|s| s["name"] == *n).cloned())
                .collect();
            if found.len() == names.len() && ready(&found) {
                return found;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the servers were never listed as expected: {listing}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `sherpa generate --ids` of 8 tokens from the client's namespace,
    /// with `extra` arguments; returns the ids and stderr.
    fn generate(&self, extra: &[&str]) -> (String, String) {
        common::generated_ids(
            self.ns
                .command(CLIENT, SHERPA)
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
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

#[test]
fn a_server_unreachable_from_the_client_is_reached_through_the_relay() {
    let Some(wan) = Wan::start("relay") else {
        return;
    };
    let (_server, server_addr) = wan.serve("behind-nat", "always", "/ip4/0.0.0.0/tcp/0");
    assert!(server_addr.contains("/p2p/"), "{server_addr}");
    // The control: the same server without the relay is listed (its record
    // reaches the DHT through the tracker) but cannot be reached.
    let (_control, _) = wan.serve("no-relay", "never", "/ip4/0.0.0.0/tcp/0");
    let found = wan.listed(&["behind-nat", "no-relay"], |s| {
        s[0]["ping_ms"].as_f64().is_some()
    });
    let (server, control) = (&found[0], &found[1]);
    assert!(
        control["ping_ms"].is_null(),
        "reached without a relay: {control}"
    );
    assert_eq!(server["blocks"], serde_json::json!({"start": 0, "end": 30}));
    assert!(server_addr.ends_with(server["peer_id"].as_str().unwrap()));

    // A generation through the relay: the server's direct port cannot be
    // reached, so the session stays on its (relayed) libp2p stream, and
    // the tokens are the local ones.
    let (local, _) = wan.generate(&["--local"]);
    let tracker = wan.tracker_at(1);
    let (relayed, stderr) = wan.generate(&["--tracker", &tracker, "--exclude", "no-relay"]);
    assert_eq!(relayed, local, "{stderr}");
    assert!(
        stderr.contains("on behind-nat") && stderr.contains(", libp2p stream)"),
        "{stderr}"
    );
}

#[test]
fn with_relay_auto_autonat_gives_a_relay_to_the_server_that_needs_one() {
    let Some(wan) = Wan::start("autonat") else {
        return;
    };
    // Takes no inbound connections from outside its namespace, like a
    // machine behind NAT: the tracker's AutoNAT dial-back fails.
    let (_private, private_addr) = wan.serve("private", "auto", "/ip4/127.0.0.1/tcp/0");
    // Reachable from the tracker: AutoNAT finds it public, so it takes no
    // relay, and the client (which has no route to it) cannot reach it.
    let (_public, _) = wan.serve("public", "auto", "/ip4/0.0.0.0/tcp/0");
    let found = wan.listed(&["private", "public"], |s| {
        s[0]["ping_ms"].as_f64().is_some()
    });
    let (private, public) = (&found[0], &found[1]);
    assert!(private_addr.ends_with(private["peer_id"].as_str().unwrap()));
    // Long enough for the public server's AutoNAT probe to have been
    // answered too (it starts 3 s after joining).
    std::thread::sleep(Duration::from_secs(5));
    let again = wan.listed(&["public"], |_| true);
    assert!(
        public["ping_ms"].is_null() && again[0]["ping_ms"].is_null(),
        "a server the tracker can dial took a relay anyway: {public} / {}",
        again[0]
    );
    let (local, _) = wan.generate(&["--local"]);
    let tracker = wan.tracker_at(1);
    let (relayed, stderr) = wan.generate(&["--tracker", &tracker, "--exclude", "public"]);
    assert_eq!(relayed, local, "{stderr}");
    assert!(stderr.contains("on private"), "{stderr}");
}
