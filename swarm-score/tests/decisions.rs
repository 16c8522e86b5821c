//! Ranking rules, selection and routing on hand-built swarms, and property
//! tests against brute force on small random ones.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use proptest::prelude::*;
use swarm_core::{BlockRange, GpuInfo, HardwareInfo};
use swarm_score::{
    plan, plan_preferring, score, select, step_timeout, Candidate, Overrides, RouteOptions,
    ScoreError, ScoreWeights, SelectionPolicy, Status,
};

fn r(a: u32, b: u32) -> BlockRange {
    BlockRange::new(a, b).unwrap()
}

/// A CPU server with 8 GiB free, 100 Mbit/s both ways, 20 ms ping.
fn node(id: u8, blocks: BlockRange) -> Candidate {
    Candidate {
        id: [id; 32],
        name: format!("node{id}"),
        blocks,
        hardware: HardwareInfo {
            cpu_cores: 8,
            ram_free: 8 << 30,
            gpu: None,
        },
        throughput: 1000.0,
        cache_tokens_free: 4096,
        sessions: 0,
        upload_bps: 12_500_000,
        download_bps: 12_500_000,
        rtt: Some(Duration::from_millis(20)),
    }
}

fn gpu(c: &mut Candidate, name: &str, cc: (u8, u8), throughput: f64) {
    c.hardware.gpu = Some(GpuInfo {
        name: name.into(),
        compute_capability: cc,
        vram_total: 24 << 30,
        vram_free: 20 << 30,
    });
    c.throughput = throughput;
}

fn total(c: &Candidate) -> f64 {
    score(c, &ScoreWeights::default()).total
}

#[test]
fn a_faster_gpu_outranks_a_slower_one_at_equal_network() {
    let mut fast = node(1, r(0, 10));
    let mut slow = node(2, r(0, 10));
    gpu(&mut fast, "RTX 4090", (8, 9), 50_000.0);
    gpu(&mut slow, "GTX 1080", (6, 1), 8_000.0);
    assert!(total(&fast) > total(&slow));
    // Same measured throughput: the newer device class still ranks higher.
    gpu(&mut slow, "GTX 1080", (6, 1), 50_000.0);
    assert!(total(&fast) > total(&slow));
    // And any GPU with the same measurements beats a CPU.
    let mut cpu = node(3, r(0, 10));
    cpu.throughput = 50_000.0;
    assert!(total(&slow) > total(&cpu));
}

#[test]
fn low_ping_and_high_bandwidth_win_at_equal_hardware() {
    let near = node(1, r(0, 10));
    let mut far = node(2, r(0, 10));
    far.rtt = Some(Duration::from_millis(120));
    assert!(total(&near) > total(&far));
    let mut unknown = node(3, r(0, 10));
    unknown.rtt = None;
    assert!(total(&far) > total(&unknown), "unmeasured counts as 200 ms");
    let mut slow_link = node(4, r(0, 10));
    slow_link.upload_bps = 500_000;
    assert!(total(&near) > total(&slow_link));
    let components = score(&near, &ScoreWeights::default()).components;
    for c in [
        components.ping,
        components.upload,
        components.download,
        components.memory,
        components.compute,
    ] {
        assert!((0.0..=1.0).contains(&c), "{components:?}");
    }
    assert_eq!(near.summary(), "node1 - 8GB RAM - 20ms Ping");
    let lan = Candidate {
        rtt: Some(std::time::Duration::from_micros(430)),
        ..near.clone()
    };
    assert_eq!(lan.summary(), "node1 - 8GB RAM - 0.4ms Ping");
}

