//! `POST /v1/chat/completions` and `POST /v1/completions`, compatible with
//! OpenAI's API, streaming (server-sent events ending in `data: [DONE]`)
//! and not. Each request gets a session of its own through the swarm; a
//! client that goes away stops its generation, which closes the session
//! so the servers free its caches. The route and the timings travel as
//! SSE comment lines (`: route {...}`, `: timing {...}`), which OpenAI's
//! clients skip.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::ready;
use super::http::{json_body, ApiError};
use super::state::{lock, Shared};
use crate::shard::{ChatMessage, GenerateOptions, SamplingConfig};
use crate::{Client, Generation, RouteStep, SherpaError};

/// Tokens generated when a request does not say.
const DEFAULT_MAX_TOKENS: usize = 512;
/// Stop sequences a request may give (OpenAI's limit).
const MAX_STOPS: usize = 4;

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

/// What both endpoints share.
#[derive(Deserialize)]
struct Sampling {
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u64>,
    seed: Option<u64>,
    repetition_penalty: Option<f32>,
    stop: Option<Stop>,
    n: Option<u32>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    sampling: Sampling,
}

/// Which endpoint a generation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

pub(super) async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    body: Body,
) -> Result<Response, ApiError> {
    let request: ChatRequest = json_body(&shared, body).await?;
    let client = ready(&shared)?;
    check_model(&client, request.sampling.model.as_deref())?;
    if request.messages.is_empty() {
        return Err(ApiError::bad_request(
            "empty_messages",
            "`messages` must hold at least one message",
        ));
    }
    let messages = request
        .messages
        .into_iter()
        .map(chat_message)
        .collect::<Result<Vec<_>, _>>()?;
    let tokenizer = client.tokenizer().ok_or_else(no_tokenizer)?;
    let prompt = tokenizer
        .encode_chat(&messages)
        .map_err(|e| ApiError::bad_request("invalid_messages", e.to_string()))?;
    run(shared, client, prompt, request.sampling, Kind::Chat).await
}

pub(super) async fn completions(
    State(shared): State<Arc<Shared>>,
    body: Body,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = json_body(&shared, body).await?;
    let client = ready(&shared)?;
    check_model(&client, request.sampling.model.as_deref())?;
    let text = match request.prompt {
        Prompt::One(text) => text,
        Prompt::Many(mut texts) if texts.len() == 1 => texts.remove(0),
        Prompt::Many(_) => {
            return Err(ApiError::bad_request(
                "unsupported_prompt",
                "give one prompt per request",
            ))
        }
    };
    let tokenizer = client.tokenizer().ok_or_else(no_tokenizer)?;
    let prompt = tokenizer
        .encode_raw(&text)
        .map_err(|e| ApiError::bad_request("invalid_prompt", e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::bad_request("empty_prompt", "the prompt is empty"));
    }
    run(shared, client, prompt, request.sampling, Kind::Text).await
}

fn no_tokenizer() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_tokenizer",
        "the model file carries no tokenizer",
    )
}

fn check_model(client: &Client, model: Option<&str>) -> Result<(), ApiError> {
    let ours = client.model().as_str();
    match model {
        None => Err(ApiError::bad_request(
            "missing_model",
            format!("say which model: \"model\": \"{ours}\""),
        )),
        Some(m) if m == ours => Ok(()),
        Some(m) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!(
                "the model {m:?} is not served here: this dashboard generates with {ours} \
                 (GET /v1/models lists what the swarm serves)"
            ),
        )),
    }
}

fn chat_message(message: Message) -> Result<ChatMessage, ApiError> {
    let role = match message.role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        other => {
            return Err(ApiError::bad_request(
                "unsupported_role",
                format!("messages with role {other:?} are not supported (system, user, assistant)"),
            ))
        }
    };
    let content = match message.content {
        None => String::new(),
        Some(Content::Text(text)) => text,
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    (kind, _) => {
                        return Err(ApiError::bad_request(
                            "unsupported_content",
                            format!("content parts of type {kind:?} are not supported (text only)"),
                        ))
                    }
                }
            }
            text
        }
    };
    Ok(ChatMessage {
        role: role.to_owned(),
        content,
    })
}

