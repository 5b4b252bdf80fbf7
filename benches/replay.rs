//! Backlog replay benchmark (issue #19): does replaying a large outbox backlog at start keep
//! memory bounded? Not part of the test run:
//!
//!     scripts/replay.sh                              # a 10-minute backlog of one 5 fps camera
//!     KENSA_REPLAY_EVENTS=600 scripts/replay.sh      # a quick one
//!
//! 1. **Baseline**: Kensa with one live camera (5 fps, drop policy) and the broker up, for
//!    `KENSA_REPLAY_BASELINE_S` (60) seconds: its peak RSS is the bound's base.
//! 2. **Outage**: the broker is stopped (killed by PID); a Kensa with one unthrottled camera
//!    (block policy) spools `KENSA_REPLAY_EVENTS` events (3,000: ten minutes of a 5 fps camera),
//!    then is stopped with SIGTERM (what it cannot send stays in the outbox).
//! 3. **Replay**: the broker returns; Kensa starts with the same live camera as the baseline
//!    and sends the backlog while the line keeps running. RSS is sampled every 200 ms until the
//!    outbox is empty; every backlog event is then counted on the topic.
//!
//! The bound: the baseline's peak, plus the sender's window (512 records, 32 MiB at most), plus
//! the outbox's index (200 bytes per pending event; 174 measured). The bench fails when the peak is
//! over it or an event is missing.
//! Also printed: the outbox alone (no daemon) indexing and replaying a larger synthetic backlog
//! of `KENSA_REPLAY_SYNTHETIC` (100,000) records of 2 KiB, RSS before, after indexing and peak.

use kensa_core::config::FullPolicy;
use kensa_publish::outbox::{Outbox, SpoolRecord};
use kensa_tests::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

