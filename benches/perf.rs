//! Performance benchmark: kernels, the Python baseline side by side, and the whole pipeline
//! (synthetic cameras → Kensa → tansu) for 1, 4 and 16 cameras. Prints tables; not part of the
//! test run:
//!
//!     scripts/bench.sh                               # everything (about 6 minutes on 2 cores)
//!     KENSA_PERF=kernels,baseline scripts/bench.sh   # some sections only
//!
//! Environment: KENSA_PERF (sections: kernels, baseline, pipeline, console: the operator
//! console's cost, off vs one viewer; learning: learn off vs auto at capacity;
//! KENSA_PERF_CONSOLE_CAMERAS, KENSA_PERF_ROUNDS), KENSA_PERF_DEVICE (cpu or
//! cuda; default cpu), KENSA_PERF_SECONDS (measuring window per pipeline phase, 20),
//! KENSA_PERF_CAMERAS (camera counts, "1,4,16"), KENSA_PERF_MODEL_THREADS (model.threads, 0),
//! KENSA_PERF_MODERATE_BATCH (batch.max_size of the moderate and triggered phases; 0, the
//! daemon's default),
//! KENSA_BACKBONE (the backbone file: export one with `--dtype fp16` for a GPU run),
//! KENSA_BACKBONE_BF16 (adds a bf16 row to the baseline table when the file exists).
//! Images: ../shared/data/mvtec-bottle when present, synthetic discs otherwise.

use kensa_core::config::{FullPolicy, LearnMode, SourceConfig};
use kensa_model::backbone::{images_to_batch, Backbone};
use kensa_model::bank::Bank;
use kensa_model::engine::{to_map, Engine};
use kensa_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// Model input side of the kernel benchmarks: the enrollment default, as `kensa enroll` builds
/// the banks the other sections use.
const S: i64 = kensa_model::DEFAULT_INPUT_SIZE as i64;

type Img = (Vec<u8>, u32, u32);

