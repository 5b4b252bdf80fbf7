//! `kensa replay`: still images scored in the order given as one camera's stream, with the
//! learning the daemon applies (`kensa_learn`): each frame is scored *before* any update it
//! causes, so what replay writes is what the line would have seen. Writes what `kensa score`
//! writes (`<stem>.json` with the same keys plus `bank_version`, `<stem>_map.npy`,
//! `summary.csv`) and, with `--save-bank`, the learned bank as a new version.

use crate::score::{engine_and_bank, expand, result_json, write_map};
use crate::{io_err, EvalError, Result};
use kensa_capture::images;
use kensa_learn::learner::{Guards, Learner};
use kensa_learn::{Label, LearnMode};
use kensa_model::bank::Bank;
use kensa_model::cli::ModelArgs;
use kensa_model::engine::Engine;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Clone, Debug)]
pub struct ReplayArgs {
    /// Bank made by `kensa enroll` (not changed; see --save-bank).
    #[arg(long)]
    pub bank: PathBuf,
    /// Output folder for <stem>.json, <stem>_map.npy and summary.csv.
    #[arg(long)]
    pub out: PathBuf,
    /// What the stream may teach the bank.
    #[arg(long, value_enum, default_value_t = LearnMode::Off)]
    pub learn: LearnMode,
    /// An operator's answers: lines `PATH normal|defect`. The operator answers only the frames
    /// Kensa flags as anomalous, as on the line.
    #[arg(long, value_name = "FILE")]
    pub operator: Option<PathBuf>,
    /// Write the bank as it stands after the stream here (as a new version beside it).
    #[arg(long, value_name = "FILE")]
    pub save_bank: Option<PathBuf>,
    /// Seconds between frames, for the spacing guard of `--learn auto`.
    #[arg(long, default_value_t = 60)]
    pub interval_s: u64,
    /// Images in stream order (folders are expanded in name order).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Reads an operator file: `PATH normal|defect` per line (`#` comments, blank lines).
pub fn read_operator(path: &Path) -> Result<HashMap<PathBuf, Label>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EvalError::Data { what: format!("cannot read operator file {}: {e}", path.display()) })?;
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: String| EvalError::Data { what: format!("{}:{}: {why}", path.display(), i + 1) };
        let (p, l) =
            line.rsplit_once(char::is_whitespace).ok_or_else(|| bad("expected `PATH normal|defect`".into()))?;
        let label: Label = l.parse().map_err(bad)?;
        out.insert(PathBuf::from(p.trim()), label);
    }
    Ok(out)
}

/// What a replay did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReplayOutcome {
    pub scored: usize,
    pub anomalous: usize,
    pub answered: usize,
    pub stats: kensa_learn::learner::Stats,
    pub first_version: String,
    pub last_version: String,
    pub references: usize,
}

/// One frame of a stream, scored, and what learning did after it.
pub struct Step {
    pub verdict: kensa_verdict::Verdict,
    pub map: kensa_core::AnomalyMap,
    /// The version that scored it.
    pub version: String,
}

/// A stream scorer: the bank, its learner, and the engine. `kensa replay` and `kensa eval
/// --stream` both drive it; the daemon drives the same [`Learner`].
pub struct Stream<'a> {
    pub engine: &'a Engine,
    pub bank: Bank,
    pub learner: Learner,
}

impl Stream<'_> {
    /// Scores `image` as frame `frame` at `tick`, then applies what learning does with it,
    /// with `operator`'s answer when the frame is flagged.
    pub fn step(
        &mut self,
        frame: &str,
        image: Arc<image::RgbImage>,
        tick: u64,
        operator: Option<Label>,
    ) -> Result<Step> {
        let version = self.bank.meta.version();
        let map = self
            .engine
            .score(&[(image.as_raw().as_slice(), image.width(), image.height())], &self.bank)?
            .pop()
            .ok_or_else(|| EvalError::Data { what: format!("{frame}: no map") })?;
        let (verdict, _) = kensa_verdict::judge(&map, &self.bank.meta.calibration);
        if let Some(b) =
            self.learner.scored(self.engine, &self.bank, frame, image, verdict.score, tick).map_err(learn_err)?
        {
            self.bank = b;
        }
        if let (true, Some(label)) = (verdict.anomalous, operator) {
            if let (_, Some(b)) = self.learner.answer(self.engine, &self.bank, frame, label).map_err(learn_err)? {
                self.bank = b;
            }
        }
        Ok(Step { verdict, map, version })
    }
}

