//! A server's side of one session, as a state machine that does no I/O.
//!
//! [`ServerSession`] decides everything the protocol decides: whether an
//! open is refused and why, whether a step continues the session, what
//! is answered and when the session ends. Its driver (the network crate's
//! session loop, or a test) does what it is told, one [`Output`] at a
//! time: read the next message or frame, reserve a cache, run the span,
//! send an answer. It then reports what came of it as the next [`Input`].
//!
//! ```
//! use swarm_core::infer::server::{Input, Output, Reservation, ServerSession, Span};
//! use swarm_core::infer::{Dtype, OpenSession, Request, Response, INFER_VERSION};
//! use swarm_core::{BlockRange, ModelId};
//!
//! let model = ModelId::new("m").unwrap();
//! let span = Span { model: model.clone(), hosted: BlockRange::new(0, 4).unwrap(), context: 64, hidden: 2 };
//! let mut session = ServerSession::new(span);
//! let open = OpenSession {
//!     version: INFER_VERSION, model, blocks: BlockRange::new(0, 4).unwrap(),
//!     max_length: 8, dtype: Dtype::F32, direct: false, push: false,
//! };
//! // The driver reads the first message and hands it over.
//! let out = session.handle(Input::Request(Some(Request::Open(open))));
//! assert!(matches!(out, Output::Reserve { max_length: 8, .. }));
//! let made = Reservation::Made { cache_tokens_free: 56, direct: None, push: None };
//! assert!(matches!(session.handle(Input::Reserved(made)), Output::Send(Response::Opened { .. })));
//! assert!(matches!(session.handle(Input::Sent), Output::SettleLink));
//! // A step that does not start at position 0 is refused; the session goes on.
//! let step = Request::Step { start: 3, positions: 1 };
//! assert!(matches!(session.handle(Input::Request(Some(step))), Output::ReadFrame { max_values: 2 }));
//! let frame = Input::Frame { dims: vec![1, 1, 2], values: vec![0.0; 2] };
//! assert!(matches!(session.handle(frame), Output::Send(Response::Refused(_))));
//! assert!(matches!(session.handle(Input::Sent), Output::ReadRequest));
//! assert!(matches!(session.handle(Input::Request(None)), Output::Finish));
//! ```

use super::{
    DirectOffer, Dtype, ForwardTarget, OpenSession, Refusal, Request, Response, INFER_VERSION,
};
use crate::tensor_frame::WireDType;
use crate::{BlockRange, ModelId};

/// Most positions one step may carry (a long prompt's prefill).
pub const MAX_STEP_POSITIONS: usize = 8192;

/// What the server serves, as far as the protocol is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// The model.
    pub model: ModelId,
    /// The blocks it computes.
    pub hosted: BlockRange,
    /// The model's context, in positions.
    pub context: usize,
    /// The hidden size of the frames.
    pub hidden: usize,
}

/// What the driver reports, in answer to the last [`Output`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Input {
    /// The client's next message (`None`: its stream ended). Answers
    /// [`Output::ReadRequest`] and [`Output::SettleLink`]; also the first
    /// input of a session.
    Request(Option<Request>),
    /// The tensor frame that followed a step (or came on the push
    /// connection); answers [`Output::ReadFrame`] and
    /// [`Output::ReadPushedFrame`].
    Frame {
        /// Its shape.
        dims: Vec<usize>,
        /// Its values.
        values: Vec<f32>,
    },
    /// Whether the cache could be reserved; answers [`Output::Reserve`].
    Reserved(Reservation),
    /// The cache was truncated; answers [`Output::Truncate`].
    Truncated,
    /// The span's output, or why computing it failed; answers
    /// [`Output::Compute`].
    Computed(Result<Vec<f32>, String>),
    /// The answer went out; answers [`Output::Send`] and
    /// [`Output::SendTensor`].
    Sent,
    /// No pushed frame came (the push connection failed or sent something
    /// else); answers [`Output::ReadPushedFrame`]. The session ends.
    PushLost(String),
    /// Whether the connection to the next hop was made; answers
    /// [`Output::Connect`].
    Connected(Result<(), String>),
}

