//! Inference sessions (`/sherpa/infer/1.0.0`): the server side that runs a
//! hop, and the client side that drives one.
//!
//! The server keeps each session's KV cache within its memory budget and
//! refuses a session it cannot hold with a clear [`Refusal::Busy`], never
//! by running out of memory. A session ends when the client closes it,
//! when its stream breaks, or after an idle timeout; its cache is freed
//! with it.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::StreamProtocol;
use swarm_core::infer::{Dtype, OpenSession, Refusal, Request, Response, INFER_VERSION};
use swarm_core::tensor_frame::WireDType;
use swarm_core::ModelId;
use swarm_shard::{BlockShard, CacheBudget, DType, Device, SessionCache, Tensor};

use crate::error::DhtError;
use crate::wire::{frame, read_frame, read_message, write_message};

/// Protocol id of inference sessions.
pub const INFER_STREAM: StreamProtocol = StreamProtocol::new(crate::INFER_PROTOCOL);

/// Most positions one step may carry (a long prompt's prefill).
pub const MAX_STEP_POSITIONS: usize = 8192;

/// A server's inference service: the model span it computes and the
/// memory its sessions may use.
pub struct InferenceService {
    model: ModelId,
    shard: Arc<BlockShard>,
    budget: Arc<CacheBudget>,
    idle_timeout: Duration,
}

impl std::fmt::Debug for InferenceService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferenceService")
            .field("model", &self.model)
            .field("blocks", &self.shard.range())
            .field("cache_limit", &self.budget.limit())
            .finish_non_exhaustive()
    }
}

impl InferenceService {
    /// Serves `shard` of `model` with session caches drawn from `budget`;
    /// sessions idle for 60 s are closed.
    pub fn new(model: ModelId, shard: Arc<BlockShard>, budget: Arc<CacheBudget>) -> Self {
        Self {
            model,
            shard,
            budget,
            idle_timeout: Duration::from_secs(60),
        }
    }

    /// Closes sessions whose client sends nothing for `timeout`.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Cache bytes still free for new sessions.
    pub fn cache_free(&self) -> u64 {
        self.budget.available()
    }

    /// Serves sessions arriving on `incoming` until the node stops.
    pub(crate) async fn serve(self: Arc<Self>, mut incoming: libp2p_stream::IncomingStreams) {
        while let Some((peer, stream)) = incoming.next().await {
            let service = self.clone();
            tokio::spawn(async move {
                if let Err(e) = service.session(stream).await {
                    tracing::debug!(%peer, error = %e, "inference session ended with an error");
                }
            });
        }
    }

