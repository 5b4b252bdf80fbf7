//! The Kafka event contract and no-loss delivery, against real tansu brokers.

use kensa_core::config::{CameraConfig, StoreWhich};
use kensa_tests::*;
use std::collections::BTreeSet;
use std::time::Duration;

/// The delivery tests' synthetic camera: seed 5, 40 % defects.
fn synthetic(id: &str, count: u64, fps: f64) -> CameraConfig {
    synthetic_camera(id, 5, count, fps, 0.4)
}

#[test]
fn every_field_of_the_contract() {
    let (dir, bank, topic, metrics) = rig("contract");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.publish.mask_max_side = 64;
    c.publish.store_dir = Some(dir.path().join("store"));
    c.publish.store = StoreWhich::All;
    c.publish.schema_registry_id = Some(7);
    let mut cam = synthetic("cam-a", 8, 0.0);
    cam.line = "L2".into();
    cam.station = "S7".into();
    c.cameras.push(cam);
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let got = consume_until(&brokers(), &topic, Duration::from_secs(120), |r| r.len() >= 8).unwrap();
    assert_eq!(got.len(), 8, "log:\n{}", d.log_text());
    let mut ids = BTreeSet::new();
    for r in &got {
        let e = &r.event;
        assert!(ids.insert(e.event_id.clone()), "event ids are unique");
        assert_eq!(r.key, "cam-a");
        assert_eq!(
            (e.camera_id.as_str(), e.product.as_str(), e.line.as_str(), e.station.as_str()),
            ("cam-a", "disc", "L2", "S7")
        );
        assert_eq!(e.event_id, format!("cam-a/{}/{}", e.event_id.split('/').nth(1).unwrap(), e.frame_seq));
        assert!(
            e.capture_time_unix_nanos > 1_700_000_000_000_000_000
                && e.publish_time_unix_nanos >= e.capture_time_unix_nanos
        );
        let stages: Vec<&str> = e.stages.iter().map(|s| s.stage.as_str()).collect();
        assert_eq!(stages, ["queue", "model", "verdict"]);
        assert!(e.stages.iter().all(|s| s.seconds >= 0.0 && s.seconds < 60.0));
        assert!(e.stages[1].seconds > 0.0, "model time is measured");
        assert_eq!(e.verdicts.len(), 1);
        assert_eq!(
            (e.verdicts[0].judge.as_str(), e.verdicts[0].anomalous, e.verdicts[0].answer.as_str()),
            ("calibrated", e.anomalous, e.answer.as_str())
        );
        assert_eq!(e.judge, "calibrated");
        assert!((0.0..=1.0).contains(&e.confidence));
        assert_eq!(kensa_core::grid::parse_answer(&e.answer).map(|c| c.len()), Some(e.locations.len()));
        assert_eq!(e.regions.is_empty(), !e.anomalous);
        for reg in &e.regions {
            assert!(reg.x0 < reg.x1 && reg.y0 < reg.y1 && reg.x1 <= 256 && reg.y1 <= 256 && reg.area > 0);
        }
        assert_eq!((e.width, e.height), (256, 256));
        assert_eq!((e.mask_width, e.mask_height), (64, 64), "mask downscaled by publish.mask_max_side");
        let mask = image::load_from_memory(&e.mask_png).unwrap();
        assert_eq!((mask.width(), mask.height()), (64, 64));
        let (rows, cols, _) =
            kensa_core::npy::read_f32_2d(std::fs::File::open(&e.map_path).expect("map stored")).unwrap();
        assert_eq!((rows, cols), (256, 256), "the stored map is full resolution");
        assert_eq!(image::open(&e.snapshot_path).expect("snapshot stored").width(), 256);
        assert_eq!(e.bank_version.len(), 12);
        assert!(e.model_id.starts_with("efficientnet-lite0@"));
        assert_eq!(e.kensa_version, env!("CARGO_PKG_VERSION"));
        // CloudEvents binary mode.
        let h = &r.headers;
        assert_eq!(h["ce_specversion"], "1.0");
        assert_eq!(h["ce_id"], e.event_id);
        assert_eq!(h["ce_type"], "com.kensa.inspection.v1");
        assert_eq!(h["ce_source"], "/kensa/L2/cam-a");
        assert!(h["ce_time"].ends_with('Z') && h["ce_time"].starts_with("20"));
        assert_eq!(h["content-type"], "application/protobuf");
        assert_eq!(h["ce_dataschema"], "kensa.v1.InspectionEvent");
    }
    assert_eq!(d.terminate(Duration::from_secs(40)), Some(0));
}

