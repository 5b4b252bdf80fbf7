//! Operator feedback: what an operator (or an MES) says a frame was, by its event id. It arrives
//! on the feedback topic (`kensa.v1.Feedback`) or `POST /v1/feedback`, and the model stage's
//! learner acts on it.

use serde::{Deserialize, Serialize};

/// What a frame was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    Normal,
    Defect,
}

impl Label {
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Normal => "normal",
            Label::Defect => "defect",
        }
    }
}

impl std::str::FromStr for Label {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "normal" | "good" | "ok" => Ok(Label::Normal),
            "defect" | "anomalous" | "bad" | "ng" => Ok(Label::Defect),
            other => Err(format!("`{other}` is not a label (normal or defect)")),
        }
    }
}

/// One answer about one frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    /// The event's `event_id` (`<camera>/<run>/<seq>`).
    pub event_id: String,
    pub label: Label,
    /// Who answered (an operator id, a station): for the log.
    #[serde(default)]
    pub who: String,
    /// Cells the operator marked (AnomalyGPT's grid names), if any: for the record.
    #[serde(default)]
    pub cells: Vec<String>,
}

impl Feedback {
    /// The first problem with it, if any: the event id must look like one Kensa makes.
    pub fn problem(&self) -> Option<String> {
        let parts: Vec<&str> = self.event_id.split('/').collect();
        if self.event_id.len() > 200 || parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
            return Some(format!(
                "event_id `{}` is not <camera>/<run>/<seq>",
                self.event_id.chars().take(80).collect::<String>()
            ));
        }
        if self.who.len() > 200 || self.cells.len() > 9 {
            return Some("who (at most 200 bytes) or cells (at most 9)".into());
        }
        None
    }
}

/// What became of an answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum FeedbackResult {
    /// The bank changed: its new version.
    Changed { product: String, bank_version: String },
    /// The same answer as before for that frame.
    Duplicate,
    /// The frame is no longer held (or never was): nothing changed.
    NotHeld,
    /// The frame's product does not learn (`learn = "off"`).
    LearningOff { product: String },
    /// The learner failed on it (logged).
    Failed { reason: String },
}

impl FeedbackResult {
    /// The metric label of this result.
    pub fn as_str(&self) -> &'static str {
        match self {
            FeedbackResult::Changed { .. } => "changed",
            FeedbackResult::Duplicate => "duplicate",
            FeedbackResult::NotHeld => "not_held",
            FeedbackResult::LearningOff { .. } => "learning_off",
            FeedbackResult::Failed { .. } => "failed",
        }
    }
}

/// A question about a held frame (`POST /v1/frames/{event_id}/ask`), after the earlier turns
/// of the dialogue (the client keeps them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    pub question: String,
    #[serde(default)]
    pub history: Vec<Exchange>,
}

impl Question {
    /// Longest question or earlier answer, in characters, and most earlier turns.
    pub const MAX_CHARS: usize = 500;
    pub const MAX_HISTORY: usize = 6;

    /// What is wrong with it, if anything (a bounded prompt: the model's time and memory grow
    /// with it).
    pub fn problem(&self) -> Option<String> {
        let long = |t: &str| t.chars().count() > Self::MAX_CHARS;
        if self.question.trim().is_empty() || long(&self.question) {
            return Some(format!("a question of 1 to {} characters", Self::MAX_CHARS));
        }
        if self.history.len() > Self::MAX_HISTORY {
            return Some(format!("at most {} earlier turns in history", Self::MAX_HISTORY));
        }
        self.history
            .iter()
            .any(|e| long(&e.question) || long(&e.answer))
            .then(|| format!("history: each question and answer at most {} characters", Self::MAX_CHARS))
    }
}

/// One earlier question and its answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    pub question: String,
    pub answer: String,
}

/// What became of a question.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AskResult {
    /// `verdict`: the frame's verdict (the dialogue's first answer); `source`: `model`, or
    /// `facts` when the model's answer would have contradicted them.
    Answered {
        event_id: String,
        verdict: String,
        question: String,
        answer: String,
        source: String,
        tokens: usize,
        seconds: f64,
    },
    /// The frame is no longer held by the console.
    NotHeld,
    /// Over the language-model budget (`judges.budget_per_s`), or a question is being answered.
    Busy,
    Failed {
        reason: String,
    },
}
