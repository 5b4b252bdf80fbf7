//! One camera's learner: what it holds of recent frames, operator answers, and the guards of
//! self-enrollment. The caller owns the bank; a call that changes it returns the new one.

use crate::update::{self, Budget};
use crate::{LearnMode, Result};
use image::RgbImage;
use kensa_model::bank::Bank;
use kensa_model::engine::Engine;
use kensa_model::lineage::{Change, Label, Observation, Source};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// The guards of self-enrollment (`learn = "auto"`) and the learner's bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guards {
    /// A frame may join by itself only when its image score is at or below this quantile of
    /// the enrollment's pseudo-normal scores (0.5: their median): it is explained as well as
    /// the references' own transformed copies are, far on the normal side of the decision.
    /// With the highest (1.0) instead, `eval --stream` on magnetic tile (one run) let 6 frames
    /// join and lost 0.025 image AUROC against learning off (docs/learning.md).
    pub normal_quantile: f32,
    /// At least this many ticks (the daemon: seconds; replay: frames × `--interval-s`)
    /// between two frames joining by themselves, so a bank is not filled from one minute.
    pub min_spacing: u64,
    /// Self-enrolled references kept at most (operator references are bounded by the budget).
    pub max_auto: usize,
    /// Frames held for answers (a ring: the oldest goes first).
    pub hold: usize,
    pub budget: Budget,
    /// The decision follows the bank as references join or leave ([`Learner`]'s `follow`).
    pub follow: bool,
}

impl Default for Guards {
    fn default() -> Self {
        Self { normal_quantile: 0.5, min_spacing: 600, max_auto: 16, hold: 64, budget: Budget::default(), follow: true }
    }
}

/// Held frames scored against both banks when the decision follows a change (the newest).
pub const FOLLOW_FRAMES: usize = 8;
/// Fewer held normal frames than this: the decision stays (too little to measure the change).
pub const FOLLOW_MIN: usize = 4;

/// A frame still held for an answer.
struct Held {
    frame: String,
    image: Arc<RgbImage>,
    score: f32,
    /// The learner's [`Learner::scale`] when it was scored: its score on today's scale is
    /// `score * scale_now / scale`.
    scale: f32,
}

/// What an answer did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The bank changed (the new version).
    Changed(String),
    /// The same answer again: nothing to do.
    Duplicate,
    /// The frame is no longer held (or never was): counted, nothing changed.
    NotHeld,
    /// Learning is off for this product.
    Off,
}

/// Counters, as the daemon exports them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub added_operator: u64,
    pub added_auto: u64,
    pub removed: u64,
    pub defects: u64,
    pub duplicate: u64,
    pub conflicting: u64,
    pub not_held: u64,
    /// Frames that passed every guard but the spacing or the auto budget.
    pub refused_spacing: u64,
    pub refused_budget: u64,
}

pub struct Learner {
    pub mode: LearnMode,
    pub guards: Guards,
    held: VecDeque<Held>,
    answers: HashMap<String, Label>,
    last_auto: Option<u64>,
    /// The product of every factor the decision followed the bank by so far.
    scale: f32,
    pub stats: Stats,
}

impl Learner {
    pub fn new(mode: LearnMode, guards: Guards) -> Self {
        Self {
            mode,
            guards,
            held: VecDeque::new(),
            answers: HashMap::new(),
            last_auto: None,
            scale: 1.0,
            stats: Stats::default(),
        }
    }

    /// How many frames are held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether the frame is still held (an answer for it can act).
    pub fn holds(&self, frame: &str) -> bool {
        self.held.iter().any(|h| h.frame == frame)
    }

