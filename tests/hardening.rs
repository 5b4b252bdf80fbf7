//! Hardening: live cameras that come and go, signals, and hostile files.

use kensa_tests::*;
use std::collections::BTreeSet;
use std::time::Duration;

#[test]
fn rtsp_camera_reconnects_when_its_server_restarts() {
    if !rtsp_server_available() {
        eprintln!(
            "SKIP rtsp test: needs python3-gi, gir1.2-gst-rtsp-server-1.0 and x264enc (scripts/setup.sh installs them)"
        );
        return;
    }
    let port = free_port();
    let server = RtspServer::start(port).expect("RTSP server starts");
    let (dir, bank, topic, metrics) = rig("rtsp");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    let mut cam = rtsp_camera("ipcam", &format!("rtsp://127.0.0.1:{port}/line"), 50);
    (cam.width, cam.height) = (160, 120);
    (cam.reconnect_initial_ms, cam.reconnect_max_s) = (300, 2);
    c.cameras.push(cam);
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let first = consume_until(&brokers(), &topic, Duration::from_secs(90), |r| r.len() >= 10).unwrap();
    assert!(first.len() >= 10, "log:\n{}", d.log_text());
    let seq_before = first.iter().map(|r| r.event.frame_seq).max().unwrap();

    // The camera goes away: Kensa notices and says so.
    drop(server);
    let down = wait_for(Duration::from_secs(60), || {
        let m = d.scrape();
        metric(&m, "kensa_camera_up", &[("camera", "ipcam")]) == Some(0.0)
            && metric(&m, "kensa_camera_reconnects_total", &[("camera", "ipcam")]).unwrap_or(0.0) >= 1.0
    });
    assert!(down, "the outage shows in the metrics\n{}\nlog:\n{}", d.scrape(), d.log_text());
    let (_, health) = http_get(&metrics, "/healthz").unwrap();
    assert!(health.contains("reconnecting") || health.contains("failed"), "{health}");
    let m = d.scrape();
    assert!(
        metric(&m, "kensa_camera_state", &[("camera", "ipcam"), ("state", "reconnecting")]) == Some(1.0)
            || metric(&m, "kensa_camera_state", &[("camera", "ipcam"), ("state", "failed")]) == Some(1.0),
        "{m}"
    );

    // It comes back on the same address: Kensa reconnects and publishes again.
    let _server = RtspServer::start(port).expect("RTSP server restarts");
    let later = consume_until(&brokers(), &topic, Duration::from_secs(90), |r| {
        r.iter().filter(|x| x.event.frame_seq > seq_before).count() >= 10
    })
    .unwrap();
    let seqs: Vec<u64> = later.iter().map(|r| r.event.frame_seq).collect();
    assert!(seqs.iter().filter(|&&s| s > seq_before).count() >= 10, "publishing again\nlog:\n{}", d.log_text());
    assert_eq!(seqs.iter().collect::<BTreeSet<_>>().len(), seqs.len(), "no frame number twice");
    assert!(wait_for(Duration::from_secs(10), || metric(&d.scrape(), "kensa_camera_up", &[("camera", "ipcam")])
        == Some(1.0)));
    assert!(d.log_text().contains("camera reconnected"));
    assert_eq!(d.terminate(Duration::from_secs(40)), Some(0), "{}", d.log_text());
}

#[test]
fn a_live_camera_that_never_answers_is_reported_failed_and_retried_slowly() {
    let (dir, bank, topic, metrics) = rig("deadcam");
    let dead = free_port();
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    // 200 ms: the loader's default latency.
    let mut ghost = rtsp_camera("ghost", &format!("rtsp://127.0.0.1:{dead}/none"), 200);
    (ghost.reconnect_initial_ms, ghost.reconnect_max_s, ghost.reconnect_fail_after) = (100, 1, 3);
    c.cameras.push(ghost);
    c.cameras.push(synthetic_camera("ok", 0, 5, 0.0, 0.2));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    // The other camera is unaffected.
    let got = consume(&brokers(), &topic, 5, Duration::from_secs(90)).unwrap();
    assert_eq!(got.iter().filter(|(k, _)| k == "ok").count(), 5);
    assert!(
        wait_for(Duration::from_secs(30), || {
            metric(&d.scrape(), "kensa_camera_state", &[("camera", "ghost"), ("state", "failed")]) == Some(1.0)
        }),
        "{}",
        d.scrape()
    );
    // Capped backoff: over 4 s at most a handful of attempts, not a busy loop.
    let a = metric(&d.scrape(), "kensa_camera_reconnects_total", &[("camera", "ghost")]).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let b = metric(&d.scrape(), "kensa_camera_reconnects_total", &[("camera", "ghost")]).unwrap();
    assert!((1.0..=6.0).contains(&(b - a)), "{a} -> {b}");
    assert!(d.child.try_wait().unwrap().is_none());
    let _ = d.terminate(Duration::from_secs(40));
}

