//! Generates locally with the default model split into two in-process
//! shards: the smallest program that uses the engine end to end.
//!
//! `cargo run --release --example local_generate -- "Your prompt"`

use std::io::Write;

use sherpa_swarm::core::BlockRange;
use sherpa_swarm::shard::{
    ChatMessage, Device, GenerateOptions, LocalModel, ModelFiles, TextTokenizer, WeightPrecision,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Name three rivers.".to_owned());
    let path = sherpa_swarm::model_store::resolve_model("smollm2-135m", &mut |_| {})?;
    let files = ModelFiles::open(&path)?;
    let tokenizer = TextTokenizer::from_model(&files)?;
    let spans = BlockRange::split_evenly(files.config().num_hidden_layers as u32, 2)?;
    let model = LocalModel::load(&files, &spans, &Device::Cpu, WeightPrecision::Native)?;
    let ids = tokenizer.encode_chat(&[ChatMessage::user(prompt)])?;
    let mut decoder = tokenizer.stream_decoder();
    let out = model.generate(&ids, &GenerateOptions::default(), &mut |id| {
        if let Some(piece) = decoder.push(id)? {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        }
        Ok(true)
    })?;
    println!("\n[{:.1} tokens/s]", out.decode_tokens_per_second());
    Ok(())
}
