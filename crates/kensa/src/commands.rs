//! The one-shot commands: enroll, score, synth, tail, check.

use anyhow::{bail, Context, Result};
use clap::Args;
use kensa_capture::images;
use kensa_core::config::KensaConfig;
use kensa_model::backbone::Backbone;
use kensa_model::bank::Bank;
use kensa_model::engine::Engine;
use kensa_model::enroll::{enroll as do_enroll, EnrollOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ModelArgs {
    /// TorchScript backbone (default: $KENSA_BACKBONE, else the one scripts/setup.sh exports).
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// libtorch threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// auto (the backbone file's dtype), fp32, fp16 or bf16.
    #[arg(long, default_value = "auto")]
    pub precision: String,
}

impl ModelArgs {
    pub fn backbone(&self) -> Result<Backbone> {
        if self.threads > 0 {
            tch::set_num_threads(self.threads as i32);
        }
        load_backbone(self.backbone.as_deref(), &self.device, &self.precision)
    }
}

/// The backbone as the commands and the daemon choose it: `path` (default: $KENSA_BACKBONE,
/// else the one scripts/setup.sh exports) on `device` in `precision`, with a warning when that
/// precision is emulated on this CPU.
pub fn load_backbone(path: Option<&Path>, device: &str, precision: &str) -> Result<Backbone> {
    let device = kensa_model::device_from_str(device)?;
    let path = path.map(Path::to_path_buf).unwrap_or_else(kensa_model::default_backbone_path);
    let backbone = Backbone::load(&path, device)?.with_precision(kensa_model::precision_kind(precision)?)?;
    if let Some(w) = backbone.precision_warning() {
        tracing::warn!("{w}");
    }
    Ok(backbone)
}

/// How a bank is built: recorded in it, and used by everything that scores against it.
#[derive(Args, Clone)]
pub struct RecipeArgs {
    /// Model input side in pixels (recorded in the bank; scoring uses the bank's own).
    #[arg(long, default_value_t = kensa_model::DEFAULT_INPUT_SIZE)]
    pub input_size: u32,
    /// Neighbourhood averaged into each patch feature, one odd size per backbone layer, comma
    /// separated (default: 1 for the finest layer, 3 for the others).
    #[arg(long, value_delimiter = ',')]
    pub aggregation: Option<Vec<u32>>,
    /// Transformed copies of each reference added to the bank: `none`, or a comma list of
    /// hflip, vflip, rot90, rot180, rot270, rotate:DEGREES, shift:FRACTION. Use `none` (or flips
    /// only) for parts whose orientation matters.
    #[arg(long, default_value = kensa_model::augment::DEFAULT)]
    pub augment: String,
    /// Keep this fraction of each reference's patches (greedy k-center coreset, 0 < f ≤ 1):
    /// smaller, faster banks for many references. 1 keeps all.
    #[arg(long, default_value_t = 1.0)]
    pub coreset: f64,
    /// Score only this region of each frame: X,Y,WIDTH,HEIGHT in frame pixels (clipped to the
    /// frame; the map is 0 outside). Recorded in the bank, applied to the references too.
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub crop: Option<Vec<u32>>,
    /// Score with the bank alone: no self-match (by default the coarser layer also lets a
    /// frame's own distant, well-explained patches vouch for its patches; README, "Evaluation").
    #[arg(long)]
    pub no_self_match: bool,
}

impl RecipeArgs {
    /// An engine that extracts features as this recipe says.
    pub fn engine(&self, backbone: Backbone) -> Result<Engine> {
        let engine = Engine::new(backbone, self.input_size).with_self_match(!self.no_self_match);
        Ok(match &self.aggregation {
            Some(a) => engine.with_aggregation(a.clone())?,
            None => engine,
        })
    }

    pub fn options(&self, product: &str, seed: u64) -> Result<EnrollOptions> {
        let augment = kensa_model::augment::parse_list(&self.augment).context("--augment")?;
        let crop = match self.crop.as_deref() {
            None => None,
            Some(&[x, y, w, h]) if w > 0 && h > 0 => Some([x, y, w, h]),
            Some(other) => bail!("--crop {other:?}: give X,Y,WIDTH,HEIGHT with a non-zero width and height"),
        };
        Ok(EnrollOptions { coreset: self.coreset, augment, crop, ..EnrollOptions::new(product, seed) })
    }
}

#[derive(Args)]
pub struct EnrollArgs {
    /// Product name recorded in the bank.
    #[arg(long)]
    product: String,
    /// Folder of normal reference images (every image in it is used, in name order).
    #[arg(long)]
    images: PathBuf,
    /// Bank file to write.
    #[arg(long)]
    out: PathBuf,
    /// Use only the first N images of the folder.
    #[arg(long)]
    shots: Option<usize>,
    /// Seed of the calibration's augmentations and synthetic defects.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    recipe: RecipeArgs,
    #[command(flatten)]
    model: ModelArgs,
}

pub fn enroll(a: EnrollArgs) -> Result<ExitCode> {
    let mut files = images::list_images(&a.images)?;
    if let Some(k) = a.shots {
        files.truncate(k);
    }
    if files.is_empty() {
        bail!("no images (png, jpg, bmp, tiff) in {}", a.images.display());
    }
    let refs: Vec<(String, image::RgbImage)> = files
        .iter()
        .map(|p| Ok((p.file_name().unwrap_or_default().to_string_lossy().into_owned(), images::load_rgb(p)?)))
        .collect::<Result<_>>()?;
    let engine = a.recipe.engine(a.model.backbone()?)?;
    let opts = a.recipe.options(&a.product, a.seed)?;
    let t0 = Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("calibrating {bar:30} {pos}/{len} samples ({elapsed})")
            .expect("valid template"),
    );
    let bank = do_enroll(&engine, &refs, &opts, |d, t| {
        bar.set_length(t as u64);
        bar.set_position(d as u64);
    })?;
    bar.finish_and_clear();
    bank.save(&a.out)?;
    let c = &bank.meta.calibration;
    eprintln!(
        "enrolled {} from {} reference(s) in {:.1}s -> {} (bank {}; {} patches; decision {:.4}, balanced accuracy {:.3} on {} pseudo-normal / {} pseudo-anomalous samples)",
        a.product,
        refs.len(),
        t0.elapsed().as_secs_f64(),
        a.out.display(),
        bank.meta.version(),
        bank.layers[0].size()[0],
        c.image_threshold,
        c.fit_balanced_accuracy,
        c.normal_count,
        c.anomaly_count
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ScoreArgs {
    /// Bank made by `kensa enroll`.
    #[arg(long)]
    bank: PathBuf,
    /// Output folder for <stem>.json and <stem>_map.npy.
    #[arg(long)]
    out: PathBuf,
    /// Images, or folders of images.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Images per model call. 1 is the fastest per image on a CPU (2-core EPYC, 320 px: 91, 84,
    /// 80, 71 img/s at 1, 2, 4, 8); raise it on a GPU.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Also write <stem>_overlay.png: the image beside the map as a heat overlay, with the
    /// outline of the regions above the calibrated level.
    #[arg(long)]
    overlay: bool,
    #[command(flatten)]
    model: ModelArgs,
}

pub fn score(a: ScoreArgs) -> Result<ExitCode> {
    let backbone = a.model.backbone()?;
    let probe = Bank::load_unchecked(&a.bank, tch::Device::Cpu)?;
    let bank = Bank::load(&a.bank, &backbone.meta, probe.meta.input_size, backbone.device)?.cast(backbone.kind);
    drop(probe);
    let engine = Engine::new(backbone, bank.meta.input_size);
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let mut files = Vec::new();
    for p in &a.images {
        if p.is_dir() {
            files.extend(images::list_images(p)?);
        } else {
            files.push(p.clone());
        }
    }
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
    // Images are decoded on a second thread, one batch ahead of the model (bounded: two
    // batches in flight), so decoding overlaps scoring.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(PathBuf, Result<image::RgbImage, String>)>>(2);
    let chunks: Vec<Vec<PathBuf>> = files.chunks(a.batch.max(1)).map(|c| c.to_vec()).collect();
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
                    eprintln!("error: {e}");
                    failed += 1;
                }
            }
        }
        if loaded.is_empty() {
            continue;
        }
        let views: Vec<(&[u8], u32, u32)> =
            loaded.iter().map(|(_, i)| (i.as_raw().as_slice(), i.width(), i.height())).collect();
        let maps = engine.score(&views, &bank)?;
        for ((p, img), map) in loaded.iter().zip(maps) {
            let (v, _) = kensa_verdict::judge(&map, &bank.meta.calibration);
            let stem = &names[p];
            if a.overlay {
                let op = a.out.join(format!("{stem}_overlay.png"));
                let pic = crate::overlay::panel(img, None, &map, bank.meta.calibration.pixel_threshold);
                std::fs::write(&op, crate::overlay::png(&pic)).with_context(|| format!("cannot write {}", op.display()))?;
            }
            let json = serde_json::json!({
                "score": v.score,
                "anomalous": v.anomalous,
                "answer": v.answer,
                "locations": v.locations.iter().map(|c| c.name()).collect::<Vec<_>>(),
                "confidence": v.confidence,
            });
            let jp = a.out.join(format!("{stem}.json"));
            std::fs::write(&jp, serde_json::to_string_pretty(&json)? + "\n")
                .with_context(|| format!("cannot write {}", jp.display()))?;
            let np = a.out.join(format!("{stem}_map.npy"));
            let f = std::fs::File::create(&np).with_context(|| format!("cannot write {}", np.display()))?;
            kensa_core::npy::write_f32_2d(std::io::BufWriter::new(f), map.height as usize, map.width as usize, &map.data)?;
            scored += 1;
        }
    }
    loader.join().map_err(|_| anyhow::anyhow!("the image loader thread panicked"))?;
    let dt = t0.elapsed().as_secs_f64();
    eprintln!(
        "scored {scored} image(s) in {dt:.2}s ({:.1} img/s) -> {}",
        scored as f64 / dt.max(1e-9),
        a.out.display()
    );
    if failed > 0 {
        eprintln!("{failed} image(s) could not be read");
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output folder (MVTec layout).
    #[arg(long)]
    out: PathBuf,
    /// Test images to write.
    #[arg(long, default_value_t = 20)]
    count: u64,
    /// Normal references to write to train/good.
    #[arg(long, default_value_t = 4)]
    train: u64,
    /// Fraction of test images with a defect.
    #[arg(long, default_value_t = 0.3)]
    defect_rate: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    size: u32,
}

