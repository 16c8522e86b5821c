//! Inference sessions (`/sherpa/infer/3.0.0`): the server side that runs a
//! hop, and the client side that drives one.
//!
//! The server keeps each session's KV cache within its memory budget and
//! refuses a session it cannot hold with a clear [`Refusal::Busy`](swarm_core::infer::Refusal::Busy), never
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
use swarm_core::infer::client::OutgoingStep;
use swarm_core::infer::server::{Input, Output, Reservation, Span};
use swarm_core::infer::{
    ClientSession, ForwardTarget, OpenSession, Request, Response, ServerSession,
};
use swarm_core::{CoreError, ModelId};

use crate::backend::{BackendError, SpanBackend, SpanState};
use crate::direct::{DirectHub, DirectLink, OfferTicket, HANDSHAKE_TIMEOUT};
use crate::error::DhtError;
use crate::wire::{read_frame, read_message, write_message, write_tensor_message};

/// Protocol id of inference sessions.
pub const INFER_STREAM: StreamProtocol = StreamProtocol::new(crate::INFER_PROTOCOL);

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
    batches: Batcher,
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
            batches: Batcher::default(),
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

    /// Steps computed so far, and how many of them ran in a pass shared
    /// with other sessions' steps.
    pub fn steps(&self) -> StepCounts {
        StepCounts {
            steps: self.batches.steps.load(Ordering::Relaxed),
            batched: self.batches.batched.load(Ordering::Relaxed),
            passes: self.batches.passes.load(Ordering::Relaxed),
        }
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

    /// What the protocol needs to know of the span served.
    fn span(&self) -> Span {
        Span {
            model: self.model.clone(),
            hosted: self.backend.blocks(),
            context: self.backend.context_length(),
            hidden: self.backend.hidden_size(),
        }
    }

    /// One session, from open to close: the protocol's
    /// [`ServerSession`] decides, this loop moves bytes, reserves the
    /// cache and runs the span as it is told.
    async fn session(&self, stream: libp2p::Stream) -> Result<(), DhtError> {
        let idle = self.idle_timeout;
        let mut machine = ServerSession::new(self.span());
        let mut link = Link::Stream(stream);
        let mut ticket = None;
        // Push: where the previous hop's outputs arrive, and where this
        // hop's go on to ([`swarm_core::infer`]'s module docs).
        let mut push = Pushed::default();
        let mut forward: Option<Box<DirectLink>> = None;
        let mut connects = 0;
        let mut state: Option<Box<dyn SpanState>> = None;
        let mut open = None;
        let mut input = Input::Request(next_request(&mut link, idle).await?);
        loop {
            input = match machine.handle(input) {
                Output::ReadRequest => Input::Request(next_request(&mut link, idle).await?),
                Output::ReadFrame { max_values } => {
                    let (dims, values) = read_frame(&mut link, max_values).await?;
                    Input::Frame { dims, values }
                }
                Output::Reserve {
                    blocks,
                    max_length,
                    direct,
                    push: pushed_in,
                } => match self.backend.open(blocks, max_length) {
                    Ok(reserved) => {
                        state = Some(reserved);
                        open = Some(Counted::new(&self.sessions));
                        let offer = |wanted: bool| match self.hub.get() {
                            Some(hub) if wanted => hub.offer(),
                            _ => None,
                        };
                        let (direct, offered) = offer(direct).unzip();
                        ticket = offered;
                        let (push_offer, push_ticket) = offer(pushed_in).unzip();
                        push.ticket = push_ticket;
                        Input::Reserved(Reservation::Made {
                            cache_tokens_free: self.backend.free_positions(blocks),
                            direct,
                            push: push_offer,
                        })
                    }
                    Err(BackendError::Busy { needed, free }) => {
                        Input::Reserved(Reservation::Busy { needed, free })
                    }
                    Err(e) => Input::Reserved(Reservation::Failed(e.to_string())),
                },
                Output::SettleLink => {
                    let (settled, first) = settle_link(link, ticket.take(), idle).await?;
                    link = settled;
                    match first {
                        Some(request) => Input::Request(Some(request)),
                        None => Input::Request(next_request(&mut link, idle).await?),
                    }
                }
                Output::ReadPushedFrame {
                    start,
                    positions,
                    max_values,
                } => match push
                    .read(&mut link, start, positions, max_values, idle)
                    .await
                {
                    Ok((dims, values)) => Input::Frame { dims, values },
                    Err(e) => Input::PushLost(e.to_string()),
                },
                Output::Connect(target) => {
                    connects += 1;
                    if connects > MAX_FORWARD_CONNECTS {
                        Input::Connected(Err(format!(
                            "a session connects to the next hop at most {MAX_FORWARD_CONNECTS} times"
                        )))
                    } else {
                        match connect_forward(&target).await {
                            Ok(made) => {
                                forward = Some(Box::new(made));
                                Input::Connected(Ok(()))
                            }
                            Err(e) => Input::Connected(Err(e.to_string())),
                        }
                    }
                }
                Output::Truncate { keep } => {
                    if let Some(state) = state.as_mut() {
                        state.truncate(keep);
                    }
                    Input::Truncated
                }
                Output::Compute {
                    values,
                    positions,
                    work,
                } => match state.take() {
                    Some(taken) => {
                        let (out, back) = self.run_step(values, positions, taken, work).await?;
                        state = Some(back);
                        Input::Computed(out)
                    }
                    None => Input::Computed(Err("no cache reserved".into())),
                },
                Output::Send(response) => {
                    write_message(&mut link, &response, None).await?;
                    Input::Sent
                }
                Output::SendTensor {
                    response,
                    forward: onward,
                    values,
                    dims,
                    dtype,
                } => {
                    // The next hop first: it is what the chain waits for.
                    if let (Some(request), Some(next)) = (onward, forward.as_mut()) {
                        let sent = tokio::time::timeout(
                            idle,
                            write_tensor_message(next, &request, &values, &dims, dtype),
                        )
                        .await;
                        if !matches!(sent, Ok(Ok(()))) {
                            // The next hop reports its lost input to the
                            // client; this hop goes on.
                            tracing::debug!("the next hop's push connection failed; dropping it");
                            forward = None;
                        }
                    }
                    write_tensor_message(&mut link, &response, &values, &dims, dtype).await?;
                    Input::Sent
                }
                // Finished (or an output this loop does not know): the
                // cache and the session's count go with `state` and `open`.
                _ => {
                    drop((state, open));
                    return Ok(());
                }
            };
        }
    }
}

