//! Commissioning a camera from its own pipeline: [`grab`] takes frames exactly as scoring will
//! see them (same template, caps, size), for `kensa capture` (reference images to enroll) and
//! `kensa check --probe` (one frame per camera, and what it delivered).

use crate::{start, CaptureError, Outcome, StateFn};
use kensa_core::config::CameraConfig;
use kensa_core::metrics::{CameraState, Label};
use kensa_core::Frame;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// `kensa capture`: reference frames through a configured camera's pipeline.
#[derive(clap::Args, Clone, Debug)]
pub struct CaptureArgs {
    /// Kensa config file (TOML) that defines the camera.
    #[arg(long, value_name = "FILE", env = "KENSA_CONFIG", default_value = kensa_core::config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Id of the camera to capture from.
    #[arg(long)]
    pub camera: String,
    /// Frames to save.
    #[arg(long, default_value_t = 4)]
    pub count: usize,
    /// Keep one frame every this many milliseconds (0: consecutive frames); spread the
    /// references over the line's normal variation.
    #[arg(long, default_value_t = 0)]
    pub every_ms: u64,
    /// Folder to write `<camera>-NNNNNN.png` into (created); enroll from it.
    #[arg(long)]
    pub out: PathBuf,
    /// Give up when no frame arrives for this many seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
}

/// What a camera delivered.
#[derive(Debug, Clone)]
pub struct Probe {
    pub width: u32,
    pub height: u32,
    /// Time from start to the first frame.
    pub first_frame: Duration,
}

/// Starts `cam`, keeps `count` frames (one every `every`, the first as soon as it comes) and
/// stops it. A camera that delivers nothing for `timeout`, or ends or fails before `count`
/// frames, is an error naming why (its last state report, redacted).
pub fn grab(
    cam: &CameraConfig,
    count: usize,
    every: Duration,
    timeout: Duration,
    mut progress: impl FnMut(usize, &Frame),
) -> Result<Vec<Frame>, CaptureError> {
    let (tx, mut rx) = mpsc::channel::<Frame>(4);
    let last_state = Arc::new(Mutex::new(String::new()));
    let seen = last_state.clone();
    let on_state: StateFn = Arc::new(move |_, state: CameraState, detail: &str| {
        *seen.lock().expect("state lock") = format!("{}: {detail}", state.as_str());
    });
    let camera = start(cam, tx, on_state)?;
    let mut kept: Vec<Frame> = Vec::with_capacity(count);
    let mut next_due = Instant::now();
    let mut last_frame = Instant::now();
    let failure = loop {
        if kept.len() >= count {
            break None;
        }
        match rx.try_recv() {
            Ok(f) => {
                last_frame = Instant::now();
                if Instant::now() >= next_due {
                    next_due = Instant::now() + every;
                    progress(kept.len() + 1, &f);
                    kept.push(f);
                }
            }
            Err(mpsc::error::TryRecvError::Empty) => {
                if last_frame.elapsed() > timeout {
                    break Some(format!("no frame for {} s", timeout.as_secs()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(mpsc::error::TryRecvError::Disconnected) => {
                break Some(format!("the camera ended after {} of {count} frames", kept.len()));
            }
        }
    };
    camera.stop();
    drop(rx);
    let outcome = camera.join();
    match failure {
        None => Ok(kept),
        Some(why) => {
            let state = last_state.lock().expect("state lock").clone();
            let reason = match outcome {
                Outcome::Failed { reason, .. } => reason,
                Outcome::Ended { .. } if !state.is_empty() => state,
                Outcome::Ended { .. } => "ended".into(),
            };
            Err(CaptureError::Start { camera: cam.id.clone(), msg: format!("{why} ({reason})") })
        }
    }
}

/// `kensa check --probe`: one frame from the camera, and what it was.
pub fn probe(cam: &CameraConfig, timeout: Duration) -> Result<Probe, CaptureError> {
    let t = Instant::now();
    let frames = grab(cam, 1, Duration::ZERO, timeout, |_, _| {})?;
    let f = &frames[0];
    Ok(Probe { width: f.width, height: f.height, first_frame: t.elapsed() })
}

/// Writes frames as `<dir>/<camera>-NNNNNN.png` (numbered by capture sequence); returns the paths.
pub fn save(frames: &[Frame], dir: &Path) -> Result<Vec<PathBuf>, CaptureError> {
    let io = |path: &Path, e: String| CaptureError::Image { path: path.to_path_buf(), msg: e };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e.to_string()))?;
    frames
        .iter()
        .map(|f| {
            let p = dir.join(format!("{}-{:06}.png", f.camera, f.seq));
            image::save_buffer(&p, &f.data, f.width, f.height, image::ExtendedColorType::Rgb8)
                .map_err(|e| io(&p, e.to_string()))?;
            Ok(p)
        })
        .collect()
}