/// How reserving a session's cache went.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reservation {
    /// Reserved.
    Made {
        /// Positions the server can still give other sessions.
        cache_tokens_free: u64,
        /// A direct connection offered for the session, if any.
        direct: Option<DirectOffer>,
        /// A push connection offered for the previous hop, if any.
        push: Option<DirectOffer>,
    },
    /// Not enough cache memory left now.
    Busy {
        /// Positions asked for.
        needed: u32,
        /// Positions free.
        free: u64,
    },
    /// Something else went wrong; the message goes to the client.
    Failed(String),
}

/// What the driver does next.
#[derive(Debug)]
#[non_exhaustive]
pub enum Output {
    /// Read the client's next message (bounded by the idle timeout) and
    /// report it as [`Input::Request`].
    ReadRequest,
    /// Read the tensor frame that follows a step, refusing one of more
    /// than `max_values` values, and report it as [`Input::Frame`].
    ReadFrame {
        /// Most values the frame may hold (what the step announced).
        max_values: usize,
    },
    /// Reserve a cache for `max_length` positions of `blocks`; report
    /// [`Input::Reserved`].
    Reserve {
        /// The blocks the session runs.
        blocks: BlockRange,
        /// Its length limit, in positions.
        max_length: usize,
        /// Whether the client asked for a direct connection: offer one
        /// in [`Reservation::Made`] if the server can.
        direct: bool,
        /// Whether the client asked for a push connection: likewise.
        push: bool,
    },
    /// Read the next step's frame from the push connection (the first
    /// push waits for that connection to be made): a `Step` of exactly
    /// these positions and its frame of at most `max_values` values, as
    /// [`Input::Frame`], or [`Input::PushLost`].
    ReadPushedFrame {
        /// Where the step starts.
        start: u32,
        /// Its positions.
        positions: u32,
        /// Most values the frame may hold.
        max_values: usize,
    },
    /// Connect to the next hop's push offer; report [`Input::Connected`].
    Connect(ForwardTarget),
    /// `Opened` went out: move to the direct connection if the client
    /// takes the offer, then report its first message there or on the
    /// stream as [`Input::Request`].
    SettleLink,
    /// Drop cached positions from `keep` on; report [`Input::Truncated`].
    Truncate {
        /// Positions to keep.
        keep: usize,
    },
    /// Run the span on `positions` positions; report [`Input::Computed`].
    Compute {
        /// `positions x hidden` input values.
        values: Vec<f32>,
        /// How many positions.
        positions: usize,
        /// Position x blocks, what the step costs.
        work: usize,
    },
    /// Send this answer; report [`Input::Sent`].
    Send(Response),
    /// Send this answer and then the frame; report [`Input::Sent`]. With
    /// `forward`, first send that request and the same frame to the next
    /// hop (a failure there is the next hop's to report).
    SendTensor {
        /// The answer.
        response: Response,
        /// The `Step` for the next hop's push connection, if the output
        /// goes on.
        forward: Option<Request>,
        /// The frame's values.
        values: Vec<f32>,
        /// The frame's shape.
        dims: [usize; 3],
        /// How the values travel.
        dtype: WireDType,
    },
    /// The session is over: free its cache and close the stream.
    Finish,
}

/// Where a session is.
#[derive(Debug)]
enum Phase {
    /// Waiting for the first message.
    Opening,
    /// Waiting for the cache reservation of this open.
    Reserving(OpenSession),
    /// `Opened` is going out.
    Opened(Open),
    /// Between steps.
    Ready(Open),
    /// Waiting for a step's frame.
    Framing(Open, Step),
    /// Waiting for a step's computation.
    Computing(Open, Step),
    /// Waiting for the connection to the next hop.
    Connecting(Open),
    /// Waiting for a truncation.
    Truncating(Open, usize),
    /// An answer is going out; then the next message.
    Answering(Open),
    /// A last answer is going out; then the end.
    Closing,
    /// Over.
    Done,
}

/// An open session's terms and progress.
#[derive(Debug, Clone, Copy)]
struct Open {
    blocks: BlockRange,
    max_length: u32,
    dtype: Dtype,
    /// Positions the cache holds.
    len: usize,
    /// Whether the connection to the next hop is made.
    forwarding: bool,
}

