//! `sherpa tracker`, `sherpa serve` and `sherpa nodes`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sherpa_swarm::core::infer::Dtype;
use sherpa_swarm::core::{BlockRange, ModelId};
use sherpa_swarm::dht::SessionOptions;
use sherpa_swarm::dht::{
    self, Multiaddr, Node, NodeConfig, NodeIdentity, RelayMode, Survey, SurveyOptions, SwarmKey,
};
use sherpa_swarm::model_store::{self, sherpa_home};
use sherpa_swarm::score::SelectionPolicy;
use sherpa_swarm::shard::{ChatMessage, GenerateOptions, ShardError, TextTokenizer};
use sherpa_swarm::{Client, LocalSwarm, NodeChoice, Server, SherpaError, Tracker};

use crate::{GenerateArgs, NodesArgs, RelayArg, ServeArgs};
use sherpa_swarm::nodes::ModelReport;

fn net(e: impl std::fmt::Display) -> SherpaError {
    SherpaError::Network(e.to_string())
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, SherpaError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(net)
}

fn multiaddr(text: &str) -> Result<dht::Multiaddr, SherpaError> {
    text.parse().map_err(|e| {
        SherpaError::Network(format!(
            "{text:?} is not a multiaddr ({e}), e.g. /ip4/127.0.0.1/tcp/4343/p2p/12D3..."
        ))
    })
}

/// Prints the listen addresses, the first one first (the line scripts read).
fn announce_address(addrs: &[Multiaddr]) {
    let mut stdout = std::io::stdout().lock();
    for addr in addrs {
        let _ = writeln!(stdout, "{addr}");
    }
    let _ = stdout.flush();
}

/// The private swarm key at `path`, if one was given.
pub(crate) fn swarm_key(path: Option<&Path>) -> Result<Option<SwarmKey>, SherpaError> {
    let Some(path) = path else { return Ok(None) };
    let key = SwarmKey::load(path).map_err(net)?;
    eprintln!("private swarm, key fingerprint {}", key.fingerprint());
    Ok(Some(key))
}

/// `listen`, or TCP and QUIC on `port` of every interface (TCP only in a
/// private swarm: QUIC cannot carry the swarm key).
fn listen_addrs(
    listen: &[String],
    port: u16,
    private: bool,
) -> Result<Vec<dht::Multiaddr>, SherpaError> {
    if !listen.is_empty() {
        return listen.iter().map(|a| multiaddr(a)).collect();
    }
    let mut addrs = vec![multiaddr(&format!("/ip4/0.0.0.0/tcp/{port}"))?];
    if !private {
        addrs.push(multiaddr(&format!("/ip4/0.0.0.0/udp/{port}/quic-v1"))?);
    }
    Ok(addrs)
}

pub(crate) fn swarm_key_file(out: &Path) -> Result<(), SherpaError> {
    let key = SwarmKey::create(out).map_err(net)?;
    println!("{}", out.display());
    eprintln!(
        "created a swarm key (fingerprint {}); pass --swarm-key {} to the tracker and every node of the swarm, and share the file only with them",
        key.fingerprint(),
        out.display()
    );
    Ok(())
}

pub(crate) fn tracker(
    listen: Vec<String>,
    data_dir: Option<PathBuf>,
    swarm_key_path: Option<PathBuf>,
) -> Result<(), SherpaError> {
    let identity = claim_identity(data_dir.unwrap_or_else(|| sherpa_home().join("tracker")))?;
    let swarm_key = swarm_key(swarm_key_path.as_deref())?;
    let listen = listen_addrs(&listen, 4343, swarm_key.is_some())?;
    runtime()?.block_on(async move {
        let mut builder = Tracker::builder().identity(identity).swarm_key(swarm_key);
        for addr in listen {
            builder = builder.listen(addr);
        }
        let tracker = builder.start().await?;
        announce_address(tracker.addrs());
        eprintln!("tracker running (DHT bootstrap, relay, AutoNAT); Ctrl-C stops it");
        tokio::signal::ctrl_c().await.map_err(net)?;
        tracker.shutdown().await;
        Ok(())
    })
}

