//! The UI's JSON endpoints, `/health`, `/metrics` and `/v1/models`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{json_body, ApiError};
use super::state::{lock, NotReady, Shared, Slot, SwarmMode};
use crate::Client;

/// The client, or the error that says why there is none.
pub(super) fn ready(shared: &Shared) -> Result<Arc<Client>, ApiError> {
    shared.client().map_err(|why| {
        let (code, message) = match why {
            NotReady::Idle => (
                "no_swarm",
                "no swarm chosen yet: pick LAN or a tracker in the dashboard (POST /api/mode)"
                    .to_owned(),
            ),
            NotReady::Loading(stage) => ("loading", format!("the dashboard is starting: {stage}")),
            NotReady::Failed(why) => ("swarm_failed", format!("the swarm client failed: {why}")),
        };
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    })
}

/// 200 when a client is ready, 503 while loading, idle or failed.
pub(super) async fn health(State(shared): State<Arc<Shared>>) -> Response {
    match shared.slot() {
        Slot::Ready(client) => {
            Json(json!({"status": "ok", "model": client.model().as_str()})).into_response()
        }
        slot => {
            let (status, message) = match slot {
                Slot::Loading(stage) => ("loading", stage),
                Slot::Failed(why) => ("failed", why),
                _ => ("idle", "no swarm chosen yet".to_owned()),
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": status, "message": message})),
            )
                .into_response()
        }
    }
}

pub(super) async fn state(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(state_json(&shared))
}

