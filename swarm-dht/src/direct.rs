//! The direct data path of an inference session: a plain TCP connection
//! from client to server, sealed with Noise (`NNpsk0`, X25519, AES-256-GCM,
//! SHA-256), carrying the same messages as the session's libp2p stream.
//!
//! A libp2p stream goes through the connection's task, yamux and the
//! swarm's Noise session: four task hand-offs and two copies per message
//! on each side. For an 8 KiB activation that costs several times a TCP
//! round trip, and a generation pays it on every hop of every token. So
//! once a session is open on its libp2p stream, the server offers a
//! direct connection: a port, a one-time token and a fresh 32-byte
//! pre-shared key, sent inside the already authenticated and encrypted
//! libp2p stream. The client connects, sends the token in the clear, and
//! runs a Noise `NNpsk0` handshake keyed by the PSK: only the peer that
//! opened the session knows it, so the connection is authenticated as that
//! peer's, and the ephemeral X25519 exchange gives it forward secrecy of
//! its own. Then every message is AES-256-GCM sealed, in the client's and
//! the server's own task, with no hand-off.
//!
//! Where the connection cannot be made (a relayed or NATed server, a
//! firewall) the session simply stays on its libp2p stream.
//!
//! On the wire each Noise message is a 2-byte big-endian length and at
//! most 65535 bytes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, FallbackResolver, RingResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use swarm_core::infer::DirectOffer;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};

use crate::error::DhtError;

const PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
const PROLOGUE: &[u8] = b"sherpa direct session 1";
/// Largest Noise message.
const MAX_MESSAGE: usize = 65535;
/// AEAD tag bytes per message.
const TAG: usize = 16;
/// Largest plaintext one message carries.
const MAX_PLAIN: usize = MAX_MESSAGE - TAG;

/// How long a connecting client has to send its token and handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes a server runs at once; further connections wait.
const CONCURRENT_HANDSHAKES: usize = 64;
/// Handshakes one address may have under way at once, so one peer holding
/// connections open cannot take every slot and hold up other clients.
const HANDSHAKES_PER_ADDRESS: usize = 4;
/// Offers a server keeps waiting at once.
const MAX_PENDING: usize = 4096;

fn noise_error(e: snow::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("noise: {e}"))
}

/// X25519 for snow, on x25519-dalek (the function libp2p-noise uses).
#[derive(Default)]
struct X25519 {
    secret: [u8; 32],
    public: [u8; 32],
}

impl Dh for X25519 {
    fn name(&self) -> &'static str {
        "25519"
    }
    fn pub_len(&self) -> usize {
        32
    }
    fn priv_len(&self) -> usize {
        32
    }
    fn set(&mut self, privkey: &[u8]) {
        let mut secret = [0u8; 32];
        let n = privkey.len().min(32);
        secret[..n].copy_from_slice(&privkey[..n]);
        self.secret = secret;
        self.public = x25519_dalek::x25519(secret, x25519_dalek::X25519_BASEPOINT_BYTES);
    }
    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut secret = [0u8; 32];
        rng.try_fill_bytes(&mut secret)?;
        self.set(&secret);
        Ok(())
    }
    fn pubkey(&self) -> &[u8] {
        &self.public
    }
    fn privkey(&self) -> &[u8] {
        &self.secret
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        // snow hands over its whole key buffer; the key is its first 32
        // bytes.
        let their: [u8; 32] = pubkey
            .get(..32)
            .and_then(|k| k.try_into().ok())
            .ok_or(snow::Error::Dh)?;
        let shared = x25519_dalek::x25519(self.secret, their);
        // A low-order point gives all zeros: refuse it, the exchange would
        // contribute nothing.
        if shared.iter().all(|b| *b == 0) || out.len() < 32 {
            return Err(snow::Error::Dh);
        }
        out[..32].copy_from_slice(&shared);
        Ok(())
    }
}

/// Ring for the cipher, hash and randomness; X25519 above for the DH.
struct DhResolver;

impl CryptoResolver for DhResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }
    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        matches!(choice, DHChoice::Curve25519).then(|| Box::new(X25519::default()) as Box<dyn Dh>)
    }
    fn resolve_hash(&self, _: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }
    fn resolve_cipher(&self, _: &CipherChoice) -> Option<Box<dyn Cipher>> {
        None
    }
}