#[test]
fn second_sigterm_forces_exit_and_keeps_the_outbox() {
    let (mut broker, dir, bank, topic, metrics) = own_broker_rig("sig");
    let mut c = base_config(&bank, &topic, &broker.addr(), &metrics);
    c.cameras.push(synthetic_camera("c", 0, 0, 10.0, 0.2));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &["--shutdown-deadline-s", "60"], &metrics);
    consume_until(&broker.addr(), &topic, Duration::from_secs(60), |r| r.len() >= 3).unwrap();
    broker.down(); // now the drain would wait for acknowledgements
    std::thread::sleep(Duration::from_secs(2));
    signal(d.child.id(), "TERM");
    std::thread::sleep(Duration::from_secs(1));
    assert!(d.child.try_wait().unwrap().is_none(), "the first SIGTERM drains");
    let t0 = std::time::Instant::now();
    signal(d.child.id(), "TERM");
    let code = d.wait(Duration::from_secs(10));
    assert_eq!(code, Some(4), "log:\n{}", d.log_text());
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(d.log_text().contains("second signal"));
    let spool = dir.path().join("kensa-outbox");
    assert!(std::fs::read_dir(&spool).unwrap().any(|e| e.unwrap().path().extension().is_some_and(|x| x == "seg")));
}

#[test]
fn tampered_and_truncated_banks_are_named_errors() {
    let dir = TempDir::new("banks");
    let bank = synthetic_bank(dir.path(), "disc");
    let bytes = std::fs::read(&bank).unwrap();
    let img = dir.path().join("x.png");
    kensa_synth::Line::new(1, 0.0, 64, 64).sample(0).image.save(&img).unwrap();
    let out = dir.path().join("out");
    let run = |p: &std::path::Path| {
        let o = kensa(&["score", "--bank", p.to_str().unwrap(), "--out", out.to_str().unwrap(), img.to_str().unwrap()]);
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let tampered = dir.path().join("tampered.kbank");
    let mut t = bytes.clone();
    let n = t.len();
    t[n - 10] ^= 0x55; // inside the last tensor's data
    std::fs::write(&tampered, &t).unwrap();
    let (ok, err) = run(&tampered);
    assert!(!ok && err.contains("tampered.kbank") && err.contains("content hash mismatch"), "{err}");
    let truncated = dir.path().join("truncated.kbank");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, err) = run(&truncated);
    assert!(!ok && err.contains("truncated.kbank") && err.contains("not a Kensa bank"), "{err}");
    let (ok, err) = run(&bank);
    assert!(ok, "{err}");
}

/// Aravis' simulated GigE Vision camera on loopback. Opened by its address: discovery by name
/// answers on every interface, and Aravis then sets the stream destination to the first
/// non-loopback one, where the fake camera (bound to 127.0.0.1) cannot send: that is the
/// "flow error" seen when streaming by name. By address, the stream stays on loopback.
#[test]
fn gige_template_streams_from_aravis_fake_camera() {
    let Some(fake) = FakeGigeCamera::start() else {
        eprintln!("SKIP gige test: needs aravis-tools (arv-fake-gv-camera-0.8) and aravissrc (scripts/setup.sh installs them)");
        return;
    };
    let (dir, bank, topic, metrics) = rig("gige");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.cameras.push(gige_camera("gige", "127.0.0.1"));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let got = consume(&brokers(), &topic, 10, Duration::from_secs(90)).unwrap();
    drop(fake);
    assert!(got.len() >= 10, "log:\n{}", d.log_text());
    for (k, e) in &got {
        assert_eq!(k, "gige");
        assert_eq!((e.width, e.height), (256, 256), "bayer 512x512 converted and scaled to the caps");
    }
    let _ = d.terminate(Duration::from_secs(40));
}

#[test]
fn shutdown_deadline_forces_exit() {
    let (mut broker, dir, bank, topic, metrics) = own_broker_rig("deadline");
    // The drain would wait a minute for the broker; the deadline is 3 s.
    let mut c = base_config(&bank, &topic, &broker.addr(), &metrics);
    c.publish.drain_timeout_s = 60;
    c.cameras.push(synthetic_camera("c", 0, 0, 10.0, 0.2));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &["--shutdown-deadline-s", "3"], &metrics);
    consume_until(&broker.addr(), &topic, Duration::from_secs(60), |r| r.len() >= 3).unwrap();
    broker.down();
    std::thread::sleep(Duration::from_secs(2));
    let t0 = std::time::Instant::now();
    signal(d.child.id(), "TERM");
    let code = d.wait(Duration::from_secs(20));
    assert_eq!(code, Some(3), "log:\n{}", d.log_text());
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert!(d.log_text().contains("did not finish within 3s"), "{}", d.log_text());
}