/// Claims the node key in `dir` for this process. When other running nodes
/// hold the directory's first keys, this one takes the next free key and
/// says so: two nodes sharing an identity would hide each other.
fn claim_identity(dir: PathBuf) -> Result<NodeIdentity, SherpaError> {
    let identity = NodeIdentity::claim(&dir).map_err(net)?;
    if let Some(held) = identity.skipped().first() {
        eprintln!(
            "{} is held by another running node; this one uses its own identity in {} (the same one each time it finds that key free)",
            held.display(),
            identity.path().display()
        );
    }
    Ok(identity)
}

/// Where a node finds its swarm, from `--tracker` / `--lan`.
pub(crate) fn bootstrap(tracker: Option<&str>, lan: bool) -> Result<Vec<Multiaddr>, SherpaError> {
    match (tracker, lan) {
        (Some(tracker), _) => Ok(vec![multiaddr(tracker)?]),
        (None, true) => Ok(Vec::new()),
        (None, false) => Err(SherpaError::Network(
            "say where to look: --tracker MULTIADDR or --lan".into(),
        )),
    }
}

pub(crate) fn serve(args: ServeArgs) -> Result<(), SherpaError> {
    let blocks: Option<BlockRange> = args.blocks.as_deref().map(str::parse).transpose()?;
    let model = match args.model_id.as_deref() {
        Some(id) => ModelId::new(id)?,
        None => model_store::model_id(&args.model)?,
    };
    let path = model_store::resolve_model(&args.model, &mut crate::fetch_progress())?;
    let identity = claim_identity(
        args.data_dir
            .unwrap_or_else(|| sherpa_home().join("server")),
    )?;
    let swarm_key = swarm_key(args.swarm.swarm_key.as_deref())?;
    let listen = listen_addrs(&args.listen, 0, swarm_key.is_some())?;
    let relay = match args.relay {
        RelayArg::Auto => RelayMode::Auto,
        RelayArg::Always => RelayMode::Always,
        RelayArg::Never => RelayMode::Never,
    };
    let bootstrap = bootstrap(args.swarm.tracker.as_deref(), args.swarm.lan)?;
    runtime()?.block_on(async move {
        let mut builder = match blocks {
            Some(blocks) => Server::builder(path.to_string_lossy(), blocks),
            None => Server::placing_itself(path.to_string_lossy()),
        }
        .model_id(model.clone())
            .identity(identity)
            .device(args.device)
            .lan(args.swarm.lan)
            .swarm_key(swarm_key)
            .relay(relay)
            .cache_bytes(args.cache_mib.saturating_mul(1 << 20))
            .direct_port((!args.no_direct).then_some(args.direct_port));
        for addr in listen {
            builder = builder.listen(addr);
        }
        for addr in bootstrap {
            builder = builder.tracker(addr);
        }
        if let Some(name) = args.name {
            builder = builder.name(name);
        }
        if let Some(limit) = args.max_memory {
            builder = builder.max_memory(limit);
        }
        if let Some(n) = args.num_blocks {
            builder = builder.span_length(n);
        }
        let server = builder.start().await?;
        announce_address(server.addrs());
        let resident = match sherpa_swarm::hardware::resident_memory() {
            Some((now, peak)) => format!(
                ", resident {:.1} MiB (peak {:.1})",
                now as f64 / 1048576.0,
                peak as f64 / 1048576.0
            ),
            None => String::new(),
        };
        eprintln!(
            "serving {model} blocks {}{} as {} ({:.1} MiB of weights{resident}, {:.0} blocks x tokens/s)",
            server.info().blocks,
            if blocks.is_none() { " (chosen; it moves where blocks lose their host)" } else { "" },
            server.info().public_name,
            server.shard().weight_bytes() as f64 / 1048576.0,
            server.info().throughput
        );
        if let Some(port) = server.direct_port() {
            eprintln!("direct session connections on TCP port {port}");
        }
        if let Some(b) = server.bandwidth() {
            eprintln!(
                "bandwidth to the tracker: {:.0} Mbit/s up, {:.0} Mbit/s down",
                b.download_bps as f64 * 8e-6,
                b.upload_bps as f64 * 8e-6
            );
        }
        eprintln!("announced; serving inference sessions. Ctrl-C withdraws and stops.");
        tokio::signal::ctrl_c().await.map_err(net)?;
        match server.shutdown().await {
            Ok(()) => eprintln!("withdrawn"),
            Err(e) => eprintln!("{e}"),
        }
        Ok(())
    })
}

