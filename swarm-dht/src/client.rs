//! The client side of distributed generation.
//!
//! An [`InferenceSession`] carries hidden states through a chain of servers
//! (one [`RemoteSession`] per hop) that together run a span of the model's
//! blocks. It keeps every input it sent to every hop, step by step. When a
//! server errors, dies, answers garbage or stalls past the step timeout,
//! the session plans the failed hop's blocks again over the other servers,
//! opens the new hops, replays the stored inputs into them in the same
//! steps as before (so their KV caches hold exactly what the lost server's
//! held), and carries on: the output is the same as without the failure.
//!
//! With `push` (the default), each server sends its output straight on to
//! the next one and back to the client, which sends a step's input to the
//! first hop only: a token costs one trip along the chain instead of a
//! round trip per server. The client still gets every hop's output, so it
//! keeps every hop's input for failover as before; a chain that breaks
//! mid-step is recovered hop by hop and the session goes on relaying.
//!
//! The session moves hidden states only; the facade's generation loop runs
//! the embeddings, any local blocks and the LM head around it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use swarm_core::infer::{Dtype, OpenSession, INFER_VERSION};
use swarm_core::{BlockRange, ModelId};
use swarm_score::{plan_preferring, step_timeout, Candidate, RouteOptions, ServerId};

use crate::error::DhtError;
use crate::node::Node;
use crate::session::{whole_positions, RemoteSession};
use crate::survey::{survey, Survey, SurveyOptions};
use crate::PeerId;

/// Settings of an inference session.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SessionOptions {
    /// Most positions (prompt + generated tokens) the session holds.
    pub max_length: u32,
    /// Element type of hidden states on the wire.
    pub dtype: Dtype,
    /// How long a one-position step may take before the server counts as
    /// stalled; longer steps (a prompt) get more in proportion to the
    /// server's announced speed.
    pub step_timeout: Duration,
    /// Most server failures the session survives before giving up.
    pub max_failovers: usize,
    /// Move each hop onto a direct connection when its server offers one
    /// ([`crate::direct`]); otherwise every hop stays on its libp2p stream.
    pub direct: bool,
    /// Have each server push its output straight to the next (see the
    /// [module docs](self)), where all the route's servers can; else the
    /// client relays every hop. Needs `direct`.
    pub push: bool,
}

impl Default for SessionOptions {
    /// 2048 positions, f16 activations (a frame with values beyond f16's
    /// range goes as f32), 5 s step timeout, up to 16 failovers, direct
    /// connections where servers offer them.
    fn default() -> Self {
        Self {
            max_length: 2048,
            dtype: Dtype::F16,
            step_timeout: Duration::from_secs(5),
            max_failovers: 16,
            direct: true,
            push: true,
        }
    }
}

/// One hop of a session's current route, as shown to people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStep {
    /// The server's public name.
    pub name: String,
    /// Its peer id.
    pub peer: PeerId,
    /// The blocks it runs for this session.
    pub blocks: BlockRange,
    /// Whether the hop runs on a direct connection (else on its libp2p
    /// stream).
    pub direct: bool,
}

impl std::fmt::Display for RouteStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = if self.direct {
            "direct"
        } else {
            "libp2p stream"
        };
        write!(
            f,
            "blocks {} on {} ({}, {path})",
            self.blocks, self.name, self.peer
        )
    }
}

/// A server the session lost and what took its place.
#[derive(Debug, Clone, PartialEq)]
pub struct Failover {
    /// The lost hop.
    pub lost: RouteStep,
    /// Why it was given up.
    pub error: String,
    /// The hops that replaced it.
    pub replaced_by: Vec<RouteStep>,
    /// Positions replayed into the replacement.
    pub replayed_positions: usize,
    /// Time from noticing the failure to being ready again, replay included.
    pub took: Duration,
}

/// A hop in use: its session and everything sent to it.
#[derive(Debug)]
struct LiveHop {
    step: RouteStep,
    server: ServerId,
    secs_per_block: f64,
    session: RemoteSession,
    /// The input of every step so far, as sent.
    inputs: Vec<Vec<f32>>,
    /// Single-position steps answered here, and their total time.
    decode_steps: u32,
    decode_time: Duration,
}

