//! The dashboard's HTTP API on a loopback swarm of real servers (the real
//! model, three servers in this process):
//! - chat completions, streamed and not, give the same greedy text as the
//!   model run locally; the stream starts with the route, ends with usage
//!   and `data: [DONE]`;
//! - a client that disconnects mid-stream stops its generation and the
//!   servers free the session's cache;
//! - the node selector's JSON ranks the servers and follows a changed
//!   choice, which is kept across restarts;
//! - bad requests (malformed JSON, unknown models, oversized bodies, wrong
//!   content type, foreign Host, unknown paths, missing or wrong tokens
//!   when bound beyond loopback) get the right status and error body, and
//!   the dashboard keeps serving.

#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use sherpa_swarm::dashboard::{Dashboard, DashboardConfig, SwarmMode};
use sherpa_swarm::shard::{ChatMessage, LocalModel, ModelFiles, TextTokenizer, WeightPrecision};
use sherpa_swarm::{GenerateOptions, LocalSwarm, ModelId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROMPT: &str = "Name three colours of the rainbow.";
const TOKENS: usize = 24;

/// An HTTP/1.1 answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an error answer in OpenAI's shape with `status` and `code`.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        let body = self.json();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(body["error"]["type"].as_str().is_some());
    }
}

/// Sends one request on a fresh connection and reads the whole answer.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head += &format!("Host: {addr}\r\n");
    }
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    if let Some(body) = body {
        head += &format!("Content-Length: {}\r\n", body.len());
    }
    head += "\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    if let Some(body) = body {
        // A server may answer (413) before reading everything.
        let _ = stream.write_all(body).await;
    }
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut raw))
        .await
        .expect("the answer took over 2 minutes")
        .unwrap();
    parse(&raw)
}

fn parse(raw: &[u8]) -> Answer {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[line + 2..line + 2 + size]);
        data = &data[line + 2 + size + 2..];
    }
}

/// Posts a streamed chat for `max_tokens` tokens and reads until `events`
/// data events have come: the open connection and what it read.
async fn stream_until(addr: SocketAddr, max_tokens: usize, events: usize) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = chat(true, max_tokens);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while raw.windows(6).filter(|w| w == b"data: ").count() < events {
        let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&buf[..n]);
    }
    (stream, raw)
}

fn post_json(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

const JSON: (&str, &str) = ("Content-Type", "application/json");

/// The events of an SSE body: (comments, data payloads).
fn events(body: &str) -> (Vec<String>, Vec<String>) {
    let (mut comments, mut data) = (Vec::new(), Vec::new());
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        for line in event.lines() {
            if let Some(c) = line.strip_prefix(": ") {
                comments.push(c.to_owned());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push(d.to_owned());
            } else {
                panic!("unexpected SSE line {line:?}");
            }
        }
    }
    (comments, data)
}

