//! `sherpa dashboard` and `sherpa demo --dashboard`.

use std::net::SocketAddr;

use sherpa_swarm::dashboard::{parse_tracker, Dashboard, DashboardConfig, SwarmMode};
use sherpa_swarm::model_store::{self, sherpa_home, DEFAULT_MODEL};
use sherpa_swarm::{LocalSwarm, ModelId, SherpaError};

use crate::network::{runtime, swarm_key};
use crate::DashboardArgs;

pub(crate) fn dashboard(args: DashboardArgs) -> Result<(), SherpaError> {
    // Fetch first, with the command line's progress bar.
    model_store::resolve_model(&args.model, &mut crate::fetch_progress())?;
    let mode = match (&args.swarm.tracker, args.swarm.lan) {
        (Some(tracker), _) => Some(SwarmMode::Wan(parse_tracker(tracker)?)),
        (None, true) => Some(SwarmMode::Lan),
        (None, false) => None,
    };
    let token = args
        .token
        .or_else(|| std::env::var("SHERPA_API_TOKEN").ok())
        .filter(|t| !t.is_empty());
    let mut config = DashboardConfig::default()
        .with_listen(args.listen)
        .with_mode(mode)
        .with_model(args.model)
        .with_swarm_key(swarm_key(args.swarm.swarm_key.as_deref())?)
        .with_token(token)
        .with_cors_origin(args.cors_origin)
        .with_device(args.device);
    if let Some(file) = args.state_file {
        config = config.with_state_file(file);
    }
    runtime()?.block_on(async move {
        let dashboard = Dashboard::start(config).await?;
        announce(&dashboard);
        wait_for_ctrl_c().await;
        dashboard.shutdown().await;
        Ok(())
    })
}

/// A loopback swarm in this process with the dashboard on it.
pub(crate) fn demo(servers: u32, listen: SocketAddr) -> Result<(), SherpaError> {
    let path = model_store::resolve_model(DEFAULT_MODEL, &mut crate::fetch_progress())?;
    let model = ModelId::new(DEFAULT_MODEL)?;
    runtime()?.block_on(async move {
        let swarm = LocalSwarm::start(&path.to_string_lossy(), model, servers).await?;
        eprintln!(
            "swarm up: a tracker and {} servers on loopback",
            swarm.servers.len()
        );
        // The demo's tracker lives as long as the demo: keep its settings
        // apart from the user's own dashboard.
        let config = DashboardConfig::default()
            .with_listen(listen)
            .with_mode(Some(SwarmMode::Wan(swarm.tracker.addr().clone())))
            .with_model(path.to_string_lossy().into_owned())
            .with_state_file(sherpa_home().join("demo-dashboard.json"));
        let dashboard = match Dashboard::start(config.clone()).await {
            Ok(d) => d,
            Err(e) if listen.port() != 0 => {
                eprintln!("{e}; using another port");
                let any = SocketAddr::new(listen.ip(), 0);
                Dashboard::start(config.with_listen(any)).await?
            }
            Err(e) => return Err(e),
        };
        announce(&dashboard);
        wait_for_ctrl_c().await;
        dashboard.shutdown().await;
        swarm.shutdown().await;
        Ok(())
    })
}

/// The URL first on stdout (the line scripts read), an explanation on stderr.
fn announce(dashboard: &Dashboard) {
    println!("{}", dashboard.url());
    eprintln!(
        "dashboard: open {} (OpenAI-compatible API at http://{}/v1); Ctrl-C stops it",
        dashboard.url(),
        dashboard.addr()
    );
    if dashboard.token().is_some() {
        eprintln!("API requests need `Authorization: Bearer <the token in that address>`");
    }
}

async fn wait_for_ctrl_c() {
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("cannot wait for Ctrl-C ({e}); stopping");
    }
}