impl LiveHop {
    /// How long a step of `positions` positions may take here.
    fn timeout(&self, base: Duration, positions: usize) -> Duration {
        step_timeout(base, self.secs_per_block, self.step.blocks.len(), positions)
    }
}

/// Cuts a hop's stored step inputs (each a whole number of `hidden`-wide
/// positions) down to the first `keep` positions.
fn keep_positions(inputs: &mut Vec<Vec<f32>>, keep: usize, hidden: usize) {
    let mut left = keep * hidden;
    inputs.retain_mut(|step| {
        if left == 0 {
            return false;
        }
        if step.len() > left {
            step.truncate(left);
        }
        left -= step.len();
        true
    });
}

/// Hidden states through a chain of servers, with failover.
#[derive(Debug)]
pub struct InferenceSession {
    node: Node,
    model: ModelId,
    survey: Survey,
    /// Servers to plan over first (the auto-selection); others are used
    /// only when these cannot cover a span.
    preferred: HashSet<ServerId>,
    /// Servers never to use (the user's exclusions).
    excluded: HashSet<ServerId>,
    /// Servers that failed this session.
    failed: HashSet<ServerId>,
    span: BlockRange,
    hidden: usize,
    options: SessionOptions,
    hops: Vec<LiveHop>,
    failovers: Vec<Failover>,
    positions: usize,
    /// Why the session cannot go on, once a failover has failed: its route
    /// has a hole, so no later step may run.
    broken: Option<String>,
    /// Whether steps go down the chain by push (every hop forwarding to
    /// the next).
    pushing: bool,
    on_failover: Option<FailoverHook>,
}

/// A callback told of each failover.
struct FailoverHook(Box<dyn Fn(&Failover) + Send + Sync>);

impl std::fmt::Debug for FailoverHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FailoverHook(..)")
    }
}

/// Which servers a session may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerChoice {
    /// Planned over first (e.g. the auto-selected set); empty means all.
    pub preferred: HashSet<ServerId>,
    /// Never used.
    pub excluded: HashSet<ServerId>,
}

impl InferenceSession {
    /// Plans a route through `span` over the surveyed servers and opens a
    /// session on every hop. `hidden` is the model's hidden size.
    pub async fn open(
        node: &Node,
        model: ModelId,
        survey: Survey,
        choice: ServerChoice,
        span: BlockRange,
        hidden: usize,
        options: SessionOptions,
    ) -> Result<Self, DhtError> {
        let mut session = Self {
            node: node.clone(),
            model,
            survey,
            preferred: choice.preferred,
            excluded: choice.excluded,
            failed: HashSet::new(),
            span,
            hidden,
            options,
            hops: Vec::new(),
            failovers: Vec::new(),
            positions: 0,
            broken: None,
            pushing: false,
            on_failover: None,
        };
        session.hops = session.open_span(span).await?;
        session.pushing = session.options.push && session.chain_up().await;
        Ok(session)
    }

    /// Whether steps are pushed from server to server (else the client
    /// relays every hop).
    pub fn is_pushing(&self) -> bool {
        self.pushing
    }

    /// Connects every hop to the next one's push offer; false (and the
    /// session relays) unless all of them could.
    async fn chain_up(&mut self) -> bool {
        if self.hops.len() < 2 {
            return false;
        }
        for j in 0..self.hops.len() - 1 {
            let Some(target) = self.hops[j + 1].session.push_target() else {
                tracing::debug!(server = %self.hops[j + 1].step.name, "no push offer; relaying every hop");
                return false;
            };
            if let Err(e) = self.hops[j].session.forward_to(target).await {
                tracing::info!(server = %self.hops[j].step.name, error = %e, "cannot push to the next hop; relaying every hop");
                return false;
            }
        }
        true
    }