/// The generation settings a request asks for, checked.
fn options(
    client: &Client,
    sampling: &Sampling,
    prompt_tokens: usize,
) -> Result<GenerateOptions, ApiError> {
    if sampling.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(
            "unsupported_n",
            "one choice per request (n = 1)",
        ));
    }
    let context = client.head().config().max_position_embeddings;
    if prompt_tokens >= context {
        return Err(ApiError::bad_request(
            "context_length_exceeded",
            format!("the prompt has {prompt_tokens} tokens; the model's context holds {context}"),
        ));
    }
    let asked = sampling.max_completion_tokens.or(sampling.max_tokens);
    if asked == Some(0) {
        return Err(ApiError::bad_request(
            "invalid_max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    let max_new = asked
        .map_or(DEFAULT_MAX_TOKENS, |n| n.min(usize::MAX as u64) as usize)
        .min(context - prompt_tokens);
    let temperature = sampling.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(
            "invalid_temperature",
            "temperature must be between 0 and 2",
        ));
    }
    let top_p = sampling.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(
            "invalid_top_p",
            "top_p must be above 0 and at most 1",
        ));
    }
    let penalty = sampling.repetition_penalty.unwrap_or(1.0);
    if !(penalty > 0.0 && penalty.is_finite()) {
        return Err(ApiError::bad_request(
            "invalid_repetition_penalty",
            "repetition_penalty must be above 0",
        ));
    }
    let seed = sampling.seed.unwrap_or_else(rand::random);
    let config = SamplingConfig::default()
        .with_temperature(temperature)
        .with_top_p(top_p)
        .with_top_k(sampling.top_k.unwrap_or(0).min(u32::MAX as u64) as usize)
        .with_repetition_penalty(penalty)
        .with_seed(seed);
    Ok(GenerateOptions::default()
        .with_max_new_tokens(max_new)
        .with_sampling(config))
}

fn stops(sampling: &Sampling) -> Result<Vec<String>, ApiError> {
    let stops = match &sampling.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stops.len() > MAX_STOPS || stops.iter().any(String::is_empty) {
        return Err(ApiError::bad_request(
            "invalid_stop",
            format!("stop takes up to {MAX_STOPS} non-empty strings"),
        ));
    }
    Ok(stops)
}

/// What the generation task tells the answer.
enum Event {
    Text(String),
    /// A server was lost and replaced, as it happens.
    Failover(Value),
    Done(Result<Summary, ApiError>),
}

/// A finished generation, as the answer reports it.
struct Summary {
    finish_reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    ttft_ms: Option<f64>,
    tokens_per_s: f64,
    route: Value,
}

impl Summary {
    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }

    fn timing(&self) -> Value {
        json!({"ttft_ms": self.ttft_ms, "tokens_per_s": self.tokens_per_s})
    }
}

