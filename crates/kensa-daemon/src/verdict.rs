//! The verdict stage, after the model: for each scored frame the calibrated verdict, the
//! language-model judge when the mode, the frame and the budget call for it (over the features
//! the engine already computed), the mask, the stored map and snapshot, the metrics, and the
//! event. Its own OS thread (the LM judges are tch models), so the model thread never waits on
//! PNG encoding, disk writes or the LM.

use crate::model::{BankView, GroupResult, ScoredFrame};
use kensa_core::config::{JudgeMode, JudgesConfig, KensaConfig, PublishConfig, StoreWhich};
use kensa_core::metrics::{self as m, Label, LmResult, Stage};
use kensa_lm::judge::LmJudge;
use kensa_publish::delivery::Scored;
use kensa_publish::event::{self, Judgement, Origin};
use kensa_verdict::{Judge as _, Verdict};
use std::collections::HashMap;
use std::time::Instant;
use tokio::sync::mpsc;

/// One batch from the model, with when it was formed.
pub struct ScoredBatch {
    pub groups: Vec<GroupResult>,
    pub formed_at: Instant,
}

/// Everything the stage needs besides its input.
pub struct VerdictStage {
    pub model_id: String,
    pub run_id: String,
    /// Camera id → (line, station).
    pub cameras: HashMap<String, (String, String)>,
    pub publish: PublishConfig,
    pub judges: JudgesConfig,
    /// Product → its language-model judge.
    pub lm: HashMap<String, LmJudge>,
    /// Where evidence goes (`publish.store_dir`), if anywhere.
    pub evidence: Option<crate::evidence::Evidence>,
    /// Where cameras waiting for their product's bank are shown.
    pub health: kensa_telemetry::Health,
    /// The operator console's frames (`console.enabled`).
    pub console: Option<kensa_console::Board>,
    /// The language model's budget, shared with the questions about frames.
    pub budget: Budget,
}

impl VerdictStage {
    pub fn new(
        cfg: &KensaConfig,
        model_id: String,
        run_id: String,
        lm: HashMap<String, LmJudge>,
        health: kensa_telemetry::Health,
        (console, budget): (Option<kensa_console::Board>, Budget),
    ) -> Self {
        Self {
            model_id,
            run_id: run_id.clone(),
            cameras: cfg.cameras.iter().map(|c| (c.id.clone(), (c.line.clone(), c.station.clone()))).collect(),
            evidence: cfg
                .publish
                .store_dir
                .clone()
                .map(|d| crate::evidence::Evidence::new(d, &run_id, cfg.publish.evidence_url_prefix.clone())),
            publish: cfg.publish.clone(),
            judges: cfg.judges.clone(),
            lm,
            health,
            console,
            budget,
        }
    }