impl InferenceService {
    /// Runs one session's step: alone on a backend that does not batch;
    /// else through the [`Batcher`], which runs the steps of sessions
    /// arriving together in one pass. A long prompt, while other sessions
    /// are open, goes in chunks of [`PREFILL_CHUNK`] positions, so their
    /// decode steps run between the chunks instead of waiting for all of
    /// it.
    async fn run_step(
        &self,
        values: Vec<f32>,
        positions: usize,
        state: Box<dyn SpanState>,
        work: usize,
    ) -> Result<Stepped, DhtError> {
        let rows = self.backend.batch_rows();
        if rows <= 1 {
            return compute(values, positions, state, &self.pace, work).await;
        }
        if positions <= PREFILL_CHUNK || self.sessions() <= 1 {
            let job = Job {
                state,
                values,
                positions,
                work,
            };
            return self.batches.step(self, job, rows).await;
        }
        let hidden = values.len() / positions.max(1);
        let mut state = state;
        let mut out = Vec::with_capacity(values.len());
        for chunk in values.chunks(PREFILL_CHUNK * hidden.max(1)) {
            let n = chunk.len() / hidden.max(1);
            let job = Job {
                state,
                values: chunk.to_vec(),
                positions: n,
                work: work / positions.max(1) * n,
            };
            let (done, back) = self.batches.step(self, job, rows).await?;
            state = back;
            match done {
                Ok(values) => out.extend(values),
                Err(e) => return Ok((Err(e), state)),
            }
        }
        Ok((Ok(out), state))
    }
}

/// A prompt longer than this, while other sessions are open, runs in
/// chunks of this many positions.
const PREFILL_CHUNK: usize = 128;