    /// The current route, first block first.
    pub fn route(&self) -> Vec<RouteStep> {
        self.hops.iter().map(|h| h.step.clone()).collect()
    }

    /// Each hop's mean time for a one-position step (the client's round
    /// trip through it, compute included), in route order; `None` for a
    /// hop that has run none yet.
    pub fn hop_latencies(&self) -> Vec<Option<Duration>> {
        self.hops
            .iter()
            .map(|h| (h.decode_steps > 0).then(|| h.decode_time / h.decode_steps))
            .collect()
    }

    /// The blocks the session runs.
    pub fn span(&self) -> BlockRange {
        self.span
    }

    /// Failures survived so far.
    pub fn failovers(&self) -> &[Failover] {
        &self.failovers
    }

    /// Positions run so far.
    pub fn len(&self) -> usize {
        self.positions
    }

    /// Whether no position has run yet.
    pub fn is_empty(&self) -> bool {
        self.positions == 0
    }

    /// Runs the span on `hidden_states` (positions x hidden values) and
    /// returns its output, same shape; survives server failures.
    pub async fn step(&mut self, hidden_states: &[f32]) -> Result<Vec<f32>, DhtError> {
        if let Some(why) = &self.broken {
            return Err(DhtError::NoRoute(format!(
                "the session was lost earlier: {why}"
            )));
        }
        let n = whole_positions(hidden_states.len(), self.hidden)?;
        if self.positions + n > self.options.max_length as usize {
            return Err(swarm_core::CoreError::Session(format!(
                "the session holds at most {} positions; {} are used and {n} more were sent",
                self.options.max_length, self.positions
            ))
            .into());
        }
        let mut x = hidden_states.to_vec();
        let mut i = 0;
        if self.pushing {
            match self.step_pushed(&x, n).await {
                Ok(out) => {
                    self.positions += n;
                    return Ok(out);
                }
                Err((_, _, DhtError::Stopped)) => return Err(DhtError::Stopped),
                Err((j, input, e)) => {
                    // Hop j's failure; the ones after it wait for an input
                    // that will not come. Relay from hop j on.
                    self.pushing = false;
                    if let Err(lost) = self.recover_chain(j, e).await {
                        self.broken = Some(lost.to_string());
                        return Err(lost);
                    }
                    (x, i) = (input, j);
                }
            }
        }
        while i < self.hops.len() {
            let timeout = self.timeout_for(&self.hops[i], n);
            let hop = &mut self.hops[i];
            let started = Instant::now();
            match hop.session.step_within(&x, timeout).await.and_then(finite) {
                Ok(out) => {
                    if n == 1 {
                        hop.decode_steps += 1;
                        hop.decode_time += started.elapsed();
                    }
                    hop.inputs.push(std::mem::replace(&mut x, out));
                    i += 1;
                }
                Err(DhtError::Stopped) => return Err(DhtError::Stopped),
                Err(e) => {
                    if let Err(lost) = self.fail_over(i, e).await {
                        self.broken = Some(lost.to_string());
                        return Err(lost);
                    }
                }
            }
        }
        self.positions += n;
        Ok(x)
    }

    /// Forgets every position from `keep` on, in every hop's cache and in
    /// the inputs kept for failover, so the next step starts at `keep`:
    /// how a speculative step drops the drafts its check rejected. Each
    /// hop's truncation travels with the next step (no round trip of its
    /// own); a hop that fails then is replaced from the kept inputs only.
    pub fn truncate(&mut self, keep: usize) -> Result<(), DhtError> {
        if let Some(why) = &self.broken {
            return Err(DhtError::NoRoute(format!(
                "the session was lost earlier: {why}"
            )));
        }
        if keep >= self.positions {
            return Ok(());
        }
        let keep_u32 = u32::try_from(keep)
            .map_err(|_| DhtError::NoRoute(format!("{keep} positions is past any session")))?;
        for hop in &mut self.hops {
            keep_positions(&mut hop.inputs, keep, self.hidden);
            hop.session.truncate(keep_u32)?;
        }
        self.positions = keep;
        Ok(())
    }

