//! `kensa train-judge`: trains the language-model judge's prompt learner and image projection
//! (the LM stays frozen) on synthetic anomalies made from a bank's reference images.

use crate::commands::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use kensa_capture::images;
use kensa_core::grid::Cell;
use kensa_lm::judge::{JudgeInput, LmJudge, MAP_SIDE};
use kensa_lm::model::Llama;
use kensa_lm::tokenizer::Tokenizer;
use kensa_model::backbone::images_to_batch;
use kensa_model::bank::Bank;
use kensa_model::engine::Engine;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use tch::{Kind, Tensor};

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

#[derive(Args)]
pub struct TrainJudgeArgs {
    /// Bank made by `kensa enroll`.
    #[arg(long)]
    bank: PathBuf,
    /// Folder the bank was enrolled from (its reference images, by the names the bank records).
    #[arg(long)]
    images: PathBuf,
    /// Language model: a llama2.c checkpoint (.bin; tokenizer from --tokenizer).
    #[arg(long)]
    lm: PathBuf,
    /// llama2.c tokenizer (default: tok512.bin beside the checkpoint).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Where to write the trained judge (safetensors; a .json sidecar is written beside it).
    #[arg(long)]
    out: PathBuf,
    /// Synthetic training examples (half normal, half with synthetic defects).
    #[arg(long, default_value_t = TRAIN_EXAMPLES)]
    examples: usize,
    #[arg(long, default_value_t = TRAIN_EPOCHS)]
    epochs: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = TRAIN_LR)]
    lr: f64,
    /// Optional product description spliced into the prompt.
    #[arg(long, default_value = "")]
    description: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also report accuracy on real images: an MVTec-layout class folder (its test/ is used).
    #[arg(long)]
    eval: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
}

/// The language-model judge of one bank, as a [`kensa_verdict::Judge`]: it reads the frame's
/// map and pooled features, answers along the grammar, and keeps the map's regions and score.
pub struct LanguageModelJudge<'a> {
    pub lm: &'a LmJudge,
    pub engine: &'a Engine,
    pub bank: &'a Bank,
}

impl kensa_verdict::Judge for LanguageModelJudge<'_> {
    fn name(&self) -> &'static str {
        "language-model"
    }

    fn judge(&self, e: &kensa_verdict::Evidence<'_>) -> std::result::Result<kensa_verdict::Verdict, String> {
        let x = judge_input(self.engine, self.bank, e.image).map_err(|e| e.to_string())?;
        let (cells, confidence) = self.lm.judge(&x).map_err(|e| e.to_string())?;
        let (map_verdict, _) = kensa_verdict::judge(e.map, &self.bank.meta.calibration);
        Ok(kensa_verdict::Verdict {
            anomalous: !cells.is_empty(),
            answer: kensa_core::grid::answer(&cells),
            locations: cells,
            confidence,
            judge: self.name(),
            ..map_verdict
        })
    }
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

/// Distinct grid cells of a binary mask's connected regions (by region centre).
pub fn mask_cells(mask: &[bool], w: usize, h: usize) -> Vec<Cell> {
    let mut cells: Vec<Cell> = kensa_core::eval::regions(mask, w)
        .into_iter()
        .filter(|r| r.len() >= 4)
        .map(|r| {
            let (sx, sy) = r.iter().fold((0.0, 0.0), |(a, b), &i| (a + (i % w) as f64, b + (i / w) as f64));
            let n = r.len() as f64;
            Cell::of_point(sx / n + 0.5, sy / n + 0.5, w as f64, h as f64)
        })
        .collect();
    cells.sort();
    cells.dedup();
    cells
}

/// The judge's view of one image: its map (max-pooled to MAP_SIDE²) and pooled features.
pub fn judge_input(engine: &Engine, bank: &Bank, img: &image::RgbImage) -> Result<JudgeInput> {
    let _g = tch::no_grad_guard();
    // Inside the bank's crop, as the engine scores.
    let cropped = kensa_model::engine::crop_frame(img.as_raw(), img.width(), img.height(), bank.meta.crop);
    let view = match &cropped {
        Some((r, data)) => [(data.as_slice(), r[2], r[3])],
        None => [(img.as_raw().as_slice(), img.width(), img.height())],
    };
    let size = bank.meta.input_size as i64;
    let batch = images_to_batch(&view, size, engine.device());
    let feats = engine.backbone.patch_features(&batch, &bank.meta.aggregation())?;
    let pooled: Vec<Tensor> = feats.iter().map(|f| f.to_kind(Kind::Float).mean_dim([2i64, 3].as_slice(), false, Kind::Float)).collect();
    let image = Tensor::cat(&pooled, 1).squeeze_dim(0);
    let maps = engine.maps_from_features(&feats, &bank.layers, size, bank.meta.self_match); // [1, S, S]
    let map = maps.unsqueeze(1).adaptive_max_pool2d([MAP_SIDE, MAP_SIDE]).0.view([MAP_SIDE, MAP_SIDE]);
    Ok(JudgeInput { map, image })
}

