//! The language-model judge of a bank: its [`kensa_verdict::Judge`] implementation, the rules
//! that label its training examples, its training (`kensa train-judge`, `kensa eval --lm`) and
//! its sidecar file. It reads the [`JudgeFeatures`] the engine computes in its own forward
//! pass, so judging a frame never runs the backbone a second time.

use crate::judge::{JudgeInput, LmJudge, MAP_SIDE};
use crate::model::Llama;
use crate::tokenizer::{LmTokenizer, Tokenizer};
use crate::{LmError, Result};
use kensa_core::grid::Cell;
use kensa_core::regions::mask_cells;
use kensa_model::bank::Bank;
use kensa_model::engine::{Engine, JudgeFeatures};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Tensor;

/// Training set and schedule of the LM judge, shared by `train-judge` and `eval --lm`.
/// Measured with `kensa train-judge --eval` on a 1-reference bottle bank
/// (train/good/011.png), seeds 0 / 1 / 2: 240 examples for 6 epochs at 0.001 under-fit
/// (held-out synthetic accuracy 0.65-0.92 by seed); 240 for 12 epochs at 0.002 reach
/// 0.90-0.98 but real bottle accuracy moves by up to 3 images in 29 with the seed; 480 for 6
/// epochs at 0.002 (the same number of steps, about 75 s on a 2-core CPU with stories260K)
/// give 0.897 / 0.897 / 0.862 on real bottles, 1-2 good parts and 2 defects wrong.
pub const TRAIN_EXAMPLES: usize = 480;
pub const TRAIN_EPOCHS: usize = 6;
pub const TRAIN_LR: f64 = 0.002;
/// Examples per training step.
pub const TRAIN_BATCH: usize = 8;

#[derive(clap::Args, Clone, Debug)]
pub struct TrainJudgeArgs {
    /// Bank made by `kensa enroll`.
    #[arg(long)]
    pub bank: PathBuf,
    /// Folder the bank was enrolled from (its reference images, by the names the bank records).
    #[arg(long)]
    pub images: PathBuf,
    /// Language model: a GGUF file (.gguf, e.g. SmolLM2-135M-Instruct) or a llama2.c checkpoint
    /// (.bin; tokenizer from --tokenizer).
    #[arg(long)]
    pub lm: PathBuf,
    /// llama2.c tokenizer (default: tok512.bin beside the checkpoint).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Where to write the trained judge (safetensors; a .json sidecar is written beside it).
    #[arg(long)]
    pub out: PathBuf,
    /// Synthetic training examples (half normal, half with synthetic defects).
    #[arg(long, default_value_t = TRAIN_EXAMPLES)]
    pub examples: usize,
    /// Passes over the training examples.
    #[arg(long, default_value_t = TRAIN_EPOCHS)]
    pub epochs: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = TRAIN_LR)]
    pub lr: f64,
    /// Examples per training step (run through the model together).
    #[arg(long, default_value_t = TRAIN_BATCH)]
    pub train_batch: usize,
    /// Optional product description spliced into the prompt.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Seed of the synthetic examples and of the prompt learner's initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also report accuracy on real images: an MVTec-layout class folder (its test/ is used).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[command(flatten)]
    pub model: kensa_model::cli::ModelArgs,
}

/// What `kensa train-judge` writes beside the judge's weights (`<judge>.json`), and what the
/// daemon checks before it uses them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sidecar {
    /// The language model the prompt learner was trained with.
    pub lm: PathBuf,
    /// Its tokenizer, when not the one beside the checkpoint.
    pub tokenizer: Option<PathBuf>,
    /// Product description spliced into the prompt.
    #[serde(default)]
    pub description: String,
    /// Map unit ([`map_scale`] of the bank it was trained on).
    pub scale: f64,
    /// Width of the pooled image features (the backbone's channels).
    pub image_dim: i64,
    pub map_side: i64,
    /// The bank (content hash prefix) whose references it was trained on.
    pub bank_version: String,
    pub backbone: String,
    pub examples: usize,
    pub epochs: usize,
    pub held_out_accuracy: f64,
    pub held_out_exact_answer: f64,
}

impl Sidecar {
    /// The sidecar path of a judge file.
    pub fn path_of(judge: &Path) -> PathBuf {
        PathBuf::from(format!("{}.json", judge.display()))
    }

