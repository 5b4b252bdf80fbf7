//! Learning from the line: an operator's answers and Kensa's own confident verdicts grow a
//! product's bank between enrollments, without letting a defect teach it that defects are
//! normal. Every change is a new bank version (`kensa_model::versions`).
//!
//! # Layout
//! - [`update`]: the bank changes themselves: a frame becomes a reference (only its patches the
//!   bank explains worst are added, within a budget of learned references), a learned
//!   reference is taken out again, a confirmed defect joins the calibration's positives.
//! - [`learner`]: one camera's learner: the frames it still holds (a bounded ring), operator
//!   answers (duplicates and conflicts: the last answer wins, counted), the guards of
//!   self-enrollment (`learn = "auto"`), and its counters. The daemon and `kensa replay` use it
//!   alike, so what replay measures is what the daemon does.

pub mod learner;
pub mod update;

pub use kensa_model::lineage::{Label, Source};

pub use kensa_core::config::LearnMode;

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error(transparent)]
    Model(#[from] kensa_model::ModelError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, LearnError>;
