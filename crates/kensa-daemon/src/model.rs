//! The model stage: one OS thread owns the engine (tch tensors are not `Sync`) and every
//! product's bank, and does tensors only. It is driven through a [`ModelHandle`] with
//! [`Command`]s, each answered on a oneshot channel (TEI-style); commands run in order, so a
//! bank swap lands between two batches and every frame is scored entirely with one bank.

use crate::learning::Learning;
use crate::DaemonError;
use kensa_core::config::KensaConfig;
use kensa_core::metrics::{self as m, DropReason, Label, ReloadResult};
use kensa_core::{AnomalyMap, Frame};
use kensa_model::backbone::BackboneMeta;
use kensa_model::bank::Bank;
use kensa_model::engine::{Engine, JudgeFeatures};
use kensa_verdict::Calibration;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Batches in a row whose scoring failed (a libtorch error) before the model stage gives up:
/// one odd batch is dropped and counted (`scoring_failed`), a model that fails every batch
/// stops the daemon.
pub const FAILED_BATCHES_TO_STOP: usize = 3;

/// Frames of one product, to score with its bank.
pub struct Group {
    pub product: Arc<str>,
    pub frames: Vec<Frame>,
    /// Also compute what the language-model judge reads (the product has one and may use it).
    pub judge_features: bool,
}

/// The bank a group was scored with: what the verdict stage needs of it.
#[derive(Clone)]
pub struct BankView {
    pub version: String,
    pub calibration: Arc<Calibration>,
}

/// A scored frame.
pub struct ScoredFrame {
    pub frame: Frame,
    pub map: AnomalyMap,
    pub features: Option<JudgeFeatures>,
}

/// The model's answer for one group.
pub enum GroupResult {
    Scored {
        product: Arc<str>,
        bank: BankView,
        frames: Vec<ScoredFrame>,
        model_s: f64,
    },
    /// Not scored: the product has no bank, or the model failed on the batch.
    Dropped {
        product: Arc<str>,
        frames: Vec<Frame>,
        reason: DropReason,
    },
}

/// Work for the model thread.
pub enum Command {
    Score {
        groups: Vec<Group>,
        reply: oneshot::Sender<Vec<GroupResult>>,
    },
    /// Replace (or add) a product's bank; answers the bank it replaced, if any (None also
    /// when the bank is the one in use, or the one the learner just replaced: a file watch
    /// that read the bank file between two learned versions).
    SwapBank {
        product: String,
        bank: Box<Bank>,
        reply: oneshot::Sender<Option<String>>,
    },
    /// An operator's answer about a frame (`crate::learning`).
    Feedback {
        feedback: kensa_core::feedback::Feedback,
        reply: oneshot::Sender<kensa_core::feedback::FeedbackResult>,
    },
}

/// What start-up learned about the model.
#[derive(Clone)]
pub struct ModelInfo {
    /// `<backbone name>@<weights>`: the events' `model_id`.
    pub model_id: String,
    /// Human description with device and precision, for the log and `kensa_model_info`.
    pub description: String,
    /// The precision the backbone runs in (fp32, bf16, fp16): `kensa_model_info{precision}`.
    pub precision: &'static str,
    pub device: tch::Device,
    /// Width of the pooled features the language-model judge reads.
    pub feature_dim: i64,
    /// Product → its bank at start.
    pub banks: HashMap<String, BankView>,
    /// What loading another bank needs (reloads).
    pub loader: Loader,
}

/// Loads banks the way start-up did (off the model thread).
#[derive(Clone)]
pub struct Loader {
    pub backbone: BackboneMeta,
    pub input_size: u32,
    pub device: tch::Device,
    pub kind: tch::Kind,
}

impl Loader {
    /// Loads and validates a bank on a blocking thread.
    pub async fn load(&self, path: &Path) -> Result<Bank, DaemonError> {
        let (p, me) = (path.to_path_buf(), self.clone());
        tokio::task::spawn_blocking(move || {
            Bank::load(&p, &me.backbone, me.input_size, me.device).map(|b| b.cast(me.kind)).map_err(DaemonError::from)
        })
        .await
        .map_err(|e| DaemonError::Stage { stage: "bank loader", msg: e.to_string() })?
    }
}

/// Sends work to the model thread.
#[derive(Clone)]
pub struct ModelHandle {
    tx: mpsc::Sender<Command>,
}

