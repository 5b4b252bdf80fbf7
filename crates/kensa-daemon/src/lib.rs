//! The Kensa daemon as a library: [`run`] takes a config and a shutdown future and runs the
//! inspection pipeline until the future resolves (or, with [`RunOptions::exit_when_done`],
//! until every finite camera has ended and every event is delivered).
//!
//! # Layout
//! One linear stage graph, each stage in the crate that owns its job, each edge a bounded
//! channel:
//!
//! ```text
//! cameras (kensa-capture, GStreamer threads)
//!   → frames (mpsc, batch.queue; a camera's policy: block or drop)
//!   → batcher (here: groups frames by the product the lineup gives their camera)
//!   → model (model.rs: one OS thread, tensors only, driven through a ModelHandle)
//!   → verdict stage (verdict.rs: judges, masks, evidence, the event; its own OS thread)
//!   → delivery (kensa-publish: spooler → durable outbox → sender → Kafka)
//! ```
//!
//! - [`model`]: the model thread and its handle (score, swap a bank).
//! - [`asking`]: questions about held frames, answered by the instruction model.
//! - [`verdict`]: the verdict/events stage.
//! - [`evidence`]: snapshots, maps and overlays on disk (names unique per run), and retention.
//! - [`lineup`]: the one owner of camera → product assignments.
//! - [`reload`]: bank files polled, SIGHUP, the control topic.
//! - [`parts`]: part ids announced on the control topic, given to the camera's next frame.
//!
//! Shutdown: the shutdown future resolves → cameras get end-of-stream → the frame channel
//! closes → the batcher flushes its partial batch → the model drains → the verdict stage
//! drains → delivery waits for every acknowledgement (bounded by `publish.drain_timeout_s`) →
//! background tasks are cancelled; the whole drain runs under one deadline.

pub mod asking;
pub mod evidence;
pub mod learning;
pub mod lineup;
pub mod model;
pub mod parts;
pub mod reload;
pub mod verdict;

use kensa_core::config::{JudgeMode, KensaConfig};
use kensa_core::metrics::{self as m, CameraState, Label, Stage};
use kensa_core::Frame;
use kensa_publish::delivery::{self, Scored};
use kensa_publish::outbox::Outbox;
use kensa_publish::Publisher;
use kensa_telemetry::Health;
use lineup::Lineup;
use model::{Group, ModelHandle};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use verdict::{ScoredBatch, VerdictStage};

/// Why the daemon could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] kensa_model::ModelError),
    #[error(transparent)]
    Lm(#[from] kensa_lm::LmError),
    #[error(transparent)]
    Publish(#[from] kensa_publish::PublishError),
    #[error(transparent)]
    Telemetry(#[from] kensa_telemetry::TelemetryError),
    #[error("the model thread has stopped")]
    ModelStopped,
    #[error("{stage}: {msg}")]
    Stage { stage: &'static str, msg: String },
}

/// How [`run`] behaves beyond the config.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Stop once every camera has ended and every event is acknowledged (finite sources).
    pub exit_when_done: bool,
    /// Longest the orderly shutdown may take.
    pub shutdown_deadline: Duration,
    /// The config file: SIGHUP reads it again (hot reload). None: no SIGHUP handling.
    pub config_path: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { exit_when_done: false, shutdown_deadline: Duration::from_secs(30), config_path: None }
    }
}

/// How a run ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Cameras that failed (at start or later).
    pub camera_failures: usize,
    /// Events refused by the outbox budget: lost, and counted.
    pub events_dropped: u64,
    /// Events still spooled at exit (sent at the next start).
    pub events_spooled: u64,
    /// The orderly shutdown did not finish within the deadline; stages may still be running.
    pub deadline_passed: bool,
}