/// A handshake keyed by `psk`, as the connecting client (`initiator`) or
/// the server.
fn handshake_state(psk: &[u8; 32], initiator: bool) -> Result<snow::HandshakeState, DhtError> {
    let fail = |e: snow::Error| DhtError::Transport(format!("noise: {e}"));
    let params = PARAMS.parse().map_err(fail)?;
    let resolver = FallbackResolver::new(Box::new(RingResolver), Box::new(DhResolver));
    let builder = snow::Builder::with_resolver(params, Box::new(resolver))
        .prologue(PROLOGUE)
        .map_err(fail)?
        .psk(0, psk)
        .map_err(fail)?;
    if initiator {
        builder.build_initiator().map_err(fail)
    } else {
        builder.build_responder().map_err(fail)
    }
}

async fn write_noise(tcp: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(2 + message.len());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    tcp.write_all(&out).await
}

async fn read_noise(tcp: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).await?;
    let mut message = vec![0u8; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut message).await?;
    Ok(message)
}

/// An encrypted direct connection, read and written like a stream.
pub struct DirectLink {
    tcp: TcpStream,
    noise: snow::TransportState,
    /// Received bytes, `rlo..rhi` not yet decrypted.
    rbuf: Box<[u8]>,
    rlo: usize,
    rhi: usize,
    /// Decrypted bytes, `plain_at..plain_len` not yet read.
    plain: Box<[u8]>,
    plain_at: usize,
    plain_len: usize,
    /// Plaintext written but not yet sealed.
    wplain: Vec<u8>,
    /// Sealed bytes, from `wat` on not yet sent.
    wbuf: Vec<u8>,
    wat: usize,
}

impl std::fmt::Debug for DirectLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectLink")
            .field("peer", &self.tcp.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

impl DirectLink {
    fn new(tcp: TcpStream, noise: snow::TransportState) -> Self {
        Self {
            tcp,
            noise,
            rbuf: vec![0u8; 2 * (MAX_MESSAGE + 2)].into_boxed_slice(),
            rlo: 0,
            rhi: 0,
            plain: vec![0u8; MAX_MESSAGE].into_boxed_slice(),
            plain_at: 0,
            plain_len: 0,
            wplain: Vec::with_capacity(MAX_PLAIN),
            wbuf: Vec::new(),
            wat: 0,
        }
    }

    /// Connects to a server's offer at `ip` and runs the handshake.
    pub async fn connect(ip: IpAddr, offer: &DirectOffer) -> Result<Self, DhtError> {
        let fail = |e: io::Error| DhtError::Transport(format!("direct connection: {e}"));
        let work = async {
            let mut tcp = TcpStream::connect(SocketAddr::new(ip, offer.port))
                .await
                .map_err(fail)?;
            tcp.set_nodelay(true).map_err(fail)?;
            let mut noise = handshake_state(&offer.psk, true)?;
            let mut out = vec![0u8; MAX_MESSAGE];
            let n = noise
                .write_message(&[], &mut out)
                .map_err(noise_error)
                .map_err(fail)?;
            let mut first = offer.token.to_vec();
            first.extend_from_slice(&(n as u16).to_be_bytes());
            first.extend_from_slice(&out[..n]);
            tcp.write_all(&first).await.map_err(fail)?;
            let answer = read_noise(&mut tcp).await.map_err(fail)?;
            noise
                .read_message(&answer, &mut out)
                .map_err(noise_error)
                .map_err(fail)?;
            let noise = noise
                .into_transport_mode()
                .map_err(noise_error)
                .map_err(fail)?;
            Ok(Self::new(tcp, noise))
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
            .await
            .map_err(|_| DhtError::Timeout("a direct connection's handshake"))?
    }

    /// Seals the plaintext written so far into one message.
    fn seal(&mut self) -> io::Result<()> {
        if self.wplain.is_empty() {
            return Ok(());
        }
        let at = self.wbuf.len();
        self.wbuf.resize(at + 2 + self.wplain.len() + TAG, 0);
        let n = self
            .noise
            .write_message(&self.wplain, &mut self.wbuf[at + 2..])
            .map_err(noise_error)?;
        self.wbuf[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        self.wbuf.truncate(at + 2 + n);
        self.wplain.clear();
        Ok(())
    }

    /// Sends every sealed byte.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wat < self.wbuf.len() {
            let n = ready!(tokio::io::AsyncWrite::poll_write(
                Pin::new(&mut self.tcp),
                cx,
                &self.wbuf[self.wat..]
            ))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wat += n;
        }
        self.wbuf.clear();
        self.wat = 0;
        Poll::Ready(Ok(()))
    }

    /// Decrypts the next whole message in the receive buffer, if there is
    /// one.
    fn open_next(&mut self) -> io::Result<bool> {
        let have = self.rhi - self.rlo;
        if have < 2 {
            return Ok(false);
        }
        let len = u16::from_be_bytes([self.rbuf[self.rlo], self.rbuf[self.rlo + 1]]) as usize;
        if have < 2 + len {
            return Ok(false);
        }
        let message = &self.rbuf[self.rlo + 2..self.rlo + 2 + len];
        self.plain_len = self
            .noise
            .read_message(message, &mut self.plain)
            .map_err(noise_error)?;
        self.plain_at = 0;
        self.rlo += 2 + len;
        if self.rlo == self.rhi {
            self.rlo = 0;
            self.rhi = 0;
        }
        Ok(true)
    }
}

impl AsyncRead for DirectLink {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.plain_at < this.plain_len {
                let n = buf.len().min(this.plain_len - this.plain_at);
                buf[..n].copy_from_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                return Poll::Ready(Ok(n));
            }
            if this.open_next()? {
                continue;
            }
            // Room for a whole message after what is buffered.
            if this.rbuf.len() - this.rlo < MAX_MESSAGE + 2 {
                this.rbuf.copy_within(this.rlo..this.rhi, 0);
                this.rhi -= this.rlo;
                this.rlo = 0;
            }
            let mut read = ReadBuf::new(&mut this.rbuf[this.rhi..]);
            ready!(tokio::io::AsyncRead::poll_read(
                Pin::new(&mut this.tcp),
                cx,
                &mut read
            ))?;
            let n = read.filled().len();
            if n == 0 {
                return Poll::Ready(if this.rhi == this.rlo {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                });
            }
            this.rhi += n;
        }
    }
}