impl ModelHandle {
    /// Scores groups of frames; an error means the model thread has ended.
    pub async fn score(&self, groups: Vec<Group>) -> Result<Vec<GroupResult>, DaemonError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Score { groups, reply }).await.map_err(|_| DaemonError::ModelStopped)?;
        rx.await.map_err(|_| DaemonError::ModelStopped)
    }

    /// Hands an operator's answer to the learner.
    pub async fn feedback(
        &self,
        feedback: kensa_core::feedback::Feedback,
    ) -> Result<kensa_core::feedback::FeedbackResult, DaemonError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Feedback { feedback, reply }).await.map_err(|_| DaemonError::ModelStopped)?;
        rx.await.map_err(|_| DaemonError::ModelStopped)
    }

    /// Swaps a product's bank in between two batches.
    pub async fn swap_bank(&self, product: &str, bank: Bank) -> Result<Option<String>, DaemonError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::SwapBank { product: product.to_string(), bank: Box::new(bank), reply };
        self.tx.send(cmd).await.map_err(|_| DaemonError::ModelStopped)?;
        rx.await.map_err(|_| DaemonError::ModelStopped)
    }
}

fn view(bank: &Bank) -> BankView {
    BankView { version: bank.meta.version(), calibration: Arc::new(bank.meta.calibration.clone()) }
}

/// Starts the model thread: loads the backbone and every product's bank (a bad one fails
/// start-up), then serves commands until every handle is dropped.
/// Cancelled when the model thread ends by failing (a panic, or [`FAILED_BATCHES_TO_STOP`]
/// failed batches in a row), not when it ends because every handle was dropped: the daemon
/// stops at once, even when no frame comes to find the model gone.
struct FailureSignal(tokio_util::sync::CancellationToken);

impl Drop for FailureSignal {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.cancel();
        }
    }
}