    /// A frame was scored against `bank` (`score`: its image score, before anything it causes).
    /// It is held for answers; with `auto`, a frame far on the normal side, past the spacing,
    /// joins the bank. `tick` is the frame's time in the unit of [`Guards::min_spacing`].
    pub fn scored(
        &mut self,
        engine: &Engine,
        bank: &Bank,
        frame: &str,
        image: Arc<RgbImage>,
        score: f32,
        tick: u64,
    ) -> Result<Option<Bank>> {
        if self.mode == LearnMode::Off {
            return Ok(None);
        }
        self.held.push_back(Held { frame: frame.to_string(), image: image.clone(), score, scale: self.scale });
        while self.held.len() > self.guards.hold.max(1) {
            if let Some(gone) = self.held.pop_front() {
                self.answers.remove(&gone.frame);
            }
        }
        let cal = &bank.meta.calibration;
        if self.mode != LearnMode::Auto
            || score >= cal.image_threshold
            || score > auto_level(cal, self.guards.normal_quantile)
        {
            return Ok(None);
        }
        if self.last_auto.is_some_and(|t| tick.saturating_sub(t) < self.guards.min_spacing) {
            self.stats.refused_spacing += 1;
            return Ok(None);
        }
        let autos =
            bank.meta.lineage.as_ref().map_or(0, |l| l.learned.iter().filter(|r| r.source == Source::Auto).count());
        if autos >= self.guards.max_auto {
            self.stats.refused_budget += 1;
            return Ok(None);
        }
        self.last_auto = Some(tick);
        self.stats.added_auto += 1;
        tracing::info!(frame, score, "a confident normal frame joins the bank (learn = auto)");
        let added = update::add_reference(engine, bank, frame, &image, Source::Auto, &self.guards.budget)?;
        let (next, ratio) = self.follow(engine, bank, added, frame);
        self.scale *= ratio;
        Ok(Some(next))
    }

    /// The decision follows the bank. A reference that joins lowers every score, the normal
    /// parts' most (the bank now explains them better): a decision left where fewer references
    /// put it misses more and more defects as the bank grows. So, with [`Guards::follow`], the
    /// held frames judged normal before the change (the newest [`FOLLOW_FRAMES`]; not the
    /// changed frame, not a frame answered `defect`, not a reference of either bank) are scored
    /// against both banks, and the decision (with the populations it was fitted on, the base
    /// later re-fits start from and the observations they compare with it) is scaled by the
    /// ratio of their median scores, new over old. A learned reference answered `defect` leaves
    /// with the ratio it brought divided out exactly. Never an error: a failed measurement
    /// leaves the decision where it was (logged).
    fn follow(&self, engine: &Engine, old: &Bank, new: Bank, changed: &str) -> (Bank, f32) {
        if !self.guards.follow {
            return (new, 1.0);
        }
        let joined = new.meta.lineage.as_ref().is_some_and(|l| l.learned.iter().any(|r| r.frame == changed));
        let left = old.meta.lineage.as_ref().and_then(|l| l.learned.iter().find(|r| r.frame == changed));
        let ratio = match (joined, left) {
            (false, Some(r)) => 1.0 / r.follow_ratio,
            _ => match self.measure(engine, old, &new, changed) {
                Ok(Some(r)) => r,
                Ok(None) => return (new, 1.0),
                Err(e) => {
                    tracing::warn!(frame = changed, "the decision cannot follow the bank ({e}); it stays");
                    return (new, 1.0);
                }
            },
        };
        if !ratio.is_finite() || (ratio - 1.0).abs() < 1e-3 {
            return (new, 1.0);
        }
        tracing::info!(ratio, frame = changed, "the decision follows the bank");
        (update::rescale(&new, &old.meta, ratio, joined.then_some(changed)), ratio)
    }

