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
use kensa_model::backbone::Backbone;
use kensa_model::bank::Bank;
use kensa_model::engine::Engine;
use kensa_publish::{cell_to_proto, proto, InspectionEvent, Publisher};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Semaphore};

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

/// A scored frame on its way to Kafka.
struct Scored {
    event: InspectionEvent,
    captured_at: Instant,
    camera: Arc<str>,
    product: Arc<str>,
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
    let (batch_tx, mut batch_rx) = mpsc::channel::<Vec<Frame>>(1);
    let (scored_tx, mut scored_rx) = mpsc::channel::<Scored>(256);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(String, Vec<(String, String)>)>>();
    let model_cfg = cfg.clone();
    let model_thread = std::thread::Builder::new().name("kensa-model".into()).spawn(move || {
        let setup = (|| -> Result<(Engine, HashMap<String, Bank>)> {
            if model_cfg.model.threads > 0 {
                tch::set_num_threads(model_cfg.model.threads as i32);
            }
            let device = kensa_model::device_from_str(&model_cfg.model.device)?;
            let path = model_cfg.model.backbone.clone().unwrap_or_else(kensa_model::default_backbone_path);
            let backbone = Backbone::load(&path, device)?;
            let mut banks = HashMap::new();
            for (name, p) in &model_cfg.products {
                let bank = Bank::load(&p.bank, &backbone.meta, model_cfg.model.input_size, device)?;
                banks.insert(name.clone(), bank);
            }
            Ok((Engine::new(backbone, model_cfg.model.input_size), banks))
        })();
        let (engine, banks) = match setup {
            Ok(v) => v,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let model_id = format!("{}@{}", engine.backbone.meta.name, engine.backbone.meta.weights);
        let versions = banks.iter().map(|(k, b)| (k.clone(), b.meta.version())).collect();
        let _ = ready_tx.send(Ok((format!("{model_id} on {:?}", engine.device()), versions)));
        model_loop(&engine, &banks, &model_id, &mut batch_rx, &scored_tx);
    })?;
    let (model_desc, versions) = tokio::task::spawn_blocking(move || ready_rx.recv())
        .await?
        .map_err(|_| anyhow::anyhow!("model thread ended during start-up"))??;
    tracing::info!(model = %model_desc, "model loaded");
    for (product, v) in &versions {
        tracing::info!(product = %product, bank_version = %v, "bank loaded");
        metrics::gauge!("kensa_bank_info", "product" => product.clone(), "version" => v.clone()).set(1.0);
    }

    let publisher = Publisher::connect(&cfg.kafka).await?;

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
        match kensa_capture::start(cam, frame_tx.clone()) {
            Ok(c) => {
                health.set_camera(&cam.id, "up");
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

    // Batcher.
    let max_size = cfg.batch.max_size;
    let max_wait = Duration::from_millis(cfg.batch.max_wait_ms);
    let batcher = tokio::spawn(async move {
        while let Some(batch) = kensa_core::batch::next_batch(&mut frame_rx, max_size, max_wait).await {
            if batch_tx.send(batch).await.is_err() {
                break;
            }
        }
    });

    // Publisher: bounded in-flight sends; each event waits for its acknowledgement.
    let publisher_task = tokio::spawn(async move {
        let inflight = Arc::new(Semaphore::new(512));
        let mut lost = 0u64;
        let (lost_tx, mut lost_rx) = mpsc::unbounded_channel::<()>();
        while let Some(s) = scored_rx.recv().await {
            let permit = inflight.clone().acquire_owned().await.expect("semaphore open");
            let p = publisher.clone();
            let lost_tx = lost_tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut ev = s.event;
                let mut attempt = 0;
                loop {
                    ev.publish_time_unix_nanos = unix_nanos(SystemTime::now());
                    match p.publish(&ev).await {
                        Ok(()) => {
                            metrics::histogram!(m::END_TO_END_LATENCY, "camera" => s.camera.to_string())
                                .record(s.captured_at.elapsed().as_secs_f64());
                            break;
                        }
                        Err(e) if attempt < 3 => {
                            attempt += 1;
                            tracing::warn!(camera = %s.camera, frame = ev.frame_seq, attempt, "{e}; retrying");
                            tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
                        }
                        Err(e) => {
                            tracing::error!(camera = %s.camera, product = %s.product, frame = ev.frame_seq, "event lost: {e}");
                            let _ = lost_tx.send(());
                            break;
                        }
                    }
                }
            });
        }
        drop(lost_tx);
        // Wait for every send still in flight.
        let _ = inflight.acquire_many(512).await;
        while lost_rx.recv().await.is_some() {
            lost += 1;
        }
        let p = publisher.clone();
        let _ = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(10))).await;
        lost
    });

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
                drained_early = Some(r.unwrap_or(0));
                tracing::info!("all frames scored and published");
                if a.exit_when_done { break; }
            }
        }
    }

    // Orderly shutdown under a deadline.
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
        let lost = match drained_early {
            Some(l) => l,
            None => publisher_task.await.unwrap_or(0),
        };
        (failed, lost)
    };
    let (cam_failed, lost) = match tokio::time::timeout(deadline, drain).await {
        Ok(v) => v,
        Err(_) => {
            tracing::error!("shutdown did not finish within {}s; exiting anyway", deadline.as_secs());
            return Ok(ExitCode::from(3));
        }
    };
    let _ = stop_tx.send(true);
    let _ = http.await;
    let _ = model_thread.join();
    let failed = cam_failed + failures;
    if lost > 0 {
        tracing::error!(lost, "events were not acknowledged by Kafka");
    }
    tracing::info!(camera_failures = failed, events_lost = lost, "stopped");
    Ok(if failed > 0 || lost > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
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

/// The model thread: scores each batch (grouped by product), judges, and builds the events.
fn model_loop(
    engine: &Engine,
    banks: &HashMap<String, Bank>,
    model_id: &str,
    batches: &mut mpsc::Receiver<Vec<Frame>>,
    out: &mpsc::Sender<Scored>,
) {
    let run_id = format!("{:x}", unix_nanos(SystemTime::now()));
    while let Some(batch) = batches.blocking_recv() {
        metrics::histogram!(m::BATCH_SIZE).record(batch.len() as f64);
        let t0 = Instant::now();
        let mut by_product: HashMap<&str, Vec<&Frame>> = HashMap::new();
        for f in &batch {
            by_product.entry(&f.product).or_default().push(f);
        }
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
            let maps = match engine.score(&views, bank) {
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
            for (f, map) in frames.iter().zip(maps) {
                let (v, mask) = kensa_verdict::judge(&map, &bank.meta.calibration);
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
                    mask_png: kensa_verdict::mask_png(&mask, map.width, map.height),
                    width: map.width,
                    height: map.height,
                    bank_version: bank.meta.version(),
                    model_id: model_id.to_string(),
                    kensa_version: env!("CARGO_PKG_VERSION").to_string(),
                };
                let s = Scored { event, captured_at: f.captured_at, camera: f.camera.clone(), product: f.product.clone() };
                if out.blocking_send(s).is_err() {
                    return;
                }
            }
        }
        metrics::histogram!(m::SCORE_LATENCY).record(t0.elapsed().as_secs_f64());
    }
}
