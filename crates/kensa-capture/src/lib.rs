//! GStreamer capture.
//!
//! Each camera is a pipeline built from a template in `pipelines/` (compiled in; overridable
//! with `KENSA_PIPELINES=DIR`), ending in an appsink with fixed RGB caps. The appsink's
//! `new-sample` callback copies each frame out (honouring the row stride), numbers it, and hands
//! it to the scoring queue under the camera's full-queue policy: `block` (files, folders, the
//! synthetic line: nothing lost) or `drop` (live cameras: the frame is dropped and counted with
//! reason `queue_full`). A pipeline error stops that camera only; it is logged with the element
//! that failed and counted, and the other cameras go on.
//!
//! # Layout
//! - this module: pipeline templates ([`template`], [`describe`]), [`start`] (one thread per
//!   camera: the appsink callback, supervision and reconnects), [`check`], and [`CaptureError`],
//!   the crate's one error enum.
//! - [`commission`]: frames through a camera's own pipeline, for `kensa capture` (references)
//!   and `kensa check --probe`.
//! - [`images`]: image files: listing a folder, decoding with limits.
//! - [`mvtec`]: data sets in MVTec AD layout (for `kensa eval` and `kensa train-judge --eval`).

pub mod commission;
pub mod images;
pub mod mvtec;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use kensa_core::config::{redact_credentials, CameraConfig, FullPolicy, SourceConfig};
use kensa_core::metrics::{self as m, CameraState, DropReason, Label};
use kensa_core::Frame;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// An image file (folder cameras, references, data sets) that cannot be listed or read.
    #[error("image {path}: {msg}")]
    Image { path: std::path::PathBuf, msg: String },
    #[error("camera {camera}: GStreamer is not usable: {msg}")]
    Init { camera: String, msg: String },
    #[error("camera {camera}: cannot build pipeline `{pipeline}`: {msg}")]
    Build { camera: String, pipeline: String, msg: String },
    #[error("camera {camera}: pipeline failed to start: {msg}")]
    Start { camera: String, msg: String },
}

/// Template text for a source kind: `$KENSA_PIPELINES/<kind>.pipeline` if set, else built in.
pub fn template(kind: &str) -> String {
    if let Ok(dir) = std::env::var("KENSA_PIPELINES") {
        let p = std::path::Path::new(&dir).join(format!("{kind}.pipeline"));
        if let Ok(t) = std::fs::read_to_string(&p) {
            return t.trim().to_string();
        }
    }
    match kind {
        "synthetic" => include_str!("../../../pipelines/synthetic.pipeline"),
        "image_folder" => include_str!("../../../pipelines/image_folder.pipeline"),
        "video_file" => include_str!("../../../pipelines/video_file.pipeline"),
        "v4l2" => include_str!("../../../pipelines/v4l2.pipeline"),
        "rtsp" => include_str!("../../../pipelines/rtsp.pipeline"),
        "gige" => include_str!("../../../pipelines/gige.pipeline"),
        _ => "",
    }
    .trim()
    .to_string()
}

/// Quotes a value for gst-launch syntax.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The pipeline description for logs and `kensa check`: credentials in URLs redacted.
pub fn describe_redacted(cam: &CameraConfig) -> String {
    redact_credentials(&describe(cam))
}

/// The full pipeline description for a camera.
pub fn describe(cam: &CameraConfig) -> String {
    let drop = cam.effective_policy() == FullPolicy::Drop;
    let sink = format!(
        "videoconvert ! videoscale ! video/x-raw,format=RGB,width={},height={},pixel-aspect-ratio=1/1 ! appsink name=sink max-buffers={} drop={} sync=false",
        cam.width, cam.height, cam.queue, drop
    );
    let mut t = template(cam.source.kind()).replace("{sink}", &sink);
    let fill = |t: &mut String, k: &str, v: String| *t = t.replace(&format!("{{{k}}}"), &v);
    match &cam.source {
        SourceConfig::VideoFile { path } => fill(&mut t, "path", quote(&path.display().to_string())),
        SourceConfig::V4l2 { device } => fill(&mut t, "device", quote(device)),
        SourceConfig::Rtsp { url, latency_ms, codec } => {
            fill(&mut t, "url", quote(url));
            fill(&mut t, "latency_ms", latency_ms.to_string());
            fill(&mut t, "codec", codec.gst_name().to_string());
        }
        SourceConfig::Gige { camera, settings } => {
            fill(&mut t, "camera", quote(camera));
            let (props, convert) = gige_parts(settings);
            fill(&mut t, "aravis", if props.is_empty() { props } else { format!(" {props}") });
            fill(&mut t, "convert", convert.to_string());
        }
        SourceConfig::Synthetic { .. } | SourceConfig::ImageFolder { .. } => {}
    }
    fill(&mut t, "width", cam.width.to_string());
    fill(&mut t, "height", cam.height.to_string());
    fill(&mut t, "queue", cam.queue.to_string());
    t
}

