//! `kensa score`: still images scored against a bank. Per image it writes `<stem>.json` (the
//! calibrated verdict: `score`, `anomalous`, `answer`, `locations`, `confidence`, and
//! `regions` with their cell, bounding box, area and peak, as anomalib's predictions carry
//! boxes), with `--maps full` or `--maps feature` `<stem>_map.npy` (the anomaly map, float32,
//! height × width, at the image's resolution or on the model's grid) and, with `--overlay`,
//! `<stem>_overlay.png` (image | heat overlay); per call, `summary.csv` (one row per image).
//! Images that cannot be read are reported and skipped; the outcome counts them (exit status 2).

use crate::{io_err, EvalError, Result};
use kensa_capture::images;
use kensa_model::bank::Bank;
use kensa_model::cli::ModelArgs;
use kensa_model::engine::Engine;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// A CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Which anomaly map `kensa score` writes per image (`--maps`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MapOutput {
    /// None: the verdict files only (a full-resolution float32 map is 4 bytes a pixel).
    #[default]
    None,
    /// On the model's grid (the bank's input size squared, e.g. 320 × 320: the image as the
    /// model saw it, squashed to a square), before it is resized to the image.
    Feature,
    /// At the image's own resolution, as the verdict's regions and boxes are measured.
    Full,
}