pub fn synth(a: SynthArgs) -> Result<ExitCode> {
    if !(0.0..=1.0).contains(&a.defect_rate) {
        bail!("--defect-rate {} is outside 0..=1", a.defect_rate);
    }
    let line = kensa_synth::Line::new(a.seed, a.defect_rate, a.size, a.size);
    let defective = line.write_mvtec(&a.out, a.train, a.count)?;
    eprintln!(
        "wrote {} reference(s) and {} test image(s) ({defective} defective) to {}",
        a.train,
        a.count,
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct TailArgs {
    /// Bootstrap servers.
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    topic: String,
    /// Start from the oldest retained event instead of the newest.
    #[arg(long)]
    from_beginning: bool,
    /// Stop after this many events.
    #[arg(long)]
    max: Option<u64>,
    /// Stop after this many seconds without an event.
    #[arg(long)]
    idle_timeout_s: Option<u64>,
    /// Only events of this camera.
    #[arg(long)]
    camera: Option<String>,
    /// Only anomalous events.
    #[arg(long)]
    anomalous_only: bool,
    /// Write each event's mask to DIR/<camera>_<frame>.png.
    #[arg(long)]
    masks: Option<PathBuf>,
}

pub fn tail(a: TailArgs) -> Result<ExitCode> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .set("group.id", "kensa-tail")
        .set("enable.auto.commit", "false")
        .create()
        .context("cannot create Kafka consumer")?;
    let md = consumer
        .fetch_metadata(Some(&a.topic), Duration::from_secs(10))
        .with_context(|| format!("cannot reach Kafka at {} for topic {}", a.brokers, a.topic))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == a.topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if parts.is_empty() {
        bail!("topic {} has no partitions on {} (does it exist?)", a.topic, a.brokers);
    }
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition_offset(&a.topic, p, if a.from_beginning { Offset::Beginning } else { Offset::End })?;
    }
    consumer.assign(&tpl)?;
    if let Some(d) = &a.masks {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let mut n = 0u64;
    let mut last = Instant::now();
    loop {
        if a.max.is_some_and(|m| n >= m) {
            break;
        }
        if a.idle_timeout_s.is_some_and(|s| last.elapsed() > Duration::from_secs(s)) {
            break;
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else { continue };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                eprintln!("warning: {e}");
                continue;
            }
        };
        last = Instant::now();
        let Some(payload) = msg.payload() else { continue };
        let ev: kensa_publish::InspectionEvent = match kensa_publish::decode_event(payload) {
            Ok(ev) => ev,
            Err(e) => {
                eprintln!("warning: undecodable event at partition {} offset {}: {e}", msg.partition(), msg.offset());
                continue;
            }
        };
        if a.camera.as_ref().is_some_and(|c| *c != ev.camera_id) || (a.anomalous_only && !ev.anomalous) {
            continue;
        }
        if let Some(d) = &a.masks {
            let p = d.join(format!("{}_{}.png", ev.camera_id, ev.frame_seq));
            std::fs::write(&p, &ev.mask_png).with_context(|| format!("cannot write {}", p.display()))?;
        }
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{}", kensa_publish::event_to_json(&ev)).and_then(|_| out.flush()).is_err() {
                break; // the reader went away (e.g. `| head`)
            }
        }
        n += 1;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn check(config: &Path) -> Result<ExitCode> {
    let cfg = KensaConfig::load(config)?;
    let mut bad = 0;
    for cam in &cfg.cameras {
        match kensa_capture::check(cam) {
            Ok(()) => eprintln!("camera {}: pipeline ok: {}", cam.id, kensa_capture::describe(cam)),
            Err(e) => {
                bad += 1;
                eprintln!("error: {e}");
            }
        }
    }
    if bad > 0 {
        return Ok(ExitCode::from(2));
    }
    eprintln!("{}: ok ({} camera(s), {} product(s))", config.display(), cfg.cameras.len(), cfg.products.len());
    Ok(ExitCode::SUCCESS)
}