/// aravissrc's properties for the settings (`{aravis}` in the template), and the caps and
/// conversion after it (`{convert}`). `Auto` is
/// resolved to the camera's own format when a session opens ([`session_pipeline`]); `check`
/// (which opens nothing) assumes Bayer.
fn gige_parts(g: &kensa_core::config::GigeSettings) -> (String, &'static str) {
    use kensa_core::config::PixelFormat;
    let mut props = Vec::new();
    if let Some(e) = g.exposure_us {
        props.push(format!("exposure-auto=off exposure={e}"));
    }
    if let Some(db) = g.gain_db {
        props.push(format!("gain-auto=off gain={db}"));
    }
    let mut features = match &g.trigger {
        Some(src) => format!("TriggerMode=On TriggerSource={src}"),
        None => String::new(),
    };
    if let Some(f) = &g.features {
        features = format!("{features} {f}").trim().to_string();
    }
    if !features.is_empty() {
        props.push(format!("features={}", quote(&features)));
    }
    let convert = match g.pixel_format {
        PixelFormat::Auto | PixelFormat::Bayer => "video/x-bayer ! bayer2rgb ! ",
        PixelFormat::Mono8 => "video/x-raw,format=GRAY8 ! ",
        PixelFormat::Rgb8 => "video/x-raw,format=RGB ! ",
    };
    (props.join(" "), convert)
}

/// The pipeline a session runs. A GigE camera with `pixel_format = "auto"` gets the format it
/// is set to: one frame is pulled (`aravissrc ! appsink`) and its caps decide between Bayer
/// (demosaiced by bayer2rgb) and a raw format (GRAY8, RGB, ...: converted by videoconvert).
fn session_pipeline(cam: &CameraConfig) -> String {
    use kensa_core::config::PixelFormat;
    let desc = describe(cam);
    let SourceConfig::Gige { camera, settings } = &cam.source else { return desc };
    if settings.pixel_format != PixelFormat::Auto {
        return desc;
    }
    let (props, bayer) = gige_parts(settings);
    let probe =
        format!("aravissrc camera-name={} {props} num-buffers=1 ! appsink name=probe sync=false", quote(camera));
    let caps = (|| {
        let p = gst::parse::launch(&probe).ok()?.downcast::<gst::Pipeline>().ok()?;
        let sink = p.by_name("probe")?.downcast::<gst_app::AppSink>().ok()?;
        p.set_state(gst::State::Playing).ok()?;
        let sample = sink.try_pull_sample(gst::ClockTime::from_seconds(10));
        let _ = p.set_state(gst::State::Null);
        Some(sample?.caps()?.structure(0)?.name().to_string())
    })();
    match caps.as_deref() {
        Some(raw) if raw.starts_with("video/x-raw") => {
            tracing::info!(camera = %cam.id, caps = raw, "GigE pixel format: raw, converted");
            desc.replacen(bayer, "", 1)
        }
        other => {
            tracing::info!(camera = %cam.id, caps = other.unwrap_or("none within 10 s"), "GigE pixel format: Bayer, demosaiced");
            desc
        }
    }
}

fn init(camera: &str) -> Result<(), CaptureError> {
    gst::init().map_err(|e| CaptureError::Init { camera: camera.into(), msg: e.to_string() })
}

