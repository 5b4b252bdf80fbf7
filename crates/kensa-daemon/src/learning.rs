//! Learning from the line, on the model thread (it needs the engine): each learning product's
//! [`Learner`] holds its recent frames, answers operator feedback and, with `learn = "auto"`,
//! lets confident normal frames join. Every change is committed as a new bank version
//! (`kensa_model::versions::commit`, under a lock file beside the bank so instances sharing
//! the bank folder never interleave), then swapped in. An instance whose bank file was changed
//! by another instance first takes that version, then applies its change to it.

use kensa_core::config::{KensaConfig, LearnMode};
use kensa_core::feedback::{Feedback, FeedbackResult};
use kensa_core::metrics as m;
use kensa_core::Frame;
use kensa_learn::learner::{Answer, Guards, Learner, Stats};
use kensa_learn::update::Budget;
use kensa_model::bank::Bank;
use kensa_model::engine::Engine;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

struct Product {
    learner: Learner,
    path: PathBuf,
    reported: Stats,
}

/// Every learning product's learner, and how event ids are made.
pub struct Learning {
    run_id: String,
    keep: usize,
    products: HashMap<String, Product>,
}

impl Learning {
    pub fn new(cfg: &KensaConfig, run_id: &str) -> Self {
        let l = &cfg.learn;
        let guards = Guards {
            min_spacing: l.min_spacing_s,
            max_auto: l.max_auto,
            hold: l.hold,
            budget: Budget { max_learned: l.max_learned, ..Budget::default() },
            follow: l.follow,
            ..Guards::default()
        };
        let products = cfg
            .products
            .iter()
            .filter(|(_, p)| p.learn != LearnMode::Off)
            .map(|(name, p)| {
                let learner = Learner::new(p.learn, guards);
                (name.clone(), Product { learner, path: p.bank.clone(), reported: Stats::default() })
            })
            .collect();
        Self { run_id: run_id.to_string(), keep: l.keep_versions, products }
    }

    /// Whether any product learns.
    pub fn any(&self) -> bool {
        !self.products.is_empty()
    }

    /// The event id the verdict stage gives this frame.
    fn event_id(&self, f: &Frame) -> String {
        format!("{}/{}/{}", f.camera, self.run_id, f.seq)
    }

    /// A frame of `product` was scored against `bank` with image score `score`: held for
    /// answers, and perhaps (auto) a new bank. Commits what changes; returns the new bank.
    pub fn scored(&mut self, engine: &Engine, product: &str, bank: &Bank, f: &Frame, score: f32) -> Option<Bank> {
        let id = self.event_id(f);
        let keep = self.keep;
        let p = self.products.get_mut(product)?;
        let image = image::RgbImage::from_raw(f.width, f.height, f.data.clone())?;
        let tick = f.capture_time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let out = match p.learner.scored(engine, bank, &id, Arc::new(image), score, tick) {
            Ok(Some(b)) => commit(product, &p.path, b, keep),
            Ok(None) => None,
            Err(e) => {
                tracing::error!(product, frame = %id, "learning from a frame failed: {e}");
                None
            }
        };
        report(product, p);
        out
    }

    /// An operator's answer. `banks` is the model thread's; a changed bank is committed and
    /// replaces its entry.
    pub fn answer(&mut self, engine: &Engine, banks: &mut HashMap<String, Bank>, fb: &Feedback) -> FeedbackResult {
        let Some(product) = self.products.iter().find(|(_, p)| p.learner.holds(&fb.event_id)).map(|(n, _)| n.clone())
        else {
            return FeedbackResult::NotHeld;
        };
        let keep = self.keep;
        let p = self.products.get_mut(&product).expect("found above");
        // Another instance may have changed the shared bank file: start from its version.
        let lock = lock_bank(&p.path);
        if let Some(current) = banks.get(&product) {
            if let Ok(on_disk) = Bank::load_unchecked(&p.path, current.layers[0].device()) {
                if on_disk.meta.version() != current.meta.version() {
                    tracing::info!(product, version = %on_disk.meta.version(), "the bank file changed: learning on its version");
                    let kind = current.layers[0].kind();
                    banks.insert(product.clone(), on_disk.cast(kind));
                }
            }
        }
        let Some(bank) = banks.get(&product) else { return FeedbackResult::NotHeld };
        let result = match p.learner.answer(engine, bank, &fb.event_id, fb.label) {
            Ok((Answer::Changed(_), Some(next))) => match commit_locked(&product, &p.path, &next, keep) {
                Ok(v) => {
                    banks.insert(product.clone(), next);
                    tracing::info!(product, event = %fb.event_id, label = fb.label.as_str(), who = %fb.who, bank_version = %v, "operator answer learned");
                    FeedbackResult::Changed { product: product.clone(), bank_version: v }
                }
                Err(e) => FeedbackResult::Failed { reason: e },
            },
            Ok((Answer::Duplicate, _)) => FeedbackResult::Duplicate,
            Ok((Answer::Off, _)) => FeedbackResult::LearningOff { product: product.clone() },
            Ok(_) => FeedbackResult::NotHeld,
            Err(e) => FeedbackResult::Failed { reason: e.to_string() },
        };
        drop(lock);
        report(&product, p);
        result
    }
}

/// Holds `<bank>.lock` (an advisory lock) while a change is read, made and written.
fn lock_bank(path: &std::path::Path) -> Option<std::fs::File> {
    let mut s = path.as_os_str().to_os_string();
    s.push(".lock");
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(PathBuf::from(s)).ok()?;
    f.lock().ok()?;
    Some(f)
}

fn commit_locked(product: &str, path: &std::path::Path, bank: &Bank, keep: usize) -> Result<String, String> {
    kensa_model::versions::commit(bank, path, keep).map_err(|e| {
        tracing::error!(product, "the learned bank cannot be written, it is not used: {e}");
        e.to_string()
    })
}

fn commit(product: &str, path: &std::path::Path, bank: Bank, keep: usize) -> Option<Bank> {
    let _lock = lock_bank(path);
    let v = commit_locked(product, path, &bank, keep).ok()?;
    tracing::info!(product, bank_version = %v, "a confident normal frame joined the bank (learn = auto)");
    Some(bank)
}

/// Exports what the learner counted since the last report.
fn report(product: &str, p: &mut Product) {
    let s = &p.learner.stats;
    let r = &p.reported;
    for (change, now, before) in [
        ("added_operator", s.added_operator, r.added_operator),
        ("added_auto", s.added_auto, r.added_auto),
        ("removed", s.removed, r.removed),
        ("defect", s.defects, r.defects),
        ("refused_spacing", s.refused_spacing, r.refused_spacing),
        ("refused_budget", s.refused_budget, r.refused_budget),
    ] {
        if now > before {
            metrics::counter!(m::LEARNED, "product" => product.to_string(), "change" => change).increment(now - before);
        }
    }
    metrics::gauge!(m::FRAMES_HELD, "product" => product.to_string()).set(p.learner.held() as f64);
    p.reported = s.clone();
}