/// The greedy reply of the whole model run locally, for comparison.
fn local_reply(model: &Path) -> String {
    let files = ModelFiles::open(model).unwrap();
    let tokenizer = TextTokenizer::from_model(&files).unwrap();
    let local = LocalModel::load(
        &files,
        &[],
        &sherpa_swarm::shard::Device::Cpu,
        WeightPrecision::Native,
    )
    .unwrap();
    let prompt = tokenizer.encode_chat(&[ChatMessage::user(PROMPT)]).unwrap();
    let out = local
        .generate(
            &prompt,
            &GenerateOptions::default().with_max_new_tokens(TOKENS),
            &mut |_| Ok(true),
        )
        .unwrap();
    tokenizer.decode(&out.tokens).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sherpa-dash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn swarm(model: &Path) -> LocalSwarm {
    LocalSwarm::start(
        &model.to_string_lossy(),
        ModelId::new("smollm2-135m").unwrap(),
        3,
    )
    .await
    .unwrap()
}

fn config(model: &Path, swarm: &LocalSwarm, state: &Path) -> DashboardConfig {
    DashboardConfig::default()
        .with_listen("127.0.0.1:0".parse().unwrap())
        .with_mode(Some(SwarmMode::Wan(swarm.tracker.addr().clone())))
        .with_model(model.to_string_lossy().into_owned())
        .with_state_file(state.to_owned())
}

/// A dashboard on `swarm` with a fresh state file, once its client is
/// ready: the dashboard and its state file.
async fn ready_dashboard(model: &Path, swarm: &LocalSwarm, name: &str) -> (Dashboard, PathBuf) {
    let state = scratch(name).join("state.json");
    let dashboard = Dashboard::start(config(model, swarm, &state))
        .await
        .unwrap();
    dashboard
        .wait_ready(Duration::from_secs(120))
        .await
        .unwrap();
    (dashboard, state)
}

fn chat(stream: bool, max_tokens: usize) -> Vec<u8> {
    post_json(&json!({
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_completions_stream_the_local_models_greedy_text_and_bad_requests_get_clear_errors() {
    let model = common::smollm2();
    let expected = local_reply(&model);
    let swarm = swarm(&model).await;
    let dir = scratch("api");
    let dashboard = Dashboard::start(config(&model, &swarm, &dir.join("state.json")))
        .await
        .unwrap();
    let addr = dashboard.addr();
    assert!(dashboard.token().is_none(), "no token on loopback");
    // The UI is served, with its assets, before the swarm client is up.
    let index = request(addr, "GET", "/", &[], None).await;
    assert_eq!(index.status, 200);
    assert!(index.text().contains("/assets/app.js"), "{}", index.text());
    for asset in ["/assets/app.js", "/assets/app.css"] {
        let a = request(addr, "GET", asset, &[], None).await;
        assert_eq!(a.status, 200, "{asset}");
        assert!(a.body.len() > 1000, "{asset} is nearly empty");
    }
    dashboard
        .wait_ready(Duration::from_secs(120))
        .await
        .unwrap();
    let health = request(addr, "GET", "/health", &[], None).await;
    assert_eq!(health.status, 200, "{}", health.text());

    // The models the swarm serves.
    let models = request(addr, "GET", "/v1/models", &[], None).await;
    assert_eq!(models.status, 200, "{}", models.text());
    let models = models.json();
    assert_eq!(models["object"], "list");
    let ours = &models["data"][0];
    assert_eq!(ours["id"], "smollm2-135m", "{models}");
    assert_eq!(ours["blocks"], 30);
    assert_eq!(ours["servers"], 3);
    assert_eq!(ours["coverage"], 1.0);

    // Not streamed.
    let whole = request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[JSON],
        Some(&chat(false, TOKENS)),
    )
    .await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    let whole = whole.json();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        whole["choices"][0]["message"]["content"].as_str().unwrap(),
        expected,
        "the dashboard's reply differs from the local model's"
    );
    assert_eq!(whole["usage"]["completion_tokens"], TOKENS);
    assert_eq!(whole["choices"][0]["finish_reason"], "length");

    // Streamed: route first, the same text in pieces, usage, [DONE].
    let streamed = request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[JSON],
        Some(&chat(true, TOKENS)),
    )
    .await;
    assert_eq!(streamed.status, 200, "{}", streamed.text());
    assert!(
        streamed.headers.contains("text/event-stream"),
        "{}",
        streamed.headers
    );
    let body = streamed.text();
    assert!(body.starts_with(": route {"), "{body}");
    let (comments, data) = events(&body);
    let route: Value = serde_json::from_str(comments[0].strip_prefix("route ").unwrap()).unwrap();
    assert_eq!(route["hops"].as_array().unwrap().len(), 3, "{route}");
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text, expected,
        "streamed text differs from the local model's"
    );
    assert!(
        chunks.len() > 5,
        "the reply came in {} chunks",
        chunks.len()
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], TOKENS);
    assert!(last["usage"]["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(
        comments.iter().any(|c| c.starts_with("timing {")),
        "{comments:?}"
    );

    // The pipeline the answer took, with each hop's latency.
    let taken = request(addr, "GET", "/api/route", &[], None).await.json();
    let hops = taken["hops"].as_array().unwrap();
    assert_eq!(hops.len(), 3, "{taken}");
    let blocks: Vec<(u64, u64)> = hops
        .iter()
        .map(|h| {
            (
                h["blocks"]["start"].as_u64().unwrap(),
                h["blocks"]["end"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(blocks, [(0, 10), (10, 20), (20, 30)]);
    assert!(
        hops.iter()
            .all(|h| h["latency_ms"].as_f64().is_some_and(|l| l > 0.0)),
        "{taken}"
    );
    assert!(taken["ttft_ms"].as_f64().is_some_and(|t| t > 0.0));

    // A plain completion.
    let plain = request(
        addr,
        "POST",
        "/v1/completions",
        &[JSON],
        Some(&post_json(&json!({"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}))),
    )
    .await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    let plain = plain.json();
    assert_eq!(plain["object"], "text_completion");
    assert!(!plain["choices"][0]["text"].as_str().unwrap().is_empty());
    let plain_tokens = plain["usage"]["completion_tokens"].as_u64().unwrap();

    // Bad requests.
    let bad = |path: &'static str, headers: Vec<(&'static str, &'static str)>, body: Vec<u8>| async move {
        request(addr, "POST", path, &headers, Some(&body)).await
    };
    bad("/v1/chat/completions", vec![JSON], b"{\"model\": ".to_vec())
        .await
        .assert_error(400, "invalid_json");
    bad(
        "/v1/chat/completions",
        vec![JSON],
        post_json(&json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})),
    )
    .await
    .assert_error(404, "model_not_found");
    bad(
        "/v1/chat/completions",
        vec![JSON],
        post_json(&json!({"model": "smollm2-135m", "messages": []})),
    )
    .await
    .assert_error(400, "empty_messages");
    bad(
        "/v1/chat/completions",
        vec![JSON],
        post_json(&json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "temperature": 7})),
    )
    .await
    .assert_error(400, "invalid_temperature");
    let huge = post_json(
        &json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x".repeat(2 << 20)}]}),
    );
    bad("/v1/chat/completions", vec![JSON], huge)
        .await
        .assert_error(413, "body_too_large");
    bad(
        "/v1/chat/completions",
        vec![("Content-Type", "text/plain")],
        chat(false, 2),
    )
    .await
    .assert_error(415, "unsupported_media_type");
    bad(
        "/v1/chat/completions",
        vec![JSON, ("Host", "evil.example:80")],
        chat(false, 2),
    )
    .await
    .assert_error(403, "forbidden_host");
    request(addr, "GET", "/v1/nothing", &[], None)
        .await
        .assert_error(404, "not_found");
    for traversal in [
        "/assets/../Cargo.toml",
        "/assets/%2e%2e/Cargo.toml",
        "/../Cargo.toml",
    ] {
        let a = request(addr, "GET", traversal, &[], None).await;
        assert!(
            a.status == 404 || a.status == 400,
            "{traversal}: {}",
            a.status
        );
        assert!(!a.text().contains("[package]"), "{traversal} leaked a file");
    }
    let options = request(
        addr,
        "OPTIONS",
        "/v1/models",
        &[("Origin", "http://127.0.0.1:9")],
        None,
    )
    .await;
    assert_eq!(options.status, 403, "no CORS unless asked");
    assert!(!options
        .headers
        .to_ascii_lowercase()
        .contains("access-control-allow-origin"));

    // Still serving after all that.
    let again = request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[JSON],
        Some(&chat(false, 4)),
    )
    .await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert!(expected.starts_with(
        again.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    ));

    let metrics = request(addr, "GET", "/metrics", &[], None).await;
    assert_eq!(metrics.status, 200);
    let metrics = metrics.text();
    assert!(metrics.contains("sherpa_completions_total 4"), "{metrics}");
    let tokens = 2 * TOKENS as u64 + plain_tokens + 4;
    assert!(
        metrics.contains(&format!("sherpa_completion_tokens_total {tokens}")),
        "{metrics}"
    );

    dashboard.shutdown().await;
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_mid_stream_frees_the_servers_caches() {
    let model = common::smollm2();
    let swarm = swarm(&model).await;
    let (dashboard, _) = ready_dashboard(&model, &swarm, "cancel").await;
    let addr = dashboard.addr();
    let free_before: Vec<u64> = swarm
        .servers
        .iter()
        .map(|s| s.current_info().cache_tokens_free)
        .collect();

    // Read until a few tokens have streamed, then hang up.
    let (stream, _) = stream_until(addr, 2000, 6).await;
    let busy: Vec<u32> = swarm
        .servers
        .iter()
        .map(|s| s.current_info().sessions)
        .collect();
    assert_eq!(
        busy,
        [1, 1, 1],
        "each server runs the session while it streams"
    );
    drop(stream);

    common::wait_servers_idle(&swarm.servers, Some(&free_before), Duration::from_secs(20));
    let metrics = request(addr, "GET", "/metrics", &[], None).await.text();
    assert!(
        metrics.contains("sherpa_completions_cancelled_total 1"),
        "{metrics}"
    );
    // The generation stopped early: far fewer than 2000 tokens were made.
    let generated: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sherpa_completion_tokens_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        generated < 1000,
        "{generated} tokens were generated for a client that left"
    );
    dashboard.shutdown().await;
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_node_selector_follows_the_choice_and_keeps_it_across_restarts() {
    let model = common::smollm2();
    let swarm = swarm(&model).await;
    let (dashboard, state) = ready_dashboard(&model, &swarm, "nodes").await;
    let addr = dashboard.addr();

    let nodes = request(addr, "GET", "/api/nodes", &[], None).await;
    assert_eq!(nodes.status, 200, "{}", nodes.text());
    let nodes = nodes.json();
    let servers = nodes["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 3, "{nodes}");
    let scores: Vec<f64> = servers
        .iter()
        .map(|s| s["score"]["total"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "ranked best first: {scores:?}"
    );
    for s in servers {
        assert_eq!(s["selected"], true, "{s}");
        assert_eq!(s["reachability"]["path"], "direct", "{s}");
        assert!(s["ping_ms"].as_f64().is_some(), "{s}");
        for part in ["ping", "upload", "download", "memory", "compute"] {
            assert!(s["score"][part].as_f64().is_some(), "{part} missing in {s}");
        }
    }
    assert_eq!(nodes["coverage"]["covered"], true);
    assert_eq!(nodes["coverage"]["cells"].as_array().unwrap().len(), 30);

    // Excluding the server of blocks 10..20 leaves those blocks uncovered.
    let middle = servers.iter().find(|s| s["blocks"]["start"] == 10).unwrap()["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let changed = request(
        addr,
        "PUT",
        "/api/selection",
        &[JSON],
        Some(&post_json(&json!({"pinned": [], "excluded": [middle]}))),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    let changed = changed.json();
    assert_eq!(changed["coverage"]["covered"], false, "{changed}");
    assert_eq!(
        changed["coverage"]["missing"],
        json!([{"start": 10, "end": 20}])
    );
    let cells = changed["coverage"]["cells"].as_array().unwrap();
    assert_eq!(cells[15]["state"], "elsewhere");
    assert_eq!(cells[0]["state"], "selected");
    assert_eq!(changed["excluded"], json!([middle]));
    // A chat now cannot be served, and says so before any stream.
    let refused = request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[JSON],
        Some(&chat(true, 4)),
    )
    .await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("10..20"),
        "{}",
        refused.text()
    );
    dashboard.shutdown().await;

    // A restarted dashboard keeps the choice.
    let saved: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(saved["excluded"], json!([middle]));
    let again = Dashboard::start(config(&model, &swarm, &state).with_mode(None))
        .await
        .unwrap();
    again.wait_ready(Duration::from_secs(120)).await.unwrap();
    let nodes = request(again.addr(), "GET", "/api/nodes", &[], None)
        .await
        .json();
    assert_eq!(nodes["excluded"], json!([middle]), "{nodes}");
    assert_eq!(nodes["coverage"]["covered"], false);
    let state_json = request(again.addr(), "GET", "/api/state", &[], None)
        .await
        .json();
    assert_eq!(state_json["mode"], "wan");
    assert_eq!(state_json["tracker"], swarm.tracker.addr().to_string());
    again.shutdown().await;
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_every_api_request_needs_the_token() {
    let dir = scratch("token");
    // No swarm needed: the checks come before any handler.
    let dashboard = Dashboard::start(
        DashboardConfig::default()
            .with_listen("0.0.0.0:0".parse().unwrap())
            .with_state_file(dir.join("state.json")),
    )
    .await
    .unwrap();
    let token = dashboard
        .token()
        .expect("a token is made beyond loopback")
        .to_owned();
    assert!(token.len() >= 32);
    assert!(dashboard.url().ends_with(&format!("#token={token}")));
    let addr = SocketAddr::new("127.0.0.1".parse().unwrap(), dashboard.addr().port());
    request(addr, "GET", "/api/state", &[], None)
        .await
        .assert_error(401, "invalid_token");
    request(
        addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer wrong")],
        None,
    )
    .await
    .assert_error(401, "invalid_token");
    let bearer = format!("Bearer {token}");
    let state = request(
        addr,
        "GET",
        "/api/state",
        &[("Authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(state.status, 200, "{}", state.text());
    assert_eq!(state.json()["state"], "idle");
    // The page itself and /health need no token; /health says it is not ready.
    assert_eq!(request(addr, "GET", "/", &[], None).await.status, 200);
    assert_eq!(request(addr, "GET", "/health", &[], None).await.status, 503);
    // Without a swarm, a chat is refused clearly.
    request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[JSON, ("Authorization", &bearer)],
        Some(&chat(false, 2)),
    )
    .await
    .assert_error(503, "no_swarm");
    dashboard.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_lost_mid_answer_is_replaced_and_the_stream_says_so() {
    let model = common::smollm2();
    let expected = local_reply(&model);
    // Two replicas of each third of the model.
    let spans: Vec<sherpa_swarm::BlockRange> = (0..6)
        .map(|i| sherpa_swarm::BlockRange::new(10 * (i % 3), 10 * (i % 3) + 10).unwrap())
        .collect();
    let mut swarm = LocalSwarm::start_spans(
        &model.to_string_lossy(),
        ModelId::new("smollm2-135m").unwrap(),
        &spans,
    )
    .await
    .unwrap();
    let (dashboard, _) = ready_dashboard(&model, &swarm, "failover").await;
    let addr = dashboard.addr();

    // Until the route and a few tokens have come.
    let (mut stream, mut raw) = stream_until(addr, TOKENS, 4).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let route_line = text
        .lines()
        .find_map(|l| l.strip_prefix(": route "))
        .expect("the stream starts with its route");
    let route: Value = serde_json::from_str(route_line).unwrap();
    let middle = route["hops"][1]["peer_id"].as_str().unwrap().to_owned();
    let victim = swarm
        .servers
        .iter()
        .position(|s| s.node().peer_id().to_string() == middle)
        .unwrap();
    swarm.servers.remove(victim).abort().await;

    stream.read_to_end(&mut raw).await.unwrap();
    let answer = parse(&raw);
    let (comments, data) = events(&answer.text());
    let text: String = data
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, expected, "the answer changed when a server was lost");
    let notice: Value = comments
        .iter()
        .find_map(|c| c.strip_prefix("failover "))
        .map(|c| serde_json::from_str(c).unwrap())
        .unwrap_or_else(|| panic!("no failover notice in the stream: {comments:?}"));
    assert_eq!(notice["lost"]["peer_id"], middle.as_str(), "{notice}");
    assert_eq!(notice["replaced_by"][0]["blocks"]["start"], 10, "{notice}");
    let taken = request(addr, "GET", "/api/route", &[], None).await.json();
    assert_eq!(taken["failovers"].as_array().unwrap().len(), 1, "{taken}");
    assert_ne!(taken["hops"][1]["peer_id"], middle.as_str(), "{taken}");

    // Two requests at once each get their own session.
    let body = chat(false, TOKENS);
    let (a, b) = tokio::join!(
        request(addr, "POST", "/v1/chat/completions", &[JSON], Some(&body)),
        request(addr, "POST", "/v1/chat/completions", &[JSON], Some(&body)),
    );
    for answer in [a, b] {
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(
            answer.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap(),
            expected
        );
    }
    dashboard.shutdown().await;
    swarm.shutdown().await;
}
