//! The inference protocol's control messages (`/sherpa/infer/3.0.0`).
//!
//! A client opens one stream per hop and keeps it for the session. On the
//! stream, every message is a 4-byte little-endian length and a bincode
//! [`Request`] or [`Response`] (at most [`crate::codec::MAX_CONTROL_MESSAGE`]
//! bytes); a [`Request::Step`] and a [`Response::Stepped`] are followed by
//! one tensor frame ([`crate::tensor_frame`]) holding the hidden states of
//! the step's positions, shape `[1, positions, hidden]`.
//!
//! ```text
//! client                                server
//! Open{model, blocks, max_length, dtype} ->
//!                                        <- Opened{hidden, cache_tokens_free} | Refused
//! Step{start, positions} + frame      ->
//!                                        <- Stepped{positions} + frame | Refused | Failed
//! ...
//! Close                               ->   (the server frees the cache)
//! ```
//!
//! When the client asks for it and the server can, `Opened` carries a
//! [`DirectOffer`]: the client may then move the session to a direct TCP
//! connection sealed with Noise under the offer's key, and every later
//! message goes there instead (the same messages, the same framing).
//!
//! A step must start where the session's cache ends, so a client that
//! lost a server replays its stored inputs into a fresh session from 0.
//!
//! Push: a client relaying every hop waits one round trip per server per
//! token. Instead, when it asks for `push` at open, a server also offers a
//! second direct connection into the session, for the hop before it: the
//! client hands that offer to the previous hop with [`Request::Forward`],
//! and sends each step as [`Request::Chain`], its frame to the first hop
//! only. Each hop runs the step, sends its output straight on to the next
//! hop (a `Step` and frame on that connection) and back to the client as
//! usual, so the client still keeps every hop's input for failover; the
//! later hops take their input from the connection instead of the client.
//!
//! ```text
//! client          hop 1                hop 2
//! Chain{forward} + frame ->
//! Chain{pushed_in}  ----------------->
//!                 Step + frame  -----> (push connection)
//!        <- Stepped + frame
//!        <---------------------------- Stepped + frame
//! ```
//!
//! Each side of a session is a state machine that does no I/O:
//! [`ServerSession`] decides what a server answers, [`ClientSession`]
//! what a client sends and accepts. The network crate drives both.

use bincode::{Decode, Encode};

pub mod client;
pub mod server;

pub use client::ClientSession;
pub use server::ServerSession;

use crate::tensor_frame::WireDType;
use crate::{BlockRange, ModelId};

/// Version of these messages; [`OpenSession::version`] carries it.
pub const INFER_VERSION: u16 = 3;

/// The tensor element type, as it travels in control messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Dtype {
    /// Exact f32 activations.
    F32,
    /// f16 activations: half the bytes (the default).
    F16,
}

impl From<Dtype> for WireDType {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => WireDType::F32,
            Dtype::F16 => WireDType::F16,
        }
    }
}

/// What a client asks for when it opens a session.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct OpenSession {
    /// [`INFER_VERSION`] of the client.
    pub version: u16,
    /// The model.
    pub model: ModelId,
    /// The blocks this hop runs (within what the server hosts).
    pub blocks: BlockRange,
    /// Most positions the session will hold (prompt + generated tokens);
    /// the server reserves KV cache for this many.
    pub max_length: u32,
    /// Element type of the hidden states both ways.
    pub dtype: Dtype,
    /// Whether the client would take a direct connection for the session
    /// ([`DirectOffer`]).
    pub direct: bool,
    /// Whether the client would have the hop before this one push its
    /// output here (an offer for that comes in `Opened::push`).
    pub push: bool,
}

/// Where a hop sends its output on to: the next hop's push offer, at the
/// address the client reaches that server at.
#[derive(Clone, PartialEq, Eq, Encode, Decode)]
pub struct ForwardTarget {
    /// The next server's address.
    pub ip: std::net::IpAddr,
    /// Its offer for a push connection into the client's session there.
    pub offer: DirectOffer,
}

impl std::fmt::Debug for ForwardTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardTarget")
            .field("ip", &self.ip)
            .field("port", &self.offer.port)
            .finish_non_exhaustive()
    }
}

/// A server's offer to carry a session on a direct TCP connection sealed
/// with Noise `NNpsk0` under `psk`, instead of the libp2p stream. It
/// travels only inside the session's authenticated, encrypted stream.
#[derive(Clone, PartialEq, Eq, Encode, Decode)]
pub struct DirectOffer {
    /// The TCP port, on the address the client reaches the server at.
    pub port: u16,
    /// Sent in the clear first, so the server knows which key to expect.
    pub token: [u8; 16],
    /// The connection's pre-shared key: known only to the two ends.
    pub psk: [u8; 32],
}