/// Opens a session (errors here are answered with a status), then
/// generates in a task of its own and answers from what it sends.
async fn run(
    shared: Arc<Shared>,
    client: Arc<Client>,
    prompt: Vec<u32>,
    sampling: Sampling,
    kind: Kind,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let options = options(&client, &sampling, prompt.len())?;
    let stops = stops(&sampling)?;
    let permit = shared
        .generations
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_generations",
                format!(
                    "{} generations are running; try again in a moment",
                    shared.config.max_generations
                ),
            )
        })?;
    let mut session = client
        .session(client.max_length(prompt.len(), &options))
        .await
        .map_err(|e| {
            shared
                .metrics
                .completion_errors
                .fetch_add(1, Ordering::Relaxed);
            swarm_error(e)
        })?;
    let route = route_json(&session.route(), &[], client.local_blocks());
    // Room for every piece and the end: the task never waits on a slow
    // reader, and the channel is still bounded.
    // (Failover notices beyond the spare room are dropped: the final route
    // lists them all.)
    let (tx, rx) = mpsc::channel(options.max_new_tokens + 2 + FAILOVER_NOTICES);
    let notices = tx.clone();
    session.on_failover(move |f| {
        let _ = notices.try_send(Event::Failover(failover_json(f)));
    });
    let task_shared = shared.clone();
    let model = client.model().as_str().to_owned();
    tokio::spawn(async move {
        let _permit = permit;
        let done = generate(
            &task_shared,
            &client,
            &mut session,
            &prompt,
            &options,
            stops,
            &tx,
            started,
        )
        .await;
        session.close().await;
        let _ = tx.try_send(Event::Done(done));
    });
    let meta = Meta {
        id: format!(
            "{}-{}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            random_id()
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model,
        kind,
    };
    if sampling.stream {
        Ok(stream_answer(meta, route, rx))
    } else {
        whole_answer(meta, rx).await
    }
}

/// Runs the generation, sending text as it is decoded; stops early when
/// the answer's reader has gone away or a stop sequence appeared.
#[allow(clippy::too_many_arguments)]
async fn generate(
    shared: &Shared,
    client: &Client,
    session: &mut crate::InferenceSession,
    prompt: &[u32],
    options: &GenerateOptions,
    stops: Vec<String>,
    tx: &mpsc::Sender<Event>,
    started: Instant,
) -> Result<Summary, ApiError> {
    let metrics = &shared.metrics;
    let tokenizer = client.tokenizer().ok_or_else(no_tokenizer)?;
    let mut decoder = tokenizer.stream_decoder();
    let mut stopper = StopText::new(stops);
    let mut first: Option<Duration> = None;
    let mut gone = false;
    let mut failed = None;
    let result = client
        .generate_in(session, prompt, options, &mut |id| {
            first.get_or_insert_with(|| started.elapsed());
            if tx.is_closed() {
                gone = true;
                return false;
            }
            match decoder.push(id) {
                Ok(Some(piece)) => {
                    let text = stopper.push(&piece);
                    if !text.is_empty() && tx.try_send(Event::Text(text)).is_err() {
                        gone = true;
                        return false;
                    }
                    !stopper.hit
                }
                Ok(None) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })
        .await;
    if gone {
        metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        tracing::info!("a completion's client went away; its generation stopped");
    }
    let generation: Generation = match (result, failed) {
        (Ok(g), None) => g,
        (Err(e), _) => {
            metrics.completion_errors.fetch_add(1, Ordering::Relaxed);
            return Err(swarm_error(e));
        }
        (Ok(_), Some(e)) => {
            metrics.completion_errors.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "decode_failed",
                e.to_string(),
            ));
        }
    };
    let rest = stopper.finish();
    if !rest.is_empty() {
        let _ = tx.try_send(Event::Text(rest));
    }
    let out = &generation.output;
    let finish_reason = if stopper.hit || out.hit_eos || out.tokens.len() < options.max_new_tokens {
        "stop"
    } else {
        "length"
    };
    metrics.completions.fetch_add(1, Ordering::Relaxed);
    metrics
        .prompt_tokens
        .fetch_add(out.prompt_tokens as u64, Ordering::Relaxed);
    metrics
        .completion_tokens
        .fetch_add(out.tokens.len() as u64, Ordering::Relaxed);
    metrics
        .failovers
        .fetch_add(generation.failovers.len() as u64, Ordering::Relaxed);
    if let Some(t) = first {
        metrics
            .ttft_us
            .fetch_add(t.as_micros() as u64, Ordering::Relaxed);
        metrics.ttft_count.fetch_add(1, Ordering::Relaxed);
    }
    let mut route = route_json(
        &generation.final_route,
        &generation.hop_latencies,
        generation.local_blocks,
    );
    route["failovers"] = generation
        .failovers
        .iter()
        .map(failover_json)
        .collect::<Vec<_>>()
        .into();
    let summary = Summary {
        finish_reason,
        prompt_tokens: out.prompt_tokens,
        completion_tokens: out.tokens.len(),
        ttft_ms: first.map(|t| t.as_secs_f64() * 1000.0),
        tokens_per_s: out.decode_tokens_per_second(),
        route: route.clone(),
    };
    let mut last = route;
    for (key, value) in [
        ("ttft_ms", json!(summary.ttft_ms)),
        ("tokens_per_s", json!(summary.tokens_per_s)),
        ("prompt_tokens", json!(summary.prompt_tokens)),
        ("completion_tokens", json!(summary.completion_tokens)),
        (
            "finished_at_ms",
            json!(SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)),
        ),
    ] {
        last[key] = value;
    }
    *lock(&shared.last_route) = Some(last);
    Ok(summary)
}