    /// Closes every hop; the servers free their caches.
    pub async fn close(self) {
        for hop in self.hops {
            if let Err(e) = hop.session.close().await {
                tracing::debug!(server = %hop.step.name, error = %e, "closing a hop failed");
            }
        }
    }

    /// One step down the pushed chain: the input to the first hop, each
    /// later hop told its input comes from the one before, then every
    /// hop's output read in order (each the next one's input, kept for
    /// failover). On failure: the hop that failed, its input, and why.
    async fn step_pushed(
        &mut self,
        x: &[f32],
        n: usize,
    ) -> Result<Vec<f32>, (usize, Vec<f32>, DhtError)> {
        let last = self.hops.len() - 1;
        let base = self.options.step_timeout;
        let mut sent = 0;
        let mut unsent = None;
        for (j, hop) in self.hops.iter_mut().enumerate() {
            let input = (j == 0).then_some(x);
            let timeout = hop.timeout(base, n);
            match hop.session.send_chain(input, n, j < last, timeout).await {
                Ok(()) => sent += 1,
                Err(e) => {
                    unsent = Some(e);
                    break;
                }
            }
        }
        let mut input = x.to_vec();
        let mut since = Instant::now();
        // Each answer comes after the ones before it: hop j's wait adds
        // to theirs.
        let mut allowed = Duration::ZERO;
        for (j, hop) in self.hops.iter_mut().enumerate().take(sent) {
            allowed += hop.timeout(base, n);
            let left = allowed.saturating_sub(since.elapsed());
            match hop.session.receive_within(left).await.and_then(finite) {
                Ok(out) => {
                    if n == 1 {
                        hop.decode_steps += 1;
                        hop.decode_time += since.elapsed();
                    }
                    since = Instant::now();
                    allowed = Duration::ZERO;
                    hop.inputs.push(std::mem::replace(&mut input, out));
                }
                Err(e) => return Err((j, input, e)),
            }
        }
        match unsent {
            Some(e) => Err((sent, input, e)),
            None => Ok(input),
        }
    }

    /// After a pushed step failed at hop `j`: the hops after it are
    /// opened again with their inputs replayed (their servers are not to
    /// blame; they waited for hop `j`), then hop `j` fails over.
    async fn recover_chain(&mut self, j: usize, error: DhtError) -> Result<(), DhtError> {
        for k in (j + 1..self.hops.len()).rev() {
            self.reopen(k).await?;
        }
        self.fail_over(j, error).await
    }

    /// Opens hop `i`'s blocks again (on any server, its own included) and
    /// replays its inputs: for a hop left out of step through no fault of
    /// its own.
    async fn reopen(&mut self, i: usize) -> Result<(), DhtError> {
        let reason = DhtError::Protocol("the chain broke before this hop".into());
        self.replace_hop(i, reason, false).await
    }

    /// How long a step of `n` positions may take on `hop`.
    fn timeout_for(&self, hop: &LiveHop, n: usize) -> Duration {
        hop.timeout(self.options.step_timeout, n)
    }

    /// Replaces hop `i`, which failed with `error`: plans its blocks over
    /// other servers, replays its stored inputs into the new hops, and
    /// puts them in its place.
    async fn fail_over(&mut self, i: usize, error: DhtError) -> Result<(), DhtError> {
        self.replace_hop(i, error, true).await
    }

