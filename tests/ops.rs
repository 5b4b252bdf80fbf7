//! Operations: hot reload and changeover while frames flow, health endpoints, and the deploy
//! files (dashboard and alert rules query metrics that really exist; manifests parse).

use kensa_core::config::{CameraConfig, ProductConfig};
use kensa_tests::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A second bank, from other references, so its version differs.
fn other_bank(dir: &Path, name: &str, seed: &str) -> PathBuf {
    let refs = dir.join(format!("refs-{name}"));
    synth(&refs, &["--count", "0", "--train", "3", "--seed", seed]);
    let bank = dir.join(format!("{name}.kbank"));
    enroll(name, &refs.join("train/good"), &bank, &[]);
    bank
}

/// A synthetic camera that runs until stopped, at 10 fps.
fn endless(id: &str) -> CameraConfig {
    synthetic_camera(id, 3, 0, 10.0, 0.2)
}

#[test]
fn bank_swap_while_frames_flow_loses_no_frame_and_a_bad_bank_is_rejected() {
    let (dir, bank, topic, metrics) = rig("reload");
    let next = other_bank(dir.path(), "next", "7");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.model.bank_poll_s = 1;
    c.cameras.push(endless("cam"));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let before = consume_until(&brokers(), &topic, Duration::from_secs(60), |r| r.len() >= 5).unwrap();
    let v1 = before[0].event.bank_version.clone();
    // Swap the bank file atomically (write beside, rename over), as an operator's tooling would.
    let tmp = dir.path().join("disc.kbank.new");
    std::fs::copy(&next, &tmp).unwrap();
    std::fs::rename(&tmp, &bank).unwrap();
    let got = consume_until(&brokers(), &topic, Duration::from_secs(60), |r| {
        r.iter().filter(|x| x.event.bank_version != v1).count() >= 5
    })
    .unwrap();
    let v2 = got.iter().map(|x| x.event.bank_version.clone()).find(|v| *v != v1).expect("the new version appears");
    // A corrupt bank: rejected, the current one keeps running.
    std::fs::write(&bank, b"this is not a bank").unwrap();
    assert!(wait_for(Duration::from_secs(20), || d.log_text().contains("new bank rejected")), "{}", d.log_text());
    let n_before = got.len();
    let after = consume_until(&brokers(), &topic, Duration::from_secs(60), |r| r.len() >= n_before + 10).unwrap();
    assert!(after[n_before..].iter().all(|x| x.event.bank_version == v2), "frames after the bad bank still use {v2}");
    let m = d.scrape();
    // precision = "auto" (the default): bf16 on a CPU with AMX when its export exists.
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let native =
        flags.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "amx_bf16"));
    let exported = std::env::var("KENSA_BACKBONE_BF16").is_ok_and(|p| std::path::Path::new(&p).is_file());
    let want = if native && exported { "bf16" } else { "fp32" };
    assert_eq!(metric(&m, "kensa_model_info", &[("precision", want)]), Some(1.0), "{m}");
    assert_eq!(metric(&m, "kensa_bank_info", &[("product", "disc"), ("version", &v2)]), Some(1.0), "{m}");
    assert_eq!(metric(&m, "kensa_bank_info", &[("product", "disc"), ("version", &v1)]), Some(0.0), "{m}");
    assert_eq!(metric(&m, "kensa_bank_reloads_total", &[("result", "ok")]), Some(1.0), "{m}");
    assert_eq!(metric(&m, "kensa_bank_reloads_total", &[("result", "rejected")]), Some(1.0), "{m}");
    assert_eq!(d.terminate(Duration::from_secs(40)), Some(0), "{}", d.log_text());
    // No frame lost across the swap: sequence numbers are contiguous.
    let all = consume_until(&brokers(), &topic, Duration::from_secs(30), |_| false).unwrap();
    let seqs: BTreeSet<u64> = all.iter().map(|x| x.event.frame_seq).collect();
    let max = *seqs.iter().next_back().unwrap();
    assert_eq!(seqs, (0..=max).collect(), "every frame from 0 to {max} was published");
    // Each frame was scored entirely by one bank: versions change once, never back.
    let mut by_seq: Vec<(u64, String)> =
        all.iter().map(|x| (x.event.frame_seq, x.event.bank_version.clone())).collect();
    by_seq.sort();
    by_seq.dedup();
    let switches = by_seq.windows(2).filter(|w| w[0].1 != w[1].1).count();
    assert_eq!(switches, 1, "{by_seq:?}");
}