/// Steps of at most this many positions (decode steps, speculative ones)
/// join others' in one pass.
const BATCHED_STEP: usize = 8;

/// One session's step, handed to whoever runs the next pass.
struct Job {
    state: Box<dyn SpanState>,
    values: Vec<f32>,
    positions: usize,
    /// Positions x blocks of the session's span, what the step costs.
    work: usize,
}

/// What a waiting step is told: its output, or that it runs the next pass
/// (its job handed back).
enum Wake {
    Done(Result<Vec<f32>, String>, Box<dyn SpanState>),
    Lead(Job),
}

/// The steps of a server's sessions, combined: a step arriving while no
/// pass runs computes at once, on the task that read it (a lone session
/// pays no hand-off); one arriving during a pass waits, and when the pass
/// ends the first waiting step runs the next one with every waiting step
/// that fits (up to the backend's [`SpanBackend::batch_rows`] positions),
/// so sessions stepping together share passes and the weights are read
/// once per pass rather than once per session.
#[derive(Default)]
struct Batcher {
    queue: std::sync::Mutex<BatchQueue>,
    steps: AtomicU64,
    batched: AtomicU64,
    passes: AtomicU64,
}

/// A server's step counts ([`InferenceService::steps`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    /// Steps computed (a chunked prompt counts each chunk).
    pub steps: u64,
    /// Of those, the ones that shared a pass with other sessions' steps.
    pub batched: u64,
    /// Passes that ran several sessions' steps together.
    pub passes: u64,
}

#[derive(Default)]
struct BatchQueue {
    /// A pass is under way (or its leader is handing over).
    running: bool,
    waiting: std::collections::VecDeque<(Job, tokio::sync::oneshot::Sender<Wake>)>,
}

/// Hands the next pass to the first waiting step when the leader is done
/// (or its task dropped mid-way), or marks the batcher idle.
struct Handover<'a>(&'a Batcher);

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.lock();
        while let Some((job, wake)) = queue.waiting.pop_front() {
            // A waiter whose task has gone takes its job (and cache) with it.
            if wake.send(Wake::Lead(job)).is_ok() {
                return;
            }
        }
        queue.running = false;
    }
}

impl Batcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, BatchQueue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `job` in a pass, leading it or waiting for one; returns its
    /// output and state.
    async fn step(
        &self,
        service: &InferenceService,
        job: Job,
        rows: usize,
    ) -> Result<Stepped, DhtError> {
        let waiting = {
            let mut queue = self.lock();
            if queue.running {
                let (wake, woken) = tokio::sync::oneshot::channel();
                queue.waiting.push_back((job, wake));
                Err(woken)
            } else {
                queue.running = true;
                Ok(job)
            }
        };
        let job = match waiting {
            Ok(job) => job,
            Err(woken) => match woken.await {
                Ok(Wake::Done(out, state)) => return Ok((out, state)),
                Ok(Wake::Lead(job)) => job,
                Err(_) => return Err(DhtError::Transport("the server's pass was dropped".into())),
            },
        };
        let handover = Handover(self);
        // This step, and the waiting small steps that fit beside it.
        let mut others = Vec::new();
        if job.positions <= BATCHED_STEP {
            let mut queue = self.lock();
            let mut used = job.positions;
            let mut kept = std::collections::VecDeque::new();
            while let Some((other, wake)) = queue.waiting.pop_front() {
                if other.positions <= BATCHED_STEP && used + other.positions <= rows {
                    used += other.positions;
                    others.push((other, wake));
                } else {
                    kept.push_back((other, wake));
                }
            }
            queue.waiting = kept;
        }
        let together = 1 + others.len() as u64;
        self.steps.fetch_add(together, Ordering::Relaxed);
        if together > 1 {
            self.batched.fetch_add(together, Ordering::Relaxed);
            self.passes.fetch_add(1, Ordering::Relaxed);
        }
        let (mine, theirs) = run_pass(service, job, others).await?;
        for (wake, out, state) in theirs {
            // A waiter gone meanwhile drops its state, freeing its cache.
            let _ = wake.send(Wake::Done(out, state));
        }
        drop(handover);
        Ok(mine)
    }
}