/// Parses a camera's pipeline without running it (checks that every element exists).
pub fn check(cam: &CameraConfig) -> Result<(), CaptureError> {
    init(&cam.id)?;
    let desc = describe(cam);
    let p = gst::parse::launch(&desc).map_err(|e| CaptureError::Build {
        camera: cam.id.clone(),
        pipeline: redact_credentials(&desc),
        msg: redact_credentials(&e.to_string()),
    })?;
    let _ = p.set_state(gst::State::Null);
    Ok(())
}

/// How a camera ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// End of stream (finite sources) or stopped on request.
    Ended { frames: u64 },
    /// The pipeline failed; the reason names the element.
    Failed { frames: u64, reason: String },
}

/// Stops a camera (see [`Camera::stop`]).
#[derive(Clone)]
pub struct Stopper(Arc<AtomicBool>);

impl Stopper {
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A running camera.
pub struct Camera {
    pub id: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Outcome>>,
}

impl Camera {
    /// Asks the camera to stop: its source gets end-of-stream, queued frames still flow.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// A handle that stops this camera from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop.clone())
    }

    /// Waits for the camera's thread and returns how it ended.
    pub fn join(mut self) -> Outcome {
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(o)) => o,
            Some(Err(_)) => Outcome::Failed { frames: 0, reason: "capture thread panicked".into() },
            None => Outcome::Ended { frames: 0 },
        }
    }
}

/// Reports a camera's state changes (camera id, state, detail) to whoever shows health.
pub type StateFn = Arc<dyn Fn(&str, CameraState, &str) + Send + Sync>;

/// A no-op [`StateFn`].
pub fn no_state() -> StateFn {
    Arc::new(|_, _, _| {})
}

fn set_state(id: &str, state: CameraState, detail: &str, on_state: &StateFn) {
    for &s in CameraState::ALL {
        metrics::gauge!(m::CAMERA_STATE, "camera" => id.to_string(), "state" => s.as_str()).set(if s == state {
            1.0
        } else {
            0.0
        });
    }
    metrics::gauge!(m::CAMERA_UP, "camera" => id.to_string()).set(if state == CameraState::Up { 1.0 } else { 0.0 });
    on_state(id, state, &redact_credentials(detail));
}

/// How long a session must deliver frames before its end resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// ±20 % of `d`, so cameras that dropped together do not reconnect in lock-step.
fn jitter(d: Duration) -> Duration {
    let n = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.subsec_nanos());
    d.mul_f64(0.8 + f64::from(n % 401) / 1000.0)
}

/// One running pipeline of a camera.
struct Session {
    pipeline: gst::Pipeline,
    feeder: Option<std::thread::JoinHandle<()>>,
}

impl Session {
    fn close(self) {
        let _ = self.pipeline.set_state(gst::State::Null);
        if let Some(f) = self.feeder {
            let _ = f.join();
        }
    }
}

/// What each camera's source negotiated last (its own caps, before Kensa converts them to
/// RGB), by camera id.
fn source_caps_seen() -> &'static std::sync::Mutex<std::collections::HashMap<String, String>> {
    static SEEN: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, String>>> =
        std::sync::OnceLock::new();
    SEEN.get_or_init(Default::default)
}

/// The caps camera `id`'s source negotiated last (`kensa check --probe` reports them), if it has
/// negotiated any in this process.
pub fn source_caps(id: &str) -> Option<String> {
    source_caps_seen().lock().ok()?.get(id).cloned()
}

/// Records the caps the source negotiates: those of its static `src` pad, or, for sources
/// whose stream is decoded first (rtspsrc, filesrc ! decodebin), the input of the
/// `videoconvert` nearest the source (a bin lists its children newest first, so the last one
/// met): the decoded stream as the camera sends it.
fn watch_source_caps(pipeline: &gst::Pipeline, id: &str) {
    let is = |e: &gst::Element, name: &str| e.factory().is_some_and(|f| f.name() == name);
    let pad = pipeline
        .iterate_sources()
        .into_iter()
        .flatten()
        .find(|e| !is(e, "rtspsrc") && !is(e, "filesrc"))
        .and_then(|e| e.static_pad("src"))
        .or_else(|| {
            pipeline
                .iterate_recurse()
                .into_iter()
                .flatten()
                .filter(|e| is(e, "videoconvert"))
                .last()
                .and_then(|e| e.static_pad("sink"))
        });
    let Some(pad) = pad else { return };
    let id = id.to_string();
    pad.connect_notify(Some("caps"), move |pad, _| {
        if let Some(caps) = pad.current_caps() {
            let text = caps.to_string();
            tracing::debug!(camera = %id, caps = %text, "source caps");
            if let Ok(mut seen) = source_caps_seen().lock() {
                seen.insert(id.clone(), text);
            }
        }
    });
}