#[test]
fn weights_are_configurable_and_checked() {
    let mut gpu_far = node(1, r(0, 10));
    gpu(&mut gpu_far, "RTX 4090", (8, 9), 50_000.0);
    gpu_far.rtt = Some(Duration::from_millis(150));
    let cpu_near = node(2, r(0, 10));
    let ping_only = ScoreWeights::default()
        .with_ping(1.0)
        .with_upload(0.0)
        .with_download(0.0)
        .with_memory(0.0)
        .with_compute(0.0);
    assert!(total(&gpu_far) > total(&cpu_near));
    assert!(score(&cpu_near, &ping_only).total > score(&gpu_far, &ping_only).total);
    let bad = ScoreWeights::default().with_ping(f64::NAN);
    let policy = SelectionPolicy::default()
        .with_max_nodes(3)
        .with_weights(bad);
    assert!(matches!(
        select(&[cpu_near], 10, &policy, &Overrides::default()),
        Err(ScoreError::BadWeights(_))
    ));
}

#[test]
fn coverage_beats_score() {
    // The three best servers all host the first half; the second half has
    // only a weak CPU server. Three places: the weak one must be in.
    let mut swarm: Vec<Candidate> = (1..=3)
        .map(|i| {
            let mut c = node(i, r(0, 10));
            gpu(&mut c, "RTX 4090", (8, 9), 50_000.0);
            c
        })
        .collect();
    let mut weak = node(9, r(10, 20));
    weak.rtt = Some(Duration::from_millis(150));
    weak.throughput = 200.0;
    swarm.push(weak);
    let policy = SelectionPolicy::default().with_max_nodes(3);
    let selection = select(&swarm, 20, &policy, &Overrides::default()).unwrap();
    assert_eq!(selection.selected.len(), 3);
    assert!(selection.selected.contains(&3), "{selection:?}");
    assert!(selection.uncovered.is_empty());
    assert_eq!(
        selection.ranked.last().unwrap().index,
        3,
        "weakest ranks last"
    );
    assert_eq!(selection.ranked.last().unwrap().status, Status::Coverage);
    // With room, replicas go to the least-replicated blocks.
    let mut more = swarm.clone();
    more.push(node(10, r(10, 20)));
    let policy = SelectionPolicy::default().with_max_nodes(3);
    let selection = select(&more, 20, &policy, &Overrides::default()).unwrap();
    assert_eq!(selection.min_replicas, 1);
    let selection = select(&more, 20, &policy.with_max_nodes(4), &Overrides::default()).unwrap();
    assert_eq!(selection.min_replicas, 2, "{selection:?}");
}

#[test]
fn overrides_are_obeyed_and_missing_blocks_explained() {
    let swarm = vec![node(1, r(0, 10)), node(2, r(0, 10)), node(3, r(10, 20))];
    let overrides = Overrides::default()
        .with_pinned([[2; 32]].into_iter().collect())
        .with_excluded([[3; 32]].into_iter().collect());
    let selection = select(&swarm, 20, &SelectionPolicy::default(), &overrides).unwrap();
    assert!(selection.selected.contains(&1));
    assert!(!selection.selected.contains(&2));
    assert_eq!(selection.uncovered, vec![r(10, 20)]);
    assert!(
        selection
            .notes
            .iter()
            .any(|n| n.contains("10..20") && n.contains("node3")),
        "{:?}",
        selection.notes
    );
    assert_eq!(selection.min_replicas, 2);
    // Planning the uncovered model names the gap.
    let err = plan(
        &swarm,
        r(0, 20),
        &RouteOptions::default(),
        &overrides.excluded,
    )
    .unwrap_err();
    assert_eq!(
        err,
        ScoreError::NoRoute {
            uncovered: vec![r(10, 20)]
        }
    );
}

