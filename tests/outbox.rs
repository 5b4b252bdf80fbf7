//! The outbox and delivery under real failures (issue #19): a broker that stops answering for
//! many message timeouts, a daemon killed with SIGKILL at random moments, a flipped byte in a
//! spooled record, a full disk, a missing defects topic.

use kensa_tests::*;
use std::collections::BTreeSet;
use std::time::Duration;

/// Offsets of the records `[len u32][crc u32][body]` of a segment file.
fn record_offsets(b: &[u8]) -> Vec<usize> {
    let mut v = Vec::new();
    let mut pos = 0;
    while pos + 8 <= b.len() {
        v.push(pos);
        pos += 8 + u32::from_le_bytes([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]) as usize;
    }
    v
}

#[test]
fn a_flipped_byte_in_a_spooled_segment_loses_only_its_record() {
    let (dir, bank, topic, metrics) = rig("flip");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    // The topics do not exist yet: every event waits in the outbox.
    c.kafka.create_topics = false;
    c.cameras.push(synthetic_camera("cam", 5, 12, 0.0, 0.0));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let spooled =
        wait_for(Duration::from_secs(120), || metric(&d.scrape(), "kensa_outbox_events", &[]).unwrap_or(0.0) >= 12.0);
    assert!(spooled, "{}\n{}", d.scrape(), d.log_text());
    let _ = std::process::Command::new("kill").args(["-9", &d.child.id().to_string()]).status();
    let _ = d.wait(Duration::from_secs(10));

    // One byte in the middle of the middle record of the (only) segment.
    let spool = dir.path().join("kensa-outbox");
    let seg = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .expect("a segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = record_offsets(&bytes);
    assert_eq!(at.len(), 12, "one record per event");
    let (start, end) = (at[6], at[7]);
    bytes[(start + 8 + end) / 2] ^= 0x5a;
    std::fs::write(&seg, &bytes).unwrap();

    // The topics appear; Kensa restarts with another camera: 11 of the 12 arrive.
    let mut c2 = c.clone();
    c2.kafka.create_topics = true;
    c2.cameras = vec![synthetic_camera("other", 5, 1, 0.0, 0.0)];
    let cfg = write_config(dir.path(), &c2);
    let mut d2 = Daemon::start(&cfg, &[], &metrics);
    let got = consume_until(&brokers(), &topic, Duration::from_secs(120), |r| {
        r.iter().filter(|x| x.event.camera_id == "cam").map(|x| x.event.frame_seq).collect::<BTreeSet<_>>().len() >= 11
    })
    .unwrap();
    let seqs: BTreeSet<u64> = got.iter().filter(|x| x.event.camera_id == "cam").map(|x| x.event.frame_seq).collect();
    assert_eq!(seqs.len(), 11, "all but the damaged record arrive: {seqs:?}\n{}", d2.log_text());
    let m = d2.scrape();
    assert_eq!(metric(&m, "kensa_outbox_discarded_total", &[("reason", "corrupt")]), Some(1.0), "{m}");
    assert!(d2.log_text().contains("damaged outbox record skipped"), "{}", d2.log_text());
    assert_eq!(d2.terminate(Duration::from_secs(40)), Some(0), "{}", d2.log_text());
}

/// Whether each camera's events arrived in capture order: the first copy of each frame (later
/// copies are duplicates from a re-send) comes after the first copy of every earlier frame.
fn out_of_order(got: &[Received], camera: &str) -> usize {
    let mut seen = BTreeSet::new();
    let mut last = None;
    let mut wrong = 0;
    for r in got.iter().filter(|r| r.event.camera_id == camera) {
        if seen.insert(r.event.event_id.clone()) {
            if last.is_some_and(|l| r.event.frame_seq < l) {
                wrong += 1;
            }
            last = Some(r.event.frame_seq);
        }
    }
    wrong
}

/// The scenario: 120 s at 5 fps is 600 events, past the sender's window (512) and the
/// old stall point (about 576 events, when delivery permits held the pipeline back).
const OUTAGE_S: u64 = 120;
/// A cut connection: 30 s, still six message timeouts.
const CUT_S: u64 = 30;
const MESSAGE_TIMEOUT_MS: u64 = 5000;

/// How the broker goes away.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// The broker process is stopped (SIGSTOP): connections stay open, nothing answers.
    Unresponsive,
    /// The network between Kensa and the broker is cut: the forwarder Kensa reaches the broker
    /// through is killed (open connections reset, new ones refused), the broker keeps its state.
    Cut,
}

#[test]
fn a_broker_that_stops_answering_for_many_message_timeouts_loses_nothing_and_keeps_order() {
    outage(Outage::Unresponsive, OUTAGE_S);
}

#[test]
fn a_cut_network_for_many_message_timeouts_loses_nothing_and_keeps_order() {
    outage(Outage::Cut, CUT_S);
}

