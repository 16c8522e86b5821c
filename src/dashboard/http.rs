//! The HTTP side: routes, the checks every request passes (host, token,
//! content type), errors in OpenAI's shape, bodies within a limit, and
//! the embedded static files.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde_json::json;

use super::state::Shared;
use super::{api, openai};

/// Every route.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/api/state", get(api::state))
        .route("/api/mode", post(api::set_mode))
        .route("/api/nodes", get(api::nodes))
        .route("/api/selection", put(api::set_selection))
        .route("/api/route", get(api::route))
        .route("/v1/models", get(api::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), guard))
        .with_state(shared)
}

/// An error answered before any streaming starts, in OpenAI's shape:
/// `{"error": {"message", "type", "code"}}`.
#[derive(Debug, Clone)]
pub(super) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let kind = match status.as_u16() {
            401 | 403 => "authentication_error",
            404 if code == "model_not_found" => "invalid_request_error",
            404 => "not_found_error",
            413 | 400 | 415 | 422 => "invalid_request_error",
            429 => "rate_limit_error",
            503 => "service_unavailable",
            _ => "server_error",
        };
        Self {
            status,
            message: message.into(),
            kind,
            code: Some(code),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// The body inside a stream (`data: {"error": ...}`) and outside.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Reads a JSON body of at most the configured size.
pub(super) async fn json_body<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    body: Body,
) -> Result<T, ApiError> {
    let limit = shared.config.max_body_bytes;
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not valid: {e}")))
}

/// Checks every request: the `Host` (on loopback), the token (beyond the
/// UI's own files and `/health`), and that bodies say they are JSON (so a
/// page elsewhere cannot post a form here without a CORS preflight);
/// answers CORS preflights for the allowed origin only.
async fn guard(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    shared.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let path = request.uri().path().to_owned();
    let headers = request.headers();
    if let Err(e) = check_host(&shared, headers) {
        return reject(&shared, e);
    }
    let cors = allowed_origin(&shared, headers);
    if request.method() == Method::OPTIONS {
        return match cors {
            Some(origin) => with_cors(StatusCode::NO_CONTENT.into_response(), &origin, true),
            None => reject(
                &shared,
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "cors_forbidden",
                    "cross-origin requests are not allowed (see --cors-origin)",
                ),
            ),
        };
    }
    let public = matches!(
        path.as_str(),
        "/" | "/assets/app.js" | "/assets/app.css" | "/health"
    );
    if !public {
        if let Some(token) = &shared.token {
            if !bearer_matches(headers, token) {
                return reject(
                    &shared,
                    ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "invalid_token",
                        "this dashboard needs its access token: send `Authorization: Bearer TOKEN` \
                         (the token is in the address the dashboard printed)",
                    ),
                );
            }
        }
    }
    if matches!(*request.method(), Method::POST | Method::PUT) {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return reject(
                &shared,
                ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send the body as JSON with `Content-Type: application/json`",
                ),
            );
        }
    }
    let response = next.run(request).await;
    match cors {
        Some(origin) => with_cors(response, &origin, false),
        None => response,
    }
}

fn reject(shared: &Shared, error: ApiError) -> Response {
    shared.metrics.rejected.fetch_add(1, Ordering::Relaxed);
    error.into_response()
}

/// On a loopback address, only loopback host names are answered: a page
/// elsewhere whose name was rebound to 127.0.0.1 sends its own name.
fn check_host(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    if !shared.addr.ip().is_loopback() {
        return Ok(());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            format!(
                "this dashboard listens on loopback and answers only to localhost, not {host:?}"
            ),
        ))
    }
}

/// Compares the bearer token in constant time.
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim();
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn allowed_origin(shared: &Shared, headers: &HeaderMap) -> Option<String> {
    let allowed = shared.config.cors_origin.as_deref()?;
    let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
    (allowed == "*" || origin == allowed).then(|| origin.to_owned())
}

fn with_cors(mut response: Response, origin: &str, preflight: bool) -> Response {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    if preflight {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    response
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no such endpoint: {} {}",
            request.method(),
            request.uri().path()
        ),
    )
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn index() -> Response {
    asset(INDEX_HTML, "text/html; charset=utf-8")
}

async fn app_js() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

async fn app_css() -> Response {
    asset(APP_CSS, "text/css; charset=utf-8")
}
