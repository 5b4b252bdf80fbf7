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

/// Sums the `data-n` counts of the elements of `class` in `html`.
fn counts(html: &str, class: &str) -> usize {
    html.split(&format!("class=\"{class}\" data-n=\""))
        .skip(1)
        .map(|x| x.split('"').next().unwrap().parse::<usize>().unwrap())
        .sum()
}

/// `--report` writes one self-contained HTML page: the table and, per class and shot count (its
/// first run), a ROC curve, a score histogram with the calibrated decision, the calibrated
/// judge's confusion matrix and a gallery of every test image as embedded JPEG panels;
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
    assert_eq!(html.matches("<svg").count(), 4, "a ROC curve and a histogram per shot count");
    assert_eq!(html.matches("data:image/jpeg;base64,").count(), 32, "every test image of both sections");
    assert!(!html.contains("src=\"/") && !html.contains("src=\"http"), "self-contained");

    // Per section, against its (first) run in the JSON: the decision is the calibrated image
    // threshold, the histogram and the confusion matrix count every image, the gallery shows
    // each one once, highest score first, with its label, score and verdict.
    let firsts: Vec<&serde_json::Value> = runs["runs"].as_array().unwrap().iter().filter(|r| r["run"] == 0).collect();
    let sections: Vec<&str> = html.split("<h2>").skip(1).collect();
    assert_eq!((firsts.len(), sections.len()), (2, 2), "one section per shot count");
    for (r, sec) in firsts.iter().zip(&sections) {
        let decision = r["calibration"]["image_threshold"].as_f64().unwrap();
        assert!(sec.contains(&format!("class=\"decision\" data-threshold=\"{decision:.4}\"")), "decision line");
        let scores: Vec<(String, f64, bool)> = r["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                let p = std::path::Path::new(x[0].as_str().unwrap());
                let name = format!(
                    "{}/{}",
                    p.parent().unwrap().file_name().unwrap().to_string_lossy(),
                    p.file_name().unwrap().to_string_lossy()
                );
                (name, x[1].as_f64().unwrap(), x[2].as_bool().unwrap())
            })
            .collect();
        let anomalous = scores.iter().filter(|s| s.2).count();
        let hist = sec.split("<svg class=\"hist\"").nth(1).expect("a histogram").split("</svg>").next().unwrap();
        assert_eq!((counts(hist, "normal"), counts(hist, "anomalous")), (16 - anomalous, anomalous), "histogram");
        let said = |s: f64| s >= decision;
        let m = |p: bool, t: bool| scores.iter().filter(|s| said(s.1) == p && s.2 == t).count();
        let matrix = ["tp", "fp", "fn", "tn"].map(|c| counts(sec, c));
        assert_eq!(matrix, [m(true, true), m(true, false), m(false, true), m(false, false)], "confusion matrix");
        assert!(sec.contains(&format!("accuracy {:.3}", r["verdict_accuracy"].as_f64().unwrap())), "accuracy");

        let captions: Vec<&str> =
            sec.split("<figcaption>").skip(1).map(|c| c.split("</figcaption>").next().unwrap()).collect();
        assert_eq!(captions.len(), 16, "one gallery entry per test image");
        let mut shown = Vec::new();
        for c in &captions {
            let f: Vec<&str> = c.split(" — ").collect();
            let (name, label, score) = (f[0], f[1], f[2].strip_prefix("score ").unwrap().parse::<f64>().unwrap());
            let (verdict, right) = (f[3].strip_prefix("verdict ").unwrap(), f[4]);
            let truth = scores.iter().find(|s| s.0 == name).unwrap_or_else(|| panic!("unknown image {c}"));
            assert_eq!(format!("{score:.4}"), format!("{:.4}", truth.1), "{c}");
            assert_eq!(label, if truth.2 { "anomalous" } else { "normal" }, "{c}");
            if (score - decision).abs() > 1e-4 {
                assert_eq!(verdict == "anomalous", said(score), "{c}");
            }
            assert_eq!(right == "correct", (verdict == "anomalous") == truth.2, "{c}");
            shown.push((name, score));
        }
        assert!(shown.windows(2).all(|w| w[0].1 >= w[1].1), "highest score first");
        shown.sort_by(|a, b| a.0.cmp(b.0));
        shown.dedup_by(|a, b| a.0 == b.0);
        assert_eq!(shown.len(), 16, "each image once");
        let errors = captions.iter().filter(|c| c.ends_with("wrong")).count();
        assert!(sec.contains(&format!("errors only ({errors})")), "the filter counts the errors");
    }
    assert!(html.contains("function filt("), "the gallery filter");

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
