//! `kensa eval`: few-shot evaluation on MVTec-layout data (one class, or a root of classes).
//! For each shot count and run: K references drawn from train/good (seeded, different per run),
//! enrollment exactly as `kensa enroll` does it, every test image scored and judged; then image
//! AUROC, pixel AUROC, PRO (to 30 % FPR), verdict accuracy and F1, and images per second.

use crate::metrics;
use crate::{io_err, EvalError, Result};
use kensa_capture::images;
use kensa_capture::mvtec::{classes, load_mask, test_images, TestImage};
use kensa_core::regions::mask_cells;
use kensa_lm::judging::{
    judge_input, load_lm, map_scale, synth_examples, TRAIN_BATCH, TRAIN_EPOCHS, TRAIN_EXAMPLES, TRAIN_LR,
};
use kensa_model::cli::{ModelArgs, RecipeArgs};
use kensa_model::enroll::enroll;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

/// The options of `kensa eval` (the binary uses them as the subcommand's arguments).
#[derive(clap::Args, Clone, Debug)]
pub struct EvalArgs {
    /// An MVTec-layout class folder (train/good, test/*, ground_truth/*), or a folder of them.
    #[arg(long)]
    pub data: PathBuf,
    /// Shot counts, comma separated.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub shots: Vec<usize>,
    /// Runs per shot count, each with other references.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Seed of the choice of references per run, the calibration and the LM judge's training
    /// (each run mixes its index in).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write every result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also evaluate the language-model judge: a GGUF model (.gguf) or a llama2.c checkpoint
    /// (tokenizer beside it as tok512.bin, or --tokenizer). For every run it is trained on that run's references (as
    /// `kensa train-judge`), then judges every test image.
    #[arg(long)]
    pub lm: Option<PathBuf>,
    /// The llama2.c tokenizer (`tokenizer.bin`) of --lm (default: beside the checkpoint).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Synthetic examples per LM-judge training.
    #[arg(long, default_value_t = TRAIN_EXAMPLES)]
    pub judge_examples: usize,
    /// Write a self-contained HTML report here (DIR/report.html): the table, and per class and
    /// shot count (its first run) the ROC curve, a score histogram with the decision, the
    /// confusion matrix and every test image as image | ground truth | heat overlay thumbnails
    /// (filterable: all, errors, anomalous, normal).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Images per model call (as `kensa score --batch`).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Also print image and pixel AUROC per defect type (each test/<type> folder against
    /// test/good), with the type's share of all defect pixels; always in the JSON.
    #[arg(long)]
    pub by_type: bool,
    /// The prequential stream protocol instead ([`crate::stream`]): the first --shots
    /// value starts the bank, the rest of train/good and test/* are one shuffled stream, scored
    /// with learning off, feedback and auto, beside a static bank of --static-shots.
    #[arg(long)]
    pub stream: bool,
    /// References of the static bank `--stream` compares against.
    #[arg(long, default_value_t = 4)]
    pub static_shots: usize,
    /// Seconds between stream frames, for the spacing guard of learning `auto` (`--stream`).
    #[arg(long, default_value_t = 60)]
    pub interval_s: u64,
    /// Learning (`--stream`): keep the decision where enrollment put it as references join,
    /// instead of letting it follow the bank (the daemon's `[learn] follow`, on by default).
    #[arg(long)]
    pub no_follow: bool,
    /// How each run's bank is built (as `kensa enroll`).
    #[command(flatten)]
    pub recipe: RecipeArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(serde::Serialize, Clone)]
struct RunResult {
    class: String,
    shots: usize,
    run: usize,
    references: Vec<String>,
    image_auroc: Option<f64>,
    pixel_auroc: Option<f64>,
    pro: Option<f64>,
    verdict_accuracy: f64,
    verdict_f1: f64,
    /// Accuracy of the best threshold on this run's image scores, chosen with the test labels
    /// ([`metrics::best_threshold_accuracy`]): what a judge that reads the score could reach.
    best_threshold_accuracy: Option<f64>,
    images_per_second: f64,
    images: usize,
    /// Per judge: verdict accuracy, precision, recall and location accuracy.
    judges: Vec<JudgeStats>,
    /// The bank's calibration (with its pseudo-normal and pseudo-anomalous scores).
    calibration: kensa_verdict::Calibration,
    /// Every test image: path, image score, ground truth (anomalous).
    scores: Vec<(String, f32, bool)>,
    /// Per defect type (test/<type> against test/good).
    by_type: Vec<TypeResult>,
}

/// One defect type of one run: its images against the normal ones.
#[derive(serde::Serialize, Clone)]
struct TypeResult {
    kind: String,
    images: usize,
    image_auroc: Option<f64>,
    pixel_auroc: Option<f64>,
    /// The type's share of all ground-truth defect pixels of the class (pixel AUROC over the
    /// class weighs each type by it).
    pixel_share: f64,
}