pub fn load_lm(lm: &Path, tokenizer: Option<&Path>, device: tch::Device) -> Result<(Llama, Tokenizer)> {
    if lm.is_dir() {
        bail!("{}: Hugging Face models load with kensa_lm::model::Llama::load_hf, but their tokenizer.json is not supported by train-judge yet; use a llama2.c checkpoint", lm.display());
    }
    let model = Llama::load_llama2c(lm, device)?;
    let tp = tokenizer.map(Path::to_path_buf).unwrap_or_else(|| lm.with_file_name("tok512.bin"));
    let tok = Tokenizer::load(&tp, model.config.vocab_size as usize).with_context(|| format!("tokenizer {}", tp.display()))?;
    Ok((model, tok))
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
            x.map = x.map * f64::from(gain);
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
        defects.push((x, mask_cells(&m, mask.width() as usize, mask.height() as usize)));
        tick();
    }
    if unseen > 0 {
        tracing::info!(unseen, kept = defects.len(), level, "synthetic defects that score within the normal examples' range were drawn again");
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

pub fn train_judge(a: TrainJudgeArgs) -> Result<ExitCode> {
    let t0 = Instant::now();
    let backbone = a.model.backbone()?;
    let probe = Bank::load_unchecked(&a.bank, tch::Device::Cpu)?;
    let bank = Bank::load(&a.bank, &backbone.meta, probe.meta.input_size, backbone.device)?.cast(backbone.kind);
    let engine = Engine::new(backbone, bank.meta.input_size);
    let refs: Vec<image::RgbImage> = bank
        .meta
        .reference_files
        .iter()
        .map(|n| images::load_rgb(&a.images.join(n)).with_context(|| format!("reference {n} of {} (in --images)", a.bank.display())))
        .collect::<Result<_>>()?;
    let (lm, tok) = load_lm(&a.lm, a.tokenizer.as_deref(), tch::Device::Cpu)?;
    let image_dim: i64 = engine.backbone.meta.channels.iter().map(|&c| c as i64).sum();
    let scale = map_scale(&bank.meta.calibration);
    tch::manual_seed(a.seed as i64);
    let mut judge = LmJudge::new(lm, tok, image_dim, &a.description, scale);

    let bar = indicatif::ProgressBar::new(a.examples as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("synthesising {bar:30} {pos}/{len} ({elapsed})").expect("template"));
    let data = synth_examples(&engine, &bank, &refs, a.examples, a.seed, || bar.inc(1))?;
    bar.finish_and_clear();
    if data.len() < 10 {
        bail!("only {} usable synthetic examples; raise --examples", data.len());
    }
    let held = (data.len() / 5).max(2);
    let (train, test) = data.split_at(data.len() - held);
    let bar = indicatif::ProgressBar::new((train.len() * a.epochs) as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("training {bar:30} {pos}/{len} loss {msg} ({elapsed}, eta {eta})").expect("template"));
    judge.train(train, a.epochs, a.lr, |step, _, loss| {
        bar.set_position(step as u64);
        bar.set_message(format!("{loss:.3}"));
    })?;
    bar.finish_and_clear();
    let (acc, exact) = accuracy(&judge, test)?;
    judge.save(&a.out)?;
    let side = serde_json::json!({
        "lm": a.lm.canonicalize().unwrap_or(a.lm.clone()),
        "tokenizer": a.tokenizer,
        "description": a.description,
        "scale": scale,
        "image_dim": image_dim,
        "map_side": MAP_SIDE,
        "bank_version": bank.meta.version(),
        "backbone": engine.backbone.meta.name,
        "examples": a.examples,
        "epochs": a.epochs,
        "held_out_accuracy": acc,
        "held_out_exact_answer": exact,
    });
    let sp = PathBuf::from(format!("{}.json", a.out.display()));
    std::fs::write(&sp, serde_json::to_string_pretty(&side)? + "\n").with_context(|| format!("cannot write {}", sp.display()))?;
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
        for t in crate::eval::test_images(dir)? {
            let img = images::load_rgb(&t.path)?;
            let cells = match crate::eval::load_mask(t.mask.as_ref(), img.width(), img.height())? {
                Some(m) => mask_cells(&m, img.width() as usize, img.height() as usize),
                None => vec![Cell::Center], // anomalous, but its mask is missing
            };
            real.push((judge_input(&engine, &bank, &img)?, cells));
        }
        let (acc, exact) = accuracy(&judge, &real)?;
        eprintln!("real images in {}: verdict accuracy {acc:.3}, exact answer {exact:.3} ({} images)", test_dir.display(), real.len());
    }
    Ok(ExitCode::SUCCESS)
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
    eprintln!(
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

    #[test]
    fn mask_cells_are_distinct_region_centres() {
        let (w, h) = (9usize, 9usize);
        let mut m = vec![false; w * h];
        // A 2×2 blob in the top left, one in the bottom right, one more in the top left.
        for (x, y) in [(0, 0), (1, 0), (0, 1), (1, 1), (7, 7), (8, 7), (7, 8), (8, 8)] {
            m[y * w + x] = true;
        }
        for (x, y) in [(1, 2 + 1), (2, 2 + 1), (1, 2 + 2), (2, 2 + 2)] {
            m[y * w + x] = true;
        }
        assert_eq!(mask_cells(&m, w, h), vec![Cell::TopLeft, Cell::Left, Cell::BottomRight]);
        // Specks under 4 pixels are not regions.
        let mut speck = vec![false; w * h];
        speck[40] = true;
        assert!(mask_cells(&speck, w, h).is_empty());
    }
}