    pub fn read(judge: &Path) -> Result<Self> {
        let p = Self::path_of(judge);
        let text = std::fs::read_to_string(&p)
            .map_err(|e| LmError::File { path: p.clone(), msg: format!("cannot read the judge's sidecar: {e}") })?;
        serde_json::from_str(&text).map_err(|e| LmError::File { path: p, msg: format!("bad judge sidecar: {e}") })
    }

    pub fn write(&self, judge: &Path) -> Result<()> {
        let p = Self::path_of(judge);
        let text =
            serde_json::to_string_pretty(self).map_err(|e| LmError::File { path: p.clone(), msg: e.to_string() })?;
        std::fs::write(&p, text + "\n").map_err(|e| LmError::File { path: p, msg: format!("cannot write: {e}") })
    }

    /// Refuses a judge trained for another bank (`bank_version`) or backbone (`dim`, its
    /// pooled feature width), saying what to do.
    pub fn check(&self, bank_version: &str, dim: i64) -> Result<()> {
        if self.image_dim != dim || self.map_side != MAP_SIDE {
            return Err(LmError::Mismatch(format!(
                "trained with image features of size {} and maps of {}², the backbone gives {dim} and the judge reads {MAP_SIDE}²",
                self.image_dim, self.map_side
            )));
        }
        if self.bank_version != bank_version {
            return Err(LmError::Mismatch(format!(
                "trained on bank version {}, the product's bank is version {bank_version}: run `kensa train-judge` again for this bank",
                self.bank_version
            )));
        }
        Ok(())
    }
}

/// Width of the pooled image features an engine's backbone gives.
pub fn image_dim(engine: &Engine) -> i64 {
    engine.backbone.meta.channels.iter().map(|&c| i64::from(c)).sum()
}

/// A trained judge for a product: its sidecar checked against the bank version and the
/// backbone's feature width, its LM loaded on `device`, its weights read.
pub fn load_judge(file: &Path, bank_version: &str, dim: i64, device: tch::Device) -> Result<LmJudge> {
    let side = Sidecar::read(file)?;
    side.check(bank_version, dim)?;
    let (model, tok) = load_lm(&side.lm, side.tokenizer.as_deref(), device)?;
    let mut j = LmJudge::new(model, tok, side.image_dim, &side.description, side.scale);
    j.load_weights(file)?;
    Ok(j)
}

/// The language-model judge of one bank, as a [`kensa_verdict::Judge`] over features the
/// engine already computed: it answers along the grammar and keeps the map's regions and score.
pub struct LanguageModelJudge<'a> {
    pub lm: &'a LmJudge,
    pub calibration: &'a kensa_verdict::Calibration,
    pub features: &'a JudgeFeatures,
}

impl kensa_verdict::Judge for LanguageModelJudge<'_> {
    fn name(&self) -> &'static str {
        "language-model"
    }

    fn judge(
        &self,
        e: &kensa_verdict::Evidence<'_>,
    ) -> std::result::Result<kensa_verdict::Verdict, kensa_verdict::VerdictError> {
        let wrap = |err: LmError| kensa_verdict::VerdictError::Judge { judge: "language-model", source: Box::new(err) };
        let x = input_from(self.features);
        let (cells, confidence) = self.lm.judge(&x).map_err(wrap)?;
        let (map_verdict, _) = kensa_verdict::judge(e.map, self.calibration);
        Ok(kensa_verdict::Verdict {
            anomalous: !cells.is_empty(),
            answer: kensa_core::grid::answer(&cells),
            locations: cells,
            confidence,
            judge: "language-model",
            ..map_verdict
        })
    }
}

/// The judge's input tensors from the engine's features.
pub fn input_from(f: &JudgeFeatures) -> JudgeInput {
    JudgeInput { map: Tensor::from_slice(&f.map).view([f.side, f.side]), image: Tensor::from_slice(&f.pooled) }
}

/// The judge's view of one image (its map max-pooled to `MAP_SIDE²` and its pooled features),
/// from one forward pass of the engine.
pub fn judge_input(engine: &Engine, bank: &Bank, img: &image::RgbImage) -> Result<JudgeInput> {
    let view = [(img.as_raw().as_slice(), img.width(), img.height())];
    let mut scored = engine.score_with(&view, bank, Some(MAP_SIDE)).map_err(|e| LmError::Model(e.to_string()))?;
    let features =
        scored.pop().and_then(|(_, f)| f).ok_or_else(|| LmError::Model("the engine returned no features".into()))?;
    Ok(input_from(&features))
}