pub(crate) fn learn_err(e: kensa_learn::LearnError) -> EvalError {
    match e {
        kensa_learn::LearnError::Model(m) => EvalError::Model(m),
        kensa_learn::LearnError::Torch(t) => EvalError::Model(kensa_model::ModelError::Torch(t)),
    }
}

/// `kensa replay`.
pub fn run(a: &ReplayArgs) -> Result<ReplayOutcome> {
    let (engine, bank) = engine_and_bank(&a.model, &a.bank)?;
    let operator = match &a.operator {
        Some(p) => read_operator(p)?,
        None => HashMap::new(),
    };
    let by_name: HashMap<std::ffi::OsString, Label> =
        operator.iter().filter_map(|(p, l)| Some((p.file_name()?.to_os_string(), *l))).collect();
    std::fs::create_dir_all(&a.out).map_err(io_err("create", &a.out))?;
    let files = expand(&a.images)?;
    let first_version = bank.meta.version();
    let mut stream = Stream { engine: &engine, bank, learner: Learner::new(a.learn, Guards::default()) };
    let csv_path = a.out.join("summary.csv");
    let mut csv = std::io::BufWriter::new(std::fs::File::create(&csv_path).map_err(io_err("write", &csv_path))?);
    writeln!(csv, "image,score,anomalous,confidence,bank_version,answer").map_err(io_err("write", &csv_path))?;
    let (mut scored, mut anomalous, mut answered) = (0, 0, 0);
    let mut seen = std::collections::HashSet::new();
    for (i, p) in files.iter().enumerate() {
        let img = match images::load_rgb(p) {
            Ok(img) => Arc::new(img),
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        let stem = p.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let stem = if seen.insert(stem.clone()) { stem } else { format!("{stem}_{i}") };
        seen.insert(stem.clone());
        let label = operator.get(p).or_else(|| p.file_name().and_then(|n| by_name.get(n))).copied();
        let step = stream.step(&stem, img, i as u64 * a.interval_s, label)?;
        let v = &step.verdict;
        let mut json = result_json(v);
        json["bank_version"] = serde_json::Value::String(step.version.clone());
        let jp = a.out.join(format!("{stem}.json"));
        std::fs::write(&jp, serde_json::to_string_pretty(&json)? + "\n").map_err(io_err("write", &jp))?;
        write_map(&a.out.join(format!("{stem}_map.npy")), &step.map)?;
        writeln!(csv, "{},{},{},{},{},{}", p.display(), v.score, v.anomalous, v.confidence, step.version, v.answer)
            .map_err(io_err("write", &csv_path))?;
        scored += 1;
        anomalous += usize::from(v.anomalous);
        answered += usize::from(v.anomalous && label.is_some());
    }
    csv.flush().map_err(io_err("write", &csv_path))?;
    if let Some(path) = &a.save_bank {
        // A new file starts from the bank replayed, so its versions reach back to it.
        if !path.exists() && stream.bank.meta.version() != first_version {
            std::fs::copy(&a.bank, path).map_err(io_err("write", path))?;
        }
        kensa_model::versions::commit(&stream.bank, path, kensa_model::versions::DEFAULT_KEEP)?;
    }
    let out = ReplayOutcome {
        scored,
        anomalous,
        answered,
        stats: stream.learner.stats.clone(),
        first_version,
        last_version: stream.bank.meta.version(),
        references: stream.bank.meta.references,
    };
    eprintln!("{}", serde_json::to_string(&out)?);
    Ok(out)
}
