//! `sherpa bench` reports every figure it promises, with sane values.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use sherpa_swarm::bench::swarm::run_swarm;
use sherpa_swarm::bench::{run_local, BenchSettings};

#[test]
fn bench_reports_decode_prefill_and_the_bandwidth_ceiling() {
    let path = common::smollm2();
    let mut records = Vec::new();
    let settings = BenchSettings::default().with_new_tokens(4).with_repeats(1);
    run_local(&path, &settings, &mut |r| records.push(r)).unwrap();
    let get = |name: &str| {
        records
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no {name} in {records:?}"))
    };
    for name in [
        "local_decode_tokens_per_s",
        "local_prefill_16",
        "local_prefill512_tokens_per_s",
        "memory_copy_bandwidth",
        "memory_read_bandwidth",
        "decode_bandwidth_ceiling",
    ] {
        let r = get(name);
        assert!(r.value.is_finite() && r.value > 0.0, "{r:?}");
    }
    // Weights read per token: 30 Q4_1 blocks plus the Q8_0 LM head.
    let bytes = get("weight_bytes_read_per_token").value;
    assert!((80e6..110e6).contains(&bytes), "{bytes}");
    let ceiling = get("local_decode_vs_bandwidth_ceiling");
    assert!(
        ceiling.ratio.unwrap() > 0.0 && ceiling.ratio.unwrap() < 1.5,
        "{ceiling:?}"
    );
    for r in &records {
        let json = r.to_json();
        assert!(json.starts_with("{\"name\":") && json.ends_with('}') && !json.contains('\n'));
    }
}

#[test]
fn bench_compares_a_hop_with_raw_tcp_and_the_swarm_with_local_decode() {
    let path = common::smollm2();
    let settings = BenchSettings::default().with_new_tokens(8).with_repeats(1);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut records = Vec::new();
    runtime
        .block_on(run_swarm(&path, &settings, &mut |r| records.push(r)))
        .unwrap();
    for (name, target) in [
        ("hop_round_trip_8k", 0.5),
        ("swarm_vs_local_decode_ratio", 0.95),
        ("swarm_vs_local_prefill512_ratio", 0.95),
        ("tiny_h256_l8_2servers_steps_per_s", 0.0),
    ] {
        let r = records
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no {name} in {records:?}"));
        let ratio = r.ratio.unwrap();
        assert!(r.value.is_finite() && r.value > 0.0, "{r:?}");
        assert!(ratio.is_finite() && ratio > 0.0, "{r:?}");
        assert_eq!(r.target.unwrap_or(0.0), target);
    }
    // Across the emulated WAN a client relaying every hop cannot pass one
    // token per three round trips: the measured ratio to that bound is
    // below 1 (compute comes on top).
    if sherpa_swarm::bench::wan::Wan::available().is_ok() {
        for name in [
            "wan10ms_3servers_relay_vs_relay_bound",
            "wan25ms_3servers_relay_vs_relay_bound",
        ] {
            let r = records
                .iter()
                .find(|r| r.name == name)
                .unwrap_or_else(|| panic!("no {name} in {records:?}"));
            let ratio = r.ratio.unwrap();
            assert!(ratio > 0.05 && ratio < 1.0, "{r:?}");
        }
    }
}
