//! A wide-area network on one machine, for benches and tests: network
//! namespaces joined by a switch in this process that delays, drops and
//! rate-limits packets per link.
//!
//! Each host is a network namespace (`ip netns add`) holding one TUN
//! device with an address in 198.18.0.0/24 (the range set aside for
//! benchmarking, RFC 2544; nothing leaves the machine). A thread per host
//! reads the packets its host sends, and delivers each to the destination
//! host's device after the link's delay, unless the link drops it. The
//! kernel's `netem` does the same in the kernel, but many kernels (this
//! project's CI machines among them) are built without it; this needs only
//! TUN devices and namespaces. Links can be changed while the network runs
//! ([`Wan::set_link`]), so a test can add loss or cut a host off.
//!
//! Nodes run in a host on that host's own tokio runtime ([`Wan::runtime`]),
//! whose threads all live in its namespace, so every socket they open
//! (libp2p's and the direct data connection) is the host's. Linux only, and
//! it needs root (`CAP_NET_ADMIN`, `CAP_SYS_ADMIN`); [`Wan::available`]
//! says why not otherwise.

use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use swarm_core::{BlockRange, ModelId};
use swarm_dht::Multiaddr;

use crate::error::SherpaError;
use crate::swarm::{Client, Server, Tracker};

/// One direction of a link between two hosts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// One-way delay of every packet.
    pub delay: Duration,
    /// Probability that a packet is dropped (1.0 cuts the link).
    pub loss: f64,
    /// Bits per second, if limited.
    pub rate: Option<u64>,
}

impl Link {
    /// A link whose round trip (both directions' delays) is `rtt`.
    pub fn rtt(rtt: Duration) -> Self {
        Self {
            delay: rtt / 2,
            loss: 0.0,
            rate: None,
        }
    }

    /// The same link dropping a share of its packets.
    pub fn with_loss(mut self, loss: f64) -> Self {
        self.loss = loss.clamp(0.0, 1.0);
        self
    }

    /// The same link limited to `bits_per_second`.
    pub fn with_rate(mut self, bits_per_second: u64) -> Self {
        self.rate = Some(bits_per_second.max(1));
        self
    }
}

/// The first address of a WAN's hosts: host `i` is 198.18.0.(i + 1).
const NET: [u8; 3] = [198, 18, 0];
/// Name of each host's TUN device.
const DEVICE: &str = "wan0";
/// Packets larger than this are dropped (the device's MTU is 1500).
const MAX_PACKET: usize = 65_536;
/// How often a blocked reader looks at the stop flag.
const POLL_MS: i32 = 100;

fn failed(msg: impl Into<String>) -> SherpaError {
    SherpaError::Bench(format!("wan: {}", msg.into()))
}

/// A packet waiting for its delivery time.
struct Pending {
    at: Instant,
    seq: u64,
    bytes: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    // Earliest first out of a max-heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The packets queued for one host, delivered in time order.
#[derive(Default)]
struct Queue {
    heap: Mutex<(BinaryHeap<Pending>, u64)>,
    ready: Condvar,
}

/// The state the switch's threads share.
struct Switch {
    links: RwLock<Vec<Vec<Link>>>,
    /// When each directed link is free again (for rate limits).
    busy_until: Mutex<Vec<Vec<Instant>>>,
    queues: Vec<Queue>,
    stop: AtomicBool,
}

/// A network of namespaces; dropping it stops the switch and deletes them.
pub struct Wan {
    names: Vec<String>,
    switch: Arc<Switch>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Wan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wan").field("hosts", &self.names).finish()
    }
}

impl Wan {
    /// Whether this process can build a WAN: `Err` says why not (not
    /// Linux, not root, no `ip` command, no TUN device).
    pub fn available() -> Result<(), SherpaError> {
        if !cfg!(target_os = "linux") {
            return Err(failed("network namespaces need Linux"));
        }
        // SAFETY: geteuid has no preconditions.
        #[cfg(target_os = "linux")]
        if unsafe { libc::geteuid() } != 0 {
            return Err(failed("network namespaces need root"));
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(failed("no /dev/net/tun"));
        }
        match Command::new("ip").arg("-V").output() {
            Ok(out) if out.status.success() => Ok(()),
            _ => Err(failed("no `ip` command (iproute2)")),
        }
    }

