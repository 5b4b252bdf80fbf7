//! Where a bank came from: its parent version, the change that made it, the references learned
//! from the line since enrollment (so one can be taken out again) and the labelled
//! observations its calibration was re-fitted with. Stored in the bank's sealed metadata.

use serde::{Deserialize, Serialize};

pub use kensa_core::feedback::Label;

/// Who labelled an observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// An operator's answer (feedback topic, HTTP, `--operator`).
    Operator,
    /// Kensa itself: a frame judged normal with high confidence (`learn = "auto"`).
    Auto,
}

/// A labelled frame's image score, as scored *before* any update it caused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub frame: String,
    pub score: f32,
    pub label: Label,
    pub source: Source,
}

/// A reference learned from the line: its frame and how many patch rows it added to each
/// layer (they sit after the enrolled rows, in the order learned).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LearnedRef {
    pub frame: String,
    pub source: Source,
    pub rows: Vec<i64>,
    /// The factor the decision was scaled by when this reference joined (`[learn] follow`);
    /// divided out again, exactly, when it is answered `defect` and leaves.
    #[serde(default = "unscaled")]
    pub follow_ratio: f32,
}

fn unscaled() -> f32 {
    1.0
}

/// The change that made a bank version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    Enrolled,
    /// A frame became a reference.
    Added {
        frame: String,
        source: Source,
    },
    /// A learned reference was taken out (a `defect` answer, or the budget).
    Removed {
        frame: String,
        reason: String,
    },
    /// A labelled observation re-fitted the calibration only.
    Observed {
        frame: String,
        label: Label,
    },
    /// Copied back from an older version.
    RolledBack {
        to: String,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Enrolled => write!(f, "enrolled"),
            Change::Added { frame, source } => write!(f, "added {frame} ({source:?})"),
            Change::Removed { frame, reason } => write!(f, "removed {frame} ({reason})"),
            Change::Observed { frame, label } => write!(f, "observed {frame} as {}", label.as_str()),
            Change::RolledBack { to } => write!(f, "rolled back to {to}"),
        }
    }
}

/// A learned bank's history and state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// This version: SHA-256 over the tensors' hash, the calibration and the parent, 12 hex.
    pub version: String,
    /// The version it was made from.
    pub parent: String,
    pub change: Change,
    /// Unix seconds of the change.
    pub changed_unix: u64,
    /// Rows per layer of the enrolled references (learned rows follow).
    pub enrolled_rows: Vec<i64>,
    pub learned: Vec<LearnedRef>,
    /// The most recent labelled observations (bounded).
    pub observations: Vec<Observation>,
    /// The calibration's image decision as enrolled (re-fits start from it).
    pub enrolled_threshold: f32,
}
