//! Outside input is untrusted (issue #19): hand-edited or impossible banks, control commands
//! naming made-up products or special files, event camera ids that try to leave a folder, and
//! a second daemon on the same outbox. Each against a real daemon and the real broker.

use kensa_tests::*;
use std::path::Path;
use std::time::Duration;

/// Changes one digit of the calibration's image threshold inside the bank file's metadata, in
/// place (same length, so the file stays a valid safetensors file): what a hand edit does.
fn edit_threshold(bank: &Path) {
    let mut b = std::fs::read(bank).unwrap();
    let key = b"image_threshold";
    let start = b.windows(key.len()).position(|w| w == key).expect("the bank has a calibration") + key.len();
    // The first digit after the decimal point of its value.
    let dot = start + b[start..].iter().position(|&c| c == b'.').unwrap();
    let at = dot + 1;
    assert!(b[at].is_ascii_digit());
    b[at] = if b[at] == b'9' { b'1' } else { b'9' };
    std::fs::write(bank, b).unwrap();
}

#[test]
fn an_edited_bank_is_refused_at_reload_and_the_old_one_keeps_scoring() {
    let (dir, bank, topic, metrics) = rig("tamper");
    let mut cfg = base_config(&bank, &topic, &brokers(), &metrics);
    cfg.model.bank_poll_s = 1;
    cfg.cameras.push(synthetic_camera("cam", 3, 0, 8.0, 0.3));
    let d = Daemon::start(&write_config(dir.path(), &cfg), &[], &metrics);
    let scored = |d: &Daemon| metric(&d.scrape(), "kensa_frames_scored_total", &[]).unwrap_or(0.0);
    assert!(wait_for(Duration::from_secs(60), || scored(&d) >= 3.0), "{}", d.log_text());
    edit_threshold(&bank);
    let rejected = wait_for(Duration::from_secs(20), || {
        metric(&d.scrape(), "kensa_bank_reloads_total", &[("result", "rejected")]).unwrap_or(0.0) >= 1.0
    });
    assert!(rejected, "the edited bank is rejected\n{}", d.log_text());
    assert!(d.log_text().contains("content hash mismatch"), "{}", d.log_text());
    let before = scored(&d);
    assert!(
        wait_for(Duration::from_secs(20), || scored(&d) >= before + 5.0),
        "the old bank keeps scoring\n{}",
        d.log_text()
    );
    assert_eq!(metric(&d.scrape(), "kensa_bank_reloads_total", &[("result", "ok")]), None, "nothing was swapped in");
}