/// A step's output (or why it failed) and its session's state.
type Stepped = (Result<Vec<f32>, String>, Box<dyn SpanState>);

/// A waiting step's output, with the sender that wakes it.
type Woken = (
    tokio::sync::oneshot::Sender<Wake>,
    Result<Vec<f32>, String>,
    Box<dyn SpanState>,
);

/// One pass over `job` and `others` (each with the sender to wake it).
async fn run_pass(
    service: &InferenceService,
    job: Job,
    others: Vec<(Job, tokio::sync::oneshot::Sender<Wake>)>,
) -> Result<(Stepped, Vec<Woken>), DhtError> {
    if others.is_empty() {
        let out = compute(
            job.values,
            job.positions,
            job.state,
            &service.pace,
            job.work,
        )
        .await?;
        return Ok((out, Vec::new()));
    }
    let (wakes, mut jobs): (Vec<_>, Vec<_>) = others.into_iter().map(|(j, w)| (w, j)).unzip();
    jobs.insert(0, job);
    let backend = service.backend.clone();
    let run = move || {
        let mut steps: Vec<(&mut dyn SpanState, Vec<f32>, usize)> = jobs
            .iter_mut()
            .map(|j| (j.state.as_mut(), std::mem::take(&mut j.values), j.positions))
            .collect();
        let outs = backend.forward_batch(&mut steps);
        drop(steps);
        jobs.into_iter()
            .zip(outs)
            .map(|(j, out)| (out.map_err(|e| e.to_string()), j.state))
            .collect::<Vec<_>>()
    };
    let (_running, _) = Counted::enter(&service.pace.running);
    let multi_threaded = matches!(
        tokio::runtime::Handle::current().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::MultiThread
    );
    let outs = if multi_threaded {
        tokio::task::block_in_place(run)
    } else {
        tokio::task::spawn_blocking(run)
            .await
            .map_err(|e| DhtError::Transport(format!("session task: {e}")))?
    };
    let mut outs = outs.into_iter();
    let mine = outs
        .next()
        .ok_or_else(|| DhtError::Transport("a pass lost its first step".into()))?;
    let theirs = wakes
        .into_iter()
        .zip(outs)
        .map(|(wake, (out, state))| (wake, out, state))
        .collect();
    Ok((mine, theirs))
}

/// Most times one session may have its server connect to a next hop.
const MAX_FORWARD_CONNECTS: u32 = 4;

/// Connects to the next hop's push offer, within the handshake's time.
async fn connect_forward(target: &ForwardTarget) -> Result<DirectLink, DhtError> {
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        DirectLink::connect(target.ip, &target.offer),
    )
    .await
    .map_err(|_| DhtError::Timeout("the next hop's push connection"))?
}

/// A session's push connection from the previous hop: offered at open,
/// made by that hop on its first forward.
#[derive(Default)]
struct Pushed {
    ticket: Option<OfferTicket>,
    link: Option<Box<DirectLink>>,
}

