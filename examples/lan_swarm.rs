//! A swarm on a LAN with no tracker: nodes find each other by mDNS.
//!
//! On one machine:     `cargo run --release --example lan_swarm -- serve 0..15`
//! On another:         `cargo run --release --example lan_swarm -- serve 15..30`
//! Anywhere on the link: `cargo run --release --example lan_swarm -- ask "Your prompt"`
//!
//! mDNS multicasts on every interface the process sees, and servers listen
//! on all interfaces: run it on a network you trust, or pass a swarm key
//! (`sherpa swarm-key`) with `.swarm_key(...)` to keep the swarm private.

use std::io::Write;

use sherpa_swarm::{Client, GenerateOptions, Server};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let any_interface = "/ip4/0.0.0.0/tcp/0".parse()?;
    match args.first().map(String::as_str) {
        Some("serve") => {
            let blocks = args.get(1).map_or("0..30", String::as_str).parse()?;
            let server = Server::builder("smollm2-135m", blocks)
                .lan(true)
                .listen(any_interface)
                .start()
                .await?;
            println!("serving blocks {blocks} at {}; Ctrl-C stops", server.addr());
            tokio::signal::ctrl_c().await?;
            server.shutdown().await?;
        }
        Some("ask") => {
            let prompt = args.get(1).map_or("Name three rivers.", String::as_str);
            let client = Client::builder("smollm2-135m")
                .lan(true)
                .listen(any_interface)
                .start()
                .await?;
            client
                .generate_text(prompt, &GenerateOptions::default(), &mut |piece| {
                    print!("{piece}");
                    std::io::stdout().flush().is_ok()
                })
                .await?;
            println!();
            client.shutdown().await;
        }
        _ => eprintln!("usage: lan_swarm serve A..B | lan_swarm ask PROMPT"),
    }
    Ok(())
}
