//! How a node's connections are made: TCP (under a private swarm's key
//! when there is one) or QUIC, Noise, yamux; and the tracker's relay limits.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use futures::future::Either;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::{transport, upgrade, Transport};
use libp2p::pnet::PnetConfig;
use libp2p::{identity, multiaddr::Protocol, noise, quic, relay, tcp, yamux, Multiaddr, PeerId};

use crate::identity::SwarmKey;

pub(super) fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::QuicV1))
}

/// The IP address of `addr`, unless it goes through a relay.
pub(super) fn direct_ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

pub(super) type BoxedTransport = transport::Boxed<(PeerId, StreamMuxerBox)>;

/// TCP (under the swarm key when there is one) + Noise + yamux, and QUIC
/// for open swarms.
pub(super) fn transport(
    key: &identity::Keypair,
    swarm_key: Option<SwarmKey>,
) -> Result<BoxedTransport, noise::Error> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let noise = noise::Config::new(key)?;
    let Some(swarm_key) = swarm_key else {
        let tcp = tcp
            .upgrade(upgrade::Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default());
        let quic = quic::tokio::Transport::new(quic::Config::new(key));
        return Ok(tcp
            .or_transport(quic)
            .map(|either, _| match either {
                Either::Left((peer, muxer)) => (peer, StreamMuxerBox::new(muxer)),
                Either::Right((peer, muxer)) => (peer, StreamMuxerBox::new(muxer)),
            })
            .boxed());
    };
    let psk = swarm_key.psk();
    Ok(tcp
        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
        .upgrade(upgrade::Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

/// Limits of a tracker's relay: enough circuits for a swarm's NATed
/// servers while their peers try to hole-punch, each long and large enough
/// to carry inference traffic when the punch fails.
///
/// libp2p's default rates (a new circuit per source address once a minute
/// after a burst of 60) are for public relays of strangers; a tracker
/// serves a lab or a home where many clients and servers share one
/// address, and every `sherpa nodes` connects to each relayed server, so
/// its buckets refill every second. The totals above still cap the load.
pub(super) fn relay_config() -> relay::Config {
    const fn at_least_one(n: u32) -> NonZeroU32 {
        match NonZeroU32::new(n) {
            Some(n) => n,
            None => NonZeroU32::MIN,
        }
    }
    relay::Config {
        max_reservations: 1024,
        max_reservations_per_peer: 4,
        reservation_duration: Duration::from_secs(60 * 60),
        max_circuits: 256,
        max_circuits_per_peer: 16,
        max_circuit_duration: Duration::from_secs(60 * 60),
        max_circuit_bytes: 1 << 30,
        reservation_rate_limiters: Vec::new(),
        circuit_src_rate_limiters: Vec::new(),
    }
    .reservation_rate_per_peer(at_least_one(30), Duration::from_secs(10))
    .reservation_rate_per_ip(at_least_one(256), Duration::from_secs(1))
    .circuit_src_per_peer(at_least_one(60), Duration::from_secs(1))
    .circuit_src_per_ip(at_least_one(600), Duration::from_millis(100))
}