/// Builds a camera's pipeline, wires the appsink into `tx`, starts its feeder and sets it
/// playing. `Build` errors (bad template, missing plugin) never fix themselves; the others may.
fn open(
    cam: &CameraConfig,
    tx: &mpsc::Sender<Frame>,
    seq: &Arc<AtomicU64>,
    stop: &Arc<AtomicBool>,
) -> Result<Session, CaptureError> {
    let desc = session_pipeline(cam);
    let build_err = |msg: String| CaptureError::Build {
        camera: cam.id.clone(),
        pipeline: redact_credentials(&desc),
        msg: redact_credentials(&msg),
    };
    let pipeline = gst::parse::launch(&desc)
        .map_err(|e| build_err(e.to_string()))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| build_err("not a pipeline".into()))?;
    let sink = pipeline
        .by_name("sink")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or_else(|| build_err("the template has no appsink named `sink`".into()))?;
    let src = pipeline.by_name("src").and_then(|e| e.downcast::<gst_app::AppSrc>().ok());
    watch_source_caps(&pipeline, &cam.id);

    let camera: Arc<str> = Arc::from(cam.id.as_str());
    let policy = cam.effective_policy();
    let captured = metrics::counter!(m::FRAMES_CAPTURED, "camera" => cam.id.clone());
    let dropped_full =
        metrics::counter!(m::FRAMES_DROPPED, "camera" => cam.id.clone(), "reason" => DropReason::QueueFull.as_str());
    let dropped_bad =
        metrics::counter!(m::FRAMES_DROPPED, "camera" => cam.id.clone(), "reason" => DropReason::BadFrame.as_str());
    // Part ids of fed frames (folder sources: the file's stem), by presentation time: the
    // converters keep a buffer's timestamp, and a dropped frame's id is skipped over.
    let part_ids: Arc<std::sync::Mutex<std::collections::BTreeMap<u64, Arc<str>>>> = Arc::default();
    {
        let seq = seq.clone();
        let camera = camera.clone();
        let tx = tx.clone();
        let part_ids = part_ids.clone();
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |s| {
                    let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let n = seq.fetch_add(1, Ordering::SeqCst);
                    captured.increment(1);
                    let Some(mut frame) = frame_from_sample(&sample, &camera, n) else {
                        dropped_bad.increment(1);
                        tracing::warn!(camera = %camera, frame = n, "frame with unexpected caps or size dropped");
                        return Ok(gst::FlowSuccess::Ok);
                    };
                    if let Some(pts) = sample.buffer().and_then(gst::BufferRef::pts) {
                        let mut ids = part_ids.lock().expect("part ids lock");
                        if !ids.is_empty() {
                            let later = ids.split_off(&(pts.nseconds() + 1));
                            frame.part_id = ids.remove(&pts.nseconds());
                            *ids = later;
                        }
                    }
                    match policy {
                        FullPolicy::Block => {
                            if tx.blocking_send(frame).is_err() {
                                return Err(gst::FlowError::Flushing);
                            }
                        }
                        FullPolicy::Drop => match tx.try_send(frame) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => dropped_full.increment(1),
                            Err(mpsc::error::TrySendError::Closed(_)) => return Err(gst::FlowError::Flushing),
                        },
                    }
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
    }

    let feeder = match (&cam.source, src) {
        (SourceConfig::Synthetic { seed, count, fps, defect_rate, phase }, Some(src)) => {
            let line = kensa_synth::Line::new(*seed, *defect_rate, cam.width, cam.height);
            let (count, fps, stop) = (*count, *fps, stop.clone());
            Some(spawn_feeder(cam.id.clone(), src, stop, fps, *phase, part_ids.clone(), move |i| {
                if count != 0 && i >= count {
                    return Feed::End;
                }
                let s = line.sample(i);
                Feed::Image(s.image, None)
            }))
        }
        (SourceConfig::ImageFolder { path, fps }, Some(src)) => {
            // A folder that cannot be listed is an error of this camera (state `failed`); an
            // empty one just ends.
            let files = images::list_images(path)
                .map_err(|e| CaptureError::Start { camera: cam.id.clone(), msg: e.to_string() })?;
            if files.is_empty() {
                tracing::warn!(camera = %cam.id, folder = %path.display(), "image folder holds no images");
            }
            let corrupt = metrics::counter!(m::FRAMES_DROPPED, "camera" => cam.id.clone(), "reason" => DropReason::CorruptImage.as_str());
            let (fps, stop, id) = (*fps, stop.clone(), cam.id.clone());
            Some(spawn_feeder(cam.id.clone(), src, stop, fps, 0.0, part_ids.clone(), move |i| {
                let Some(p) = files.get(i as usize) else { return Feed::End };
                match images::load_rgb(p) {
                    Ok(img) => Feed::Image(img, p.file_stem().map(|s| Arc::from(s.to_string_lossy().as_ref()))),
                    Err(e) => {
                        corrupt.increment(1);
                        tracing::warn!(camera = %id, "skipped: {e}");
                        Feed::Skip
                    }
                }
            }))
        }
        (SourceConfig::Synthetic { .. } | SourceConfig::ImageFolder { .. }, None) => {
            return Err(build_err("this source needs an appsrc named `src` in its template".into()));
        }
        _ => None,
    };

    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        let reason = first_error(&pipeline).unwrap_or_else(|| e.to_string());
        let _ = pipeline.set_state(gst::State::Null);
        if let Some(f) = feeder {
            stop.store(true, Ordering::SeqCst);
            let _ = f.join();
        }
        return Err(CaptureError::Start { camera: cam.id.clone(), msg: redact_credentials(&reason) });
    }
    Ok(Session { pipeline, feeder })
}