impl std::fmt::Debug for DirectOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectOffer")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Client to server.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[non_exhaustive]
pub enum Request {
    /// Opens the session; must be the first message.
    Open(OpenSession),
    /// Runs the blocks on `positions` new positions starting at position
    /// `start`; a tensor frame follows.
    Step {
        /// First position; equals the positions already in the cache.
        start: u32,
        /// How many positions the frame holds.
        positions: u32,
    },
    /// Drops cached positions from `keep` on.
    Truncate {
        /// Positions to keep.
        keep: u32,
    },
    /// Ends the session; the server frees its cache.
    Close,
    /// Connects to the next hop's push offer, so that [`Request::Chain`]
    /// steps can send their output straight there.
    Forward(ForwardTarget),
    /// A step of a chain: like [`Request::Step`], but the frame comes from
    /// the previous hop's push connection when `pushed_in` (else it
    /// follows here), and the output also goes to the next hop when
    /// `forward`.
    Chain {
        /// First position; equals the positions already in the cache.
        start: u32,
        /// How many positions.
        positions: u32,
        /// The input comes on the push connection.
        pushed_in: bool,
        /// Send the output on to the next hop as well.
        forward: bool,
    },
}

/// Why a server will not do what was asked. The session (if open) stays
/// usable after a refused step; a refused open ends the stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[non_exhaustive]
pub enum Refusal {
    /// Not enough KV cache memory left for `max_length` positions now.
    Busy {
        /// Positions asked for.
        needed: u32,
        /// Positions the server could still give.
        free: u64,
    },
    /// The server does not host (all of) those blocks.
    NotHosted {
        /// What it hosts.
        hosted: BlockRange,
    },
    /// The server hosts another model.
    WrongModel {
        /// The model it serves.
        served: ModelId,
    },
    /// The client speaks another protocol version.
    Version {
        /// The version the server speaks.
        supported: u16,
    },
    /// The session length asked for is 0 or beyond the model's context.
    Length {
        /// Positions asked for.
        asked: u32,
        /// The model's context, in positions.
        context: u32,
    },
    /// The step does not continue the session: it starts elsewhere, or
    /// runs past `max_length`.
    BadStep {
        /// Where the next step must start.
        expected_start: u32,
        /// The session's length limit.
        max_length: u32,
    },
    /// A message arrived out of order (a step before opening, a second
    /// open).
    Unexpected,
    /// The server cannot send its output on to the next hop: it could
    /// not connect, or was never asked to.
    CannotForward {
        /// Why.
        reason: String,
    },
}