    /// Starts `hosts` hosts (at most 250), every pair joined by `link` in
    /// each direction.
    pub fn start(hosts: usize, link: Link) -> Result<Self, SherpaError> {
        Self::available()?;
        if hosts == 0 || hosts > 250 {
            return Err(failed(format!("{hosts} hosts: between 1 and 250")));
        }
        let switch = Arc::new(Switch {
            links: RwLock::new(vec![vec![link; hosts]; hosts]),
            busy_until: Mutex::new(vec![vec![Instant::now(); hosts]; hosts]),
            queues: (0..hosts).map(|_| Queue::default()).collect(),
            stop: AtomicBool::new(false),
        });
        let mut wan = Self {
            names: Vec::new(),
            switch,
            threads: Vec::new(),
        };
        // Unique per process and per network, so parallel tests never meet.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let net = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut devices = Vec::new();
        for i in 0..hosts {
            let name = format!("sherpa-{}-{net}-{i}", std::process::id());
            ip(&["netns", "add", &name])?;
            wan.names.push(name.clone());
            let device = in_namespace(&name, open_tun)??;
            let addr = wan.addr(i);
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            ip(&["-n", &name, "link", "set", DEVICE, "mtu", "1500", "up"])?;
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                DEVICE,
            ])?;
            devices.push(device);
        }
        for (i, device) in devices.into_iter().enumerate() {
            let writer = device
                .try_clone()
                .map_err(|e| failed(format!("tun: {e}")))?;
            let switch = wan.switch.clone();
            wan.threads.push(
                std::thread::Builder::new()
                    .name(format!("wan-in-{i}"))
                    .spawn(move || receive(i, device, &switch))
                    .map_err(|e| failed(format!("thread: {e}")))?,
            );
            let switch = wan.switch.clone();
            wan.threads.push(
                std::thread::Builder::new()
                    .name(format!("wan-out-{i}"))
                    .spawn(move || deliver(i, writer, &switch))
                    .map_err(|e| failed(format!("thread: {e}")))?,
            );
        }
        Ok(wan)
    }

    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.names.len()
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(NET[0], NET[1], NET[2], (i + 1) as u8)
    }

    /// Host `i`'s namespace, as `ip netns` names it.
    pub fn namespace(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Replaces the link from host `from` to host `to` (one direction).
    pub fn set_link(&self, from: usize, to: usize, link: Link) {
        if let Ok(mut links) = self.switch.links.write() {
            if let Some(l) = links.get_mut(from).and_then(|row| row.get_mut(to)) {
                *l = link;
            }
        }
    }

    /// A tokio runtime whose threads all live in host `i`'s namespace. Run
    /// nodes with its `spawn` (not `block_on`, which runs the future on the
    /// calling thread, outside the namespace).
    pub fn runtime(
        &self,
        i: usize,
        threads: usize,
    ) -> Result<tokio::runtime::Runtime, SherpaError> {
        let name = self
            .names
            .get(i)
            .ok_or_else(|| failed(format!("no host {i}")))?;
        in_namespace(name, move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .thread_name(format!("wan-host-{i}"))
                .enable_all()
                .build()
                .map_err(|e| failed(format!("runtime: {e}")))
        })?
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.switch.stop.store(true, Ordering::Relaxed);
        for q in &self.switch.queues {
            q.ready.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for name in &self.names {
            let _ = ip(&["netns", "delete", name]);
        }
    }
}