/// Image and pixel AUROC of each defect type against the normal images. `kinds[i]` and
/// `scores[i]`/`labels[i]` describe test image `i`; `map_of[i]` is its index in `maps`/`masks`
/// (None when it has no ground truth).
fn by_type(
    kinds: &[&str],
    scores: &[f32],
    labels: &[bool],
    map_of: &[Option<usize>],
    maps: &[&[f32]],
    masks: &[&[bool]],
) -> Vec<TypeResult> {
    let mut types: Vec<&str> = kinds.iter().zip(labels).filter(|(_, &l)| l).map(|(k, _)| *k).collect();
    types.sort();
    types.dedup();
    let defect_px: Vec<usize> =
        map_of.iter().map(|j| j.map_or(0, |j| masks[j].iter().filter(|&&v| v).count())).collect();
    let all_px: usize = defect_px.iter().sum();
    types
        .into_iter()
        .map(|t| {
            let sel: Vec<usize> = (0..kinds.len()).filter(|&i| !labels[i] || kinds[i] == t).collect();
            let s: Vec<f32> = sel.iter().map(|&i| scores[i]).collect();
            let l: Vec<bool> = sel.iter().map(|&i| labels[i]).collect();
            let m: Vec<&[f32]> = sel.iter().filter_map(|&i| map_of[i].map(|j| maps[j])).collect();
            let k: Vec<&[bool]> = sel.iter().filter_map(|&i| map_of[i].map(|j| masks[j])).collect();
            let px: usize = sel.iter().map(|&i| defect_px[i]).sum();
            TypeResult {
                kind: t.to_string(),
                images: l.iter().filter(|&&v| v).count(),
                image_auroc: metrics::auroc(&s, &l),
                pixel_auroc: metrics::pixel_auroc(&m, &k, 10_000),
                pixel_share: if all_px == 0 { 0.0 } else { px as f64 / all_px as f64 },
            }
        })
        .collect()
}

/// How one judge did on one run. Location accuracy: of the true positives with a ground-truth
/// mask, the fraction whose answer names at least one cell holding a ground-truth region.
#[derive(serde::Serialize, Clone, Default)]
struct JudgeStats {
    judge: String,
    accuracy: f64,
    precision: f64,
    recall: f64,
    location_accuracy: f64,
    #[serde(skip)]
    counts: [usize; 6],
}

impl JudgeStats {
    fn add(
        &mut self,
        predicted: &[kensa_core::grid::Cell],
        anomalous: bool,
        says: bool,
        truth: &[kensa_core::grid::Cell],
    ) {
        let c = &mut self.counts; // tp fp tn fn located located_of
        match (says, anomalous) {
            (true, true) => {
                c[0] += 1;
                if !truth.is_empty() {
                    c[5] += 1;
                    c[4] += usize::from(predicted.iter().any(|p| truth.contains(p)));
                }
            }
            (true, false) => c[1] += 1,
            (false, false) => c[2] += 1,
            (false, true) => c[3] += 1,
        }
    }

    fn finish(mut self) -> Self {
        let [tp, fp, tn, fneg, loc, loc_of] = self.counts.map(|x| x as f64);
        self.accuracy = (tp + tn) / (tp + fp + tn + fneg).max(1.0);
        self.precision = tp / (tp + fp).max(1.0);
        self.recall = tp / (tp + fneg).max(1.0);
        self.location_accuracy = loc / loc_of.max(1.0);
        self
    }
}

/// What an evaluation did: how many runs and test images, and the files it wrote.
#[derive(Clone, Debug)]
pub struct EvalOutcome {
    /// Runs evaluated (classes × shot counts × runs per shot count).
    pub runs: usize,
    /// Test images scored, over all runs.
    pub images: usize,
    /// `--report`'s `report.html`, when asked.
    pub report: Option<PathBuf>,
    /// The `--json` file, when asked.
    pub json: Option<PathBuf>,
}

impl EvalOutcome {
    /// The process exit status it stands for: 0 (an evaluation that ran to its end succeeded;
    /// failures are [`EvalError`]s, exit status 1).
    pub fn exit_code(&self) -> u8 {
        0
    }
}