impl AsyncWrite for DirectLink {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.wplain.len() == MAX_PLAIN {
            this.seal()?;
            ready!(this.poll_send(cx))?;
        }
        let n = buf.len().min(MAX_PLAIN - this.wplain.len());
        this.wplain.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.seal()?;
        ready!(this.poll_send(cx))?;
        tokio::io::AsyncWrite::poll_flush(Pin::new(&mut this.tcp), cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        tokio::io::AsyncWrite::poll_shutdown(Pin::new(&mut self.get_mut().tcp), cx)
    }
}

struct Pending {
    psk: [u8; 32],
    deliver: oneshot::Sender<DirectLink>,
}

/// One handshake's place in its address's count, given back on drop.
struct AddressTurn {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddressTurn {
    /// A turn for `ip`, unless it already has
    /// [`HANDSHAKES_PER_ADDRESS`] under way.
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut map = counts.lock().ok()?;
        let n = map.entry(ip).or_insert(0);
        if *n >= HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for AddressTurn {
    fn drop(&mut self) {
        if let Ok(mut map) = self.counts.lock() {
            if let Some(n) = map.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.ip);
                }
            }
        }
    }
}

/// A server's direct listener and the offers it waits on.
#[derive(Clone)]
pub(crate) struct DirectHub {
    port: u16,
    pending: Arc<Mutex<HashMap<[u8; 16], Pending>>>,
}

impl std::fmt::Debug for DirectHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectHub")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// An offer made to one session's client, and where its connection
/// arrives. Dropping it withdraws the offer.
#[derive(Debug)]
pub struct OfferTicket {
    hub: DirectHub,
    token: [u8; 16],
    arrival: oneshot::Receiver<DirectLink>,
}

impl OfferTicket {
    /// The connection, once the client has made it.
    pub async fn arrival(&mut self) -> Option<DirectLink> {
        (&mut self.arrival).await.ok()
    }
}

impl Drop for OfferTicket {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.hub.pending.lock() {
            pending.remove(&self.token);
        }
    }
}

