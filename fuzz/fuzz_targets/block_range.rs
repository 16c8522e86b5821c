//! Arbitrary text as a block range: parse or refuse, and round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(range) = text.parse::<swarm_core::BlockRange>() {
            assert_eq!(range.to_string().parse::<swarm_core::BlockRange>().ok(), Some(range));
        }
    }
});
