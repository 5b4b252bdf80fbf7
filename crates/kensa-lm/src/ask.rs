//! Asking about a frame, AnomalyGPT's dialogue: the first answer is the verdict (in its exact
//! words); follow-up questions are answered greedily by an instruction model (SmolLM2) from the
//! facts the map gives (regions, cells, boxes, areas, peak against the decision), put in the
//! prompt as text. Answers are deterministic and bounded in tokens, and never contradict the
//! verdict: a yes/no question about the part's state gets its first word from the verdict, and
//! an answer that denies the verdict or names a cell that holds no region is replaced by the
//! facts themselves (`source: facts`).

use crate::generate::ChatModel;
use crate::{LmError, Result};
use kensa_core::grid::Cell;
use kensa_verdict::Verdict;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// One region as the prompt states it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RegionFact {
    pub cell: Cell,
    /// x0, y0, x1, y1 in pixels.
    pub bbox: [u32; 4],
    /// Percent of the image.
    pub area_pct: f32,
    /// Its peak over the image decision.
    pub peak_ratio: f32,
}

/// What the map and the verdict say about a frame.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Facts {
    pub product: String,
    pub anomalous: bool,
    /// The verdict sentence (AnomalyGPT's grammar).
    pub verdict: String,
    pub confidence: f32,
    pub score: f32,
    pub decision: f32,
    pub width: u32,
    pub height: u32,
    pub regions: Vec<RegionFact>,
}

impl Facts {
    pub fn new(product: &str, v: &Verdict, decision: f32, size: (u32, u32)) -> Self {
        Self::from_parts(product, (&v.answer, v.anomalous, v.confidence, v.score), &v.regions, decision, size)
    }

    /// From a verdict's parts: (answer, anomalous, confidence, score), its regions.
    pub fn from_parts(
        product: &str,
        (answer, anomalous, confidence, score): (&str, bool, f32, f32),
        regions: &[kensa_verdict::Region],
        decision: f32,
        (width, height): (u32, u32),
    ) -> Self {
        let px = f64::from(width.max(1)) * f64::from(height.max(1));
        Self {
            product: product.to_string(),
            anomalous,
            verdict: answer.to_string(),
            confidence,
            score,
            decision,
            width,
            height,
            regions: regions
                .iter()
                .map(|r| RegionFact {
                    cell: r.cell,
                    bbox: r.bbox,
                    area_pct: (100.0 * f64::from(r.area) / px) as f32,
                    peak_ratio: r.peak / decision.max(1e-9),
                })
                .collect(),
        }
    }

    /// The cells that hold a region.
    /// The cells that hold a region, and those the verdict names (the language-model judge
    /// may name a place where the map found no region).
    pub fn cells(&self) -> Vec<Cell> {
        let mut c: Vec<Cell> = Vec::new();
        let named = kensa_core::grid::parse_answer(&self.verdict).unwrap_or_default();
        for cell in self.regions.iter().map(|r| r.cell).chain(named) {
            if !c.contains(&cell) {
                c.push(cell);
            }
        }
        c
    }

    /// The facts as the system prompt states them.
    pub fn prompt(&self) -> String {
        let mut s = format!(
            "You are Kensa, an inspection assistant on a production line. You answer questions about one \
             photo of a {product} part. Use only these facts and answer in one or two short sentences.\n\
             Facts:\n- Verdict: {verdict}\n- The part is {state}.\n- Anomaly score {score:.3}; the decision level is \
             {decision:.3}; confidence {conf:.0}%.\n- The image is {w} x {h} pixels, cut into a 3 x 3 grid.\n",
            product = self.product,
            verdict = self.verdict,
            state = if self.anomalous { "defective: it has an anomaly" } else { "normal: it has no anomaly" },
            score = self.score,
            decision = self.decision,
            conf = self.confidence * 100.0,
            w = self.width,
            h = self.height,
        );
        for (i, r) in self.regions.iter().enumerate() {
            s.push_str(&format!(
                "- Anomaly {}: at the {} of the image; its size is {} x {} pixels ({:.1}% of the image); box from ({}, {}) to ({}, {}); peak {:.1} times the decision level.\n",
                i + 1,
                r.cell.name(),
                r.bbox[2].saturating_sub(r.bbox[0]),
                r.bbox[3].saturating_sub(r.bbox[1]),
                r.area_pct,
                r.bbox[0],
                r.bbox[1],
                r.bbox[2],
                r.bbox[3],
                r.peak_ratio
            ));
        }
        s
    }

