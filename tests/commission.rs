//! Commissioning a line live (issue #20): the daemon starts while a product has no bank yet
//! (its camera is `waiting_for_bank`: frames arrive, none is scored, not an error);
//! `kensa check --probe` opens every camera for one frame; `kensa capture` saves references
//! through the camera's own pipeline; `kensa enroll` makes the bank, the daemon picks it up
//! and the camera is scored. RTSP (a real GStreamer RTSP server) is probed and captured too.

use kensa_tests::*;
use std::process::Command;
use std::time::Duration;

fn kensa_out(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(kensa_bin()).args(args).output().expect("kensa");
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Writes the config, runs `kensa check --probe` on it (which must pass) and returns the config
/// path and what check printed.
fn probed(dir: &std::path::Path, c: &kensa_core::config::KensaConfig) -> (std::path::PathBuf, String) {
    let cfg = write_config(dir, c);
    let (code, text) = kensa_out(&["check", "--config", cfg.to_str().unwrap(), "--probe"]);
    assert_eq!(code, Some(0), "{text}");
    (cfg, text)
}

/// `kensa capture` of `count` frames from `camera` into `out` (which must succeed); what it printed.
fn capture(cfg: &str, camera: &str, count: u32, out: &std::path::Path, extra: &[&str]) -> String {
    let count = count.to_string();
    let args = [
        &["capture", "--config", cfg, "--camera", camera, "--count", &count, "--out", out.to_str().unwrap()][..],
        extra,
    ];
    let (code, text) = kensa_out(&args.concat());
    assert_eq!(code, Some(0), "{text}");
    text
}

fn health(metrics: &str) -> serde_json::Value {
    http_get(metrics, "/healthz").ok().and_then(|(_, b)| serde_json::from_str(&b).ok()).unwrap_or_default()
}

#[test]
fn a_line_is_commissioned_live_from_capture_to_scoring() {
    let (dir, _, topic, metrics) = rig("commission");
    let bank = dir.path().join("banks/disc.kbank");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.model.bank_poll_s = 1;
    let mut cam = synthetic_camera("cam", 21, 0, 8.0, 0.3);
    (cam.width, cam.height) = (200, 160);
    cam.policy = Some(kensa_core::config::FullPolicy::Drop);
    c.cameras.push(cam);
    let (cfg, text) = probed(dir.path(), &c);
    let cfg_s = cfg.to_str().unwrap();
    assert!(text.contains("camera cam: delivers 200x160 RGB"), "{text}");
    assert!(text.contains("source caps: video/x-raw"), "the source's own caps are reported: {text}");
    assert!(text.contains("product disc: waiting for bank"), "{text}");

    // The daemon starts without the bank: the camera waits, nothing is scored, it is ready.
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let waiting =
        wait_for(Duration::from_secs(90), || health(&metrics)["cameras"]["cam"]["state"] == "waiting_for_bank");
    assert!(waiting, "{}\n{}", health(&metrics), d.log_text());
    let m = d.scrape();
    assert!(metric(&m, "kensa_frames_dropped_total", &[("camera", "cam"), ("reason", "no_bank")]).unwrap_or(0.0) > 0.0);
    assert_eq!(metric(&m, "kensa_frames_scored_total", &[]).unwrap_or(0.0), 0.0, "{m}");
    assert_eq!(http_get(&metrics, "/readyz").unwrap().0, 200, "a camera waiting for its bank is not a failure");

    // References through the camera's own pipeline, then the bank.
    let refs = dir.path().join("captured");
    let text = capture(cfg_s, "cam", 3, &refs, &["--every-ms", "200"]);
    assert!(text.contains("saved 3 frame(s) of 200x160 from camera cam"), "{text}");
    assert!(text.contains(&format!("next: kensa enroll --product disc --images {}", refs.display())), "{text}");
    let pngs: Vec<_> = std::fs::read_dir(&refs).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(pngs.len(), 3);
    for p in &pngs {
        let img = image::open(p).unwrap();
        assert_eq!((img.width(), img.height()), (200, 160), "exactly what scoring sees");
    }
    let out = enroll("disc", &refs, &bank, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The daemon loads it (file watch) and the camera is scored and published.
    let scored = wait_for(Duration::from_secs(120), || {
        metric(&d.scrape(), "kensa_frames_scored_total", &[("camera", "cam")]).unwrap_or(0.0) >= 3.0
    });
    assert!(scored, "{}\n{}", d.scrape(), d.log_text());
    assert_eq!(health(&metrics)["cameras"]["cam"]["state"], "up");
    let got = consume(&brokers(), &topic, 3, Duration::from_secs(60)).unwrap();
    assert!(got.len() >= 3);
    assert_eq!(d.terminate(Duration::from_secs(60)), Some(0), "{}", d.log_text());

    // A camera that cannot deliver fails the probe with a clear error, exit 2.
    let mut broken = c.clone();
    broken.cameras = vec![folder_camera("gone", &dir.path().join("no-such-folder"))];
    let cfg2 = write_config(dir.path(), &broken);
    let (code, text) = kensa_out(&["check", "--config", cfg2.to_str().unwrap(), "--probe", "--probe-timeout-s", "5"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("camera gone"), "{text}");
    let (code, text) = kensa_out(&["capture", "--config", cfg_s, "--camera", "nope", "--out", "/tmp/x"]);
    assert_eq!(code, Some(1));
    assert!(text.contains("no camera `nope`") && text.contains("cameras: gone"), "{text}");
}

#[test]
fn rtsp_cameras_in_h264_and_h265_are_probed_and_captured_through_their_pipelines() {
    if !rtsp_server_available() {
        eprintln!("SKIP: needs python3-gi, gir1.2-gst-rtsp-server-1.0 and x264enc (scripts/setup.sh installs them)");
        return;
    }
    let (p264, p265) = (free_port(), free_port());
    let _s264 = RtspServer::start(p264).expect("RTSP server starts");
    let _s265 = RtspServer::start_with(p265, "h265").expect("H.265 RTSP server starts");
    let (dir, bank, topic, metrics) = rig("commission-rtsp");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    let mut cam = rtsp_camera("ipcam", &format!("rtsp://127.0.0.1:{p264}/line"), 50);
    (cam.width, cam.height) = (160, 120);
    c.cameras.push(cam);
    let mut hevc = rtsp_camera("hevc", &format!("rtsp://127.0.0.1:{p265}/line"), 50);
    (hevc.width, hevc.height) = (160, 120);
    if let kensa_core::config::SourceConfig::Rtsp { codec, .. } = &mut hevc.source {
        *codec = kensa_core::config::RtspCodec::H265;
    }
    c.cameras.push(hevc);
    let (cfg, text) = probed(dir.path(), &c);
    let cfg_s = cfg.to_str().unwrap();
    assert!(text.contains("camera ipcam: delivers 160x120 RGB"), "{text}");
    assert!(text.contains("camera hevc: delivers 160x120 RGB"), "H.265: {text}");
    assert_eq!(text.matches("source caps: video/x-raw").count(), 2, "the decoded streams' caps: {text}");
    let refs = dir.path().join("captured");
    let text = capture(cfg_s, "ipcam", 2, &refs, &[]);
    assert_eq!(std::fs::read_dir(&refs).unwrap().count(), 2, "{text}");
}

#[test]
fn gige_cameras_negotiate_their_pixel_format_and_take_exposure_and_gain() {
    let Some(fake) = FakeGigeCamera::start() else {
        eprintln!("SKIP: needs aravis-tools (arv-fake-gv-camera-0.8) and aravissrc (scripts/setup.sh installs them)");
        return;
    };
    let (dir, bank, topic, metrics) = rig("commission-gige");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    // The simulated camera streams Bayer by default and also offers Mono8.
    c.cameras.push(gige_camera("auto", "127.0.0.1"));
    let mut mono = gige_camera("mono", "127.0.0.1");
    if let kensa_core::config::SourceConfig::Gige { settings, .. } = &mut mono.source {
        settings.pixel_format = kensa_core::config::PixelFormat::Mono8;
        settings.exposure_us = Some(5000.0);
        settings.gain_db = Some(2.0);
    }
    c.cameras.push(mono);
    let (cfg, text) = probed(dir.path(), &c);
    let cfg_s = cfg.to_str().unwrap();
    assert!(text.contains("camera auto: delivers 256x256 RGB"), "{text}");
    assert!(text.contains("GigE pixel format: Bayer, demosaiced"), "auto found the Bayer mosaic: {text}");
    assert!(text.contains("camera mono: delivers 256x256 RGB"), "{text}");
    assert!(text.contains("source caps: video/x-bayer"), "auto's source sends Bayer: {text}");
    assert!(text.contains("source caps: video/x-raw, format=(string)GRAY8"), "mono's source sends GRAY8: {text}");
    assert!(text.contains("format=GRAY8") && text.contains("exposure=5000") && text.contains("gain=2"), "{text}");
    let out = dir.path().join("mono-refs");
    let text = capture(cfg_s, "mono", 2, &out, &[]);
    drop(fake);
    assert!(text.contains("saved 2 frame(s)"), "{text}");
    let img = image::open(std::fs::read_dir(&out).unwrap().next().unwrap().unwrap().path()).unwrap().to_rgb8();
    assert!(img.pixels().all(|p| p[0] == p[1] && p[1] == p[2]), "Mono8 frames are grey");
}
