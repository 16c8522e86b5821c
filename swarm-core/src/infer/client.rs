//! A client's side of one session (one hop), as a state machine that does
//! no I/O.
//!
//! [`ClientSession`] builds the requests and judges the server's answers:
//! an answer that is not the one the protocol allows there, a frame of
//! another shape than asked, a step out of place, all become a
//! [`CoreError`] before any value reaches the caller. Its driver (the
//! network crate's `RemoteSession`) only moves bytes and keeps time.

use super::{DirectOffer, Dtype, ForwardTarget, OpenSession, Request, Response};
use crate::tensor_frame::WireDType;
use crate::CoreError;

/// The client's side of an open session; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ClientSession {
    hidden: usize,
    dtype: Dtype,
    max_length: u32,
    /// Positions the server's cache holds.
    len: u32,
    /// Positions of the step sent and not yet answered.
    pending: Option<usize>,
    /// Positions kept by the truncation sent and not yet answered.
    truncating: Option<u32>,
    /// The server's offer of a push connection for the previous hop.
    push_offer: Option<DirectOffer>,
    /// A [`Request::Forward`] sent and not yet answered.
    connecting: bool,
}

/// A step to send: the request and the shape of the frame that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingStep {
    /// The request.
    pub request: Request,
    /// The frame's shape, `[1, positions, hidden]`.
    pub dims: [usize; 3],
    /// How the frame's values travel.
    pub dtype: WireDType,
}

impl ClientSession {
    /// The session `open` asked for, from the server's answer to it
    /// (`None`: the stream ended first), and the direct connection it
    /// offers, if any.
    pub fn opened(
        open: &OpenSession,
        answer: Option<Response>,
    ) -> Result<(Self, Option<DirectOffer>), CoreError> {
        match answer {
            Some(Response::Opened {
                hidden,
                direct,
                push,
                ..
            }) if hidden > 0 => {
                let session = Self {
                    hidden: hidden as usize,
                    dtype: open.dtype,
                    max_length: open.max_length,
                    len: 0,
                    pending: None,
                    truncating: None,
                    push_offer: push.filter(|_| open.push),
                    connecting: false,
                };
                Ok((session, direct))
            }
            other => Err(unexpected(other, "Opened")),
        }
    }

    /// The hidden size the server's frames have.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Positions the server's cache holds.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether nothing has been computed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The offer of a push connection into this session, for the hop
    /// before it, when the client asked and the server made one.
    pub fn push_offer(&self) -> Option<&DirectOffer> {
        self.push_offer.as_ref()
    }

    /// The request for a step on `values` hidden-state values (a whole
    /// number of positions, within the session's length).
    pub fn step(&mut self, values: usize) -> Result<OutgoingStep, CoreError> {
        let hidden = self.hidden;
        let n = values / hidden;
        if n == 0 || n * hidden != values {
            return Err(CoreError::Session(format!(
                "{values} values are not whole positions of {hidden}"
            )));
        }
        self.begin(n, |start, positions| Request::Step { start, positions })
    }

    /// The request for a step of a chain ([`Request::Chain`]) of `n`
    /// positions: its frame follows unless `pushed_in` (the previous hop
    /// pushes it), and its output goes on to the next hop when `forward`.
    /// The answer is read as a step's.
    pub fn chain(
        &mut self,
        n: usize,
        pushed_in: bool,
        forward: bool,
    ) -> Result<OutgoingStep, CoreError> {
        if n == 0 {
            return Err(CoreError::Session("a step of no positions".into()));
        }
        self.begin(n, |start, positions| Request::Chain {
            start,
            positions,
            pushed_in,
            forward,
        })
    }

    /// The request that has the server connect to the next hop's push
    /// offer; answered by [`ClientSession::forwarded`].
    pub fn forward(&mut self, target: ForwardTarget) -> Result<Request, CoreError> {
        if self.pending.is_some() || self.truncating.is_some() || self.connecting {
            return Err(CoreError::Session(
                "a forward was asked before the last request was answered".into(),
            ));
        }
        self.connecting = true;
        Ok(Request::Forward(target))
    }

