//! `kensa synth`, `kensa enroll` and `kensa score` as a user runs them.

use kensa_tests::*;
use std::path::{Path, PathBuf};

#[test]
fn score_writes_exact_json_and_a_map_at_image_resolution() {
    let dir = TempDir::new("score");
    let data = dir.path().join("line");
    synth(&data, &["--count", "16", "--train", "3", "--defect-rate", "0.5", "--seed", "21", "--size", "192"]);
    // MVTec layout with masks for every defective image.
    let good = std::fs::read_dir(data.join("test/good")).unwrap().count();
    let mut defect_imgs = Vec::new();
    for d in std::fs::read_dir(data.join("test")).unwrap() {
        let d = d.unwrap().path();
        if d.file_name().unwrap() == "good" {
            continue;
        }
        for f in std::fs::read_dir(&d).unwrap() {
            let f = f.unwrap().path();
            let mask = data
                .join("ground_truth")
                .join(d.file_name().unwrap())
                .join(format!("{}_mask.png", f.file_stem().unwrap().to_str().unwrap()));
            assert!(mask.is_file(), "{} has no mask", f.display());
            defect_imgs.push(f);
        }
    }
    assert_eq!(good + defect_imgs.len(), 16);
    assert!(!defect_imgs.is_empty() && good > 0);

    let bank = dir.path().join("line.kbank");
    enroll("line", &data.join("train/good"), &bank, &[]);
    let out = dir.path().join("out");
    let mut args = vec!["score", "--bank", bank.to_str().unwrap(), "--out", out.to_str().unwrap(), "--maps", "full"];
    let test_dirs: Vec<String> =
        std::fs::read_dir(data.join("test")).unwrap().map(|d| d.unwrap().path().display().to_string()).collect();
    args.extend(test_dirs.iter().map(|s| s.as_str()));
    kensa_ok(&args);

    let mut correct = 0;
    let mut total = 0;
    for d in &test_dirs {
        let is_defect = !d.ends_with("/good");
        for f in std::fs::read_dir(d).unwrap() {
            let f = f.unwrap().path();
            let stem = f.file_stem().unwrap().to_str().unwrap();
            let j = read_json(&out.join(format!("{stem}.json")));
            let keys: Vec<&String> = j.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["anomalous", "answer", "confidence", "locations", "regions", "score"], "exact keys");
            let regions = j["regions"].as_array().unwrap();
            assert_eq!(regions.is_empty(), !j["anomalous"].as_bool().unwrap(), "an anomaly has its boxes");
            for r in regions {
                let b: Vec<u64> = r["bbox"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
                assert!(b[0] < b[2] && b[1] < b[3] && r["area"].as_u64().unwrap() > 0, "{r}");
                assert!(kensa_core::Cell::ALL.iter().any(|c| c.name() == r["cell"]), "{r}");
            }
            let anomalous = j["anomalous"].as_bool().unwrap();
            let cells = kensa_core::grid::parse_answer(j["answer"].as_str().unwrap()).expect("answer in grammar");
            assert_eq!(cells.is_empty(), !anomalous);
            assert_eq!(j["locations"].as_array().unwrap().len(), cells.len());
            let c = j["confidence"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&c));
            let (rows, cols, map) =
                kensa_core::npy::read_f32_2d(std::fs::File::open(out.join(format!("{stem}_map.npy"))).unwrap())
                    .unwrap();
            assert_eq!((rows, cols), (192, 192), "map at the image's own resolution");
            let max = map.iter().copied().fold(f32::MIN, f32::max);
            assert!((max - j["score"].as_f64().unwrap() as f32).abs() < 1e-4, "score is the map's max");
            total += 1;
            if anomalous == is_defect {
                correct += 1;
            }
        }
    }
    assert_eq!(total, 16);
    assert!(correct * 10 >= total * 8, "verdict accuracy {correct}/{total} on the synthetic line");
    // One summary row per image, agreeing with its JSON.
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("image,score,anomalous,confidence,regions,locations,answer"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 16, "{csv}");
    for row in rows {
        let image = std::path::Path::new(row.split(',').next().unwrap());
        let j = read_json(&out.join(format!("{}.json", image.file_stem().unwrap().to_str().unwrap())));
        assert_eq!(row.split(',').nth(2), Some(j["anomalous"].to_string().as_str()), "{row}");
    }
    // Maps only when asked: by default none; `--maps feature` writes the model's grid (the
    // bank's input size, 320²), whose peak is at least the score (the image's map is resized
    // from it).
    for (maps, sub) in [(None, "out-none"), (Some("feature"), "out-feature")] {
        let o = dir.path().join(sub);
        let mut args = vec!["score", "--bank", bank.to_str().unwrap(), "--out", o.to_str().unwrap()];
        if let Some(m) = maps {
            args.extend(["--maps", m]);
        }
        args.extend(test_dirs.iter().map(|s| s.as_str()));
        kensa_ok(&args);
        let npys: Vec<PathBuf> = std::fs::read_dir(&o)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with("_map.npy"))
            .collect();
        assert_eq!(npys.len(), if maps.is_some() { 16 } else { 0 }, "{sub}");
        for np in npys {
            let (rows, cols, map) = kensa_core::npy::read_f32_2d(std::fs::File::open(&np).unwrap()).unwrap();
            assert_eq!((rows, cols), (320, 320), "the model's grid");
            let stem = np.file_name().unwrap().to_string_lossy().trim_end_matches("_map.npy").to_string();
            let score = read_json(&o.join(format!("{stem}.json")))["score"].as_f64().unwrap() as f32;
            let max = map.iter().copied().fold(f32::MIN, f32::max);
            assert!(max >= score - 1e-4, "{stem}: grid peak {max} below the score {score}");
        }
    }
}