/// The options of `kensa score` (the binary uses them as the subcommand's arguments).
#[derive(clap::Args, Clone, Debug)]
pub struct ScoreArgs {
    /// Bank made by `kensa enroll`.
    #[arg(long)]
    pub bank: PathBuf,
    /// Output folder for <stem>.json, summary.csv and the maps asked for.
    #[arg(long)]
    pub out: PathBuf,
    /// Which anomaly map to write as <stem>_map.npy: none, feature (on the model's grid) or
    /// full (at the image's resolution).
    #[arg(long, value_enum, default_value_t = MapOutput::None)]
    pub maps: MapOutput,
    /// Images, or folders of images.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Images per model call. 1 is the fastest per image on a CPU (2-core EPYC, 320 px: 91, 84,
    /// 80, 71 img/s at 1, 2, 4, 8); raise it on a GPU.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Also write <stem>_overlay.png: the image beside the map as a heat overlay, with the
    /// outline of the regions above the calibrated level.
    #[arg(long)]
    pub overlay: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// What a scoring call did.
#[derive(Clone, Debug)]
pub struct ScoreOutcome {
    /// Images scored (their files written).
    pub scored: usize,
    /// Images that could not be read (each reported on stderr and skipped).
    pub failed: usize,
    /// Wall time of the scoring loop, in seconds.
    pub seconds: f64,
}

impl ScoreOutcome {
    /// The process exit status it stands for: 2 when some images could not be read, else 0
    /// (failures that stop the command are [`EvalError`]s, exit status 1).
    pub fn exit_code(&self) -> u8 {
        if self.failed > 0 {
            2
        } else {
            0
        }
    }
}

/// `kensa score`: scores every image of `a` (folders expanded, in name order) and writes its
/// files under `a.out`; prints a summary line on stderr.
pub fn run(a: &ScoreArgs) -> Result<ScoreOutcome> {
    let (engine, bank) = engine_and_bank(&a.model, &a.bank)?;
    std::fs::create_dir_all(&a.out).map_err(io_err("create", &a.out))?;
    let files = expand(&a.images)?;
    // Output names are <stem>; a stem seen twice in one call (same name in two folders) is
    // written as <parent>_<stem> instead of overwriting the first.
    let mut names = std::collections::HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for p in &files {
        let stem = p.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let name = if seen.insert(stem.clone()) {
            stem
        } else {
            let parent = p.parent().and_then(|d| d.file_name()).unwrap_or_default().to_string_lossy().into_owned();
            let alt = format!("{parent}_{stem}");
            eprintln!("warning: {} has the same name as an earlier image; writing it as {alt}.json", p.display());
            seen.insert(alt.clone());
            alt
        };
        names.insert(p.clone(), name);
    }
    let mut failed = 0usize;
    let t0 = Instant::now();
    let mut scored = 0usize;
    let bar = indicatif::ProgressBar::new(files.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("scoring {bar:30} {pos}/{len} images ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let csv_path = a.out.join("summary.csv");
    let mut csv = std::io::BufWriter::new(std::fs::File::create(&csv_path).map_err(io_err("write", &csv_path))?);
    writeln!(csv, "image,score,anomalous,confidence,regions,locations,answer").map_err(io_err("write", &csv_path))?;
    // Images are decoded on a second thread, one batch ahead of the model (bounded: two
    // batches in flight), so decoding overlaps scoring.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(PathBuf, Result<image::RgbImage, String>)>>(2);
    let chunks: Vec<Vec<PathBuf>> = files.chunks(a.batch.max(1)).map(<[PathBuf]>::to_vec).collect();
    let loader = std::thread::spawn(move || {
        for chunk in chunks {
            let loaded = chunk.into_iter().map(|p| {
                let img = images::load_rgb(&p).map_err(|e| e.to_string());
                (p, img)
            });
            if tx.send(loaded.collect()).is_err() {
                break;
            }
        }
    });
    for chunk in rx {
        let mut loaded = Vec::new();
        for (p, img) in chunk {
            match img {
                Ok(img) => loaded.push((p, img)),
                Err(e) => {
                    bar.suspend(|| eprintln!("error: {e}"));
                    failed += 1;
                    bar.inc(1);
                }
            }
        }
        if loaded.is_empty() {
            continue;
        }
        let views: Vec<(&[u8], u32, u32)> =
            loaded.iter().map(|(_, i)| (i.as_raw().as_slice(), i.width(), i.height())).collect();
        let scored_batch = engine.score_all(&views, &bank, None, a.maps == MapOutput::Feature)?;
        for ((p, img), kensa_model::engine::Scored { map, grid, .. }) in loaded.iter().zip(scored_batch) {
            let (v, _) = kensa_verdict::judge(&map, &bank.meta.calibration);
            let stem = &names[p];
            if a.overlay {
                let op = a.out.join(format!("{stem}_overlay.png"));
                let pic = crate::overlay::panel(img, None, &map, bank.meta.calibration.pixel_threshold);
                std::fs::write(&op, crate::overlay::png(&pic)).map_err(io_err("write", &op))?;
            }
            let json = result_json(&v);
            let locations: Vec<&str> = v.locations.iter().map(|c| c.name()).collect();
            writeln!(
                csv,
                "{},{},{},{},{},{},{}",
                csv_field(&p.display().to_string()),
                v.score,
                v.anomalous,
                v.confidence,
                v.regions.len(),
                csv_field(&locations.join("; ")),
                csv_field(&v.answer)
            )
            .map_err(io_err("write", &csv_path))?;
            let jp = a.out.join(format!("{stem}.json"));
            std::fs::write(&jp, serde_json::to_string_pretty(&json)? + "\n").map_err(io_err("write", &jp))?;
            let mp = a.out.join(format!("{stem}_map.npy"));
            match (a.maps, &grid) {
                (MapOutput::Full, _) => write_map(&mp, &map)?,
                (MapOutput::Feature, Some(g)) => write_map(&mp, g)?,
                _ => {}
            }
            scored += 1;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    csv.flush().map_err(io_err("write", &csv_path))?;
    loader.join().map_err(|_| EvalError::Loader)?;
    let dt = t0.elapsed().as_secs_f64();
    eprintln!(
        "scored {scored} image(s) in {dt:.2}s ({:.1} img/s) -> {}",
        scored as f64 / dt.max(1e-9),
        a.out.display()
    );
    if failed > 0 {
        eprintln!("{failed} image(s) could not be read");
    }
    Ok(ScoreOutcome { scored, failed, seconds: dt })
}

/// The `<stem>.json` of a scored image: the calibrated verdict with its regions.
pub(crate) fn result_json(v: &kensa_verdict::Verdict) -> serde_json::Value {
    serde_json::json!({
        "score": v.score,
        "anomalous": v.anomalous,
        "answer": v.answer,
        "locations": v.locations.iter().map(|c| c.name()).collect::<Vec<_>>(),
        "confidence": v.confidence,
        "regions": v.regions.iter().map(|r| serde_json::json!({
            "cell": r.cell.name(),
            "bbox": r.bbox,
            "area": r.area,
            "peak": r.peak,
        })).collect::<Vec<_>>(),
    })
}

/// `<stem>_map.npy`: the map, float32, height × width.
pub(crate) fn write_map(np: &std::path::Path, map: &kensa_core::AnomalyMap) -> Result<()> {
    let f = std::fs::File::create(np).map_err(io_err("write", np))?;
    kensa_core::npy::write_f32_2d(std::io::BufWriter::new(f), map.height as usize, map.width as usize, &map.data)
        .map_err(io_err("write", np))
}

/// The backbone `model` names and the bank at `path`, checked against it, in its precision;
/// the engine scores at the bank's own input size.
pub(crate) fn engine_and_bank(model: &ModelArgs, path: &std::path::Path) -> Result<(Engine, Bank)> {
    let backbone = model.backbone()?;
    let probe = Bank::load_unchecked(path, tch::Device::Cpu)?;
    let bank = Bank::load(path, &backbone.meta, probe.meta.input_size, backbone.device)?.cast(backbone.kind);
    drop(probe);
    Ok((Engine::new(backbone, bank.meta.input_size), bank))
}

/// Images and folders of images (expanded in name order), in the order given.
pub(crate) fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(images::list_images(p)?);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}
