//! The one-shot commands that are only wiring: enroll, synth, check, capture. (`score` and `eval` are
//! in kensa-eval, `tail` in kensa-publish, `train-judge` in kensa-lm.)

use anyhow::{bail, Result};
use clap::Args;
use kensa_capture::images;
use kensa_core::config::KensaConfig;
use kensa_model::cli::{ModelArgs, RecipeArgs};
use kensa_model::enroll::enroll as do_enroll;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

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
    /// Seed of the synthetic line (the same seed writes the same images).
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
pub struct CheckArgs {
    /// Config file (TOML).
    #[arg(long, value_name = "FILE", env = "KENSA_CONFIG", default_value = kensa_core::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Also open every camera for one frame and report its size and how long it took.
    #[arg(long)]
    probe: bool,
    /// With --probe: how long to wait for each camera's first frame.
    #[arg(long, default_value_t = 20)]
    probe_timeout_s: u64,
}

/// `kensa check`: exit 0 when valid, 2 when a camera's pipeline does not parse or (with
/// --probe) delivers no frame; products without a bank yet are reported, not errors.
pub fn check(a: &CheckArgs) -> Result<ExitCode> {
    let cfg = KensaConfig::load(&a.config)?;
    let mut bad = 0;
    for cam in &cfg.cameras {
        if let Err(e) = kensa_capture::check(cam) {
            bad += 1;
            eprintln!("error: {e}");
            continue;
        }
        eprintln!("camera {}: pipeline ok: {}", cam.id, kensa_capture::describe_redacted(cam));
        if a.probe {
            match kensa_capture::commission::probe(cam, Duration::from_secs(a.probe_timeout_s)) {
                Ok(p) => eprintln!(
                    "camera {}: delivers {}x{} RGB, first frame after {} ms; source caps: {}",
                    cam.id,
                    p.width,
                    p.height,
                    p.first_frame.as_millis(),
                    kensa_capture::source_caps(&cam.id).as_deref().unwrap_or("(not reported)")
                ),
                Err(e) => {
                    bad += 1;
                    eprintln!("error: {e}");
                }
            }
        }
    }
    for (product, bank) in cfg.waiting_for_bank() {
        let cams: Vec<&str> = cfg.cameras.iter().filter(|c| c.product == product).map(|c| c.id.as_str()).collect();
        eprintln!(
            "product {product}: waiting for bank {} (cameras {} run but are not scored until it exists: \
             `kensa capture`, then `kensa enroll`)",
            bank.display(),
            cams.join(", ")
        );
    }
    if bad > 0 {
        return Ok(ExitCode::from(2));
    }
    eprintln!("{}: ok ({} camera(s), {} product(s))", a.config.display(), cfg.cameras.len(), cfg.products.len());
    Ok(ExitCode::SUCCESS)
}

/// `kensa capture`: frames through the camera's own pipeline into a folder to enroll from.
pub fn capture(a: &kensa_capture::commission::CaptureArgs) -> Result<ExitCode> {
    let cfg = KensaConfig::load(&a.config)?;
    let Some(cam) = cfg.cameras.iter().find(|c| c.id == a.camera) else {
        let ids: Vec<&str> = cfg.cameras.iter().map(|c| c.id.as_str()).collect();
        bail!("no camera `{}` in {} (cameras: {})", a.camera, a.config.display(), ids.join(", "));
    };
    let bar = indicatif::ProgressBar::new(a.count as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("capturing {bar:30} {pos}/{len} frames ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let frames = kensa_capture::commission::grab(
        cam,
        a.count,
        Duration::from_millis(a.every_ms),
        Duration::from_secs(a.timeout_s),
        |n, _| bar.set_position(n as u64),
    )?;
    bar.finish_and_clear();
    let paths = kensa_capture::commission::save(&frames, &a.out)?;
    let (w, h) = frames.first().map_or((0, 0), |f| (f.width, f.height));
    eprintln!("saved {} frame(s) of {w}x{h} from camera {} to {}", paths.len(), cam.id, a.out.display());
    if let Some(p) = cfg.products.get(&cam.product) {
        eprintln!(
            "next: kensa enroll --product {} --images {} --out {}",
            cam.product,
            a.out.display(),
            p.bank.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `kensa bank`: a bank's kept versions.
#[derive(clap::Subcommand)]
pub enum BankCmd {
    /// List the kept versions of a bank, newest first (the current one marked).
    Log {
        /// The bank file.
        file: PathBuf,
        /// One JSON object per line instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Make a kept version current again (as a new version; the daemon reloads it).
    Rollback {
        /// The bank file.
        file: PathBuf,
        /// The version (or enough of its start to name one).
        #[arg(long)]
        to: String,
        /// Versions kept beside the bank.
        #[arg(long, default_value_t = kensa_model::versions::DEFAULT_KEEP)]
        keep: usize,
    },
}

pub fn bank(c: &BankCmd) -> Result<ExitCode> {
    match c {
        BankCmd::Log { file, json } => {
            for v in kensa_model::versions::log(file)? {
                if *json {
                    println!("{}", serde_json::to_string(&v)?);
                } else {
                    println!(
                        "{} {:<12} {:>4} refs ({} learned) {:>7} rows  threshold {:.4}  {}  parent {}",
                        if v.current { "*" } else { " " },
                        v.version,
                        v.references,
                        v.learned,
                        v.rows,
                        v.image_threshold,
                        v.change,
                        if v.parent.is_empty() { "-" } else { &v.parent }
                    );
                }
            }
        }
        BankCmd::Rollback { file, to, keep } => {
            let v = kensa_model::versions::rollback(file, to, *keep)?;
            eprintln!("{} is now version {v} (the contents of {to})", file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