    /// Replaces hop `i` as [`InferenceSession::fail_over`] does; `blame`
    /// says whether its server failed (it is then avoided and the
    /// failover recorded).
    async fn replace_hop(
        &mut self,
        i: usize,
        error: DhtError,
        blame: bool,
    ) -> Result<(), DhtError> {
        let started = Instant::now();
        let lost = self.hops.remove(i);
        if blame {
            self.failed.insert(lost.server);
            tracing::warn!(server = %lost.step.name, blocks = %lost.step.blocks, %error, "server lost; re-planning its blocks");
            self.check_failovers(&lost.step, &error)?;
        } else {
            tracing::debug!(server = %lost.step.name, blocks = %lost.step.blocks, %error, "opening a hop again");
        }
        let replayed_positions = lost.inputs.iter().map(|c| c.len() / self.hidden).sum();
        let mut new_hops = loop {
            let mut new_hops = self.open_span(lost.step.blocks).await?;
            match replay(&mut new_hops, &lost.inputs, self.options.step_timeout).await {
                Ok(()) => break new_hops,
                Err((j, e)) => {
                    let bad = &new_hops[j];
                    tracing::warn!(server = %bad.step.name, error = %e, "replacement failed during replay");
                    self.failed.insert(bad.server);
                    self.check_failovers(&bad.step, &e)?;
                    self.record(Failover {
                        lost: bad.step.clone(),
                        error: e.to_string(),
                        replaced_by: Vec::new(),
                        replayed_positions: 0,
                        took: Duration::ZERO,
                    });
                }
            }
        };
        let replaced_by = new_hops.iter().map(|h| h.step.clone()).collect();
        let tail = self.hops.split_off(i);
        self.hops.append(&mut new_hops);
        self.hops.extend(tail);
        if !blame {
            return Ok(());
        }
        self.record(Failover {
            lost: lost.step,
            error: error.to_string(),
            replaced_by,
            replayed_positions,
            took: started.elapsed(),
        });
        Ok(())
    }

    /// Keeps a failover and tells the hook, if any.
    fn record(&mut self, failover: Failover) {
        if let Some(hook) = &self.on_failover {
            (hook.0)(&failover);
        }
        self.failovers.push(failover);
    }

    /// Calls `f` with each failover as it happens (the failed server, why,
    /// and what replaced it), e.g. to show it while tokens stream.
    pub fn on_failover(&mut self, f: impl Fn(&Failover) + Send + Sync + 'static) {
        self.on_failover = Some(FailoverHook(Box::new(f)));
    }

    fn check_failovers(&self, lost: &RouteStep, error: &DhtError) -> Result<(), DhtError> {
        if self.failovers.len() >= self.options.max_failovers {
            return Err(DhtError::NoRoute(format!(
                "gave up after {} server failures; the last: {lost}: {error}",
                self.failovers.len() + 1
            )));
        }
        Ok(())
    }