impl DirectHub {
    /// Listens on `ip` (port chosen by the system, or `port`) and accepts
    /// direct connections for the offers this hub makes, until the
    /// returned task is aborted.
    pub async fn listen(
        ip: IpAddr,
        port: u16,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), DhtError> {
        let listener = TcpListener::bind(SocketAddr::new(ip, port))
            .await
            .map_err(|e| DhtError::Transport(format!("direct listener on {ip}:{port}: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| DhtError::Transport(format!("direct listener: {e}")))?
            .port();
        let hub = Self {
            port,
            pending: Arc::new(Mutex::new(HashMap::new())),
        };
        let task = tokio::spawn(hub.clone().accept_loop(listener));
        Ok((hub, task))
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A fresh offer (token and key) for one session; `None` when too
    /// many offers are waiting.
    pub fn offer(&self) -> Option<(DirectOffer, OfferTicket)> {
        let offer = DirectOffer {
            port: self.port,
            token: rand::random(),
            psk: rand::random(),
        };
        let (deliver, arrival) = oneshot::channel();
        let mut pending = self.pending.lock().ok()?;
        if pending.len() >= MAX_PENDING {
            return None;
        }
        pending.insert(
            offer.token,
            Pending {
                psk: offer.psk,
                deliver,
            },
        );
        drop(pending);
        let ticket = OfferTicket {
            hub: self.clone(),
            token: offer.token,
            arrival,
        };
        Some((offer, ticket))
    }

    async fn accept_loop(self, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
        let per_address: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
        loop {
            let (tcp, from) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "direct listener");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(turn) = AddressTurn::take(&per_address, from.ip()) else {
                tracing::debug!(%from, "direct connection dropped: too many handshakes from its address");
                continue;
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let hub = self.clone();
            tokio::spawn(async move {
                let _slot = (slot, turn);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, hub.handshake(tcp)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%from, error = %e, "direct connection refused"),
                    Err(_) => tracing::debug!(%from, "direct connection timed out"),
                }
            });
        }
    }

    /// Checks a connecting client's token and handshake, then hands the
    /// connection to the session that made the offer.
    async fn handshake(&self, mut tcp: TcpStream) -> Result<(), DhtError> {
        let fail = |e: io::Error| DhtError::Transport(format!("direct connection: {e}"));
        tcp.set_nodelay(true).map_err(fail)?;
        let mut token = [0u8; 16];
        tcp.read_exact(&mut token).await.map_err(fail)?;
        let psk = self
            .pending
            .lock()
            .map_err(|_| DhtError::Transport("direct offers poisoned".into()))?
            .get(&token)
            .map(|p| p.psk)
            .ok_or_else(|| DhtError::Transport("unknown direct-session token".into()))?;
        let mut noise = handshake_state(&psk, false)?;
        let first = read_noise(&mut tcp).await.map_err(fail)?;
        let mut out = vec![0u8; MAX_MESSAGE];
        // A wrong key fails here, before the offer is taken: someone who
        // saw the token cannot steal the session.
        noise
            .read_message(&first, &mut out)
            .map_err(noise_error)
            .map_err(fail)?;
        let n = noise
            .write_message(&[], &mut out)
            .map_err(noise_error)
            .map_err(fail)?;
        let noise = noise
            .into_transport_mode()
            .map_err(noise_error)
            .map_err(fail)?;
        let taken = self
            .pending
            .lock()
            .map_err(|_| DhtError::Transport("direct offers poisoned".into()))?
            .remove(&token);
        let Some(pending) = taken else {
            return Err(DhtError::Transport("the offer was withdrawn".into()));
        };
        write_noise(&mut tcp, &out[..n]).await.map_err(fail)?;
        pending
            .deliver
            .send(DirectLink::new(tcp, noise))
            .map_err(|_| DhtError::Transport("the session ended before its connection".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn pair() -> (DirectLink, DirectLink, DirectHub) {
        let (hub, _task) = DirectHub::listen([127, 0, 0, 1].into(), 0).await.unwrap();
        let (offer, mut ticket) = hub.offer().unwrap();
        let (client, server) = take(&offer, &mut ticket).await;
        (client, server, hub)
    }

    /// Connects to `offer` from 127.0.0.1: the client's end and the
    /// server's.
    async fn take(offer: &DirectOffer, ticket: &mut OfferTicket) -> (DirectLink, DirectLink) {
        let client = DirectLink::connect([127, 0, 0, 1].into(), offer)
            .await
            .unwrap();
        let server = ticket.arrival().await.unwrap();
        (client, server)
    }

    /// `message` goes from `client` to `server` intact.
    async fn crosses(client: &mut DirectLink, server: &mut DirectLink, message: &[u8]) {
        client.write_all(message).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0u8; message.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, message);
    }

    #[tokio::test]
    async fn one_address_holding_connections_open_does_not_hold_up_others() {
        let (hub, _task) = DirectHub::listen([127, 0, 0, 1].into(), 0).await.unwrap();
        let server = SocketAddr::new([127, 0, 0, 1].into(), hub.port());
        // A peer on 127.0.0.2 opens more idle connections than the server
        // runs handshakes, and sends nothing on them.
        let mut idle = Vec::new();
        for _ in 0..CONCURRENT_HANDSHAKES + 16 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind(SocketAddr::new([127, 0, 0, 2].into(), 0))
                .unwrap();
            idle.push(socket.connect(server).await.unwrap());
        }
        // A client elsewhere still gets its connection at once (before, it
        // waited behind them past its own handshake timeout).
        let (offer, mut ticket) = hub.offer().unwrap();
        let (mut client, mut server) = take(&offer, &mut ticket).await;
        crosses(&mut client, &mut server, b"still here").await;
        // The idle peer kept its few handshakes; the rest were closed.
        let mut closed = 0;
        for conn in &mut idle {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_millis(200), conn.read(&mut byte)).await;
            if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
                closed += 1;
            }
        }
        assert_eq!(closed, idle.len() - HANDSHAKES_PER_ADDRESS);
    }

    #[tokio::test]
    async fn messages_of_any_size_cross_both_ways() {
        let (mut client, mut server, _hub) = pair().await;
        for size in [1usize, 100, 8192, MAX_PLAIN, MAX_PLAIN + 1, 300_000] {
            let sent: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
            client.write_all(&sent).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0u8; size];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, sent, "client to server, {size} bytes");
            server.write_all(&got).await.unwrap();
            server.flush().await.unwrap();
            let mut back = vec![0u8; size];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, sent, "server to client, {size} bytes");
        }
        client.close().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_wrong_key_or_token_gets_nothing_and_the_offer_survives() {
        let (hub, _task) = DirectHub::listen([127, 0, 0, 1].into(), 0).await.unwrap();
        let (offer, mut ticket) = hub.offer().unwrap();
        // Right token, wrong key: refused.
        let forged = DirectOffer {
            psk: [9; 32],
            ..offer.clone()
        };
        assert!(DirectLink::connect([127, 0, 0, 1].into(), &forged)
            .await
            .is_err());
        // Unknown token: refused.
        let unknown = DirectOffer {
            token: [1; 16],
            ..offer.clone()
        };
        assert!(DirectLink::connect([127, 0, 0, 1].into(), &unknown)
            .await
            .is_err());
        // Garbage: the listener keeps going.
        let mut tcp = TcpStream::connect(("127.0.0.1", hub.port())).await.unwrap();
        tcp.write_all(&[0xAB; 4096]).await.unwrap();
        drop(tcp);
        // The real client still gets in.
        let (mut client, mut server) = take(&offer, &mut ticket).await;
        crosses(&mut client, &mut server, b"hello").await;
        // A token is good once.
        assert!(DirectLink::connect([127, 0, 0, 1].into(), &offer)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn tampered_bytes_end_the_link_with_an_error() {
        let (hub, _task) = DirectHub::listen([127, 0, 0, 1].into(), 0).await.unwrap();
        let (offer, mut ticket) = hub.offer().unwrap();
        let (mut client, mut server) = take(&offer, &mut ticket).await;
        // Write a forged message straight onto the socket.
        let mut forged = 40u16.to_be_bytes().to_vec();
        forged.extend_from_slice(&[0x55; 40]);
        client.tcp.write_all(&forged).await.unwrap();
        let mut got = [0u8; 8];
        let err = server.read_exact(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[tokio::test]
    async fn a_withdrawn_offer_is_refused() {
        let (hub, _task) = DirectHub::listen([127, 0, 0, 1].into(), 0).await.unwrap();
        let (offer, ticket) = hub.offer().unwrap();
        drop(ticket);
        assert!(DirectLink::connect([127, 0, 0, 1].into(), &offer)
            .await
            .is_err());
    }
}