#[test]
fn control_commands_cannot_name_made_up_products_or_special_files() {
    let (dir, bank, topic, metrics) = rig("control");
    let banks = dir.path().join("banks");
    std::fs::create_dir_all(&banks).unwrap();
    let control = format!("{topic}.control");
    let mut cfg = base_config(&bank, &topic, &brokers(), &metrics);
    cfg.kafka.control_topic = Some(control.clone());
    cfg.control.banks_dir = Some(banks.clone());
    cfg.cameras.push(synthetic_camera("cam", 3, 0, 5.0, 0.2));
    let d = Daemon::start(&write_config(dir.path(), &cfg), &[], &metrics);
    assert!(
        wait_for(Duration::from_secs(60), || d.log_text().contains("reading control commands")),
        "{}",
        d.log_text()
    );
    let pid = d.child.id();
    // Memory at steady state (the model warmed up), before the commands.
    assert!(wait_for(Duration::from_secs(60), || metric(&d.scrape(), "kensa_frames_scored_total", &[]).unwrap_or(0.0)
        >= 10.0));
    let rss_before = proc_status_kib(pid, "VmRSS");
    for i in 0..50 {
        produce(&brokers(), &control, "x", format!(r#"{{"camera": "cam", "product": "made-up-{i}"}}"#).as_bytes());
    }
    produce(&brokers(), &control, "x", br#"{"product": "disc", "bank": "/dev/zero"}"#);
    produce(&brokers(), &control, "x", br#"{"product": "disc", "bank": "../../etc/passwd"}"#);
    let refused = wait_for(Duration::from_secs(30), || {
        metric(&d.scrape(), "kensa_control_errors_total", &[("reason", "refused")]).unwrap_or(0.0) >= 52.0
    });
    let m = d.scrape();
    assert!(refused, "{m}\n{}", d.log_text());
    assert!(!m.contains("made-up"), "a made-up product adds no metric series");
    let rss_after = proc_status_kib(pid, "VmRSS");
    // Reading /dev/zero as a bank took 2.6 GB within 10 s before it was refused.
    assert!(rss_after < rss_before + 400.0 * 1024.0, "memory stays bounded: {rss_before} → {rss_after} KiB");
    assert!(d.log_text().contains("outside control.banks_dir"), "{}", d.log_text());
    // The daemon still inspects.
    let n = metric(&m, "kensa_frames_scored_total", &[]).unwrap_or(0.0);
    assert!(
        wait_for(Duration::from_secs(20), || metric(&d.scrape(), "kensa_frames_scored_total", &[]).unwrap_or(0.0) > n)
    );
}

#[test]
fn a_second_daemon_on_the_same_outbox_is_a_clear_start_up_error() {
    let (dir, bank, topic, metrics) = rig("lock");
    let mut cfg = base_config(&bank, &topic, &brokers(), &metrics);
    cfg.cameras.push(synthetic_camera("cam", 3, 0, 2.0, 0.2));
    let first = Daemon::start(&write_config(dir.path(), &cfg), &[], &metrics);
    assert!(wait_for(Duration::from_secs(60), || first.log_text().contains("outbox open")), "{}", first.log_text());
    let second_dir = dir.path().join("second");
    std::fs::create_dir_all(&second_dir).unwrap();
    let metrics2 = local_addr();
    cfg.telemetry.listen = metrics2.clone();
    cfg.outbox.dir = dir.path().join("kensa-outbox"); // the first daemon's (relative to its config)
    let mut second = Daemon::start(&write_config(&second_dir, &cfg), &[], &metrics2);
    assert_eq!(second.wait(Duration::from_secs(60)), Some(1), "{}", second.log_text());
    assert!(second.log_text().contains("in use by another Kensa process"), "{}", second.log_text());
}

#[test]
fn tail_never_writes_a_mask_outside_its_folder() {
    let dir = TempDir::new("tailmask");
    let topic = unique_topic("tailmask");
    let masks = dir.path().join("masks");
    create_topic(&brokers(), &topic, 1);
    let mut ev = InspectionEvent { event_id: "x/1/0".into(), camera_id: "../../escaped".into(), ..Default::default() };
    ev.mask_png = vec![1, 2, 3];
    produce(&brokers(), &topic, "k", &prost::Message::encode_to_vec(&ev));
    ev.camera_id = "fine".into();
    ev.event_id = "fine/1/0".into();
    produce(&brokers(), &topic, "k", &prost::Message::encode_to_vec(&ev));
    let out = kensa(&[
        "tail",
        "--brokers",
        &brokers(),
        "--topic",
        &topic,
        "--from-beginning",
        "--max",
        "2",
        "--idle-timeout-s",
        "20",
        "--masks",
        masks.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a safe file name"));
    let written: Vec<String> =
        std::fs::read_dir(&masks).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(written, ["fine_0.png"]);
    assert!(!dir.path().join("escaped_0.png").exists() && !Path::new("/tmp/escaped_0.png").exists());
}

#[test]
fn a_control_topic_changeover_survives_a_restart() {
    let (dir, bank, topic, metrics) = rig("keepchange");
    let control = format!("{topic}.control");
    let mut cfg = base_config(&bank, &topic, &brokers(), &metrics);
    cfg.products.insert(
        "gear".into(),
        kensa_core::config::ProductConfig { bank: bank.clone(), judge: None, learn: Default::default() },
    );
    cfg.kafka.control_topic = Some(control.clone());
    cfg.cameras.push(synthetic_camera("cam", 3, 0, 5.0, 0.2));
    let path = write_config(dir.path(), &cfg);
    let mut d = Daemon::start(&path, &[], &metrics);
    assert!(
        wait_for(Duration::from_secs(60), || d.log_text().contains("reading control commands")),
        "{}",
        d.log_text()
    );
    produce(&brokers(), &control, "cam", br#"{"camera": "cam", "product": "gear"}"#);
    let switched =
        consume_until(&brokers(), &topic, Duration::from_secs(60), |r| r.iter().any(|x| x.event.product == "gear"));
    assert!(switched.unwrap().iter().any(|x| x.event.product == "gear"), "{}", d.log_text());
    assert_eq!(d.terminate(Duration::from_secs(40)), Some(0), "{}", d.log_text());
    let before = consume_until(&brokers(), &topic, Duration::from_secs(5), |_| false).unwrap().len();

    // Restarted with the same config (which still says `disc`): the camera stays on `gear`.
    let mut d2 = Daemon::start(&path, &[], &metrics);
    let after = consume_until(&brokers(), &topic, Duration::from_secs(60), |r| r.len() >= before + 5).unwrap();
    let new: Vec<&str> = after[before..].iter().map(|x| x.event.product.as_str()).collect();
    assert!(!new.is_empty() && new.iter().all(|p| *p == "gear"), "{new:?}\n{}", d2.log_text());
    assert!(d2.log_text().contains("kept across the restart"), "{}", d2.log_text());
    assert_eq!(d2.terminate(Duration::from_secs(40)), Some(0), "{}", d2.log_text());
}