impl Pushed {
    /// The frame of the step the client announced (`positions` from
    /// `start`), as the previous hop pushes it: its `Step` must say the
    /// same. Anything from the client meanwhile (it should wait for the
    /// answer), or its hanging up, ends the wait, so a chain broken
    /// upstream frees this session at once.
    async fn read(
        &mut self,
        client: &mut Link,
        start: u32,
        positions: u32,
        max_values: usize,
        idle: Duration,
    ) -> Result<(Vec<usize>, Vec<f32>), DhtError> {
        let (ticket, slot) = (&mut self.ticket, &mut self.link);
        let work = async {
            if slot.is_none() {
                let ticket = ticket.as_mut().ok_or_else(|| {
                    DhtError::Protocol("no push connection was offered for this session".into())
                })?;
                let made = ticket
                    .arrival()
                    .await
                    .ok_or_else(|| DhtError::StreamLost("the push offer was withdrawn".into()))?;
                *slot = Some(Box::new(made));
            }
            let Some(link) = slot.as_mut() else {
                return Err(DhtError::Protocol("no push connection".into()));
            };
            match read_message::<_, Request>(link).await? {
                Some(Request::Step {
                    start: s,
                    positions: p,
                }) if (s, p) == (start, positions) => read_frame(link, max_values).await,
                other => Err(DhtError::Protocol(format!(
                    "the previous hop pushed {other:?} for a step of {positions} positions at {start}"
                ))),
            }
        };
        let got = tokio::select! {
            got = tokio::time::timeout(idle, work) => got
                .map_err(|_| DhtError::Timeout("the previous hop's output"))?,
            early = read_message::<_, Request>(client) => Err(DhtError::Protocol(format!(
                "the client sent {early:?} while its step waited for the previous hop"
            ))),
        };
        if got.is_err() {
            // Whatever it had half-sent is out of step now.
            self.link = None;
        }
        got
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
async fn settle_link(
    link: Link,
    ticket: Option<crate::direct::OfferTicket>,
    idle: Duration,
) -> Result<(Link, Option<Request>), DhtError> {
    let (mut ticket, mut stream) = match (ticket, link) {
        (Some(ticket), Link::Stream(stream)) => (ticket, stream),
        (_, link) => return Ok((link, None)),
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
        return Err(CoreError::Session(format!(
            "{values} values are not whole positions of {hidden}"
        ))
        .into());
    }
    Ok(n)
}

/// The client's end of one hop's session: the protocol's
/// [`ClientSession`] on a [`Link`], with time limits.
pub struct RemoteSession {
    link: Link,
    machine: ClientSession,
    timeout: Duration,
    /// A truncation to send ahead of the next step, in the same flight.
    queued: Option<Request>,
    /// A truncation went out with the step in flight: its answer comes
    /// first.
    truncation_sent: bool,
    /// The server's address for direct connections, when known.
    ip: Option<IpAddr>,
}

impl std::fmt::Debug for RemoteSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSession")
            .field("direct", &self.link.is_direct())
            .field("hidden", &self.machine.hidden())
            .field("len", &self.machine.len())
            .finish_non_exhaustive()
    }
}

