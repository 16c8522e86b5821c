//! Inference sessions (`/sherpa/infer/2.0.0`): the server side that runs a
//! hop, and the client side that drives one.
//!
//! The server keeps each session's KV cache within its memory budget and
//! refuses a session it cannot hold with a clear [`Refusal::Busy`], never
//! by running out of memory. A session ends when the client closes it,
//! when its stream breaks, or after an idle timeout; its cache is freed
//! with it.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite, StreamExt};
use libp2p::StreamProtocol;
use swarm_core::infer::{Dtype, OpenSession, Refusal, Request, Response, INFER_VERSION};
use swarm_core::tensor_frame::WireDType;
use swarm_core::ModelId;

use crate::backend::{BackendError, SpanBackend, SpanState};
use crate::direct::{DirectHub, DirectLink};
use crate::error::DhtError;
use crate::wire::{read_frame, read_message, write_message, write_tensor_message};

/// Protocol id of inference sessions.
pub const INFER_STREAM: StreamProtocol = StreamProtocol::new(crate::INFER_PROTOCOL);

/// Most positions one step may carry (a long prompt's prefill).
pub const MAX_STEP_POSITIONS: usize = 8192;

/// A server's inference service: the span it computes (any
/// [`SpanBackend`]) and the sessions it runs on it.
pub struct InferenceService {
    model: ModelId,
    backend: Arc<dyn SpanBackend>,
    idle_timeout: Duration,
    direct: Option<u16>,
    hub: OnceLock<DirectHub>,
    pace: Pace,
    sessions: AtomicUsize,
}

