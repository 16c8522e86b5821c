//! The dashboard: one process holding a swarm client that serves the web
//! UI (swarm mode, node selector, coverage, pipeline, chat) and an
//! OpenAI-compatible HTTP API (`/v1/models`, `/v1/chat/completions`,
//! `/v1/completions`), plus `/health` and Prometheus `/metrics`.
//!
//! ```no_run
//! # async fn run() -> Result<(), sherpa_swarm::SherpaError> {
//! use sherpa_swarm::dashboard::{Dashboard, DashboardConfig, SwarmMode};
//!
//! let tracker = "/ip4/127.0.0.1/tcp/4343/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".parse().map_err(|e| sherpa_swarm::SherpaError::Network(format!("{e}")))?;
//! let dashboard = Dashboard::start(DashboardConfig::default().with_mode(Some(SwarmMode::Wan(tracker)))).await?;
//! println!("open {}", dashboard.url());
//! # Ok(()) }
//! ```
//!
//! Bound to a loopback address (the default) it answers only requests
//! whose `Host` is a loopback name, so a web page elsewhere cannot reach
//! it through DNS rebinding; bound elsewhere every API request needs
//! `Authorization: Bearer TOKEN` (a token is made when none is given).
//! Static files are a fixed set compiled into the binary; request bodies
//! are limited; no CORS headers are sent unless an origin is allowed.

mod api;
mod http;
mod openai;
mod state;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use swarm_dht::{Multiaddr, SwarmKey};

use crate::{DeviceSpec, SherpaError};

use state::Shared;
pub use state::SwarmMode;

/// The dashboard's default address.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 4380);

/// How a dashboard is set up.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DashboardConfig {
    /// Where it listens [default: 127.0.0.1:4380].
    pub listen: SocketAddr,
    /// How it finds the swarm; `None` uses the mode saved by the last run
    /// (if any), else waits for the user to choose one in the UI.
    pub mode: Option<SwarmMode>,
    /// The model it generates with: a known name, a `.gguf` file or an HF
    /// directory [default: smollm2-135m].
    pub model: String,
    /// A private swarm's key.
    pub swarm_key: Option<SwarmKey>,
    /// The bearer token API requests need; `None` makes one when the
    /// dashboard listens beyond loopback, and needs none on loopback.
    pub token: Option<String>,
    /// Where the mode, tracker and node choice are kept across restarts
    /// [default: $SHERPA_HOME/dashboard.json].
    pub state_file: PathBuf,
    /// The largest request body accepted [default: 1 MiB].
    pub max_body_bytes: usize,
    /// An origin allowed to call the API from a browser (CORS); none by
    /// default.
    pub cors_origin: Option<String>,
    /// Generations at once; more are answered 429 [default: 16].
    pub max_generations: usize,
    /// How long a request waits for blocks that have no server yet
    /// [default: 5 s].
    pub wait_for_hosts: Duration,
    /// The device the client's part of the model runs on [default: cpu].
    pub device: DeviceSpec,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            mode: None,
            model: crate::model_store::DEFAULT_MODEL.to_owned(),
            swarm_key: None,
            token: None,
            state_file: crate::model_store::sherpa_home().join("dashboard.json"),
            max_body_bytes: 1 << 20,
            cors_origin: None,
            max_generations: 16,
            wait_for_hosts: Duration::from_secs(5),
            device: DeviceSpec::Cpu,
        }
    }
}

crate::core::with_setters!(DashboardConfig {
    listen: SocketAddr => with_listen,
    mode: Option<SwarmMode> => with_mode,
    model: String => with_model,
    swarm_key: Option<SwarmKey> => with_swarm_key,
    token: Option<String> => with_token,
    state_file: PathBuf => with_state_file,
    max_body_bytes: usize => with_max_body_bytes,
    cors_origin: Option<String> => with_cors_origin,
    max_generations: usize => with_max_generations,
    wait_for_hosts: Duration => with_wait_for_hosts,
    device: DeviceSpec => with_device,
});

/// A running dashboard.
#[derive(Debug)]
pub struct Dashboard {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Dashboard {
    /// Listens, starts loading the swarm client in the background (the
    /// UI shows the progress; `/health` answers 503 until it is ready) and
    /// serves.
    pub async fn start(config: DashboardConfig) -> Result<Self, SherpaError> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| {
                SherpaError::Network(format!("cannot listen on {}: {e}", config.listen))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| SherpaError::Network(format!("the dashboard's address: {e}")))?;
        let shared = Shared::new(config, addr)?;
        shared.resume();
        let app = http::router(shared.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "the dashboard stopped serving");
            }
        });
        Ok(Self {
            addr,
            shared,
            stop: Some(stop),
            server,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bearer token API requests need, if any.
    pub fn token(&self) -> Option<&str> {
        self.shared.token.as_deref()
    }

    /// The UI's address (with the token in its fragment when one is
    /// needed; the page keeps it and takes it out of the address bar).
    pub fn url(&self) -> String {
        let host = match self.addr.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
            IpAddr::V6(ip) => format!("[{ip}]"),
            IpAddr::V4(ip) => ip.to_string(),
        };
        match self.token() {
            Some(token) => format!("http://{host}:{}/#token={token}", self.addr.port()),
            None => format!("http://{host}:{}/", self.addr.port()),
        }
    }

    /// Switches to `mode` (as the UI's mode selector does).
    pub fn set_mode(&self, mode: SwarmMode) {
        self.shared.switch(mode);
    }

    /// Waits until the swarm client is ready (or failed) or `limit` has
    /// passed.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), SherpaError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.shared.client() {
                Ok(_) => return Ok(()),
                Err(state::NotReady::Failed(why)) => return Err(SherpaError::Network(why)),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(SherpaError::Network(format!(
                        "the dashboard's swarm client was not ready within {limit:?}"
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Stops serving and leaves the swarm.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
        }
        self.shared.shutdown().await;
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Parses a tracker address given in the UI or on the command line.
pub fn parse_tracker(text: &str) -> Result<Multiaddr, SherpaError> {
    let text = text.trim();
    let addr: Multiaddr = text.parse().map_err(|e| {
        SherpaError::Network(format!(
            "{text:?} is not a multiaddr ({e}), e.g. /ip4/127.0.0.1/tcp/4343/p2p/12D3..."
        ))
    })?;
    if !addr
        .iter()
        .any(|p| matches!(p, swarm_dht::multiaddr::Protocol::P2p(_)))
    {
        return Err(SherpaError::Network(format!(
            "{text:?} has no /p2p/<peer id>: give the tracker's address as it prints it"
        )));
    }
    Ok(addr)
}