    /// The facts as an answer, when the model's would contradict them.
    pub fn summary(&self) -> String {
        match self.regions.iter().max_by(|a, b| a.area_pct.total_cmp(&b.area_pct)) {
            Some(r) if self.anomalous => format!(
                "{} The largest region is at the {} of the image, {} x {} pixels ({:.1}% of the image), its peak {:.1} times the decision level.",
                self.verdict,
                r.cell.name(),
                r.bbox[2].saturating_sub(r.bbox[0]),
                r.bbox[3].saturating_sub(r.bbox[1]),
                r.area_pct,
                r.peak_ratio
            ),
            _ if self.score < self.decision => {
                format!("{} Its score {:.3} is below the decision level {:.3}.", self.verdict, self.score, self.decision)
            }
            _ => self.verdict.clone(),
        }
    }
}

/// Where an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The verdict itself (the first answer).
    Verdict,
    /// The instruction model, from the facts.
    Model,
    /// The facts, because the model's answer contradicted them.
    Facts,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Verdict => "verdict",
            Source::Model => "model",
            Source::Facts => "facts",
        }
    }
}

/// One question and its answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub question: String,
    pub answer: String,
    pub source: Source,
    /// Tokens generated and seconds taken (0 for the verdict).
    #[serde(default)]
    pub tokens: usize,
    #[serde(default)]
    pub seconds: f64,
}

/// What a question asks, as far as the verdict is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asks {
    /// A yes/no question about whether the part has a defect (`normal`: it asks whether the
    /// part is fine, so "yes" means no defect).
    State {
        normal: bool,
    },
    Other,
}

const AUX: [&str; 14] =
    ["is", "are", "does", "do", "did", "was", "were", "has", "have", "can", "could", "any", "should", "will"];
const NORMAL_WORDS: [&str; 8] = ["normal", "fine", "ok", "okay", "good", "acceptable", "flawless", "perfect"];
const DEFECT_WORDS: [&str; 12] =
    ["anomal", "defect", "damage", "scratch", "crack", "broken", "wrong", "problem", "flaw", "fault", "bad", "reject"];

fn words(s: &str) -> Vec<String> {
    s.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_string).collect()
}

/// Classifies a question: a yes/no question (it starts with an auxiliary verb) about the part's
/// state, or anything else.
pub fn classify(question: &str) -> Asks {
    let w = words(question);
    let Some(first) = w.first() else { return Asks::Other };
    // A negated question ("Is it not defective?", "Isn't it fine?") is left to the model.
    let negated = w.iter().any(|x| x == "not" || x == "never") || question.to_lowercase().contains("n't");
    if !AUX.contains(&first.as_str()) || negated {
        return Asks::Other;
    }
    let has = |list: &[&str]| w.iter().any(|x| list.iter().any(|k| x.starts_with(k)));
    if has(&DEFECT_WORDS) {
        Asks::State { normal: false }
    } else if has(&NORMAL_WORDS) {
        Asks::State { normal: true }
    } else {
        Asks::Other
    }
}

/// The cells an answer names (longest names first, so "top left" is not also "top").
pub fn cells_named(text: &str) -> Vec<Cell> {
    let mut t = format!(" {} ", words(text).join(" "));
    let mut by_len = Cell::ALL.to_vec();
    by_len.sort_by_key(|c| std::cmp::Reverse(c.name().len()));
    let mut out = Vec::new();
    for c in by_len {
        let needle = format!(" {} ", c.name());
        let alias = (c == Cell::Center).then_some(" centre ");
        for n in std::iter::once(needle.as_str()).chain(alias) {
            while let Some(i) = t.find(n) {
                if !out.contains(&c) {
                    out.push(c);
                }
                t.replace_range(i..i + n.len() - 1, &" ".repeat(n.len() - 1));
            }
        }
    }
    out
}

/// What an answer about an anomalous part must not say ("is fine" does not match "is not fine").
const DENIES_DEFECT: [&str; 22] = [
    "no anomaly",
    "no anomalies",
    "no defect",
    "no flaw",
    "no damage",
    "no problem",
    "no issue",
    "nothing wrong",
    "not defective",
    "not anomalous",
    "not damaged",
    "is normal",
    "is fine",
    "looks fine",
    "is ok",
    "is okay",
    "is good",
    "looks good",
    "looks normal",
    "is acceptable",
    "is flawless",
    "is perfect",
];
/// What an answer about a normal part must not say.
const CLAIMS_DEFECT: [&str; 16] = [
    "there is an anomaly",
    "there are anomalies",
    "there is a defect",
    "there are defects",
    "is defective",
    "is anomalous",
    "is damaged",
    "is broken",
    "has a defect",
    "has an anomaly",
    "has a flaw",
    "is not fine",
    "is not normal",
    "is not ok",
    "is not good",
    "is not acceptable",
];