    /// The server's answer to the forward asked for.
    pub fn forwarded(&mut self, answer: Option<Response>) -> Result<(), CoreError> {
        if !std::mem::take(&mut self.connecting) {
            return Err(CoreError::Session("an answer to no forward".into()));
        }
        match answer {
            Some(Response::Forwarding) => Ok(()),
            other => Err(unexpected(other, "Forwarding")),
        }
    }

    fn begin(
        &mut self,
        n: usize,
        request: impl FnOnce(u32, u32) -> Request,
    ) -> Result<OutgoingStep, CoreError> {
        let hidden = self.hidden;
        if self.connecting {
            return Err(CoreError::Session(
                "a step was sent before the forward was answered".into(),
            ));
        }
        // A truncation sent and not yet answered is answered first: the
        // step follows it in the same flight.
        let start = self.truncating.unwrap_or(self.len);
        if start as usize + n > self.max_length as usize {
            return Err(CoreError::Session(format!(
                "a step of {n} positions after {start} runs past the session's {} positions",
                self.max_length
            )));
        }
        if self.pending.is_some() {
            return Err(CoreError::Session(
                "a step was sent before the last one was answered".into(),
            ));
        }
        self.pending = Some(n);
        Ok(OutgoingStep {
            request: request(start, n as u32),
            dims: [1, n, hidden],
            dtype: self.dtype.into(),
        })
    }

    /// The server's answer to the step sent: the most values its frame
    /// may hold, to read next.
    pub fn answered(&mut self, answer: Option<Response>) -> Result<usize, CoreError> {
        let Some(n) = self.pending else {
            return Err(CoreError::Session("an answer to no step".into()));
        };
        if self.truncating.is_some() {
            return Err(CoreError::Session(
                "a step's answer read before the truncation's".into(),
            ));
        }
        match answer {
            Some(Response::Stepped { positions }) if positions as usize == n => Ok(n * self.hidden),
            other => {
                // A refused step leaves the session where it was.
                self.pending = None;
                Err(unexpected(other, "Stepped"))
            }
        }
    }

    /// The shape of the frame that came with the answer; the step is done
    /// when it is the one asked for.
    pub fn received(&mut self, dims: &[usize]) -> Result<(), CoreError> {
        let n = self.pending.take().unwrap_or(0);
        if n == 0 || dims != [1, n, self.hidden] {
            return Err(CoreError::SessionProtocol(format!(
                "the server answered shape {dims:?} to a step of {n} positions"
            )));
        }
        self.len += n as u32;
        Ok(())
    }

    /// The request that drops the cached positions from `keep` on (the
    /// drafts a speculative step's check rejected), so the next step
    /// starts at `keep`. A step may be sent right after it, before its
    /// answer (which then comes first): one round trip for both.
    pub fn truncate(&mut self, keep: u32) -> Result<Request, CoreError> {
        if self.pending.is_some() || self.truncating.is_some() {
            return Err(CoreError::Session(
                "a truncation was sent before the last request was answered".into(),
            ));
        }
        if keep > self.len {
            return Err(CoreError::Session(format!(
                "cannot keep {keep} positions of the {} cached",
                self.len
            )));
        }
        self.truncating = Some(keep);
        Ok(Request::Truncate { keep })
    }

    /// The server's answer to the truncation sent.
    pub fn truncated(&mut self, answer: Option<Response>) -> Result<(), CoreError> {
        let Some(keep) = self.truncating.take() else {
            return Err(CoreError::Session("an answer to no truncation".into()));
        };
        match answer {
            Some(Response::Truncated) => {
                self.len = keep;
                Ok(())
            }
            other => Err(unexpected(other, "Truncated")),
        }
    }

    /// The request that ends the session.
    pub fn close(&self) -> Request {
        Request::Close
    }
}

