//! The learner with the real backbone on a synthetic line: operator answers change the bank
//! (and every change is a version), duplicates and conflicts are handled, an answer for a frame
//! no longer held changes nothing, self-enrollment keeps its guards, a frame answered `defect`
//! after joining is taken out again, and versions can be listed and rolled back.
//! Skips (saying so) when the backbone has not been fetched (`scripts/setup.sh`).

use kensa_core::config::{Device, LearnMode, Precision};
use kensa_learn::learner::{Answer, Guards, Learner};
use kensa_learn::update::{self, Budget};
use kensa_learn::Label;
use kensa_model::bank::Bank;
use kensa_model::engine::Engine;
use kensa_model::enroll::{enroll, EnrollOptions};
use kensa_model::lineage::Change;
use kensa_model::versions;
use std::sync::Arc;

fn engine() -> Option<Engine> {
    match kensa_model::load_backbone(None, Device::Cpu, Precision::Fp32) {
        Ok(b) => Some(Engine::new(b, 128)),
        Err(e) => {
            eprintln!("SKIPPED: no backbone ({e}); run scripts/setup.sh");
            None
        }
    }
}

fn line() -> kensa_synth::Line {
    kensa_synth::Line::new(11, 0.5, 128, 128)
}

fn bank(e: &Engine) -> Bank {
    let l = line();
    let refs = vec![("ref0".to_string(), l.normal(0).image)];
    let mut opts = EnrollOptions::new("disc", 1);
    opts.augment = Vec::new();
    enroll(e, &refs, &opts, |_, _| {}).unwrap()
}

fn rows(b: &Bank) -> i64 {
    update::rows(b)
}

fn score(e: &Engine, b: &Bank, img: &image::RgbImage) -> f32 {
    e.score(&[(img.as_raw().as_slice(), img.width(), img.height())], b).unwrap()[0].max()
}

#[test]
fn operator_answers_change_the_bank_once_and_the_last_answer_wins() {
    let Some(e) = engine() else { return };
    let b0 = bank(&e);
    let mut l = Learner::new(LearnMode::Feedback, Guards { hold: 4, ..Guards::default() });
    let img = Arc::new(line().normal(5).image);
    let s = score(&e, &b0, &img);
    assert_eq!(
        l.scored(&e, &b0, "f1", img.clone(), s, 0).unwrap().map(|_| ()),
        None,
        "feedback alone never self-enrolls"
    );
    // `normal`: the frame becomes a reference, its novel patches only, as a new version.
    let (a, b1) = l.answer(&e, &b0, "f1", Label::Normal).unwrap();
    let b1 = b1.expect("changed");
    assert!(matches!(a, Answer::Changed(ref v) if *v == b1.meta.version()));
    assert_ne!(b1.meta.version(), b0.meta.version());
    assert_eq!(b1.meta.references, 2);
    let added = rows(&b1) - rows(&b0);
    assert!(
        added > 0 && added <= rows(&b0) / 2 + b0.layers.len() as i64,
        "about half of a reference's patches: {added}"
    );
    let lin = b1.meta.lineage.as_ref().unwrap();
    assert_eq!(lin.parent, b0.meta.version());
    assert!(matches!(lin.change, Change::Added { .. }));
    assert!(score(&e, &b1, &img) < s, "the frame is explained better once it is a reference");
    // The same answer again: nothing.
    assert_eq!(l.answer(&e, &b1, "f1", Label::Normal).unwrap().0, Answer::Duplicate);
    // Conflicting: `defect` now takes the frame out again and records a real positive.
    let (_, b2) = l.answer(&e, &b1, "f1", Label::Defect).unwrap();
    let b2 = b2.unwrap();
    assert_eq!(b2.meta.references, 1);
    assert_eq!(rows(&b2), rows(&b0), "its rows are gone");
    assert!(b2.layers.iter().zip(&b0.layers).all(|(x, y)| x.equal(y)), "exactly the enrolled rows remain");
    assert_eq!(b2.meta.lineage.as_ref().unwrap().observations.len(), 1);
    assert_eq!((l.stats.duplicate, l.stats.conflicting, l.stats.removed), (1, 1, 1));
    // Past the hold, frames are no longer held: an answer changes nothing and is counted.
    for i in 0..4 {
        l.scored(&e, &b2, &format!("g{i}"), img.clone(), s, 0).unwrap();
    }
    assert_eq!(l.answer(&e, &b2, "f1", Label::Normal).unwrap().0, Answer::NotHeld);
    assert_eq!(l.stats.not_held, 1);
    assert_eq!(l.held(), 4);
}