/// A swarm failure as an HTTP error.
fn swarm_error(e: SherpaError) -> ApiError {
    use swarm_dht::DhtError;
    let (status, code) = match &e {
        SherpaError::Dht(DhtError::NoHosts { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, "model_unavailable")
        }
        SherpaError::Dht(DhtError::NoRoute(_)) => (StatusCode::SERVICE_UNAVAILABLE, "no_route"),
        SherpaError::Dht(DhtError::Refused(_)) => {
            (StatusCode::SERVICE_UNAVAILABLE, "servers_refused")
        }
        SherpaError::Dht(_) | SherpaError::Network(_) => (StatusCode::BAD_GATEWAY, "swarm_error"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
    };
    ApiError::new(status, code, e.to_string())
}

/// Failover notices an answer has room for while it streams.
const FAILOVER_NOTICES: usize = 8;

fn failover_json(f: &crate::Failover) -> Value {
    json!({
        "lost": hop_json(&f.lost, None),
        "error": f.error,
        "replaced_by": f.replaced_by.iter().map(|h| hop_json(h, None)).collect::<Vec<_>>(),
        "replayed_positions": f.replayed_positions,
        "took_ms": f.took.as_secs_f64() * 1000.0,
    })
}

fn hop_json(step: &RouteStep, latency: Option<Duration>) -> Value {
    json!({
        "name": step.name,
        "peer_id": step.peer.to_string(),
        "blocks": {"start": step.blocks.start(), "end": step.blocks.end()},
        "path": if step.direct { "direct" } else { "stream" },
        "latency_ms": latency.map(|d| d.as_secs_f64() * 1000.0),
    })
}

fn route_json(
    route: &[RouteStep],
    latencies: &[Option<Duration>],
    local: Option<crate::BlockRange>,
) -> Value {
    json!({
        "hops": route
            .iter()
            .enumerate()
            .map(|(i, step)| hop_json(step, latencies.get(i).copied().flatten()))
            .collect::<Vec<_>>(),
        "local_blocks": local.map(|r| json!({"start": r.start(), "end": r.end()})),
    })
}

/// What every chunk of one answer repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn chunk(&self, text: Option<&str>, first: bool, finish: Option<&Summary>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = "assistant".into();
                }
                if let Some(text) = text {
                    delta["content"] = text.into();
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish.map(|s| s.finish_reason)})
            }
            Kind::Text => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish.map(|s| s.finish_reason),
            }),
        };
        let mut chunk = json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if let Some(summary) = finish {
            chunk["usage"] = summary.usage();
        }
        chunk
    }

    fn whole(&self, text: String, summary: &Summary) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": summary.finish_reason,
            }),
            Kind::Text => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": summary.finish_reason,
            }),
        };
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": summary.usage(),
            "sherpa": {"route": summary.route, "timing": summary.timing()},
        })
    }
}

async fn whole_answer(meta: Meta, mut rx: mpsc::Receiver<Event>) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(piece) => text.push_str(&piece),
            Event::Failover(_) => {}
            Event::Done(Ok(summary)) => return Ok(Json(meta.whole(text, &summary)).into_response()),
            Event::Done(Err(e)) => return Err(e),
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "generation_lost",
        "the generation ended without an answer",
    ))
}