#[test]
fn the_route_prefers_fewer_faster_hops() {
    // One fast server for everything, or two slower halves.
    let mut whole = node(1, r(0, 20));
    whole.throughput = 20_000.0;
    let a = node(2, r(0, 10));
    let b = node(3, r(10, 20));
    let swarm = vec![a, b, whole];
    let route = plan(&swarm, r(0, 20), &RouteOptions::default(), &HashSet::new()).unwrap();
    assert_eq!(route.hops.len(), 1);
    assert_eq!(route.hops[0].index, 2);
    // When it dies, its blocks are planned again and the halves take over.
    let failed: HashSet<_> = [[1; 32]].into_iter().collect();
    let lost = route.hops[0].blocks;
    let options = RouteOptions::default();
    let again = plan_preferring(&swarm, &HashSet::new(), lost, &options, &failed).unwrap();
    assert_eq!(
        again.hops.iter().map(|h| h.index).collect::<Vec<_>>(),
        vec![0, 1]
    );
    // Load spreads sessions: a busy server loses to an idle replica.
    let twins = vec![node(4, r(0, 20)), node(5, r(0, 20))];
    let mut options = RouteOptions::default();
    let first = plan(&twins, r(0, 20), &options, &HashSet::new()).unwrap();
    options.load.insert(twins[first.hops[0].index].id, 1.0);
    let second = plan(&twins, r(0, 20), &options, &HashSet::new()).unwrap();
    assert_ne!(first.hops[0].index, second.hops[0].index);
}

