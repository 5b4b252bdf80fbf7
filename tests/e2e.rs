//! End to end against real parts: GStreamer pipelines, libtorch scoring, a tansu broker and an
//! HTTP scrape of `/metrics`.

use kensa_tests::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[test]
fn synthetic_camera_to_kafka_end_to_end() {
    let (dir, bank, topic, metrics) = rig("e2e");
    let (n, seed, rate) = (24u64, 5u64, 0.35);
    let line = kensa_synth::Line::new(seed, rate, 256, 256);
    let defective: BTreeSet<u64> = (0..n).filter(|&i| line.defect_of(i).is_some()).collect();
    assert!(defective.len() >= 4 && defective.len() < n as usize, "seed gives a useful mix: {defective:?}");

    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.cameras.push(synthetic_camera("line-1", seed, n, 0.0, rate));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);

    let events = consume(&brokers(), &topic, n as usize, Duration::from_secs(180)).unwrap();
    assert_eq!(events.len(), n as usize, "exactly N events\nlog:\n{}", d.log_text());
    let seqs: BTreeSet<u64> = events.iter().map(|(_, e)| e.frame_seq).collect();
    assert_eq!(seqs, (0..n).collect::<BTreeSet<_>>(), "frame numbers 0..N-1, once each");
    let mut by_seq = BTreeMap::new();
    for (key, ev) in &events {
        assert_eq!(key, "line-1", "key is the camera id");
        assert_eq!(ev.camera_id, "line-1");
        assert_eq!(ev.product, "disc");
        assert!(ev.event_id.starts_with("line-1/"));
        assert!(ev.capture_time_unix_nanos > 0 && ev.publish_time_unix_nanos >= ev.capture_time_unix_nanos);
        assert_eq!(
            kensa_core::grid::parse_answer(&ev.answer).map(|c| c.is_empty()),
            Some(!ev.anomalous),
            "{}",
            ev.answer
        );
        assert!((0.0..=1.0).contains(&ev.confidence));
        assert!(!ev.bank_version.is_empty() && ev.model_id.starts_with("efficientnet-lite0"));
        let mask = image::load_from_memory(&ev.mask_png).expect("mask decodes as PNG").to_luma8();
        assert_eq!(mask.dimensions(), (256, 256), "mask has the frame's size");
        by_seq.insert(ev.frame_seq, (ev.clone(), mask));
    }

    // Defective frames: judged anomalous, and the mask overlaps the ground truth.
    let mut hit = 0;
    for &i in &defective {
        let truth = line.sample(i).mask;
        let (ev, mask) = &by_seq[&i];
        let overlap = mask.pixels().zip(truth.pixels()).filter(|(a, b)| a.0[0] > 0 && b.0[0] > 0).count();
        if ev.anomalous && overlap > 0 {
            hit += 1;
        }
    }
    assert!(hit * 10 >= defective.len() * 9, "{hit} of {} defective frames found and localised", defective.len());
    let false_alarms = by_seq.iter().filter(|(i, (ev, _))| !defective.contains(i) && ev.anomalous).count();
    assert!(false_alarms * 5 <= n as usize - defective.len(), "{false_alarms} false alarms");

    // The defects topic holds exactly the anomalous frames.
    let anomalous: BTreeSet<u64> = by_seq.iter().filter(|(_, (e, _))| e.anomalous).map(|(i, _)| *i).collect();
    let defects = consume(&brokers(), &format!("{topic}.defects"), anomalous.len(), Duration::from_secs(30)).unwrap();
    assert_eq!(defects.iter().map(|(_, e)| e.frame_seq).collect::<BTreeSet<_>>(), anomalous);
    assert_eq!(defects.len(), anomalous.len());

    // Metrics: a real scrape, counters equal N (acknowledgements are counted as they return,
    // so wait until the last one is in).
    let mut text = String::new();
    wait_for(Duration::from_secs(30), || {
        text = d.scrape();
        metric(&text, "kensa_end_to_end_latency_seconds_count", &[("camera", "line-1")]) == Some(n as f64)
    });
    let cam = [("camera", "line-1")];
    assert_eq!(metric(&text, "kensa_frames_captured_total", &cam), Some(n as f64), "{text}");
    assert_eq!(metric(&text, "kensa_frames_scored_total", &cam), Some(n as f64));
    assert_eq!(metric(&text, "kensa_events_published_total", &[("topic", &topic)]), Some(n as f64));
    assert_eq!(metric(&text, "kensa_anomalies_total", &cam), Some(anomalous.len() as f64));
    assert_eq!(metric(&text, "kensa_end_to_end_latency_seconds_count", &cam), Some(n as f64));
    assert_eq!(metric(&text, "kensa_frames_dropped_total", &[]).unwrap_or(0.0), 0.0, "no drops");
    let (code, body) = http_get(&metrics, "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"line-1\""), "{body}");

    // SIGTERM: an orderly, successful exit.
    assert_eq!(d.terminate(Duration::from_secs(40)), Some(0), "log:\n{}", d.log_text());
}