/// Bytes each way of the bandwidth probe `sherpa nodes` runs per server.
const PROBE_BYTES: u32 = 256 << 10;

pub(crate) fn nodes(args: NodesArgs) -> Result<(), SherpaError> {
    let lan = args.swarm.lan;
    let bootstrap = bootstrap(args.swarm.tracker.as_deref(), lan)?;
    let explicit = args.model.is_some();
    let model = match args.model.as_deref() {
        // A model file names its model as `serve` names it.
        Some(arg) if Path::new(arg).is_file() => model_store::model_id(arg)?,
        Some(id) => ModelId::new(id)?,
        None => ModelId::new(model_store::DEFAULT_MODEL)?,
    };
    // Given the file, servers whose blocks differ from it are shown as
    // skipped, as a client of that file would skip them.
    let manifest = match args.model.as_deref() {
        Some(arg) if Path::new(arg).is_file() => {
            Some(model_store::manifest(&swarm_shard::ModelFiles::open(arg)?)?)
        }
        _ => None,
    };
    let key = dht::identity::ephemeral_node_key();
    let swarm_key = swarm_key(args.swarm.swarm_key.as_deref())?;
    runtime()?.block_on(async move {
        let listen = if lan {
            "/ip4/0.0.0.0/tcp/0"
        } else {
            "/ip4/127.0.0.1/tcp/0"
        };
        let config = NodeConfig::new(key)
            .with_listen(vec![multiaddr(listen)?])
            .with_bootstrap(bootstrap)
            .with_mdns(lan)
            .with_swarm_key(swarm_key)
            .with_relay(RelayMode::Never);
        let node = Node::start(config).await.map_err(net)?;
        if let Some(manifest) = &manifest {
            node.expect_blocks(model.clone(), manifest.blocks.iter().map(|d| d.0).collect());
        }
        let result = survey_and_show(&node, &model, explicit, &args).await;
        node.shutdown().await;
        result
    })
}

/// What `sherpa nodes` surveys and prints: `model`'s servers, waiting
/// for blocks without a host; when `model` has none, what the swarm
/// serves instead (each model in full when `model` was the default).
async fn survey_and_show(
    node: &Node,
    model: &ModelId,
    explicit: bool,
    args: &NodesArgs,
) -> Result<(), SherpaError> {
    let options = SurveyOptions::default()
        .with_settle(Duration::from_secs(if args.swarm.lan { 8 } else { 4 }))
        .with_probe_bytes((!args.no_probe).then_some(PROBE_BYTES));
    let mut survey = dht::survey(node, model, &options).await?;
    let mut served = Vec::new();
    if survey.listing.servers.is_empty() {
        served = dht::served_models(node).await?;
    }
    // Without --model, a swarm that serves other models than the default
    // is shown as it is, with no wait for the default.
    let show_all = !explicit && survey.listing.servers.is_empty() && !served.is_empty();
    if !show_all && dht::unhosted(&survey.listing, None).is_some() {
        let wait = Duration::from_secs_f64(args.wait.max(0.0));
        let deadline = std::time::Instant::now() + wait;
        survey = dht::wait_for_hosts(
            node,
            model,
            &options,
            survey,
            None,
            deadline,
            wait,
            &mut |wait| eprintln!("{wait}"),
        )
        .await?;
        if survey.listing.servers.is_empty() {
            served = dht::served_models(node).await?;
        }
    }
    let main = model_report(model.clone(), survey, &args.selection, !show_all)?;
    let mut others = Vec::new();
    if show_all {
        for other in &served {
            let survey = dht::survey(node, &other.model, &options).await?;
            others.push(model_report(
                other.model.clone(),
                survey,
                &args.selection,
                false,
            )?);
        }
    }
    if args.json {
        let mut json = main.json();
        json["served_models"] = served
            .iter()
            .map(|m| {
                serde_json::json!({
                    "model": m.model.as_str(),
                    "model_blocks": m.blocks,
                    "servers": m.servers,
                })
            })
            .collect::<Vec<_>>()
            .into();
        if show_all {
            json["listings"] = others
                .iter()
                .map(ModelReport::json)
                .collect::<Vec<_>>()
                .into();
        }
        println!("{json}");
        return Ok(());
    }
    crate::selector::print(&main);
    if main.survey.listing.servers.is_empty() {
        if served.is_empty() {
            println!("the swarm serves no model yet");
        } else {
            println!("the swarm serves: {}", dht_list(&served));
            if explicit {
                println!("  (sherpa nodes --model ID lists one of them)");
            }
        }
    }
    for report in &others {
        println!();
        crate::selector::print(report);
    }
    Ok(())
}

