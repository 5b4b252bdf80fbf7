//! Evidence and identity (issue #20): snapshot, map and overlay names stay unique across a
//! restart (the run id is in the path, so a restarted daemon never overwrites the pictures an
//! earlier event points at), events carry URLs that Kensa's own listener serves, and nothing
//! outside the evidence folder can be fetched. Part ids come from image file names and from
//! control messages announcing the next part.

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

#[test]
fn part_ids_come_from_file_names_and_from_the_control_topic() {
    let (dir, bank, topic, metrics) = rig("parts");
    // A folder camera: each event names its image file.
    let folder = dir.path().join("parts");
    std::fs::create_dir_all(&folder).unwrap();
    let good: Vec<_> =
        std::fs::read_dir(dir.path().join("refs/train/good")).unwrap().map(|e| e.unwrap().path()).collect();
    for (i, src) in good.iter().take(3).enumerate() {
        std::fs::copy(src, folder.join(format!("P-{i:03}.png"))).unwrap();
    }
    let control = format!("{topic}.control");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.kafka.control_topic = Some(control.clone());
    c.cameras.push(folder_camera("folder", &folder));
    c.cameras.push(synthetic_camera("live", 4, 0, 4.0, 0.2));
    let mut d = Daemon::start(&write_config(dir.path(), &c), &[], &metrics);
    assert!(
        wait_for(Duration::from_secs(60), || d.log_text().contains("reading control commands")),
        "{}",
        d.log_text()
    );
    // The MES announces the part in front of the live camera.
    let sent = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
    produce(&brokers(), &control, "live", br#"{"camera": "live", "part_id": "MES-77"}"#);
    let got = consume_until(&brokers(), &topic, Duration::from_secs(90), |r| {
        r.iter().any(|x| x.event.part_id == "MES-77") && r.iter().filter(|x| x.event.camera_id == "folder").count() >= 3
    })
    .unwrap();
    let folder_ids: BTreeSet<&str> =
        got.iter().filter(|x| x.event.camera_id == "folder").map(|x| x.event.part_id.as_str()).collect();
    assert_eq!(folder_ids, BTreeSet::from(["P-000", "P-001", "P-002"]), "file names name the parts");
    let tagged: Vec<_> = got.iter().filter(|x| x.event.part_id == "MES-77").collect();
    assert_eq!(tagged.len(), 1, "the announcement names exactly one frame: {}", d.log_text());
    assert_eq!(tagged[0].event.camera_id, "live");
    assert!(tagged[0].event.capture_time_unix_nanos >= sent, "the frame after the announcement");
    let untagged_live = got.iter().filter(|x| x.event.camera_id == "live" && x.event.part_id.is_empty()).count();
    assert!(untagged_live > 0, "other live frames carry no part id");
    assert_eq!(d.terminate(Duration::from_secs(40)), Some(0), "{}", d.log_text());
}
