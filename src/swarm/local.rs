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
        let spans = BlockRange::split_evenly(blocks, servers)?;
        Self::start_spans(model, model_id, &spans).await
    }

    /// [`LocalSwarm::start`] with one server per span (spans may overlap:
    /// replicas), named `server-0`, `server-1`, ... When a node fails to
    /// start, those already running are stopped (their records withdrawn)
    /// before the error is returned.
    pub async fn start_spans(
        model: &str,
        model_id: ModelId,
        spans: &[BlockRange],
    ) -> Result<Self, SherpaError> {
        let tracker = Tracker::builder().start().await?;
        let mut running = Vec::new();
        for (i, span) in spans.iter().enumerate() {
            let server = Server::builder(model, *span)
                .model_id(model_id.clone())
                .name(format!("server-{i}"))
                .tracker(tracker.addr().clone())
                .probe_tracker(false)
                .start()
                .await;
            match server {
                Ok(server) => running.push(server),
                Err(e) => return Err(stop(tracker, running, e).await),
            }
        }
        let client = Client::builder(model)
            .model_id(model_id)
            .tracker(tracker.addr().clone())
            .start()
            .await;
        match client {
            Ok(client) => Ok(Self {
                tracker,
                servers: running,
                client,
            }),
            Err(e) => Err(stop(tracker, running, e).await),
        }
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

/// Stops a partly started swarm; returns the error that stopped it.
async fn stop(tracker: Tracker, servers: Vec<Server>, error: SherpaError) -> SherpaError {
    for server in servers {
        server.abort().await;
    }
    tracker.shutdown().await;
    error
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::{Duration, Instant};

    use swarm_shard::tiny::{GgmlDType, TinyModelSpec};

    use super::*;

    #[test]
    fn a_start_that_fails_part_way_leaves_nothing_running() {
        let dir = std::env::temp_dir().join(format!("sherpa-local-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.gguf");
        TinyModelSpec::default()
            .write_gguf(&path, GgmlDType::F32)
            .unwrap();
        let model = path.to_string_lossy().into_owned();
        let blocks = TinyModelSpec::default().layers as u32;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let alive = || {
                tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks()
            };
            let before = alive();
            // The tracker and the first server start; the second asks for
            // blocks the model does not have.
            let spans = [
                BlockRange::new(0, blocks).unwrap(),
                BlockRange::new(0, blocks + 5).unwrap(),
            ];
            let id = ModelId::new("tiny").unwrap();
            let err = LocalSwarm::start_spans(&model, id, &spans)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("block"), "{err}");
            // Every task of the tracker and the first server ends.
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive() > before {
                assert!(
                    Instant::now() < deadline,
                    "{} tasks still running after the failed start (before: {before})",
                    alive()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