    /// Runs until `input` closes or `out` is gone.
    pub fn run(self, mut input: mpsc::Receiver<ScoredBatch>, out: &mpsc::Sender<Scored>) {
        // Cameras shown as waiting for their bank: /healthz is told only when this changes,
        // not once per frame.
        let mut waiting: std::collections::HashSet<std::sync::Arc<str>> = std::collections::HashSet::new();
        let mut mark = |camera: &std::sync::Arc<str>, now_waiting: bool| {
            if now_waiting != waiting.contains(camera) {
                self.health.set_waiting_for_bank(camera, now_waiting);
                if now_waiting {
                    waiting.insert(camera.clone());
                } else {
                    waiting.remove(camera);
                }
            }
        };
        while let Some(batch) = input.blocking_recv() {
            for g in batch.groups {
                match g {
                    GroupResult::Dropped { frames, reason, .. } => {
                        let no_bank = reason == kensa_core::metrics::DropReason::NoBank;
                        for f in frames {
                            mark(&f.camera, no_bank);
                            metrics::counter!(m::FRAMES_DROPPED, "camera" => f.camera.to_string(), "reason" => reason.as_str())
                                .increment(1);
                        }
                    }
                    GroupResult::Scored { product, bank, frames, model_s } => {
                        for s in frames {
                            mark(&s.frame.camera, false);
                            let queue_s = batch.formed_at.saturating_duration_since(s.frame.captured_at).as_secs_f64();
                            let scored = self.judge(&product, &bank, s, (queue_s, model_s));
                            if out.blocking_send(scored).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    fn judge(&self, product: &str, bank: &BankView, s: ScoredFrame, (queue_s, model_s): (f64, f64)) -> Scored {
        let t = Instant::now();
        let (f, map) = (&s.frame, &s.map);
        let (calibrated, mask) = kensa_verdict::judge(map, &bank.calibration);
        let lm = self.language_model(product, bank, &s, &calibrated);
        let lm_decides =
            lm.is_some() && matches!(self.judges.mode, JudgeMode::LanguageModel | JudgeMode::LanguageModelOnUncertain);
        let decided = match (&lm, lm_decides) {
            (Some(l), true) => l,
            _ => &calibrated,
        };
        let (mask, mw, mh) = downscale_mask(&mask, map.width, map.height, self.publish.mask_max_side);
        let evidence = match &self.evidence {
            Some(e) if decided.anomalous || self.publish.store == StoreWhich::All => {
                e.store(f, map, bank.calibration.pixel_threshold)
            }
            _ => crate::evidence::Stored::default(),
        };
        let (camera, product_l) = (f.camera.to_string(), product.to_string());
        metrics::counter!(m::FRAMES_SCORED, "camera" => camera.clone(), "product" => product_l.clone()).increment(1);
        metrics::histogram!(m::IMAGE_SCORE, "product" => product_l.clone()).record(f64::from(decided.score));
        if decided.anomalous {
            metrics::counter!(m::ANOMALIES, "camera" => camera.clone(), "product" => product_l.clone()).increment(1);
        }
        let verdicts: Vec<&Verdict> = std::iter::once(&calibrated).chain(lm.as_ref()).collect();
        if verdicts.iter().any(|v| v.anomalous != calibrated.anomalous) {
            metrics::counter!(m::JUDGE_DISAGREEMENTS, "camera" => camera, "product" => product_l).increment(1);
        }
        let stages = [(Stage::Queue, queue_s), (Stage::Model, model_s), (Stage::Verdict, t.elapsed().as_secs_f64())];
        for (stage, seconds) in stages {
            metrics::histogram!(m::STAGE_LATENCY, "stage" => stage.as_str()).record(seconds);
        }
        let (line, station) = self.cameras.get(&*f.camera).cloned().unwrap_or_default();
        let origin = Origin {
            camera: &f.camera,
            product,
            line: &line,
            station: &station,
            run_id: &self.run_id,
            seq: f.seq,
            part_id: f.part_id.as_deref().unwrap_or_default(),
            capture_time: f.capture_time,
            width: map.width,
            height: map.height,
        };
        let judgement = Judgement {
            decided,
            verdicts: &verdicts,
            mask_png: kensa_verdict::mask_png(&mask, mw, mh),
            mask_size: (mw, mh),
            bank_version: bank.version.clone(),
            model_id: &self.model_id,
            evidence,
            stages: &stages,
        };
        let event = event::build(&origin, judgement);
        let captured_at = f.captured_at;
        if let Some(board) = &self.console {
            hold_for_console(board, &event, (product, bank), (decided, &verdicts), s);
        }
        Scored { event, captured_at }
    }

    /// The language-model judge's verdict on a frame, when the mode, the frame and the budget
    /// call for one; `None` otherwise (and on a judge error, which is logged and counted).
    fn language_model(&self, product: &str, bank: &BankView, s: &ScoredFrame, calibrated: &Verdict) -> Option<Verdict> {
        let lm = self.lm.get(product)?;
        let features = s.features.as_ref()?;
        let wanted = match self.judges.mode {
            JudgeMode::Calibrated => false,
            JudgeMode::Both | JudgeMode::LanguageModel => true,
            JudgeMode::LanguageModelOnUncertain => {
                calibrated.anomalous || (calibrated.confidence - 0.5).abs() < self.judges.uncertain_band as f32
            }
        };
        if !wanted {
            return None;
        }
        let count = |r: LmResult| {
            metrics::counter!(m::LM_JUDGEMENTS, "product" => product.to_string(), "result" => r.as_str()).increment(1);
        };
        if !self.budget.take() {
            count(LmResult::OverBudget);
            return None;
        }
        let img = image::RgbImage::from_raw(s.frame.width, s.frame.height, s.frame.data.clone())?;
        let judge = kensa_lm::judging::LanguageModelJudge { lm, calibration: &bank.calibration, features };
        match judge.judge(&kensa_verdict::Evidence { map: &s.map, image: &img }) {
            Ok(v) => {
                count(LmResult::Ran);
                Some(v)
            }
            Err(e) => {
                count(LmResult::Error);
                tracing::error!(product, camera = %s.frame.camera, frame = s.frame.seq, "{e}");
                None
            }
        }
    }
}

/// Hands a judged frame to the operator console: its pixels and map are moved, not copied.
fn hold_for_console(
    board: &kensa_console::Board,
    event: &kensa_publish::InspectionEvent,
    (product, bank): (&str, &BankView),
    (decided, verdicts): (&Verdict, &[&Verdict]),
    s: ScoredFrame,
) {
    let ScoredFrame { frame, map, .. } = s;
    let Some(img) = image::RgbImage::from_raw(frame.width, frame.height, frame.data) else { return };
    let mut shot = kensa_console::Shot::new(
        event.event_id.clone(),
        (frame.camera.to_string(), product.to_string()),
        (frame.seq, event.part_id.clone(), event.capture_time_unix_nanos / 1_000_000),
        img,
        (map, bank.calibration.pixel_threshold),
        (kensa_console::Said::from(decided), verdicts.iter().map(|v| kensa_console::Said::from(*v)).collect()),
        decided.locations.iter().map(|c| c.name().to_string()).collect(),
        event.bank_version.clone(),
    );
    (shot.regions, shot.decision) = (decided.regions.clone(), bank.calibration.image_threshold);
    board.push(shot);
}

/// The language model's budget (`judges.budget_per_s`): one token bucket that the judge's
/// runs and the questions about frames both draw on; cheap to clone (one shared bucket).
#[derive(Clone)]
pub struct Budget(std::sync::Arc<std::sync::Mutex<Bucket>>);

struct Bucket {
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl Budget {
    pub fn new(rate: f64) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(Bucket { tokens: rate.max(1.0), rate, last: Instant::now() })))
    }

    /// Takes one run if the bucket has one.
    pub fn take(&self) -> bool {
        let mut b = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * b.rate).min(b.rate.max(1.0));
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Nearest-neighbour downscale of a 0/255 mask so its longer side is at most `max_side`
/// (0: unchanged).
pub fn downscale_mask(mask: &[u8], w: u32, h: u32, max_side: u32) -> (Vec<u8>, u32, u32) {
    if max_side == 0 || w.max(h) <= max_side {
        return (mask.to_vec(), w, h);
    }
    let scale = f64::from(max_side) / f64::from(w.max(h));
    let (nw, nh) = (((f64::from(w) * scale).round() as u32).max(1), ((f64::from(h) * scale).round() as u32).max(1));
    let mut out = vec![0u8; (nw * nh) as usize];
    for y in 0..nh {
        let sy = ((f64::from(y) + 0.5) / scale) as u32;
        for x in 0..nw {
            let sx = ((f64::from(x) + 0.5) / scale) as u32;
            out[(y * nw + x) as usize] = mask[(sy.min(h - 1) * w + sx.min(w - 1)) as usize];
        }
    }
    (out, nw, nh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_downscaled_to_their_longer_side() {
        let (w, h) = (8u32, 4u32);
        let mut mask = vec![0u8; 32];
        mask[7] = 255; // the top right 1×2 block: one output pixel
        mask[15] = 255;
        let (out, nw, nh) = downscale_mask(&mask, w, h, 4);
        assert_eq!((nw, nh), (4, 2));
        assert_eq!(out[3], 255);
        assert_eq!(out.iter().filter(|&&v| v == 255).count(), 1);
        assert_eq!(downscale_mask(&mask, w, h, 0).1, 8, "0 keeps the size");
    }

    #[test]
    fn the_budget_refills_at_its_rate() {
        let b = Budget::new(2.0);
        assert!(b.take() && b.take());
        assert!(!b.take(), "two tokens a second, both spent");
    }
}