/// Sleeps up to `d`, waking early when `stop` is set. Returns false if stopped.
fn nap(d: Duration, stop: &AtomicBool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(d));
    }
    !stop.load(Ordering::SeqCst)
}

/// Starts a camera. Frames go to `tx`. A bad template or a missing plugin is an error here.
/// Files, folders and the synthetic line that cannot start are errors too; live cameras
/// (V4L2, RTSP, GigE) that cannot start, fail, or end unexpectedly are reconnected with capped
/// exponential backoff, and their state (`up`, `reconnecting`, `failed` after
/// `reconnect_fail_after` attempts in a row) is reported through `on_state` and
/// `kensa_camera_state`. A failed camera keeps being retried at the capped interval.
pub fn start(cam: &CameraConfig, tx: mpsc::Sender<Frame>, on_state: StateFn) -> Result<Camera, CaptureError> {
    init(&cam.id)?;
    let seq = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let live = cam.source.is_live();
    let first = match open(cam, &tx, &seq, &stop) {
        Ok(s) => Some(s),
        // Not retried: the camera is failed from the start (shown, and alerted on, as such).
        Err(e @ CaptureError::Build { .. }) => {
            set_state(&cam.id, CameraState::Failed, &e.to_string(), &on_state);
            return Err(e);
        }
        Err(e) if !live => {
            set_state(&cam.id, CameraState::Failed, &e.to_string(), &on_state);
            return Err(e);
        }
        Err(e) => {
            tracing::warn!(camera = %cam.id, "{e}; will retry");
            None
        }
    };
    if first.is_some() {
        set_state(&cam.id, CameraState::Up, "", &on_state);
    }
    let (id, stop2, cam2) = (cam.id.clone(), stop.clone(), cam.clone());
    let thread = std::thread::Builder::new()
        .name(format!("cam-{id}"))
        .spawn(move || {
            if !live {
                let session = first.expect("non-live cameras start synchronously");
                let outcome = watch(&id, &session.pipeline, &stop2, &seq);
                stop2.store(true, Ordering::SeqCst);
                session.close();
                match &outcome {
                    Outcome::Ended { .. } => set_state(&id, CameraState::Ended, "", &on_state),
                    Outcome::Failed { reason, .. } => set_state(&id, CameraState::Failed, reason, &on_state),
                }
                return outcome;
            }
            supervise(&cam2, first, &tx, &seq, &stop2, &on_state)
        })
        .map_err(|e| CaptureError::Start { camera: cam.id.clone(), msg: redact_credentials(&e.to_string()) })?;
    Ok(Camera { id: cam.id.clone(), stop, thread: Some(thread) })
}

