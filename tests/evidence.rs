//! Evidence and identity (issue #20): snapshot, map and overlay names stay unique across a
//! restart (the run id is in the path, so a restarted daemon never overwrites the pictures an
//! earlier event points at), events carry URLs that Kensa's own listener serves, and nothing
//! outside the evidence folder can be fetched.

use kensa_tests::*;
use std::collections::BTreeSet;
use std::time::Duration;

#[test]
fn evidence_names_survive_a_restart_and_its_urls_are_served() {
    let (dir, bank, topic, metrics) = rig("evidence");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.publish.store_dir = Some(dir.path().join("evidence"));
    c.publish.store = kensa_core::config::StoreWhich::All;
    c.publish.evidence_url_prefix = Some(format!("http://{metrics}/evidence"));
    c.cameras.push(synthetic_camera("cam", 9, 3, 0.0, 0.5));
    let cfg = write_config(dir.path(), &c);
    let mut runs = Vec::new();
    for n in 1..=2 {
        let d = Daemon::start(&cfg, &[], &metrics);
        let got = consume_until(&brokers(), &topic, Duration::from_secs(120), |r| r.len() >= 3 * n).unwrap();
        runs.push(d);
        if n == 1 {
            assert_eq!(runs[0].terminate(Duration::from_secs(60)), Some(0), "{}", runs[0].log_text());
            continue;
        }
        let events: Vec<_> = got.iter().map(|r| r.event.clone()).collect();
        assert_eq!(events.len(), 6, "3 frames per run");
        let snapshots: BTreeSet<&str> = events.iter().map(|e| e.snapshot_path.as_str()).collect();
        assert_eq!(snapshots.len(), 6, "frame 0 of run 2 does not overwrite frame 0 of run 1: {snapshots:?}");
        for e in &events {
            let run = e.event_id.split('/').nth(1).unwrap();
            for p in [&e.snapshot_path, &e.map_path, &e.overlay_path] {
                assert!(std::path::Path::new(p).is_file(), "{p} exists");
                assert!(p.contains(&format!("/cam/{run}/")), "{p} names camera and run");
            }
            // The URL of every file, from run 1 too, is served by the running daemon.
            for url in [&e.snapshot_url, &e.overlay_url] {
                let path = url.strip_prefix(&format!("http://{metrics}")).expect("URL under the prefix");
                let (code, body) = http_get(&metrics, path).unwrap();
                assert_eq!(code, 200, "{url}");
                assert!(body.starts_with("\u{fffd}PNG"), "{url} is a PNG");
            }
        }
        for bad in ["/evidence/../../etc/passwd", "/evidence/cam/..%2F..%2Fetc/passwd", "/evidence/cam/x/kensa.toml"] {
            let (code, _) = http_get(&metrics, bad).unwrap();
            assert!(code == 400 || code == 404, "{bad} answered {code}");
        }
        assert_eq!(runs[1].terminate(Duration::from_secs(60)), Some(0), "{}", runs[1].log_text());
    }
}