/// Runs `ip` with `args`.
fn ip(args: &[&str]) -> Result<(), SherpaError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| failed(format!("ip: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs `f` on a new thread that has entered the namespace `name`; threads
/// it starts live there too.
fn in_namespace<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SherpaError> {
    let path = format!("/var/run/netns/{name}");
    let ns = File::open(&path).map_err(|e| failed(format!("{path}: {e}")))?;
    std::thread::spawn(move || {
        enter(&ns)?;
        Ok(f())
    })
    .join()
    .map_err(|_| failed("a namespace thread panicked"))?
}

#[cfg(target_os = "linux")]
fn enter(ns: &File) -> Result<(), SherpaError> {
    // SAFETY: setns on an open namespace file; it changes only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(failed(format!(
            "setns: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn enter(_ns: &File) -> Result<(), SherpaError> {
    Err(failed("network namespaces need Linux"))
}

/// Creates the TUN device [`DEVICE`] in this thread's namespace.
#[cfg(target_os = "linux")]
fn open_tun() -> Result<File, SherpaError> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| failed(format!("/dev/net/tun: {e}")))?;
    // struct ifreq: a 16-byte name, then the flags (short) in a 24-byte union.
    let mut req = [0u8; 40];
    req[..DEVICE.len()].copy_from_slice(DEVICE.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is
    // laid out as and outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, req.as_mut_ptr()) } != 0 {
        return Err(failed(format!(
            "TUNSETIFF: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: the descriptor is tun's own, moved into a new File.
    let fd = unsafe { libc::dup(tun.as_raw_fd()) };
    if fd < 0 {
        return Err(failed("dup of the tun descriptor failed"));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(not(target_os = "linux"))]
fn open_tun() -> Result<File, SherpaError> {
    Err(failed("TUN devices need Linux"))
}

/// The destination host of an IPv4 packet in the WAN's range.
fn destination(packet: &[u8], hosts: usize) -> Option<usize> {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[16..19] != NET {
        return None;
    }
    let host = usize::from(packet[19]).checked_sub(1)?;
    (host < hosts).then_some(host)
}

/// Gives the calling thread a real-time priority, so packets keep their
/// schedule while the hosts' nodes keep every core busy (with ordinary
/// priority, a delivery waited several milliseconds for a core now and
/// then). Best effort: without the privilege the thread runs as it was.
#[cfg(target_os = "linux")]
fn real_time() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: sets this thread's policy with a valid parameter.
    let _ = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
}

#[cfg(not(target_os = "linux"))]
fn real_time() {}

/// Reads what host `from` sends and queues it for its destination.
fn receive(from: usize, mut device: File, switch: &Switch) {
    real_time();
    let hosts = switch.queues.len();
    let mut buf = vec![0u8; MAX_PACKET];
    let mut rng = rand::rng();
    while !switch.stop.load(Ordering::Relaxed) {
        if !readable(&device) {
            continue;
        }
        let Ok(n) = device.read(&mut buf) else {
            continue;
        };
        // Anything but IPv4 to another host (IPv6 router solicitations, ...)
        // goes nowhere.
        let Some(to) = destination(&buf[..n], hosts) else {
            continue;
        };
        let Ok(links) = switch.links.read() else {
            return;
        };
        let link = links[from][to];
        drop(links);
        if link.loss > 0.0 && rand::Rng::random_bool(&mut rng, link.loss) {
            continue;
        }
        let now = Instant::now();
        let sent = match link.rate {
            None => now,
            Some(bits) => {
                let Ok(mut busy) = switch.busy_until.lock() else {
                    return;
                };
                let start = busy[from][to].max(now);
                let end = start + Duration::from_secs_f64(n as f64 * 8.0 / bits as f64);
                busy[from][to] = end;
                end
            }
        };
        let queue = &switch.queues[to];
        let Ok(mut heap) = queue.heap.lock() else {
            return;
        };
        heap.1 += 1;
        let seq = heap.1;
        heap.0.push(Pending {
            at: sent + link.delay,
            seq,
            bytes: buf[..n].to_vec(),
        });
        queue.ready.notify_one();
    }
}

/// Whether `device` has a packet, waiting at most [`POLL_MS`].
#[cfg(target_os = "linux")]
fn readable(device: &File) -> bool {
    let mut fd = libc::pollfd {
        fd: device.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, POLL_MS) > 0 }
}

#[cfg(not(target_os = "linux"))]
fn readable(_device: &File) -> bool {
    false
}

/// Writes host `to`'s packets into its device when they are due.
fn deliver(to: usize, mut device: File, switch: &Switch) {
    real_time();
    let queue = &switch.queues[to];
    let Ok(mut heap) = queue.heap.lock() else {
        return;
    };
    while !switch.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        match heap.0.peek().map(|p| p.at) {
            Some(at) if at <= now => {
                if let Some(p) = heap.0.pop() {
                    drop(heap);
                    // A full device queue drops the packet, as a router would.
                    let _ = device.write(&p.bytes);
                    heap = match queue.heap.lock() {
                        Ok(h) => h,
                        Err(_) => return,
                    };
                }
            }
            next => {
                let wait = next.map_or(Duration::from_millis(POLL_MS as u64), |at| at - now);
                heap = match queue.ready.wait_timeout(heap, wait) {
                    Ok((h, _)) => h,
                    Err(_) => return,
                };
            }
        }
    }
}

/// A swarm across a [`Wan`]: a tracker and a client on host 0, one server
/// per span on hosts 1, 2, ..., each node on its host's runtime.
pub struct WanSwarm {
    runtimes: Vec<tokio::runtime::Runtime>,
    tracker: Option<Tracker>,
    servers: Vec<(usize, Server)>,
    client: Option<Arc<Client>>,
}

impl std::fmt::Debug for WanSwarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WanSwarm")
            .field("servers", &self.servers.len())
            .finish()
    }
}

/// Runs `fut` on `runtime` (so in its namespace) and waits for it.
async fn on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = Result<T, SherpaError>> + Send + 'static,
) -> Result<T, SherpaError> {
    runtime
        .spawn(fut)
        .await
        .map_err(|e| failed(format!("a host's task failed: {e}")))?
}

