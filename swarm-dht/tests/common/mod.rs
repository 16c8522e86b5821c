//! Shared pieces of the network tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use futures::StreamExt;
use libp2p::Multiaddr;

/// A bare libp2p peer (TCP + Noise + yamux, no Sherpa behaviours) dialled
/// to `addr`, that can open raw streams on any protocol: how the tests play
/// a hostile peer. The task drives its swarm until aborted.
pub fn raw_peer(addr: Multiaddr) -> (libp2p_stream::Control, tokio::task::JoinHandle<()>) {
    let streams = libp2p_stream::Behaviour::new();
    let control = streams.new_control();
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| streams)
        .unwrap()
        .build();
    swarm.dial(addr).unwrap();
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    (control, driver)
}
