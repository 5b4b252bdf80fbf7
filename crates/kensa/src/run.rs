//! `kensa run`: the daemon's wiring.
//!
//! cameras (GStreamer threads) → bounded frame queue → batcher (tokio) → model thread (tch, one
//! OS thread) → verdict → publisher (rdkafka, bounded in-flight) → Kafka; metrics and health on
//! their own listener. Shutdown (SIGINT/SIGTERM, `--max-runtime-s`, or all cameras done with
//! `--exit-when-done`): cameras get end-of-stream → queues close → the partial batch is flushed →
//! the model drains → every event is acknowledged → exit, under a hard deadline.

use anyhow::{Context, Result};
use clap::Args;
use kensa_core::config::KensaConfig;
use kensa_core::metrics as m;
use kensa_core::Frame;
use kensa_model::bank::Bank;
use kensa_model::engine::Engine;
use crate::deliver::{self, Scored};
use crate::reload::{self, Control, Work};
use kensa_core::config::StoreWhich;
use kensa_publish::outbox::Outbox;
use kensa_publish::{cell_to_proto, proto, InspectionEvent, Publisher};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

#[derive(Args)]
pub struct RunArgs {
    /// Config file (TOML); `KENSA__SECTION__KEY` environment variables override it.
    #[arg(long)]
    config: PathBuf,
    /// Exit once every camera has ended and every event is acknowledged (finite sources).
    #[arg(long)]
    exit_when_done: bool,
    /// Stop by itself after this many seconds (as if sent SIGTERM).
    #[arg(long)]
    max_runtime_s: Option<u64>,
    /// Longest an orderly shutdown may take before Kensa exits anyway.
    #[arg(long, default_value_t = 30)]
    shutdown_deadline_s: u64,
}

pub fn main(a: RunArgs) -> Result<ExitCode> {
    let cfg = KensaConfig::load(&a.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("kensa-rt")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run(cfg, a))
}

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