/// The judge's language model and its tokenizer: a GGUF file (`.gguf`: weights and tokenizer in
/// one file, fp32 on the CPU, bf16 on CUDA) or a llama2.c checkpoint (`tok512.bin` beside it
/// unless `tokenizer` names another).
pub fn load_lm(lm: &Path, tokenizer: Option<&Path>, device: tch::Device) -> Result<(Llama, LmTokenizer)> {
    if lm.is_dir() {
        return Err(LmError::File {
            path: lm.to_path_buf(),
            msg: "Hugging Face models load with kensa_lm::model::Llama::load_hf, but their tokenizer.json is not supported by the judge yet; use a GGUF file or a llama2.c checkpoint".into(),
        });
    }
    if lm.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let g = crate::gguf::Gguf::open(lm)?;
        let tok = crate::bpe::BpeTokenizer::from_gguf(&g)?;
        let kind = if device.is_cuda() { tch::Kind::BFloat16 } else { tch::Kind::Float };
        let model = Llama::load_gguf(&g, device, kind)?;
        return Ok((model, LmTokenizer::Bpe(tok)));
    }
    let model = Llama::load_llama2c(lm, device)?;
    let tp = tokenizer.map_or_else(|| lm.with_file_name("tok512.bin"), Path::to_path_buf);
    let tok = Tokenizer::load(&tp, model.config.vocab_size as usize)?;
    Ok((model, LmTokenizer::Llama2c(tok)))
}

/// The unit the LM judge's prompt learner sees anomaly maps in: the highest pseudo-normal score
/// of the bank's calibration (the image decision for banks that do not keep their populations).
/// Not the decision itself: the decision rule changes with the number of references, and the
/// learner should see maps on a scale that does not (held-out synthetic accuracy of
/// `tests/judge.rs`, 2 references: 0.83 in units of the decision, 0.67 midway between the
/// highest pseudo-normal and the median pseudo-anomaly; it passes its 0.85 in these).
pub fn map_scale(cal: &kensa_verdict::Calibration) -> f64 {
    // The calibration keeps its populations sorted.
    cal.normal_scores.last().copied().unwrap_or(cal.image_threshold) as f64
}

/// The score up to which the LM judge's training treats a map as normal: the bank's image
/// decision, but never above its median synthetic defect (with 2+ references the decision
/// sits above pessimistic leave-one-out normals and can exceed most synthetic defects; capped
/// there, at least about half of them still count).
pub fn label_level(cal: &kensa_verdict::Calibration) -> f32 {
    // The calibration keeps its populations sorted.
    match cal.anomaly_scores.get(cal.anomaly_scores.len() / 2) {
        Some(&median) if median.is_finite() => cal.image_threshold.min(median),
        _ => cal.image_threshold,
    }
}

/// How much higher than an augmented copy of a reference a new normal part may score, by the
/// bank's own calibration: [`label_level`] over its highest pseudo-normal (1 when that lies
/// below it). Augmented copies of the references are the only normals the judge is trained on,
/// and they score lower than real new parts (a reference is in the bank it is scored
/// against); the calibrated decision allows for that, and the training of the LM judge does
/// the same by scaling each normal example's map by a gain drawn from `[1, this]`.
pub fn normal_gain(cal: &kensa_verdict::Calibration) -> f32 {
    let top = map_scale(cal) as f32;
    let level = label_level(cal);
    if top > 0.0 && level > top {
        level / top
    } else {
        1.0
    }
}