/// Why an answer contradicts the facts, if it does.
pub fn contradiction(facts: &Facts, answer: &str) -> Option<String> {
    let a = format!(" {} ", words(answer).join(" "));
    let says = |list: &[&str]| list.iter().find(|p| a.contains(&format!(" {p} "))).map(|p| (*p).to_string());
    if facts.anomalous {
        if let Some(p) = says(&DENIES_DEFECT) {
            return Some(format!("says `{p}` of an anomalous part"));
        }
    } else if let Some(p) = says(&CLAIMS_DEFECT) {
        return Some(format!("says `{p}` of a normal part"));
    }
    let cells = facts.cells();
    let wrong: Vec<&str> = cells_named(answer).into_iter().filter(|c| !cells.contains(c)).map(Cell::name).collect();
    (!wrong.is_empty()).then(|| format!("names {} where no region is", wrong.join(", ")))
}

/// The longest prompt an answer starts from (facts, turns and question), in tokens.
pub const MAX_PROMPT_TOKENS: usize = 1024;

/// An instruction model that answers questions about frames.
pub struct Asker {
    pub chat: ChatModel,
    /// Most tokens per answer.
    pub max_new_tokens: usize,
}

impl Asker {
    /// The first answer of a dialogue: the verdict.
    pub fn first(facts: &Facts) -> Turn {
        Turn {
            question: "Is there any anomaly in the image?".into(),
            answer: facts.verdict.clone(),
            source: Source::Verdict,
            tokens: 0,
            seconds: 0.0,
        }
    }

