//! The bandwidth probe (`/sherpa/probe/1.0.0`): a client sends a server a
//! few hundred KiB and has it send some back, and times both, so scores use
//! bandwidth the client measured rather than only what servers claim.
//!
//! On the wire: a 4-byte little-endian length and a bincode
//! [`ProbeRequest`]; then the client's `upload` bytes; the server answers
//! one byte once it has them all, then sends `download` bytes. Sizes are
//! capped, every step has a timeout, and a node serves a few probes at a
//! time and refuses (closes) the rest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bincode::{Decode, Encode};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::StreamProtocol;
use tokio::sync::Semaphore;

use crate::error::DhtError;

/// Protocol id of the bandwidth probe.
pub const PROBE_PROTOCOL: StreamProtocol = StreamProtocol::new("/sherpa/probe/1.0.0");
/// Most bytes a probe moves each way.
pub const MAX_PROBE_BYTES: u32 = 8 << 20;
/// Probes a node serves at once.
pub const MAX_CONCURRENT_PROBES: usize = 4;
/// Version of [`ProbeRequest`].
pub const PROBE_VERSION: u16 = 1;
/// Longest a probe may take on the serving side.
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct ProbeRequest {
    /// [`PROBE_VERSION`].
    pub version: u16,
    /// Bytes the client sends.
    pub upload: u32,
    /// Bytes the server sends back.
    pub download: u32,
}

/// What a probe measured, from the server's point of view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bandwidth {
    /// Bytes per second the server sent to us.
    pub upload_bps: u64,
    /// Bytes per second the server received from us.
    pub download_bps: u64,
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> DhtError {
    move |e| DhtError::Transport(format!("probe {what}: {e}"))
}

/// Runs a probe of `bytes` each way over `stream` (already open to the
/// server), within `timeout`.
pub(crate) async fn run_probe(
    mut stream: libp2p::Stream,
    bytes: u32,
    timeout: Duration,
) -> Result<Bandwidth, DhtError> {
    let bytes = bytes.clamp(1, MAX_PROBE_BYTES);
    let request = swarm_core::codec::encode(&ProbeRequest {
        version: PROBE_VERSION,
        upload: bytes,
        download: bytes,
    })?;
    let work = async {
        stream
            .write_all(&(request.len() as u32).to_le_bytes())
            .await
            .map_err(io("request"))?;
        stream.write_all(&request).await.map_err(io("request"))?;
        let started = Instant::now();
        send_filler(&mut stream, bytes, "upload").await?;
        stream.flush().await.map_err(io("upload"))?;
        let mut ack = [0u8; 1];
        stream.read_exact(&mut ack).await.map_err(io("ack"))?;
        let up = started.elapsed();
        let started = Instant::now();
        drain(&mut stream, bytes, "download").await?;
        let down = started.elapsed();
        let _ = stream.close().await;
        let rate = |d: Duration| (f64::from(bytes) / d.as_secs_f64().max(1e-6)) as u64;
        Ok(Bandwidth {
            download_bps: rate(up),
            upload_bps: rate(down),
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| DhtError::Timeout("a bandwidth probe"))?
}

/// Serves probes arriving on `incoming` until the node stops.
pub(crate) async fn serve_probes(mut incoming: libp2p_stream::IncomingStreams) {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES));
    while let Some((peer, stream)) = incoming.next().await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "refused a probe: too many at once");
            continue;
        };
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(SERVE_TIMEOUT, serve_one(stream)).await;
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "a probe failed"),
                Err(_) => tracing::debug!(%peer, "a probe timed out"),
            }
            drop(permit);
        });
    }
}

async fn serve_one(mut stream: libp2p::Stream) -> Result<(), DhtError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.map_err(io("request"))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 64 {
        return Err(DhtError::Transport(format!("probe request of {len} bytes")));
    }
    let mut request = vec![0u8; len];
    stream
        .read_exact(&mut request)
        .await
        .map_err(io("request"))?;
    let request: ProbeRequest = swarm_core::codec::decode(&request)?;
    if request.version != PROBE_VERSION
        || request.upload > MAX_PROBE_BYTES
        || request.download > MAX_PROBE_BYTES
    {
        return Err(DhtError::Transport(format!(
            "unacceptable probe {request:?}"
        )));
    }
    drain(&mut stream, request.upload, "upload").await?;
    stream.write_all(&[1]).await.map_err(io("ack"))?;
    send_filler(&mut stream, request.download, "download").await?;
    stream.close().await.map_err(io("close"))?;
    Ok(())
}

const CHUNK: usize = 64 << 10;

/// Writes `bytes` filler bytes.
async fn send_filler(
    stream: &mut libp2p::Stream,
    bytes: u32,
    what: &'static str,
) -> Result<(), DhtError> {
    let chunk = vec![0x5Au8; CHUNK];
    let mut left = bytes as usize;
    while left > 0 {
        let n = left.min(CHUNK);
        stream.write_all(&chunk[..n]).await.map_err(io(what))?;
        left -= n;
    }
    Ok(())
}

/// Reads and discards exactly `bytes` bytes.
async fn drain(
    stream: &mut libp2p::Stream,
    bytes: u32,
    what: &'static str,
) -> Result<(), DhtError> {
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes as usize;
    while left > 0 {
        let n = stream
            .read(&mut buf[..left.min(CHUNK)])
            .await
            .map_err(io(what))?;
        if n == 0 {
            return Err(DhtError::Transport(format!(
                "probe {what}: the peer stopped sending"
            )));
        }
        left -= n;
    }
    Ok(())
}
