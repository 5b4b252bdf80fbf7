//! Prometheus metrics (`/metrics`) and health (`/healthz`, `/livez`, `/readyz`) on one small
//! HTTP listener.
//!
//! # Layout
//! - [`install_recorder`]: the process's Prometheus recorder, buckets and descriptions.
//! - [`Health`]: what the probes report (model loaded, broker reachable, each camera's state).
//! - [`serve`]: the listener, until its cancellation token fires.
//! - [`Actions`]: what may change something or spend the language model through it (`POST
//!   /v1/feedback`, `POST /v1/frames/{event_id}/ask`): where each goes, the token they need
//!   beyond localhost, and their rate limit.
//!
//! [`serve`] also serves the routes it is given (the operator console, `kensa-console`).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use kensa_core::feedback::{AskResult, Feedback, FeedbackResult, Question};
use kensa_core::metrics::{self as m, CameraState, Label};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
    #[error("cannot listen on {addr} for /metrics and /healthz: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("health probe http://{addr}{path}: {msg}")]
    Probe { addr: String, path: String, msg: String },
}

/// `kensa healthcheck`: one HTTP GET of `path` on Kensa's listener (for Docker's HEALTHCHECK,
/// which has no curl in the image). Ok when it answers 200; the error says what it got.
pub fn probe(addr: &str, path: &str, timeout: Duration) -> Result<(), TelemetryError> {
    use std::io::{Read, Write};
    let fail = |msg: String| TelemetryError::Probe { addr: addr.to_string(), path: path.to_string(), msg };
    let sock: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("no address".into()))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout).map_err(|e| fail(e.to_string()))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| fail(e.to_string()))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| fail(e.to_string()))?;
    let mut head = Vec::new();
    s.take(4096).read_to_end(&mut head).map_err(|e| fail(e.to_string()))?;
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(fail(format!("answered `{status}`")))
    }
}

/// Installs the global Prometheus recorder, with buckets by name suffix and every metric
/// described. Call once, before any metric is touched.
pub fn install_recorder() -> Result<PrometheusHandle, TelemetryError> {
    // One global recorder per process: a second daemon in the same process (tests) shares it.
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let h = build_recorder()?;
    Ok(HANDLE.get_or_init(|| h).clone())
}

fn build_recorder() -> Result<PrometheusHandle, TelemetryError> {
    // Fine below 100 ms, where a CPU model step and a healthy capture→ack latency live.
    let seconds = [
        0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
        10.0, 30.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(m::BATCH_SIZE.into()), &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0]))
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(m::IMAGE_SCORE.into()),
                &[0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0],
            )
        })
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?;
    for (name, desc, unit) in m::DESCRIPTIONS {
        let unit = match *unit {
            "seconds" => metrics::Unit::Seconds,
            "bytes" => metrics::Unit::Bytes,
            _ => metrics::Unit::Count,
        };
        if name.ends_with("_total") {
            metrics::describe_counter!(*name, unit, *desc);
        } else if (name.ends_with("_seconds") && *name != m::OUTBOX_OLDEST)
            || *name == m::BATCH_SIZE
            || *name == m::IMAGE_SCORE
        {
            metrics::describe_histogram!(*name, unit, *desc);
        } else {
            metrics::describe_gauge!(*name, unit, *desc);
        }
    }
    metrics::gauge!(m::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// What `/healthz` reports: each camera's state and whether the model and broker are ready.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Mutex<HealthState>>,
}

#[derive(Default)]
struct HealthState {
    /// Model and banks loaded.
    ready: bool,
    /// The last periodic metadata request to Kafka succeeded.
    broker: bool,
    cameras: BTreeMap<String, CameraStatus>,
    /// Cameras whose product has no bank yet: shown as `waiting_for_bank` while their
    /// pipeline is up.
    waiting: std::collections::BTreeSet<String>,
    /// The outbox backlog (events waiting for Kafka and how long the oldest has waited).
    outbox: serde_json::Value,
}

