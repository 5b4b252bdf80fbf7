//! `kensa eval` end to end: the table and JSON it writes, on synthetic data and on real
//! bottle images (skipped without ../shared).

use kensa_tests::*;

fn eval_json(data: &std::path::Path, shots: &str, runs: &str, dir: &std::path::Path) -> serde_json::Value {
    let json = dir.join("eval.json");
    let out = kensa_ok(&["eval", "--data", data.to_str().unwrap(), "--shots", shots, "--runs", runs, "--json", json.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("img_AUROC") && table.contains("PRO"), "{table}");
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

#[test]
fn eval_on_a_synthetic_line() {
    let dir = TempDir::new("eval-synth");
    let data = dir.path().join("disc");
    kensa_ok(&["synth", "--out", data.to_str().unwrap(), "--count", "24", "--train", "8", "--defect-rate", "0.5", "--seed", "8"]);
    let j = eval_json(&data, "1,2", "3", dir.path());
    assert_eq!(j["runs"].as_array().unwrap().len(), 6, "2 shot counts x 3 runs");
    let runs = j["runs"].as_array().unwrap();
    // Runs draw their references independently (seeded): not all the same.
    let one_shot: std::collections::BTreeSet<String> = runs.iter().filter(|r| r["shots"] == 1).map(|r| r["references"].to_string()).collect();
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
}