    /// Plans `span` and opens a session on every hop; a server that will
    /// not open is avoided and the span planned again.
    async fn open_span(&mut self, span: BlockRange) -> Result<Vec<LiveHop>, DhtError> {
        let mut refreshed = false;
        let mut refusals: Vec<String> = Vec::new();
        'plan: loop {
            let route = match self.plan_span(span) {
                Ok(route) => route,
                Err(e) if !refreshed => {
                    // Servers may have joined since the survey.
                    tracing::info!(error = %e, "no route among known servers; listing again");
                    refreshed = true;
                    self.refresh().await?;
                    continue;
                }
                Err(DhtError::NoRoute(why)) if !refusals.is_empty() => {
                    return Err(DhtError::NoRoute(format!(
                        "{why}; would not open a session: {}",
                        refusals.join("; ")
                    )))
                }
                Err(e) => return Err(e),
            };
            let mut hops = Vec::with_capacity(route.len());
            for (candidate, blocks) in route {
                let server = candidate.id;
                let step = RouteStep {
                    name: candidate.name.clone(),
                    peer: self.survey.peer_of(&server).ok_or_else(|| {
                        DhtError::NoRoute(format!("{} is not listed", candidate.name))
                    })?,
                    blocks,
                    direct: false,
                };
                let open = OpenSession {
                    version: INFER_VERSION,
                    model: self.model.clone(),
                    blocks,
                    max_length: self.options.max_length,
                    dtype: self.options.dtype,
                    direct: self.options.direct,
                    push: self.options.push && self.options.direct,
                };
                match RemoteSession::connect(&self.node, step.peer, open).await {
                    Ok(session) => hops.push(LiveHop {
                        step: RouteStep {
                            direct: session.is_direct(),
                            ..step
                        },
                        server,
                        secs_per_block: candidate.secs_per_block().unwrap_or(0.0),
                        session,
                        inputs: Vec::new(),
                        decode_steps: 0,
                        decode_time: Duration::ZERO,
                    }),
                    Err(DhtError::Stopped) => return Err(DhtError::Stopped),
                    Err(e) => {
                        tracing::warn!(server = %step.name, error = %e, "cannot open a session; avoiding it");
                        refusals.push(format!("{}: {e}", step.name));
                        self.failed.insert(server);
                        for hop in hops {
                            let _ = hop.session.close().await;
                        }
                        continue 'plan;
                    }
                }
            }
            return Ok(hops);
        }
    }

    /// The fastest usable chain through `span`: over the preferred servers
    /// when they cover it, else over every server not excluded or failed.
    fn plan_span(&self, span: BlockRange) -> Result<Vec<(Candidate, BlockRange)>, DhtError> {
        let bytes = match self.options.dtype {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        };
        let options = RouteOptions::default()
            .with_tokens(1)
            .with_bytes_per_token((self.hidden * bytes) as u64);
        let avoid: HashSet<ServerId> = self.failed.union(&self.excluded).copied().collect();
        let pool = &self.survey.candidates;
        match plan_preferring(pool, &self.preferred, span, &options, &avoid) {
            Ok(route) => Ok(route
                .hops
                .iter()
                .map(|hop| (pool[hop.index].clone(), hop.blocks))
                .collect()),
            Err(e) => Err(DhtError::NoRoute(format!(
                "{e} (servers failed this session: {}, excluded: {})",
                self.failed.len(),
                self.excluded.len()
            ))),
        }
    }

    /// Lists the model's servers again, keeping what failed avoided.
    async fn refresh(&mut self) -> Result<(), DhtError> {
        self.survey = survey(&self.node, &self.model, &SurveyOptions::quick()).await?;
        Ok(())
    }
}

/// Rejects outputs holding NaN or infinity: a server's garbage.
fn finite(values: Vec<f32>) -> Result<Vec<f32>, DhtError> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(values),
        Some(at) => Err(DhtError::Protocol(format!(
            "the server answered a non-finite value at {at}"
        ))),
    }
}

/// Runs the stored `inputs` through `hops` in the original steps, so each
/// new hop's cache ends up as the lost one's was. On failure, says which
/// hop failed.
async fn replay(
    hops: &mut [LiveHop],
    inputs: &[Vec<f32>],
    step_timeout: Duration,
) -> Result<(), (usize, DhtError)> {
    for chunk in inputs {
        let mut x = chunk.clone();
        for (j, hop) in hops.iter_mut().enumerate() {
            let n = x.len() / hop.session.hidden().max(1);
            let timeout = hop.timeout(step_timeout, n);
            let out = hop
                .session
                .step_within(&x, timeout)
                .await
                .and_then(finite)
                .map_err(|e| (j, e))?;
            hop.inputs.push(std::mem::replace(&mut x, out));
        }
    }
    Ok(())
}

swarm_core::with_setters!(SessionOptions {
    max_length: u32 => with_max_length,
    dtype: Dtype => with_dtype,
    step_timeout: Duration => with_step_timeout,
    max_failovers: usize => with_max_failovers,
    direct: bool => with_direct,
    push: bool => with_push,
});

#[cfg(test)]
mod tests {
    #[test]
    fn kept_inputs_are_the_first_positions() {
        // Steps of 3, 1 and 2 positions, 2 values each.
        let steps = vec![vec![1.0; 6], vec![2.0; 2], vec![3.0; 4]];
        for (keep, want) in [
            (6, vec![6, 2, 4]),
            (5, vec![6, 2, 2]),
            (4, vec![6, 2]),
            (2, vec![4]),
            (0, vec![]),
        ] {
            let mut inputs = steps.clone();
            super::keep_positions(&mut inputs, keep, 2);
            let lens: Vec<usize> = inputs.iter().map(Vec::len).collect();
            assert_eq!(lens, want, "keep {keep}");
        }
    }
}