impl std::fmt::Debug for InferenceService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferenceService")
            .field("model", &self.model)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl InferenceService {
    /// Serves `backend`'s span of `model`; sessions idle for 60 s are
    /// closed.
    pub fn new(model: ModelId, backend: Arc<dyn SpanBackend>) -> Self {
        Self {
            model,
            backend,
            idle_timeout: Duration::from_secs(60),
            direct: Some(0),
            hub: OnceLock::new(),
            pace: Pace::default(),
            sessions: AtomicUsize::new(0),
        }
    }

    /// The span it computes.
    pub fn backend(&self) -> &Arc<dyn SpanBackend> {
        &self.backend
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Blocks x tokens per second of one-position steps that ran alone,
    /// from those computed so far (`None` before the first): the server's
    /// own decode speed, which its sessions share.
    pub fn measured_throughput(&self) -> Option<f64> {
        match self.pace.decode_nanos_per_block.load(Ordering::Relaxed) {
            0 => None,
            per => Some(1e9 / per as f64),
        }
    }

    /// Offers clients direct connections for their sessions on this TCP
    /// port (0: any free port, the default), or not at all (`None`); see
    /// [`crate::direct`].
    pub fn with_direct(mut self, port: Option<u16>) -> Self {
        self.direct = port;
        self
    }

    /// The port direct connections arrive at, once the node listens.
    pub fn direct_listen_port(&self) -> Option<u16> {
        self.hub.get().map(DirectHub::port)
    }

    /// Sets the listener direct connections arrive at (once).
    pub(crate) fn set_direct(&self, hub: DirectHub) {
        let _ = self.hub.set(hub);
    }

    /// Closes sessions whose client sends nothing for `timeout`.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Positions a new session over the whole span could still reserve.
    pub fn free_positions(&self) -> u64 {
        self.backend.free_positions(self.backend.blocks())
    }

    /// Starts serving sessions on `node`: accepts the inference protocol
    /// there and, when direct connections are on, listens for them on
    /// `bind` (see [`crate::node::direct_bind_ip`]; `None` keeps every
    /// session on its stream). Its tasks are tied to the node, so stopping
    /// the node ends every session, direct ones included. Call it before
    /// the server announces itself.
    pub async fn serve_on(
        self: Arc<Self>,
        node: &crate::Node,
        bind: Option<IpAddr>,
    ) -> Result<(), DhtError> {
        let incoming = node.accept(INFER_STREAM)?;
        if let (Some(port), Some(ip)) = (self.direct, bind) {
            let (hub, listener) = DirectHub::listen(ip, port).await?;
            self.set_direct(hub);
            node.tie(listener).await?;
        }
        node.tie(tokio::spawn(self.serve(incoming))).await
    }

    /// Serves sessions arriving on `incoming` until the node stops; when
    /// this future is dropped (the node's event loop aborts it), every
    /// session it runs ends with it, direct connections included.
    pub(crate) async fn serve(self: Arc<Self>, mut incoming: libp2p_stream::IncomingStreams) {
        let mut sessions = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                arrived = incoming.next() => {
                    let Some((peer, stream)) = arrived else { break };
                    let service = self.clone();
                    sessions.spawn(async move {
                        if let Err(e) = service.session(stream).await {
                            tracing::debug!(%peer, error = %e, "inference session ended with an error");
                        }
                    });
                }
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
    }

    fn refuse_open(&self, open: &OpenSession) -> Option<Refusal> {
        let hosted = self.backend.blocks();
        let context = self.backend.context_length();
        if open.version != INFER_VERSION {
            Some(Refusal::Version {
                supported: INFER_VERSION,
            })
        } else if open.model != self.model {
            Some(Refusal::WrongModel {
                served: self.model.clone(),
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

    /// One session, from open to close.
    async fn session(&self, mut stream: libp2p::Stream) -> Result<(), DhtError> {
        let idle = self.idle_timeout;
        let open = match next_request(&mut stream, idle).await? {
            Some(Request::Open(open)) => open,
            Some(_) => {
                let refusal = Response::Refused(Refusal::Unexpected);
                return write_message(&mut stream, &refusal, None).await;
            }
            None => return Ok(()),
        };
        if let Some(refusal) = self.refuse_open(&open) {
            return write_message(&mut stream, &Response::Refused(refusal), None).await;
        }
        let hidden = self.backend.hidden_size();
        let max_length = open.max_length as usize;
        let mut state = match self.backend.open(open.blocks, max_length) {
            Ok(state) => state,
            Err(BackendError::Busy { needed, free }) => {
                let refusal = Refusal::Busy { needed, free };
                return write_message(&mut stream, &Response::Refused(refusal), None).await;
            }
            // `refuse_open` checked blocks and length, so this is not
            // expected; say what it was rather than blame memory.
            Err(e) => {
                let failed = Response::Failed {
                    message: e.to_string(),
                };
                return write_message(&mut stream, &failed, None).await;
            }
        };
        let _open = Counted::new(&self.sessions);
        let offer = match self.hub.get() {
            Some(hub) if open.direct => hub.offer(),
            _ => None,
        };
        let (offer, ticket) = offer.unzip();
        let opened = Response::Opened {
            hidden: hidden as u32,
            cache_tokens_free: self.backend.free_positions(open.blocks),
            direct: offer,
        };
        write_message(&mut stream, &opened, None).await?;
        let (mut link, mut first) = settle_link(stream, ticket, idle).await?;
        let dtype = WireDType::from(open.dtype);
        loop {
            let request = match first.take() {
                Some(request) => Some(request),
                None => next_request(&mut link, idle).await?,
            };
            match request {
                None | Some(Request::Close) => return Ok(()),
                Some(Request::Truncate { keep }) => {
                    state.truncate(keep as usize);
                    write_message(&mut link, &Response::Truncated, None).await?;
                }
                Some(Request::Step { start, positions }) => {
                    let n = positions as usize;
                    // Read the frame even when refusing, so the stream
                    // stays in step; its size is capped by what was
                    // announced.
                    let announced = n.min(MAX_STEP_POSITIONS) * hidden;
                    let (dims, values) = read_frame(&mut link, announced).await?;
                    let continues = start as usize == state.len()
                        && n > 0
                        && n <= MAX_STEP_POSITIONS
                        && state.len() + n <= max_length
                        && dims == [1, n, hidden];
                    if !continues {
                        let refusal = Refusal::BadStep {
                            expected_start: state.len() as u32,
                            max_length: open.max_length,
                        };
                        write_message(&mut link, &Response::Refused(refusal), None).await?;
                        continue;
                    }
                    let work = n * open.blocks.len() as usize;
                    let (out, back) = compute(values, n, state, &self.pace, work).await?;
                    state = back;
                    match out {
                        Ok(out) => {
                            let stepped = Response::Stepped { positions };
                            let dims = [1, n, hidden];
                            write_tensor_message(&mut link, &stepped, &out, &dims, dtype).await?;
                        }
                        Err(message) => {
                            write_message(&mut link, &Response::Failed { message }, None).await?;
                            return Ok(());
                        }
                    }
                }
                // A second open, or a request this node does not know.
                Some(_) => {
                    write_message(&mut link, &Response::Refused(Refusal::Unexpected), None).await?;
                }
            }
        }
    }
}

/// Steps expected to take at most this long run on the tokio worker that
/// received them.
const INLINE_STEP: Duration = Duration::from_millis(15);

/// What a step costs on this server (a running average of the time per
/// position per block, learnt from the steps computed so far) and how many
/// steps are under way.
#[derive(Debug, Default)]
struct Pace {
    /// Nanoseconds per position·block (0 while nothing is known).
    nanos_per_unit: AtomicU64,
    /// Steps computing now.
    running: AtomicUsize,
    /// Nanoseconds per block of one-position (decode) steps that ran with
    /// no other step, likewise.
    decode_nanos_per_block: AtomicU64,
}

/// One more in a counter (steps under way, sessions open) until dropped.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        Self::enter(counter).0
    }

    /// Counts one more, and says how many there were before.
    fn enter(counter: &'a AtomicUsize) -> (Self, usize) {
        let before = counter.fetch_add(1, Ordering::AcqRel);
        (Self(counter), before)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pace {
    /// Expected time of `work` position·blocks, if any step was timed.
    fn expect(&self, work: usize) -> Option<Duration> {
        match self.nanos_per_unit.load(Ordering::Relaxed) {
            0 => None,
            per => Some(Duration::from_nanos(per.saturating_mul(work as u64))),
        }
    }

    /// Learns from a step of `positions` positions and `work`
    /// position·blocks that took `took`.
    /// `alone`: no other step ran when it started, so its time is the
    /// server's own speed rather than a share of it.
    fn record(&self, positions: usize, work: usize, took: Duration, alone: bool) {
        let per = (took.as_nanos() / work.max(1) as u128).clamp(1, u64::MAX as u128) as u64;
        average_into(&self.nanos_per_unit, per);
        if positions == 1 && alone {
            average_into(&self.decode_nanos_per_block, per);
        }
    }
}

/// Moves the running average in `slot` an eighth of the way to `sample`
/// (or sets it, the first time). Concurrent steps may overwrite each
/// other's update; either is a fair sample.
fn average_into(slot: &AtomicU64, sample: u64) {
    let old = slot.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        old.saturating_mul(7).saturating_add(sample) / 8
    };
    slot.store(new, Ordering::Relaxed);
}

/// Runs the span on `n` positions of `values` (`work` position·blocks):
/// the session's output (or why the computation failed) and its cache.
///
/// A step known to be short (a decode step: a few milliseconds), while no
/// other step of this server runs, goes right here on the worker that read
/// its input, and its output goes out from the same thread: any hand-off
/// to another thread costs a wake-up per hop per token, which over a
/// three-server chain on a 2-core machine took 3–10% of the decode speed.
/// Longer steps (prefills, slow spans) and concurrent ones go to
/// `block_in_place` so the worker's other tasks move elsewhere meanwhile,
/// or to the blocking pool on a current-thread runtime.
async fn compute(
    values: Vec<f32>,
    n: usize,
    mut state: Box<dyn SpanState>,
    pace: &Pace,
    work: usize,
) -> Result<(Result<Vec<f32>, String>, Box<dyn SpanState>), DhtError> {
    fn run(state: &mut dyn SpanState, values: Vec<f32>, n: usize) -> Result<Vec<f32>, String> {
        state.forward(values, n).map_err(|e| e.to_string())
    }
    let started = Instant::now();
    let (_running, others) = Counted::enter(&pace.running);
    // With other steps under way the workers are needed to keep the node
    // answering, so only a server's lone step runs inline.
    let short = others == 0 && pace.expect(work).is_some_and(|t| t <= INLINE_STEP);
    let multi_threaded = matches!(
        tokio::runtime::Handle::current().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::MultiThread
    );
    let out = if short {
        (run(state.as_mut(), values, n), state)
    } else if multi_threaded {
        let out = tokio::task::block_in_place(|| run(state.as_mut(), values, n));
        (out, state)
    } else {
        // A current-thread runtime cannot give its only thread away.
        tokio::task::spawn_blocking(move || {
            let out = run(state.as_mut(), values, n);
            (out, state)
        })
        .await
        .map_err(|e| DhtError::Transport(format!("session task: {e}")))?
    };
    if out.0.is_ok() {
        pace.record(n, work, started.elapsed(), others == 0);
    }
    Ok(out)
}

/// Where a session goes on after the server's `Opened`: onto the direct
/// connection if the client makes it, or on its stream if the client's
/// next message comes there instead (returned with it).
pub(crate) async fn settle_link(
    mut stream: libp2p::Stream,
    ticket: Option<crate::direct::OfferTicket>,
    idle: Duration,
) -> Result<(Link, Option<Request>), DhtError> {
    let Some(mut ticket) = ticket else {
        return Ok((Link::Stream(stream), None));
    };
    let arrived = tokio::select! {
        direct = ticket.arrival() => Ok(direct),
        request = next_request(&mut stream, idle) => Err(request),
    };
    match arrived {
        Ok(Some(direct)) => Ok((Link::Direct(Box::new(direct)), None)),
        Ok(None) => {
            let request = next_request(&mut stream, idle).await?;
            Ok((Link::Stream(stream), request))
        }
        // A client that moved to the direct connection drops its stream,
        // and the stream's end can overtake the connection's hand-over
        // here: wait for the connection before calling the session over.
        Err(Ok(None)) => {
            match tokio::time::timeout(crate::direct::HANDSHAKE_TIMEOUT, ticket.arrival()).await {
                Ok(Some(direct)) => Ok((Link::Direct(Box::new(direct)), None)),
                _ => Ok((Link::Stream(stream), None)),
            }
        }
        Err(request) => Ok((Link::Stream(stream), request?)),
    }
}

/// How a session's messages travel: on its libp2p stream, or on a direct
/// connection ([`crate::direct`]).
#[derive(Debug)]
pub enum Link {
    /// The libp2p stream the session was opened on.
    Stream(libp2p::Stream),
    /// A direct, Noise-sealed TCP connection.
    Direct(Box<DirectLink>),
}

impl Link {
    /// Whether the session runs on a direct connection.
    pub fn is_direct(&self) -> bool {
        matches!(self, Link::Direct(_))
    }
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Link::Stream(s) => Pin::new(s).poll_read(cx, buf),
            Link::Direct(d) => Pin::new(d.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Link::Stream(s) => Pin::new(s).poll_write(cx, buf),
            Link::Direct(d) => Pin::new(d.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Stream(s) => Pin::new(s).poll_flush(cx),
            Link::Direct(d) => Pin::new(d.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Stream(s) => Pin::new(s).poll_close(cx),
            Link::Direct(d) => Pin::new(d.as_mut()).poll_close(cx),
        }
    }
}

/// The client's next message, or a timeout when it goes quiet.
pub(crate) async fn next_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    idle: Duration,
) -> Result<Option<Request>, DhtError> {
    tokio::time::timeout(idle, read_message::<_, Request>(stream))
        .await
        .map_err(|_| DhtError::Timeout("the client's next message"))?
}

/// How many positions of `hidden` values `values` are; an error unless
/// they are a whole, non-zero number.
pub(crate) fn whole_positions(values: usize, hidden: usize) -> Result<usize, DhtError> {
    let n = values / hidden.max(1);
    if n == 0 || n * hidden != values {
        return Err(DhtError::Transport(format!(
            "{values} values are not whole positions of {hidden}"
        )));
    }
    Ok(n)
}

/// The client's end of one hop's session.
pub struct RemoteSession {
    stream: Link,
    hidden: usize,
    dtype: Dtype,
    timeout: Duration,
    /// Positions the server holds.
    len: u32,
}

impl std::fmt::Debug for RemoteSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSession")
            .field("direct", &self.stream.is_direct())
            .field("hidden", &self.hidden)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Why a server would not open or run a step, or that it failed.
fn refused(response: Response) -> DhtError {
    match response {
        Response::Refused(r) => DhtError::Refused(r),
        Response::Failed { message } => DhtError::ServerFailed(message),
        other => DhtError::Protocol(format!("unexpected answer {other:?}")),
    }
}

/// How often opening a session is tried again when its stream is lost
/// before the server answers.
const OPEN_RETRIES: u32 = 5;

impl RemoteSession {
    /// Opens a session with `peer` through `node` for one hop, on a direct
    /// connection when `open.direct` and the server offers one.
    pub async fn connect(
        node: &crate::Node,
        peer: crate::PeerId,
        open: OpenSession,
    ) -> Result<Self, DhtError> {
        // libp2p-stream hands a server one inbound stream at a time and
        // resets the ones arriving while it is busy, so a burst of opens
        // loses some before the server reads them: those are tried again.
        let mut attempt = 0;
        loop {
            let stream = node.open_stream(peer, INFER_STREAM).await?;
            let ip = if open.direct {
                node.direct_ip(peer).await?
            } else {
                None
            };
            let mut open = open.clone();
            open.direct = ip.is_some();
            match Self::open(stream, open, ip, node.request_timeout()).await {
                Err(DhtError::StreamLost(why)) if attempt < OPEN_RETRIES => {
                    tracing::debug!(%peer, %why, attempt, "session stream lost before an answer; retrying");
                    let jitter = rand::random_range(0..10);
                    tokio::time::sleep(Duration::from_millis((10 << attempt) + jitter)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Opens a session on `stream`; when the server offers a direct
    /// connection and `ip` (the server's address) is known, moves it there.
    pub async fn open(
        mut stream: libp2p::Stream,
        open: OpenSession,
        ip: Option<IpAddr>,
        timeout: Duration,
    ) -> Result<Self, DhtError> {
        let dtype = open.dtype;
        let work = async {
            write_message(&mut stream, &Request::Open(open), None).await?;
            read_message::<_, Response>(&mut stream).await
        };
        let answer = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| DhtError::Timeout("the server to open a session"))??;
        match answer {
            Some(Response::Opened { hidden, direct, .. }) => {
                let link = match (direct, ip) {
                    (Some(offer), Some(ip)) => match DirectLink::connect(ip, &offer).await {
                        Ok(direct) => Link::Direct(Box::new(direct)),
                        Err(e) => {
                            tracing::debug!(%ip, error = %e, "no direct connection; the session stays on its stream");
                            Link::Stream(stream)
                        }
                    },
                    _ => Link::Stream(stream),
                };
                Ok(Self {
                    stream: link,
                    hidden: hidden as usize,
                    dtype,
                    timeout,
                    len: 0,
                })
            }
            Some(other) => Err(refused(other)),
            None => Err(DhtError::StreamLost("the server closed the session".into())),
        }
    }

    /// Whether the session runs on a direct connection.
    pub fn is_direct(&self) -> bool {
        self.stream.is_direct()
    }

    /// Positions the server's cache holds.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether nothing has been sent yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hidden size frames carry.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Runs the hop on the hidden states of `positions` new positions
    /// (`positions x hidden` values) and returns its output, same shape.
    pub async fn step(&mut self, hidden_states: &[f32]) -> Result<Vec<f32>, DhtError> {
        self.step_within(hidden_states, self.timeout).await
    }

    /// [`RemoteSession::step`] with its own time limit; after a timeout
    /// the session is out of step and should be dropped.
    pub async fn step_within(
        &mut self,
        hidden_states: &[f32],
        timeout: Duration,
    ) -> Result<Vec<f32>, DhtError> {
        let n = whole_positions(hidden_states.len(), self.hidden)?;
        let dims = [1, n, self.hidden];
        let dtype = self.dtype.into();
        let request = Request::Step {
            start: self.len,
            positions: n as u32,
        };
        let (hidden, stream) = (self.hidden, &mut self.stream);
        let work = async {
            write_tensor_message(stream, &request, hidden_states, &dims, dtype).await?;
            match read_message::<_, Response>(stream).await? {
                Some(Response::Stepped { positions }) if positions as usize == n => {
                    let (dims, values) = read_frame(stream, n * hidden).await?;
                    if dims != [1, n, hidden] {
                        return Err(DhtError::Protocol(format!(
                            "the server answered shape {dims:?}"
                        )));
                    }
                    Ok(values)
                }
                Some(other) => Err(refused(other)),
                None => Err(DhtError::StreamLost("the server closed the session".into())),
            }
        };
        let out = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| DhtError::Timeout("the server's step"))??;
        self.len += n as u32;
        Ok(out)
    }

    /// Ends the session; the server frees its cache.
    pub async fn close(mut self) -> Result<(), DhtError> {
        let work = write_message(&mut self.stream, &Request::Close, None);
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| DhtError::Timeout("closing a session"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_learns_the_cost_of_a_step() {
        let pace = Pace::default();
        assert_eq!(pace.expect(10), None, "nothing timed yet");
        pace.record(2, 10, Duration::from_millis(5), true);
        assert_eq!(pace.expect(10), Some(Duration::from_millis(5)));
        assert_eq!(pace.expect(1000), Some(Duration::from_millis(500)));
        // Later samples move the average an eighth of the way.
        pace.record(2, 10, Duration::from_millis(13), true);
        assert_eq!(pace.expect(10), Some(Duration::from_millis(6)));
        // A sample of no work counts as one unit and never divides by zero.
        pace.record(1, 0, Duration::ZERO, true);
        assert!(pace.expect(1).is_some());
        // Absurd samples saturate instead of overflowing.
        pace.record(1, 1, Duration::MAX, true);
        pace.record(1, 1, Duration::MAX, true);
        assert!(pace.expect(1).is_some());
    }

    #[test]
    fn decode_speed_is_learnt_from_lone_one_position_steps_only() {
        let pace = Pace::default();
        // A prefill (many positions) and a decode step sharing the server
        // say nothing about its own decode speed.
        pace.record(16, 160, Duration::from_millis(16), true);
        pace.record(1, 10, Duration::from_millis(50), false);
        assert_eq!(pace.decode_nanos_per_block.load(Ordering::Relaxed), 0);
        pace.record(1, 10, Duration::from_millis(10), true);
        assert_eq!(
            pace.decode_nanos_per_block.load(Ordering::Relaxed),
            1_000_000
        );
    }
}