async fn run(cfg: KensaConfig, a: RunArgs) -> Result<ExitCode> {
    let handle = kensa_telemetry::install_recorder()?;
    let health = kensa_telemetry::Health::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Model thread: loads the backbone and banks first, so a bad bank fails start-up.
    let (batch_tx, mut batch_rx) = mpsc::channel::<Work>(1);
    // Pull-based batching: the batcher forms a batch only when the model thread is free (one
    // permit per free model), from every frame queued by then. Under light load a frame goes
    // to the model at once; under heavy load batches fill up by themselves.
    let model_free = Arc::new(tokio::sync::Semaphore::new(1));
    let model_free_m = model_free.clone();
    let (scored_tx, scored_rx) = mpsc::channel::<Scored>(256);
    let scored_tx_probe = scored_tx.downgrade();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(String, Vec<(String, String)>, reload::Loader)>>();
    let model_cfg = cfg.clone();
    let model_thread = std::thread::Builder::new().name("kensa-model".into()).spawn(move || {
        let setup = (|| -> Result<(Engine, HashMap<String, Bank>)> {
            if model_cfg.model.threads > 0 {
                tch::set_num_threads(model_cfg.model.threads as i32);
            }
            let m = &model_cfg.model;
            let backbone = crate::commands::load_backbone(m.backbone.as_deref(), &m.device, &m.precision)?;
            let (device, kind) = (backbone.device, backbone.kind);
            let mut banks = HashMap::new();
            for (name, p) in &model_cfg.products {
                let bank = Bank::load(&p.bank, &backbone.meta, model_cfg.model.input_size, device)?.cast(kind);
                banks.insert(name.clone(), bank);
            }
            Ok((Engine::new(backbone, model_cfg.model.input_size), banks))
        })();
        let setup = setup.and_then(|(engine, banks)| {
            let judges = load_judges(&model_cfg, &engine)?;
            Ok((engine, banks, judges))
        });
        let (engine, banks, judges) = match setup {
            Ok(v) => v,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let model_id = format!("{}@{}", engine.backbone.meta.name, engine.backbone.meta.weights);
        let versions = banks.iter().map(|(k, b)| (k.clone(), b.meta.version())).collect();
        let loader = reload::Loader {
            backbone: engine.backbone.meta.clone(),
            input_size: model_cfg.model.input_size,
            device: engine.device(),
            kind: engine.backbone.kind,
        };
        let _ = ready_tx.send(Ok((format!("{model_id} on {:?} ({:?})", engine.device(), engine.backbone.kind), versions, loader)));
        let ctx = ModelCtx {
            model_id,
            cameras: model_cfg.cameras.iter().map(|c| (c.id.clone(), (c.line.clone(), c.station.clone()))).collect(),
            publish: model_cfg.publish.clone(),
            judges: model_cfg.judges.clone(),
        };
        let mut banks = banks;
        let mut judges = judges;
        // Closed when the model thread ends (or panics), so the batcher never waits forever.
        struct CloseOnDrop(Arc<tokio::sync::Semaphore>);
        impl Drop for CloseOnDrop {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        let _close = CloseOnDrop(model_free_m.clone());
        model_loop(&engine, &mut banks, &mut judges, &ctx, &mut batch_rx, &scored_tx, &model_free_m);
    })?;
    let (model_desc, versions, loader) = tokio::task::spawn_blocking(move || ready_rx.recv())
        .await?
        .map_err(|_| anyhow::anyhow!("model thread ended during start-up"))??;
    tracing::info!(model = %model_desc, "model loaded");
    metrics::gauge!("kensa_model_info", "model" => model_desc.clone()).set(1.0);
    for (product, v) in &versions {
        tracing::info!(product = %product, bank_version = %v, "bank loaded");
        metrics::gauge!("kensa_bank_info", "product" => product.clone(), "version" => v.clone()).set(1.0);
    }

    let (outbox, pending) = Outbox::open(&cfg.outbox.dir, cfg.outbox.max_bytes)?;
    tracing::info!(dir = %cfg.outbox.dir.display(), pending = pending.len(), "outbox open");
    let publisher = Publisher::connect(&cfg.kafka).await?;
    health.set_broker(true);
    // Readiness follows the broker.
    let (p, h) = (publisher.clone(), health.clone());
    let broker_check = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let p = p.clone();
            let ok = tokio::task::spawn_blocking(move || p.reachable(Duration::from_secs(3))).await.unwrap_or(false);
            h.set_broker(ok);
        }
    });

    let mut srx = stop_rx.clone();
    let (addr, http) = kensa_telemetry::serve(&cfg.telemetry.listen, handle, health.clone(), async move {
        let _ = srx.wait_for(|s| *s).await;
    })
    .await?;
    tracing::info!("metrics on http://{addr}/metrics, health on http://{addr}/healthz");

    // Cameras.
    let (frame_tx, mut frame_rx) = mpsc::channel::<Frame>(cfg.batch.queue);
    let mut cameras = Vec::new();
    let mut failures = 0usize;
    for cam in &cfg.cameras {
        let h = health.clone();
        let on_state: kensa_capture::StateFn = Arc::new(move |id: &str, state: &str| h.set_camera(id, state));
        match kensa_capture::start(cam, frame_tx.clone(), on_state) {
            Ok(c) => {
                tracing::info!(camera = %cam.id, source = cam.source.kind(), "camera started");
                cameras.push(c);
            }
            Err(e) => {
                failures += 1;
                health.set_camera(&cam.id, format!("failed: {e}"));
                metrics::counter!(m::CAMERA_ERRORS, "camera" => cam.id.clone()).increment(1);
                tracing::error!(camera = %cam.id, "{e}");
            }
        }
    }
    // Queue depths, sampled.
    let (wf, wb, ws) = (frame_tx.downgrade(), batch_tx.downgrade(), scored_tx_probe.clone());
    let depth_task = tokio::spawn(async move {
        loop {
            for (stage, depth) in [
                ("capture", wf.upgrade().map(|t| t.max_capacity() - t.capacity())),
                ("model", wb.upgrade().map(|t| t.max_capacity() - t.capacity())),
                ("publish", ws.upgrade().map(|t| t.max_capacity() - t.capacity())),
            ] {
                metrics::gauge!(m::QUEUE_DEPTH, "stage" => stage).set(depth.unwrap_or(0) as f64);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    drop(frame_tx);
    health.set_ready(true);
    let stoppers: Vec<_> = cameras.iter().map(|c| c.stopper()).collect();
    let watch_health = health.clone();
    let cams_done = tokio::task::spawn_blocking(move || {
        let mut failed = 0;
        for c in cameras {
            let id = c.id.clone();
            match c.join() {
                kensa_capture::Outcome::Ended { frames } => {
                    watch_health.set_camera(&id, format!("ended after {frames} frames"));
                }
                kensa_capture::Outcome::Failed { frames, reason } => {
                    failed += 1;
                    watch_health.set_camera(&id, format!("failed after {frames} frames: {reason}"));
                }
            }
        }
        failed
    });

    // Hot reload: bank files, SIGHUP, the control topic.
    let current = Arc::new(Mutex::new(reload::Current::from_config(&cfg)));
    let mut reloaders = Vec::new();
    if cfg.model.bank_poll_s > 0 {
        reloaders.push(tokio::spawn(reload_task(batch_tx.clone(), {
            let (l, c) = (loader.clone(), current.clone());
            let every = Duration::from_secs(cfg.model.bank_poll_s);
            move |tx| reload::watch_files(l, c, tx, every)
        })));
    }
    reloaders.push(tokio::spawn(reload_task(batch_tx.clone(), {
        let (l, c, p) = (loader.clone(), current.clone(), a.config.clone());
        move |tx| reload::on_sighup(p, l, c, tx)
    })));
    if let Some(topic) = cfg.kafka.control_topic.clone() {
        if cfg.kafka.create_topics {
            if let Err(e) = kensa_publish::ensure_topics(&cfg.kafka, &[&topic]).await {
                tracing::error!("{e}");
            }
        }
        reloaders.push(tokio::spawn(reload_task(batch_tx.clone(), {
            let (l, c, k) = (loader.clone(), current.clone(), cfg.kafka.clone());
            move |tx| reload::control_topic(k, topic, l, c, tx)
        })));
    }

    // Batcher.
    let max_size = cfg.batch.effective_max_size(loader.device.is_cuda());
    tracing::info!(max_size, "batching");
    let max_wait = Duration::from_millis(cfg.batch.max_wait_ms);
    let batcher = tokio::spawn(async move {
        loop {
            match model_free.acquire().await {
                Ok(p) => p.forget(),
                Err(_) => break, // the model thread has ended
            }
            let Some(batch) = kensa_core::batch::next_batch(&mut frame_rx, max_size, max_wait).await else { break };
            if batch_tx.send(Work::Batch(batch)).await.is_err() {
                break;
            }
        }
        // Reload tasks also hold senders: tell the model thread explicitly that input ended.
        let _ = batch_tx.send(Work::Done).await;
    });

    // Delivery: outbox, then Kafka, each event acknowledged.
    let settings = deliver::Settings {
        topic: cfg.kafka.topic.clone(),
        defects_topic: cfg.kafka.defects_topic.clone(),
        schema_registry_id: cfg.publish.schema_registry_id,
        drain: Duration::from_secs(cfg.publish.drain_timeout_s),
        max_message_bytes: cfg.kafka.max_message_bytes,
    };
    let publisher_task = tokio::spawn(deliver::run(publisher, outbox, pending, scored_rx, settings));

    // Wait for a reason to stop.
    let mut cams_done = cams_done;
    let mut publisher_task = publisher_task;
    let runtime_limit = a.max_runtime_s.map(Duration::from_secs);
    let started = Instant::now();
    let mut camera_failures = None;
    let mut drained_early = None;
    loop {
        let until_limit = runtime_limit.map(|l| l.saturating_sub(started.elapsed())).unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown_signal() => { tracing::info!("signal received; shutting down"); break; }
            _ = tokio::time::sleep(until_limit) => {
                if runtime_limit.is_some() { tracing::info!("max runtime reached; shutting down"); break; }
            }
            r = &mut cams_done, if camera_failures.is_none() => {
                let failed = r.unwrap_or(0);
                camera_failures = Some(failed);
                tracing::info!(failed, "all cameras have ended");
            }
            r = &mut publisher_task, if drained_early.is_none() => {
                drained_early = Some(r.unwrap_or_default());
                tracing::info!("all frames scored and published");
                if a.exit_when_done { break; }
            }
        }
    }

    // Orderly shutdown under a deadline; a second SIGTERM/SIGINT exits at once.
    tokio::spawn(async {
        shutdown_signal().await;
        tracing::error!("second signal: exiting now; events not yet acknowledged stay in the outbox");
        // _exit: no atexit handlers or library destructors (libtorch, librdkafka, GStreamer can
        // block in them while threads are still busy); the outbox is already durable on disk.
        hard_exit(4);
    });
    for s in &stoppers {
        s.stop();
    }
    let deadline = Duration::from_secs(a.shutdown_deadline_s);
    let drain = async {
        let failed = match camera_failures {
            Some(f) => f,
            None => cams_done.await.unwrap_or(0),
        };
        let _ = batcher.await;
        let summary = match drained_early {
            Some(l) => l,
            None => publisher_task.await.unwrap_or_default(),
        };
        (failed, summary)
    };
    let (cam_failed, summary) = match tokio::time::timeout(deadline, drain).await {
        Ok(v) => v,
        Err(_) => {
            tracing::error!("shutdown did not finish within {}s; exiting anyway", deadline.as_secs());
            hard_exit(3);
        }
    };
    for r in reloaders {
        r.abort();
    }
    broker_check.abort();
    depth_task.abort();
    let _ = stop_tx.send(true);
    let _ = http.await;
    let _ = model_thread.join();
    let failed = cam_failed + failures;
    if summary.remaining > 0 {
        tracing::warn!(
            events = summary.remaining,
            dir = %cfg.outbox.dir.display(),
            "events not yet acknowledged by Kafka stay in the outbox and are sent at the next start"
        );
    }
    if summary.dropped > 0 {
        tracing::error!(events = summary.dropped, "events were dropped because the outbox was over its budget");
    }
    tracing::info!(camera_failures = failed, events_dropped = summary.dropped, events_spooled = summary.remaining, "stopped");
    Ok(if failed > 0 || summary.dropped > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// What the model thread needs besides the model.
struct ModelCtx {
    model_id: String,
    /// Camera id → (line, station).
    cameras: HashMap<String, (String, String)>,
    publish: kensa_core::config::PublishConfig,
    judges: kensa_core::config::JudgesConfig,
}

/// The language-model judges of the products that have one (`products.NAME.judge`), each
/// with its trained prompt learner; the LM named in the judge's sidecar is loaded per product.
fn load_judges(cfg: &KensaConfig, engine: &Engine) -> Result<HashMap<String, kensa_lm::judge::LmJudge>> {
    let mut out = HashMap::new();
    for (name, p) in &cfg.products {
        let Some(file) = &p.judge else { continue };
        let side = PathBuf::from(format!("{}.json", file.display()));
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&side).with_context(|| format!("products.{name}.judge: cannot read its sidecar {}", side.display()))?,
        )
        .with_context(|| format!("products.{name}.judge: bad sidecar {}", side.display()))?;
        let lm = PathBuf::from(meta["lm"].as_str().unwrap_or_default());
        let tok = meta["tokenizer"].as_str().map(PathBuf::from);
        let (model, tok) = crate::judge::load_lm(&lm, tok.as_deref(), engine.device())
            .with_context(|| format!("products.{name}.judge: language model {}", lm.display()))?;
        let dim: i64 = engine.backbone.meta.channels.iter().map(|&c| c as i64).sum();
        if meta["image_dim"].as_i64() != Some(dim) {
            anyhow::bail!("products.{name}.judge: trained with image features of size {}, the backbone gives {dim}", meta["image_dim"]);
        }
        let mut j = kensa_lm::judge::LmJudge::new(model, tok, dim, meta["description"].as_str().unwrap_or(""), meta["scale"].as_f64().unwrap_or(1.0));
        j.load_weights(file).with_context(|| format!("products.{name}.judge"))?;
        tracing::info!(product = %name, judge = %file.display(), lm = %lm.display(), "language-model judge loaded");
        out.insert(name.clone(), j);
    }
    Ok(out)
}

/// Token bucket for language-model judgements.
struct Budget {
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl Budget {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate.max(1.0));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The model thread: scores each batch (grouped by product), judges, and builds the events.
fn model_loop(
    engine: &Engine,
    banks: &mut HashMap<String, Bank>,
    judges: &mut HashMap<String, kensa_lm::judge::LmJudge>,
    ctx: &ModelCtx,
    batches: &mut mpsc::Receiver<Work>,
    out: &mpsc::Sender<Scored>,
    model_free: &tokio::sync::Semaphore,
) {
    let run_id = format!("{:x}", unix_nanos(SystemTime::now()));
    let mut budget = Budget { tokens: ctx.judges.budget_per_s.max(1.0), rate: ctx.judges.budget_per_s, last: Instant::now() };
    // Camera → product overrides from changeovers.
    let mut assigned: HashMap<String, String> = HashMap::new();
    while let Some(work) = batches.blocking_recv() {
        let batch = match work {
            Work::Batch(b) => b,
            Work::Control(c) => {
                apply_control(c, banks, &mut assigned);
                continue;
            }
            Work::Done => break,
        };
        metrics::histogram!(m::BATCH_SIZE).record(batch.len() as f64);
        let t0 = Instant::now();
        let mut by_product: HashMap<&str, Vec<&Frame>> = HashMap::new();
        for f in &batch {
            let product = assigned.get(&*f.camera).map(String::as_str).unwrap_or(&f.product);
            by_product.entry(product).or_default().push(f);
        }
        let batch_formed = Instant::now();
        for (product, frames) in by_product {
            let Some(bank) = banks.get(product) else {
                for f in &frames {
                    metrics::counter!(m::FRAMES_DROPPED, "camera" => f.camera.to_string(), "reason" => m::reason::NO_BANK)
                        .increment(1);
                }
                tracing::error!(product, "no bank loaded for product; frames dropped");
                continue;
            };
            let views: Vec<(&[u8], u32, u32)> = frames.iter().map(|f| (f.data.as_slice(), f.width, f.height)).collect();
            let t_model = Instant::now();
            let scored = engine.score(&views, bank);
            metrics::histogram!(m::SCORE_LATENCY).record(t_model.elapsed().as_secs_f64());
            let maps = match scored {
                Ok(m) => m,
                Err(e) => {
                    for f in &frames {
                        metrics::counter!(m::FRAMES_DROPPED, "camera" => f.camera.to_string(), "reason" => m::reason::SCORING_FAILED)
                            .increment(1);
                    }
                    tracing::error!(product, "scoring failed: {e}");
                    continue;
                }
            };
            let model_s = t_model.elapsed().as_secs_f64() / frames.len() as f64;
            for (f, map) in frames.iter().zip(maps) {
                let t_verdict = Instant::now();
                let (calibrated, mask) = kensa_verdict::judge(&map, &bank.meta.calibration);
                let lm = language_model_verdict(engine, bank, judges.get(product), &ctx.judges, &mut budget, f, &map, &calibrated, product);
                use kensa_core::config::JudgeMode;
                let lm_decides = lm.is_some() && matches!(ctx.judges.mode, JudgeMode::LanguageModel | JudgeMode::LanguageModelOnUncertain);
                let v = match (&lm, lm_decides) {
                    (Some(l), true) => l.clone(),
                    _ => calibrated.clone(),
                };
                let (mask, mw, mh) = downscale_mask(&mask, map.width, map.height, ctx.publish.mask_max_side);
                let (map_path, snapshot_path) = match &ctx.publish.store_dir {
                    Some(dir) if v.anomalous || ctx.publish.store == StoreWhich::All => store(dir, f, &map),
                    _ => (String::new(), String::new()),
                };
                let (line, station) = ctx.cameras.get(&*f.camera).cloned().unwrap_or_default();
                let queue_s = batch_formed.saturating_duration_since(f.captured_at).as_secs_f64();
                metrics::counter!(m::FRAMES_SCORED, "camera" => f.camera.to_string(), "product" => product.to_string())
                    .increment(1);
                metrics::histogram!(m::IMAGE_SCORE, "product" => product.to_string()).record(v.score as f64);
                if v.anomalous {
                    metrics::counter!(m::ANOMALIES, "camera" => f.camera.to_string(), "product" => product.to_string())
                        .increment(1);
                }
                let event = InspectionEvent {
                    event_id: format!("{}/{run_id}/{}", f.camera, f.seq),
                    camera_id: f.camera.to_string(),
                    product: product.to_string(),
                    frame_seq: f.seq,
                    capture_time_unix_nanos: unix_nanos(f.capture_time),
                    publish_time_unix_nanos: 0,
                    score: v.score,
                    anomalous: v.anomalous,
                    answer: v.answer.clone(),
                    locations: v.locations.iter().map(|&c| cell_to_proto(c) as i32).collect(),
                    regions: v
                        .regions
                        .iter()
                        .map(|r| proto::Region {
                            cell: cell_to_proto(r.cell) as i32,
                            x0: r.bbox[0],
                            y0: r.bbox[1],
                            x1: r.bbox[2],
                            y1: r.bbox[3],
                            area: r.area,
                            peak: r.peak,
                        })
                        .collect(),
                    confidence: v.confidence,
                    judge: v.judge.to_string(),
                    mask_png: kensa_verdict::mask_png(&mask, mw, mh),
                    width: map.width,
                    height: map.height,
                    bank_version: bank.meta.version(),
                    model_id: ctx.model_id.clone(),
                    kensa_version: env!("CARGO_PKG_VERSION").to_string(),
                    line,
                    station,
                    stages: Vec::new(),
                    verdicts: std::iter::once(&calibrated)
                        .chain(lm.as_ref())
                        .map(|j| proto::Judgement {
                            judge: j.judge.to_string(),
                            anomalous: j.anomalous,
                            answer: j.answer.clone(),
                            confidence: j.confidence,
                        })
                        .collect(),
                    judges_agree: lm.as_ref().is_none_or(|l| l.anomalous == calibrated.anomalous),
                    mask_width: mw,
                    mask_height: mh,
                    map_path,
                    snapshot_path,
                };
                let mut event = event;
                if !event.judges_agree {
                    metrics::counter!(m::JUDGE_DISAGREEMENTS, "camera" => f.camera.to_string(), "product" => product.to_string())
                        .increment(1);
                }
                let verdict_s = t_verdict.elapsed().as_secs_f64();
                event.stages = [("queue", queue_s), ("model", model_s), ("verdict", verdict_s)]
                    .into_iter()
                    .map(|(stage, seconds)| {
                        metrics::histogram!(m::STAGE_LATENCY, "stage" => stage).record(seconds);
                        proto::StageLatency { stage: stage.to_string(), seconds }
                    })
                    .collect();
                event.publish_time_unix_nanos = unix_nanos(SystemTime::now());
                let s = Scored { event, captured_at: f.captured_at };
                if out.blocking_send(s).is_err() {
                    return;
                }
            }
        }
        metrics::histogram!(m::BATCH_LATENCY).record(t0.elapsed().as_secs_f64());
        model_free.add_permits(1);
    }
}

/// Nearest-neighbour downscale of a 0/255 mask so its longer side is at most `max_side`
/// (0: unchanged).
fn downscale_mask(mask: &[u8], w: u32, h: u32, max_side: u32) -> (Vec<u8>, u32, u32) {
    if max_side == 0 || w.max(h) <= max_side {
        return (mask.to_vec(), w, h);
    }
    let scale = max_side as f64 / w.max(h) as f64;
    let (nw, nh) = (((w as f64 * scale).round() as u32).max(1), ((h as f64 * scale).round() as u32).max(1));
    let mut out = vec![0u8; (nw * nh) as usize];
    for y in 0..nh {
        let sy = ((y as f64 + 0.5) / scale) as u32;
        for x in 0..nw {
            let sx = ((x as f64 + 0.5) / scale) as u32;
            out[(y * nw + x) as usize] = mask[(sy.min(h - 1) * w + sx.min(w - 1)) as usize];
        }
    }
    (out, nw, nh)
}

/// Writes the full-resolution map (.npy) and the frame (.png) under `dir/<camera>/`; returns
/// their paths (empty strings if writing failed, which is logged).
fn store(dir: &std::path::Path, f: &Frame, map: &kensa_core::AnomalyMap) -> (String, String) {
    let d = dir.join(&*f.camera);
    let stem = format!("{:012}", f.seq);
    let res = (|| -> std::io::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(&d)?;
        let mp = d.join(format!("{stem}_map.npy"));
        kensa_core::npy::write_f32_2d(
            std::io::BufWriter::new(std::fs::File::create(&mp)?),
            map.height as usize,
            map.width as usize,
            &map.data,
        )?;
        let sp = d.join(format!("{stem}.png"));
        image::save_buffer(&sp, &f.data, f.width, f.height, image::ExtendedColorType::Rgb8)
            .map_err(std::io::Error::other)?;
        Ok((mp, sp))
    })();
    match res {
        Ok((m, s)) => (m.display().to_string(), s.display().to_string()),
        Err(e) => {
            tracing::error!(camera = %f.camera, frame = f.seq, dir = %d.display(), "cannot store map and snapshot: {e}");
            (String::new(), String::new())
        }
    }
}

/// Applies a reload or changeover between two batches.
fn apply_control(c: Control, banks: &mut HashMap<String, Bank>, assigned: &mut HashMap<String, String>) {
    match c {
        Control::SwapBank { product, bank, path, trigger } => {
            let new = bank.meta.version();
            if let Some(old) = banks.get(&product) {
                metrics::gauge!("kensa_bank_info", "product" => product.clone(), "version" => old.meta.version()).set(0.0);
            }
            metrics::gauge!("kensa_bank_info", "product" => product.clone(), "version" => new.clone()).set(1.0);
            metrics::counter!(reload::BANK_RELOADS, "product" => product.clone(), "result" => "ok").increment(1);
            tracing::info!(product = %product, version = %new, path = %path.display(), trigger, "bank swapped in");
            banks.insert(product, *bank);
        }
        Control::Assign { camera, product, trigger } => {
            if banks.contains_key(&product) {
                tracing::info!(camera = %camera, product = %product, trigger, "camera now inspects another product");
                assigned.insert(camera, product);
            } else {
                metrics::counter!(reload::CONTROL_ERRORS, "reason" => "unknown").increment(1);
                tracing::error!(camera = %camera, product = %product, "changeover ignored: no bank loaded for the product");
            }
        }
    }
}

async fn reload_task<F, Fut>(tx: mpsc::Sender<Work>, f: F)
where
    F: FnOnce(mpsc::Sender<Work>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    f(tx).await
}

/// Exits at once, without atexit handlers or destructors.
#[allow(unsafe_code)]
fn hard_exit(code: i32) -> ! {
    // SAFETY: _exit takes no pointers and never returns; skipping destructors is the point.
    unsafe { libc::_exit(code) }
}

/// The language-model judge's verdict on a frame, when the mode, the frame and the budget call
/// for one; `None` otherwise (and on a judge error, which is logged and counted).
#[allow(clippy::too_many_arguments)]
fn language_model_verdict(
    engine: &Engine,
    bank: &Bank,
    judge: Option<&kensa_lm::judge::LmJudge>,
    cfg: &kensa_core::config::JudgesConfig,
    budget: &mut Budget,
    f: &Frame,
    map: &kensa_core::AnomalyMap,
    calibrated: &kensa_verdict::Verdict,
    product: &str,
) -> Option<kensa_verdict::Verdict> {
    use kensa_core::config::JudgeMode;
    let judge = judge?;
    let wanted = match cfg.mode {
        JudgeMode::Calibrated => false,
        JudgeMode::Both | JudgeMode::LanguageModel => true,
        JudgeMode::LanguageModelOnUncertain => {
            calibrated.anomalous || (calibrated.confidence - 0.5).abs() < cfg.uncertain_band as f32
        }
    };
    if !wanted {
        return None;
    }
    if !budget.take() {
        metrics::counter!("kensa_lm_judgements_total", "product" => product.to_string(), "result" => "over_budget").increment(1);
        return None;
    }
    use kensa_verdict::Judge as _;
    let img = image::RgbImage::from_raw(f.width, f.height, f.data.to_vec())?;
    let judge = crate::judge::LanguageModelJudge { lm: judge, engine, bank };
    match judge.judge(&kensa_verdict::Evidence { map, image: &img }) {
        Ok(v) => {
            metrics::counter!("kensa_lm_judgements_total", "product" => product.to_string(), "result" => "ran").increment(1);
            Some(v)
        }
        Err(e) => {
            metrics::counter!("kensa_lm_judgements_total", "product" => product.to_string(), "result" => "error").increment(1);
            tracing::error!(product, camera = %f.camera, frame = f.seq, "language-model judge failed: {e}");
            None
        }
    }
}
