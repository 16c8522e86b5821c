//! Arbitrary bytes as a tensor frame: refuse or decode within the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((dims, values)) = swarm_core::tensor_frame::decode(data, 1 << 16) {
        assert_eq!(dims.iter().product::<usize>(), values.len());
    }
});