    /// Answers `question` after the earlier `turns` (the verdict first, when given).
    pub fn ask(&self, facts: &Facts, turns: &[Turn], question: &str) -> Result<Turn> {
        let question = question.trim();
        if question.is_empty() || question.chars().count() > 500 {
            return Err(LmError::Decode("a question of 1 to 500 characters".into()));
        }
        let t0 = Instant::now();
        // The facts, the last turns (fewer while the prompt is over its bound) and the question.
        let mut keep = turns.len().min(6);
        let mut prompt = loop {
            let mut messages = vec![crate::bpe::Message::new("system", &facts.prompt())];
            for t in &turns[turns.len() - keep..] {
                messages.push(crate::bpe::Message::new("user", &t.question));
                messages.push(crate::bpe::Message::new("assistant", &t.answer));
            }
            messages.push(crate::bpe::Message::new("user", question));
            let ids = self.chat.tokenizer.encode_chat(&messages, true)?;
            if ids.len() <= MAX_PROMPT_TOKENS || keep == 0 {
                break ids;
            }
            keep -= 1;
        };
        if prompt.len() > MAX_PROMPT_TOKENS {
            return Err(LmError::Decode(format!("the prompt is {} tokens, over {MAX_PROMPT_TOKENS}", prompt.len())));
        }
        // A yes/no question about the part's state starts with the verdict's word.
        let lead = lead(facts, question);
        prompt.extend(self.chat.tokenizer.encode(lead)?);
        let out = self.chat.generate(&prompt, self.max_new_tokens)?;
        let ids: &[i64] = match out.last() {
            Some(&l) if Some(l) == self.chat.tokenizer.eos => &out[..out.len() - 1],
            _ => &out,
        };
        let text = format!("{lead}{}", self.chat.tokenizer.decode(ids, true)).trim().to_string();
        let text = finish_sentence(&text);
        let (answer, source) = match contradiction(facts, &text) {
            Some(why) => {
                tracing::info!(question, answer = %text, "the model's answer {why}: the facts answer instead");
                (with_lead(lead, &facts.summary()), Source::Facts)
            }
            None if text.is_empty() => (facts.summary(), Source::Facts),
            None => (text, Source::Model),
        };
        Ok(Turn {
            question: question.to_string(),
            answer,
            source,
            tokens: out.len(),
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

/// The first word of the answer, when the verdict gives it: a yes/no question about the part's
/// state; one that asks about a place is "No," where no region is there.
fn lead(facts: &Facts, question: &str) -> &'static str {
    match classify(question) {
        Asks::State { normal } => {
            let places = cells_named(question);
            let there = places.is_empty() || places.iter().any(|c| facts.cells().contains(c));
            let defect_there = facts.anomalous && there;
            if defect_there != normal {
                "Yes,"
            } else {
                "No,"
            }
        }
        Asks::Other => "",
    }
}

/// The facts' answer under a yes/no lead (which the verdict gave, so they agree).
fn with_lead(lead: &str, summary: &str) -> String {
    if lead.is_empty() {
        summary.to_string()
    } else {
        format!("{lead} {}", summary.trim_start_matches("Yes, ").trim_start_matches("No, "))
    }
}

/// Cuts an answer stopped by the token bound back to its last full sentence.
fn finish_sentence(text: &str) -> String {
    if text.ends_with(['.', '!', '?']) {
        return text.to_string();
    }
    match text.rfind(['.', '!', '?']) {
        Some(i) if i > 10 => text[..=i].to_string(),
        _ => format!("{}…", text.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(anomalous: bool) -> Facts {
        Facts {
            product: "bottle".into(),
            anomalous,
            verdict: if anomalous {
                "Yes, there is an anomaly in the image, at the top left of the image.".into()
            } else {
                kensa_core::grid::NORMAL_ANSWER.into()
            },
            confidence: 0.9,
            score: 0.3,
            decision: 0.2,
            width: 300,
            height: 300,
            regions: if anomalous {
                vec![RegionFact { cell: Cell::TopLeft, bbox: [10, 10, 60, 40], area_pct: 1.2, peak_ratio: 1.5 }]
            } else {
                vec![]
            },
        }
    }

    #[test]
    fn yes_no_questions_about_the_part_are_recognised() {
        assert_eq!(classify("Is there a defect?"), Asks::State { normal: false });
        assert_eq!(classify("Are there any anomalies?"), Asks::State { normal: false });
        assert_eq!(classify("Is the part fine?"), Asks::State { normal: true });
        assert_eq!(classify("Is it OK to ship?"), Asks::State { normal: true });
        assert_eq!(classify("Where is it?"), Asks::Other);
        assert_eq!(classify("What kind of defect could it be?"), Asks::Other, "not a yes/no question");
        assert_eq!(classify("Is it large?"), Asks::Other);
        assert_eq!(classify("Is it not defective?"), Asks::Other, "negated: left to the model");
        assert_eq!(classify("Isn't it fine?"), Asks::Other);
        assert_eq!(classify("Is a defect present?"), Asks::State { normal: false });
    }

    #[test]
    fn cells_are_found_longest_first() {
        assert_eq!(cells_named("It is at the top left of the image."), vec![Cell::TopLeft]);
        assert_eq!(cells_named("At the top, and the bottom right."), vec![Cell::BottomRight, Cell::Top]);
        assert_eq!(cells_named("In the centre."), vec![Cell::Center]);
        assert!(cells_named("The stopper is fine.").is_empty(), "`top` inside a word is no cell");
    }

    #[test]
    fn contradictions_are_caught() {
        let bad = facts(true);
        assert!(contradiction(&bad, "There is no anomaly here.").is_some());
        assert!(contradiction(&bad, "No, the part is fine.").is_some());
        assert!(contradiction(&bad, "No, the part is not fine.").is_none());
        assert!(contradiction(&bad, "The scratch is at the bottom right.").is_some(), "no region there");
        assert!(contradiction(&bad, "It is at the top left, a small dent.").is_none());
        let good = facts(false);
        assert!(contradiction(&good, "Yes, there is an anomaly in the image.").is_some());
        assert!(contradiction(&good, "The part looks normal.").is_none());
        assert!(contradiction(&good, "Yes, the part is fine.").is_none());
        assert!(contradiction(&good, "No, the part is not fine.").is_some());
        assert!(contradiction(&good, "A mark at the center.").is_some(), "no region at all");
        assert!(good.summary().starts_with("No, there is no anomaly"));
        assert!(bad.summary().contains("top left") && bad.summary().contains("50 x 30 pixels"));
        assert_eq!(with_lead("No,", &good.summary()).matches("No,").count(), 1);
        assert!(contradiction(&good, "This goodness is plain.").is_none(), "words, not parts of words");
        assert_eq!(lead(&bad, "Is there a defect at the top left?"), "Yes,");
        assert_eq!(lead(&bad, "Is there a defect at the bottom right?"), "No,", "no region there");
        assert_eq!(lead(&bad, "Is the part fine?"), "No,");
        assert_eq!(lead(&good, "Is there a scratch?"), "No,");
        assert_eq!(lead(&good, "Where is it?"), "");
    }

    #[test]
    fn answers_cut_at_the_bound_end_at_a_sentence() {
        assert_eq!(finish_sentence("It is small. It is at the"), "It is small.");
        assert_eq!(finish_sentence("Done."), "Done.");
    }
}