#[test]
fn real_bottle_images_one_shot() {
    let Some(shared) = shared() else {
        eprintln!("SKIP real_bottle_images_one_shot: ../shared is absent");
        return;
    };
    let data = shared.join("data/mvtec-bottle");
    let dir = TempDir::new("bottle");
    let refs = dir.path().join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    let first = std::fs::read_dir(data.join("train/good")).unwrap().map(|e| e.unwrap().path()).min().unwrap();
    std::fs::copy(&first, refs.join(first.file_name().unwrap())).unwrap();
    let bank = dir.path().join("bottle.kbank");
    enroll("bottle", &refs, &bank, &[]);
    // The calibration is fitted, not defaulted: a Platt-scaled logistic, and a pixel level and
    // minimum region area fitted to the synthetic defects' masks (NSA patches among them).
    let cal = kensa_model::bank::Bank::load_unchecked(&bank, tch::Device::Cpu).unwrap().meta.calibration;
    assert!(cal.method.contains("highest") && cal.method.contains("Platt") && cal.method.contains("masks"), "{cal:?}");
    assert!(cal.pixel_fit_f1 > 0.3 && cal.pixel_fit_f1 <= 1.0, "{cal:?}");
    assert!(
        cal.pixel_threshold > cal.normal_scores[0] * 0.5 && cal.pixel_threshold < *cal.anomaly_scores.last().unwrap(),
        "{cal:?}"
    );
    assert!((0.0002..0.05).contains(&cal.min_area_frac), "{cal:?}");
    assert!(cal.logistic_scale.is_finite() && cal.logistic_scale > 0.0, "{cal:?}");
    let mut scores = Vec::new(); // (score, is_defect, anomalous)
    for d in std::fs::read_dir(data.join("test")).unwrap() {
        let d = d.unwrap().path();
        let out = dir.path().join("out").join(d.file_name().unwrap());
        kensa_ok(&["score", "--bank", bank.to_str().unwrap(), "--out", out.to_str().unwrap(), d.to_str().unwrap()]);
        for f in std::fs::read_dir(&out).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "json") {
                let j = read_json(&f);
                scores.push((
                    j["score"].as_f64().unwrap(),
                    d.file_name().unwrap() != "good",
                    j["anomalous"].as_bool().unwrap(),
                ));
            }
        }
    }
    assert_eq!(scores.len(), 29);
    let pos: Vec<f64> = scores.iter().filter(|s| s.1).map(|s| s.0).collect();
    let neg: Vec<f64> = scores.iter().filter(|s| !s.1).map(|s| s.0).collect();
    let wins: f64 = pos
        .iter()
        .map(|p| {
            neg.iter()
                .map(|n| {
                    if p > n {
                        1.0
                    } else if p == n {
                        0.5
                    } else {
                        0.0
                    }
                })
                .sum::<f64>()
        })
        .sum();
    let auroc = wins / (pos.len() * neg.len()) as f64;
    let acc = scores.iter().filter(|s| s.1 == s.2).count() as f64 / scores.len() as f64;
    eprintln!("mvtec-bottle 1-shot: image AUROC {auroc:.3}, verdict accuracy {acc:.3}");
    assert!(auroc >= 0.98, "image AUROC {auroc}");
    assert!(acc >= 0.85, "verdict accuracy {acc}");
}

