//! `kensa eval` end to end: the table and JSON it writes, on synthetic data and on real
//! bottle images (skipped without ../shared).

use kensa_tests::*;

fn eval_json(data: &std::path::Path, shots: &str, runs: &str, dir: &std::path::Path) -> serde_json::Value {
    let (out, j) = kensa_eval(data, &dir.join("eval.json"), &["--shots", shots, "--runs", runs, "--by-type"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("img_AUROC") && table.contains("PRO") && table.contains("defect type"), "{table}");
    j
}

#[test]
fn eval_on_a_synthetic_line() {
    let dir = TempDir::new("eval-synth");
    let data = dir.path().join("disc");
    synth(&data, &["--count", "24", "--train", "8", "--defect-rate", "0.5", "--seed", "8"]);
    let j = eval_json(&data, "1,2", "3", dir.path());
    assert_eq!(j["runs"].as_array().unwrap().len(), 6, "2 shot counts x 3 runs");
    let runs = j["runs"].as_array().unwrap();
    // Runs draw their references independently (seeded): not all the same.
    let one_shot: std::collections::BTreeSet<String> =
        runs.iter().filter(|r| r["shots"] == 1).map(|r| r["references"].to_string()).collect();
    assert!(one_shot.len() >= 2, "{one_shot:?}");
    for r in runs {
        assert_eq!(r["images"], 24);
        assert!(r["image_auroc"].as_f64().unwrap() > 0.9, "{r}");
        assert!(r["pixel_auroc"].as_f64().unwrap() > 0.9, "{r}");
        assert!(r["pro"].as_f64().unwrap() > 0.5, "{r}");
    }
    assert_eq!(j["summary"].as_array().unwrap().len(), 2);
}

#[test]
fn eval_mvtec_bottle_one_shot_reaches_the_target() {
    let Some(shared) = shared() else {
        eprintln!("SKIP eval_mvtec_bottle_one_shot_reaches_the_target: ../shared is absent");
        return;
    };
    let dir = TempDir::new("eval-bottle");
    let j = eval_json(&shared.join("data/mvtec-bottle"), "1", "3", dir.path());
    let s = &j["summary"][0];
    eprintln!("mvtec-bottle 1-shot, 3 runs: {s}");
    assert!(s["image_auroc"].as_f64().unwrap() >= 0.999, "{s}");
    assert!(s["pixel_auroc"].as_f64().unwrap() >= 0.985, "{s}");
    // Per defect type: bottle's three test folders, their images, shares of the defect pixels.
    for r in j["runs"].as_array().unwrap() {
        let t = r["by_type"].as_array().unwrap();
        let kinds: Vec<(&str, u64)> =
            t.iter().map(|x| (x["kind"].as_str().unwrap(), x["images"].as_u64().unwrap())).collect();
        assert_eq!(kinds, vec![("broken_large", 7), ("broken_small", 8), ("contamination", 7)], "{r}");
        let share: f64 = t.iter().map(|x| x["pixel_share"].as_f64().unwrap()).sum();
        assert!((share - 1.0).abs() < 1e-9, "{share}");
        assert!(
            t.iter().all(|x| x["image_auroc"].as_f64().unwrap() >= 0.99 && x["pixel_auroc"].as_f64().unwrap() >= 0.97),
            "{r}"
        );
    }
}

/// `--report` writes one self-contained HTML page: the table, a ROC curve per class and shot
/// count, and 3 false positives + 3 false negatives per section as embedded PNG panels;
/// `kensa score --overlay` writes an overlay PNG beside each map, hottest where the defect is.
#[test]
fn report_and_overlays() {
    let dir = TempDir::new("eval-report");
    let data = dir.path().join("disc");
    synth(&data, &["--count", "16", "--train", "4", "--defect-rate", "0.5", "--seed", "3"]);
    let rep = dir.path().join("report");
    let (_, runs) =
        kensa_eval(&data, &dir.path().join("eval.json"), &["--shots", "1,2", "--report", rep.to_str().unwrap()]);
    let html = std::fs::read_to_string(rep.join("report.html")).unwrap();
    assert!(html.contains("<table") && html.contains("disc"), "no table");
    assert_eq!(html.matches("<svg").count(), 2, "one ROC curve per shot count");
    assert_eq!(html.matches("data:image/png;base64,").count(), 12, "3 FP + 3 FN panels per section");
    assert!(!html.contains("src=\"/") && !html.contains("src=\"http"), "self-contained");

    // Each panel's caption compares the image's score with the calibrated image decision of
    // its section's (first) run, and says "worst" exactly where that decision was wrong.
    let decisions: Vec<String> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["run"] == 0)
        .map(|r| format!("{:.4}", r["calibration"]["image_threshold"].as_f64().unwrap()))
        .collect();
    assert_eq!(decisions.len(), 2, "one first run per shot count");
    let captions: Vec<&str> =
        html.split("<figcaption>").skip(1).map(|c| c.split("</figcaption>").next().unwrap()).collect();
    assert_eq!(captions.len(), 12, "{captions:?}");
    for (i, c) in captions.iter().enumerate() {
        let num =
            |key: &str| -> f64 { c.split(key).nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap() };
        let (score, decision) = (num("score "), num("vs decision "));
        assert_eq!(format!("{decision:.4}"), decisions[i / 6], "caption {c}");
        if (score - decision).abs() > 1e-4 {
            let wrong = if c.contains("false positive") { score > decision } else { score < decision };
            assert_eq!(c.starts_with("worst"), wrong, "caption {c}");
        }
    }

    // Overlays: a defective image's overlay is reddest inside its ground-truth mask.
    let bank = dir.path().join("disc.kbank");
    enroll("disc", &data.join("train/good"), &bank, &[]);
    let kind = std::fs::read_dir(data.join("test"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap() != "good")
        .unwrap();
    let img = std::fs::read_dir(&kind).unwrap().map(|e| e.unwrap().path()).min().unwrap();
    let out = dir.path().join("scored");
    kensa_ok(&[
        "score",
        "--overlay",
        "--bank",
        bank.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let stem = img.file_stem().unwrap().to_string_lossy().into_owned();
    let ov = image::open(out.join(format!("{stem}_overlay.png"))).unwrap().to_rgb8();
    let src = image::open(&img).unwrap().to_rgb8();
    assert_eq!((ov.width(), ov.height()), (2 * src.width() + 4, src.height()), "image | overlay");
    let mask = image::open(data.join("ground_truth").join(kind.file_name().unwrap()).join(format!("{stem}_mask.png")))
        .unwrap()
        .to_luma8();
    let x0 = src.width() + 4;
    let redness = |inside: bool| -> f64 {
        let v: Vec<f64> = mask
            .enumerate_pixels()
            .filter(|(_, _, m)| (m.0[0] > 127) == inside)
            .map(|(x, y, _)| {
                let p = ov.get_pixel(x0 + x, y).0;
                p[0] as f64 - p[2] as f64
            })
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    assert!(redness(true) > redness(false) + 30.0, "inside {} outside {}", redness(true), redness(false));
}
