//! The model stage: a TorchScript backbone (tch), memory banks, and few-shot patch scoring.
//!
//! # Layout
//! - [`augment`]: transformed copies of the references added to a bank (flips, turns, shifts).
//! - [`backbone`]: loads a TorchScript feature extractor and its sidecar JSON, turns images
//!   into locally aggregated, L2-normalised patch features.
//! - [`bank`]: the memory bank file (safetensors + validated metadata + calibration).
//! - [`cli`]: the command-line options of every command that loads a model or builds a bank.
//! - [`engine`]: scores batches of frames against banks: per layer `1 − max cos`, mean over
//!   layers, upsampled and smoothed, at each frame's own resolution.
//! - [`enroll`]: builds a bank from reference images and calibrates the verdict.
//! - [`lineage`]: a learned bank's history (parent, change, learned references, observations).
//! - [`pseudo`]: augmentations and synthetic defects used for calibration.
//! - [`versions`]: bank versions kept beside the bank file; log and rollback.
//!
//! tch tensors are not `Sync`: an [`engine::Engine`] lives on one OS thread.

pub mod augment;
pub mod backbone;
pub mod bank;
pub mod cli;
pub mod engine;
pub mod enroll;
pub mod lineage;
pub mod pseudo;
pub mod versions;

use kensa_core::config::{Device, Precision};
use std::path::PathBuf;

/// Default model input side for enrollment (pixels). Chosen by `kensa eval` on ../shared/data:
/// 320 px lets the stride-8 layer see defects a few pixels wide (VisA pixel AUROC +3 to +4
/// points over 256 px) for 1.6x the backbone time; 384 px gained no more (README,
/// "Evaluation").
pub const DEFAULT_INPUT_SIZE: u32 = 320;

/// Keeps libtorch's large, short-lived tensors in the malloc heap instead of fresh `mmap`s.
///
/// glibc serves allocations above its mmap threshold (128 KiB, adapting up to 32 MiB) with a
/// new mapping and returns it on free, so every batch page-faults its activations and similarity
/// matrices in again: a profile of `kensa score` showed ~15 % of CPU time in the kernel's
/// page-fault path. Raising the mmap and trim thresholds and using a single arena lets freed
/// blocks be reused. Measured
/// on the 2-core CPU, `kensa score --batch 4` on 162 bottle images: 87 → 139 img/s. Call once,
/// first thing in `main`, before any thread starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only changes glibc's allocation parameters; it is called before any other
    // thread exists, and invalid values are rejected by glibc (return value 0), not UB.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        // One arena: per-thread arenas are mmapped heaps that ignore the thresholds above for
        // blocks near their 64 MiB size and shrink eagerly, so the model thread kept faulting
        // (daemon, 1 camera, 16-reference bank: 82 → 22 ms per model batch).
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("backbone {path}: {msg}")]
    Backbone { path: PathBuf, msg: String },
    #[error("bank {path}: {msg}")]
    Bank { path: PathBuf, msg: String },
    #[error("image {path}: {msg}")]
    Image { path: PathBuf, msg: String },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("model.device = cuda, but libtorch sees no CUDA device (is libtorch_cuda linked and a GPU present?)")]
    NoCuda,
    /// An enrollment recipe or its inputs that cannot be used (augmentation, coreset, crop).
    #[error("{0}")]
    Recipe(String),
    /// A TorchScript file whose output is not the list of feature maps Kensa expects.
    #[error("{0}")]
    BackboneOutput(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// The tensor kind a precision asks for; `auto` (None) follows the backbone file.
pub fn precision_kind(precision: Precision) -> Option<tch::Kind> {
    use tch::Kind;
    match precision {
        Precision::Auto => None,
        Precision::Fp32 => Some(Kind::Float),
        Precision::Fp16 => Some(Kind::Half),
        Precision::Bf16 => Some(Kind::BFloat16),
    }
}

/// The libtorch device for `model.device`: `cuda` fails when libtorch sees no GPU.
pub fn torch_device(device: Device) -> Result<tch::Device> {
    match device {
        Device::Cpu => Ok(tch::Device::Cpu),
        Device::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
        Device::Cuda => Err(ModelError::NoCuda),
        Device::Auto => Ok(tch::Device::cuda_if_available()),
    }
}

/// The backbone as the commands and the daemon choose it: `path` (default: $KENSA_BACKBONE,
/// else the one scripts/setup.sh exports) on `device` in `precision`, with a warning when that
/// precision is emulated on this CPU.
pub fn load_backbone(
    path: Option<&std::path::Path>,
    device: Device,
    precision: Precision,
) -> Result<backbone::Backbone> {
    let device = torch_device(device)?;
    let path = path.map_or_else(default_backbone_path, std::path::Path::to_path_buf);
    let backbone = backbone::Backbone::load(&path, device)?.with_precision(precision_kind(precision))?;
    if let Some(w) = backbone.precision_warning() {
        tracing::warn!("{w}");
    }
    Ok(backbone)
}

/// Where the default backbone lives: `$KENSA_BACKBONE`, else
/// `${KENSA_CACHE:-$HOME/.cache/kensa}/models/efficientnet-lite0.pt`.
pub fn default_backbone_path() -> PathBuf {
    if let Ok(p) = std::env::var("KENSA_BACKBONE") {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let cache = std::env::var("KENSA_CACHE").map_or_else(
        |_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache/kensa"),
        PathBuf::from,
    );
    cache.join("models/efficientnet-lite0.pt")
}
