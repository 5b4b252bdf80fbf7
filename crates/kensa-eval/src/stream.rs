//! `kensa eval --stream`: the prequential protocol. Per class and run (seeded): the first
//! `--shots` images of the shuffled `train/good` enroll the bank; the rest of `train/good`
//! (normal) and every `test/*` image are shuffled into one stream; every frame is scored
//! *before* anything it teaches ([`crate::replay::Stream`], exactly as `kensa replay` and the
//! daemon do), and the operator (the ground truth) answers only the frames Kensa flags.
//! Reported over the whole stream and its second half, for learning `off`, `feedback` and
//! `auto`, beside a static bank of `--static-shots` references scored on the same stream.

use crate::eval::{EvalArgs, EvalOutcome};
use crate::metrics;
use crate::replay::Stream;
use crate::{io_err, EvalError, Result};
use kensa_capture::images;
use kensa_capture::mvtec::{classes, load_mask, test_images};
use kensa_learn::learner::{Guards, Learner};
use kensa_learn::{Label, LearnMode};
use kensa_model::bank::Bank;
use kensa_model::enroll::enroll;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::PathBuf;
use std::sync::Arc;

/// Maps and masks are compared at most this many pixels a side (nearest sampling), so a long
/// stream's maps stay small in memory.
const PIXEL_SIDE: u32 = 128;

/// One frame of the stream: its image, whether it is anomalous, its mask file.
struct Frame {
    path: PathBuf,
    anomalous: bool,
    mask: Option<PathBuf>,
}

/// Metrics of a slice of the stream.
#[derive(serde::Serialize, Clone, Debug, Default)]
struct Slice {
    frames: usize,
    image_auroc: Option<f64>,
    pixel_auroc: Option<f64>,
    verdict_accuracy: f64,
}

#[derive(serde::Serialize, Clone, Debug)]
struct StreamResult {
    class: String,
    run: usize,
    /// `off`, `feedback`, `auto`, or `static-N` (a bank of N references, no learning).
    mode: String,
    whole: Slice,
    second_half: Slice,
    references_end: usize,
    rows_end: i64,
    stats: kensa_learn::learner::Stats,
    seconds: f64,
}

fn small(data: &[f32], w: u32, h: u32) -> Vec<f32> {
    let (sw, sh) = (w.min(PIXEL_SIDE), h.min(PIXEL_SIDE));
    (0..sh)
        .flat_map(|y| (0..sw).map(move |x| (y, x)))
        .map(|(y, x)| data[((y * h / sh) * w + x * w / sw) as usize])
        .collect()
}

fn slice(scores: &[f32], labels: &[bool], preds: &[bool], maps: &[Vec<f32>], masks: &[Vec<bool>]) -> Slice {
    let mref: Vec<&[f32]> = maps.iter().map(Vec::as_slice).collect();
    let kref: Vec<&[bool]> = masks.iter().map(Vec::as_slice).collect();
    Slice {
        frames: scores.len(),
        image_auroc: metrics::auroc(scores, labels),
        pixel_auroc: metrics::pixel_auroc(&mref, &kref, 10_000),
        verdict_accuracy: metrics::accuracy_f1(preds, labels).0,
    }
}