/// Server to client.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[non_exhaustive]
pub enum Response {
    /// The session is open.
    Opened {
        /// Hidden size the frames must have.
        hidden: u32,
        /// KV cache positions the server can still give others.
        cache_tokens_free: u64,
        /// A direct connection for the session, when the client asked and
        /// the server has a direct listener.
        direct: Option<DirectOffer>,
        /// A connection the previous hop may push its output into, when
        /// the client asked for push and the server can take it.
        push: Option<DirectOffer>,
    },
    /// The server connected to the next hop ([`Request::Forward`]).
    Forwarding,
    /// The step ran; the span's output frame follows.
    Stepped {
        /// Positions in the frame.
        positions: u32,
    },
    /// The cache was truncated.
    Truncated,
    /// Not done, and why.
    Refused(Refusal),
    /// The server failed computing; the session is closed.
    Failed {
        /// What went wrong, for the client's log.
        message: String,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Busy { needed, free } => write!(
                f,
                "the server is full: {needed} cache positions asked, {free} free"
            ),
            Refusal::NotHosted { hosted } => write!(f, "the server hosts blocks {hosted} only"),
            Refusal::WrongModel { served } => write!(f, "the server serves {served}"),
            Refusal::Version { supported } => write!(
                f,
                "the server speaks inference protocol version {supported}; upgrade one side"
            ),
            Refusal::Length { asked, context } => write!(
                f,
                "a session of {asked} positions was asked; it must be 1 to the model's context of {context}"
            ),
            Refusal::BadStep {
                expected_start,
                max_length,
            } => write!(
                f,
                "the step must start at position {expected_start} and stay within {max_length}"
            ),
            Refusal::Unexpected => f.write_str("message out of order"),
            Refusal::CannotForward { reason } => {
                write!(f, "the server cannot send its output on: {reason}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use proptest::prelude::*;

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (0u32..1000, 1u32..100, 1u32..1_000_000, any::<bool>()).prop_map(|(s, l, max, f16)| {
                Request::Open(OpenSession {
                    version: INFER_VERSION,
                    model: ModelId::new("smollm2-135m").unwrap(),
                    blocks: BlockRange::new(s, s + l).unwrap(),
                    max_length: max,
                    dtype: if f16 { Dtype::F16 } else { Dtype::F32 },
                    direct: f16,
                    push: !f16,
                })
            }),
            (any::<u32>(), any::<u32>())
                .prop_map(|(start, positions)| Request::Step { start, positions }),
            any::<u32>().prop_map(|keep| Request::Truncate { keep }),
            Just(Request::Close),
            (
                any::<[u8; 16]>(),
                any::<u16>(),
                any::<[u8; 16]>(),
                any::<[u8; 32]>()
            )
                .prop_map(|(ip, port, token, psk)| Request::Forward(ForwardTarget {
                    ip: std::net::IpAddr::from(ip),
                    offer: DirectOffer { port, token, psk },
                })),
            (any::<u32>(), any::<u32>(), any::<bool>(), any::<bool>()).prop_map(
                |(start, positions, pushed_in, forward)| Request::Chain {
                    start,
                    positions,
                    pushed_in,
                    forward
                }
            ),
        ]
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        prop_oneof![
            (
                any::<u32>(),
                any::<u64>(),
                any::<Option<(u16, [u8; 16], [u8; 32])>>(),
                any::<Option<(u16, [u8; 16], [u8; 32])>>(),
            )
                .prop_map(|(hidden, cache_tokens_free, direct, push)| {
                    Response::Opened {
                        hidden,
                        cache_tokens_free,
                        direct: direct.map(|(port, token, psk)| DirectOffer { port, token, psk }),
                        push: push.map(|(port, token, psk)| DirectOffer { port, token, psk }),
                    }
                }),
            Just(Response::Forwarding),
            any::<u32>().prop_map(|positions| Response::Stepped { positions }),
            Just(Response::Truncated),
            (any::<u32>(), any::<u64>())
                .prop_map(|(needed, free)| Response::Refused(Refusal::Busy { needed, free })),
            (0u32..100).prop_map(|s| Response::Refused(Refusal::NotHosted {
                hosted: BlockRange::new(s, s + 1).unwrap()
            })),
            Just(Response::Refused(Refusal::WrongModel {
                served: ModelId::new("m").unwrap()
            })),
            any::<u16>().prop_map(|supported| Response::Refused(Refusal::Version { supported })),
            (any::<u32>(), any::<u32>()).prop_map(
                |(expected_start, max_length)| Response::Refused(Refusal::BadStep {
                    expected_start,
                    max_length
                })
            ),
            (any::<u32>(), any::<u32>())
                .prop_map(|(asked, context)| Response::Refused(Refusal::Length { asked, context })),
            Just(Response::Refused(Refusal::Unexpected)),
            "[ -~]{0,200}".prop_map(|reason| Response::Refused(Refusal::CannotForward { reason })),
            "[ -~]{0,200}".prop_map(|message| Response::Failed { message }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(request in arb_request()) {
            let bytes = codec::encode(&request).unwrap();
            prop_assert_eq!(codec::decode::<Request>(&bytes).unwrap(), request);
        }

        #[test]
        fn responses_round_trip(response in arb_response()) {
            let bytes = codec::encode(&response).unwrap();
            prop_assert_eq!(codec::decode::<Response>(&bytes).unwrap(), response);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = codec::decode::<Request>(&bytes);
            let _ = codec::decode::<Response>(&bytes);
        }
    }

    #[test]
    fn an_open_with_an_inverted_block_range_does_not_decode() {
        let open = Request::Open(OpenSession {
            version: INFER_VERSION,
            model: ModelId::new("m").unwrap(),
            blocks: BlockRange::new(0, 4).unwrap(),
            max_length: 16,
            dtype: Dtype::F16,
            direct: false,
            push: false,
        });
        let mut bytes = codec::encode(&open).unwrap();
        // Swap the range's ends (start 0, end 4 -> start 4, end 0).
        let at = bytes.iter().rposition(|b| *b == 4).unwrap();
        bytes.swap(at, at - 1);
        assert!(codec::decode::<Request>(&bytes).is_err());
    }
}
