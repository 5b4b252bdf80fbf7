//! Offline evaluation and still-image scoring: everything Kensa does with image files rather
//! than cameras — `kensa eval` (few-shot detection metrics on MVTec-layout data, with its HTML
//! report), `kensa score` (maps and verdicts of still images), the heat overlays both draw, and
//! the detection metrics they compute.
//!
//! # Layout
//!
//! - [`eval`]: `kensa eval` — its options ([`EvalArgs`]), the runs (references drawn per run,
//!   enrollment, scoring, the calibrated and language-model judges), the printed tables, the
//!   `--json` file and the `--report` HTML page.
//! - [`score`]: `kensa score` — its options ([`ScoreArgs`]) and the scorer that writes
//!   `<stem>.json`, with `--maps full|feature` `<stem>_map.npy` and, with `--overlay`, `<stem>_overlay.png` per image.
//! - [`ask`]: `kensa ask` — the verdict on an image, then questions about it answered by the
//!   instruction model (`kensa_lm::ask`).
//! - [`replay`]: `kensa replay` — images as one camera's stream with the daemon's learning
//!   (`kensa_learn`), each frame scored before what it teaches.
//! - [`stream`]: `kensa eval --stream` — the prequential protocol: learning off, feedback and
//!   auto against a static bank.
//! - [`overlay`]: the anomaly map as a heat overlay on its image, and side-by-side panels
//!   (image | ground truth | overlay).
//! - [`metrics`]: image AUROC, pixel AUROC, PRO (to 30 % FPR), verdict accuracy and F1.
//!
//! Every failure is an [`EvalError`]; the binary maps it, and the outcomes'
//! `exit_code`s, to its exit status.

pub mod ask;
pub mod eval;
pub mod metrics;
pub mod replay;
pub mod stream;
pub use kensa_verdict::overlay;
pub mod score;

pub use eval::{EvalArgs, EvalOutcome};
pub use score::{ScoreArgs, ScoreOutcome};

use std::path::{Path, PathBuf};

/// Why `kensa eval` or `kensa score` stopped.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file or folder that could not be created or written (`op`: "create", "write").
    #[error("cannot {op} {}: {source}", path.display())]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    /// An image, mask or data-set folder that could not be read (the error names the file).
    #[error(transparent)]
    Image(#[from] kensa_capture::images::ImageError),
    /// The backbone, a bank, the enrollment recipe or scoring.
    #[error(transparent)]
    Model(#[from] kensa_model::ModelError),
    /// The language-model judge (`kensa eval --lm`).
    #[error(transparent)]
    Lm(#[from] kensa_lm::LmError),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Arguments or a data set that cannot be evaluated as asked (says what and where).
    #[error("{what}")]
    Data { what: String },
    /// The thread that decodes images for `kensa score` panicked.
    #[error("the image loader thread panicked")]
    Loader,
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// `map_err` adapter: an I/O error of `op` ("create", "write") on `path`.
pub(crate) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> EvalError + 'a {
    move |source| EvalError::Io { op, path: path.to_path_buf(), source }
}