fn env_str(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Seconds per call of `f`: 5 warm-up calls (the TorchScript executor specialises on the first
/// ones), then at least `min_iters` calls and 1.5 s.
fn time_it(min_iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..5 {
        f();
    }
    let t0 = Instant::now();
    let mut n = 0;
    while n < min_iters || t0.elapsed() < Duration::from_millis(1500) {
        f();
        n += 1;
    }
    t0.elapsed().as_secs_f64() / n as f64
}

fn load_rgb(p: &Path) -> Img {
    let i = image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8();
    let (w, h) = i.dimensions();
    (i.into_raw(), w, h)
}

fn list_pngs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "png")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The image set: (class root, reference images, test images with labels).
struct Data {
    root: PathBuf,
    train: Vec<PathBuf>,
    test: Vec<(PathBuf, bool)>,
    _tmp: Option<TempDir>,
}

fn data() -> Data {
    let (root, tmp) = match shared().map(|s| s.join("data/mvtec-bottle")).filter(|p| p.is_dir()) {
        Some(p) => (p, None),
        None => {
            eprintln!("perf: ../shared is absent; using synthetic discs (kensa synth)");
            let t = TempDir::new("perf-data");
            let out = t.path().join("disc");
            synth(&out, &["--count", "60", "--train", "16", "--seed", "5"]);
            (out, Some(t))
        }
    };
    let train = list_pngs(&root.join("train/good"));
    let mut test = Vec::new();
    let mut kinds: Vec<PathBuf> = std::fs::read_dir(root.join("test")).unwrap().flatten().map(|e| e.path()).collect();
    kinds.sort();
    for k in kinds {
        let good = k.file_name().is_some_and(|n| n == "good");
        test.extend(list_pngs(&k).into_iter().map(|p| (p, !good)));
    }
    Data { root, train, test, _tmp: tmp }
}

fn flatten(f: &Tensor) -> Tensor {
    let c = f.size()[1];
    f.permute([0, 2, 3, 1]).reshape([-1, c])
}

fn kernels(d: &Data, device: Device, bank1: &Path) {
    let bb_path = PathBuf::from(env_str("KENSA_BACKBONE", ""));
    let backbone = Backbone::load(&bb_path, device).expect("backbone");
    println!(
        "\n== kernels: {} ({} threads, device {device:?}), input {S} px, images from {}",
        backbone.meta.name,
        tch::get_num_threads(),
        d.root.display()
    );
    let engine = Engine::new(backbone, S as u32);
    let imgs: Vec<Img> = d.test.iter().take(16).map(|(p, _)| load_rgb(p)).collect();
    let views = |b: usize| -> Vec<(&[u8], u32, u32)> {
        (0..b).map(|i| &imgs[i % imgs.len()]).map(|(v, w, h)| (v.as_slice(), *w, *h)).collect()
    };
    let (w0, h0) = (imgs[0].1, imgs[0].2);
    println!("frames: {w0}x{h0} RGB, resized to {S}x{S}");

    // Bank layers from R references (flips of the train images when there are fewer than R).
    let refs: Vec<Img> = d.train.iter().map(|p| load_rgb(p)).collect();
    let bank_of = |r: usize| -> Vec<Tensor> {
        let feats: Vec<Vec<Tensor>> = (0..r)
            .map(|i| {
                let (v, w, h) = &refs[i % refs.len()];
                let x = images_to_batch(&[(v.as_slice(), *w, *h)], S, device);
                let x = match (i / refs.len()) % 4 {
                    0 => x,
                    1 => x.flip([3]),
                    2 => x.flip([2]),
                    _ => x.flip([2, 3]),
                };
                engine.backbone.patch_features(&x, &engine.aggregation).unwrap().iter().map(flatten).collect()
            })
            .collect();
        (0..feats[0].len()).map(|l| Tensor::cat(&feats.iter().map(|f| &f[l]).collect::<Vec<_>>(), 0)).collect()
    };
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let batches = [1usize, 2, 4, 8, 16];

    println!("\n-- preprocessing + backbone forward alone (ms per image; img/s)");
    println!("{:>6} {:>12} {:>12} {:>9}", "batch", "prep_ms/img", "fwd_ms/img", "fwd_img/s");
    for &b in &batches {
        let v = views(b);
        let prep = time_it(5, || {
            let _ = images_to_batch(&v, S, device);
            sync();
        });
        let x = images_to_batch(&v, S, device);
        let fwd = time_it(5, || {
            let _ = engine.backbone.forward(&x).unwrap();
            sync();
        });
        println!("{b:>6} {:>12.2} {:>12.2} {:>9.1}", prep * 1e3 / b as f64, fwd * 1e3 / b as f64, b as f64 / fwd);
    }

    println!("\n-- nearest-neighbour scoring, features → per-layer distances (ms per image)");
    print!("{:>10}", "bank_refs");
    for b in &batches {
        print!(" {:>9}", format!("batch{b}"));
    }
    println!(" {:>12}", "bank_MiB");
    for r in [1usize, 4, 16, 64] {
        let bank = bank_of(r);
        let mib: f64 = bank.iter().map(|t| (t.numel() * 4) as f64).sum::<f64>() / (1024.0 * 1024.0);
        print!("{r:>10}");
        for &b in &batches {
            let x = images_to_batch(&views(b), S, device);
            let feats = engine.backbone.patch_features(&x, &engine.aggregation).unwrap();
            let t = time_it(3, || {
                let _ = engine.nearest(&feats, &bank);
                sync();
            });
            print!(" {:>9.2}", t * 1e3 / b as f64);
        }
        println!(" {mib:>12.1}");
    }

    // The enrolled 1-reference bank, with its calibration, for the verdict step.
    let bank1 = Bank::load(bank1, &engine.backbone.meta, 0, device).expect("bank");
    println!("\n-- post-processing (ms per image): fuse+blur | to frame size + judge + mask PNG");
    println!("{:>6} {:>10} {:>14}", "batch", "fuse_ms", "verdict_ms");
    for &b in &[1usize, 8] {
        let x = images_to_batch(&views(b), S, device);
        let feats = engine.backbone.patch_features(&x, &engine.aggregation).unwrap();
        let layers = engine.nearest(&feats, &bank1.layers);
        let fuse = time_it(5, || {
            let _ = engine.fuse(&layers, S);
            sync();
        });
        let maps = engine.fuse(&layers, S);
        let verdict = time_it(5, || {
            for i in 0..b {
                let m = to_map(&maps.get(i as i64), w0, h0);
                let (v, mask) = kensa_verdict::judge(&m, &bank1.meta.calibration);
                let _ = kensa_verdict::mask_png(&mask, m.width, m.height);
                std::hint::black_box(v);
            }
        });
        println!("{b:>6} {:>10.2} {:>14.2}", fuse * 1e3 / b as f64, verdict * 1e3 / b as f64);
    }

    println!("\n-- model step as the daemon runs it (1-reference bank): prep+backbone+scoring | +post-processing");
    println!("{:>6} {:>14} {:>9} {:>16} {:>9}", "batch", "model_ms/img", "img/s", "full_ms/img", "img/s");
    for &b in &batches {
        let v = views(b);
        let model = time_it(3, || {
            let f = engine.features(&v).unwrap();
            let _ = engine.nearest(&f, &bank1.layers);
            sync();
        });
        let full = time_it(3, || {
            for m in engine.score(&v, &bank1).unwrap() {
                let (v, mask) = kensa_verdict::judge(&m, &bank1.meta.calibration);
                let _ = kensa_verdict::mask_png(&mask, m.width, m.height);
                std::hint::black_box(v);
            }
        });
        println!(
            "{b:>6} {:>14.2} {:>9.1} {:>16.2} {:>9.1}",
            model * 1e3 / b as f64,
            b as f64 / model,
            full * 1e3 / b as f64,
            b as f64 / full
        );
    }
}

/// A 1-shot bank enrolled by `kensa enroll` from the first reference image.
fn enroll_one(d: &Data, dir: &Path) -> PathBuf {
    let refs = dir.join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::os::unix::fs::symlink(&d.train[0], refs.join(d.train[0].file_name().unwrap())).unwrap();
    let bank = dir.join("bank.kbank");
    enroll("bench", &refs, &bank, &[]);
    bank
}

fn baseline(d: &Data, bank: &Path) {
    println!(
        "\n== Kensa vs the Python baseline (tools/baseline/patchcore_loop.py), same backbone file, bank and images"
    );
    let tmp = TempDir::new("perf-baseline");
    // 162 images, cycling the test set (the size of the baseline run quoted in the team's notes).
    let imgs = tmp.path().join("images");
    std::fs::create_dir_all(&imgs).unwrap();
    let mut labels = std::collections::HashMap::new();
    for i in 0..162 {
        let (p, bad) = &d.test[i % d.test.len()];
        let name = format!("{i:03}.png");
        std::os::unix::fs::symlink(p, imgs.join(&name)).unwrap();
        labels.insert(format!("{i:03}"), *bad);
    }
    let auroc = |scores: &std::collections::HashMap<String, f32>| {
        let keys: Vec<&String> = scores.keys().collect();
        let s: Vec<f32> = keys.iter().map(|k| scores[*k]).collect();
        let l: Vec<bool> = keys.iter().map(|k| labels[*k]).collect();
        kensa_eval::metrics::auroc(&s, &l).unwrap_or(f64::NAN)
    };

    let python = std::env::var("KENSA_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = tmp.path().join("py.json");
    let t0 = Instant::now();
    let o = Command::new(&python)
        .args(["tools/baseline/patchcore_loop.py", "--backbone", &env_str("KENSA_BACKBONE", ""), "--bank"])
        .arg(bank)
        .arg("--out")
        .arg(&out)
        .arg(&imgs)
        .output()
        .expect("python");
    let py_wall = t0.elapsed().as_secs_f64();
    assert!(o.status.success(), "baseline failed: {}", String::from_utf8_lossy(&o.stderr));
    let info: serde_json::Value =
        serde_json::from_slice(o.stdout.rsplit(|&c| c == b'\n').find(|l| !l.is_empty()).unwrap()).unwrap();
    let py_scores: std::collections::HashMap<String, f32> =
        serde_json::from_str::<std::collections::HashMap<String, f64>>(&std::fs::read_to_string(&out).unwrap())
            .unwrap()
            .into_iter()
            .map(|(k, v)| (Path::new(&k).file_stem().unwrap().to_string_lossy().into_owned(), v as f32))
            .collect();

    let mut rows = vec![(
        "python loop (batch 1)".to_string(),
        py_wall,
        info["steady_img_s"].as_f64().unwrap_or(f64::NAN),
        auroc(&py_scores),
        0.0,
    )];
    let bf16 = env_str("KENSA_BACKBONE_BF16", "");
    let mut variants = vec![("(default batch 1)", vec![]), ("--batch 4", vec!["--batch", "4"])];
    if Path::new(&bf16).is_file() {
        variants.push(("bf16 export", vec!["--backbone", bf16.as_str()]));
    }
    for (label, extra) in variants {
        let kout = tmp.path().join(format!("kensa-{}", label.replace([' ', '(', ')'], "_")));
        let t0 = Instant::now();
        let mut args = vec!["score", "--bank", bank.to_str().unwrap(), "--out", kout.to_str().unwrap()];
        args.extend(extra.iter().copied());
        args.push(imgs.to_str().unwrap());
        let o = kensa(&args);
        let wall = t0.elapsed().as_secs_f64();
        assert!(o.status.success(), "kensa score: {}", String::from_utf8_lossy(&o.stderr));
        let steady = score_rate(&o);
        let scores: std::collections::HashMap<String, f32> = labels
            .keys()
            .map(|k| {
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(kout.join(format!("{k}.json"))).unwrap()).unwrap();
                (k.clone(), v["score"].as_f64().unwrap() as f32)
            })
            .collect();
        let maxdiff = scores.iter().map(|(k, v)| (v - py_scores[k]).abs()).fold(0.0f32, f32::max);
        rows.push((format!("kensa score {label}"), wall, steady, auroc(&scores), maxdiff as f64));
    }
    println!(
        "{:<32} {:>7} {:>10} {:>11} {:>12} {:>8} {:>15}",
        "", "images", "wall_s", "wall_img/s", "steady_img/s", "AUROC", "max|Δscore|"
    );
    for (name, wall, steady, a, diff) in &rows {
        println!("{name:<32} {:>7} {wall:>10.2} {:>11.1} {steady:>12.1} {a:>8.3} {diff:>15.5}", 162, 162.0 / wall);
    }
    let fp32 = 162.0 / rows[1].1;
    println!(
        "speed-up over the Python loop, fp32, default batch: {:.2}x wall (start-up included), {:.2}x steady",
        fp32 / (162.0 / py_wall),
        rows[1].2 / rows[0].2
    );
}

struct Phase {
    fps: f64,
    dropped: f64,
    p50_ms: f64,
    p99_ms: f64,
    model_p99_ms: f64,
    batch_mean: f64,
    model_busy: f64,
    rss_peak_mib: f64,
    kensa_cpu_ms: f64,
    broker_cpu_ms: f64,
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_s(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = rest.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + rest.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Quantile from Prometheus histogram bucket deltas, linear within a bucket (as histogram_quantile).
fn quantile(before: &str, after: &str, name: &str, q: f64) -> f64 {
    let b = buckets(before, name);
    let a = buckets(after, name);
    let d: Vec<(f64, f64)> =
        a.iter().map(|(le, c)| (*le, c - b.iter().find(|(x, _)| x == le).map(|x| x.1).unwrap_or(0.0))).collect();
    let Some(total) = d.last().map(|x| x.1).filter(|t| *t > 0.0) else { return f64::NAN };
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in &d {
        if c >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            return prev.0 + (le - prev.0) * (rank - prev.1) / (c - prev.1).max(1e-9);
        }
        prev = (le, c);
    }
    f64::NAN
}

fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One viewer of `/console/live` until `stop`, as a browser is one: it follows the live
/// stream and fetches each tile's new picture. Returns (updates, pictures fetched). It runs at
/// the idle scheduling class, so that what is measured is the daemon's cost, not this
/// client's (a browser runs on the operator's machine, not on the inspection host).
fn view_console(addr: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> (u64, u64) {
    use std::io::{BufRead, Write};
    use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    let _ =
        thread_priority::set_thread_priority_and_policy(thread_priority::thread_native_id(), ThreadPriority::Min, idle);
    let mut s = std::net::TcpStream::connect(&addr).expect("console");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /console/live HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let mut lines = std::io::BufReader::new(s).lines();
    let (mut updates, mut fetched) = (0, 0);
    let mut shown: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Some(Ok(line)) = lines.next() else { break };
        let Some(data) = line.strip_prefix("data: ") else { continue };
        updates += 1;
        let tiles: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
        for t in tiles.as_array().into_iter().flatten() {
            let (cam, id) =
                (t["camera"].as_str().unwrap_or_default(), t["latest"]["event_id"].as_str().unwrap_or_default());
            if !id.is_empty() && shown.get(cam).map(String::as_str) != Some(id) {
                shown.insert(cam.to_string(), id.to_string());
                let path = format!("/console/picture?kind=tile&id={}", id.replace('/', "%2F"));
                if matches!(http_get(&addr, &path), Ok((200, _))) {
                    fetched += 1;
                }
            }
        }
    }
    (updates, fetched)
}

/// One daemon run. `spread`: cameras free-running, first frames spread evenly over a period;
/// otherwise all in step (a common hardware trigger).
fn run_phase(cams: usize, fps: f64, policy: FullPolicy, batch: usize, spread: bool, bank: &Path, secs: f64) -> Phase {
    run_phase_with(cams, (fps, policy, batch, spread), bank, secs, LearnMode::Off)
}

/// [`run_phase`] with the product's learning mode.
fn run_phase_with(
    cams: usize,
    (fps, policy, batch, spread): (f64, FullPolicy, usize, bool),
    bank: &Path,
    secs: f64,
    learn: LearnMode,
) -> Phase {
    let (broker, dir, _, topic, metrics_addr) = own_broker_rig("perf");
    let mut c = base_config(bank, &topic, &broker.addr(), &metrics_addr);
    c.products.get_mut("disc").expect("product disc").learn = learn;
    c.model.device = env_str("KENSA_PERF_DEVICE", "cpu").parse().unwrap_or_else(|e| panic!("KENSA_PERF_DEVICE: {e}"));
    c.model.threads =
        env_str("KENSA_PERF_MODEL_THREADS", "0").parse().unwrap_or_else(|e| panic!("KENSA_PERF_MODEL_THREADS: {e}"));
    c.batch.max_size = batch;
    for i in 0..cams {
        let phase = if spread { i as f64 / cams as f64 } else { 0.0 };
        let mut cam = camera(
            &format!("cam{i}"),
            SourceConfig::Synthetic { seed: i as u64, count: 0, fps, defect_rate: 0.1, phase },
        );
        cam.policy = Some(policy);
        c.cameras.push(cam);
    }
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics_addr);
    // Warm up: wait for frames to flow, then 3 s more.
    wait_for(Duration::from_secs(60), || metric(&d.scrape(), "kensa_events_published_total", &[]).unwrap_or(0.0) > 0.0);
    std::thread::sleep(Duration::from_secs(3));
    let broker_pid = broker.pid();
    let before = d.scrape();
    let (k0, b0) = (cpu_s(d.child.id()), cpu_s(broker_pid));
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let after = d.scrape();
    let (k1, b1) = (cpu_s(d.child.id()), cpu_s(broker_pid));
    let dt = t0.elapsed().as_secs_f64();
    let delta = |n: &str| sum_metric(&after, n) - sum_metric(&before, n);
    let batches = delta("kensa_batch_size_count");
    let p = Phase {
        fps: delta("kensa_events_published_total") / dt,
        dropped: delta("kensa_frames_dropped_total"),
        p50_ms: 1e3 * quantile(&before, &after, "kensa_end_to_end_latency_seconds", 0.5),
        p99_ms: 1e3 * quantile(&before, &after, "kensa_end_to_end_latency_seconds", 0.99),
        model_p99_ms: 1e3 * quantile(&before, &after, "kensa_score_batch_seconds", 0.99),
        batch_mean: delta("kensa_batch_size_sum") / batches.max(1.0),
        model_busy: delta("kensa_score_batch_seconds_sum") / dt,
        rss_peak_mib: proc_status_kib(d.child.id(), "VmHWM") / 1024.0,
        kensa_cpu_ms: 0.0,
        broker_cpu_ms: 0.0,
    };
    let frames = (p.fps * dt).max(1.0);
    let p = Phase { kensa_cpu_ms: 1e3 * (k1 - k0) / frames, broker_cpu_ms: 1e3 * (b1 - b0) / frames, ..p };
    d.terminate(Duration::from_secs(30));
    drop(broker);
    p
}

/// The model step alone (what `kensa_score_batch_seconds` times in the daemon: preprocessing,
/// backbone, nearest-neighbour search, map post-processing) at batch 8, on the synthetic frames
/// and bank the pipeline uses.
fn model_step(frames: &Path, bank: &Path, device: Device) -> (f64, f64) {
    let backbone = Backbone::load(Path::new(&env_str("KENSA_BACKBONE", "")), device).expect("backbone");
    let bank = Bank::load(bank, &backbone.meta, 0, device).expect("bank");
    let engine = Engine::new(backbone, bank.meta.input_size);
    let imgs: Vec<Img> = list_pngs(frames).iter().take(8).map(|p| load_rgb(p)).collect();
    let v: Vec<(&[u8], u32, u32)> =
        (0..8).map(|i| &imgs[i % imgs.len()]).map(|(x, w, h)| (x.as_slice(), *w, *h)).collect();
    let t8 = time_it(5, || {
        let _ = engine.score(&v, &bank).unwrap();
    });
    let t1 = time_it(20, || {
        let _ = engine.score(&v[..1], &bank).unwrap();
    });
    (t1 * 1e3, 8.0 / t8)
}

/// `kensa score` (default batch) on 200 synthetic frames with the pipeline's bank: img/s.
fn score_fps(bank: &Path) -> f64 {
    let tmp = TempDir::new("perf-score");
    let data = tmp.path().join("line");
    synth(&data, &["--count", "200", "--train", "0", "--seed", "3"]);
    let o = kensa(&[
        "score",
        "--bank",
        bank.to_str().unwrap(),
        "--out",
        tmp.path().join("out").to_str().unwrap(),
        data.join("test/good").to_str().unwrap(),
        "--batch",
        "8",
    ]);
    score_rate(&o)
}

/// The rate `kensa score` reports: "scored N image(s) in T s (R img/s) -> DIR".
fn score_rate(o: &std::process::Output) -> f64 {
    let err = String::from_utf8_lossy(&o.stderr);
    err.split(" img/s)")
        .next()
        .and_then(|r| r.rsplit('(').next())
        .and_then(|x| x.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn pipeline(model_b1_ms: f64, model_b8: f64, bank: &Path) {
    let secs: f64 = env_str("KENSA_PERF_SECONDS", "20").parse().unwrap_or(20.0);
    let counts: Vec<usize> =
        env_str("KENSA_PERF_CAMERAS", "1,4,16").split(',').filter_map(|s| s.trim().parse().ok()).collect();
    println!("\n== pipeline: synthetic cameras (256x256) → Kensa → tansu (own broker on this machine), 16-reference bank, {secs} s per phase");
    println!("capacity: block policy, cameras as fast as Kensa takes them (batch.max_size 8)");
    let moderate_batch: usize = env_str("KENSA_PERF_MODERATE_BATCH", "0").parse().unwrap_or(0);
    println!(
        "moderate: drop policy at half that rate (max_size {}), free-running cameras; triggered: the same, all cameras in step",
        if moderate_batch == 0 { "0 = the default: 1 on a CPU".to_string() } else { moderate_batch.to_string() }
    );
    println!(
        "{:>5} {:<9} {:>7} {:>7} {:>7} {:>7} {:>12} {:>6} {:>10} {:>8} {:>13} {:>14}",
        "cams",
        "phase",
        "fps",
        "dropped",
        "p50_ms",
        "p99_ms",
        "model_p99_ms",
        "batch",
        "model_busy",
        "rss_MiB",
        "kensa_cpu_ms",
        "broker_cpu_ms"
    );
    let mut cap16 = 0.0;
    let mut busy16 = 0.0;
    for &n in &counts {
        let cap = run_phase(n, 0.0, FullPolicy::Block, 8, false, bank, secs);
        let row = |name: &str, p: &Phase| {
            println!(
                "{n:>5} {name:<9} {:>7.1} {:>7} {:>7.1} {:>7.1} {:>12.1} {:>6.2} {:>9.0}% {:>8.0} {:>13.2} {:>14.2}",
                p.fps,
                p.dropped,
                p.p50_ms,
                p.p99_ms,
                p.model_p99_ms,
                p.batch_mean,
                p.model_busy * 100.0,
                p.rss_peak_mib,
                p.kensa_cpu_ms,
                p.broker_cpu_ms
            )
        };
        row("capacity", &cap);
        if n == *counts.iter().max().unwrap() {
            cap16 = cap.fps;
            busy16 = cap.model_busy;
        }
        let per_cam = (cap.fps * 0.5 / n as f64 * 10.0).round() / 10.0;
        let moderate = run_phase(n, per_cam.max(0.1), FullPolicy::Drop, moderate_batch, true, bank, secs);
        row("moderate", &moderate);
        println!(
            "{:>15} p99 / batch-1 model step ({model_b1_ms:.1} ms, alone) = {:.2}",
            "",
            moderate.p99_ms / model_b1_ms
        );
        if n > 1 {
            let triggered = run_phase(n, per_cam.max(0.1), FullPolicy::Drop, moderate_batch, false, bank, secs);
            row("triggered", &triggered);
        }
    }
    println!("kensa score --batch 8 on 200 synthetic frames with the same bank: {:.1} img/s (daemon capacity above, also at batch 8)", score_fps(bank));
    if model_b8 > 0.0 {
        println!(
            "pipeline overhead at batch 8 ({} cameras): 1 - {cap16:.1} fps / {model_b8:.1} fps (model step alone, same bank and frames) = {:.1} %; model thread outside the model step: {:.1} %",
            counts.iter().max().unwrap(),
            100.0 * (1.0 - cap16 / model_b8),
            100.0 * (1.0 - busy16.min(1.0))
        );
    }
}

/// The console's cost: one daemon at capacity (block policy, batch 8), its throughput in
/// alternating windows without and with one viewer, so drift hits both alike.
fn console_cost(bank: &Path) {
    let secs: f64 = env_str("KENSA_PERF_SECONDS", "20").parse().unwrap_or(20.0);
    let cams: usize = env_str("KENSA_PERF_CONSOLE_CAMERAS", "4").parse().unwrap_or(4);
    let rounds: usize = env_str("KENSA_PERF_ROUNDS", "4").parse().unwrap_or(4);
    println!("\n== console: one daemon at the capacity of {cams} synthetic cameras (block policy, batch 8); {rounds} rounds of a {secs} s window without, then with, one viewer");
    let (broker, dir, _, topic, metrics_addr) = own_broker_rig("perf-console");
    let mut c = base_config(bank, &topic, &broker.addr(), &metrics_addr);
    c.batch.max_size = 8;
    for i in 0..cams {
        let mut cam = camera(
            &format!("cam{i}"),
            SourceConfig::Synthetic { seed: i as u64, count: 0, fps: 0.0, defect_rate: 0.1, phase: 0.0 },
        );
        cam.policy = Some(FullPolicy::Block);
        c.cameras.push(cam);
    }
    let mut d = Daemon::start(&write_config(dir.path(), &c), &[], &metrics_addr);
    wait_for(Duration::from_secs(60), || metric(&d.scrape(), "kensa_events_published_total", &[]).unwrap_or(0.0) > 0.0);
    std::thread::sleep(Duration::from_secs(3));
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for w in 0..2 * rounds {
        let viewed = w % 2 == 1;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let viewer = viewed.then(|| {
            let (addr, stop) = (metrics_addr.clone(), stop.clone());
            std::thread::spawn(move || view_console(addr, stop))
        });
        std::thread::sleep(Duration::from_secs(1));
        let (p0, k0, t0) =
            (sum_metric(&d.scrape(), "kensa_events_published_total"), cpu_s(d.child.id()), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(secs));
        let (p1, k1, dt) =
            (sum_metric(&d.scrape(), "kensa_events_published_total"), cpu_s(d.child.id()), t0.elapsed().as_secs_f64());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = viewer.map(|v| v.join().unwrap_or_default());
        let fps = (p1 - p0) / dt;
        let cpu_ms = 1e3 * (k1 - k0) / (p1 - p0).max(1.0);
        let viewer = seen.map(|(u, f)| format!("  viewer: {u} live updates, {f} tile pictures")).unwrap_or_default();
        println!(
            "window {w} {:<10} {fps:>7.2} fps  kensa_cpu_ms/frame {cpu_ms:>6.2}{viewer}",
            if viewed { "viewed" } else { "no viewer" }
        );
        if viewed {
            on.push(fps)
        } else {
            off.push(fps)
        }
    }
    println!("rss peak {:.0} MiB", proc_status_kib(d.child.id(), "VmHWM") / 1024.0);
    d.terminate(Duration::from_secs(30));
    drop(broker);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (a, b) = (mean(&off), mean(&on));
    println!("console cost at one viewer: 1 - {b:.2} / {a:.2} fps = {:.1} % (target < 2 %)", 100.0 * (1.0 - b / a));
}

/// Learning's cost: capacity (block policy, batch 8) with `learn = "off"` and `"auto"` (every
/// frame held, confident normals joining the bank within `[learn]`'s bounds), alternated.
fn learning_cost(bank: &Path) {
    let secs: f64 = env_str("KENSA_PERF_SECONDS", "20").parse().unwrap_or(20.0);
    let cams: usize = env_str("KENSA_PERF_CONSOLE_CAMERAS", "4").parse().unwrap_or(4);
    let rounds: usize = env_str("KENSA_PERF_ROUNDS", "2").parse().unwrap_or(2);
    println!("\n== learning: capacity of {cams} synthetic cameras (block policy, batch 8, {secs} s per run), learn off vs auto, {rounds} rounds");
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        for (learn, out) in [(LearnMode::Off, &mut off), (LearnMode::Auto, &mut on)] {
            let p = run_phase_with(cams, (0.0, FullPolicy::Block, 8, false), bank, secs, learn);
            println!(
                "round {r} {learn:<5?} {:>7.2} fps  kensa_cpu_ms/frame {:>6.2}  rss {:>5.0} MiB",
                p.fps, p.kensa_cpu_ms, p.rss_peak_mib
            );
            out.push(p.fps);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (a, b) = (mean(&off), mean(&on));
    println!("learning's cost: 1 - {b:.2} / {a:.2} fps = {:.1} % (target < 10 %)", 100.0 * (1.0 - b / a));
}

fn main() {
    // The same allocator settings as the kensa binary, so the kernel numbers match it.
    kensa_model::tune_allocator();
    let sections = env_str("KENSA_PERF", "kernels,baseline,pipeline");
    let device = match env_str("KENSA_PERF_DEVICE", "cpu").as_str() {
        "cuda" => Device::Cuda(0),
        _ => Device::Cpu,
    };
    println!(
        "perf: sections {sections}; host {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let d = data();
    let tmp = TempDir::new("perf");
    let bank1 = enroll_one(&d, tmp.path());
    if sections.contains("kernels") {
        kernels(&d, device, &bank1);
    }
    if sections.contains("baseline") {
        baseline(&d, &bank1);
    }
    if sections.contains("pipeline") {
        let tmp = TempDir::new("perf-bank");
        let bank = synthetic_bank_of(tmp.path(), "disc", 16);
        let (model_b1_ms, model_b8) = model_step(&tmp.path().join("refs/train/good"), &bank, device);
        pipeline(model_b1_ms, model_b8, &bank);
    }
    if sections.contains("learning") {
        let tmp = TempDir::new("perf-learning");
        learning_cost(&synthetic_bank_of(tmp.path(), "disc", 16));
    }
    if sections.contains("console") {
        let tmp = TempDir::new("perf-console");
        console_cost(&synthetic_bank_of(tmp.path(), "disc", 16));
    }
}
