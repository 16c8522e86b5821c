//! Arbitrary bytes as a signed server record: refuse or verify, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = swarm_core::SignedRecord::from_bytes(data) {
        let _ = record.verify(None, 1_800_000_000_000);
    }
});