#[test]
fn broker_outage_mid_run_loses_nothing() {
    let (mut broker, dir, bank, topic, metrics) = own_broker_rig("outage");
    let n = 40;
    let mut c = base_config(&bank, &topic, &broker.addr(), &metrics);
    c.cameras.push(synthetic("cam", n, 8.0));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    // Let some events through, then pull the broker for a few seconds.
    consume_until(&broker.addr(), &topic, Duration::from_secs(60), |r| r.len() >= 5).unwrap();
    broker.down();
    std::thread::sleep(Duration::from_secs(4));
    broker.up();
    let got = consume_until(&broker.addr(), &topic, Duration::from_secs(150), |r| {
        r.iter().map(|x| &x.event.event_id).collect::<BTreeSet<_>>().len() >= n as usize
    })
    .unwrap();
    let ids: BTreeSet<&String> = got.iter().map(|x| &x.event.event_id).collect();
    let seqs: BTreeSet<u64> = got.iter().map(|x| x.event.frame_seq).collect();
    assert_eq!(ids.len(), n as usize, "every event arrives (after dedupe)\nlog:\n{}", d.log_text());
    assert_eq!(seqs, (0..n).collect());
    eprintln!("outage: {} records for {} events ({} duplicates)", got.len(), ids.len(), got.len() - ids.len());
    assert_eq!(d.terminate(Duration::from_secs(40)), Some(0), "log:\n{}", d.log_text());
}

#[test]
fn kill_9_then_restart_resends_what_was_spooled() {
    let (mut broker, dir, bank, topic, metrics) = own_broker_rig("crash");
    let mut c = base_config(&bank, &topic, &broker.addr(), &metrics);
    c.cameras.push(synthetic("cam", 0, 8.0));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let first = consume_until(&broker.addr(), &topic, Duration::from_secs(60), |r| r.len() >= 3).unwrap();
    let run1 = first[0].event.event_id.split('/').nth(1).unwrap().to_string();
    // Broker gone: events pile up in the outbox. Then Kensa is killed outright.
    broker.down();
    std::thread::sleep(Duration::from_secs(3));
    let text = d.scrape();
    let appended = metric(&text, "kensa_outbox_appended_total", &[]).unwrap_or(0.0) as u64;
    let pending = metric(&text, "kensa_outbox_events", &[]).unwrap_or(0.0) as u64;
    assert!(pending > 0, "events wait in the outbox while the broker is down:\n{text}");
    let _ = std::process::Command::new("kill").args(["-9", &d.child.id().to_string()]).status();
    let _ = d.wait(Duration::from_secs(10));
    let spool = dir.path().join("kensa-outbox");
    assert!(std::fs::read_dir(&spool).unwrap().any(|e| e.unwrap().path().extension().is_some_and(|x| x == "seg")));
    // Broker back, Kensa restarted with the same config: run 1's spooled events arrive.
    broker.up();
    let mut d2 = Daemon::start(&cfg, &[], &metrics);
    let got = consume_until(&broker.addr(), &topic, Duration::from_secs(150), |r| {
        r.iter()
            .filter(|x| x.event.event_id.split('/').nth(1) == Some(run1.as_str()))
            .map(|x| x.event.frame_seq)
            .collect::<BTreeSet<_>>()
            .len()
            >= appended as usize
    })
    .unwrap();
    let run1_seqs: BTreeSet<u64> = got
        .iter()
        .filter(|x| x.event.event_id.split('/').nth(1) == Some(run1.as_str()))
        .map(|x| x.event.frame_seq)
        .collect();
    assert!(
        (0..appended).all(|s| run1_seqs.contains(&s)),
        "every one of the {appended} events spooled before the kill arrived; got {} of run 1\nlog:\n{}",
        run1_seqs.len(),
        d2.log_text()
    );
    assert!(d2.log_text().contains("sending the events an earlier run left in the outbox"), "{}", d2.log_text());
    assert_eq!(d2.terminate(Duration::from_secs(40)), Some(0), "log:\n{}", d2.log_text());
}