fn dht_list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Selects and routes over `survey` as `sherpa nodes` shows it. With
/// `strict`, a --pin or --exclude naming no listed server is an error;
/// otherwise (showing several models) such names are passed over.
fn model_report(
    model: ModelId,
    survey: Survey,
    selection_args: &crate::SelectionArgs,
    strict: bool,
) -> Result<ModelReport, SherpaError> {
    let overrides = NodeChoice::default()
        .with_pinned(selection_args.pin.clone())
        .with_excluded(selection_args.exclude.clone())
        .overrides(&survey, strict)?;
    let policy = SelectionPolicy::default().with_max_nodes(selection_args.max_nodes);
    ModelReport::new(model, survey, &policy, overrides)
}

/// The peer-to-peer side of `sherpa generate`: a client joins the swarm,
/// chooses servers and generates through them.
pub(crate) fn generate(args: &GenerateArgs, options: GenerateOptions) -> Result<(), SherpaError> {
    let bootstrap = bootstrap(args.tracker.as_deref(), args.lan)?;
    let model = match args.model_id.as_deref() {
        Some(id) => ModelId::new(id)?,
        None => model_store::model_id(&args.model)?,
    };
    let path = model_store::resolve_model(&args.model, &mut crate::fetch_progress())?;
    let swarm_key = swarm_key(args.swarm_key.as_deref())?;
    runtime()?.block_on(async move {
        let mut builder = Client::builder(path.to_string_lossy())
            .model_id(model)
            .lan(args.lan)
            .swarm_key(swarm_key)
            .local_blocks(args.local_blocks)
            .max_nodes(args.selection.max_nodes)
            .session(session_options(args))
            .wait_for_hosts(Duration::from_secs_f64(args.wait.max(0.0)))
            .device(args.device)
            .on_event(|event| eprintln!("{event}"))
            // mDNS answers take a second or two to arrive.
            .survey(
                SurveyOptions::default().with_settle(Duration::from_secs(if args.lan {
                    8
                } else {
                    4
                })),
            )
            .listen(multiaddr(if args.lan {
                "/ip4/0.0.0.0/tcp/0"
            } else {
                "/ip4/127.0.0.1/tcp/0"
            })?);
        for addr in bootstrap {
            builder = builder.tracker(addr);
        }
        for name in &args.selection.pin {
            builder = builder.pin(name);
        }
        for name in &args.selection.exclude {
            builder = builder.exclude(name);
        }
        let client = builder.start().await?;
        let prompt = crate::encode_prompt(client_tokenizer(&client)?, &args.prompt, args.raw)?;
        let result = run_distributed(&client, &prompt, &options, args.ids).await;
        client.shutdown().await;
        result
    })
}

fn session_options(args: &GenerateArgs) -> SessionOptions {
    SessionOptions::default()
        .with_dtype(match args.wire {
            crate::WireArg::F32 => Dtype::F32,
            crate::WireArg::F16 => Dtype::F16,
        })
        .with_step_timeout(Duration::from_secs_f64(args.step_timeout.max(0.01)))
        .with_direct(!args.no_direct)
        .with_push(!args.no_push)
}