/// Synthetic training examples from references: augmented references (normal, each map scaled
/// by a gain drawn from `[1, normal_gain]`) and synthetic defects with exact masks that the
/// map shows (scoring above every normal example and above `label_level`), alternating, seeded.
pub fn synth_examples(
    engine: &Engine,
    bank: &Bank,
    refs: &[image::RgbImage],
    n: usize,
    seed: u64,
    mut tick: impl FnMut(),
) -> Result<Vec<(JudgeInput, Vec<Cell>)>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let cal = &bank.meta.calibration;
    let gain_max = normal_gain(cal);
    let (n_normal, n_defect) = (n.div_ceil(2), n / 2);
    let mut normals = Vec::with_capacity(n_normal);
    let mut top = 0.0f64;
    for _ in 0..n_normal {
        let img = kensa_model::pseudo::augment(&refs[rng.random_range(0..refs.len())], &mut rng);
        let mut x = judge_input(engine, bank, &img)?;
        let gain = rng.random_range(1.0..=gain_max);
        if gain != 1.0 {
            x.map *= f64::from(gain);
        }
        top = top.max(x.map.max().double_value(&[]));
        normals.push((x, Vec::new()));
        tick();
    }
    // A synthetic defect the map does not show (its score within the normal examples' range,
    // and below `label_level`) cannot be told from a normal part by any judge that reads the
    // map; it is drawn again, a bounded number of times, so the labels say what the evidence
    // can show. (The calibration's own populations cannot give this level for 2+ references:
    // they are scored against leave-one-out banks, these examples against the whole bank.)
    let level = f64::from(label_level(cal)).min(top);
    let mut defects = Vec::with_capacity(n_defect);
    let (mut attempts, mut unseen) = (0usize, 0usize);
    while defects.len() < n_defect && attempts < 4 * n_defect {
        attempts += 1;
        let img = kensa_model::pseudo::augment(&refs[rng.random_range(0..refs.len())], &mut rng);
        let donor = &refs[rng.random_range(0..refs.len())];
        let (d, mask) = kensa_model::pseudo::visible_defect(&img, donor, &mut rng);
        let x = judge_input(engine, bank, &d)?;
        if x.map.max().double_value(&[]) <= level {
            unseen += 1;
            continue;
        }
        let m: Vec<bool> = mask.as_raw().iter().map(|&v| v > 127).collect();
        defects.push((x, mask_cells(&m, mask.width() as usize, mask.height() as usize, 4)));
        tick();
    }
    if unseen > 0 {
        tracing::info!(
            unseen,
            kept = defects.len(),
            level,
            "synthetic defects that score within the normal examples' range were drawn again"
        );
    }
    // Alternating, so that any tail held out for testing holds both.
    let mut data = Vec::with_capacity(normals.len() + defects.len());
    let (mut a, mut b) = (normals.into_iter(), defects.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => break,
            (x, y) => data.extend(x.into_iter().chain(y)),
        }
    }
    Ok(data)
}

/// `kensa train-judge`: trains a bank's judge on synthetic anomalies of its references, writes
/// it and its [`Sidecar`], and optionally reports its accuracy on a class's real test images.
pub fn train_judge(a: &TrainJudgeArgs) -> Result<()> {
    let t0 = Instant::now();
    let backbone = a.model.backbone().map_err(|e| LmError::Model(e.to_string()))?;
    let probe = Bank::load_unchecked(&a.bank, tch::Device::Cpu).map_err(|e| LmError::Model(e.to_string()))?;
    let bank = Bank::load(&a.bank, &backbone.meta, probe.meta.input_size, backbone.device)
        .map_err(|e| LmError::Model(e.to_string()))?
        .cast(backbone.kind);
    let engine = Engine::new(backbone, bank.meta.input_size);
    let refs: Vec<image::RgbImage> = bank
        .meta
        .reference_files
        .iter()
        .map(|n| {
            kensa_capture::images::load_rgb(&a.images.join(n))
                .map_err(|e| LmError::Model(format!("reference {n} of {} (in --images): {e}", a.bank.display())))
        })
        .collect::<Result<_>>()?;
    // The language model trains where the backbone runs (`--device`): bf16 on a GPU.
    let (lm, tok) = load_lm(&a.lm, a.tokenizer.as_deref(), engine.backbone.device)?;
    let image_dim: i64 = engine.backbone.meta.channels.iter().map(|&c| c as i64).sum();
    let scale = map_scale(&bank.meta.calibration);
    tch::manual_seed(a.seed as i64);
    let mut judge = LmJudge::new(lm, tok, image_dim, &a.description, scale);

    let bar = indicatif::ProgressBar::new(a.examples as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("synthesising {bar:30} {pos}/{len} ({elapsed})").expect("template"),
    );
    let data = synth_examples(&engine, &bank, &refs, a.examples, a.seed, || bar.inc(1))?;
    bar.finish_and_clear();
    if data.len() < 10 {
        return Err(LmError::Decode(format!("only {} usable synthetic examples; raise --examples", data.len())));
    }
    let held = (data.len() / 5).max(2);
    let (train, test) = data.split_at(data.len() - held);
    let bar = indicatif::ProgressBar::new((train.len() * a.epochs) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("training {bar:30} {pos}/{len} loss {msg} ({elapsed}, eta {eta})")
            .expect("template"),
    );
    judge.train(train, a.epochs, a.train_batch, a.lr, |step, _, loss| {
        bar.set_position(step as u64);
        bar.set_message(format!("{loss:.3}"));
    })?;
    bar.finish_and_clear();
    let (acc, exact) = accuracy(&judge, test)?;
    judge.save(&a.out)?;
    let side = Sidecar {
        lm: a.lm.canonicalize().unwrap_or_else(|_| a.lm.clone()),
        tokenizer: a.tokenizer.clone(),
        description: a.description.clone(),
        scale,
        image_dim,
        map_side: MAP_SIDE,
        bank_version: bank.meta.version(),
        backbone: engine.backbone.meta.name.clone(),
        examples: a.examples,
        epochs: a.epochs,
        held_out_accuracy: acc,
        held_out_exact_answer: exact,
    };
    side.write(&a.out)?;
    eprintln!(
        "trained the judge in {:.0}s on {} synthetic examples ({} epochs); held-out synthetic: verdict accuracy {acc:.3}, exact answer {exact:.3} ({} examples) -> {}",
        t0.elapsed().as_secs_f64(),
        train.len(),
        a.epochs,
        test.len(),
        a.out.display()
    );
    if let Some(dir) = &a.eval {
        let test_dir = dir.join("test");
        let mut real = Vec::new();
        let bad = |e: kensa_capture::images::ImageError| LmError::Model(e.to_string());
        for t in kensa_capture::mvtec::test_images(dir).map_err(bad)? {
            let img = kensa_capture::images::load_rgb(&t.path).map_err(bad)?;
            let cells =
                match kensa_capture::mvtec::load_mask(t.mask.as_ref(), img.width(), img.height()).map_err(bad)? {
                    Some(m) => mask_cells(&m, img.width() as usize, img.height() as usize, 4),
                    None => vec![Cell::Center], // anomalous, but its mask is missing
                };
            real.push((judge_input(&engine, &bank, &img)?, cells));
        }
        let (acc, exact) = accuracy(&judge, &real)?;
        eprintln!(
            "real images in {}: verdict accuracy {acc:.3}, exact answer {exact:.3} ({} images)",
            test_dir.display(),
            real.len()
        );
    }
    Ok(())
}