/// A step whose frame is awaited.
#[derive(Debug, Clone)]
struct Step {
    start: u32,
    positions: usize,
    /// The output goes on to the next hop too.
    forward: bool,
    /// Refused once its frame is read.
    refuse: Option<Refusal>,
}

/// The server's side of one session; see the [module docs](self).
#[derive(Debug)]
pub struct ServerSession {
    span: Span,
    phase: Phase,
}

impl ServerSession {
    /// A session on `span`, before its first message.
    pub fn new(span: Span) -> Self {
        Self {
            span,
            phase: Phase::Opening,
        }
    }

    /// Positions the session's cache holds.
    pub fn len(&self) -> usize {
        match &self.phase {
            Phase::Opened(o)
            | Phase::Ready(o)
            | Phase::Framing(o, _)
            | Phase::Computing(o, _)
            | Phase::Connecting(o)
            | Phase::Truncating(o, _)
            | Phase::Answering(o) => o.len,
            _ => 0,
        }
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the session is over.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Takes what came of the last output; says what to do next.
    pub fn handle(&mut self, input: Input) -> Output {
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        let (phase, output) = self.advance(phase, input);
        self.phase = phase;
        output
    }

    fn advance(&self, phase: Phase, input: Input) -> (Phase, Output) {
        match (phase, input) {
            (Phase::Opening, Input::Request(request)) => match request {
                None => (Phase::Done, Output::Finish),
                Some(Request::Open(open)) => match self.refuse_open(&open) {
                    Some(refusal) => closing(Response::Refused(refusal)),
                    None => {
                        let reserve = Output::Reserve {
                            blocks: open.blocks,
                            max_length: open.max_length as usize,
                            direct: open.direct,
                            push: open.push,
                        };
                        (Phase::Reserving(open), reserve)
                    }
                },
                Some(_) => closing(Response::Refused(Refusal::Unexpected)),
            },
            (Phase::Reserving(open), Input::Reserved(reservation)) => match reservation {
                Reservation::Made {
                    cache_tokens_free,
                    direct,
                    push,
                } => {
                    let opened = Response::Opened {
                        hidden: u32::try_from(self.span.hidden).unwrap_or(u32::MAX),
                        cache_tokens_free,
                        direct,
                        push,
                    };
                    let state = Open {
                        blocks: open.blocks,
                        max_length: open.max_length,
                        dtype: open.dtype,
                        len: 0,
                        forwarding: false,
                    };
                    (Phase::Opened(state), Output::Send(opened))
                }
                Reservation::Busy { needed, free } => {
                    closing(Response::Refused(Refusal::Busy { needed, free }))
                }
                Reservation::Failed(message) => closing(Response::Failed { message }),
            },
            (Phase::Opened(open), Input::Sent) => (Phase::Ready(open), Output::SettleLink),
            (Phase::Answering(open), Input::Sent) => (Phase::Ready(open), Output::ReadRequest),
            (Phase::Closing, Input::Sent) => (Phase::Done, Output::Finish),
            (Phase::Ready(open), Input::Request(request)) => match request {
                None | Some(Request::Close) => (Phase::Done, Output::Finish),
                Some(Request::Truncate { keep }) => {
                    let keep = (keep as usize).min(open.len);
                    (Phase::Truncating(open, keep), Output::Truncate { keep })
                }
                Some(Request::Step { start, positions }) => {
                    self.read_step(open, start, positions, false, false)
                }
                Some(Request::Chain {
                    start,
                    positions,
                    pushed_in,
                    forward,
                }) => {
                    let (phase, read) = self.read_step(open, start, positions, pushed_in, forward);
                    match phase {
                        // The frame is read and dropped with the refusal,
                        // so every connection stays in step.
                        Phase::Framing(open, mut step) if forward && !open.forwarding => {
                            step.refuse = Some(Refusal::CannotForward {
                                reason: "no connection to the next hop was asked for".into(),
                            });
                            (Phase::Framing(open, step), read)
                        }
                        phase => (phase, read),
                    }
                }
                Some(Request::Forward(target)) => {
                    (Phase::Connecting(open), Output::Connect(target))
                }
                // A second open, or a request this server does not know.
                Some(_) => answering(open, Response::Refused(Refusal::Unexpected)),
            },
            (Phase::Framing(..), Input::PushLost(message)) => closing(Response::Failed {
                message: format!("no input came from the previous hop: {message}"),
            }),
            (Phase::Connecting(mut open), Input::Connected(made)) => match made {
                Ok(()) => {
                    open.forwarding = true;
                    answering(open, Response::Forwarding)
                }
                Err(reason) => {
                    open.forwarding = false;
                    answering(open, Response::Refused(Refusal::CannotForward { reason }))
                }
            },
            (Phase::Framing(open, step), Input::Frame { dims, values }) => {
                if let Some(refusal) = step.refuse {
                    return answering(open, Response::Refused(refusal));
                }
                let n = step.positions;
                let continues = step.start as usize == open.len
                    && n > 0
                    && n <= MAX_STEP_POSITIONS
                    && open.len + n <= open.max_length as usize
                    && dims == [1, n, self.span.hidden];
                if !continues {
                    let refusal = Refusal::BadStep {
                        expected_start: u32::try_from(open.len).unwrap_or(u32::MAX),
                        max_length: open.max_length,
                    };
                    return answering(open, Response::Refused(refusal));
                }
                let work = n * open.blocks.len() as usize;
                let compute = Output::Compute {
                    values,
                    positions: n,
                    work,
                };
                (Phase::Computing(open, step), compute)
            }
            (Phase::Computing(mut open, step), Input::Computed(out)) => match out {
                Ok(values) => {
                    let n = step.positions;
                    open.len += n;
                    let positions = u32::try_from(n).unwrap_or(u32::MAX);
                    let forward = (step.forward && open.forwarding).then_some(Request::Step {
                        start: step.start,
                        positions,
                    });
                    let send = Output::SendTensor {
                        response: Response::Stepped { positions },
                        forward,
                        values,
                        dims: [1, n, self.span.hidden],
                        dtype: open.dtype.into(),
                    };
                    (Phase::Answering(open), send)
                }
                // The cache may hold part of the step: the session ends.
                Err(message) => closing(Response::Failed { message }),
            },
            (Phase::Truncating(mut open, keep), Input::Truncated) => {
                open.len = keep;
                answering(open, Response::Truncated)
            }
            (Phase::Done, _) => (Phase::Done, Output::Finish),
            // The driver reported something other than what it was
            // asked for: a bug on its side, which ends the session with
            // a message rather than a guess.
            (phase, input) => closing(Response::Failed {
                message: format!(
                    "server session out of order: {} while {}",
                    input_name(&input),
                    phase_name(&phase)
                ),
            }),
        }
    }

    /// Reads the frame of a step (here, or from the push connection); its
    /// size is capped by what was announced, and it is read even when the
    /// step is then refused, so the stream stays in step.
    fn read_step(
        &self,
        open: Open,
        start: u32,
        positions: u32,
        pushed_in: bool,
        forward: bool,
    ) -> (Phase, Output) {
        let n = positions as usize;
        let max_values = n.min(MAX_STEP_POSITIONS) * self.span.hidden;
        let step = Step {
            start,
            positions: n,
            forward,
            refuse: None,
        };
        let read = if pushed_in {
            Output::ReadPushedFrame {
                start,
                positions,
                max_values,
            }
        } else {
            Output::ReadFrame { max_values }
        };
        (Phase::Framing(open, step), read)
    }

    fn refuse_open(&self, open: &OpenSession) -> Option<Refusal> {
        let hosted = self.span.hosted;
        let context = self.span.context;
        if open.version != INFER_VERSION {
            Some(Refusal::Version {
                supported: INFER_VERSION,
            })
        } else if open.model != self.span.model {
            Some(Refusal::WrongModel {
                served: self.span.model.clone(),
            })
        } else if open.blocks.start() < hosted.start() || open.blocks.end() > hosted.end() {
            Some(Refusal::NotHosted { hosted })
        } else if open.max_length == 0 || open.max_length as usize > context {
            Some(Refusal::Length {
                asked: open.max_length,
                context: u32::try_from(context).unwrap_or(u32::MAX),
            })
        } else {
            None
        }
    }
}

/// Sends `response` and then ends the session.
fn closing(response: Response) -> (Phase, Output) {
    (Phase::Closing, Output::Send(response))
}

/// Sends `response` and then waits for the next message.
fn answering(open: Open, response: Response) -> (Phase, Output) {
    (Phase::Answering(open), Output::Send(response))
}

fn input_name(input: &Input) -> &'static str {
    match input {
        Input::Request(_) => "a request",
        Input::Frame { .. } => "a frame",
        Input::Reserved(_) => "a reservation",
        Input::Truncated => "a truncation",
        Input::Computed(_) => "a computation",
        Input::Sent => "a sent answer",
        Input::PushLost(_) => "a lost push",
        Input::Connected(_) => "a connection",
    }
}

fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::Opening => "opening",
        Phase::Reserving(_) => "reserving",
        Phase::Opened(_) => "sending Opened",
        Phase::Ready(_) => "waiting for a request",
        Phase::Framing(..) => "waiting for a frame",
        Phase::Computing(..) => "computing",
        Phase::Connecting(_) => "connecting to the next hop",
        Phase::Truncating(..) => "truncating",
        Phase::Answering(_) | Phase::Closing => "sending an answer",
        Phase::Done => "finished",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model() -> ModelId {
        ModelId::new("m").unwrap()
    }

    fn span() -> Span {
        Span {
            model: model(),
            hosted: BlockRange::new(2, 6).unwrap(),
            context: 32,
            hidden: 3,
        }
    }

    fn open(start: u32, end: u32, max_length: u32) -> Request {
        Request::Open(OpenSession {
            version: INFER_VERSION,
            model: model(),
            blocks: BlockRange::new(start, end).unwrap(),
            max_length,
            dtype: Dtype::F16,
            direct: false,
            push: true,
        })
    }

    /// A session opened on blocks 2..6 for 8 positions, before its first
    /// step.
    fn opened() -> ServerSession {
        let mut s = ServerSession::new(span());
        s.handle(Input::Request(Some(open(2, 6, 8))));
        let made = Reservation::Made {
            cache_tokens_free: 10,
            direct: None,
            push: None,
        };
        s.handle(Input::Reserved(made));
        assert!(matches!(s.handle(Input::Sent), Output::SettleLink));
        s
    }

    /// Runs one step of `n` positions starting at `start` with a frame of
    /// `dims`; returns what the session sends.
    fn step(s: &mut ServerSession, start: u32, n: u32, dims: Vec<usize>) -> Output {
        let request = Request::Step {
            start,
            positions: n,
        };
        let Output::ReadFrame { max_values } = s.handle(Input::Request(Some(request))) else {
            panic!("a step reads its frame");
        };
        assert_eq!(max_values, (n as usize).min(MAX_STEP_POSITIONS) * 3);
        let values = vec![0.5; dims.iter().product()];
        match s.handle(Input::Frame { dims, values }) {
            Output::Compute {
                values,
                positions,
                work,
            } => {
                assert_eq!(work, positions * 4, "positions x 4 blocks");
                s.handle(Input::Computed(Ok(values)))
            }
            other => other,
        }
    }

    fn target() -> ForwardTarget {
        ForwardTarget {
            ip: std::net::IpAddr::from([127, 0, 0, 1]),
            offer: DirectOffer {
                port: 9,
                token: [1; 16],
                psk: [2; 32],
            },
        }
    }

    /// Sends a chained step and feeds its frame; returns what the session
    /// then does.
    fn chain(s: &mut ServerSession, start: u32, n: u32, pushed_in: bool, forward: bool) -> Output {
        let request = Request::Chain {
            start,
            positions: n,
            pushed_in,
            forward,
        };
        match s.handle(Input::Request(Some(request))) {
            Output::ReadPushedFrame {
                start: s0,
                positions,
                max_values,
            } => {
                assert!(pushed_in, "only a pushed step reads the push connection");
                assert_eq!((s0, positions, max_values), (start, n, n as usize * 3));
            }
            Output::ReadFrame { max_values } => {
                assert!(!pushed_in);
                assert_eq!(max_values, n as usize * 3);
            }
            other => panic!("a chained step reads its frame first, not {other:?}"),
        }
        let dims = vec![1, n as usize, 3];
        let values = vec![0.5; n as usize * 3];
        match s.handle(Input::Frame { dims, values }) {
            Output::Compute { values, .. } => s.handle(Input::Computed(Ok(values))),
            other => other,
        }
    }

    #[test]
    fn a_chain_reads_pushed_input_and_sends_its_output_on() {
        let mut s = opened();
        // Forwarding before a connection is refused, after its frame is read.
        let r = refusal(chain(&mut s, 0, 1, false, true));
        assert!(matches!(r, Refusal::CannotForward { .. }), "{r:?}");
        s.handle(Input::Sent);
        assert_eq!(s.len(), 0);
        // A connection that fails is refused; the session goes on.
        let out = s.handle(Input::Request(Some(Request::Forward(target()))));
        assert!(matches!(out, Output::Connect(t) if t == target()));
        let out = s.handle(Input::Connected(Err("no route".into())));
        assert!(matches!(
            refusal(out),
            Refusal::CannotForward { reason } if reason == "no route"
        ));
        s.handle(Input::Sent);
        s.handle(Input::Request(Some(Request::Forward(target()))));
        assert!(matches!(
            s.handle(Input::Connected(Ok(()))),
            Output::Send(Response::Forwarding)
        ));
        assert!(matches!(s.handle(Input::Sent), Output::ReadRequest));
        // Pushed in and forwarded: the next hop gets a Step of the same
        // positions, and the client the usual answer.
        let Output::SendTensor {
            response, forward, ..
        } = chain(&mut s, 0, 2, true, true)
        else {
            panic!("a chained step answers with a frame");
        };
        assert_eq!(response, Response::Stepped { positions: 2 });
        assert_eq!(
            forward,
            Some(Request::Step {
                start: 0,
                positions: 2
            })
        );
        s.handle(Input::Sent);
        // Not forwarded when the client does not ask (a relayed step).
        let Output::SendTensor { forward, .. } = chain(&mut s, 2, 1, false, false) else {
            panic!("a chained step answers with a frame");
        };
        assert_eq!(forward, None);
        s.handle(Input::Sent);
        assert_eq!(s.len(), 3);
        // A pushed frame that never comes ends the session with why.
        s.handle(Input::Request(Some(Request::Chain {
            start: 3,
            positions: 1,
            pushed_in: true,
            forward: false,
        })));
        let out = s.handle(Input::PushLost("the previous hop hung up".into()));
        assert!(
            matches!(out, Output::Send(Response::Failed { message }) if message.contains("hung up"))
        );
        assert!(matches!(s.handle(Input::Sent), Output::Finish));
    }

    fn refusal(out: Output) -> Refusal {
        match out {
            Output::Send(Response::Refused(r)) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn opens_are_refused_with_the_reason() {
        let cases = [
            (open(0, 4, 8), "NotHosted"),
            (open(2, 6, 0), "Length"),
            (open(2, 6, 33), "Length"),
            (
                Request::Step {
                    start: 0,
                    positions: 1,
                },
                "Unexpected",
            ),
        ];
        for (request, why) in cases {
            let mut s = ServerSession::new(span());
            let r = refusal(s.handle(Input::Request(Some(request))));
            assert!(format!("{r:?}").starts_with(why), "{r:?} is not {why}");
            assert!(matches!(s.handle(Input::Sent), Output::Finish));
            assert!(s.is_finished());
        }
        let mut other = span();
        other.model = ModelId::new("other").unwrap();
        let mut s = ServerSession::new(other);
        let r = refusal(s.handle(Input::Request(Some(open(2, 6, 8)))));
        assert_eq!(
            r,
            Refusal::WrongModel {
                served: ModelId::new("other").unwrap()
            }
        );
        let mut s = ServerSession::new(span());
        let Request::Open(mut old) = open(2, 6, 8) else {
            unreachable!()
        };
        old.version = INFER_VERSION - 1;
        let r = refusal(s.handle(Input::Request(Some(Request::Open(old)))));
        assert_eq!(
            r,
            Refusal::Version {
                supported: INFER_VERSION
            }
        );
    }

    #[test]
    fn a_full_server_says_busy_and_a_failed_reservation_says_why() {
        let mut s = ServerSession::new(span());
        s.handle(Input::Request(Some(open(3, 5, 8))));
        let busy = Reservation::Busy { needed: 8, free: 2 };
        assert_eq!(
            refusal(s.handle(Input::Reserved(busy))),
            Refusal::Busy { needed: 8, free: 2 }
        );
        assert!(matches!(s.handle(Input::Sent), Output::Finish));

        let mut s = ServerSession::new(span());
        s.handle(Input::Request(Some(open(3, 5, 8))));
        let out = s.handle(Input::Reserved(Reservation::Failed("disk".into())));
        assert!(matches!(out, Output::Send(Response::Failed { message }) if message == "disk"));
        assert!(matches!(s.handle(Input::Sent), Output::Finish));
    }

    #[test]
    fn steps_continue_the_cache_and_answer_with_its_output() {
        let mut s = opened();
        let out = step(&mut s, 0, 2, vec![1, 2, 3]);
        let Output::SendTensor {
            response,
            forward,
            values,
            dims,
            dtype,
        } = out
        else {
            panic!("a step answers with a frame");
        };
        assert_eq!(response, Response::Stepped { positions: 2 });
        assert_eq!(forward, None, "a plain step goes back only");
        assert_eq!((values.len(), dims, dtype), (6, [1, 2, 3], WireDType::F16));
        assert!(matches!(s.handle(Input::Sent), Output::ReadRequest));
        assert_eq!(s.len(), 2);
        // Out of place, wrong shape, past max_length: refused, and the
        // session goes on where it was.
        for (start, n, dims) in [
            (0, 1, vec![1, 1, 3]),
            (2, 1, vec![1, 2, 3]),
            (2, 7, vec![1, 7, 3]),
            (2, 0, vec![1, 0, 3]),
        ] {
            let r = refusal(step(&mut s, start, n, dims));
            assert_eq!(
                r,
                Refusal::BadStep {
                    expected_start: 2,
                    max_length: 8
                }
            );
            assert!(matches!(s.handle(Input::Sent), Output::ReadRequest));
        }
        assert!(matches!(
            step(&mut s, 2, 6, vec![1, 6, 3]),
            Output::SendTensor { .. }
        ));
        s.handle(Input::Sent);
        assert_eq!(s.len(), 8);
    }

    #[test]
    fn truncation_moves_the_next_start_back() {
        let mut s = opened();
        step(&mut s, 0, 4, vec![1, 4, 3]);
        s.handle(Input::Sent);
        let out = s.handle(Input::Request(Some(Request::Truncate { keep: 9 })));
        assert!(
            matches!(out, Output::Truncate { keep: 4 }),
            "never past the cache"
        );
        s.handle(Input::Truncated);
        s.handle(Input::Sent);
        let out = s.handle(Input::Request(Some(Request::Truncate { keep: 1 })));
        assert!(matches!(out, Output::Truncate { keep: 1 }));
        assert!(matches!(
            s.handle(Input::Truncated),
            Output::Send(Response::Truncated)
        ));
        s.handle(Input::Sent);
        assert_eq!(s.len(), 1);
        assert!(matches!(
            step(&mut s, 1, 1, vec![1, 1, 3]),
            Output::SendTensor { .. }
        ));
    }

    #[test]
    fn a_failed_computation_ends_the_session_with_its_message() {
        let mut s = opened();
        s.handle(Input::Request(Some(Request::Step {
            start: 0,
            positions: 1,
        })));
        s.handle(Input::Frame {
            dims: vec![1, 1, 3],
            values: vec![0.0; 3],
        });
        let out = s.handle(Input::Computed(Err("out of memory".into())));
        assert!(
            matches!(out, Output::Send(Response::Failed { message }) if message == "out of memory")
        );
        assert!(matches!(s.handle(Input::Sent), Output::Finish));
    }

    #[test]
    fn a_second_open_is_refused_and_close_or_end_of_stream_finishes() {
        let mut s = opened();
        assert_eq!(
            refusal(s.handle(Input::Request(Some(open(2, 6, 8))))),
            Refusal::Unexpected
        );
        assert!(matches!(s.handle(Input::Sent), Output::ReadRequest));
        assert!(matches!(
            s.handle(Input::Request(Some(Request::Close))),
            Output::Finish
        ));
        let mut s = opened();
        assert!(matches!(s.handle(Input::Request(None)), Output::Finish));
        let mut s = ServerSession::new(span());
        assert!(matches!(s.handle(Input::Request(None)), Output::Finish));
    }

    #[test]
    fn a_driver_out_of_order_gets_a_failure_not_a_panic() {
        let mut s = ServerSession::new(span());
        let out = s.handle(Input::Computed(Ok(vec![1.0])));
        assert!(matches!(out, Output::Send(Response::Failed { .. })));
        assert!(matches!(s.handle(Input::Sent), Output::Finish));
        assert!(
            matches!(s.handle(Input::Sent), Output::Finish),
            "stays finished"
        );
    }

    fn arb_request() -> impl Strategy<Value = Option<Request>> {
        prop_oneof![
            Just(None),
            (0u32..8, 0u32..8, 0u32..40).prop_map(|(a, b, m)| Some(open(
                a.min(b),
                a.max(b) + 1,
                m
            ))),
            (0u32..12, 0u32..12)
                .prop_map(|(start, positions)| Some(Request::Step { start, positions })),
            (0u32..12).prop_map(|keep| Some(Request::Truncate { keep })),
            Just(Some(Request::Close)),
            (0u32..12, 0u32..12, any::<bool>(), any::<bool>()).prop_map(
                |(start, positions, pushed_in, forward)| Some(Request::Chain {
                    start,
                    positions,
                    pushed_in,
                    forward,
                })
            ),
            Just(Some(Request::Forward(target()))),
        ]
    }

    proptest! {
        /// Driven like the real loop by any sequence of client messages,
        /// the session
        /// never asks for more than was announced, never computes past
        /// its length limit, and its cache length is always what the
        /// accepted steps and truncations make it.
        #[test]
        fn any_client_keeps_the_session_consistent(
            requests in proptest::collection::vec(arb_request(), 0..30)
        ) {
            let mut s = ServerSession::new(span());
            let mut limit = None;
            let mut requests = requests.into_iter();
            let mut input = Input::Request(requests.next().flatten());
            let mut expected_len = 0usize;
            let mut connects = 0;
            for _ in 0..200 {
                input = match s.handle(input) {
                    Output::ReadRequest | Output::SettleLink => {
                        prop_assert_eq!(s.len(), expected_len);
                        Input::Request(requests.next().flatten())
                    }
                    Output::ReadFrame { max_values } | Output::ReadPushedFrame { max_values, .. } => {
                        prop_assert!(max_values <= MAX_STEP_POSITIONS * 3);
                        let n = max_values / 3;
                        Input::Frame { dims: vec![1, n, 3], values: vec![0.0; max_values] }
                    }
                    Output::Connect(_) => {
                        connects += 1;
                        Input::Connected(if connects % 2 == 0 { Ok(()) } else { Err("unreachable".into()) })
                    }
                    Output::Reserve { max_length, .. } => {
                        limit = Some(max_length);
                        Input::Reserved(Reservation::Made { cache_tokens_free: 0, direct: None, push: None })
                    }
                    Output::Truncate { keep } => {
                        prop_assert!(keep <= expected_len);
                        expected_len = keep;
                        Input::Truncated
                    }
                    Output::Compute { values, positions, .. } => {
                        expected_len += positions;
                        prop_assert!(Some(expected_len) <= limit);
                        Input::Computed(Ok(values))
                    }
                    Output::SendTensor { forward, .. } => {
                        prop_assert!(forward.is_none() || connects >= 2, "forwards only once connected");
                        Input::Sent
                    }
                    Output::Send(_) => Input::Sent,
                    Output::Finish => break,
                };
            }
            prop_assert!(s.is_finished(), "every session ends once its client does");
        }
    }
}