fn client_tokenizer(client: &Client) -> Result<&TextTokenizer, SherpaError> {
    client.tokenizer().ok_or_else(|| {
        SherpaError::Shard(ShardError::BadSettings(
            "the model file carries no tokenizer".into(),
        ))
    })
}

/// Opens a session, prints its route, streams the tokens to stdout, and
/// reports speed and any failovers on stderr.
async fn run_distributed(
    client: &Client,
    prompt: &[u32],
    options: &GenerateOptions,
    show_ids: bool,
) -> Result<(), SherpaError> {
    let mut session = client
        .session(client.max_length(prompt.len(), options))
        .await?;
    eprintln!("route:");
    let local = client.local_blocks();
    if let Some(blocks) = local {
        eprintln!("  blocks {blocks} on this client");
    }
    for step in session.route() {
        eprintln!("  {step}");
    }
    if session.route().len() > 1 {
        let how = if session.is_pushing() {
            "each server pushes its output to the next"
        } else {
            "this client relays every hop"
        };
        eprintln!("  ({how})");
    }
    let tokenizer = client_tokenizer(client)?;
    let mut decoder = tokenizer.stream_decoder();
    let mut stdout = std::io::stdout();
    let result = client
        .generate_in(&mut session, prompt, options, &mut |id| {
            match decoder.push(id) {
                Ok(Some(piece)) => {
                    // A closed stdout (e.g. `| head`) ends the generation quietly.
                    stdout
                        .write_all(piece.as_bytes())
                        .and_then(|_| stdout.flush())
                        .is_ok()
                }
                Ok(None) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot decode a token");
                    true
                }
            }
        })
        .await;
    session.close().await;
    let out = result?;
    let _ = writeln!(stdout);
    if show_ids {
        crate::print_ids(&out.output.tokens);
    }
    for f in &out.failovers {
        let by: Vec<String> = f.replaced_by.iter().map(ToString::to_string).collect();
        eprintln!(
            "failover: lost {} ({}); replaced by {} in {} ms, {} positions replayed",
            f.lost,
            f.error,
            if by.is_empty() {
                "nothing (it failed too)".to_owned()
            } else {
                by.join(", ")
            },
            f.took.as_millis(),
            f.replayed_positions
        );
    }
    crate::print_timings(&out.output);
    Ok(())
}

/// `sherpa demo`: a tracker, `servers` servers splitting the default model
/// and a client, all in this process on loopback.
pub(crate) fn demo(servers: u32, prompt: &str, max_new_tokens: usize) -> Result<(), SherpaError> {
    let path =
        model_store::resolve_model(model_store::DEFAULT_MODEL, &mut crate::fetch_progress())?;
    let model = ModelId::new(model_store::DEFAULT_MODEL)?;
    runtime()?.block_on(async move {
        let started = std::time::Instant::now();
        let swarm = LocalSwarm::start(&path.to_string_lossy(), model, servers).await?;
        eprintln!("tracker: {}", swarm.tracker.addr());
        for server in &swarm.servers {
            let info = server.info();
            eprintln!(
                "{}: blocks {} ({:.1} MiB of weights, {:.0} blocks x tokens/s) at {}",
                info.public_name,
                info.blocks,
                server.shard().weight_bytes() as f64 / 1048576.0,
                info.throughput,
                server.addr()
            );
        }
        eprintln!(
            "model: {} ({} blocks); swarm up in {:.2}s",
            path.display(),
            swarm.client.head().config().num_hidden_layers,
            started.elapsed().as_secs_f64()
        );
        eprintln!("prompt: {prompt}");
        let tokenizer = client_tokenizer(&swarm.client)?;
        let ids = tokenizer.encode_chat(&[ChatMessage::user(prompt)])?;
        let options = GenerateOptions::default().with_max_new_tokens(max_new_tokens);
        let result = run_distributed(&swarm.client, &ids, &options, false).await;
        swarm.shutdown().await;
        result
    })
}
