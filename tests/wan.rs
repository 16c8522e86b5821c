//! The emulated WAN (`sherpa_swarm::bench::wan`): its links delay and drop
//! what they should, and a swarm runs across it unchanged. Needs root for
//! network namespaces; `SHERPA_SKIP_NETNS=1` skips on a machine without them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use sherpa_swarm::bench::wan::{Link, Wan, WanSwarm};
use sherpa_swarm::{BlockRange, GenerateOptions, ModelId};
use swarm_shard::tiny::{GgmlDType, TinyModelSpec};
use swarm_shard::{Device, LocalModel, ModelFiles, WeightPrecision};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn wan_or_skip(hosts: usize, link: Link) -> Option<Wan> {
    match Wan::start(hosts, link) {
        Ok(wan) => Some(wan),
        Err(why) if std::env::var_os("SHERPA_SKIP_NETNS").is_some_and(|v| v == "1") => {
            eprintln!("SKIPPED (SHERPA_SKIP_NETNS=1): {why}");
            None
        }
        Err(why) => panic!(
            "the WAN emulator needs root, `ip` and /dev/net/tun: {why}. \
             Set SHERPA_SKIP_NETNS=1 to skip on a machine without them."
        ),
    }
}

/// Round trips of 100 bytes from host 0 to an echo server on host 1, each
/// with its own connection attempt bounded by `limit`.
async fn round_trips(
    host0: &tokio::runtime::Runtime,
    to: std::net::SocketAddr,
    n: usize,
    limit: Duration,
) -> Result<Vec<Duration>, String> {
    host0
        .spawn(async move {
            let mut conn = tokio::time::timeout(limit, tokio::net::TcpStream::connect(to))
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            conn.set_nodelay(true).unwrap();
            let mut times = Vec::new();
            let mut buf = [7u8; 100];
            for _ in 0..n {
                let started = Instant::now();
                conn.write_all(&buf).await.map_err(|e| e.to_string())?;
                tokio::time::timeout(limit, conn.read_exact(&mut buf))
                    .await
                    .map_err(|_| "echo timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                times.push(started.elapsed());
            }
            Ok(times)
        })
        .await
        .unwrap()
}

#[test]
fn links_delay_drop_and_recover_as_set() {
    let rtt = Duration::from_millis(30);
    let Some(wan) = wan_or_skip(2, Link::rtt(rtt)) else {
        return;
    };
    let host0 = wan.runtime(0, 1).unwrap();
    let host1 = wan.runtime(1, 1).unwrap();
    let addr = std::net::SocketAddr::new(wan.addr(1).into(), 7000);
    let main = tokio::runtime::Runtime::new().unwrap();
    main.block_on(async {
        // An echo server on host 1, bound to host 1's address: a socket
        // opened by the host's runtime lives in its namespace.
        host1.spawn(async move {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 100];
                    while conn.read_exact(&mut buf).await.is_ok() {
                        if conn.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut times = round_trips(&host0, addr, 9, Duration::from_secs(5))
            .await
            .unwrap();
        times.sort();
        // Every round trip crosses both directions' delay; none of it is
        // lost on loopback (the address exists only inside host 1).
        assert!(times[0] >= rtt, "{times:?}");
        assert!(times[4] < rtt + Duration::from_millis(150), "{times:?}");

        // Cut both directions: nothing gets through.
        wan.set_link(0, 1, Link::rtt(rtt).with_loss(1.0));
        wan.set_link(1, 0, Link::rtt(rtt).with_loss(1.0));
        let cut = round_trips(&host0, addr, 1, Duration::from_millis(800)).await;
        assert!(cut.is_err(), "{cut:?}");

        // Restored, with a longer delay: it works again and is slower.
        let slow = Duration::from_millis(80);
        wan.set_link(0, 1, Link::rtt(slow));
        wan.set_link(1, 0, Link::rtt(slow));
        let times = round_trips(&host0, addr, 3, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(times.iter().all(|t| *t >= slow), "{times:?}");
    });
    host0.shutdown_background();
    host1.shutdown_background();
}

#[test]
fn a_swarm_across_the_wan_generates_what_runs_locally() {
    let rtt = Duration::from_millis(20);
    let Some(wan) = wan_or_skip(3, Link::rtt(rtt)) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("sherpa-wan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    let spec = TinyModelSpec::default();
    spec.write_gguf(&path, GgmlDType::F32).unwrap();
    let options = GenerateOptions::default()
        .with_max_new_tokens(8)
        .with_stop_at_eos(false);
    let prompt = [1u32, 5, 9, 2];
    let local = LocalModel::load(
        &ModelFiles::open(&path).unwrap(),
        &[],
        &Device::Cpu,
        WeightPrecision::Native,
    )
    .unwrap()
    .generate(&prompt, &options, &mut |_| Ok(true))
    .unwrap();

    let main = tokio::runtime::Runtime::new().unwrap();
    main.block_on(async {
        let half = spec.layers as u32 / 2;
        let spans = [
            BlockRange::new(0, half).unwrap(),
            BlockRange::new(half, spec.layers as u32).unwrap(),
        ];
        let swarm = WanSwarm::start(
            &wan,
            &path.to_string_lossy(),
            ModelId::new("tiny").unwrap(),
            &spans,
        )
        .await
        .unwrap();
        let opts = options.clone();
        let out = swarm
            .with_client(move |client| async move {
                let pushed = client.generate(&prompt, &opts, &mut |_| true).await?;
                let relay = client
                    .session_options()
                    .clone()
                    .with_push(false)
                    .with_max_length(client.max_length(prompt.len(), &opts) as u32);
                let mut session = client.session_with(relay).await?;
                assert!(!session.is_pushing());
                let relayed = client
                    .generate_in(&mut session, &prompt, &opts, &mut |_| true)
                    .await;
                session.close().await;
                Ok((pushed, relayed?, client.plan().await?))
            })
            .await
            .unwrap();
        let (generation, relayed, plan) = out;
        assert_eq!(generation.output.tokens, local.tokens);
        assert_eq!(relayed.output.tokens, local.tokens);
        // Both servers were measured across the WAN. Relayed, each token
        // waited a round trip per server; pushed, half a round trip per
        // link of client -> server -> server -> client.
        assert_eq!(generation.route.len(), 2, "{:?}", generation.route);
        let rtts: Vec<_> = plan.survey.candidates.iter().map(|c| c.rtt).collect();
        assert_eq!(rtts.len(), 2);
        assert!(rtts.iter().all(|r| r.is_some_and(|r| r >= rtt)), "{rtts:?}");
        let per_token =
            |g: &sherpa_swarm::Generation| g.output.decode / (g.output.tokens.len() - 1) as u32;
        let (pushed, relay) = (per_token(&generation), per_token(&relayed));
        assert!(pushed >= rtt * 3 / 2, "{pushed:?} per token pushed");
        assert!(relay >= rtt * 2, "{relay:?} per token relayed");
        eprintln!("{pushed:?} per token pushed, {relay:?} relayed");
        swarm.shutdown().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}