/// The error for an answer other than `expected`.
fn unexpected(answer: Option<Response>, expected: &str) -> CoreError {
    match answer {
        Some(Response::Refused(r)) => CoreError::Refused(r),
        Some(Response::Failed { message }) => CoreError::ServerFailed(message),
        None => CoreError::SessionClosed,
        Some(other) => CoreError::SessionProtocol(format!(
            "expected {expected}, the server answered {other:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Refusal;
    use super::*;
    use crate::{BlockRange, ModelId};

    fn open() -> OpenSession {
        OpenSession {
            version: super::super::INFER_VERSION,
            model: ModelId::new("m").unwrap(),
            blocks: BlockRange::new(0, 2).unwrap(),
            max_length: 4,
            dtype: Dtype::F32,
            direct: true,
            push: true,
        }
    }

    fn session() -> ClientSession {
        let opened = Response::Opened {
            hidden: 2,
            cache_tokens_free: 0,
            direct: None,
            push: None,
        };
        ClientSession::opened(&open(), Some(opened)).unwrap().0
    }

    #[test]
    fn answers_to_an_open_other_than_opened_are_errors_that_say_why() {
        let busy = Refusal::Busy { needed: 4, free: 1 };
        let err = ClientSession::opened(&open(), Some(Response::Refused(busy.clone())));
        assert_eq!(err.unwrap_err(), CoreError::Refused(busy));
        let err = ClientSession::opened(&open(), None);
        assert_eq!(err.unwrap_err(), CoreError::SessionClosed);
        let err = ClientSession::opened(&open(), Some(Response::Truncated));
        assert!(matches!(err.unwrap_err(), CoreError::SessionProtocol(_)));
        let zero = Response::Opened {
            hidden: 0,
            cache_tokens_free: 0,
            direct: None,
            push: None,
        };
        let err = ClientSession::opened(&open(), Some(zero));
        assert!(matches!(err.unwrap_err(), CoreError::SessionProtocol(_)));
    }

    #[test]
    fn steps_follow_the_cache_and_check_the_answer() {
        let mut s = session();
        let step = s.step(4).unwrap();
        assert_eq!(
            step.request,
            Request::Step {
                start: 0,
                positions: 2
            }
        );
        assert_eq!((step.dims, step.dtype), ([1, 2, 2], WireDType::F32));
        assert!(s.step(2).is_err(), "one step at a time");
        assert_eq!(
            s.answered(Some(Response::Stepped { positions: 2 }))
                .unwrap(),
            4
        );
        s.received(&[1, 2, 2]).unwrap();
        assert_eq!(s.len(), 2);
        // The next step starts where the cache ends.
        let step = s.step(2).unwrap();
        assert_eq!(
            step.request,
            Request::Step {
                start: 2,
                positions: 1
            }
        );
        // A frame of another shape is a protocol violation.
        s.answered(Some(Response::Stepped { positions: 1 }))
            .unwrap();
        assert!(matches!(
            s.received(&[1, 2, 2]),
            Err(CoreError::SessionProtocol(_))
        ));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn bad_steps_are_refused_before_they_are_sent() {
        let mut s = session();
        assert!(
            matches!(s.step(3), Err(CoreError::Session(_))),
            "not whole positions"
        );
        assert!(matches!(s.step(0), Err(CoreError::Session(_))));
        assert!(
            matches!(s.step(10), Err(CoreError::Session(_))),
            "past max_length"
        );
        assert!(
            s.answered(Some(Response::Truncated)).is_err(),
            "no step sent"
        );
    }

    #[test]
    fn a_refused_step_leaves_the_session_usable() {
        let mut s = session();
        s.step(2).unwrap();
        let bad = Refusal::BadStep {
            expected_start: 0,
            max_length: 4,
        };
        let err = s
            .answered(Some(Response::Refused(bad.clone())))
            .unwrap_err();
        assert_eq!(err, CoreError::Refused(bad));
        assert!(s.step(2).is_ok());
        let err = s.answered(Some(Response::Failed {
            message: "oom".into(),
        }));
        assert_eq!(err.unwrap_err(), CoreError::ServerFailed("oom".into()));
    }

    #[test]
    fn a_chain_step_is_answered_as_a_step_and_forwards_are_one_at_a_time() {
        let offer = DirectOffer {
            port: 7,
            token: [3; 16],
            psk: [4; 32],
        };
        let opened = Response::Opened {
            hidden: 2,
            cache_tokens_free: 0,
            direct: None,
            push: Some(offer.clone()),
        };
        let mut s = ClientSession::opened(&open(), Some(opened.clone()))
            .unwrap()
            .0;
        assert_eq!(s.push_offer(), Some(&offer));
        let mut no_push = open();
        no_push.push = false;
        let unasked = ClientSession::opened(&no_push, Some(opened)).unwrap().0;
        assert_eq!(
            unasked.push_offer(),
            None,
            "an offer not asked for is ignored"
        );

        let target = ForwardTarget {
            ip: std::net::IpAddr::from([127, 0, 0, 2]),
            offer,
        };
        assert_eq!(
            s.forward(target.clone()).unwrap(),
            Request::Forward(target.clone())
        );
        assert!(
            s.chain(1, true, true).is_err(),
            "the forward is answered first"
        );
        assert!(s.forward(target.clone()).is_err());
        s.forwarded(Some(Response::Forwarding)).unwrap();
        assert!(
            s.forwarded(Some(Response::Forwarding)).is_err(),
            "nothing asked"
        );
        let step = s.chain(2, true, true).unwrap();
        assert_eq!(
            step.request,
            Request::Chain {
                start: 0,
                positions: 2,
                pushed_in: true,
                forward: true
            }
        );
        assert!(s.chain(1, false, false).is_err(), "one step at a time");
        s.answered(Some(Response::Stepped { positions: 2 }))
            .unwrap();
        s.received(&[1, 2, 2]).unwrap();
        assert_eq!(s.len(), 2);
        assert!(s.chain(0, false, false).is_err());
        assert!(s.chain(3, false, false).is_err(), "past max_length");
        // A refused forward says why and leaves the session usable.
        s.forward(target).unwrap();
        let why = super::super::Refusal::CannotForward {
            reason: "unreachable".into(),
        };
        assert_eq!(
            s.forwarded(Some(Response::Refused(why.clone()))),
            Err(CoreError::Refused(why))
        );
        assert!(s.chain(1, false, false).is_ok());
    }

    #[test]
    fn a_truncation_moves_the_next_step_back() {
        let mut s = session();
        s.step(6).unwrap();
        s.answered(Some(Response::Stepped { positions: 3 }))
            .unwrap();
        s.received(&[1, 3, 2]).unwrap();
        assert!(s.truncate(4).is_err(), "more than it holds");
        assert_eq!(s.truncate(1).unwrap(), Request::Truncate { keep: 1 });
        assert!(s.truncate(0).is_err(), "one truncation at a time");
        // The next step goes out before the truncation is answered, and
        // starts where it leaves the cache.
        let step = s.step(2).unwrap();
        assert_eq!(
            step.request,
            Request::Step {
                start: 1,
                positions: 1
            }
        );
        assert!(
            s.answered(Some(Response::Stepped { positions: 1 }))
                .is_err(),
            "the truncation is answered first"
        );
        s.truncated(Some(Response::Truncated)).unwrap();
        assert_eq!(s.len(), 1);
        s.answered(Some(Response::Stepped { positions: 1 }))
            .unwrap();
        s.received(&[1, 1, 2]).unwrap();
        // A refused truncation is an error and leaves the length alone.
        s.truncate(0).unwrap();
        assert!(s
            .truncated(Some(Response::Stepped { positions: 1 }))
            .is_err());
        assert_eq!(s.len(), 2);
        assert!(
            s.truncated(Some(Response::Truncated)).is_err(),
            "nothing pending"
        );
    }
}