fn tcp_on(addr: Ipv4Addr) -> Result<Multiaddr, SherpaError> {
    format!("/ip4/{addr}/tcp/0")
        .parse()
        .map_err(|e| failed(format!("{addr}: {e}")))
}

impl WanSwarm {
    /// Starts the nodes: `wan` needs a host per span plus one.
    pub async fn start(
        wan: &Wan,
        model: &str,
        model_id: ModelId,
        spans: &[BlockRange],
    ) -> Result<Self, SherpaError> {
        if wan.hosts() < spans.len() + 1 {
            return Err(failed(format!(
                "{} spans need {} hosts, the network has {}",
                spans.len(),
                spans.len() + 1,
                wan.hosts()
            )));
        }
        let mut swarm = Self {
            runtimes: vec![wan.runtime(0, 2)?],
            tracker: None,
            servers: Vec::new(),
            client: None,
        };
        let listen = tcp_on(wan.addr(0))?;
        let tracker = on(&swarm.runtimes[0], async move {
            Tracker::builder().listen(listen).start().await
        })
        .await?;
        let tracker_addr = tracker.addr().clone();
        swarm.tracker = Some(tracker);
        for (i, span) in spans.iter().enumerate() {
            swarm.runtimes.push(wan.runtime(i + 1, 2)?);
            let builder = Server::builder(model, *span)
                .model_id(model_id.clone())
                .name(format!("server-{i}"))
                .tracker(tracker_addr.clone())
                .listen(tcp_on(wan.addr(i + 1))?)
                .probe_tracker(false);
            let server = on(&swarm.runtimes[i + 1], builder.start()).await?;
            swarm.servers.push((i + 1, server));
        }
        let builder = Client::builder(model)
            .model_id(model_id)
            .tracker(tracker_addr)
            .listen(tcp_on(wan.addr(0))?);
        swarm.client = Some(Arc::new(on(&swarm.runtimes[0], builder.start()).await?));
        Ok(swarm)
    }

    /// Runs `work` with the client on host 0's runtime.
    pub async fn with_client<T, F>(
        &self,
        work: impl FnOnce(Arc<Client>) -> F + Send + 'static,
    ) -> Result<T, SherpaError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, SherpaError>> + Send + 'static,
    {
        let client = self
            .client
            .clone()
            .ok_or_else(|| failed("the client has stopped"))?;
        on(&self.runtimes[0], async move { work(client).await }).await
    }

    /// Stops every node, then the hosts' runtimes.
    pub async fn shutdown(mut self) {
        if let Some(client) = self.client.take().and_then(|c| Arc::try_unwrap(c).ok()) {
            let _ = on(&self.runtimes[0], async move {
                client.shutdown().await;
                Ok(())
            })
            .await;
        }
        for (host, server) in std::mem::take(&mut self.servers) {
            let _ = on(&self.runtimes[host], async move {
                server.abort().await;
                Ok(())
            })
            .await;
        }
        if let Some(tracker) = self.tracker.take() {
            let _ = on(&self.runtimes[0], async move {
                tracker.shutdown().await;
                Ok(())
            })
            .await;
        }
    }
}

impl Drop for WanSwarm {
    fn drop(&mut self) {
        // Runtimes may not be dropped (which blocks) inside async code.
        for runtime in self.runtimes.drain(..) {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn packets_go_to_the_host_they_are_addressed_to() {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[198, 18, 0, 3]);
        assert_eq!(destination(&p, 4), Some(2));
        assert_eq!(destination(&p, 2), None, "beyond the hosts");
        p[19] = 0;
        assert_eq!(destination(&p, 4), None, "the network's own address");
        p[16..20].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(destination(&p, 4), None, "outside the range");
        p[0] = 0x60;
        assert_eq!(destination(&p, 4), None, "IPv6");
        assert_eq!(destination(&p[..10], 4), None, "truncated");
    }

    #[test]
    fn the_earliest_packet_leaves_first() {
        let now = Instant::now();
        let mut heap = BinaryHeap::new();
        for (i, ms) in [30u64, 10, 20, 10].into_iter().enumerate() {
            heap.push(Pending {
                at: now + Duration::from_millis(ms),
                seq: i as u64,
                bytes: vec![i as u8],
            });
        }
        let order: Vec<u8> = std::iter::from_fn(|| heap.pop().map(|p| p.bytes[0])).collect();
        assert_eq!(order, [1, 3, 2, 0]);
    }
}