#[test]
fn folder_and_video_cameras_deliver_every_frame_and_a_bad_camera_stops_alone() {
    let (dir, bank, topic, metrics) = rig("sources");
    // An image folder: 6 good images and one corrupt file.
    let folder = dir.path().join("folder");
    std::fs::create_dir_all(&folder).unwrap();
    let line = kensa_synth::Line::new(11, 0.0, 200, 160);
    for i in 0..6 {
        line.sample(i).image.save(folder.join(format!("img{i:02}.png"))).unwrap();
    }
    std::fs::write(folder.join("img03b.png"), b"\x89PNG\r\n\x1a\n definitely not an image").unwrap();
    // A video file made by GStreamer itself.
    let video = dir.path().join("clip.avi");
    let st = std::process::Command::new("gst-launch-1.0")
        .args(["-q", "videotestsrc", "num-buffers=15", "!", "video/x-raw,width=320,height=240,framerate=15/1"])
        .args(["!", "jpegenc", "!", "avimux", "!", "filesink"])
        .arg(format!("location={}", video.display()))
        .status()
        .expect("gst-launch-1.0 (gstreamer1.0-tools) is installed by scripts/setup.sh");
    assert!(st.success());

    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.cameras.push(folder_camera("folder", &folder));
    let mut cam = video_camera("video", &video);
    (cam.width, cam.height) = (160, 120);
    c.cameras.push(cam);
    c.cameras.push(video_camera("broken", &dir.path().join("no-such-file.avi")));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let events = consume(&brokers(), &topic, 21, Duration::from_secs(180)).unwrap();
    let count = |cam: &str| events.iter().filter(|(k, _)| k == cam).count();
    assert_eq!(count("folder"), 6, "log:\n{}", d.log_text());
    assert_eq!(count("video"), 15, "log:\n{}", d.log_text());
    assert_eq!(count("broken"), 0);
    for (_, ev) in events.iter().filter(|(k, _)| k == "video") {
        assert_eq!((ev.width, ev.height), (160, 120), "frames scaled to the camera's caps");
    }
    let text = d.scrape();
    assert_eq!(
        metric(&text, "kensa_frames_dropped_total", &[("camera", "folder"), ("reason", "corrupt_image")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "kensa_camera_errors_total", &[("camera", "broken")]), Some(1.0), "{text}");
    let (_, health) = http_get(&metrics, "/healthz").unwrap();
    assert!(health.contains("failed"), "{health}");
    let log = d.log_text();
    assert!(log.contains("img03b.png"), "the corrupt file is named in the log:\n{log}");
    assert!(
        log.contains("broken") && log.contains("no-such-file.avi"),
        "the failed camera and its path are named:\n{log}"
    );
    // A camera failed, so the exit code says so.
    assert_eq!(d.terminate(Duration::from_secs(40)), Some(2), "log:\n{}", d.log_text());
}

#[test]
fn unreachable_broker_is_a_clear_error_not_a_hang() {
    let dir = TempDir::new("nobroker");
    let bank = synthetic_bank(dir.path(), "disc");
    let dead = local_addr();
    let metrics = local_addr();
    let mut c = base_config(&bank, "t", &dead, &metrics);
    c.kafka.connect_timeout_s = 3;
    c.cameras.push(synthetic_camera("c", 0, 3, 0.0, 0.2));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let code = d.wait(Duration::from_secs(60));
    let log = d.log_text();
    assert!(matches!(code, Some(c) if c != 0), "exits non-zero, got {code:?}:\n{log}");
    assert!(log.contains(&dead) && log.contains("unreachable"), "names the brokers:\n{log}");
    assert!(log.contains("retrying"), "logs its retries:\n{log}");
}

#[test]
fn bad_config_and_missing_bank_are_named() {
    let dir = TempDir::new("badcfg");
    // A bank path that is a folder: a config error naming the key and the path.
    let folder = dir.path().join("banks");
    std::fs::create_dir_all(&folder).unwrap();
    let mut c = base_config(&folder, "t", "127.0.0.1:1", &local_addr());
    c.cameras.push(synthetic_camera("c", 0, 3, 0.0, 0.2));
    let cfg = write_config(dir.path(), &c);
    let out = kensa(&["run", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("products.disc.bank") && err.contains("is not a file"), "{err}");
    // A bank not made yet is no error: the product waits for it (named in the log); here the
    // daemon then stops because the broker is unreachable.
    let missing = dir.path().join("nowhere/disc.kbank");
    c.products.get_mut("disc").unwrap().bank = missing.clone();
    c.kafka.connect_timeout_s = 1;
    let cfg = write_config(dir.path(), &c);
    let out = kensa(&["run", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("waiting_for_bank") && err.contains(missing.to_str().unwrap()), "{err}");
    assert!(err.contains("unreachable"), "{err}");

    // A misspelt key, written by hand into the config's [batch] table.
    let mut table = toml::Table::try_from(&c).unwrap();
    table["batch"].as_table_mut().unwrap().insert("max_sise".into(), 3.into());
    std::fs::write(&cfg, toml::to_string(&table).unwrap()).unwrap();
    let out = kensa(&["run", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("max_sise") && err.contains("kensa.toml"), "{err}");

    // A file that is not a bank at all.
    let bogus = dir.path().join("bogus.kbank");
    std::fs::write(&bogus, b"hello").unwrap();
    let out = kensa(&["score", "--bank", bogus.to_str().unwrap(), "--out", dir.path().to_str().unwrap(), "x.png"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bogus.kbank") && err.contains("not a Kensa bank"), "{err}");
}
