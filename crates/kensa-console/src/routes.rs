//! The console's routes, merged into the telemetry listener:
//!
//! | route | what |
//! |---|---|
//! | `GET /console` | live view: a tile per camera |
//! | `GET /console/live` | the tiles as Server-Sent Events, at most `console.push_hz` per viewer |
//! | `GET /console/defects?camera=&product=` | recent anomalous frames |
//! | `GET /console/defect?id=EVENT` | one held frame in full, with the answer buttons |
//! | `GET /console/products` | each product's bank, references, decision and versions |
//! | `GET /console/picture?id=EVENT&kind=thumb\|tile\|image\|overlay\|map` | a JPEG |
//! | `GET /console/assets/console.{css,js}` | the stylesheet and script |

use crate::board::Board;
use crate::pages::{self, Answering, Filter, ProductView};
use crate::render::{self, Picture};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A product as the console needs it from the config.
#[derive(Clone, Debug)]
pub struct Products {
    pub name: String,
    pub bank: PathBuf,
    /// `products.NAME.learn` is not off: answers are taken.
    pub learns: bool,
}

/// What the pages may offer on this listener.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    /// None: actions are refused here (it listens beyond localhost without a token); else
    /// whether they need the token.
    pub actions: Option<bool>,
    /// Questions about frames are answered (`ask.model`).
    pub asks: bool,
}

#[derive(Clone)]
struct Ctx {
    board: Board,
    health: kensa_telemetry::Health,
    products: Arc<Vec<Products>>,
    access: Access,
    push_every: Duration,
    renderer: render::Renderer,
    /// The products view, kept while no bank file or version folder changes; one reads them
    /// at a time (a bank can be large: every request must not load every bank again).
    products_view: Arc<tokio::sync::Mutex<Option<(Vec<Option<std::time::SystemTime>>, Arc<Vec<ProductView>>)>>>,
    /// Ends the live streams (the listener's graceful shutdown waits for open connections).
    stop: tokio_util::sync::CancellationToken,
}

/// The console's routes; `stop` ends the live streams.
pub fn router(
    board: Board,
    health: kensa_telemetry::Health,
    products: Vec<Products>,
    (access, push_hz): (Access, f64),
    stop: tokio_util::sync::CancellationToken,
) -> Router {
    let ctx = Ctx {
        board,
        health,
        products: Arc::new(products),
        access,
        push_every: Duration::from_secs_f64(1.0 / push_hz.clamp(0.1, 30.0)),
        stop,
        renderer: render::Renderer::start(16),
        products_view: Arc::new(tokio::sync::Mutex::new(None)),
    };
    Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(live))
        .route("/console/live", get(live_stream))
        .route("/console/defects", get(defects))
        .route("/console/defect", get(detail))
        .route("/console/products", get(products_page))
        .route("/console/picture", get(picture))
        .route("/console/assets/console.css", get(|| async { asset("text/css", CSS) }))
        .route("/console/assets/console.js", get(|| async { asset("text/javascript", JS) }))
        .with_state(ctx)
}

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

/// A page: never cached, never framed by another site (no clickjacking of the buttons), and
/// loading nothing but the console's own assets and pictures.
fn html(page: String) -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
            ),
        ],
        Html(page),
    )
        .into_response()
}

fn states(health: &kensa_telemetry::Health) -> BTreeMap<String, (String, String)> {
    health.cameras().into_iter().map(|(id, c)| (id, (c.state.to_string(), c.detail))).collect()
}

async fn live(State(c): State<Ctx>) -> Response {
    html(pages::live(&c.board.tiles(&states(&c.health))))
}