/// `kensa eval`: every class, shot count and run of `a`; prints the tables on stdout (a
/// progress bar on stderr meanwhile) and writes `--json` and `--report`.
pub fn run(a: &EvalArgs) -> Result<EvalOutcome> {
    if a.stream {
        return crate::stream::run(a);
    }
    let engine = a.recipe.engine(a.model.backbone()?)?;
    let classes = classes(&a.data)?;
    let mut plan = Vec::new();
    for (name, dir) in &classes {
        let tests = test_images(dir)?;
        for &k in &a.shots {
            for run in 0..a.runs {
                plan.push((name.clone(), dir.clone(), k, run, tests.len()));
            }
        }
    }
    let total: usize = plan.iter().map(|p| p.4).sum();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:30} {bar:30} {pos}/{len} images ({elapsed}, eta {eta})")
            .expect("valid template"),
    );
    let mut results = Vec::new();
    let mut sections: Vec<Section> = Vec::new();
    for (name, dir, k, run, _) in plan {
        bar.set_message(format!("{name} {k}-shot run {}", run + 1));
        let mut train = images::list_images(&dir.join("train/good"))?;
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(a.seed ^ (run as u64).wrapping_mul(0x9e37_79b9) ^ k as u64);
        train.shuffle(&mut rng);
        train.truncate(k);
        if train.len() < k {
            return Err(EvalError::Data {
                what: format!(
                    "{name}: only {} references in {}, {k} asked",
                    train.len(),
                    dir.join("train/good").display()
                ),
            });
        }
        let refs: Vec<(String, image::RgbImage)> = train
            .iter()
            .map(|p| Ok((p.file_name().unwrap_or_default().to_string_lossy().into_owned(), images::load_rgb(p)?)))
            .collect::<Result<_>>()?;
        let bank = enroll(&engine, &refs, &a.recipe.options(&name, a.seed)?, |_, _| {})?;
        let tests = test_images(&dir)?;
        let lm_judge = match &a.lm {
            Some(lm) => {
                let (model, tok) = load_lm(lm, a.tokenizer.as_deref(), engine.backbone.device)?;
                let dim = kensa_lm::judging::image_dim(&engine);
                let scale = map_scale(&bank.meta.calibration);
                tch::manual_seed((a.seed ^ run as u64) as i64);
                let mut j = kensa_lm::judge::LmJudge::new(model, tok, dim, "", scale);
                let ref_imgs: Vec<image::RgbImage> = refs.iter().map(|r| r.1.clone()).collect();
                let data = synth_examples(&engine, &bank, &ref_imgs, a.judge_examples, a.seed ^ run as u64, || {})?;
                j.train(&data, TRAIN_EPOCHS, TRAIN_BATCH, TRAIN_LR, |_, _, _| {})?;
                Some(j)
            }
            None => None,
        };
        let report_this = a.report.is_some() && run == 0;
        let mut gallery = Vec::new();
        let mut calibrated = JudgeStats { judge: "calibrated".into(), ..Default::default() };
        let mut language = JudgeStats { judge: "language-model".into(), ..Default::default() };
        let (mut scores, mut labels, mut preds) = (Vec::new(), Vec::new(), Vec::new());
        let (mut maps, mut masks, mut widths, mut map_of) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let t0 = Instant::now();
        for chunk in tests.chunks(a.batch.max(1)) {
            let imgs: Vec<image::RgbImage> =
                chunk.iter().map(|t| images::load_rgb(&t.path)).collect::<Result<_, _>>()?;
            let views: Vec<(&[u8], u32, u32)> =
                imgs.iter().map(|i| (i.as_raw().as_slice(), i.width(), i.height())).collect();
            let out = engine.score(&views, &bank)?;
            for ((t, map), img) in chunk.iter().zip(out).zip(&imgs) {
                let (v, _) = kensa_verdict::judge(&map, &bank.meta.calibration);
                scores.push(v.score);
                labels.push(t.anomalous);
                preds.push(v.anomalous);
                let mask = load_mask(t.mask.as_ref(), map.width, map.height)?;
                if report_this {
                    gallery.push(entry(t, &v, img, mask.as_deref(), &map, &bank.meta.calibration));
                }
                let truth = mask
                    .as_ref()
                    .map(|m| mask_cells(m, map.width as usize, map.height as usize, 4))
                    .unwrap_or_default();
                calibrated.add(&v.locations, t.anomalous, v.anomalous, &truth);
                if let Some(j) = &lm_judge {
                    let (cells, _) = j.judge(&judge_input(&engine, &bank, img)?)?;
                    language.add(&cells, t.anomalous, !cells.is_empty(), &truth);
                }
                map_of.push(mask.is_some().then_some(maps.len()));
                if let Some(m) = mask {
                    widths.push(map.width as usize);
                    masks.push(m);
                    maps.push(map.data);
                }
            }
            bar.inc(chunk.len() as u64);
        }
        let secs = t0.elapsed().as_secs_f64();
        if report_this {
            sections.push(section(&name, k, &bank.meta.calibration, gallery, &scores, &labels));
        }
        let mref: Vec<&[f32]> = maps.iter().map(Vec::as_slice).collect();
        let kref: Vec<&[bool]> = masks.iter().map(Vec::as_slice).collect();
        let (acc, f1) = metrics::accuracy_f1(&preds, &labels);
        results.push(RunResult {
            class: name.clone(),
            shots: k,
            run,
            references: refs.iter().map(|r| r.0.clone()).collect(),
            image_auroc: metrics::auroc(&scores, &labels),
            pixel_auroc: metrics::pixel_auroc(&mref, &kref, 10_000),
            pro: metrics::pro(&mref, &kref, &widths, 0.3, 10_000),
            verdict_accuracy: acc,
            verdict_f1: f1,
            best_threshold_accuracy: metrics::best_threshold_accuracy(&scores, &labels),
            images_per_second: tests.len() as f64 / secs.max(1e-9),
            images: tests.len(),
            judges: std::iter::once(calibrated.finish()).chain(lm_judge.is_some().then(|| language.finish())).collect(),
            calibration: bank.meta.calibration.clone(),
            scores: tests.iter().zip(&scores).map(|(t, &s)| (t.path.display().to_string(), s, t.anomalous)).collect(),
            by_type: by_type(
                &tests.iter().map(|t| t.kind.as_str()).collect::<Vec<_>>(),
                &scores,
                &labels,
                &map_of,
                &mref,
                &kref,
            ),
        });
    }
    bar.finish_and_clear();
    print_table(&results);
    if a.by_type {
        print_type_table(&results);
    }
    let mut report = None;
    if let Some(dir) = &a.report {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let p = dir.join("report.html");
        std::fs::write(&p, report_html(&results, &sections, a)).map_err(io_err("write", &p))?;
        eprintln!("wrote {}", p.display());
        report = Some(p);
    }
    if let Some(p) = &a.json {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&serde_json::json!({ "runs": results, "summary": summary(&results) }))?,
        )
        .map_err(io_err("write", p))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(EvalOutcome {
        runs: results.len(),
        images: results.iter().map(|r| r.images).sum(),
        report,
        json: a.json.clone(),
    })
}