#[test]
fn a_server_announcing_sessions_loses_to_an_idle_replica() {
    // Twins but for the sessions each announced; whichever is busy loses,
    // in the score and in the route.
    for busy in 0..2 {
        let mut twins = vec![node(4, r(0, 20)), node(5, r(0, 20))];
        twins[busy].sessions = 6;
        let idle = 1 - busy;
        let weights = ScoreWeights::default();
        assert!(
            score(&twins[idle], &weights).components.compute
                > score(&twins[busy], &weights).components.compute
        );
        let route = plan(&twins, r(0, 20), &RouteOptions::default(), &HashSet::new()).unwrap();
        assert_eq!(route.hops[0].index, idle);
        let selection = select(
            &twins,
            20,
            &SelectionPolicy::default(),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(selection.ranked[0].index, idle);
    }
}

/// A hop's cost written out independently of the planner: round trip,
/// activations in and out, and compute for `k` blocks.
fn hop_cost(c: &Candidate, k: u32, options: &RouteOptions) -> f64 {
    let bytes = options.bytes_per_token as f64 * f64::from(options.tokens);
    let bw = |bps: u64| if bps == 0 { 1e6 } else { bps as f64 };
    c.rtt.unwrap().as_secs_f64()
        + bytes / bw(c.download_bps)
        + bytes / bw(c.upload_bps)
        + f64::from(k) * f64::from(options.tokens) * (1.0 + f64::from(c.sessions)) / c.throughput
}

/// Least cost over every chain through `from..to`, by enumeration.
fn brute_force(
    swarm: &[Candidate],
    from: u32,
    to: u32,
    options: &RouteOptions,
    avoid: &HashSet<[u8; 32]>,
) -> f64 {
    if from == to {
        return 0.0;
    }
    let mut best = f64::INFINITY;
    for c in swarm
        .iter()
        .filter(|c| !avoid.contains(&c.id) && c.blocks.contains(from))
    {
        for end in (from + 1)..=to.min(c.blocks.end()) {
            let cost =
                hop_cost(c, end - from, options) + brute_force(swarm, end, to, options, avoid);
            best = best.min(cost);
        }
    }
    best
}

fn arb_swarm() -> impl Strategy<Value = (u32, Vec<Candidate>)> {
    (2u32..7).prop_flat_map(|blocks| {
        let server = (
            0..blocks,
            1..=blocks,
            1u64..200,
            50.0f64..5000.0,
            1u64..1000,
            any::<bool>(),
            0u32..4,
        );
        (Just(blocks), prop::collection::vec(server, 1..6)).prop_map(|(blocks, servers)| {
            let swarm = servers
                .into_iter()
                .enumerate()
                .map(
                    |(i, (start, len, ping, throughput, mbps, gpu_node, sessions))| {
                        let mut c = node(
                            i as u8 + 1,
                            r(start, (start + len).min(blocks).max(start + 1)),
                        );
                        c.rtt = Some(Duration::from_millis(ping));
                        c.throughput = throughput;
                        c.upload_bps = mbps * 125_000;
                        c.sessions = sessions;
                        if gpu_node {
                            gpu(&mut c, "GPU", (7, 5), throughput);
                        }
                        c
                    },
                )
                .collect();
            (blocks, swarm)
        })
    })
}

proptest! {
    #[test]
    fn selection_covers_whenever_possible_and_obeys_overrides(
        (blocks, swarm) in arb_swarm(),
        pin_mask in any::<u8>(),
        exclude_mask in any::<u8>(),
        max_nodes in 1usize..6,
    ) {
        let ids: Vec<[u8; 32]> = swarm.iter().map(|c| c.id).collect();
        let excluded: HashSet<_> = ids.iter().enumerate().filter(|(i, _)| exclude_mask >> i & 1 == 1).map(|(_, id)| *id).collect();
        let pinned: HashSet<_> = ids.iter().enumerate().filter(|(i, id)| pin_mask >> i & 1 == 1 && !excluded.contains(*id)).map(|(_, id)| *id).collect();
        let overrides = Overrides::default()
.with_pinned(pinned.clone())
.with_excluded(excluded.clone());
        let policy = SelectionPolicy::default()
.with_max_nodes(max_nodes);
        let selection = select(&swarm, blocks, &policy, &overrides).unwrap();
        let chosen = selection.selected(&swarm);
        for c in &chosen {
            prop_assert!(!excluded.contains(&c.id));
        }
        for id in &pinned {
            prop_assert!(chosen.iter().any(|c| c.id == *id));
        }
        let allowed: Vec<BlockRange> = swarm.iter().filter(|c| !excluded.contains(&c.id)).map(|c| c.blocks).collect();
        let possible = swarm_score::uncovered_blocks(blocks, &allowed);
        let got = swarm_score::uncovered_blocks(blocks, &chosen.iter().map(|c| c.blocks).collect::<Vec<_>>());
        prop_assert_eq!(&got, &possible, "selection covers all that can be covered");
        prop_assert_eq!(&selection.uncovered, &possible);
        if !selection.over_limit {
            prop_assert!(chosen.len() <= max_nodes.max(pinned.len()));
        }
        // The coverage step uses as few servers as any cover could.
        let free: Vec<&Candidate> = swarm.iter().filter(|c| !excluded.contains(&c.id) && !pinned.contains(&c.id)).collect();
        let pinned_spans: Vec<BlockRange> = swarm.iter().filter(|c| pinned.contains(&c.id)).map(|c| c.blocks).collect();
        let fewest = (0u32..1 << free.len())
            .filter(|mask| {
                let mut spans = pinned_spans.clone();
                spans.extend(free.iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, c)| c.blocks));
                swarm_score::uncovered_blocks(blocks, &spans) == possible
            })
            .map(u32::count_ones)
            .min()
            .unwrap();
        let coverage = selection.ranked.iter().filter(|r| r.status == Status::Coverage).count();
        prop_assert_eq!(coverage as u32, fewest);
    }

    #[test]
    fn routes_are_minimal_and_lost_hops_are_replanned_around_failed_servers(
        (blocks, swarm) in arb_swarm(),
        fail_mask in any::<u8>(),
        tokens in 1u32..64,
    ) {
        let options = RouteOptions::default()
.with_tokens(tokens)
.with_bytes_per_token(1152);
        let none = HashSet::new();
        let route = plan(&swarm, r(0, blocks), &options, &none);
        let best = brute_force(&swarm, 0, blocks, &options, &none);
        match route {
            Ok(route) => {
                prop_assert!((route.cost_secs - best).abs() <= 1e-9 * best.max(1.0), "{} vs {}", route.cost_secs, best);
                let sum: f64 = route.hops.iter().map(|h| h.cost_secs).sum();
                prop_assert!((sum - route.cost_secs).abs() < 1e-9);
                let mut at = 0;
                for hop in &route.hops {
                    prop_assert_eq!(hop.blocks.start(), at);
                    prop_assert!(swarm[hop.index].blocks.start() <= hop.blocks.start() && hop.blocks.end() <= swarm[hop.index].blocks.end());
                    at = hop.blocks.end();
                }
                prop_assert_eq!(at, blocks);
                let failed: HashSet<_> = swarm.iter().enumerate().filter(|(i, _)| fail_mask >> i & 1 == 1).map(|(_, c)| c.id).collect();
                // Each hop lost to a failure is planned again over the
                // rest, as a client's failover does.
                for lost in route.hops.iter().filter(|h| failed.contains(&h.server)) {
                    let (a, b) = (lost.blocks.start(), lost.blocks.end());
                    match plan_preferring(&swarm, &none, lost.blocks, &options, &failed) {
                        Ok(again) => {
                            let mut at = a;
                            for hop in &again.hops {
                                prop_assert!(!failed.contains(&hop.server));
                                prop_assert_eq!(hop.blocks.start(), at);
                                at = hop.blocks.end();
                            }
                            prop_assert_eq!(at, b);
                            let best = brute_force(&swarm, a, b, &options, &failed);
                            prop_assert!((again.cost_secs - best).abs() <= 1e-9 * best.max(1.0));
                        }
                        Err(ScoreError::NoRoute { .. }) => {
                            prop_assert!(brute_force(&swarm, a, b, &options, &failed).is_infinite());
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
            }
            Err(ScoreError::NoRoute { .. }) => prop_assert!(best.is_infinite()),
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}

#[test]
fn the_selection_is_routed_over_first_and_the_rest_only_fills_holes() {
    // A fast server outside the selection, and a selected pair covering
    // the span: the pair is used.
    let mut fast = node(1, r(0, 20));
    fast.throughput = 50_000.0;
    let swarm = vec![fast, node(2, r(0, 10)), node(3, r(10, 20))];
    let chosen: HashSet<_> = [[2; 32], [3; 32]].into_iter().collect();
    let none = HashSet::new();
    let options = RouteOptions::default();
    let route = plan_preferring(&swarm, &chosen, r(0, 20), &options, &none).unwrap();
    let used: Vec<usize> = route.hops.iter().map(|h| h.index).collect();
    assert_eq!(used, [1, 2], "indexes refer to the whole swarm");
    // One of the pair failed: the selection has a hole, so the whole swarm
    // is planned over.
    let failed: HashSet<_> = [[3; 32]].into_iter().collect();
    let route = plan_preferring(&swarm, &chosen, r(0, 20), &options, &failed).unwrap();
    assert_eq!(route.hops.len(), 1);
    assert_eq!(route.hops[0].index, 0);
    // No selection: plain planning.
    let route = plan_preferring(&swarm, &none, r(0, 20), &options, &none).unwrap();
    assert_eq!(route, plan(&swarm, r(0, 20), &options, &none).unwrap());
}

#[test]
fn step_timeouts_grow_with_the_work_and_stay_bounded() {
    let base = Duration::from_secs(5);
    assert_eq!(step_timeout(base, 0.0, 10, 1), base);
    // 10 blocks x 100 positions x 1 ms = 1 s of compute, allowed 4 s more.
    assert_eq!(step_timeout(base, 1e-3, 10, 100), Duration::from_secs(9));
    // Absurd figures are capped, never infinite or negative.
    assert_eq!(
        step_timeout(base, f64::INFINITY, 10, 1),
        base + Duration::from_secs(600)
    );
    assert_eq!(step_timeout(base, -1.0, 10, 1), base);
    assert_eq!(
        step_timeout(base, 1.0, 1000, 100_000),
        base + Duration::from_secs(600)
    );
}
