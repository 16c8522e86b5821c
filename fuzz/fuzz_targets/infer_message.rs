//! Arbitrary bytes as an inference protocol request or response: refuse or
//! decode, never panic, and whatever decodes encodes back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_core::codec;
use swarm_core::infer::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = codec::decode::<Request>(data) {
        let again = codec::encode(&request).expect("a decoded request encodes");
        assert_eq!(codec::decode::<Request>(&again).ok(), Some(request));
    }
    if let Ok(response) = codec::decode::<Response>(data) {
        let again = codec::encode(&response).expect("a decoded response encodes");
        assert_eq!(codec::decode::<Response>(&again).ok(), Some(response));
    }
});
