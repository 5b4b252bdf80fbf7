//! A real Prometheus (Debian's `prometheus` package) scrapes a running Kensa and evaluates the
//! shipped alert rules (deploy/prometheus/alerts.yml) (issue #20): every rule evaluates without
//! error, Kensa's series are queryable, and the rules fire where they should: a second `kensa`
//! target that does not answer makes `KensaDown` pending for that instance only, and a camera
//! whose source is broken makes `KensaCameraFailed` pending for that camera only.

use kensa_tests::*;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn api(addr: &str, path: &str) -> serde_json::Value {
    match http_get(addr, path) {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
        _ => serde_json::Value::Null,
    }
}

/// (alertname, one label's value) of the pending or firing alerts.
fn alerts(addr: &str, label: &str) -> Vec<(String, String)> {
    api(addr, "/api/v1/alerts")["data"]["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    let l = &x["labels"];
                    (l["alertname"].as_str().unwrap_or("").to_string(), l[label].as_str().unwrap_or("").to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn prometheus_scrapes_kensa_and_the_shipped_rules_fire_where_they_should() {
    assert!(
        Command::new("sh").args(["-c", "command -v prometheus"]).status().unwrap().success(),
        "prometheus is missing: scripts/setup.sh installs Debian's prometheus package"
    );
    let (dir, bank, topic, metrics) = rig("prom");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.cameras.push(synthetic_camera("good", 1, 0, 2.0, 0.2));
    c.cameras.push(folder_camera("broken", &dir.path().join("no-such-folder")));
    let mut d = Daemon::start(&write_config(dir.path(), &c), &[], &metrics);
    assert!(wait_for(Duration::from_secs(90), || metric(&d.scrape(), "kensa_frames_scored_total", &[]).is_some()));

    let dead = local_addr();
    let prom_addr = local_addr();
    let rules = std::fs::canonicalize("deploy/prometheus/alerts.yml").unwrap();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: kensa\n    static_configs:\n      - targets: [\"{metrics}\", \"{dead}\"]\n",
            rules.display()
        ),
    )
    .unwrap();
    let _prom = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus"),
    );
    // Kensa's series arrive through a real scrape.
    let scraped = wait_for(Duration::from_secs(60), || {
        api(&prom_addr, "/api/v1/query?query=kensa_frames_scored_total")["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    });
    assert!(scraped, "{}", api(&prom_addr, "/api/v1/targets"));
    // The rules fire where they should.
    let fired = wait_for(Duration::from_secs(60), || {
        let a = alerts(&prom_addr, "instance");
        a.iter().any(|(n, i)| n == "KensaDown" && *i == dead)
            && alerts(&prom_addr, "camera").iter().any(|(n, cam)| n == "KensaCameraFailed" && cam == "broken")
    });
    let by_instance = alerts(&prom_addr, "instance");
    let by_camera = alerts(&prom_addr, "camera");
    assert!(fired, "{by_instance:?} {by_camera:?}\n{}", d.scrape());
    assert!(!by_instance.iter().any(|(n, i)| n == "KensaDown" && *i == metrics), "the live Kensa is not down");
    assert!(!by_camera.iter().any(|(n, cam)| n.starts_with("KensaCamera") && cam == "good"), "{by_camera:?}");
    // Every shipped rule evaluates without error.
    let groups = api(&prom_addr, "/api/v1/rules");
    let rules: Vec<serde_json::Value> = groups["data"]["groups"]
        .as_array()
        .map(|g| g.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect())
        .unwrap_or_default();
    assert!(rules.len() >= 10, "{groups}");
    for r in &rules {
        assert_eq!(r["health"], "ok", "{} evaluates: {r}", r["name"]);
    }
    assert_eq!(d.terminate(Duration::from_secs(60)), Some(2), "a camera failed: exit 2\n{}", d.log_text());
}