#[test]
fn self_enrollment_keeps_its_guards_and_a_defect_answer_takes_a_frame_out() {
    let Some(e) = engine() else { return };
    let b0 = bank(&e);
    let cal = &b0.meta.calibration;
    let level = kensa_learn::learner::auto_level(cal, Guards::default().normal_quantile);
    assert!(level < cal.image_threshold);
    let guards = Guards { min_spacing: 100, ..Guards::default() };
    let mut l = Learner::new(LearnMode::Auto, guards);
    let img = Arc::new(line().normal(3).image);
    // Not confident enough (between the level and the decision): nothing.
    let mid = (level + cal.image_threshold) / 2.0;
    assert!(l.scored(&e, &b0, "a", img.clone(), mid, 0).unwrap().is_none());
    // Anomalous: never.
    assert!(l.scored(&e, &b0, "b", img.clone(), cal.image_threshold + 1.0, 0).unwrap().is_none());
    // Confident: joins.
    let b1 = l.scored(&e, &b0, "c", img.clone(), level * 0.5, 1000).unwrap().expect("joins");
    assert_eq!(b1.meta.references, 2);
    // Too soon after: refused (counted).
    assert!(l.scored(&e, &b1, "d", img.clone(), level * 0.5, 1050).unwrap().is_none());
    assert_eq!(l.stats.refused_spacing, 1);
    // The frame that joined turns out to be a defect: out again.
    let (_, b2) = l.answer(&e, &b1, "c", Label::Defect).unwrap();
    let b2 = b2.unwrap();
    assert_eq!(b2.meta.references, 1);
    assert_eq!(rows(&b2), rows(&b0));
    assert_eq!(l.stats.removed, 1);
}

#[test]
fn the_budget_bounds_learned_references() {
    let Some(e) = engine() else { return };
    let b0 = bank(&e);
    let budget = Budget { max_learned: 2, novelty_quantile: 0.5 };
    let mut b = b0;
    let base = rows(&b);
    for i in 0..5u64 {
        let img = line().normal(10 + i).image;
        b = update::add_reference(&e, &b, &format!("n{i}"), &img, kensa_learn::Source::Operator, &budget).unwrap();
    }
    let lin = b.meta.lineage.as_ref().unwrap();
    assert_eq!(lin.learned.iter().map(|r| r.frame.as_str()).collect::<Vec<_>>(), ["n3", "n4"], "the oldest went");
    assert_eq!(b.meta.references, 3);
    assert_eq!(rows(&b), base + lin.learned.iter().map(|r| r.rows.iter().sum::<i64>()).sum::<i64>());
}

