//! A whole swarm in one process, for demos, benchmarks and tests.

use swarm_core::{BlockRange, ModelId};
use swarm_shard::ModelFiles;

use crate::model_store;
use crate::SherpaError;

use super::blocking;
use super::{Client, Server, Tracker};

/// A whole swarm in this process on loopback: a tracker, servers splitting
/// a model's blocks evenly, and a client. For demos, benchmarks and tests.
#[derive(Debug)]
pub struct LocalSwarm {
    /// The tracker.
    pub tracker: Tracker,
    /// The servers, first blocks first, named `server-0`, `server-1`, ...
    pub servers: Vec<Server>,
    /// The client.
    pub client: Client,
}

impl LocalSwarm {
    /// Starts a tracker, `servers` servers splitting `model` (a known name,
    /// a `.gguf` file or an HF directory) evenly, and a client; the swarm
    /// knows the model as `model_id`.
    pub async fn start(model: &str, model_id: ModelId, servers: u32) -> Result<Self, SherpaError> {
        let arg = model.to_owned();
        let blocks = blocking(move || {
            let path = model_store::resolve_model(&arg, &mut |_| {})?;
            Ok(ModelFiles::open(&path)?.config().num_hidden_layers as u32)
        })
        .await?;
        let tracker = Tracker::builder().start().await?;
        let mut running = Vec::new();
        for (i, span) in BlockRange::split_evenly(blocks, servers)?
            .into_iter()
            .enumerate()
        {
            running.push(
                Server::builder(model, span)
                    .model_id(model_id.clone())
                    .name(format!("server-{i}"))
                    .tracker(tracker.addr().clone())
                    .probe_tracker(false)
                    .start()
                    .await?,
            );
        }
        let client = Client::builder(model)
            .model_id(model_id)
            .tracker(tracker.addr().clone())
            .start()
            .await?;
        Ok(Self {
            tracker,
            servers: running,
            client,
        })
    }

    /// Stops every node.
    pub async fn shutdown(self) {
        self.client.shutdown().await;
        for server in self.servers {
            server.abort().await;
        }
        self.tracker.shutdown().await;
    }
}