/// (anomalous yes/no accuracy, exact-answer accuracy) of the judge on labelled inputs; logs
/// the confusion counts, precision, recall and location accuracy.
pub fn accuracy(judge: &LmJudge, data: &[(JudgeInput, Vec<Cell>)]) -> Result<(f64, f64)> {
    let (mut tp, mut fp, mut tn, mut fneg, mut exact, mut loc_hits) = (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
    for (x, cells) in data {
        let (got, _) = judge.judge(x)?;
        match (!got.is_empty(), !cells.is_empty()) {
            (true, true) => {
                tp += 1;
                // Location: at least one predicted cell is a cell of a true region.
                loc_hits += usize::from(got.iter().any(|c| cells.contains(c)));
            }
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fneg += 1,
        }
        exact += usize::from(&got == cells);
    }
    let n = data.len().max(1) as f64;
    tracing::info!(
        "  tp {tp} fp {fp} tn {tn} fn {fneg}; precision {:.3} recall {:.3}; location accuracy (true positives with a correct cell) {:.3}",
        tp as f64 / (tp + fp).max(1) as f64,
        tp as f64 / (tp + fneg).max(1) as f64,
        loc_hits as f64 / tp.max(1) as f64
    );
    Ok(((tp + tn) as f64 / n, exact as f64 / n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_labels_follow_the_calibration() {
        let mut cal = kensa_verdict::Calibration::fit_single(&[0.10, 0.12, 0.15], &[0.14, 0.30, 0.40, 0.50]);
        // One reference: the decision (midway between 0.15 and the median defect 0.40) is the
        // level, and normals may score up to it: a gain of up to 0.275 / 0.15.
        assert!((cal.image_threshold - 0.275).abs() < 1e-6, "{}", cal.image_threshold);
        assert_eq!(label_level(&cal), cal.image_threshold);
        assert!((normal_gain(&cal) - 0.275 / 0.15).abs() < 1e-5);
        // A decision above the median defect is capped there.
        cal.image_threshold = 0.45;
        assert_eq!(label_level(&cal), 0.40);
        assert!((normal_gain(&cal) - 0.40 / 0.15).abs() < 1e-5);
        // A decision below the highest pseudo-normal: no gain.
        cal.image_threshold = 0.12;
        assert_eq!(normal_gain(&cal), 1.0);
    }
}