#[test]
fn versions_are_kept_listed_and_rolled_back() {
    let Some(e) = engine() else { return };
    let dir = std::env::temp_dir().join(format!("kensa-versions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disc.kbank");
    let b0 = bank(&e);
    b0.save(&path).unwrap();
    let enrolled = b0.meta.version();
    let b1 = update::add_reference(
        &e,
        &b0,
        "n1",
        &line().normal(7).image,
        kensa_learn::Source::Operator,
        &Budget::default(),
    )
    .unwrap();
    let v1 = versions::commit(&b1, &path, 3).unwrap();
    let log = versions::log(&path).unwrap();
    assert_eq!(log.len(), 2, "the enrolled version is kept too");
    assert!(log.iter().any(|v| v.current && v.version == v1 && v.parent == enrolled));
    assert!(log.iter().any(|v| !v.current && v.version == enrolled));
    // Loading the file gives the new version, sealed.
    assert_eq!(Bank::load_unchecked(&path, tch::Device::Cpu).unwrap().meta.version(), v1);
    // Roll back: a new version with the enrolled contents.
    let v2 = versions::rollback(&path, &enrolled[..6], 3).unwrap();
    let back = Bank::load_unchecked(&path, tch::Device::Cpu).unwrap();
    assert_eq!(back.meta.version(), v2);
    assert_eq!(back.meta.references, 1);
    assert_eq!(rows(&back), rows(&b0));
    assert!(versions::rollback(&path, "zzzz", 3).unwrap_err().to_string().contains("no kept version"));
    // At most `keep` versions are kept.
    let mut b = back;
    for i in 0..4u64 {
        b = update::observe(
            &b,
            kensa_model::lineage::Observation {
                frame: format!("o{i}"),
                score: 1.0,
                label: Label::Defect,
                source: kensa_learn::Source::Operator,
            },
        );
        versions::commit(&b, &path, 3).unwrap();
    }
    assert_eq!(versions::log(&path).unwrap().len(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_decision_follows_the_bank_down_when_a_reference_joins_and_back_up_when_it_leaves() {
    let Some(e) = engine() else { return };
    let b0 = bank(&e);
    let t0 = b0.meta.calibration.image_threshold;
    let (mut follows, mut stays) = (
        Learner::new(LearnMode::Feedback, Guards::default()),
        Learner::new(LearnMode::Feedback, Guards { follow: false, ..Guards::default() }),
    );
    let mut below = 0;
    for i in 1..=12 {
        let img = Arc::new(line().normal(i).image);
        let s = score(&e, &b0, &img);
        below += usize::from(s < t0);
        for l in [&mut follows, &mut stays] {
            assert!(l.scored(&e, &b0, &format!("n{i}"), img.clone(), s, 0).unwrap().is_none());
        }
    }
    assert!(below >= 4, "enough held frames judged normal to measure the change: {below}");
    let img = Arc::new(line().normal(40).image);
    let s = score(&e, &b0, &img);
    for l in [&mut follows, &mut stays] {
        l.scored(&e, &b0, "f", img.clone(), s, 0).unwrap();
    }
    // `normal`: a reference joins; the bank explains normal parts better and the decision follows.
    let (_, b1) = follows.answer(&e, &b0, "f", Label::Normal).unwrap();
    let b1 = b1.expect("a new version");
    let t1 = b1.meta.calibration.image_threshold;
    assert!(t1 < t0, "the decision falls with the normal scores: {t0} → {t1}");
    let ratio = t1 / t0;
    let lineage = b1.meta.lineage.as_ref().unwrap();
    assert!((lineage.enrolled_threshold / t0 - ratio).abs() < 1e-4, "re-fits start from the followed decision");
    let n0 = b0.meta.calibration.normal_scores[0];
    assert!((b1.meta.calibration.normal_scores[0] / n0 - ratio).abs() < 1e-4, "the populations are scaled with it");
    let (_, kept) = stays.answer(&e, &b0, "f", Label::Normal).unwrap();
    assert_eq!(kept.unwrap().meta.calibration.image_threshold, t0, "with follow off the decision stays");
    // `defect` after `normal`: the reference leaves and the decision rises back.
    let (_, b2) = follows.answer(&e, &b1, "f", Label::Defect).unwrap();
    let b2 = b2.expect("a new version");
    let base = b2.meta.lineage.as_ref().unwrap().enrolled_threshold;
    assert!((base - t0).abs() < 1e-5, "the ratio it brought is divided out exactly: {t0} → {t1} → {base}");
    assert!((b2.meta.calibration.normal_scores[0] - n0).abs() < 1e-5, "the populations are back on the enrolled scale");
    // Back and forth again: no drift.
    let (_, b3) = follows.answer(&e, &b2, "f", Label::Normal).unwrap();
    let (_, b4) = follows.answer(&e, &b3.unwrap(), "f", Label::Defect).unwrap();
    let base = b4.unwrap().meta.lineage.as_ref().unwrap().enrolled_threshold;
    assert!((base - t0).abs() < 1e-5, "no drift after two round trips: {base} against {t0}");
}