    /// The ratio of the probe frames' median scores, `new` over `old` (None: too few frames,
    /// or scores that cannot be compared).
    fn measure(&self, engine: &Engine, old: &Bank, new: &Bank, changed: &str) -> Result<Option<f32>> {
        let t = old.meta.calibration.image_threshold;
        let is_ref = |f: &str| old.meta.reference_files.iter().chain(&new.meta.reference_files).any(|r| r == f);
        let probe: Vec<&Held> = self
            .held
            .iter()
            .rev()
            .filter(|h| h.frame != changed && h.score < t)
            .filter(|h| self.answers.get(&h.frame) != Some(&Label::Defect) && !is_ref(&h.frame))
            .take(FOLLOW_FRAMES)
            .collect();
        if probe.len() < FOLLOW_MIN {
            return Ok(None);
        }
        let views: Vec<(&[u8], u32, u32)> =
            probe.iter().map(|h| (h.image.as_raw().as_slice(), h.image.width(), h.image.height())).collect();
        let median = |bank: &Bank| -> Result<f32> {
            let mut v: Vec<f32> = engine.score(&views, bank)?.iter().map(kensa_core::AnomalyMap::max).collect();
            v.sort_by(f32::total_cmp);
            Ok(v[v.len() / 2])
        };
        let (before, after) = (median(old)?, median(new)?);
        if !(before.is_finite() && after.is_finite() && before > 0.0 && after > 0.0) {
            return Ok(None);
        }
        Ok(Some((after / before).clamp(0.5, 2.0)))
    }

    /// An operator's answer for `frame`. The last answer wins: `defect` after `normal` takes
    /// the frame out of the bank again, `normal` after `defect` puts it in.
    pub fn answer(
        &mut self,
        engine: &Engine,
        bank: &Bank,
        frame: &str,
        label: Label,
    ) -> Result<(Answer, Option<Bank>)> {
        if self.mode == LearnMode::Off {
            return Ok((Answer::Off, None));
        }
        let Some(held) = self.held.iter().find(|h| h.frame == frame) else {
            self.stats.not_held += 1;
            tracing::warn!(frame, "an answer for a frame no longer held is ignored (raise learn.hold to keep more)");
            return Ok((Answer::NotHeld, None));
        };
        let (image, score, scored_at) = (held.image.clone(), held.score, held.scale);
        match self.answers.insert(frame.to_string(), label) {
            Some(prev) if prev == label => {
                self.stats.duplicate += 1;
                return Ok((Answer::Duplicate, None));
            }
            Some(_) => self.stats.conflicting += 1,
            None => {}
        }
        let mut obs = Observation { frame: frame.to_string(), score, label, source: Source::Operator };
        let next = match label {
            Label::Normal => {
                self.stats.added_operator += 1;
                let added = update::add_reference(engine, bank, frame, &image, Source::Operator, &self.guards.budget)?;
                let (added, ratio) = self.follow(engine, bank, added, frame);
                self.scale *= ratio;
                obs.score *= self.scale / scored_at;
                let change = Change::Added { frame: frame.to_string(), source: Source::Operator };
                update::with_observation(&added, &bank.meta, obs, change)
            }
            Label::Defect => {
                self.stats.defects += 1;
                match update::remove_reference(bank, frame, "answered defect") {
                    Some(removed) => {
                        self.stats.removed += 1;
                        let (removed, ratio) = self.follow(engine, bank, removed, frame);
                        self.scale *= ratio;
                        obs.score *= self.scale / scored_at;
                        let change = Change::Removed { frame: frame.to_string(), reason: "answered defect".into() };
                        update::with_observation(&removed, &bank.meta, obs, change)
                    }
                    None => {
                        obs.score *= self.scale / scored_at;
                        update::observe(bank, obs)
                    }
                }
            }
        };
        let v = next.meta.version();
        Ok((Answer::Changed(v), Some(next)))
    }
}

/// The image score at or under which a frame may join by itself (see [`Guards::normal_quantile`]).
pub fn auto_level(cal: &kensa_verdict::Calibration, quantile: f32) -> f32 {
    let n = &cal.normal_scores;
    if n.is_empty() {
        return f32::NEG_INFINITY;
    }
    let i = ((n.len() - 1) as f32 * quantile.clamp(0.0, 1.0)).round() as usize;
    n[i].min(cal.image_threshold)
}