/// A camera's state as `/healthz` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CameraStatus {
    pub state: &'static str,
    /// Why (the failing element, the reconnect reason, how many frames it delivered).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.inner.lock().expect("health lock").ready = ready;
    }
    pub fn set_broker(&self, ok: bool) {
        self.inner.lock().expect("health lock").broker = ok;
    }
    /// Ready: model and banks loaded, and the broker reachable.
    pub fn is_ready(&self) -> bool {
        let s = self.inner.lock().expect("health lock");
        s.ready && s.broker
    }
    /// Marks a camera as waiting for its product's bank (frames arrive, none is scored).
    pub fn set_waiting_for_bank(&self, camera: &str, waiting: bool) {
        let mut s = self.inner.lock().expect("health lock");
        if waiting {
            if !s.waiting.contains(camera) {
                tracing::warn!(camera, "camera waits for its product's bank: frames are not scored");
                s.waiting.insert(camera.to_string());
            }
        } else if s.waiting.remove(camera) {
            tracing::info!(camera, "the product's bank is loaded: the camera is scored");
        }
    }
    pub fn set_outbox(&self, backlog: serde_json::Value) {
        self.inner.lock().expect("health lock").outbox = backlog;
    }
    pub fn set_camera(&self, id: &str, state: CameraState, detail: impl Into<String>) {
        let status = CameraStatus { state: state.as_str(), detail: detail.into() };
        self.inner.lock().expect("health lock").cameras.insert(id.to_string(), status);
    }
    /// Each camera's state as `/healthz` shows it (an up camera without its bank yet is
    /// `waiting_for_bank`).
    pub fn cameras(&self) -> BTreeMap<String, CameraStatus> {
        let s = self.inner.lock().expect("health lock");
        let mut cameras = s.cameras.clone();
        for (id, c) in &mut cameras {
            if c.state == CameraState::Up.as_str() && s.waiting.contains(id) {
                c.state = "waiting_for_bank";
            }
        }
        cameras
    }
    pub fn snapshot(&self) -> serde_json::Value {
        let cameras = self.cameras();
        let s = self.inner.lock().expect("health lock");
        serde_json::json!({ "ready": s.ready && s.broker, "model_loaded": s.ready, "broker_reachable": s.broker, "outbox": s.outbox, "cameras": cameras })
    }
}

#[derive(Clone)]
struct AppState {
    handle: PrometheusHandle,
    health: Health,
    /// `publish.store_dir`, served under /evidence/.
    evidence: Option<Arc<std::path::PathBuf>>,
    actions: Option<Arc<ActionGate>>,
}

/// An operator answer and where its result goes.
pub type FeedbackRequest = (Feedback, tokio::sync::oneshot::Sender<FeedbackResult>);

/// A question about a held frame (its event id) and where the answer goes.
pub type AskRequest = (String, Question, tokio::sync::oneshot::Sender<AskResult>);

/// Actions on the listener: they change something or spend the language model, so they need
/// the token whenever the listener is reachable beyond localhost (or whenever one is
/// configured), and are rate-limited. None of a kind: that action is off (404).
#[derive(Clone)]
pub struct Actions {
    pub feedback: Option<tokio::sync::mpsc::Sender<FeedbackRequest>>,
    pub ask: Option<tokio::sync::mpsc::Sender<AskRequest>>,
    pub token: Option<String>,
    pub per_s: u32,
}

struct ActionGate {
    actions: Actions,
    /// The listener is bound to a loopback address only.
    loopback: bool,
    /// Token bucket: (tokens, last refill).
    bucket: Mutex<(f64, std::time::Instant)>,
}