/// Keeps a live camera running: reconnects with capped exponential backoff until stopped.
fn supervise(
    cam: &CameraConfig,
    mut session: Option<Session>,
    tx: &mpsc::Sender<Frame>,
    seq: &Arc<AtomicU64>,
    stop: &Arc<AtomicBool>,
    on_state: &StateFn,
) -> Outcome {
    let id = cam.id.as_str();
    let initial = Duration::from_millis(cam.reconnect_initial_ms.max(10));
    let cap = Duration::from_secs(cam.reconnect_max_s.max(1));
    let mut failures: u32 = if session.is_some() { 0 } else { 1 };
    let mut last_reason = String::from("could not start");
    loop {
        if let Some(s) = session.take() {
            let before = seq.load(Ordering::SeqCst);
            let started = Instant::now();
            let outcome = watch(id, &s.pipeline, stop, seq);
            s.close();
            if stop.load(Ordering::SeqCst) {
                set_state(id, CameraState::Ended, "stopped", on_state);
                return Outcome::Ended { frames: seq.load(Ordering::SeqCst) };
            }
            last_reason = match outcome {
                Outcome::Failed { reason, .. } => reason,
                Outcome::Ended { .. } => "unexpected end of stream".into(),
            };
            // A session that delivered frames for a while resets the backoff; one that delivers a
            // frame and drops (a flapping camera) does not, or it would reconnect at full speed
            // for ever.
            let healthy = seq.load(Ordering::SeqCst) > before && started.elapsed() >= STABLE_SESSION;
            failures = if healthy { 1 } else { failures + 1 };
        }
        if tx.is_closed() {
            return Outcome::Ended { frames: seq.load(Ordering::SeqCst) };
        }
        let delay = jitter(initial.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(cap));
        let state = if failures >= cam.reconnect_fail_after { CameraState::Failed } else { CameraState::Reconnecting };
        set_state(id, state, &last_reason, on_state);
        metrics::counter!(m::CAMERA_RECONNECTS, "camera" => id.to_string()).increment(1);
        tracing::warn!(
            camera = id,
            attempt = failures,
            delay_ms = delay.as_millis() as u64,
            state = state.as_str(),
            "camera down ({last_reason}); reconnecting"
        );
        if !nap(delay, stop) {
            set_state(id, CameraState::Ended, "stopped", on_state);
            return Outcome::Ended { frames: seq.load(Ordering::SeqCst) };
        }
        match open(cam, tx, seq, stop) {
            Ok(s) => {
                tracing::info!(camera = id, "camera reconnected");
                set_state(id, CameraState::Up, "", on_state);
                session = Some(s);
            }
            Err(e @ CaptureError::Build { .. }) => {
                set_state(id, CameraState::Failed, &e.to_string(), on_state);
                return Outcome::Failed { frames: seq.load(Ordering::SeqCst), reason: e.to_string() };
            }
            Err(e) => {
                failures += 1;
                last_reason = e.to_string();
            }
        }
    }
}

