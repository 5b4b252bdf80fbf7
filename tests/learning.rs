//! Learning from the line (issue #21), as a plant runs it: operator answers over HTTP and the
//! feedback topic change the bank the daemon scores with, as new versions on disk; the token
//! guards that listener beyond localhost; two daemons sharing the bank folder converge on one
//! version; `kensa replay` scores a stream with the same learning, and `kensa bank log` /
//! `rollback` list and restore versions.

use kensa_core::config::LearnMode;
use kensa_core::feedback::{Feedback, Label};
use kensa_tests::*;
use std::time::Duration;

fn bank_version(path: &std::path::Path) -> String {
    let out = kensa_ok(&["bank", "log", path.to_str().unwrap(), "--json"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let current: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["current"] == true)
        .collect();
    assert_eq!(current.len(), 1, "{text}");
    current[0]["version"].as_str().unwrap().to_string()
}

fn post_feedback(addr: &str, event: &str, label: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let body = serde_json::json!({ "event_id": event, "label": label, "who": "op-7" }).to_string();
    let (code, text) = http_post(addr, "/v1/feedback", &body, token).unwrap();
    (code, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

#[test]
fn operator_answers_over_http_and_kafka_teach_the_bank_and_a_second_daemon_follows() {
    let (dir, bank, topic, metrics) = rig("learn");
    let enrolled = bank_version(&bank);
    let feedback_topic = format!("{topic}.feedback");
    let config = |sub: &str, cam: &str, metrics: &str, seed: u64| {
        let d = dir.path().join(sub);
        std::fs::create_dir_all(&d).unwrap();
        let mut c = base_config(&bank, &topic, &brokers(), metrics);
        c.products.get_mut("disc").unwrap().learn = LearnMode::Feedback;
        c.model.bank_poll_s = 1;
        c.kafka.feedback_topic = Some(feedback_topic.clone());
        c.cameras.push(synthetic_camera(cam, seed, 0, 4.0, 0.3));
        write_config(&d, &c)
    };
    let metrics_b = local_addr();
    let mut a = Daemon::start(&config("a", "cam-a", &metrics, 3), &[], &metrics);
    let mut b = Daemon::start(&config("b", "cam-b", &metrics_b, 4), &[], &metrics_b);
    let got = consume_until(&brokers(), &topic, Duration::from_secs(120), |r| {
        r.iter().filter(|e| e.key == "cam-a").count() >= 6 && r.iter().any(|e| e.key == "cam-b")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));
    let of_a: Vec<_> = got.iter().filter(|r| r.key == "cam-a").map(|r| r.event.clone()).collect();
    assert!(of_a.iter().all(|e| e.bank_version == enrolled[..12]), "scored with the enrolled bank first");
    // The newest frame of camera a is still held: `normal` makes it a reference.
    let last = of_a.last().unwrap();
    let (code, r) = post_feedback(&metrics, &last.event_id, "normal", None);
    assert_eq!(code, 200, "{r}\n{}", a.log_text());
    assert_eq!(r["result"], "changed", "{r}");
    let v1 = r["bank_version"].as_str().unwrap().to_string();
    assert_ne!(v1, enrolled);
    assert_eq!(bank_version(&bank), v1, "committed to the bank file as the current version");
    // The same answer again changes nothing; an unknown frame and a bad body are refused.
    assert_eq!(post_feedback(&metrics, &last.event_id, "normal", None).1["result"], "duplicate");
    let (code, r) = post_feedback(&metrics, "cam-a/nope/1", "defect", None);
    assert_eq!((code, r["result"].as_str()), (404, Some("not_held")), "{r}");
    let (code, _) = http_post(&metrics, "/v1/feedback", r#"{"event_id": "x"}"#, None).unwrap();
    assert_eq!(code, 400, "a body without a label");
    // Camera a's later events are scored with the new version.
    let later = consume_until(&brokers(), &topic, Duration::from_secs(60), |r| {
        r.iter().any(|e| e.key == "cam-a" && e.event.bank_version == v1)
    });
    assert!(later.is_ok(), "events carry the learned version\n{}", a.log_text());
    // Daemon b shares the bank folder: it takes the new version by itself.
    assert!(
        wait_for(Duration::from_secs(30), || {
            metric(&b.scrape(), "kensa_bank_info", &[("product", "disc"), ("version", v1.as_str())]) == Some(1.0)
        }),
        "the second daemon converges on {v1}\n{}",
        b.log_text()
    );
    // An answer on the feedback topic (protobuf), for a frame daemon a holds: a confirmed
    // defect, recorded as a new version that both daemons end up on.
    let held = consume_until(&brokers(), &topic, Duration::from_secs(30), |r| {
        r.iter().filter(|e| e.key == "cam-a" && e.event.bank_version == v1).count() >= 2
    })
    .unwrap();
    let ev = held.iter().rev().find(|e| e.key == "cam-a").unwrap().event.clone();
    let fb = Feedback { event_id: ev.event_id.clone(), label: Label::Defect, who: "mes".into(), cells: vec![] };
    produce(&brokers(), &feedback_topic, "cam-a", &kensa_publish::feedback::encode_feedback(&fb, 0));
    assert!(
        wait_for(Duration::from_secs(60), || {
            metric(&a.scrape(), "kensa_bank_learning_total", &[("product", "disc"), ("change", "defect")]) == Some(1.0)
        }),
        "the feedback topic's answer was learned\n{}",
        a.log_text()
    );
    let v2 = bank_version(&bank);
    assert_ne!(v2, v1);
    assert!(wait_for(Duration::from_secs(30), || {
        metric(&b.scrape(), "kensa_bank_info", &[("product", "disc"), ("version", v2.as_str())]) == Some(1.0)
    }));
    let text = a.scrape();
    assert_eq!(metric(&text, "kensa_bank_learning_total", &[("change", "added_operator")]), Some(1.0));
    assert!(metric(&text, "kensa_feedback_total", &[("result", "duplicate")]).unwrap_or(0.0) >= 1.0);
    assert!(metric(&text, "kensa_frames_held", &[("product", "disc")]).unwrap_or(0.0) >= 1.0);
    // The log lists the enrolled version and both learned ones.
    let log = String::from_utf8_lossy(&kensa_ok(&["bank", "log", bank.to_str().unwrap()]).stdout).into_owned();
    for v in [&enrolled[..12], &v1, &v2] {
        assert!(log.contains(v), "{v} in\n{log}");
    }
    // Both stop cleanly (two daemons and a broker on two busy cores: give them time).
    let (ca, cb) = (a.terminate(Duration::from_secs(120)), b.terminate(Duration::from_secs(120)));
    assert_eq!(ca, Some(0), "daemon a: {}", a.log_text());
    assert_eq!(cb, Some(0), "daemon b: {}", b.log_text());
}

#[test]
fn answers_beyond_localhost_need_the_token() {
    let (dir, bank, topic, _) = rig("learn-token");
    let port = free_port();
    let (listen, local) = (format!("0.0.0.0:{port}"), format!("127.0.0.1:{port}"));
    let mut c = base_config(&bank, &topic, &brokers(), &listen);
    c.products.get_mut("disc").unwrap().learn = LearnMode::Feedback;
    c.cameras.push(synthetic_camera("cam", 1, 0, 2.0, 0.3));
    // No token configured: nobody may answer through a listener open beyond localhost.
    let mut d = Daemon::start(&write_config(dir.path(), &c), &[], &local);
    d.scrape();
    let (code, r) = post_feedback(&local, "cam/x/1", "normal", None);
    assert_eq!(code, 403, "{r}");
    assert!(r["error"].as_str().unwrap().contains("telemetry.token"), "{r}");
    assert_eq!(d.terminate(Duration::from_secs(60)), Some(0));
    // With a token (from the environment): without it or with another, refused; with it, heard.
    c.telemetry.token = Some("${KENSA_TEST_TOKEN}".into());
    c.telemetry.actions_per_s = 3;
    let secret = "correct-horse-battery-staple";
    let mut d = Daemon::start_with_env(&write_config(dir.path(), &c), &[], &local, &[("KENSA_TEST_TOKEN", secret)]);
    d.scrape();
    assert_eq!(post_feedback(&local, "cam/x/1", "normal", None).0, 401);
    assert_eq!(post_feedback(&local, "cam/x/1", "normal", Some("wrong-token-wrong-token")).0, 401);
    assert_eq!(post_feedback(&local, "cam/x/1", "normal", Some(secret)).0, 404, "heard: that frame is not held");
    // Rate-limited: a burst past actions_per_s (10 at once against 3 per second) is refused
    // with 429.
    let burst: Vec<_> = (0..10)
        .map(|_| {
            let local = local.clone();
            std::thread::spawn(move || post_feedback(&local, "cam/x/1", "normal", Some(secret)).0)
        })
        .collect();
    let codes: Vec<u16> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(codes.contains(&429), "{codes:?}");
    assert!(!d.log_text().contains(secret), "the token never reaches the log");
    assert_eq!(d.terminate(Duration::from_secs(60)), Some(0));
}

#[test]
fn replay_scores_a_stream_with_the_daemons_learning_and_versions_roll_back() {
    let dir = TempDir::new("replay");
    let line = dir.path().join("line");
    synth(&line, &["--count", "16", "--train", "1", "--seed", "21", "--defect-rate", "0.4"]);
    let bank = dir.path().join("disc.kbank");
    enroll("disc", &line.join("train/good"), &bank, &[]);
    let enrolled = bank_version(&bank);
    let mut frames: Vec<std::path::PathBuf> = Vec::new();
    for kind in std::fs::read_dir(line.join("test")).unwrap() {
        frames.extend(std::fs::read_dir(kind.unwrap().path()).unwrap().map(|e| e.unwrap().path()));
    }
    frames.sort_by_key(|p| p.file_name().unwrap().to_owned());
    let answers: String = frames
        .iter()
        .map(|p| {
            let kind = p.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned();
            format!("{} {}\n", p.display(), if kind == "good" { "normal" } else { "defect" })
        })
        .collect();
    let ops = dir.path().join("operator.txt");
    std::fs::write(&ops, answers).unwrap();
    let frame_args: Vec<&str> = frames.iter().map(|p| p.to_str().unwrap()).collect();
    let learned = dir.path().join("learned.kbank");
    let out = dir.path().join("fb");
    let mut args =
        vec!["replay", "--bank", bank.to_str().unwrap(), "--out", out.to_str().unwrap(), "--learn", "feedback"];
    args.extend(["--operator", ops.to_str().unwrap(), "--save-bank", learned.to_str().unwrap()]);
    args.extend(&frame_args);
    kensa_ok(&args);
    // The first frame is scored exactly as `kensa score` scores it, with the enrolled bank.
    let single = dir.path().join("single");
    kensa_ok(&["score", "--bank", bank.to_str().unwrap(), "--out", single.to_str().unwrap(), frame_args[0]]);
    let stem = frames[0].file_stem().unwrap().to_string_lossy().into_owned();
    let r0 = read_json(&out.join(format!("{stem}.json")));
    let s0 = read_json(&single.join(format!("{stem}.json")));
    for k in s0.as_object().unwrap().keys() {
        assert_eq!(r0[k], s0[k], "key {k}: replay writes what score writes");
    }
    assert_eq!(r0["bank_version"], enrolled[..12]);
    assert!(out.join(format!("{stem}_map.npy")).is_file());
    // Every flagged frame was answered; each answer is a new version, used from the next
    // frame on (never for the frame that caused it).
    let versions: Vec<String> = frames
        .iter()
        .map(|p| {
            read_json(&out.join(format!("{}.json", p.file_stem().unwrap().to_string_lossy())))["bank_version"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let flagged: Vec<usize> = frames
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            read_json(&out.join(format!("{}.json", p.file_stem().unwrap().to_string_lossy())))["anomalous"] == true
        })
        .map(|(i, _)| i)
        .collect();
    assert!(!flagged.is_empty(), "a 40 % defect line flags something");
    for &i in &flagged {
        if i + 1 < versions.len() {
            assert_ne!(versions[i + 1], versions[i], "the answer to frame {i} made a version the next frame uses");
        }
    }
    let log = String::from_utf8_lossy(&kensa_ok(&["bank", "log", learned.to_str().unwrap()]).stdout).into_owned();
    assert!(log.lines().next().unwrap().starts_with('*'), "the newest is current:\n{log}");
    // Roll the learned bank back to the enrolled version; the daemon would reload it.
    kensa_ok(&["bank", "rollback", learned.to_str().unwrap(), "--to", &enrolled[..8]]);
    let log = String::from_utf8_lossy(&kensa_ok(&["bank", "log", learned.to_str().unwrap()]).stdout).into_owned();
    assert!(log.lines().next().unwrap().contains(&format!("rolled back to {}", &enrolled[..12])), "{log}");
    // Learning off writes the same first frame and never changes the version.
    let off = dir.path().join("off");
    let mut args = vec!["replay", "--bank", bank.to_str().unwrap(), "--out", off.to_str().unwrap()];
    args.extend(&frame_args);
    kensa_ok(&args);
    let summary = std::fs::read_to_string(off.join("summary.csv")).unwrap();
    assert_eq!(summary.lines().count(), frames.len() + 1);
    assert!(summary.lines().skip(1).all(|l| l.contains(&enrolled[..12])), "{summary}");
    // A bad operator file is a clear error naming the line.
    std::fs::write(&ops, "x.png maybe\n").unwrap();
    let bad = kensa(&[
        "replay",
        "--bank",
        bank.to_str().unwrap(),
        "--out",
        off.to_str().unwrap(),
        "--operator",
        ops.to_str().unwrap(),
        frame_args[0],
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("operator.txt:1"), "{bad:?}");
}
