//! The tests' configs are [`KensaConfig`] values written by `write_config`: every field survives
//! the trip through TOML and `KensaConfig::load`, and the camera builders mean what the same
//! cameras written by hand mean (no broker needed), and the CLI's config and error handling
//! (the binary).

use kensa_core::config::{FullPolicy, JudgeMode, KensaConfig, ProductConfig, SourceConfig, StoreWhich};
use kensa_tests::*;

/// The value as TOML, for comparing configs (`KensaConfig` has no `PartialEq`).
fn text(c: &KensaConfig) -> String {
    toml::to_string(c).unwrap()
}

#[test]
fn every_field_round_trips_through_load() {
    let dir = TempDir::new("config-roundtrip");
    let file = |name: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, b"x").unwrap();
        p
    };
    let mut c = base_config(&file("disc.kbank"), "rt", "127.0.0.1:1", &local_addr());
    c.model.backbone = Some(file("backbone.pt"));
    c.model.bank_poll_s = 0;
    c.batch.max_wait_ms = 5;
    c.kafka.control_topic = Some("rt.control".into());
    c.kafka.create_topics = false;
    c.kafka.max_message_bytes = 1400;
    c.kafka.properties.insert("message.max.bytes".into(), "1500".into());
    c.kafka.properties.insert("sasl.username".into(), "kensa".into());
    c.publish.store_dir = Some(dir.path().join("store"));
    c.control.banks_dir = Some("banks".into());
    c.publish.store = StoreWhich::All;
    c.publish.schema_registry_id = Some(7);
    c.judges.mode = JudgeMode::Both;
    c.judges.budget_per_s = 1000.0;
    c.products.get_mut("disc").unwrap().judge = Some(file("disc.judge.safetensors"));
    c.products.insert(
        "gear".into(),
        ProductConfig {
            bank: file("gear.kbank"),
            judge: Some(file("gear.judge.safetensors")),
            learn: Default::default(),
        },
    );
    let mut cam = synthetic_camera("syn", 5, 8, 2.5, 0.4);
    cam.line = "L2".into();
    cam.station = "S7".into();
    cam.policy = Some(FullPolicy::Drop);
    cam.product = "gear".into();
    c.cameras.push(cam);
    c.cameras
        .push(camera("phase", SourceConfig::Synthetic { seed: 1, count: 0, fps: 10.0, defect_rate: 0.1, phase: 0.5 }));
    c.cameras.push(folder_camera("folder", &dir.path().join("folder")));
    let mut video = video_camera("video", &dir.path().join("clip.avi"));
    (video.width, video.height) = (160, 120);
    c.cameras.push(video);
    let mut rtsp = rtsp_camera("rtsp", "rtsp://127.0.0.1:1/line", 50);
    (rtsp.reconnect_initial_ms, rtsp.reconnect_max_s, rtsp.reconnect_fail_after) = (100, 1, 3);
    c.cameras.push(rtsp);
    c.cameras.push(gige_camera("gige", "127.0.0.1"));
    c.cameras.push(camera("usb", SourceConfig::V4l2 { device: "/dev/video0".into() }));

    let path = write_config(dir.path(), &c);
    let loaded =
        KensaConfig::load(&path).unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&path).unwrap()));
    // `load` resolves the relative paths (the outbox's default, the banks folder) against the
    // config's folder.
    c.outbox.dir = dir.path().join("kensa-outbox");
    c.control.banks_dir = Some(dir.path().join("banks"));
    assert_eq!(text(&loaded), text(&c));
}