fn sse_data(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn sse_comment(name: &str, value: &Value) -> Bytes {
    Bytes::from(format!(": {name} {value}\n\n"))
}

/// The answer as server-sent events.
fn stream_answer(meta: Meta, route: Value, rx: mpsc::Receiver<Event>) -> Response {
    struct Reading {
        meta: Meta,
        rx: mpsc::Receiver<Event>,
        first: bool,
        ended: bool,
        opening: Option<Bytes>,
    }
    let opening = [
        sse_comment("route", &route),
        sse_data(&meta.chunk(Some(""), true, None)),
    ]
    .concat();
    let reading = Reading {
        meta,
        rx,
        first: true,
        ended: false,
        opening: Some(Bytes::from(opening)),
    };
    let events = futures::stream::unfold(reading, |mut r| async move {
        if let Some(opening) = r.opening.take() {
            r.first = false;
            return Some((Ok::<Bytes, Infallible>(opening), r));
        }
        if r.ended {
            return None;
        }
        let bytes = match r.rx.recv().await {
            Some(Event::Text(piece)) => sse_data(&r.meta.chunk(Some(&piece), r.first, None)),
            Some(Event::Failover(notice)) => sse_comment("failover", &notice),
            Some(Event::Done(Ok(summary))) => {
                r.ended = true;
                let mut out = sse_data(&r.meta.chunk(None, false, Some(&summary))).to_vec();
                out.extend_from_slice(&sse_comment("timing", &summary.timing()));
                out.extend_from_slice(&sse_comment("route", &summary.route));
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            Some(Event::Done(Err(e))) => {
                r.ended = true;
                let mut out = sse_data(&e.body()).to_vec();
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            None => {
                r.ended = true;
                let e = ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "generation_lost",
                    "the generation ended without an answer",
                );
                Bytes::from([sse_data(&e.body()), Bytes::from_static(b"data: [DONE]\n\n")].concat())
            }
        };
        Some((Ok(bytes), r))
    });
    let mut response = Body::from_stream(events).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn random_id() -> String {
    let bytes: [u8; 12] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Holds back text that may be the start of a stop sequence, and cuts the
/// text at the first stop sequence that appears.
struct StopText {
    stops: Vec<String>,
    pending: String,
    hit: bool,
}

impl StopText {
    fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
            hit: false,
        }
    }

    /// Adds `piece`; returns the text that can be shown now.
    fn push(&mut self, piece: &str) -> String {
        if self.hit {
            return String::new();
        }
        self.pending.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = found {
            self.hit = true;
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return out;
        }
        // The longest end of the text that begins some stop sequence.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len().min(self.pending.len() + 1))
                    .filter(|&k| s.is_char_boundary(k) && self.pending.ends_with(&s[..k]))
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let rest = self.pending.split_off(cut);
        std::mem::replace(&mut self.pending, rest)
    }

    /// The text held back, once generation has ended without a stop.
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            out += &s.push(p);
        }
        if !s.hit {
            out += &s.finish();
        }
        (out, s.hit)
    }

    #[test]
    fn text_is_cut_at_a_stop_sequence_split_over_pieces() {
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxyz"]),
            ("abc".into(), true)
        );
        assert_eq!(
            run(&["\n\n", "."], &["one", " two", ".", " three"]),
            ("one two".into(), true)
        );
    }

    #[test]
    fn text_that_only_starts_like_a_stop_sequence_is_all_shown() {
        assert_eq!(run(&["END"], &["a E", "N", "d"]), ("a ENd".into(), false));
        assert_eq!(run(&[], &["x", "y"]), ("xy".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
    }

    #[test]
    fn held_back_text_is_released_as_soon_as_it_cannot_be_a_stop() {
        let mut s = StopText::new(vec!["END".into()]);
        assert_eq!(s.push("aE"), "a");
        assert_eq!(s.push("x"), "Ex");
    }
}