impl ActionGate {
    /// None when allowed; else the refusal: a body that is not JSON (a page on another site
    /// cannot post JSON without a preflight, which this listener never grants, so an operator's
    /// browser cannot be used against the localhost listener), the token, the rate.
    fn check(&self, headers: &axum::http::HeaderMap) -> Option<(StatusCode, String)> {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")));
        if !json {
            return Some((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the body as Content-Type: application/json".into(),
            ));
        }
        // On a localhost listener without a token, a page whose name was rebound to 127.0.0.1
        // would be same-origin: the request must name a local host, and a browser's Origin
        // must be that host.
        if self.loopback && self.actions.token.is_none() {
            let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
            if !local_host(host) {
                return Some((StatusCode::FORBIDDEN, format!("host `{host}` is not this machine's loopback name")));
            }
            if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
                let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
                if origin_host != host {
                    return Some((StatusCode::FORBIDDEN, format!("origin `{origin}` is not this listener")));
                }
            }
        }
        self.refuse(headers)
    }

    /// None when allowed; else the refusal.
    fn refuse(&self, headers: &axum::http::HeaderMap) -> Option<(StatusCode, String)> {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match (&self.actions.token, given) {
            (Some(t), Some(g)) if constant_time_eq(t.as_bytes(), g.as_bytes()) => {}
            (Some(_), _) => {
                return Some((
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong token (Authorization: Bearer <telemetry.token>)".into(),
                ))
            }
            (None, _) if !self.loopback => {
                return Some((
                    StatusCode::FORBIDDEN,
                    "actions beyond localhost need telemetry.token in the config".into(),
                ))
            }
            (None, _) => {}
        }
        let mut b = self.bucket.lock().expect("rate lock");
        let rate = f64::from(self.actions.per_s.max(1));
        let now = std::time::Instant::now();
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate).min(rate);
        b.1 = now;
        if b.0 < 1.0 {
            return Some((StatusCode::TOO_MANY_REQUESTS, format!("more than {rate} actions per second")));
        }
        b.0 -= 1.0;
        None
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn local_host(host: &str) -> bool {
    let name = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json_error(code: StatusCode, msg: &str) -> axum::response::Response {
    (code, [(header::CONTENT_TYPE, "application/json")], serde_json::json!({ "error": msg }).to_string())
        .into_response()
}

/// `POST /v1/feedback` with a JSON [`Feedback`] (`{"event_id", "label": "normal"|"defect"}`):
/// answers the [`FeedbackResult`] as JSON (200 changed or duplicate, 404 frame no longer held,
/// 409 the product does not learn, 400 a bad body, 401/403 refused, 429 too many).
async fn feedback(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let Some((gate, tx)) = s.actions.as_deref().and_then(|g| Some((g, g.actions.feedback.as_ref()?))) else {
        return json_error(StatusCode::NOT_FOUND, "no product learns from the line (products.<p>.learn)");
    };
    if let Some((code, msg)) = gate.check(&headers) {
        let result = if code == StatusCode::UNSUPPORTED_MEDIA_TYPE { "invalid" } else { "refused" };
        metrics::counter!(m::FEEDBACK, "source" => "http", "result" => result).increment(1);
        return json_error(code, &msg);
    }
    let fb: Feedback = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => {
            metrics::counter!(m::FEEDBACK, "source" => "http", "result" => "invalid").increment(1);
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"event_id\", \"label\": \"normal\"|\"defect\"}}: {e}"),
            );
        }
    };
    if let Some(p) = fb.problem() {
        metrics::counter!(m::FEEDBACK, "source" => "http", "result" => "invalid").increment(1);
        return json_error(StatusCode::BAD_REQUEST, &p);
    }
    let (reply, rx) = tokio::sync::oneshot::channel();
    if tx.send((fb, reply)).await.is_err() {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "the learner has stopped");
    }
    let Ok(Ok(result)) = tokio::time::timeout(Duration::from_secs(60), rx).await else {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "no answer from the learner within 60 s");
    };
    let code = match &result {
        FeedbackResult::Changed { .. } | FeedbackResult::Duplicate => StatusCode::OK,
        FeedbackResult::NotHeld => StatusCode::NOT_FOUND,
        FeedbackResult::LearningOff { .. } => StatusCode::CONFLICT,
        FeedbackResult::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, [(header::CONTENT_TYPE, "application/json")], serde_json::to_string(&result).unwrap_or_default())
        .into_response()
}

/// `POST /v1/frames/{event_id}/ask` with a JSON [`Question`]: answers the [`AskResult`] as JSON
/// (200 answered, 404 frame no longer held or asking off, 429 over the rate or the language
/// model's budget, 400 a bad body, 401/403 refused).
async fn ask(
    State(s): State<AppState>,
    axum::extract::Path(path): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let Some(event_id) = path.strip_suffix("/ask").filter(|e| !e.is_empty()) else {
        return json_error(StatusCode::NOT_FOUND, "expected POST /v1/frames/<event id>/ask");
    };
    let Some((gate, tx)) = s.actions.as_deref().and_then(|g| Some((g, g.actions.ask.as_ref()?))) else {
        return json_error(StatusCode::NOT_FOUND, "asking is off (ask.model in the config)");
    };
    if let Some((code, msg)) = gate.check(&headers) {
        return json_error(code, &msg);
    }
    let q: Question = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("expected {{\"question\", \"history\"?}}: {e}")),
    };
    if let Some(problem) = q.problem() {
        return json_error(StatusCode::BAD_REQUEST, &problem);
    }
    let (reply, rx) = tokio::sync::oneshot::channel();
    match tx.try_send((event_id.to_string(), q, reply)) {
        Ok(()) => {}
        Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
            return json_error(StatusCode::TOO_MANY_REQUESTS, "questions are queued already: ask again shortly")
        }
        Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
            return json_error(StatusCode::SERVICE_UNAVAILABLE, "the asker has stopped (see the log)")
        }
    }
    let Ok(Ok(result)) = tokio::time::timeout(Duration::from_secs(120), rx).await else {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "no answer within 120 s");
    };
    let code = match &result {
        AskResult::Answered { .. } => StatusCode::OK,
        AskResult::NotHeld => StatusCode::NOT_FOUND,
        AskResult::Busy => StatusCode::TOO_MANY_REQUESTS,
        AskResult::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, [(header::CONTENT_TYPE, "application/json")], serde_json::to_string(&result).unwrap_or_default())
        .into_response()
}