/// The builders give what the cameras the tests used to write by hand gave (loader defaults
/// included): a synthetic source's defect rate defaults to 0.2, an RTSP latency to 200 ms.
#[test]
fn camera_builders_match_hand_written_tables() {
    let written = r#"
[[cameras]]
id = "c"
product = "disc"
source = { kind = "synthetic", count = 3 }

[[cameras]]
id = "endless"
product = "disc"
source = { kind = "synthetic", seed = 3, fps = 10, defect_rate = 0.2 }

[[cameras]]
id = "ghost"
product = "disc"
reconnect_initial_ms = 100
reconnect_max_s = 1
reconnect_fail_after = 3
source = { kind = "rtsp", url = "rtsp://127.0.0.1:1/none" }

[[cameras]]
id = "folder"
product = "disc"
source = { kind = "image_folder", path = "/data/folder" }

[[cameras]]
id = "video"
product = "disc"
width = 160
height = 120
source = { kind = "video_file", path = "/data/clip.avi" }

[[cameras]]
id = "gige"
product = "disc"
source = { kind = "gige", camera = "127.0.0.1" }
"#;
    let hand = KensaConfig::from_toml_str(written).unwrap();
    let mut built = KensaConfig::default();
    built.cameras.push(synthetic_camera("c", 0, 3, 0.0, 0.2));
    built.cameras.push(synthetic_camera("endless", 3, 0, 10.0, 0.2));
    let mut ghost = rtsp_camera("ghost", "rtsp://127.0.0.1:1/none", 200);
    (ghost.reconnect_initial_ms, ghost.reconnect_max_s, ghost.reconnect_fail_after) = (100, 1, 3);
    built.cameras.push(ghost);
    built.cameras.push(folder_camera("folder", "/data/folder".as_ref()));
    let mut video = video_camera("video", "/data/clip.avi".as_ref());
    (video.width, video.height) = (160, 120);
    built.cameras.push(video);
    built.cameras.push(gige_camera("gige", "127.0.0.1"));
    assert_eq!(text(&built), text(&hand));
}

#[test]
fn cli_errors_are_json_with_log_format_json_and_the_default_config_path_is_named() {
    let out = kensa(&["--log-format", "json", "check", "--config", "/nonexistent/kensa.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line: serde_json::Value = serde_json::from_str(err.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {err}"));
    assert_eq!(line["level"], "ERROR", "{line}");
    assert!(line["fields"]["error"].as_str().unwrap_or_default().contains("/nonexistent/kensa.toml"), "{line}");
    // A command line clap refuses is one JSON line too (exit 2), naming what it refused.
    let out = kensa(&["--log-format", "json", "check", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let line: serde_json::Value = serde_json::from_str(err.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {err}"));
    assert!(line["fields"]["error"].as_str().unwrap_or_default().contains("--no-such-flag"), "{line}");
    // Without --config or KENSA_CONFIG: the default path, named in the error.
    let out = std::process::Command::new(kensa_bin()).arg("check").env_remove("KENSA_CONFIG").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/etc/kensa/kensa.toml"), "{out:?}");
    // --device and --precision list their values.
    let help = String::from_utf8_lossy(&kensa(&["enroll", "--help"]).stdout).into_owned();
    assert!(help.contains("[possible values: auto, cpu, cuda]"), "{help}");
    assert!(help.contains("[possible values: auto, fp32, fp16, bf16]"), "{help}");
}

#[test]
fn kensa_config_names_the_file_that_check_and_run_read() {
    let dir = TempDir::new("kensa-config-env");
    let bank = dir.path().join("banks/missing.kbank");
    let mut c = base_config(&bank, "env", "127.0.0.1:1", &local_addr());
    c.cameras.push(synthetic_camera("cam", 1, 3, 0.0, 0.2));
    let good = write_config(dir.path(), &c);
    let text = std::fs::read_to_string(&good).unwrap();
    let with_env = |args: &[&str], file: &std::path::Path| {
        let out = std::process::Command::new(kensa_bin()).args(args).env("KENSA_CONFIG", file).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // A valid file whose bank does not exist yet: read from KENSA_CONFIG, the bank reported.
    let (code, err) = with_env(&["check"], &good);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains(&format!("{}: ok", good.display())), "{err}");
    assert!(err.contains(&format!("waiting for bank {}", bank.display())), "{err}");
    // A bad key, and a camera naming a product the file does not have: errors naming the file.
    let bad_key = dir.path().join("bad-key.toml");
    std::fs::write(&bad_key, format!("no_such_key = 1\n{text}")).unwrap();
    let bad_product = dir.path().join("bad-product.toml");
    std::fs::write(&bad_product, text.replace(r#"product = "disc""#, r#"product = "gear""#)).unwrap();
    assert_ne!(std::fs::read_to_string(&bad_product).unwrap(), text);
    for (file, what) in [(&bad_key, "no_such_key"), (&bad_product, "gear")] {
        for cmd in ["check", "run"] {
            let (code, err) = with_env(&[cmd], file);
            assert_eq!(code, Some(1), "kensa {cmd} with KENSA_CONFIG={}: {err}", file.display());
            assert!(err.contains(&file.display().to_string()), "kensa {cmd}: the error names the file: {err}");
            assert!(err.contains(what), "kensa {cmd}: the error names {what}: {err}");
        }
    }
    // --config wins over KENSA_CONFIG.
    let (code, err) = with_env(&["check", "--config", good.to_str().unwrap()], &bad_key);
    assert_eq!(code, Some(0), "{err}");
}