fn state_json(shared: &Shared) -> Value {
    let (state, message, progress, blocks) = match shared.slot() {
        Slot::Idle => ("idle", Some("choose a swarm mode".to_owned()), None, None),
        Slot::Loading(stage) => (
            "loading",
            None,
            Some(json!({"stage": stage, "detail": null})),
            None,
        ),
        Slot::Ready(client) => (
            "ready",
            None,
            None,
            Some(client.head().config().num_hidden_layers),
        ),
        Slot::Failed(why) => ("failed", Some(why), None, None),
    };
    let settings = lock(&shared.settings).clone();
    json!({
        "state": state,
        "message": message,
        "progress": progress,
        "mode": settings.mode,
        "tracker": settings.tracker,
        "model": crate::model_store::model_id(&shared.config.model).map(|m| m.as_str().to_owned()).unwrap_or_else(|_| shared.config.model.clone()),
        "model_blocks": blocks,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": shared.started.elapsed().as_secs(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ModeRequest {
    mode: String,
    tracker: Option<String>,
}

pub(super) async fn set_mode(
    State(shared): State<Arc<Shared>>,
    body: Body,
) -> Result<Response, ApiError> {
    let request: ModeRequest = json_body(&shared, body).await?;
    let mode = match request.mode.as_str() {
        "lan" => SwarmMode::Lan,
        "wan" => {
            let tracker = request.tracker.ok_or_else(|| {
                ApiError::bad_request("missing_tracker", "WAN mode needs a tracker address")
            })?;
            SwarmMode::Wan(
                super::parse_tracker(&tracker)
                    .map_err(|e| ApiError::bad_request("invalid_tracker", e.to_string()))?,
            )
        }
        other => {
            return Err(ApiError::bad_request(
                "invalid_mode",
                format!("mode must be \"lan\" or \"wan\", not {other:?}"),
            ))
        }
    };
    if shared.mode().as_ref() != Some(&mode)
        || matches!(shared.slot(), Slot::Failed(_) | Slot::Idle)
    {
        shared.switch(mode);
    }
    Ok((StatusCode::ACCEPTED, Json(state_json(&shared))).into_response())
}

pub(super) async fn nodes(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let client = ready(&shared)?;
    let fresh = query.get("refresh").is_some_and(|v| v != "0");
    report(&client, fresh).await
}

async fn report(client: &Client, fresh: bool) -> Result<Json<Value>, ApiError> {
    let report = client
        .report(fresh)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "survey_failed", e.to_string()))?;
    Ok(Json(report.json()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SelectionRequest {
    #[serde(default)]
    pinned: Vec<String>,
    #[serde(default)]
    excluded: Vec<String>,
}

/// Most servers a choice may name.
const MAX_CHOICE: usize = 1024;

pub(super) async fn set_selection(
    State(shared): State<Arc<Shared>>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let request: SelectionRequest = json_body(&shared, body).await?;
    if request.pinned.len() + request.excluded.len() > MAX_CHOICE {
        return Err(ApiError::bad_request(
            "too_many_servers",
            format!("a choice names at most {MAX_CHOICE} servers"),
        ));
    }
    if let Some(both) = request.pinned.iter().find(|p| request.excluded.contains(p)) {
        return Err(ApiError::bad_request(
            "pinned_and_excluded",
            format!("{both} is both pinned and excluded"),
        ));
    }
    let client = ready(&shared)?;
    let mut settings = lock(&shared.settings).clone();
    settings.pinned = request.pinned;
    settings.excluded = request.excluded;
    client.set_node_choice(settings.choice());
    shared.save(settings);
    report(&client, false).await
}

pub(super) async fn route(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(lock(&shared.last_route).clone().unwrap_or(Value::Null))
}

/// Every model the swarm serves (and the dashboard's own, served or not).
pub(super) async fn models(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let client = ready(&shared)?;
    let node = client.node();
    let mut served = swarm_dht::served_models(node)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "listing_failed", e.to_string()))?;
    if !served.iter().any(|m| &m.model == client.model()) {
        served.push(swarm_dht::ServedModel {
            model: client.model().clone(),
            blocks: client.head().config().num_hidden_layers as u32,
            servers: 0,
        });
    }
    let mut data = Vec::new();
    for model in served {
        let listing = node
            .list_servers(&model.model, swarm_dht::now_ms())
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "listing_failed", e.to_string()))?;
        let hosted: Vec<_> = listing.servers.iter().map(|s| s.info.blocks).collect();
        let missing: u32 = swarm_score::uncovered_blocks(model.blocks, &hosted)
            .iter()
            .map(|r| r.len())
            .sum();
        let coverage = match model.blocks {
            0 => 0.0,
            n => f64::from(n - missing.min(n)) / f64::from(n),
        };
        data.push(json!({
            "id": model.model.as_str(),
            "object": "model",
            "created": 0,
            "owned_by": "sherpa-swarm",
            "blocks": model.blocks,
            "coverage": coverage,
            "servers": listing.servers.len(),
            "chat": &model.model == client.model(),
        }));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

/// Prometheus text format.
pub(super) async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let m = &shared.metrics;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    let active = shared.config.max_generations.max(1) - shared.generations.available_permits();
    let ready = matches!(shared.slot(), Slot::Ready(_));
    let series: [(&str, &str, &str, f64); 13] = [
        (
            "sherpa_http_requests_total",
            "counter",
            "HTTP requests received.",
            load(&m.requests),
        ),
        (
            "sherpa_http_rejected_total",
            "counter",
            "Requests refused before a handler (host, token, content type, CORS).",
            load(&m.rejected),
        ),
        (
            "sherpa_completions_total",
            "counter",
            "Completions finished.",
            load(&m.completions),
        ),
        (
            "sherpa_completion_errors_total",
            "counter",
            "Completions that failed.",
            load(&m.completion_errors),
        ),
        (
            "sherpa_completions_cancelled_total",
            "counter",
            "Completions stopped because their client went away.",
            load(&m.cancelled),
        ),
        (
            "sherpa_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            load(&m.prompt_tokens),
        ),
        (
            "sherpa_completion_tokens_total",
            "counter",
            "Tokens generated.",
            load(&m.completion_tokens),
        ),
        (
            "sherpa_failovers_total",
            "counter",
            "Servers lost and replaced mid-generation.",
            load(&m.failovers),
        ),
        (
            "sherpa_time_to_first_token_seconds_count",
            "counter",
            "Completions with a first token.",
            load(&m.ttft_count),
        ),
        (
            "sherpa_time_to_first_token_seconds_sum",
            "counter",
            "Sum of times to first token.",
            load(&m.ttft_us) / 1e6,
        ),
        (
            "sherpa_active_generations",
            "gauge",
            "Generations running now.",
            active as f64,
        ),
        (
            "sherpa_ready",
            "gauge",
            "Whether the swarm client is ready.",
            f64::from(u8::from(ready)),
        ),
        (
            "sherpa_uptime_seconds",
            "gauge",
            "Seconds since the dashboard started.",
            shared.started.elapsed().as_secs_f64(),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