    fn refuse_open(&self, open: &OpenSession) -> Option<Refusal> {
        let hosted = self.shard.range();
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
        let cfg = self.shard.config();
        let hidden = cfg.hidden_size;
        let max_length = open.max_length as usize;
        let per_token = SessionCache::bytes_needed(cfg, open.blocks, 1, DType::F32).max(1);
        let mut cache = match self
            .shard
            .new_session_for(open.blocks, max_length, &self.budget)
        {
            Ok(cache) => cache,
            Err(e) => {
                let refusal = match e {
                    swarm_shard::ShardError::BadSettings(_) => Refusal::BadStep {
                        expected_start: 0,
                        max_length: cfg.max_position_embeddings as u32,
                    },
                    _ => Refusal::Busy {
                        needed: open.max_length,
                        free: self.budget.available() / per_token,
                    },
                };
                return write_message(&mut stream, &Response::Refused(refusal), None).await;
            }
        };
        let opened = Response::Opened {
            hidden: hidden as u32,
            cache_tokens_free: self.budget.available() / per_token,
        };
        write_message(&mut stream, &opened, None).await?;
        let dtype = WireDType::from(open.dtype);
        loop {
            match next_request(&mut stream, idle).await? {
                None | Some(Request::Close) => return Ok(()),
                Some(Request::Open(_)) => {
                    write_message(&mut stream, &Response::Refused(Refusal::Unexpected), None)
                        .await?;
                }
                Some(Request::Truncate { keep }) => {
                    cache.truncate(keep as usize);
                    write_message(&mut stream, &Response::Truncated, None).await?;
                }
                Some(Request::Step { start, positions }) => {
                    let n = positions as usize;
                    // Read the frame even when refusing, so the stream
                    // stays in step; its size is capped by what was
                    // announced.
                    let announced = n.min(MAX_STEP_POSITIONS) * hidden;
                    let (dims, values) = read_frame(&mut stream, announced).await?;
                    let continues = start as usize == cache.len()
                        && n > 0
                        && n <= MAX_STEP_POSITIONS
                        && cache.len() + n <= max_length
                        && dims == [1, n, hidden];
                    if !continues {
                        let refusal = Refusal::BadStep {
                            expected_start: cache.len() as u32,
                            max_length: open.max_length,
                        };
                        write_message(&mut stream, &Response::Refused(refusal), None).await?;
                        continue;
                    }
                    let shard = self.shard.clone();
                    let computed = tokio::task::spawn_blocking(move || {
                        let out = Tensor::from_vec(values, (1, n, hidden), &Device::Cpu)
                            .and_then(|t| t.to_device(shard.device()))
                            .map_err(|e| e.to_string())
                            .and_then(|t| shard.forward(&t, &mut cache).map_err(|e| e.to_string()))
                            .and_then(|t| {
                                t.flatten_all()
                                    .and_then(|t| t.to_dtype(DType::F32))
                                    .and_then(|t| t.to_vec1::<f32>())
                                    .map_err(|e| e.to_string())
                            });
                        (out, cache)
                    })
                    .await
                    .map_err(|e| DhtError::Transport(format!("session task: {e}")))?;
                    let (out, back) = computed;
                    cache = back;
                    match out {
                        Ok(out) => {
                            let f = frame(&out, &[1, n, hidden], dtype)?;
                            write_message(&mut stream, &Response::Stepped { positions }, Some(&f))
                                .await?;
                        }
                        Err(message) => {
                            write_message(&mut stream, &Response::Failed { message }, None).await?;
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

/// The client's next message, or a timeout when it goes quiet.
async fn next_request(
    stream: &mut libp2p::Stream,
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
    stream: libp2p::Stream,
    hidden: usize,
    dtype: Dtype,
    timeout: Duration,
    /// Positions the server holds.
    len: u32,
}

impl std::fmt::Debug for RemoteSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSession")
            .field("hidden", &self.hidden)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Why a server would not open or run a step, or that it failed.
fn refused(response: Response) -> DhtError {
    match response {
        Response::Refused(r) => DhtError::Refused(r),
        Response::Failed { message } => {
            DhtError::Transport(format!("the server failed: {message}"))
        }
        other => DhtError::Transport(format!("unexpected answer {other:?}")),
    }
}

impl RemoteSession {
    pub(crate) async fn open(
        mut stream: libp2p::Stream,
        open: OpenSession,
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
            Some(Response::Opened { hidden, .. }) => Ok(Self {
                stream,
                hidden: hidden as usize,
                dtype,
                timeout,
                len: 0,
            }),
            Some(other) => Err(refused(other)),
            None => Err(DhtError::Transport("the server closed the session".into())),
        }
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
        let f = frame(hidden_states, &[1, n, self.hidden], self.dtype.into())?;
        let request = Request::Step {
            start: self.len,
            positions: n as u32,
        };
        let (hidden, stream) = (self.hidden, &mut self.stream);
        let work = async {
            write_message(stream, &request, Some(&f)).await?;
            match read_message::<_, Response>(stream).await? {
                Some(Response::Stepped { positions }) if positions as usize == n => {
                    let (dims, values) = read_frame(stream, n * hidden).await?;
                    if dims != [1, n, hidden] {
                        return Err(DhtError::Transport(format!(
                            "the server answered shape {dims:?}"
                        )));
                    }
                    Ok(values)
                }
                Some(other) => Err(refused(other)),
                None => Err(DhtError::Transport("the server closed the session".into())),
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