/// A drop-policy camera at 5 fps through an outage of `secs` (many message timeouts): every
/// scored frame's event is delivered, none dropped, in capture order, and the exit is clean.
fn outage(kind: Outage, secs: u64) {
    let forward_port = free_port();
    let broker = match kind {
        Outage::Unresponsive => MemoryBroker::start(),
        Outage::Cut => MemoryBroker::start_advertising(forward_port),
    };
    let mut forwarder = matches!(kind, Outage::Cut).then(|| Forwarder::start(forward_port, &broker.listen));
    let (dir, _, topic, metrics) = rig("pause");
    // A small bank and small frames: scoring keeps up with 5 fps with room to spare even on
    // two busy cores, so a dropped frame would be delivery's fault, not the model's.
    let bank = dir.path().join("small.kbank");
    let out = enroll("disc", &dir.path().join("refs/train/good"), &bank, &["--input-size", "128"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut c = base_config(&bank, &topic, &broker.addr, &metrics);
    // The outage below outlasts the message timeout (after which librdkafka gives a copy up and
    // Kensa queues it again) many times over.
    c.kafka.message_timeout_ms = MESSAGE_TIMEOUT_MS;
    let cameras = ["live"];
    for (i, id) in cameras.iter().enumerate() {
        let mut cam = synthetic_camera(id, 7 + i as u64, 0, 5.0, 0.3);
        cam.policy = Some(kensa_core::config::FullPolicy::Drop);
        (cam.width, cam.height) = (128, 128);
        c.cameras.push(cam);
    }
    let mut d = Daemon::start(&write_config(dir.path(), &c), &[], &metrics);
    consume_until(&broker.addr, &topic, Duration::from_secs(90), |r| r.len() >= 5).unwrap();
    match &mut forwarder {
        None => signal(broker.child.id(), "STOP"),
        Some(f) => f.cut(),
    }
    std::thread::sleep(Duration::from_secs(secs));
    let during = d.scrape();
    let waiting = metric(&during, "kensa_outbox_events", &[]).unwrap_or(0.0);
    // 5 fps for the whole outage, less a few seconds' slack (120 s: past the old stall point of
    // about 576 events).
    // (For the 30 s cut, 80 %: two outage tests may share the two cores.)
    let expect_waiting = if secs >= OUTAGE_S { (secs * 5 - 20) as f64 } else { (secs * 5 * 8 / 10) as f64 };
    assert!(
        waiting > expect_waiting,
        "{kind:?}: events wait in the outbox, the pipeline never waits on Kafka: {waiting}\n{during}"
    );
    let (_, health) = http_get(&metrics, "/healthz").unwrap();
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert!(health["outbox"]["pending"].as_f64().unwrap_or(0.0) > expect_waiting, "{health}");
    assert!(health["outbox"]["oldest_event_seconds"].as_f64().unwrap_or(0.0) >= (secs - 5) as f64, "{health}");
    match &mut forwarder {
        None => signal(broker.child.id(), "CONT"),
        Some(f) => f.restore(),
    }
    // The backlog drains once the broker answers again (after tansu fences the old producer
    // id, Kensa rebuilds its producer).
    let drained = wait_for(Duration::from_secs(180), || metric(&d.scrape(), "kensa_outbox_events", &[]) == Some(0.0));
    let after = d.scrape();
    assert!(drained, "{kind:?}: {after}\n{}", d.log_text());
    assert_eq!(metric(&after, "kensa_frames_dropped_total", &[]).unwrap_or(0.0), 0.0, "{after}");
    assert_eq!(metric(&after, "kensa_outbox_dropped_total", &[]).unwrap_or(0.0), 0.0, "{after}");
    let timeouts = metric(&after, "kensa_publish_errors_total", &[("topic", &topic), ("reason", "timed_out")]);
    let failures: f64 = after
        .lines()
        .filter(|l| l.starts_with("kensa_publish_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let rebuilds = metric(&after, "kensa_producer_rebuilds_total", &[]).unwrap_or(0.0);
    // The outage outlasted the message timeout: librdkafka gave copies up and Kensa's own
    // re-send path (not only librdkafka's internal retry) delivered them.
    assert!(failures > 0.0, "{kind:?}: copies failed and were sent again\n{after}");
    assert_eq!(d.terminate(Duration::from_secs(60)), Some(0), "{}", d.log_text());
    let log = d.log_text();
    let got = consume_until(&broker.addr, &topic, Duration::from_secs(30), |_| false).unwrap();
    let mut total = 0;
    for cam in cameras {
        let seqs: BTreeSet<u64> = got.iter().filter(|r| r.event.camera_id == cam).map(|r| r.event.frame_seq).collect();
        let n = seqs.len() as u64;
        total += n;
        assert!(n >= (secs * 5 * 9 / 10), "about 5 fps for {secs}+ s: {n} events of {cam}\n{log}");
        assert_eq!(seqs, (0..n).collect(), "{cam}: no frame dropped, every scored frame delivered\n{log}");
        assert_eq!(out_of_order(&got, cam), 0, "{cam}: events arrive in capture order");
    }
    eprintln!(
        "{kind:?} {secs} s (message timeout {MESSAGE_TIMEOUT_MS} ms), 1 camera at 5 fps: {total} events, \
         {} copies received, 0 lost, 0 dropped, 0 out of order; {waiting} waited at the end of the outage; \
         failed copies {failures} (timed out {timeouts:?}), producer rebuilds {rebuilds}",
        got.len()
    );
}

/// A small tmpfs mounted for this test, unmounted when dropped. None (the test says why and
/// skips) where mounting is not allowed.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_under_the_outbox_holds_events_back_and_loses_none() {
    let (dir, bank, topic, metrics) = rig("fulldisk");
    let Some(disk) = SmallDisk::mount(&dir.path().join("disk"), "4m") else {
        // CI runs as root: there a skip would hide the test, so it fails instead.
        assert!(
            std::env::var_os("CI").is_none(),
            "a_full_disk_under_the_outbox: cannot mount a tmpfs (CI must run it)"
        );
        eprintln!("SKIP a_full_disk_under_the_outbox: cannot mount a tmpfs here (needs root)");
        return;
    };
    // Fill the disk: no append can succeed.
    let filler = disk.0.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", "count=1000"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.outbox.dir = disk.0.join("outbox");
    c.cameras.push(synthetic_camera("cam", 9, 20, 0.0, 0.3));
    let mut d = Daemon::start(&write_config(dir.path(), &c), &[], &metrics);
    let failing = wait_for(Duration::from_secs(90), || {
        metric(&d.scrape(), "kensa_outbox_write_errors_total", &[]).unwrap_or(0.0) >= 2.0
    });
    assert!(failing, "appends fail on the full disk\n{}\n{}", d.scrape(), d.log_text());
    let m = d.scrape();
    assert_eq!(
        metric(&m, "kensa_events_published_total", &[("topic", &topic)]),
        Some(0.0),
        "nothing is sent unspooled"
    );
    assert!(d.log_text().contains("not sent until they are spooled"), "{}", d.log_text());
    // Space returns: every event arrives, none dropped.
    std::fs::remove_file(&filler).unwrap();
    let got = consume_until(&brokers(), &topic, Duration::from_secs(120), |r| {
        r.iter().map(|x| x.event.frame_seq).collect::<BTreeSet<_>>().len() >= 20
    })
    .unwrap();
    let seqs: BTreeSet<u64> = got.iter().map(|x| x.event.frame_seq).collect();
    assert_eq!(seqs, (0..20).collect(), "{}", d.log_text());
    assert_eq!(metric(&d.scrape(), "kensa_frames_dropped_total", &[]).unwrap_or(0.0), 0.0);
    assert_eq!(d.terminate(Duration::from_secs(60)), Some(0), "{}", d.log_text());
}

#[test]
fn a_missing_defects_topic_holds_back_defects_only_and_never_resends_results() {
    let (dir, bank, topic, metrics) = rig("nodefects");
    create_topic(&brokers(), &topic, 3);
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.kafka.create_topics = false;
    c.kafka.message_timeout_ms = 1500;
    c.cameras.push(synthetic_camera("cam", 4, 10, 0.0, 0.6));
    let mut d = Daemon::start(&write_config(dir.path(), &c), &[], &metrics);
    let results = consume_until(&brokers(), &topic, Duration::from_secs(120), |r| r.len() >= 10).unwrap();
    let anomalous = results.iter().filter(|r| r.event.anomalous).count();
    assert!(anomalous > 0, "the line makes defects");
    // Several retry rounds of the defects later, the results topic still has each event once.
    let waiting = wait_for(Duration::from_secs(60), || {
        metric(&d.scrape(), "kensa_publish_errors_total", &[("topic", &format!("{topic}.defects"))]).unwrap_or(0.0)
            >= 2.0 * anomalous as f64
    });
    assert!(waiting, "{}\n{}", d.scrape(), d.log_text());
    let again = consume_until(&brokers(), &topic, Duration::from_secs(5), |_| false).unwrap();
    assert_eq!(again.len(), 10, "results are never re-sent while the defects wait");
    assert_eq!(metric(&d.scrape(), "kensa_outbox_events", &[]), Some(anomalous as f64), "the defects backlog waits");
    // The defects topic appears: the backlog drains.
    create_topic(&brokers(), &format!("{topic}.defects"), 3);
    let defects =
        consume_until(&brokers(), &format!("{topic}.defects"), Duration::from_secs(120), |r| r.len() >= anomalous)
            .unwrap();
    let ids: BTreeSet<String> = defects.iter().map(|r| r.event.event_id.clone()).collect();
    assert_eq!(ids.len(), anomalous);
    assert_eq!(d.terminate(Duration::from_secs(60)), Some(0), "{}", d.log_text());
}