#[test]
fn oversized_events_and_an_unknown_topic_are_clear_errors_without_loss_or_crash() {
    let (dir, bank, topic, metrics) = rig("oversize");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.kafka.max_message_bytes = 1400;
    c.kafka.properties.insert("message.max.bytes".into(), "1500".into());
    // Small frames fit in the limit; 1024x1024 frames with their mask and regions do not.
    for (id, side, count) in [("small", 32, 4), ("big", 1024, 3)] {
        let mut cam = synthetic(id, count, 0.0);
        (cam.width, cam.height) = (side, side);
        c.cameras.push(cam);
    }
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let got = consume(&brokers(), &topic, 4, Duration::from_secs(120)).unwrap();
    assert_eq!(got.iter().filter(|(k, _)| k == "small").count(), 4, "log:\n{}", d.log_text());
    assert_eq!(got.iter().filter(|(k, _)| k == "big").count(), 0);
    // The big frames take longer to score: wait for all three to be judged and rejected.
    let mut m = String::new();
    wait_for(Duration::from_secs(60), || {
        m = d.scrape();
        metric(&m, "kensa_events_rejected_total", &[("reason", "too_large")]) == Some(3.0)
    });
    assert_eq!(metric(&m, "kensa_events_rejected_total", &[("reason", "too_large")]), Some(3.0), "{m}");
    let rejected = dir.path().join("kensa-outbox/rejected");
    let kept = std::fs::read_dir(&rejected)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "bin")
        .count();
    assert_eq!(kept, 3, "rejected events are kept on disk");
    assert!(d.log_text().contains("over kafka.max_message_bytes"), "{}", d.log_text());
    assert_eq!(d.terminate(Duration::from_secs(40)), Some(0));

    // Unknown topic, not created: errors are counted, events stay spooled, Kensa keeps running.
    let dir2 = TempDir::new("unknown-topic");
    let metrics = local_addr();
    let topic = unique_topic("never-created");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.kafka.create_topics = false;
    c.kafka.message_timeout_ms = 3000;
    c.cameras.push(synthetic("c", 3, 0.0));
    let cfg = write_config(dir2.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let t0 = std::time::Instant::now();
    let errors = loop {
        let m = d.scrape();
        let e = metric(&m, "kensa_publish_errors_total", &[]).unwrap_or(0.0);
        if e > 0.0 || t0.elapsed() > Duration::from_secs(60) {
            break (e, m);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(errors.0 > 0.0, "publish errors are counted:\n{}\nlog:\n{}", errors.1, d.log_text());
    let by = |r: &str| metric(&errors.1, "kensa_publish_errors_total", &[("reason", r)]).unwrap_or(0.0);
    assert!(by("unknown_topic") + by("timed_out") > 0.0, "counted under its reason: {}", errors.1);
    assert!(d.log_text().contains(&format!("Kafka topic {topic} does not exist")), "{}", d.log_text());
    assert!(d.child.try_wait().unwrap().is_none(), "still running");
    assert!(metric(&errors.1, "kensa_outbox_events", &[]).unwrap_or(0.0) > 0.0, "the events wait in the outbox");
    let code = d.terminate(Duration::from_secs(60));
    assert_eq!(code, Some(0), "log:\n{}", d.log_text());
    assert!(d.log_text().contains("stay in the outbox"), "{}", d.log_text());
}

#[test]
fn python_consumer_example_round_trip() {
    let py = std::env::var("KENSA_CACHE")
        .map(|c| std::path::PathBuf::from(c).join("venv/bin/python"))
        .unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&py)
        .args(["-c", "import confluent_kafka, google.protobuf"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP python_consumer_example_round_trip: {} lacks confluent-kafka/protobuf (scripts/setup.sh installs them)", py.display());
        return;
    }
    let (dir, bank, topic, metrics) = rig("pyconsumer");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.publish.schema_registry_id = Some(3);
    c.cameras.push(synthetic("cam", 6, 0.0));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &["--exit-when-done"], &metrics);
    assert_eq!(d.wait(Duration::from_secs(120)), Some(0), "log:\n{}", d.log_text());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/consumers/python/consume.py");
    let out = std::process::Command::new(&py)
        .arg(script)
        .args(["--brokers", &brokers(), "--topic", &topic, "--from-beginning", "--max", "6", "--idle-timeout-s", "20"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6);
    let seqs: BTreeSet<u64> = lines
        .iter()
        .map(|l| l["frame_seq"].as_str().map(|s| s.parse().unwrap()).or(l["frame_seq"].as_u64()).unwrap_or(0))
        .collect();
    assert_eq!(seqs, (0..6).collect(), "{lines:?}");
    for l in &lines {
        assert_eq!(l["key"], "cam");
        assert_eq!(l["camera_id"], "cam");
        assert_eq!(l["ce_type"], "com.kensa.inspection.v1");
        assert_eq!(l["ce_id"], l["event_id"]);
        assert!(l["answer"].as_str().unwrap().contains("anomal"));
    }
}

#[test]
fn go_consumer_example_builds_where_go_is_present() {
    let go = std::process::Command::new("go").arg("version").output();
    if !go.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIP go_consumer_example_builds_where_go_is_present: no Go toolchain on this machine (tools/consumers/go/main.go is documented, not run here)");
        return;
    }
    // With Go present, vet the example's syntax and imports (module download needs its proxy).
    let out = std::process::Command::new("gofmt")
        .args(["-l", concat!(env!("CARGO_MANIFEST_DIR"), "/tools/consumers/go/main.go")])
        .output()
        .expect("gofmt");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