/// Watches the bus until end of stream, an error, or a stop request.
fn watch(id: &str, pipeline: &gst::Pipeline, stop: &AtomicBool, seq: &AtomicU64) -> Outcome {
    let bus = pipeline.bus().expect("a pipeline has a bus");
    let mut eos_sent: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) && eos_sent.is_none() {
            pipeline.send_event(gst::event::Eos::new());
            eos_sent = Some(Instant::now());
        }
        if eos_sent.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
            tracing::warn!(camera = id, "no end-of-stream 3 s after stop; closing the pipeline");
            return Outcome::Ended { frames: seq.load(Ordering::SeqCst) };
        }
        let Some(msg) = bus.timed_pop_filtered(
            gst::ClockTime::from_mseconds(100),
            &[gst::MessageType::Eos, gst::MessageType::Error, gst::MessageType::Warning],
        ) else {
            continue;
        };
        match msg.view() {
            gst::MessageView::Eos(_) => {
                tracing::info!(camera = id, frames = seq.load(Ordering::SeqCst), "camera reached end of stream");
                return Outcome::Ended { frames: seq.load(Ordering::SeqCst) };
            }
            gst::MessageView::Error(err) => {
                let element = err.src().map_or_else(|| "pipeline".into(), |s| s.path_string().to_string());
                let reason = match err.debug() {
                    Some(d) => format!("{element}: {} ({d})", err.error()),
                    None => format!("{element}: {}", err.error()),
                };
                let detail = redact_credentials(&err.debug().map(|d| d.to_string()).unwrap_or_default());
                let error = redact_credentials(&err.error().to_string());
                tracing::error!(camera = id, element = %element, detail = %detail, "camera failed: {error}");
                metrics::counter!(m::CAMERA_ERRORS, "camera" => id.to_string()).increment(1);
                return Outcome::Failed { frames: seq.load(Ordering::SeqCst), reason: redact_credentials(&reason) };
            }
            gst::MessageView::Warning(w) => {
                let element = w.src().map(|s| s.path_string().to_string()).unwrap_or_default();
                tracing::warn!(camera = id, element = %element, "{}", redact_credentials(&w.error().to_string()));
            }
            _ => {}
        }
    }
}

fn first_error(pipeline: &gst::Pipeline) -> Option<String> {
    let bus = pipeline.bus()?;
    while let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
        if let gst::MessageView::Error(err) = msg.view() {
            let element = err.src().map_or_else(|| "pipeline".into(), |s| s.path_string().to_string());
            let detail = err.debug().map(|d| format!(" ({d})")).unwrap_or_default();
            return Some(format!("{element}: {}{detail}", err.error()));
        }
    }
    None
}

enum Feed {
    /// An image, and the part it shows when known.
    Image(image::RgbImage, Option<Arc<str>>),
    Skip,
    End,
}

/// Feeds an appsrc from a generator: frame `i` → push, paced at `fps` (0 = as fast as the
/// pipeline takes them; appsrc `block=true` gives backpressure), the first frame `phase`
/// periods after the start.
fn spawn_feeder(
    id: String,
    src: gst_app::AppSrc,
    stop: Arc<AtomicBool>,
    fps: f64,
    phase: f64,
    part_ids: Arc<std::sync::Mutex<std::collections::BTreeMap<u64, Arc<str>>>>,
    mut next: impl FnMut(u64) -> Feed + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("feed-{id}"))
        .spawn(move || {
            let period = (fps > 0.0).then(|| Duration::from_secs_f64(1.0 / fps));
            let start = Instant::now();
            let mut pushed = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let (img, part_id) = match next(i) {
                    Feed::End => break,
                    Feed::Skip => {
                        i += 1;
                        continue;
                    }
                    Feed::Image(img, part_id) => (img, part_id),
                };
                i += 1;
                if let Some(p) = period {
                    let due = start + p.mul_f64(pushed as f64 + phase);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                let (w, h) = img.dimensions();
                let caps = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, w, h)
                    .fps(gst::Fraction::new(0, 1))
                    .build()
                    .and_then(|info| info.to_caps());
                let Ok(caps) = caps else { continue };
                // appsrc expects rows padded to 4 bytes for RGB.
                let stride = (w as usize * 3).div_ceil(4) * 4;
                let raw = img.into_raw();
                let data = if stride == w as usize * 3 {
                    raw
                } else {
                    let mut v = vec![0u8; stride * h as usize];
                    for (row, chunk) in raw.chunks_exact(w as usize * 3).enumerate() {
                        v[row * stride..row * stride + chunk.len()].copy_from_slice(chunk);
                    }
                    v
                };
                let mut buf = gst::Buffer::from_mut_slice(data);
                {
                    let b = buf.get_mut().expect("fresh buffer");
                    let pts = period.map_or_else(|| start.elapsed(), |p| p * pushed as u32);
                    b.set_pts(gst::ClockTime::from_nseconds(pts.as_nanos() as u64));
                    if let Some(id) = part_id {
                        part_ids.lock().expect("part ids lock").insert(pts.as_nanos() as u64, id);
                    }
                }
                let sample = gst::Sample::builder().buffer(&buf).caps(&caps).build();
                if src.push_sample(&sample).is_err() {
                    break;
                }
                pushed += 1;
            }
            let _ = src.end_of_stream();
        })
        .expect("spawn feeder thread")
}

