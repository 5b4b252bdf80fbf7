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
/// precision is emulated on this CPU. Without a path of the user's, the precision picks the
/// export [`default_backbone_for`] names: with `auto`, bf16 on a CPU with AMX, fp32
/// elsewhere. The choice is logged, and shown in `kensa_model_info`.
pub fn load_backbone(
    path: Option<&std::path::Path>,
    device: Device,
    precision: Precision,
) -> Result<backbone::Backbone> {
    let device = torch_device(device)?;
    let (path, precision) = match path {
        Some(p) => (p.to_path_buf(), precision),
        None => {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let (p, chosen, why) = default_backbone_for(precision, device, &cpuinfo);
            if precision == Precision::Auto {
                tracing::info!(backbone = %p.display(), precision = chosen.as_str(), "model.precision = auto: {why}");
            }
            (p, chosen)
        }
    };
    let backbone = backbone::Backbone::load(&path, device)?.with_precision(precision_kind(precision))?;
    if let Some(w) = backbone.precision_warning() {
        tracing::warn!("{w}");
    }
    Ok(backbone)
}

/// The CPU flag (`/proc/cpuinfo`) under which `precision = "auto"` takes the bf16 export: AMX,
/// where the bf16 export scored 162 bottle images in 3.09 s against 3.96 s in fp32 (issue #24).
/// Not AVX-512 BF16 alone: on an Intel Xeon with it and without AMX (family 6, model 207) the
/// bf16 export is slower than fp32, 37-39 against 43-48 img/s (`kensa score`, 181 images,
/// 2026-12-08, docs/performance.md).
const AUTO_BF16_FLAG: &str = "amx_bf16";

/// The default backbone export for a precision, and the precision it runs in: the fp32
/// export ([`default_backbone_path`]) or its `-bf16`/`-fp16` sibling (which
/// `scripts/setup.sh` makes; a frozen export cannot be cast). `auto` takes the bf16 export
/// on a CPU whose `cpuinfo` flags show AMX ([`AUTO_BF16_FLAG`]) when that file exists, and
/// fp32 everywhere else (GPUs included: their reduced precisions are chosen with
/// `model.precision`). Also returns why, for the log.
pub fn default_backbone_for(precision: Precision, device: tch::Device, cpuinfo: &str) -> (PathBuf, Precision, String) {
    backbone_for(default_backbone_path(), precision, device, cpuinfo)
}

/// [`default_backbone_for`] with the fp32 export at `fp32`.
fn backbone_for(
    fp32: PathBuf,
    precision: Precision,
    device: tch::Device,
    cpuinfo: &str,
) -> (PathBuf, Precision, String) {
    let stem = fp32.file_stem().unwrap_or_default().to_string_lossy().into_owned();
    let dir = fp32.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let sibling = |tag: &str| dir.join(format!("{stem}-{tag}.pt"));
    match precision {
        Precision::Fp32 => (fp32, precision, "fp32 asked".into()),
        Precision::Bf16 if sibling("bf16").is_file() => (sibling("bf16"), precision, "bf16 asked".into()),
        Precision::Fp16 if sibling("fp16").is_file() => (sibling("fp16"), precision, "fp16 asked".into()),
        // No export in that precision: the fp32 one, cast (an error if it is frozen, which says what to do).
        Precision::Bf16 | Precision::Fp16 => (fp32, precision, "no export in that precision".into()),
        Precision::Auto => {
            if device != tch::Device::Cpu {
                return (fp32, Precision::Fp32, "fp32 on a GPU (set model.precision to bf16 or fp16)".into());
            }
            let amx = backbone::cpu_flags(cpuinfo).contains(&AUTO_BF16_FLAG);
            match (amx, sibling("bf16").is_file()) {
                (true, true) => (sibling("bf16"), Precision::Bf16, format!("bf16, as this CPU has {AUTO_BF16_FLAG}")),
                (true, false) => (
                    fp32,
                    Precision::Fp32,
                    format!(
                        "fp32: this CPU has {AUTO_BF16_FLAG} but {} is missing (run scripts/setup.sh)",
                        sibling("bf16").display()
                    ),
                ),
                (false, _) => (
                    fp32,
                    Precision::Fp32,
                    format!("fp32, as this CPU has no {AUTO_BF16_FLAG} (bf16 is faster only with AMX)"),
                ),
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_precision_follows_the_cpu_and_the_exports_at_hand() {
        let dir = std::env::temp_dir().join(format!("kensa-precision-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fp32 = dir.join("bb.pt");
        let bf16 = dir.join("bb-bf16.pt");
        let (avx512, amx, plain) =
            ("flags\t: fpu avx512f avx512_bf16", "flags\t: fpu amx_bf16 amx_tile", "flags\t: fpu avx2");
        let cpu = tch::Device::Cpu;
        let pick = |p, dev, info| {
            let (path, prec, _) = backbone_for(fp32.clone(), p, dev, info);
            (path, prec)
        };
        // No bf16 export yet: fp32 whatever the CPU.
        assert_eq!(pick(Precision::Auto, cpu, amx), (fp32.clone(), Precision::Fp32));
        std::fs::write(&bf16, b"").unwrap();
        assert_eq!(pick(Precision::Auto, cpu, amx), (bf16.clone(), Precision::Bf16));
        // AVX-512 BF16 without AMX: measured slower than fp32, so fp32.
        assert_eq!(pick(Precision::Auto, cpu, avx512), (fp32.clone(), Precision::Fp32));
        assert_eq!(pick(Precision::Auto, cpu, plain), (fp32.clone(), Precision::Fp32));
        assert_eq!(pick(Precision::Auto, tch::Device::Cuda(0), avx512), (fp32.clone(), Precision::Fp32));
        // Asked for: the export in that precision, or the fp32 one to cast.
        assert_eq!(pick(Precision::Fp32, cpu, avx512), (fp32.clone(), Precision::Fp32));
        assert_eq!(pick(Precision::Bf16, cpu, plain), (bf16.clone(), Precision::Bf16));
        assert_eq!(pick(Precision::Fp16, cpu, plain), (fp32.clone(), Precision::Fp16));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