/// The reduced-precision path (the one a GPU runs in fp16/bf16, and `precision = "auto"` on a
/// CPU with native bf16): a bf16 export of the same backbone, with the bank cast to bf16, gives
/// the same verdicts and scores within 0.02 of fp32; `--precision bf16` takes the bf16 export
/// beside the default one; asking a frozen fp32 export of the user's for bf16 is a clear error
/// naming the file and the fix.
#[test]
fn bf16_backbone_agrees_with_fp32() {
    let bf16 = std::env::var("KENSA_BACKBONE_BF16").unwrap_or_default();
    if bf16.is_empty() || !Path::new(&bf16).is_file() {
        panic!("KENSA_BACKBONE_BF16 is not set or missing: run scripts/setup.sh and source scripts/env.sh");
    }
    let dir = TempDir::new("bf16");
    let data = dir.path().join("line");
    synth(&data, &["--count", "24", "--train", "2", "--defect-rate", "0.5", "--seed", "8"]);
    let bank = dir.path().join("disc.kbank");
    enroll("disc", &data.join("train/good"), &bank, &[]);
    let mut images = Vec::new();
    for d in std::fs::read_dir(data.join("test")).unwrap() {
        images.push(d.unwrap().path());
    }
    let run = |name: &str, extra: &[&str]| -> std::collections::BTreeMap<String, (f64, bool)> {
        let out = dir.path().join(name);
        let mut args = vec!["score", "--bank", bank.to_str().unwrap(), "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend(images.iter().map(|p| p.to_str().unwrap()));
        kensa_ok(&args);
        std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .map(|p| {
                let j = read_json(&p);
                (
                    p.file_stem().unwrap().to_string_lossy().into_owned(),
                    (j["score"].as_f64().unwrap(), j["anomalous"].as_bool().unwrap()),
                )
            })
            .collect()
    };
    let full = run("fp32", &["--precision", "fp32"]);
    let half = run("bf16", &["--backbone", &bf16]);
    assert_eq!(full.len(), 24);
    assert_eq!(full.keys().collect::<Vec<_>>(), half.keys().collect::<Vec<_>>());
    assert_eq!(run("bf16-asked", &["--precision", "bf16"]), half, "--precision bf16 takes the bf16 export");
    let max_diff = full.iter().map(|(k, v)| (v.0 - half[k].0).abs()).fold(0.0, f64::max);
    let agree = full.iter().filter(|(k, v)| v.1 == half[*k].1).count();
    eprintln!("bf16 vs fp32: max |Δscore| {max_diff:.4}, verdicts agree on {agree}/24");
    assert!(max_diff < 0.02, "bf16 scores differ from fp32 by {max_diff}");
    assert!(agree >= 23, "bf16 verdicts agree with fp32 on only {agree}/24");
    // The fp32 export is frozen: asking it for bf16 names the file and the export flag.
    let fp32 = bf16.replace("-bf16.pt", ".pt");
    let o = kensa(&[
        "score",
        "--backbone",
        &fp32,
        "--precision",
        "bf16",
        "--bank",
        bank.to_str().unwrap(),
        "--out",
        dir.path().join("x").to_str().unwrap(),
        images[0].to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("efficientnet-lite0.pt") && err.contains("--dtype bf16"), "{err}");
}

/// `kensa enroll --coreset F` keeps about F of the patches, records F in the bank, and still
/// separates defects; a fraction outside (0, 1] is refused with the flag named.
#[test]
fn coreset_bank_is_smaller_and_still_works() {
    let dir = TempDir::new("coreset");
    let data = dir.path().join("line");
    synth(&data, &["--count", "20", "--train", "4", "--defect-rate", "0.5", "--seed", "4"]);
    let full = dir.path().join("full.kbank");
    let small = dir.path().join("small.kbank");
    let refs = data.join("train/good");
    let e1 = enroll("disc", &refs, &full, &[]);
    let e2 = enroll("disc", &refs, &small, &["--coreset", "0.25"]);
    let patches = |o: &std::process::Output| -> f64 {
        let s = String::from_utf8_lossy(&o.stderr);
        s.split(" patches").next().and_then(|x| x.rsplit(' ').next()).and_then(|x| x.parse().ok()).unwrap()
    };
    let ratio = patches(&e2) / patches(&e1);
    assert!((0.24..=0.27).contains(&ratio), "kept {ratio} of the patches");
    assert!(std::fs::metadata(&small).unwrap().len() * 3 < std::fs::metadata(&full).unwrap().len());
    let (_, j) = kensa_eval(&data, &dir.path().join("eval.json"), &["--shots", "4", "--coreset", "0.25"]);
    let auroc = j["runs"][0]["image_auroc"].as_f64().unwrap();
    assert!(auroc > 0.9, "image AUROC {auroc} with a 25 % coreset");
    let bad = kensa(&[
        "enroll",
        "--product",
        "disc",
        "--images",
        refs.to_str().unwrap(),
        "--out",
        dir.path().join("x.kbank").to_str().unwrap(),
        "--coreset",
        "0",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("coreset"), "{}", String::from_utf8_lossy(&bad.stderr));
}

/// The bank records how it was built (input size, aggregation, augmentation), scoring follows
/// it, and an augmented bank accepts the transformed part while a plain one flags it.
#[test]
fn bank_recipe_is_recorded_and_followed() {
    let dir = TempDir::new("recipe");
    // An asymmetric part: a ramp with a bright block near the top left.
    let refs = dir.path().join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    let part = image::RgbImage::from_fn(200, 200, |x, y| {
        let v = if (20..70).contains(&x) && (30..60).contains(&y) { 240 } else { (x / 2 + 40) as u8 };
        image::Rgb([v, (y / 3 + 30) as u8, 90])
    });
    part.save(refs.join("part.png")).unwrap();
    let flipped = dir.path().join("flipped");
    std::fs::create_dir_all(&flipped).unwrap();
    image::imageops::flip_horizontal(&part).save(flipped.join("part_flipped.png")).unwrap();

    let enroll = |name: &str, extra: &[&str]| {
        let bank = dir.path().join(format!("{name}.kbank"));
        enroll("part", &refs, &bank, extra);
        bank
    };
    let plain = enroll("plain", &["--input-size", "256", "--aggregation", "3,3", "--no-self-match"]);
    let flips = enroll("flips", &["--augment", "hflip,rot180"]);
    let meta = |b: &Path| kensa_model::bank::Bank::load_unchecked(b, tch::Device::Cpu).unwrap();
    let (p, f) = (meta(&plain), meta(&flips));
    assert_eq!((p.meta.input_size, p.meta.aggregation.clone(), p.meta.augment.clone()), (256, vec![3, 3], vec![]));
    assert_eq!((f.meta.input_size, f.meta.aggregation.clone()), (320, vec![1, 3]), "defaults");
    assert_eq!(f.meta.augment, vec!["hflip", "rot180"]);
    assert_eq!((p.meta.self_match, f.meta.self_match), (false, true), "self-match: opt-out recorded, on by default");
    // Stride-8 patches: one image at 256 px = 32², three copies at 320 px = 3 × 40².
    assert_eq!(p.layers[0].size()[0], 32 * 32);
    assert_eq!(f.layers[0].size()[0], 3 * 40 * 40);

    let score = |bank: &Path, img_dir: &Path, stem: &str| -> f64 {
        let out = dir.path().join(format!("out-{}", bank.file_stem().unwrap().to_str().unwrap()));
        kensa_ok(&[
            "score",
            "--maps",
            "full",
            "--bank",
            bank.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            img_dir.to_str().unwrap(),
        ]);
        let (rows, cols, _) =
            kensa_core::npy::read_f32_2d(std::fs::File::open(out.join(format!("{stem}_map.npy"))).unwrap()).unwrap();
        assert_eq!((rows, cols), (200, 200), "map at the image's resolution whatever the bank's input size");
        read_json(&out.join(format!("{stem}.json")))["score"].as_f64().unwrap()
    };
    // The reference itself is normal against both banks.
    assert!(score(&plain, &refs, "part") < 0.05);
    assert!(score(&flips, &refs, "part") < 0.05);
    // The mirrored part: far from the plain bank, at home in the one with mirrored copies.
    let (sp, sf) = (score(&plain, &flipped, "part_flipped"), score(&flips, &flipped, "part_flipped"));
    eprintln!("mirrored part: plain bank {sp:.4}, hflip bank {sf:.4}");
    assert!(sf < 0.05 && sp > 4.0 * sf.max(0.01), "mirrored part: plain bank {sp}, hflip bank {sf}");

    // The self-match follows the bank, not the scorer: two banks of the same reference that
    // differ only in the flag score the mirrored part differently, and the one with it never
    // higher (it can only lower the coarser layer's distances) and clearly lower somewhere.
    let sm_on = enroll("sm-on", &[]);
    let sm_off = enroll("sm-off", &["--no-self-match"]);
    let map_of = |bank: &Path| {
        let out = dir.path().join(format!("out-{}", bank.file_stem().unwrap().to_str().unwrap()));
        kensa_ok(&[
            "score",
            "--maps",
            "full",
            "--bank",
            bank.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            flipped.to_str().unwrap(),
        ]);
        kensa_core::npy::read_f32_2d(std::fs::File::open(out.join("part_flipped_map.npy")).unwrap()).unwrap().2
    };
    let (on, off) = (map_of(&sm_on), map_of(&sm_off));
    let lowered = on.iter().zip(&off).map(|(a, b)| b - a).fold(f32::NEG_INFINITY, f32::max);
    let raised = on.iter().zip(&off).map(|(a, b)| a - b).fold(f32::NEG_INFINITY, f32::max);
    eprintln!("self-match on the mirrored part: lowered the map by up to {lowered:.4}, raised it by up to {raised:.6}");
    assert!(raised <= 1e-4, "the self-match raised the map by {raised}");
    // (measured 0.011; identical maps, 0, would mean the scorer ignored the flag)
    assert!(
        lowered > 1e-3,
        "a bank recorded without the self-match scores like one with it (largest difference {lowered})"
    );

    // A crop: recorded, only the region is scored (0 outside), the reference stays normal and
    // a defect inside the region is found.
    let cropped = enroll("crop", &["--crop", "100,0,100,200"]);
    assert_eq!(meta(&cropped).meta.crop, Some([100, 0, 100, 200]));
    let defective = dir.path().join("defective");
    std::fs::create_dir_all(&defective).unwrap();
    let mut bad = part.clone();
    for y in 120..140 {
        for x in 150..170 {
            bad.put_pixel(x, y, image::Rgb([10, 250, 10]));
        }
    }
    bad.save(defective.join("bad.png")).unwrap();
    let out = dir.path().join("out-crop");
    kensa_ok(&[
        "score",
        "--maps",
        "full",
        "--bank",
        cropped.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        refs.to_str().unwrap(),
        defective.to_str().unwrap(),
    ]);
    let map = |stem: &str| {
        kensa_core::npy::read_f32_2d(std::fs::File::open(out.join(format!("{stem}_map.npy"))).unwrap()).unwrap().2
    };
    let (m_ref, m_bad) = (map("part"), map("bad"));
    assert!(
        (0..200).all(|y| (0..100).all(|x| m_ref[y * 200 + x] == 0.0 && m_bad[y * 200 + x] == 0.0)),
        "0 outside the crop"
    );
    let peak = (0..m_bad.len()).max_by(|&a, &b| m_bad[a].total_cmp(&m_bad[b])).unwrap();
    let (px, py) = ((peak % 200) as u32, (peak / 200) as u32);
    assert!((140..180).contains(&px) && (110..150).contains(&py), "peak at ({px}, {py}), defect at 150-170 x 120-140");
    assert!(read_json(&out.join("bad.json"))["anomalous"].as_bool().unwrap());
    assert!(read_json(&out.join("part.json"))["score"].as_f64().unwrap() < 0.05);

    // Bad recipes are named errors.
    for (flag, value, needle) in [
        ("--augment", "spin", "spin"),
        ("--aggregation", "2,3", "aggregation"),
        ("--aggregation", "3", "aggregation"),
        ("--crop", "1,2,3", "--crop"),
        ("--crop", "0,0,0,5", "--crop"),
    ] {
        let o = kensa(&[
            "enroll",
            "--product",
            "part",
            "--images",
            refs.to_str().unwrap(),
            "--out",
            dir.path().join("bad.kbank").to_str().unwrap(),
            flag,
            value,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{flag} {value}: {err}");
    }
}