/// Runs the daemon until `shutdown` resolves (or until done, see [`RunOptions`]).
pub async fn run(
    cfg: KensaConfig,
    opts: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, DaemonError> {
    let handle = kensa_telemetry::install_recorder()?;
    let health = Health::default();
    let token = CancellationToken::new();
    let mut background = JoinSet::new();

    // Model first: a bad backbone or bank fails start-up. The run id is in every event id
    // (the learner holds frames by it).
    let run_id = format!("{:x}", kensa_publish::event::unix_nanos(SystemTime::now()));
    let model_failed = CancellationToken::new();
    let (model, info, model_thread) = model::start(&cfg, &run_id, model_failed.clone()).await?;
    tracing::info!(model = %info.description, "model loaded");
    metrics::gauge!(m::MODEL_INFO, "model" => info.description.clone(), "precision" => info.precision).set(1.0);
    for (product, b) in &info.banks {
        tracing::info!(product = %product, bank_version = %b.version, "bank loaded");
        metrics::gauge!(m::BANK_INFO, "product" => product.clone(), "version" => b.version.clone()).set(1.0);
    }
    let judges = load_judges(&cfg, &info)?;

    let outbox = Outbox::open(&cfg.outbox.dir, cfg.outbox.max_bytes)?;
    tracing::info!(dir = %cfg.outbox.dir.display(), pending = outbox.pending(), "outbox open");
    let publisher = Publisher::connect(&cfg.kafka).await?;
    health.set_broker(true);
    background.spawn(watch_broker(publisher.clone(), health.clone(), token.clone()));
    let evidence_dir = cfg.publish.store_dir.clone();
    // Operator answers (HTTP and the feedback topic) go to the learner on the model thread.
    let learns = cfg.products.values().any(|p| p.learn != kensa_core::config::LearnMode::Off);
    let feedback = learns.then(|| {
        let (tx, rx) = mpsc::channel::<kensa_telemetry::FeedbackRequest>(64);
        background.spawn(until(token.clone(), learning_answers(rx, model.clone())));
        tx
    });
    // The console holds the frames that questions are about.
    let board =
        cfg.console.enabled.then(|| kensa_console::Board::new(cfg.cameras.iter().map(|c| c.id.as_str()), &cfg.console));
    let lm_budget = verdict::Budget::new(cfg.judges.budget_per_s);
    // The chat model loads off the runtime (reading and dequantizing a GGUF takes seconds).
    let ask = {
        let (c, b, budget) = (cfg.clone(), board.clone(), lm_budget.clone());
        tokio::task::spawn_blocking(move || asking::start(&c, b.as_ref(), budget))
            .await
            .map_err(|e| DaemonError::Stage { stage: "ask", msg: e.to_string() })??
    };
    let actions = (feedback.is_some() || ask.is_some()).then(|| kensa_telemetry::Actions {
        feedback: feedback.clone(),
        ask: ask.clone(),
        token: cfg.telemetry.token.clone(),
        per_s: cfg.telemetry.actions_per_s,
    });
    if let (Some(fb), Some(topic)) = (&feedback, cfg.kafka.feedback_topic.clone()) {
        if cfg.kafka.create_topics {
            if let Err(e) = kensa_publish::ensure_topics(&cfg.kafka, &[&topic]).await {
                tracing::error!("{e}");
            }
        }
        background.spawn(until(token.clone(), kensa_publish::feedback::consume(cfg.kafka.clone(), topic, fb.clone())));
    }
    let console = board.clone().map(|b| console_routes(&cfg, b, &health, ask.is_some(), token.clone()));
    let (addr, http) = kensa_telemetry::serve(
        &cfg.telemetry.listen,
        handle,
        health.clone(),
        evidence_dir,
        actions,
        console,
        token.clone(),
    )
    .await?;
    if cfg.publish.store_dir.is_some() {
        background.spawn(until(token.clone(), evidence::retention(cfg.publish.clone(), Duration::from_secs(60))));
    }
    tracing::info!("metrics on http://{addr}/metrics, health on http://{addr}/healthz");
    if board.is_some() {
        tracing::info!("operator console on http://{addr}/console");
    }

    // Capture.
    let (frame_tx, frame_rx) = mpsc::channel::<Frame>(cfg.batch.queue);
    let (cameras, start_failures) = start_cameras(&cfg, &frame_tx, &health);
    let stoppers: Vec<_> = cameras.iter().map(kensa_capture::Camera::stopper).collect();
    let (scored_tx, scored_rx) = mpsc::channel::<ScoredBatch>(1);
    let (events_tx, events_rx) = mpsc::channel::<Scored>(256);
    background.spawn(sample_depths(
        [
            (Stage::Capture, frame_tx.downgrade().into()),
            (Stage::Scored, scored_tx.downgrade().into()),
            (Stage::Publish, events_tx.downgrade().into()),
        ],
        token.clone(),
    ));
    drop(frame_tx);
    health.set_ready(true);
    let capture_done = CancellationToken::new();
    let cams_done = tokio::task::spawn_blocking({
        let health = health.clone();
        move || join_cameras(cameras, &health)
    });

    // Reload: bank files, SIGHUP, the control topic.
    let products: Vec<&str> = info.banks.keys().map(String::as_str).collect();
    let lineup = Lineup::from_config(&cfg).keep_changeovers(&cfg.outbox.dir.join("changeovers.json"), &products);
    let parts = parts::PartIds::default();
    let reloader = reload::Reloader::new(&cfg, info.loader.clone(), model.clone(), lineup.clone(), parts.clone());
    if cfg.model.bank_poll_s > 0 {
        let every = Duration::from_secs(cfg.model.bank_poll_s);
        background.spawn(until(token.clone(), reload::watch_files(reloader.clone(), every)));
    }
    if let Some(path) = opts.config_path.clone() {
        background.spawn(until(token.clone(), reload::on_sighup(path, reloader.clone())));
    }
    if let Some(topic) = cfg.kafka.control_topic.clone() {
        if cfg.kafka.create_topics {
            if let Err(e) = kensa_publish::ensure_topics(&cfg.kafka, &[&topic]).await {
                tracing::error!("{e}");
            }
        }
        background.spawn(until(token.clone(), reload::control_topic(cfg.kafka.clone(), topic, reloader.clone())));
    }
    drop(reloader);

    // Batcher → model → verdict stage → delivery.
    let max_size = cfg.batch.effective_max_size(info.device.is_cuda());
    tracing::info!(max_size, "batching");
    let with_judge: HashSet<String> =
        if cfg.judges.mode == JudgeMode::Calibrated { HashSet::new() } else { judges.keys().cloned().collect() };
    let mut batcher = tokio::spawn(batcher(
        frame_rx,
        model.clone(),
        (lineup, parts),
        with_judge,
        scored_tx,
        (max_size, Duration::from_millis(cfg.batch.max_wait_ms)),
        capture_done.clone(),
    ));
    drop(model);
    let stage = VerdictStage::new(&cfg, info.model_id.clone(), run_id, judges, health.clone(), (board, lm_budget));
    let mut verdicts = tokio::task::spawn_blocking(move || stage.run(scored_rx, &events_tx));
    let settings = delivery::Settings::from_config(&cfg.kafka, &cfg.publish);
    let stopping = CancellationToken::new();
    let (backlog_tx, backlog) = tokio::sync::watch::channel(delivery::Backlog::default());
    background.spawn(until(token.clone(), report_backlog(backlog, health.clone())));
    let mut delivery =
        tokio::spawn(delivery::run(publisher, outbox, events_rx, settings, stopping.clone(), backlog_tx));

    // Wait for a reason to stop.
    tokio::pin!(shutdown);
    let mut cams_done = cams_done;
    let mut camera_failures = None;
    let mut delivered = None;
    let mut batched = None;
    let mut judged = false;
    let mut delivery_failed = false;
    // A stage that ended by failing (a panic, the model gone): nothing is inspected any more,
    // so the daemon stops, not ready, and returns it (a supervisor restarts it).
    let mut failure: Option<DaemonError> = None;
    let stage_failed =
        |stage: &'static str, e: &tokio::task::JoinError| DaemonError::Stage { stage, msg: e.to_string() };
    loop {
        tokio::select! {
            () = &mut shutdown => { tracing::info!("shutting down"); break; }
            () = model_failed.cancelled() => {
                failure = Some(DaemonError::Stage { stage: "model", msg: "the model stage failed (see above)".into() });
                break;
            }
            r = &mut verdicts, if !judged => {
                // It ends before the shutdown when its input ended (every camera done), or when
                // it panicked.
                judged = true;
                if let Err(e) = r {
                    failure = Some(stage_failed("verdict", &e));
                    break;
                }
            }
            r = &mut batcher, if batched.is_none() => {
                match r.unwrap_or_else(|e| Err(stage_failed("batcher", &e))) {
                    Ok(()) => batched = Some(()),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            r = &mut cams_done, if camera_failures.is_none() => {
                let failed = r.unwrap_or(0);
                camera_failures = Some(failed);
                capture_done.cancel();
                tracing::info!(failed, "all cameras have ended");
            }
            r = &mut delivery, if delivered.is_none() => {
                match r {
                    Ok(d) => {
                        delivered = Some(d);
                        tracing::info!("all frames scored and published");
                        if opts.exit_when_done { break; }
                    }
                    Err(e) => {
                        failure = Some(stage_failed("delivery", &e));
                        delivery_failed = true;
                        break;
                    }
                }
            }
        }
    }
    if let Some(e) = &failure {
        tracing::error!("{e}; inspection cannot go on: stopping");
        health.set_ready(false);
    }

    // Orderly shutdown under one deadline: capture, then each stage as its input closes.
    stopping.cancel();
    for s in &stoppers {
        s.stop();
    }
    let drain = async {
        let failed = match camera_failures {
            Some(f) => f,
            None => cams_done.await.unwrap_or(0),
        };
        capture_done.cancel();
        let batched = match batched {
            Some(()) => Ok(()),
            None if failure.is_some() => Ok(()),
            None => batcher.await.unwrap_or_else(|e| Err(stage_failed("batcher", &e))),
        };
        // A stage that fails while draining fails the run as much as one that fails before.
        let mut late = None;
        if !judged {
            if let Err(e) = verdicts.await {
                late = Some(stage_failed("verdict", &e));
            }
        }
        let summary = match delivered {
            Some(s) => s,
            // Ended by failing: its handle is spent (and what it spooled stays in the outbox).
            None if delivery_failed => delivery::Summary::default(),
            None => delivery.await.unwrap_or_else(|e| {
                late = late.take().or_else(|| Some(stage_failed("delivery", &e)));
                delivery::Summary::default()
            }),
        };
        (failed, batched, summary, late)
    };
    let Ok((failed, batched, delivered, late)) = tokio::time::timeout(opts.shutdown_deadline, drain).await else {
        tracing::error!("shutdown did not finish within {}s", opts.shutdown_deadline.as_secs());
        token.cancel();
        return match failure {
            Some(e) => Err(e),
            None => Ok(Summary { deadline_passed: true, camera_failures: start_failures, ..Summary::default() }),
        };
    };
    token.cancel();
    while background.join_next().await.is_some() {}
    // The listener waits for requests in flight (a question, a picture): not beyond a few seconds.
    let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
    let _ = tokio::task::spawn_blocking(move || model_thread.join()).await;
    if let Some(e) = &late {
        tracing::error!("{e}, while stopping");
    }
    if let Some(e) = failure.or(late) {
        return Err(e);
    }
    batched?;
    let summary = Summary {
        camera_failures: failed + start_failures,
        events_dropped: delivered.dropped,
        events_spooled: delivered.remaining,
        deadline_passed: false,
    };
    if summary.events_spooled > 0 {
        tracing::warn!(
            events = summary.events_spooled,
            dir = %cfg.outbox.dir.display(),
            "events not yet acknowledged by Kafka stay in the outbox and are sent at the next start"
        );
    }
    if summary.events_dropped > 0 {
        tracing::error!(events = summary.events_dropped, "events were dropped because the outbox was over its budget");
    }
    tracing::info!(
        camera_failures = summary.camera_failures,
        events_dropped = summary.events_dropped,
        events_spooled = summary.events_spooled,
        "stopped"
    );
    Ok(summary)
}

/// The operator console's routes: its products, whether actions (answers, questions) are
/// taken on this listener (none beyond localhost without a token), and whether it asks.
fn console_routes(
    cfg: &KensaConfig,
    board: kensa_console::Board,
    health: &Health,
    asks: bool,
    stop: CancellationToken,
) -> axum::Router {
    let products = cfg
        .products
        .iter()
        .map(|(name, p)| kensa_console::Products {
            name: name.clone(),
            bank: p.bank.clone(),
            learns: p.learn != kensa_core::config::LearnMode::Off,
        })
        .collect();
    let loopback = cfg.telemetry.listen.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback());
    let token = cfg.telemetry.token.is_some();
    let actions = (loopback || token).then_some(token);
    let access = kensa_console::Access { actions, asks };
    kensa_console::router(board, health.clone(), products, (access, cfg.console.push_hz), stop)
}

/// Keeps `/healthz`'s outbox backlog current.
async fn report_backlog(mut backlog: tokio::sync::watch::Receiver<delivery::Backlog>, health: Health) {
    loop {
        let b = *backlog.borrow_and_update();
        health.set_outbox(serde_json::to_value(b).unwrap_or_default());
        if backlog.changed().await.is_err() {
            return;
        }
    }
}

/// Runs `f` until it ends or `token` is cancelled.
async fn until(token: CancellationToken, f: impl Future<Output = ()>) {
    tokio::select! {
        () = token.cancelled() => {}
        () = f => {}
    }
}

/// The language-model judges of the products that have one (`products.NAME.judge`), each
/// checked against its product's bank and the backbone.
fn load_judges(
    cfg: &KensaConfig,
    info: &model::ModelInfo,
) -> Result<HashMap<String, kensa_lm::judge::LmJudge>, DaemonError> {
    let mut out = HashMap::new();
    for (name, p) in &cfg.products {
        let Some(file) = &p.judge else { continue };
        let Some(version) = info.banks.get(name).map(|b| b.version.as_str()) else {
            tracing::warn!(product = %name, "its bank is not made yet, so its language-model judge is not loaded");
            continue;
        };
        let j = kensa_lm::judging::load_judge(file, version, info.feature_dim, info.device)
            .map_err(|e| DaemonError::Config(format!("products.{name}.judge: {e}")))?;
        tracing::info!(product = %name, judge = %file.display(), "language-model judge loaded");
        out.insert(name.clone(), j);
    }
    Ok(out)
}

/// Forms batches when the model is free (a slot downstream is reserved first, so exactly one
/// batch is ever waiting for the verdict stage), groups them by product, and scores them.
async fn batcher(
    mut frames: mpsc::Receiver<Frame>,
    model: ModelHandle,
    (lineup, parts): (Lineup, parts::PartIds),
    with_judge: HashSet<String>,
    out: mpsc::Sender<ScoredBatch>,
    (max_size, max_wait): (usize, Duration),
    capture_done: CancellationToken,
) -> Result<(), DaemonError> {
    loop {
        let Ok(slot) = out.reserve().await else { return Ok(()) };
        // The input ends when every camera's sender is gone, or (should a pipeline's callback
        // still hold one) once every camera thread has ended and the queue is empty.
        let first = tokio::select! {
            f = frames.recv() => f,
            () = capture_done.cancelled() => frames.try_recv().ok(),
        };
        let Some(first) = first else { return Ok(()) };
        let batch = kensa_core::batch::fill_batch(first, &mut frames, max_size, max_wait).await;
        let formed_at = Instant::now();
        let mut groups: Vec<Group> = Vec::new();
        for mut f in batch {
            parts.label(&mut f);
            let Some(product) = lineup.product_of(&f.camera) else {
                tracing::error!(camera = %f.camera, "frame from a camera the lineup does not know; dropped");
                continue;
            };
            match groups.iter_mut().find(|g| g.product == product) {
                Some(g) => g.frames.push(f),
                None => {
                    let judge_features = with_judge.contains(&*product);
                    groups.push(Group { product, frames: vec![f], judge_features });
                }
            }
        }
        match model.score(groups).await {
            Ok(groups) => slot.send(ScoredBatch { groups, formed_at }),
            Err(e) => {
                tracing::error!("{e}; inspection cannot go on");
                return Err(e);
            }
        }
    }
}

fn start_cameras(
    cfg: &KensaConfig,
    frames: &mpsc::Sender<Frame>,
    health: &Health,
) -> (Vec<kensa_capture::Camera>, usize) {
    let mut cameras = Vec::new();
    let mut failures = 0;
    for cam in &cfg.cameras {
        let h = health.clone();
        let on_state: kensa_capture::StateFn = Arc::new(move |id, state, detail| h.set_camera(id, state, detail));
        match kensa_capture::start(cam, frames.clone(), on_state) {
            Ok(c) => {
                tracing::info!(camera = %cam.id, source = cam.source.kind(), "camera started");
                cameras.push(c);
            }
            Err(e) => {
                failures += 1;
                health.set_camera(&cam.id, CameraState::Failed, e.to_string());
                metrics::counter!(m::CAMERA_ERRORS, "camera" => cam.id.clone()).increment(1);
                tracing::error!(camera = %cam.id, "{e}");
            }
        }
    }
    (cameras, failures)
}

/// Waits for every camera's thread; returns how many failed.
fn join_cameras(cameras: Vec<kensa_capture::Camera>, health: &Health) -> usize {
    let mut failed = 0;
    for c in cameras {
        let id = c.id.clone();
        match c.join() {
            kensa_capture::Outcome::Ended { frames } => {
                health.set_camera(&id, CameraState::Ended, format!("after {frames} frames"));
            }
            kensa_capture::Outcome::Failed { frames, reason } => {
                failed += 1;
                health.set_camera(&id, CameraState::Failed, format!("after {frames} frames: {reason}"));
            }
        }
    }
    failed
}

/// Readiness follows the broker: a metadata request every 5 s.
async fn watch_broker(p: Publisher, h: Health, token: CancellationToken) {
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let p = p.clone();
        let ok = tokio::task::spawn_blocking(move || p.reachable(Duration::from_secs(3))).await.unwrap_or(false);
        h.set_broker(ok);
    }
}

/// A queue whose depth is sampled: a weak sender (the queue may close meanwhile).
enum Probe {
    Frames(mpsc::WeakSender<Frame>),
    Batches(mpsc::WeakSender<ScoredBatch>),
    Events(mpsc::WeakSender<Scored>),
}

impl From<mpsc::WeakSender<Frame>> for Probe {
    fn from(w: mpsc::WeakSender<Frame>) -> Self {
        Probe::Frames(w)
    }
}
impl From<mpsc::WeakSender<ScoredBatch>> for Probe {
    fn from(w: mpsc::WeakSender<ScoredBatch>) -> Self {
        Probe::Batches(w)
    }
}
impl From<mpsc::WeakSender<Scored>> for Probe {
    fn from(w: mpsc::WeakSender<Scored>) -> Self {
        Probe::Events(w)
    }
}

impl Probe {
    fn depth(&self) -> usize {
        fn d<T>(w: &mpsc::WeakSender<T>) -> usize {
            w.upgrade().map_or(0, |t| t.max_capacity() - t.capacity())
        }
        match self {
            Probe::Frames(w) => d(w),
            Probe::Batches(w) => d(w),
            Probe::Events(w) => d(w),
        }
    }
}

/// Samples each queue's depth once a second.
async fn sample_depths(queues: [(Stage, Probe); 3], token: CancellationToken) {
    loop {
        for (stage, q) in &queues {
            metrics::gauge!(m::QUEUE_DEPTH, "stage" => stage.as_str()).set(q.depth() as f64);
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Hands operator answers to the learner on the model thread, one at a time, and counts them.
async fn learning_answers(mut rx: mpsc::Receiver<kensa_telemetry::FeedbackRequest>, model: ModelHandle) {
    while let Some((fb, reply)) = rx.recv().await {
        let result = match model.feedback(fb).await {
            Ok(r) => r,
            Err(e) => kensa_core::feedback::FeedbackResult::Failed { reason: e.to_string() },
        };
        metrics::counter!(m::FEEDBACK, "source" => "any", "result" => result.as_str()).increment(1);
        let _ = reply.send(result);
    }
}