/// A stored snapshot, map or overlay: `/evidence/<camera>/<run>/<file>`. Each part must be a
/// safe name (no `..`, no `/`), so nothing outside the folder can be read.
async fn evidence(
    State(s): State<AppState>,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> axum::response::Response {
    let Some(dir) = s.evidence.as_deref() else {
        return (StatusCode::NOT_FOUND, "no publish.store_dir\n").into_response();
    };
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() != 3 || !parts.iter().all(|p| kensa_core::config::safe_name(p)) {
        return (StatusCode::BAD_REQUEST, "expected /evidence/<camera>/<run>/<file>\n").into_response();
    }
    let file = parts.iter().fold(dir.clone(), |d, p| d.join(p));
    let kind = match file.extension().and_then(|e| e.to_str()) {
        Some("png") => "image/png",
        Some("npy") => "application/octet-stream",
        _ => return (StatusCode::NOT_FOUND, "not evidence\n").into_response(),
    };
    match tokio::task::spawn_blocking(move || std::fs::read(file))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    {
        Ok(bytes) => ([(header::CONTENT_TYPE, kind)], bytes).into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "no such file (removed by retention?)\n").into_response(),
    }
}

async fn metrics_page(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.handle.render())
}

async fn livez() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let code = if s.health.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json")], s.health.snapshot().to_string())
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let snap = s.health.snapshot();
    let code = if snap["ready"].as_bool() == Some(true) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json")], snap.to_string())
}

/// Binds the listener (errors here name the address) and serves until `shutdown` resolves.
/// Returns the bound address (port 0 picks a free one).
pub async fn serve(
    addr: &str,
    handle: PrometheusHandle,
    health: Health,
    evidence_dir: Option<std::path::PathBuf>,
    actions: Option<Actions>,
    extra: Option<Router>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), TelemetryError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Bind { addr: addr.to_string(), source })?;
    let local = listener.local_addr().map_err(|source| TelemetryError::Bind { addr: addr.to_string(), source })?;
    let (upkeep, stop) = (handle.clone(), shutdown.clone());
    let upkeep = async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
            }
        }
    };
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/evidence/{*path}", get(evidence))
        .route("/v1/feedback", axum::routing::post(feedback))
        .route("/v1/frames/{*path}", axum::routing::post(ask))
        .with_state(AppState {
            handle,
            health,
            evidence: evidence_dir.map(Arc::new),
            actions: actions.map(|a| {
                let burst = f64::from(a.per_s.max(1));
                Arc::new(ActionGate {
                    actions: a,
                    loopback: local.ip().is_loopback(),
                    bucket: Mutex::new((burst, std::time::Instant::now())),
                })
            }),
        });
    let app = match extra {
        Some(more) => app.merge(more),
        None => app,
    };
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        let (served, ()) = tokio::join!(serve, upkeep);
        if let Err(e) = served {
            tracing::error!("metrics listener stopped: {e}");
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::local_host;

    #[test]
    fn only_loopback_names_are_local() {
        for h in ["localhost:9898", "127.0.0.1:9898", "127.0.0.1", "[::1]:9898", "LOCALHOST"] {
            assert!(local_host(h), "{h}");
        }
        for h in ["evil.example:9898", "10.0.0.5:9898", "", "localhost.evil.example"] {
            assert!(!local_host(h), "{h}");
        }
    }
}