/// `kensa eval --stream`.
pub fn run(a: &EvalArgs) -> Result<EvalOutcome> {
    let engine = a.recipe.engine(a.model.backbone()?)?;
    let shots = a.shots.first().copied().unwrap_or(1).max(1);
    let mut results: Vec<StreamResult> = Vec::new();
    for (name, dir) in classes(&a.data)? {
        for run in 0..a.runs.max(1) {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed ^ (run as u64).wrapping_mul(0x9e37_79b9));
            let mut train = images::list_images(&dir.join("train/good"))?;
            train.shuffle(&mut rng);
            let held_out = shots.max(a.static_shots);
            if train.len() <= held_out {
                return Err(EvalError::Data {
                    what: format!("{name}: {} images in train/good, more than {held_out} needed", train.len()),
                });
            }
            let mut stream: Vec<Frame> =
                train[held_out..].iter().map(|p| Frame { path: p.clone(), anomalous: false, mask: None }).collect();
            stream.extend(test_images(&dir)?.into_iter().map(|t| Frame {
                path: t.path,
                anomalous: t.anomalous,
                mask: t.mask,
            }));
            stream.shuffle(&mut rng);
            let load = |p: &PathBuf| -> Result<(String, image::RgbImage)> {
                Ok((p.file_name().unwrap_or_default().to_string_lossy().into_owned(), images::load_rgb(p)?))
            };
            let one: Vec<(String, image::RgbImage)> = train[..shots].iter().map(load).collect::<Result<_>>()?;
            let many: Vec<(String, image::RgbImage)> =
                train[..a.static_shots].iter().map(load).collect::<Result<_>>()?;
            let opts = a.recipe.options(&name, a.seed ^ run as u64)?;
            let start = enroll(&engine, &one, &opts, |_, _| {})?.cast(engine.backbone.kind);
            let wide = enroll(&engine, &many, &opts, |_, _| {})?.cast(engine.backbone.kind);
            let modes = [
                (LearnMode::Off.as_name().to_string(), LearnMode::Off, &start),
                (LearnMode::Feedback.as_name().to_string(), LearnMode::Feedback, &start),
                (LearnMode::Auto.as_name().to_string(), LearnMode::Auto, &start),
                (format!("static-{}", a.static_shots), LearnMode::Off, &wide),
            ];
            for (label, mode, bank) in modes {
                let t0 = std::time::Instant::now();
                let bank = Bank {
                    meta: bank.meta.clone(),
                    layers: bank.layers.iter().map(tch::Tensor::shallow_clone).collect(),
                };
                let mut s = Stream {
                    engine: &engine,
                    bank,
                    learner: Learner::new(mode, Guards { follow: !a.no_follow, ..Guards::default() }),
                };
                let (mut scores, mut labels, mut preds, mut maps, mut masks) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for (i, f) in stream.iter().enumerate() {
                    let img = Arc::new(images::load_rgb(&f.path)?);
                    let frame = format!("{i}-{}", f.path.file_stem().unwrap_or_default().to_string_lossy());
                    let answer = if f.anomalous { Label::Defect } else { Label::Normal };
                    let step = s.step(&frame, img, i as u64 * a.interval_s, Some(answer))?;
                    let (w, h) = (step.map.width, step.map.height);
                    scores.push(step.verdict.score);
                    labels.push(f.anomalous);
                    preds.push(step.verdict.anomalous);
                    let mask = if f.anomalous {
                        load_mask(f.mask.as_ref(), w, h)?
                    } else {
                        Some(vec![false; (w * h) as usize])
                    };
                    if let Some(m) = mask {
                        let m: Vec<f32> = m.iter().map(|&b| f32::from(u8::from(b))).collect();
                        masks.push(small(&m, w, h).iter().map(|&v| v > 0.5).collect::<Vec<bool>>());
                        maps.push(small(&step.map.data, w, h));
                    } else {
                        masks.push(Vec::new());
                        maps.push(Vec::new());
                    }
                }
                let half = stream.len() / 2;
                let keep = |from: usize| {
                    let (m, k): (Vec<Vec<f32>>, Vec<Vec<bool>>) = maps[from..]
                        .iter()
                        .cloned()
                        .zip(masks[from..].iter().cloned())
                        .filter(|(m, _)| !m.is_empty())
                        .unzip();
                    slice(&scores[from..], &labels[from..], &preds[from..], &m, &k)
                };
                let r = StreamResult {
                    class: name.clone(),
                    run,
                    mode: label,
                    whole: keep(0),
                    second_half: keep(half),
                    references_end: s.bank.meta.references,
                    rows_end: kensa_learn::update::rows(&s.bank),
                    stats: s.learner.stats.clone(),
                    seconds: t0.elapsed().as_secs_f64(),
                };
                eprintln!(
                    "{name} run {run} {:<9} second half: image AUROC {} pixel AUROC {} accuracy {:.3} ({} refs, {:.0}s)",
                    r.mode,
                    fmt(r.second_half.image_auroc),
                    fmt(r.second_half.pixel_auroc),
                    r.second_half.verdict_accuracy,
                    r.references_end,
                    r.seconds
                );
                results.push(r);
            }
        }
    }
    print_stream_table(&results);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&serde_json::json!({ "stream": results }))?)
            .map_err(io_err("write", p))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(EvalOutcome {
        runs: results.len(),
        images: results.iter().map(|r| r.whole.frames).sum(),
        report: None,
        json: a.json.clone(),
    })
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3}"))
}

/// Mean over runs per class and mode, second half of the stream, then the mean over classes.
fn print_stream_table(results: &[StreamResult]) {
    let mut modes: Vec<&str> = Vec::new();
    let mut classes: Vec<&str> = Vec::new();
    for r in results {
        if !modes.contains(&r.mode.as_str()) {
            modes.push(&r.mode);
        }
        if !classes.contains(&r.class.as_str()) {
            classes.push(&r.class);
        }
    }
    let mean = |v: Vec<f64>| if v.is_empty() { None } else { Some(v.iter().sum::<f64>() / v.len() as f64) };
    println!("second half of the stream, mean over runs: image AUROC / pixel AUROC / verdict accuracy");
    print!("{:<20}", "class");
    for m in &modes {
        print!(" | {m:^23}");
    }
    println!();
    let mut per_mode: Vec<Vec<[Option<f64>; 3]>> = vec![Vec::new(); modes.len()];
    for c in &classes {
        print!("{c:<20}");
        for (mi, m) in modes.iter().enumerate() {
            let rs: Vec<&StreamResult> = results.iter().filter(|r| r.class == *c && r.mode == *m).collect();
            let v = [
                mean(rs.iter().filter_map(|r| r.second_half.image_auroc).collect()),
                mean(rs.iter().filter_map(|r| r.second_half.pixel_auroc).collect()),
                mean(rs.iter().map(|r| r.second_half.verdict_accuracy).collect()),
            ];
            print!(" | {} {} {}", fmt(v[0]), fmt(v[1]), fmt(v[2]));
            per_mode[mi].push(v);
        }
        println!();
    }
    print!("{:<20}", "mean");
    for v in &per_mode {
        let col = |i: usize| mean(v.iter().filter_map(|x| x[i]).collect());
        print!(" | {} {} {}", fmt(col(0)), fmt(col(1)), fmt(col(2)));
    }
    println!();
}
