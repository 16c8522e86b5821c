//! Network namespaces joined by veth pairs, made by a test (root needed) and
//! removed when dropped. Traffic between them never leaves the machine.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A set of namespaces and the links between them.
pub struct Netns {
    names: Vec<String>,
    links: Vec<(usize, usize)>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let ok = Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed (needs root and iproute2)",
            args.join(" ")
        ))
    }
}

impl Netns {
    /// Creates `count` namespaces, and for each `(a, b)` in `links` a veth
    /// pair with `a` on 10.231.<link>.1/24 and `b` on .2. Namespaces route
    /// nothing between links (forwarding is off in new namespaces), and
    /// multicast goes out of each namespace's first link.
    pub fn create(count: usize, links: &[(usize, usize)]) -> Result<Self, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ns = Netns {
            names: (0..count).map(|i| format!("sherpa-{tag}-{i}")).collect(),
            links: links.to_vec(),
        };
        for name in &ns.names {
            ip(&["netns", "add", name])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
        }
        let mut has_multicast = vec![false; count];
        for (l, &(a, b)) in links.iter().enumerate() {
            let ends = [
                (a, format!("sh{tag}{l}a"), 1),
                (b, format!("sh{tag}{l}b"), 2),
            ];
            ip(&[
                "link", "add", &ends[0].1, "type", "veth", "peer", "name", &ends[1].1,
            ])?;
            for (node, dev, host) in &ends {
                let name = &ns.names[*node];
                ip(&["link", "set", dev, "netns", name])?;
                ip(&[
                    "-n",
                    name,
                    "addr",
                    "add",
                    &format!("10.231.{l}.{host}/24"),
                    "dev",
                    dev,
                ])?;
                ip(&["-n", name, "link", "set", dev, "up"])?;
                if !std::mem::replace(&mut has_multicast[*node], true) {
                    ip(&["-n", name, "route", "add", "224.0.0.0/4", "dev", dev])?;
                }
            }
        }
        Ok(ns)
    }

    /// Like [`Netns::create`], but a machine without namespaces may skip
    /// the test (`None`, with a message) only when the person running the
    /// tests says so with `SHERPA_SKIP_NETNS=1`; otherwise it fails, so a
    /// missing capability never passes as a green test.
    pub fn create_or_skip(count: usize, links: &[(usize, usize)]) -> Option<Self> {
        match Self::create(count, links) {
            Ok(ns) => Some(ns),
            Err(why) if std::env::var_os("SHERPA_SKIP_NETNS").is_some_and(|v| v == "1") => {
                eprintln!("SKIPPED (SHERPA_SKIP_NETNS=1): network namespaces unavailable: {why}");
                None
            }
            Err(why) => panic!(
                "network namespaces are needed (root and `ip netns`): {why}. \
                 Set SHERPA_SKIP_NETNS=1 to skip these tests on a machine without them."
            ),
        }
    }

    /// The address of `node` on `link`.
    pub fn addr(&self, link: usize, node: usize) -> String {
        let (a, _) = self.links[link];
        format!("10.231.{link}.{}", if a == node { 1 } else { 2 })
    }

    /// `program` run inside namespace `node`.
    pub fn command(&self, node: usize, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[node], program]);
        cmd
    }
}