pub async fn start(
    cfg: &KensaConfig,
    run_id: &str,
    failed: tokio_util::sync::CancellationToken,
) -> Result<(ModelHandle, ModelInfo, std::thread::JoinHandle<()>), DaemonError> {
    let (tx, mut rx) = mpsc::channel::<Command>(1);
    let (ready_tx, ready_rx) = oneshot::channel::<Result<ModelInfo, DaemonError>>();
    let cfg = cfg.clone();
    let run_id = run_id.to_string();
    let thread = std::thread::Builder::new()
        .name("kensa-model".into())
        .spawn(move || {
            let failure = FailureSignal(failed);
            let (engine, mut banks) = match load(&cfg) {
                Ok(v) => v,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let meta = &engine.backbone.meta;
            let info = ModelInfo {
                model_id: format!("{}@{}", meta.name, meta.weights),
                description: format!(
                    "{}@{} on {:?} ({:?})",
                    meta.name,
                    meta.weights,
                    engine.device(),
                    engine.backbone.kind
                ),
                precision: kensa_model::backbone::dtype_name(engine.backbone.kind),
                device: engine.device(),
                feature_dim: meta.channels.iter().map(|&c| i64::from(c)).sum(),
                banks: banks.iter().map(|(k, b)| (k.clone(), view(b))).collect(),
                loader: Loader {
                    backbone: meta.clone(),
                    input_size: cfg.model.input_size,
                    device: engine.device(),
                    kind: engine.backbone.kind,
                },
            };
            let _ = ready_tx.send(Ok(info));
            let mut learning = Learning::new(&cfg, &run_id);
            let mut failed_in_a_row = 0;
            while let Some(cmd) = rx.blocking_recv() {
                match cmd {
                    Command::Score { groups, reply } => {
                        let out = score(&engine, &mut banks, &mut learning, groups);
                        // A batch counts as failed when none of its groups was scored and
                        // one failed; a batch that scored anything resets the count, one of
                        // products waiting for their bank leaves it as it was.
                        let scored = out.iter().any(|g| matches!(g, GroupResult::Scored { .. }));
                        let failed = out
                            .iter()
                            .any(|g| matches!(g, GroupResult::Dropped { reason: DropReason::ScoringFailed, .. }));
                        if scored {
                            failed_in_a_row = 0;
                        } else if failed {
                            failed_in_a_row += 1;
                        }
                        let _ = reply.send(out);
                        if failed_in_a_row >= FAILED_BATCHES_TO_STOP {
                            // A model that fails batch after batch inspects nothing: the thread
                            // ends, so the batcher's next call fails and the daemon stops (not
                            // ready, exit 1) for its supervisor to restart it.
                            tracing::error!(
                                batches = failed_in_a_row,
                                "the model failed every batch in a row: stopping the model stage"
                            );
                            failure.0.cancel();
                            return;
                        }
                    }
                    Command::SwapBank { product, bank, reply } => {
                        let stale = banks.get(&product).is_some_and(|cur| {
                            let v = bank.meta.version();
                            v == cur.meta.version() || cur.meta.lineage.as_ref().is_some_and(|l| l.parent == v)
                        });
                        let old = if stale { None } else { banks.insert(product, *bank).map(|b| b.meta.version()) };
                        let _ = reply.send(old);
                    }
                    Command::Feedback { feedback, reply } => {
                        let _ = reply.send(learning.answer(&engine, &mut banks, &feedback));
                    }
                }
            }
        })
        .map_err(|e| DaemonError::Stage { stage: "model", msg: format!("cannot start the model thread: {e}") })?;
    let info = ready_rx.await.map_err(|_| DaemonError::ModelStopped)??;
    Ok((ModelHandle { tx }, info, thread))
}

fn load(cfg: &KensaConfig) -> Result<(Engine, HashMap<String, Bank>), DaemonError> {
    let m = &cfg.model;
    if m.threads > 0 {
        tch::set_num_threads(i32::try_from(m.threads).unwrap_or(i32::MAX));
    }
    let backbone = kensa_model::load_backbone(m.backbone.as_deref(), m.device, m.precision)?;
    let (device, kind) = (backbone.device, backbone.kind);
    let mut banks = HashMap::new();
    for (name, p) in &cfg.products {
        if !p.bank.exists() {
            // Commissioning: the daemon runs; this product's cameras wait for their bank (the
            // file watch loads it when it appears).
            tracing::warn!(product = %name, bank = %p.bank.display(),
                "bank not made yet: cameras of this product are not scored (waiting_for_bank) until it exists");
            continue;
        }
        let bank = Bank::load(&p.bank, &backbone.meta, m.input_size, device)
            .map_err(|e| DaemonError::Config(format!("products.{name}.bank: {e}")))?
            .cast(kind);
        banks.insert(name.clone(), bank);
    }
    Ok((Engine::new(backbone, m.input_size), banks))
}

/// Scores each group with its product's bank; learning products' learners see every frame
/// (and a bank they change is used from the next batch on).
fn score(
    engine: &Engine,
    banks: &mut HashMap<String, Bank>,
    learning: &mut Learning,
    groups: Vec<Group>,
) -> Vec<GroupResult> {
    let mut learned: Vec<(Arc<str>, Bank)> = Vec::new();
    let t0 = Instant::now();
    let n: usize = groups.iter().map(|g| g.frames.len()).sum();
    metrics::histogram!(m::BATCH_SIZE).record(n as f64);
    let out = groups
        .into_iter()
        .map(|g| {
            let Some(bank) = banks.get(&*g.product) else {
                // Waiting for its bank: counted (`no_bank`) and shown in /healthz, not logged per batch.
                return GroupResult::Dropped { product: g.product, frames: g.frames, reason: DropReason::NoBank };
            };
            let views: Vec<(&[u8], u32, u32)> =
                g.frames.iter().map(|f| (f.data.as_slice(), f.width, f.height)).collect();
            let t = Instant::now();
            let side = g.judge_features.then_some(kensa_lm::judge::MAP_SIDE);
            let scored = if kensa_core::fault::injected(kensa_core::fault::Point::ModelError) {
                Err(kensa_model::ModelError::Torch(tch::TchError::Torch(
                    "injected fault (KENSA_FAULT=model-error)".into(),
                )))
            } else {
                engine.score_with(&views, bank, side)
            };
            metrics::histogram!(m::SCORE_LATENCY).record(t.elapsed().as_secs_f64());
            match scored {
                Ok(maps) => {
                    let model_s = t.elapsed().as_secs_f64() / g.frames.len().max(1) as f64;
                    if learning.any() {
                        let mut current: Option<Bank> = None;
                        for (f, (map, _)) in g.frames.iter().zip(&maps) {
                            let b = current.as_ref().unwrap_or(bank);
                            if let Some(next) = learning.scored(engine, &g.product, b, f, map.max()) {
                                current = Some(next);
                            }
                        }
                        if let Some(b) = current {
                            learned.push((g.product.clone(), b));
                        }
                    }
                    let frames = g
                        .frames
                        .into_iter()
                        .zip(maps)
                        .map(|(frame, (map, features))| ScoredFrame { frame, map, features })
                        .collect();
                    GroupResult::Scored { product: g.product, bank: view(bank), frames, model_s }
                }
                Err(e) => {
                    tracing::error!(product = %g.product, "scoring failed: {e}");
                    GroupResult::Dropped { product: g.product, frames: g.frames, reason: DropReason::ScoringFailed }
                }
            }
        })
        .collect();
    metrics::histogram!(m::BATCH_LATENCY).record(t0.elapsed().as_secs_f64());
    for (product, bank) in learned {
        let new = bank.meta.version();
        let old = banks.insert(product.to_string(), bank).map(|b| b.meta.version());
        note_swap(&product, old.as_deref(), &new, Path::new("(learned)"), "learning");
    }
    out
}

/// Records a swapped-in bank in the metrics and the log.
pub fn note_swap(product: &str, old: Option<&str>, new: &str, path: &Path, trigger: &str) {
    if let Some(old) = old {
        metrics::gauge!(m::BANK_INFO, "product" => product.to_string(), "version" => old.to_string()).set(0.0);
    }
    metrics::gauge!(m::BANK_INFO, "product" => product.to_string(), "version" => new.to_string()).set(1.0);
    metrics::counter!(m::BANK_RELOADS, "product" => product.to_string(), "result" => ReloadResult::Ok.as_str())
        .increment(1);
    tracing::info!(product, version = new, path = %path.display(), trigger, "bank swapped in");
}