/// The tiles as JSON events: one at once, then one after each push, but never more often than
/// `push_every` (frames in between are coalesced), and at least every 2 s (states and rates).
async fn live_stream(State(c): State<Ctx>) -> impl IntoResponse {
    let rx = c.board.subscribe();
    let stream = futures_util::stream::unfold((c, rx, true), |(c, mut rx, first)| async move {
        if !first {
            let wait = async {
                tokio::time::sleep(c.push_every).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
            };
            tokio::select! {
                () = c.stop.cancelled() => return None,
                () = wait => {}
            }
        }
        rx.borrow_and_update();
        let tiles = c.board.tiles(&states(&c.health));
        let ev = Event::default().event("tiles").data(serde_json::to_string(&tiles).unwrap_or_else(|_| "[]".into()));
        Some((Ok::<_, std::convert::Infallible>(ev), (c, rx, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(serde::Deserialize)]
struct GalleryQuery {
    camera: Option<String>,
    product: Option<String>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|v| !v.is_empty())
}

async fn defects(State(c): State<Ctx>, Query(q): Query<GalleryQuery>) -> Response {
    let (camera, product) = (nonempty(&q.camera), nonempty(&q.product));
    let shots = c.board.defects(camera, product);
    let cameras: Vec<String> = c.board.tiles(&BTreeMap::new()).into_iter().map(|t| t.camera).collect();
    let products: Vec<String> = c.products.iter().map(|p| p.name.clone()).collect();
    html(pages::defects(&shots, &Filter { cameras: &cameras, products: &products, camera, product }))
}

#[derive(serde::Deserialize)]
struct ShotQuery {
    id: String,
    kind: Option<String>,
}

fn gone(id: &str) -> Response {
    let body = pages::layout(
        "Not held",
        "Defects",
        &format!(
            "<h1>Not held</h1><p class=\"note\">Frame {} is no longer held by the console (the newest frames of each camera \
             and the newest defects are kept: console.frames_per_camera, console.defects).</p>",
            pages::esc(id)
        ),
    );
    (StatusCode::NOT_FOUND, Html(body)).into_response()
}

async fn detail(State(c): State<Ctx>, Query(q): Query<ShotQuery>) -> Response {
    let Some(shot) = c.board.find(&q.id) else { return gone(&q.id) };
    let learns = c.products.iter().any(|p| p.name == shot.product && p.learns);
    let answering = match (learns, c.access.actions) {
        (false, _) => Answering::Off,
        (true, None) => Answering::Refused,
        (true, Some(token)) => Answering::On { token },
    };
    let asking = match c.access.actions {
        Some(token) if c.access.asks => Some(token),
        _ => None,
    };
    html(pages::detail(&shot, &answering, asking))
}

async fn picture(State(c): State<Ctx>, Query(q): Query<ShotQuery>) -> Response {
    let which: Picture = match q.kind.as_deref().unwrap_or("tile").parse() {
        Ok(w) => w,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let Some(shot) = c.board.find(&q.id) else {
        return (StatusCode::NOT_FOUND, "no longer held\n").into_response();
    };
    match tokio::time::timeout(Duration::from_secs(30), c.renderer.draw(shot, which)).await {
        Ok(Ok(bytes)) => (
            [(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "private, max-age=3600")],
            bytes.as_ref().clone(),
        )
            .into_response(),
        Ok(Err(render::Refused::Busy)) | Err(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], "the console is drawing other pictures\n")
                .into_response()
        }
        Ok(Err(render::Refused::Failed)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "this picture cannot be drawn (see the log)\n").into_response()
        }
        Ok(Err(render::Refused::Stopped)) => {
            (StatusCode::SERVICE_UNAVAILABLE, "the console's picture thread has stopped (see the log)\n")
                .into_response()
        }
    }
}

async fn products_page(State(c): State<Ctx>) -> Response {
    // One reader at a time; the others wait for its result.
    let mut cached = c.products_view.lock().await;
    let list = c.products.clone();
    let stamps = tokio::task::spawn_blocking(move || list.iter().flat_map(stamps_of).collect::<Vec<_>>()).await;
    let Ok(stamps) = stamps else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "cannot read the bank files\n").into_response();
    };
    if let Some((at, views)) = cached.as_ref() {
        if *at == stamps {
            return html(pages::products(views));
        }
    }
    let list = c.products.clone();
    match tokio::task::spawn_blocking(move || list.iter().map(product_view).collect::<Vec<_>>()).await {
        Ok(v) => {
            let v = Arc::new(v);
            *cached = Some((stamps, v.clone()));
            html(pages::products(&v))
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// When a product's bank file and its versions folder last changed (None: absent).
fn stamps_of(p: &Products) -> [Option<std::time::SystemTime>; 2] {
    let modified = |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    [modified(&p.bank), modified(&kensa_model::versions::dir_of(&p.bank))]
}

/// A product's bank metadata and versions, read from its file now (a missing or unreadable
/// bank is shown as such, never an error page).
fn product_view(p: &Products) -> ProductView {
    let bank = p.bank.display().to_string();
    let meta = if p.bank.exists() {
        kensa_model::bank::Bank::load_unchecked(&p.bank, tch::Device::Cpu)
            .map(|b| b.meta)
            .map_err(|e| crate::ConsoleError::Bank { product: p.name.clone(), msg: e.to_string() }.to_string())
    } else {
        Err(format!("no bank yet at {bank}: commission the product (kensa capture, then kensa enroll)"))
    };
    let versions = if meta.is_ok() { kensa_model::versions::log(&p.bank).unwrap_or_default() } else { Vec::new() };
    ProductView { name: p.name.clone(), bank, learns: p.learns, meta, versions }
}
