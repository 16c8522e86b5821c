//! `sherpa bench` reports every figure it promises, with sane values.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use sherpa_swarm::bench::{run_local, BenchSettings};

#[test]
fn bench_reports_decode_prefill_and_the_bandwidth_ceiling() {
    let path = common::smollm2();
    let mut records = Vec::new();
    let settings = BenchSettings {
        new_tokens: 4,
        repeats: 1,
    };
    run_local(&path, &settings, &mut |r| records.push(r)).unwrap();
    let get = |name: &str| {
        records
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no {name} in {records:?}"))
    };
    for name in [
        "local_decode",
        "local_prefill_16",
        "memory_copy_bandwidth",
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