/// A metric as the tables print it: 3 decimals, "-" when undefined.
fn fmt3(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.3}"))
}

fn mean(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn summary(results: &[RunResult]) -> Vec<serde_json::Value> {
    let mut keys: Vec<(String, usize)> = results.iter().map(|r| (r.class.clone(), r.shots)).collect();
    keys.dedup();
    keys.iter()
        .map(|(c, k)| {
            let rs: Vec<&RunResult> = results.iter().filter(|r| &r.class == c && r.shots == *k).collect();
            serde_json::json!({
                "class": c, "shots": k, "runs": rs.len(),
                "image_auroc": mean(rs.iter().map(|r| r.image_auroc)),
                "pixel_auroc": mean(rs.iter().map(|r| r.pixel_auroc)),
                "pro": mean(rs.iter().map(|r| r.pro)),
                "verdict_accuracy": mean(rs.iter().map(|r| Some(r.verdict_accuracy))),
                "verdict_f1": mean(rs.iter().map(|r| Some(r.verdict_f1))),
                "best_threshold_accuracy": mean(rs.iter().map(|r| r.best_threshold_accuracy)),
                "images_per_second": mean(rs.iter().map(|r| Some(r.images_per_second))),
            })
        })
        .collect()
}

/// Per class, shot count and judge: means over runs of accuracy, precision, recall, location.
fn judge_rows(results: &[RunResult]) -> Vec<(String, usize, String, [f64; 4])> {
    let mut rows: Vec<(String, usize, String, [f64; 4])> = Vec::new();
    let mut n: Vec<f64> = Vec::new();
    for r in results {
        for j in &r.judges {
            let v = [j.accuracy, j.precision, j.recall, j.location_accuracy];
            match rows.iter().position(|x| x.0 == r.class && x.1 == r.shots && x.2 == j.judge) {
                Some(i) => {
                    for (sum, x) in rows[i].3.iter_mut().zip(v) {
                        *sum += x;
                    }
                    n[i] += 1.0;
                }
                None => {
                    rows.push((r.class.clone(), r.shots, j.judge.clone(), v));
                    n.push(1.0);
                }
            }
        }
    }
    for (row, c) in rows.iter_mut().zip(n) {
        row.3.iter_mut().for_each(|x| *x /= c);
    }
    rows
}

fn print_table(results: &[RunResult]) {
    print_main_table(results);
    println!();
    println!(
        "{:<22} {:>5} {:<15} {:>8} {:>9} {:>6} {:>8}",
        "class", "shots", "judge", "accuracy", "precision", "recall", "location"
    );
    for (c, k, j, v) in judge_rows(results) {
        println!("{c:<22} {k:>5} {j:<15} {:>8.3} {:>9.3} {:>6.3} {:>8.3}", v[0], v[1], v[2], v[3]);
    }
}

/// Per class, shot count and defect type, means over runs: images, image AUROC, pixel AUROC,
/// share of the defect pixels.
fn print_type_table(results: &[RunResult]) {
    println!();
    println!(
        "{:<22} {:>5} {:<20} {:>6} {:>9} {:>9} {:>8}",
        "class", "shots", "defect type", "images", "img_AUROC", "pix_AUROC", "px_share"
    );
    let mut keys: Vec<(&str, usize, &str)> = Vec::new();
    for key in results.iter().flat_map(|r| r.by_type.iter().map(move |t| (r.class.as_str(), r.shots, t.kind.as_str())))
    {
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    for (c, k, t) in keys {
        let ts: Vec<&TypeResult> = results
            .iter()
            .filter(|r| r.class == c && r.shots == k)
            .flat_map(|r| r.by_type.iter().filter(|x| x.kind == t))
            .collect();
        let images = ts.first().map_or(0, |x| x.images);
        let share = mean(ts.iter().map(|x| Some(x.pixel_share)));
        println!(
            "{c:<22} {k:>5} {t:<20} {images:>6} {:>9} {:>9} {:>8}",
            fmt3(mean(ts.iter().map(|x| x.image_auroc))),
            fmt3(mean(ts.iter().map(|x| x.pixel_auroc))),
            fmt3(share)
        );
    }
}

/// One summary row as printed: class, shots, runs, the five metrics (3 decimals, "-" when
/// undefined) and images per second (1 decimal).
fn summary_cells(r: &serde_json::Value) -> [String; 10] {
    let f = |v: &serde_json::Value| fmt3(v.as_f64());
    [
        r["class"].as_str().unwrap_or("").to_string(),
        r["shots"].as_u64().unwrap_or(0).to_string(),
        r["runs"].as_u64().unwrap_or(0).to_string(),
        f(&r["image_auroc"]),
        f(&r["pixel_auroc"]),
        f(&r["pro"]),
        f(&r["verdict_accuracy"]),
        f(&r["verdict_f1"]),
        f(&r["best_threshold_accuracy"]),
        format!("{:.1}", r["images_per_second"].as_f64().unwrap_or(0.0)),
    ]
}

fn print_main_table(results: &[RunResult]) {
    println!(
        "{:<22} {:>5} {:>5} {:>9} {:>9} {:>7} {:>8} {:>6} {:>8} {:>7}",
        "class", "shots", "runs", "img_AUROC", "pix_AUROC", "PRO", "accuracy", "F1", "best_acc", "img/s"
    );
    let rows = summary(results);
    for r in &rows {
        let c = summary_cells(r);
        println!(
            "{:<22} {:>5} {:>5} {:>9} {:>9} {:>7} {:>8} {:>6} {:>8} {:>7}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]
        );
    }
    let shots: std::collections::BTreeSet<u64> = rows.iter().filter_map(|r| r["shots"].as_u64()).collect();
    if rows.len() > shots.len() {
        for k in shots {
            let rs: Vec<&serde_json::Value> = rows.iter().filter(|r| r["shots"].as_u64() == Some(k)).collect();
            let m = |key: &str| fmt3(mean(rs.iter().map(|r| r[key].as_f64())));
            println!(
                "{:<22} {:>5} {:>5} {:>9} {:>9} {:>7} {:>8} {:>6} {:>8}",
                "mean",
                k,
                "",
                m("image_auroc"),
                m("pixel_auroc"),
                m("pro"),
                m("verdict_accuracy"),
                m("verdict_f1"),
                m("best_threshold_accuracy")
            );
        }
    }
}

/// What the report shows for one class and shot count (its first run).
struct Section {
    class: String,
    shots: usize,
    /// ROC curve points (false positive rate, true positive rate).
    roc: Vec<(f64, f64)>,
    auroc: Option<f64>,
    /// The calibrated image decision (`image_threshold`): what the calibrated judge compares
    /// each image score with.
    decision: f32,
    /// Every test image, highest score first.
    gallery: Vec<Entry>,
}

/// One test image of the report's gallery.
struct Entry {
    /// `<defect type>/<file name>`.
    name: String,
    anomalous: bool,
    score: f32,
    /// The calibrated judge's verdict (anomalous or not).
    verdict: bool,
    /// JPEG thumbnail panel: image | ground truth (when there is one) | heat overlay.
    jpeg: Vec<u8>,
}

/// Longest side, in pixels, of each part of a gallery thumbnail.
const THUMB_SIDE: u32 = 160;

/// Bins of the report's score histograms.
const HIST_BINS: usize = 24;

/// The gallery entry of test image `t` (`img`, its ground truth `gt`, its map and verdict `v`).
/// The overlay outlines regions above the calibrated pixel level.
fn entry(
    t: &TestImage,
    v: &kensa_verdict::Verdict,
    img: &image::RgbImage,
    gt: Option<&[bool]>,
    map: &kensa_core::AnomalyMap,
    cal: &kensa_verdict::Calibration,
) -> Entry {
    let pic = crate::overlay::small_panel(img, gt, map, cal.pixel_threshold, THUMB_SIDE);
    Entry {
        name: format!("{}/{}", t.kind, t.path.file_name().unwrap_or_default().to_string_lossy()),
        anomalous: t.anomalous,
        score: v.score,
        verdict: v.anomalous,
        jpeg: crate::overlay::jpeg(&pic, 80),
    }
}

/// ROC points of scores against labels (descending thresholds, ties taken together).
fn roc(scores: &[f32], labels: &[bool]) -> Vec<(f64, f64)> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let p = labels.iter().filter(|l| **l).count().max(1) as f64;
    let n = labels.iter().filter(|l| !**l).count().max(1) as f64;
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut pts = vec![(0.0, 0.0)];
    for (i, &k) in idx.iter().enumerate() {
        if labels[k] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        if i + 1 == idx.len() || scores[idx[i + 1]] != scores[k] {
            pts.push((fp / n, tp / p));
        }
    }
    pts
}

/// The report section of one class and shot count: `scores[i]`/`labels[i]` of test image `i`,
/// `gallery` its entries (any order).
fn section(
    class: &str,
    shots: usize,
    cal: &kensa_verdict::Calibration,
    mut gallery: Vec<Entry>,
    scores: &[f32],
    labels: &[bool],
) -> Section {
    gallery.sort_by(|a, b| b.score.total_cmp(&a.score));
    Section {
        class: class.to_string(),
        shots,
        roc: roc(scores, labels),
        auroc: metrics::auroc(scores, labels),
        decision: cal.image_threshold,
        gallery,
    }
}

/// The histogram's score range: all scores and the decision, with 5 % of the span (at least
/// 1e-3) on either side.
fn hist_range(scores: &[f32], decision: f32) -> (f32, f32) {
    let lo = scores.iter().copied().fold(decision, f32::min);
    let hi = scores.iter().copied().fold(decision, f32::max);
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

/// Per bin of `bins` equal bins over `lo..hi`: [normal, anomalous] counts of `scores` by
/// `labels`. Scores outside the range go to the first or last bin.
fn histogram(scores: &[f32], labels: &[bool], lo: f32, hi: f32, bins: usize) -> Vec<[usize; 2]> {
    let mut h = vec![[0usize; 2]; bins.max(1)];
    let last = h.len() - 1;
    for (&s, &l) in scores.iter().zip(labels) {
        let b = ((s - lo) / (hi - lo) * h.len() as f32).floor();
        h[(b.max(0.0) as usize).min(last)][usize::from(l)] += 1;
    }
    h
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn roc_svg(pts: &[(f64, f64)]) -> String {
    let (w, h, m) = (260.0, 260.0, 30.0);
    let xy = |(x, y): (f64, f64)| (m + x * (w - 2.0 * m), h - m - y * (h - 2.0 * m));
    let line: Vec<String> = pts.iter().map(|&p| xy(p)).map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let (x0, y0) = xy((0.0, 0.0));
    let (x1, y1) = xy((1.0, 1.0));
    format!(
        r##"<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg"><rect x="{x0}" y="{y1}" width="{}" height="{}" fill="#fff" stroke="#999"/><line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#ccc" stroke-dasharray="4"/><polyline fill="none" stroke="#c0392b" stroke-width="2" points="{}"/><text x="{}" y="{}" font-size="11" text-anchor="middle">false positive rate</text><text x="10" y="{}" font-size="11" transform="rotate(-90 10 {})" text-anchor="middle">true positive rate</text></svg>"##,
        x1 - x0,
        y0 - y1,
        line.join(" "),
        w / 2.0,
        h - 8.0,
        h / 2.0,
        h / 2.0
    )
}

/// Normal and anomalous image scores in two colours ([`HIST_BINS`] bins, side by side in each
/// bin), with the decision as a dashed line. Each bar carries its count (`data-n`), the line its
/// value (`data-threshold`).
fn hist_svg(scores: &[f32], labels: &[bool], decision: f32) -> String {
    const COLOURS: [(&str, &str); 2] = [("normal", "#3b6fb6"), ("anomalous", "#e67e22")];
    let (w, h, m) = (440.0, 260.0, 34.0);
    let (lo, hi) = hist_range(scores, decision);
    let bins = histogram(scores, labels, lo, hi, HIST_BINS);
    let top = bins.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
    let x_of = |v: f64| m + (v - lo as f64) / (hi - lo) as f64 * (w - 2.0 * m);
    let bw = (w - 2.0 * m) / bins.len() as f64;
    let mut svg = format!(
        r##"<svg class="hist" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg"><rect x="{m}" y="{m}" width="{}" height="{}" fill="#fff" stroke="#999"/>"##,
        w - 2.0 * m,
        h - 2.0 * m
    );
    for (i, b) in bins.iter().enumerate() {
        for (j, (class, colour)) in COLOURS.iter().enumerate() {
            if b[j] == 0 {
                continue;
            }
            let bh = b[j] as f64 / top * (h - 2.0 * m - 10.0);
            svg.push_str(&format!(
                r#"<rect class="{class}" data-n="{}" x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{colour}"><title>{} {class}</title></rect>"#,
                b[j],
                m + i as f64 * bw + j as f64 * bw / 2.0,
                h - m - bh,
                bw / 2.0,
                b[j]
            ));
        }
    }
    let x = x_of(decision as f64);
    let count = |l: bool| labels.iter().filter(|&&v| v == l).count();
    svg.push_str(&format!(
        r##"<line class="decision" data-threshold="{decision:.4}" x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#000" stroke-width="2" stroke-dasharray="5 3"/><text x="{x:.1}" y="{}" font-size="11" text-anchor="middle">decision {decision:.4}</text><text x="{m}" y="{}" font-size="10">{lo:.3}</text><text x="{}" y="{}" font-size="10" text-anchor="end">{hi:.3}</text><text x="{}" y="{}" font-size="11" text-anchor="middle">image score</text><text x="10" y="{}" font-size="11" transform="rotate(-90 10 {})" text-anchor="middle">images</text><rect x="{}" y="8" width="10" height="10" fill="{}"/><text x="{}" y="17" font-size="11">normal ({})</text><rect x="{}" y="8" width="10" height="10" fill="{}"/><text x="{}" y="17" font-size="11">anomalous ({})</text></svg>"##,
        m - 4.0,
        h - m,
        m - 8.0,
        h - m + 12.0,
        w - m,
        h - m + 12.0,
        w / 2.0,
        h - 6.0,
        h / 2.0,
        h / 2.0,
        w - 250.0,
        COLOURS[0].1,
        w - 236.0,
        count(false),
        w - 140.0,
        COLOURS[1].1,
        w - 126.0,
        count(true)
    ));
    svg
}

/// The calibrated judge's confusion matrix (rows: ground truth, columns: verdict), each cell with
/// its count (`data-n`), and the accuracy.
fn confusion_html(c: &metrics::Confusion) -> String {
    format!(
        r#"<table class="confusion"><caption>calibrated judge: accuracy {:.3}</caption><tr><th>truth \ verdict</th><th>anomalous</th><th>normal</th></tr><tr><th>anomalous</th><td class="tp" data-n="{tp}">TP {tp}</td><td class="fn" data-n="{fn_}">FN {fn_}</td></tr><tr><th>normal</th><td class="fp" data-n="{fp}">FP {fp}</td><td class="tn" data-n="{tn}">TN {tn}</td></tr></table>"#,
        c.accuracy(),
        tp = c.tp,
        fp = c.fp,
        fn_ = c.fn_,
        tn = c.tn
    )
}

/// Every test image of a section, highest score first, with the filter buttons (`id`: the
/// gallery's element id).
fn gallery_html(id: &str, entries: &[Entry]) -> String {
    use base64::Engine as _;
    let count = |f: &dyn Fn(&Entry) -> bool| entries.iter().filter(|e| f(e)).count();
    let mut html = format!(
        r#"<div class="filter" data-gallery="{id}"><button class="on" onclick="filt(this,'all')">all ({})</button><button onclick="filt(this,'errors')">errors only ({})</button><button onclick="filt(this,'anomalous')">anomalous ({})</button><button onclick="filt(this,'normal')">normal ({})</button></div><div class="gallery" id="{id}">"#,
        entries.len(),
        count(&|e| e.verdict != e.anomalous),
        count(&|e| e.anomalous),
        count(&|e| !e.anomalous)
    );
    for e in entries {
        let word = |anomalous: bool| if anomalous { "anomalous" } else { "normal" };
        let (label, verdict) = (word(e.anomalous), word(e.verdict));
        let right = e.verdict == e.anomalous;
        let cap = format!(
            "{} — {label} — score {:.4} — verdict {verdict} — {}",
            e.name,
            e.score,
            if right { "correct" } else { "wrong" }
        );
        html.push_str(&format!(
            r#"<figure class="shot{}" data-label="{label}" data-correct="{}"><img alt="{}" src="data:image/jpeg;base64,{}"><figcaption>{}</figcaption></figure>"#,
            if right { "" } else { " wrong" },
            if right { "yes" } else { "no" },
            esc(&e.name),
            base64::engine::general_purpose::STANDARD.encode(&e.jpeg),
            esc(&cap)
        ));
    }
    html.push_str("</div>");
    html
}

/// Shows the figures of a gallery that pass the filter of the pressed button.
const FILTER_JS: &str = "<script>function filt(b,f){var bar=b.parentNode;bar.querySelectorAll('button').forEach(function(x){x.classList.toggle('on',x===b)});document.getElementById(bar.dataset.gallery).querySelectorAll('figure').forEach(function(e){var d=e.dataset;e.style.display=(f==='all'||(f==='errors'&&d.correct==='no')||f===d.label)?'':'none'})}</script>";

fn report_html(results: &[RunResult], sections: &[Section], a: &EvalArgs) -> String {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Kensa evaluation</title><style>body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}td:first-child{text-align:left}figure{display:inline-block;margin:6px}figcaption{font-size:12px;max-width:780px}img{max-width:780px}.charts{display:flex;flex-wrap:wrap;align-items:flex-start;gap:24px}.confusion caption{font-size:13px;padding:4px}.confusion td{text-align:center}.gallery{display:flex;flex-wrap:wrap;align-items:flex-start}.shot{margin:4px}.shot figcaption{font-size:11px;max-width:330px}.shot.wrong img{outline:3px solid #c0392b}.filter button{margin:0 4px 8px 0;padding:3px 10px;border:1px solid #999;background:#f4f4f4;cursor:pointer}.filter button.on{background:#333;color:#fff}</style></head><body>",
    );
    html.push_str(&format!(
        "<h1>Kensa evaluation</h1><p>data <code>{}</code>, shots {:?}, runs {}, seed {}, input {} px, aggregation {}, augmentation {}, coreset {}, self-match {}. Verdicts are thresholdless (calibrated from the references).</p>",
        esc(&a.data.display().to_string()),
        a.shots,
        a.runs,
        a.seed,
        a.recipe.input_size,
        a.recipe.aggregation.as_ref().map_or_else(|| "default".into(), |v| format!("{v:?}")),
        esc(&a.recipe.augment),
        a.recipe.coreset,
        if a.recipe.no_self_match { "off" } else { "on" }
    ));
    html.push_str("<table><tr><th>class</th><th>shots</th><th>runs</th><th>image AUROC</th><th>pixel AUROC</th><th>PRO</th><th>verdict accuracy</th><th>F1</th><th>best-threshold accuracy</th><th>img/s</th></tr>");
    for r in summary(results) {
        let cells: String = summary_cells(&r).iter().map(|c| format!("<td>{}</td>", esc(c))).collect();
        html.push_str(&format!("<tr>{cells}</tr>"));
    }
    html.push_str("</table>");
    for (i, s) in sections.iter().enumerate() {
        let scores: Vec<f32> = s.gallery.iter().map(|e| e.score).collect();
        let labels: Vec<bool> = s.gallery.iter().map(|e| e.anomalous).collect();
        let preds: Vec<bool> = s.gallery.iter().map(|e| e.verdict).collect();
        html.push_str(&format!(
            "<h2>{} — {} shot(s), run 1</h2><p>image AUROC {}; the calibrated judge calls an image anomalous when its score reaches the decision {:.4}.</p><div class=\"charts\">{}{}{}</div><h3>All {} test images, highest score first</h3>{}",
            esc(&s.class),
            s.shots,
            fmt3(s.auroc),
            s.decision,
            roc_svg(&s.roc),
            hist_svg(&scores, &labels, s.decision),
            confusion_html(&metrics::Confusion::new(&preds, &labels)),
            s.gallery.len(),
            gallery_html(&format!("gallery-{i}"), &s.gallery)
        ));
    }
    html.push_str("<p>Panels: image | ground truth (defective images) | heat overlay (turbo colour map, dark blue = low, dark red = high; white outline: regions above the calibrated pixel level). Red frame: the calibrated judge was wrong.</p>");
    html.push_str(FILTER_JS);
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_points_of_a_small_fixture() {
        // Scores 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): (0,0) (0,.5) (.5,.5) (.5,1) (1,1).
        let pts = roc(&[0.9, 0.8, 0.7, 0.1], &[true, false, true, false]);
        assert_eq!(pts, vec![(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]);
        // Ties move together.
        assert_eq!(roc(&[0.5, 0.5], &[true, false]), vec![(0.0, 0.0), (1.0, 1.0)]);
    }

    #[test]
    fn histogram_bins_by_label() {
        // Four bins of 0.25 over 0..1: 0.1 (normal) | 0.3, 0.49 (normal, anomalous) | - | 0.75
        // (anomalous, on the bin's lower edge), 1.0 (the upper end joins the last bin); out of
        // range scores go to the end bins.
        let h = histogram(
            &[0.1, 0.3, 0.49, 0.75, 1.0, -2.0, 5.0],
            &[false, false, true, true, true, false, true],
            0.0,
            1.0,
            4,
        );
        assert_eq!(h, vec![[2, 0], [1, 1], [0, 0], [0, 3]]);
        assert_eq!(h.iter().flatten().sum::<usize>(), 7);
        // The range covers the scores and the decision, padded by 5 % of the span.
        let (lo, hi) = hist_range(&[0.2, 0.6], 1.0);
        assert!((lo - 0.16).abs() < 1e-6 && (hi - 1.04).abs() < 1e-6, "{lo} {hi}");
        let (lo, hi) = hist_range(&[0.5, 0.5], 0.5);
        assert!(hi > lo, "a single value still spans");
    }

    #[test]
    fn report_charts_carry_their_counts() {
        let svg = hist_svg(&[0.1, 0.2, 0.8, 0.9, 0.85], &[false, false, true, true, false], 0.5);
        let n = |class: &str| -> usize {
            svg.split(&format!("class=\"{class}\" data-n=\""))
                .skip(1)
                .map(|x| x.split('"').next().unwrap().parse::<usize>().unwrap())
                .sum()
        };
        assert_eq!((n("normal"), n("anomalous")), (3, 2));
        assert!(svg.contains("data-threshold=\"0.5000\""), "{svg}");
        let c = confusion_html(&metrics::Confusion { tp: 2, fp: 1, fn_: 0, tn: 2 });
        assert!(c.contains("class=\"tp\" data-n=\"2\"") && c.contains("class=\"fp\" data-n=\"1\""), "{c}");
        assert!(c.contains("accuracy 0.800"), "{c}");
    }

    #[test]
    fn defect_types_are_scored_against_the_normal_images() {
        // Two normal images, a one-pixel crack, a two-pixel stain and a stain without a mask.
        let kinds = ["good", "good", "crack", "stain", "stain"];
        let scores = [0.1, 0.5, 0.9, 0.3, 0.7];
        let labels = [false, false, true, true, true];
        let maps: [&[f32]; 4] =
            [&[0.1, 0.2, 0.1, 0.1], &[0.5, 0.1, 0.1, 0.1], &[0.9, 0.2, 0.1, 0.1], &[0.6, 0.1, 0.2, 0.1]];
        let masks: [&[bool]; 4] = [&[false; 4], &[false; 4], &[true, false, false, false], &[false, false, true, true]];
        let t = by_type(&kinds, &scores, &labels, &[Some(0), Some(1), Some(2), Some(3), None], &maps, &masks);
        assert_eq!(t.iter().map(|x| (x.kind.as_str(), x.images)).collect::<Vec<_>>(), vec![("crack", 1), ("stain", 2)]);
        // crack: 0.9 above both normal images and above every normal pixel.
        assert_eq!(t[0].image_auroc, Some(1.0));
        assert_eq!(t[0].pixel_auroc, Some(1.0));
        // stain: 0.3 and 0.7 against 0.1 and 0.5: 3 of 4 pairs. Pixels 0.2 and 0.1 against ten
        // normal pixels (seven 0.1, one 0.2, 0.5, 0.6): (7 + 0.5 + 3.5) / 20 = 0.55.
        assert_eq!(t[1].image_auroc, Some(0.75));
        assert!((t[1].pixel_auroc.unwrap() - 0.55).abs() < 1e-9, "{:?}", t[1].pixel_auroc);
        assert!((t[0].pixel_share - 1.0 / 3.0).abs() < 1e-12 && (t[1].pixel_share - 2.0 / 3.0).abs() < 1e-12);
    }
}