/// The network layer's error for what the session protocol found wrong,
/// keeping the kinds the failover logic branches on.
fn protocol_error(e: CoreError) -> DhtError {
    match e {
        CoreError::Refused(r) => DhtError::Refused(r),
        CoreError::ServerFailed(message) => DhtError::ServerFailed(message),
        CoreError::SessionClosed => DhtError::StreamLost("the server closed the session".into()),
        CoreError::SessionProtocol(message) => DhtError::Protocol(message),
        other => DhtError::Core(other),
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
            open.push &= ip.is_some();
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
        let work = async {
            write_message(&mut stream, &Request::Open(open.clone()), None).await?;
            read_message::<_, Response>(&mut stream).await
        };
        let answer = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| DhtError::Timeout("the server to open a session"))??;
        let (machine, offer) = ClientSession::opened(&open, answer).map_err(protocol_error)?;
        let link = match (offer, ip) {
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
            link,
            machine,
            timeout,
            queued: None,
            truncation_sent: false,
            ip,
        })
    }

    /// Where the previous hop may push its outputs into this session: the
    /// server's push offer at its address, when both are known.
    pub fn push_target(&self) -> Option<ForwardTarget> {
        Some(ForwardTarget {
            ip: self.ip?,
            offer: self.machine.push_offer()?.clone(),
        })
    }

    /// Has the server connect to the next hop's push offer, so that
    /// chained steps ([`RemoteSession::send_chain`] with `forward`) send
    /// their output straight there.
    pub async fn forward_to(&mut self, target: ForwardTarget) -> Result<(), DhtError> {
        let request = self.machine.forward(target)?;
        let (machine, link) = (&mut self.machine, &mut self.link);
        let work = async {
            write_message(link, &request, None).await?;
            let answer = read_message::<_, Response>(link).await?;
            machine.forwarded(answer).map_err(protocol_error)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| DhtError::Timeout("the server to connect to the next hop"))?
    }

    /// Sends one step of a chain of `n` positions: with its input when
    /// given (the first hop), else announcing the input the previous hop
    /// pushes; `forward` has the output go on to the next hop. The answer
    /// is read with [`RemoteSession::receive_within`].
    pub async fn send_chain(
        &mut self,
        input: Option<&[f32]>,
        n: usize,
        forward: bool,
        timeout: Duration,
    ) -> Result<(), DhtError> {
        if let Some(values) = input {
            if values.len() != n * self.machine.hidden() {
                return Err(protocol_error(CoreError::Session(format!(
                    "{} values are not {n} positions of {}",
                    values.len(),
                    self.machine.hidden()
                ))));
            }
        }
        let step = self.machine.chain(n, input.is_none(), forward)?;
        tokio::time::timeout(timeout, self.send(&step, input))
            .await
            .map_err(|_| DhtError::Timeout("sending a step"))?
    }

    /// The output of the step in flight; after a timeout the session is
    /// out of step and should be dropped.
    pub async fn receive_within(&mut self, timeout: Duration) -> Result<Vec<f32>, DhtError> {
        tokio::time::timeout(timeout, self.receive())
            .await
            .map_err(|_| DhtError::Timeout("the server's step"))?
    }

    /// Writes a step (its frame when `values` are given), after the
    /// truncation queued for it, if any.
    async fn send(&mut self, step: &OutgoingStep, values: Option<&[f32]>) -> Result<(), DhtError> {
        if let Some(truncate) = self.queued.take() {
            write_message(&mut self.link, &truncate, None).await?;
            self.truncation_sent = true;
        }
        match values {
            Some(values) => {
                write_tensor_message(
                    &mut self.link,
                    &step.request,
                    values,
                    &step.dims,
                    step.dtype,
                )
                .await
            }
            None => write_message(&mut self.link, &step.request, None).await,
        }
    }

    /// Reads the answers to what [`RemoteSession::send`] sent: the
    /// truncation's first, then the step's and its frame.
    async fn receive(&mut self) -> Result<Vec<f32>, DhtError> {
        if std::mem::take(&mut self.truncation_sent) {
            let answer = read_message::<_, Response>(&mut self.link).await?;
            self.machine.truncated(answer).map_err(protocol_error)?;
        }
        let answer = read_message::<_, Response>(&mut self.link).await?;
        let most = self.machine.answered(answer).map_err(protocol_error)?;
        let (dims, values) = read_frame(&mut self.link, most).await?;
        self.machine.received(&dims).map_err(protocol_error)?;
        Ok(values)
    }

    /// Whether the session runs on a direct connection.
    pub fn is_direct(&self) -> bool {
        self.link.is_direct()
    }

    /// Positions the server's cache holds.
    pub fn len(&self) -> u32 {
        self.machine.len()
    }

    /// Whether nothing has been sent yet.
    pub fn is_empty(&self) -> bool {
        self.machine.is_empty()
    }

    /// The hidden size frames carry.
    pub fn hidden(&self) -> usize {
        self.machine.hidden()
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
        let step = self.machine.step(hidden_states.len())?;
        let work = async {
            self.send(&step, Some(hidden_states)).await?;
            self.receive().await
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| DhtError::Timeout("the server's step"))?
    }

    /// Drops the server's cached positions from `keep` on, so the next
    /// step starts at `keep` (the drafts a speculative step's check
    /// rejected). Nothing is sent until that step, which carries the
    /// truncation ahead of it: no round trip of its own.
    pub fn truncate(&mut self, keep: u32) -> Result<(), DhtError> {
        if keep >= self.machine.len() && self.queued.is_none() {
            return Ok(());
        }
        if self.queued.is_some() {
            return Err(protocol_error(swarm_core::CoreError::Session(
                "a truncation is already waiting for the next step".into(),
            )));
        }
        self.queued = Some(self.machine.truncate(keep)?);
        Ok(())
    }

    /// Ends the session; the server frees its cache.
    pub async fn close(mut self) -> Result<(), DhtError> {
        let close = self.machine.close();
        let work = write_message(&mut self.link, &close, None);
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