/// Copies an appsink sample into a tightly packed RGB frame.
fn frame_from_sample(sample: &gst::Sample, camera: &Arc<str>, seq: u64) -> Option<Frame> {
    let caps = sample.caps()?;
    let info = gst_video::VideoInfo::from_caps(caps).ok()?;
    if info.format() != gst_video::VideoFormat::Rgb {
        return None;
    }
    let buffer = sample.buffer()?;
    let map = buffer.map_readable().ok()?;
    let (w, h) = (info.width() as usize, info.height() as usize);
    let stride = info.stride()[0] as usize;
    let row = w * 3;
    if stride < row || map.len() < stride * (h - 1) + row {
        return None;
    }
    let mut data = Vec::with_capacity(row * h);
    for y in 0..h {
        data.extend_from_slice(&map[y * stride..y * stride + row]);
    }
    Some(Frame {
        camera: camera.clone(),
        seq,
        capture_time: SystemTime::now(),
        captured_at: Instant::now(),
        width: w as u32,
        height: h as u32,
        data,
        part_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cam(source: SourceConfig) -> CameraConfig {
        CameraConfig { source, width: 64, height: 48, queue: 2, ..CameraConfig::for_tests("c") }
    }

    #[test]
    fn describe_quotes_paths_and_sets_caps() {
        let d = describe(&cam(SourceConfig::VideoFile { path: "/tmp/a \"b\".avi".into() }));
        assert!(d.starts_with("filesrc location=\"/tmp/a \\\"b\\\".avi\" ! decodebin"), "{d}");
        assert!(d.contains("width=64,height=48"), "{d}");
        assert!(d.contains("max-buffers=2 drop=false"), "{d}");
        let d =
            describe(&cam(SourceConfig::Rtsp { url: "rtsp://h/s".into(), latency_ms: 50, codec: Default::default() }));
        assert!(d.contains("latency=50") && d.contains("drop=true"), "{d}");
        assert!(d.contains("rtph264depay ! h264parse ! avdec_h264"), "{d}");
        let codec = kensa_core::config::RtspCodec::H265;
        let d = describe(&cam(SourceConfig::Rtsp { url: "rtsp://h/s".into(), latency_ms: 50, codec }));
        assert!(d.contains("rtph265depay ! h265parse ! avdec_h265"), "{d}");
    }

    #[test]
    fn gige_settings_reach_aravissrc() {
        use kensa_core::config::{GigeSettings, PixelFormat};
        let settings = GigeSettings {
            pixel_format: PixelFormat::Mono8,
            exposure_us: Some(5000.0),
            gain_db: Some(2.5),
            trigger: Some("Line1".into()),
            features: Some("BinningHorizontal=2".into()),
        };
        let d = describe(&cam(SourceConfig::Gige { camera: "10.0.0.7".into(), settings }));
        assert!(
            d.starts_with("aravissrc camera-name=\"10.0.0.7\" exposure-auto=off exposure=5000 gain-auto=off gain=2.5"),
            "{d}"
        );
        assert!(d.contains("features=\"TriggerMode=On TriggerSource=Line1 BinningHorizontal=2\""), "{d}");
        assert!(d.contains("! video/x-raw,format=GRAY8 ! videoconvert"), "{d}");
        let d = describe(&cam(SourceConfig::Gige { camera: "c".into(), settings: GigeSettings::default() }));
        assert!(d.contains("aravissrc camera-name=\"c\" ! video/x-bayer ! bayer2rgb ! videoconvert"), "{d}");
    }
}
