//! Arbitrary bytes as a model file: opening must return a model or an
//! error, never panic or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("sherpa-fuzz-{}.gguf", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        if let Ok(files) = swarm_shard::ModelFiles::open(&path) {
            let _ = swarm_shard::TextTokenizer::from_model(&files);
        }
    }
});
