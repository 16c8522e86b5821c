#!/usr/bin/env bash
# The smallest program an operator builds, a tracker and nothing else,
# built cold in release mode at two revisions side by side: crates linked,
# candle crates among them, build time (wall and CPU) and binary size.
#
#   scripts/measure-tracker-build.sh [BEFORE [AFTER]]   (default: 13f4103 HEAD)
#
# Needs the crates already in cargo's cache (it builds --offline). Takes
# several minutes per revision on two cores; CPU seconds are the figure to
# compare when the machine is busy with something else.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/before" 2>/dev/null || true;
      git -C "$repo" worktree remove --force "$work/after" 2>/dev/null || true;
      rm -rf "$work"' EXIT
declare -A rev=([before]="${1:-13f4103}" [after]="${2:-HEAD}")
for side in before after; do
  git -C "$repo" worktree add --detach "$work/$side" "${rev[$side]}" >/dev/null 2>&1
  mkdir -p "$work/tracker-$side/src"
  cat > "$work/tracker-$side/Cargo.toml" <<TOML
[package]
name = "tracker-$side"
version = "0.0.0"
edition = "2021"
publish = false

[workspace]

[dependencies]
swarm-dht = { path = "../$side/swarm-dht" }
swarm-core = { path = "../$side/swarm-core" }
tokio = { version = "1", features = ["rt-multi-thread", "macros"] }
TOML
  cat > "$work/tracker-$side/src/main.rs" <<'RUST'
use swarm_dht::{Node, NodeConfig, RelayMode};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let mut seed = [7u8; 32];
    seed[..16].copy_from_slice(&nanos.to_le_bytes());
    let config = NodeConfig::new(swarm_core::NodeKey::from_seed(seed))
        .with_relay_server(true)
        .with_relay(RelayMode::Never);
    let node = Node::start(config).await?;
    for addr in node.listen_addrs().await? {
        println!("{addr}/p2p/{}", node.peer_id());
    }
    node.shutdown().await;
    Ok(())
}
RUST
  cp "$work/$side/Cargo.lock" "$work/tracker-$side/Cargo.lock"
done
for side in before after; do
  cd "$work/tracker-$side"
  crates=$(cargo tree --offline -e normal --prefix none | sort -u | wc -l)
  candle=$(cargo tree --offline -e normal --prefix none | sort -u | grep -c '^candle' || true)
  /usr/bin/time -f "%e %U %S" -o "$work/time" \
    cargo build --release --offline -j2 --target-dir "$work/target-$side" 2>/dev/null
  read -r wall user sys < "$work/time"
  bin="$work/target-$side/release/tracker-$side"
  strip -o "$bin.stripped" "$bin"
  printf '%-6s %-9s crates %3d (candle %d)  build %6.0f s wall %6.0f s cpu  binary %5.1f MB (stripped %5.1f MB)\n' \
    "$side" "${rev[$side]}" "$crates" "$candle" "$wall" "$(echo "$user + $sys" | bc)" \
    "$(echo "$(stat -c %s "$bin") / 1000000" | bc -l)" "$(echo "$(stat -c %s "$bin.stripped") / 1000000" | bc -l)"
done