#[test]
fn changeover_by_sighup_and_by_control_topic() {
    let (dir, bank, topic, metrics) = rig("changeover");
    let other = other_bank(dir.path(), "gear", "11");
    let control = format!("{topic}.control");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.products.insert("gear".into(), ProductConfig { bank: other, judge: None, learn: Default::default() });
    c.kafka.control_topic = Some(control.clone());
    c.cameras.push(endless("cam"));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    consume_until(&brokers(), &topic, Duration::from_secs(60), |r| r.len() >= 3).unwrap();
    // SIGHUP after editing the config: the camera now inspects "gear".
    c.cameras[0].product = "gear".into();
    write_config(dir.path(), &c);
    signal(d.child.id(), "HUP");
    let got = consume_until(&brokers(), &topic, Duration::from_secs(60), |r| {
        r.iter().filter(|x| x.event.product == "gear").count() >= 3
    })
    .unwrap();
    assert!(got.iter().any(|x| x.event.product == "gear"), "{}", d.log_text());
    // A control message switches it back; a malformed one is counted and ignored.
    assert!(
        wait_for(Duration::from_secs(20), || d.log_text().contains("reading control commands")),
        "{}",
        d.log_text()
    );
    produce(&brokers(), &control, "cam", b"{not json");
    produce(&brokers(), &control, "cam", br#"{"camera": "cam", "product": "disc"}"#);
    let n = got.len();
    let later = consume_until(&brokers(), &topic, Duration::from_secs(60), |r| {
        r.len() > n && r[n..].iter().filter(|x| x.event.product == "disc").count() >= 3
    })
    .unwrap();
    assert!(later[n..].iter().any(|x| x.event.product == "disc"), "{}", d.log_text());
    let m = d.scrape();
    assert_eq!(metric(&m, "kensa_control_errors_total", &[("reason", "parse")]), Some(1.0), "{m}");
    assert_eq!(d.terminate(Duration::from_secs(40)), Some(0), "{}", d.log_text());
}

#[test]
fn liveness_readiness_follow_the_broker() {
    let (mut broker, dir, bank, topic, metrics) = own_broker_rig("ready");
    let mut c = base_config(&bank, &topic, &broker.addr(), &metrics);
    c.cameras.push(endless("cam"));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    assert!(
        wait_for(Duration::from_secs(60), || http_get(&metrics, "/readyz").is_ok_and(|(c, _)| c == 200)),
        "{}",
        d.log_text()
    );
    assert_eq!(http_get(&metrics, "/livez").unwrap().0, 200);
    // `kensa healthcheck` (the Docker HEALTHCHECK) agrees: exit 0 on 200, non-zero otherwise.
    let healthcheck = |args: &[&str]| {
        let out = kensa(&[&["healthcheck", "--addr"][..], args].concat());
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = healthcheck(&[&metrics]);
    assert_eq!(code, Some(0), "/livez of a serving daemon: {err}");
    assert_eq!(healthcheck(&[&metrics, "--path", "/readyz"]).0, Some(0));
    let (code, err) = healthcheck(&[&local_addr()]);
    assert_eq!(code, Some(1), "a dead port: {err}");
    assert!(err.contains("/livez"), "the error names what it probed: {err}");
    broker.down();
    assert!(wait_for(Duration::from_secs(30), || http_get(&metrics, "/readyz").is_ok_and(|(c, _)| c == 503)));
    assert_eq!(http_get(&metrics, "/livez").unwrap().0, 200, "alive while the broker is away");
    let (code, err) = healthcheck(&[&metrics, "--path", "/readyz"]);
    assert_eq!(code, Some(1), "/readyz while the broker is away: {err}");
    assert!(err.contains("503"), "{err}");
    assert_eq!(healthcheck(&[&metrics]).0, Some(0), "/livez while the broker is away");
    broker.up();
    assert!(wait_for(Duration::from_secs(30), || http_get(&metrics, "/readyz").is_ok_and(|(c, _)| c == 200)));
    assert_eq!(d.terminate(Duration::from_secs(40)), Some(0), "{}", d.log_text());
}

/// Metric names (kensa_*) in a text, with histogram suffixes reduced to the base name.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("kensa_") {
        let start = i + pos;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let base = ["_bucket", "_count", "_sum"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        if !(start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_')) {
            out.insert(base.to_string());
        }
        i = end;
    }
    out
}

#[test]
fn dashboard_and_alerts_query_metrics_that_exist() {
    let dash = std::fs::read_to_string(root().join("deploy/grafana/kensa.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dash).unwrap();
    let exprs: Vec<String> = json["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect();
    let rules: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap()).unwrap();
    let rule_exprs: Vec<String> = rules["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(rule_exprs.len() >= 5);
    let mut wanted = BTreeSet::new();
    for e in exprs.iter().chain(&rule_exprs) {
        wanted.extend(metric_names(e));
    }
    assert!(wanted.len() >= 12, "{wanted:?}");
    // A real Kensa, with a defect-producing camera, one that fails, and an image folder with a
    // corrupt file, so that every labelled series exists.
    let (dir, bank, topic, metrics) = rig("dash");
    let folder = dir.path().join("folder");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("bad.png"), b"nope").unwrap();
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.cameras.push(synthetic_camera("cam", 3, 12, 0.0, 0.5));
    c.cameras.push(folder_camera("folder", &folder));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    consume(&brokers(), &topic, 12, Duration::from_secs(120)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let scrape = d.scrape();
    let present = metric_names(&scrape);
    let missing: Vec<&String> = wanted.iter().filter(|w| !present.contains(*w)).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}\nscrape:\n{scrape}");
    // Conventions: every kensa_ metric has HELP and TYPE lines.
    for name in &present {
        assert!(scrape.contains(&format!("# TYPE {name} ")), "{name} has no TYPE");
    }
    assert_eq!(d.terminate(Duration::from_secs(40)), Some(0));

    // promtool, where installed.
    match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(root().join("deploy/prometheus/alerts.yml"))
        .output()
    {
        Ok(o) => assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout)),
        Err(_) => eprintln!("SKIP promtool check rules: promtool is not installed"),
    }
}

#[test]
fn deploy_manifests_parse_and_have_their_required_fields() {
    use serde::Deserialize as _;
    let k8s = std::fs::read_to_string(root().join("deploy/k8s/kensa.yaml")).unwrap();
    let mut kinds = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&k8s) {
        let v = serde_json::Value::deserialize(doc).unwrap();
        assert!(v["apiVersion"].is_string() && v["metadata"]["name"].is_string(), "{v}");
        kinds.push(v["kind"].as_str().unwrap().to_string());
        if v["kind"] == "Deployment" {
            let c = &v["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], 1);
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        }
        if v["kind"] == "ConfigMap" {
            // The embedded Kensa config is valid (banks aside).
            let text = v["data"]["kensa.toml"].as_str().unwrap();
            let c = kensa_core::config::KensaConfig::from_toml_str(text).unwrap();
            let p: Vec<String> = c.problems();
            assert!(p.is_empty(), "{p:?}");
        }
    }
    for k in ["ConfigMap", "Deployment", "Service", "ServiceMonitor", "PersistentVolumeClaim"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in {kinds:?}");
    }
    let compose: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(root().join("deploy/compose.yaml")).unwrap()).unwrap();
    let services = compose["services"].as_object().unwrap();
    for s in ["kensa", "kafka", "prometheus", "grafana"] {
        let svc = &services[s];
        assert!(svc["image"].is_string() || svc["build"].is_object(), "{s}: {svc}");
    }
    for f in [
        "deploy/prometheus/prometheus.yml",
        "deploy/grafana/provisioning/datasources/prometheus.yml",
        "deploy/grafana/provisioning/dashboards/kensa.yml",
    ] {
        let _: serde_json::Value = serde_norway::from_str(&std::fs::read_to_string(root().join(f)).unwrap())
            .unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let c = kensa_core::config::KensaConfig::from_toml_str(
        &std::fs::read_to_string(root().join("deploy/config/kensa.toml")).unwrap(),
    )
    .unwrap();
    assert!(c.problems().is_empty(), "{:?}", c.problems());
    let unit = std::fs::read_to_string(root().join("deploy/systemd/kensa.service")).unwrap();
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID") && unit.contains("ExecStart="));
}