/// Samples a process's RSS every 200 ms while `until` is false; returns (samples, peak) in KiB.
fn sample_rss(pid: u32, limit: Duration, mut until: impl FnMut() -> bool) -> (Vec<f64>, f64) {
    let t0 = Instant::now();
    let mut v = Vec::new();
    while t0.elapsed() < limit && !until() {
        v.push(proc_status_kib(pid, "VmRSS"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let peak = v.iter().copied().fold(0.0, f64::max);
    (v, peak)
}

fn outbox_alone(records: u64) {
    let dir = TempDir::new("replay-synthetic");
    let spool = dir.path().join("outbox");
    let me = std::process::id();
    let rss0 = proc_status_kib(me, "VmRSS");
    {
        let mut ob = Outbox::open(&spool, 4 << 30).unwrap();
        let mut batch = Vec::with_capacity(64);
        for i in 0..records {
            batch.push(SpoolRecord {
                event_id: format!("cam/1/{i}"),
                topics: vec!["t".into()],
                key: "cam".into(),
                payload: vec![(i % 251) as u8; 2048],
                ..Default::default()
            });
            if batch.len() == 64 {
                ob.append(&batch).unwrap();
                batch.clear();
            }
        }
        ob.append(&batch).unwrap();
    }
    let rss_written = proc_status_kib(me, "VmRSS");
    let t = Instant::now();
    let mut ob = Outbox::open(&spool, 4 << 30).unwrap();
    let indexed = t.elapsed();
    let rss_indexed = proc_status_kib(me, "VmRSS");
    let mut peak = rss_indexed;
    let mut n = 0u64;
    loop {
        let w = ob.take(512, 32 << 20);
        if w.is_empty() {
            break;
        }
        n += w.len() as u64;
        peak = peak.max(proc_status_kib(me, "VmRSS"));
        for (id, _) in w {
            ob.ack(id);
        }
    }
    println!(
        "outbox alone: {records} records of 2 KiB ({:.0} MiB on disk): indexed in {:.2} s; RSS {:.1} MiB before, \
         {:.1} after writing, {:.1} after indexing, peak {:.1} while replaying {n} in windows of 512; \
         index cost {:.0} bytes per pending record",
        records as f64 * 2.1 / 1024.0,
        indexed.as_secs_f64(),
        mib(rss0),
        mib(rss_written),
        mib(rss_indexed),
        mib(peak),
        (rss_indexed - rss_written).max(0.0) * 1024.0 / records as f64,
    );
}

fn main() {
    let events = env("KENSA_REPLAY_EVENTS", 3000);
    let baseline_s = env("KENSA_REPLAY_BASELINE_S", 60);
    let (mut broker, dir, bank, topic, metrics) = own_broker_rig("replay");
    let live = |c: &mut kensa_core::config::KensaConfig| {
        let mut cam = synthetic_camera("live", 1, 0, 5.0, 0.1);
        cam.policy = Some(FullPolicy::Drop);
        c.cameras = vec![cam];
    };
    let mut c = base_config(&bank, &topic, &broker.addr(), &metrics);
    c.publish.drain_timeout_s = 5;
    live(&mut c);
    let cfg = write_config(dir.path(), &c);

    // 1. Baseline.
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let pid = d.child.id();
    assert!(wait_for(Duration::from_secs(90), || metric(&d.scrape(), "kensa_frames_scored_total", &[]).is_some()));
    let (_, base_peak) = sample_rss(pid, Duration::from_secs(baseline_s), || false);
    assert_eq!(d.terminate(Duration::from_secs(60)), Some(0), "{}", d.log_text());
    println!("baseline: one live camera at 5 fps for {baseline_s} s, broker up: peak RSS {:.1} MiB", mib(base_peak));

    // 2. Outage: the broker is down, an unthrottled camera spools the backlog.
    let mut spool_cfg = c.clone();
    let mut fast = synthetic_camera("backlog", 2, events, 0.0, 0.3);
    fast.policy = Some(FullPolicy::Block);
    spool_cfg.cameras = vec![fast];
    let mut d = Daemon::start(&write_config(dir.path(), &spool_cfg), &[], &metrics);
    assert!(wait_for(Duration::from_secs(90), || metric(&d.scrape(), "kensa_outbox_appended_total", &[]).is_some()));
    broker.down();
    let t = Instant::now();
    let spooled = wait_for(Duration::from_secs(3600), || {
        metric(&d.scrape(), "kensa_frames_scored_total", &[]).unwrap_or(0.0) >= events as f64
    });
    assert!(spooled, "{}", d.log_text());
    std::thread::sleep(Duration::from_secs(2));
    let m = d.scrape();
    let pending = metric(&m, "kensa_outbox_events", &[]).unwrap_or(0.0);
    let bytes = metric(&m, "kensa_outbox_bytes", &[]).unwrap_or(0.0);
    let _ = d.terminate(Duration::from_secs(60));
    println!(
        "outage: {pending:.0} events ({:.1} MiB) spooled in {:.0} s with the broker down",
        bytes / 1048576.0,
        t.elapsed().as_secs_f64()
    );

    // 3. Replay while the line runs.
    broker.up();
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics);
    let pid = d.child.id();
    let t = Instant::now();
    let mut first = true;
    let (samples, peak) = sample_rss(pid, Duration::from_secs(1800), || {
        let m = d.scrape();
        let left = metric(&m, "kensa_outbox_events", &[]);
        if first && left.is_some() {
            first = false;
        }
        // Done once the backlog is sent (the live camera's own events come and go).
        !first
            && left.unwrap_or(f64::MAX) < 20.0
            && metric(&m, "kensa_outbox_oldest_event_seconds", &[]).unwrap_or(99.0) < 5.0
    });
    let replay_s = t.elapsed().as_secs_f64();
    let m = d.scrape();
    let dropped = metric(&m, "kensa_frames_dropped_total", &[]).unwrap_or(0.0);
    assert_eq!(d.terminate(Duration::from_secs(60)), Some(0), "{}", d.log_text());
    let got = consume_until(&broker.addr(), &topic, Duration::from_secs(120), |r| {
        r.iter().filter(|x| x.event.camera_id == "backlog").map(|x| x.event.frame_seq).collect::<BTreeSet<_>>().len()
            >= events as usize
    })
    .unwrap();
    let arrived: BTreeSet<u64> =
        got.iter().filter(|x| x.event.camera_id == "backlog").map(|x| x.event.frame_seq).collect();
    // The index costs 174 bytes per waiting record as measured below (`outbox_alone`): 200.
    let bound_kib = base_peak + 32.0 * 1024.0 + pending * 200.0 / 1024.0;
    println!(
        "replay: {pending:.0} backlog events sent in {replay_s:.0} s while the live camera ran ({dropped:.0} live frames dropped); \
         {} of them on the topic; RSS first {:.1} MiB, peak {:.1} MiB, last {:.1} MiB; bound {:.1} MiB (baseline peak + window + index): {}",
        arrived.len(),
        mib(samples.first().copied().unwrap_or(0.0)),
        mib(peak),
        mib(samples.last().copied().unwrap_or(0.0)),
        mib(bound_kib),
        if peak <= bound_kib { "within" } else { "OVER" }
    );
    assert!(peak <= bound_kib, "the replay's peak RSS is over its bound");
    assert_eq!(arrived, (0..events).collect(), "every backlog event arrives");
    outbox_alone(env("KENSA_REPLAY_SYNTHETIC", 100_000));
}
