//! Soak benchmark: N synthetic cameras (drop policy, like live cameras) into Kensa and a tansu
//! broker for a long run. Every interval it prints frames processed, drops by reason, RSS, open
//! file descriptors and the p99 capture→ack latency of that interval; at the end, a summary with
//! RSS at start and end. Not part of the test run:
//!
//!     scripts/soak.sh                       # 8 cameras, 30 minutes
//!     KENSA_SOAK_SECONDS=120 scripts/soak.sh
//!
//! Environment: KENSA_SOAK_SECONDS (1800), KENSA_SOAK_CAMERAS (8), KENSA_SOAK_FPS (3 per camera),
//! KENSA_SOAK_INTERVAL (60 s between samples), KENSA_SOAK_REFS (references in the bank, 4).

use kensa_core::config::FullPolicy;
use kensa_tests::*;
use std::time::{Duration, Instant};

fn env(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// p99 of the observations between two scrapes, from bucket deltas (upper bucket bound).
fn p99(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| (*le, c - before.iter().find(|(b, _)| b == le).map(|x| x.1).unwrap_or(0.0)))
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta.iter().find(|(_, c)| *c >= 0.99 * total).map(|(le, _)| *le)
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let seconds = env("KENSA_SOAK_SECONDS", 1800.0) as u64;
    let cameras = env("KENSA_SOAK_CAMERAS", 8.0) as usize;
    let fps = env("KENSA_SOAK_FPS", 3.0);
    let interval = Duration::from_secs(env("KENSA_SOAK_INTERVAL", 60.0) as u64);
    let refs = env("KENSA_SOAK_REFS", 4.0) as usize;
    let (broker, dir, bank, topic, metrics_addr) = own_broker_rig("soak");
    let bank = if refs == 4 { bank } else { synthetic_bank_of(&dir.path().join(format!("bank{refs}")), "disc", refs) };
    let mut c = base_config(&bank, &topic, &broker.addr(), &metrics_addr);
    for i in 0..cameras {
        let mut cam = synthetic_camera(&format!("cam{i}"), i as u64, 0, fps, 0.1);
        cam.policy = Some(FullPolicy::Drop);
        c.cameras.push(cam);
    }
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start(&cfg, &[], &metrics_addr);
    let pid = d.child.id();
    println!(
        "soak: {cameras} cameras x {fps} fps for {seconds} s, {refs}-reference bank; kensa pid {pid}; broker {}",
        broker.addr()
    );
    println!(
        "{:>7} {:>9} {:>8} {:>10} {:>9} {:>5} {:>9}",
        "t_s", "scored", "fps", "dropped", "rss_MiB", "fds", "p99_ms"
    );
    let t0 = Instant::now();
    let mut prev = d.scrape();
    let mut prev_scored = metric(&prev, "kensa_frames_scored_total", &[]).unwrap_or(0.0);
    let rss_start = proc_status_kib(pid, "VmRSS") as u64;
    let fds_start = proc_fds(pid);
    let mut rss_samples = vec![rss_start];
    let mut p99s = Vec::new();
    while t0.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(
            interval.min(Duration::from_secs(seconds).saturating_sub(t0.elapsed())).max(Duration::from_secs(1)),
        );
        let now = d.scrape();
        let scored = metric(&now, "kensa_frames_scored_total", &[]).unwrap_or(0.0);
        let dropped = metric(&now, "kensa_frames_dropped_total", &[]).unwrap_or(0.0);
        let p = p99(
            &buckets(&prev, "kensa_end_to_end_latency_seconds"),
            &buckets(&now, "kensa_end_to_end_latency_seconds"),
        );
        let rss = proc_status_kib(pid, "VmRSS") as u64;
        rss_samples.push(rss);
        p99s.extend(p);
        println!(
            "{:>7.0} {:>9.0} {:>8.1} {:>10.0} {:>9.1} {:>5} {:>9}",
            t0.elapsed().as_secs_f64(),
            scored,
            (scored - prev_scored) / interval.as_secs_f64(),
            dropped,
            rss as f64 / 1024.0,
            proc_fds(pid),
            p.map(|x| format!("{:.0}", x * 1000.0)).unwrap_or_else(|| "-".into())
        );
        prev_scored = scored;
        prev = now;
    }
    let last = d.scrape();
    println!("\ndrops by reason:");
    for line in last.lines().filter(|l| l.starts_with("kensa_frames_dropped_total") && !l.ends_with(" 0")) {
        println!("  {line}");
    }
    let rss_end = *rss_samples.last().unwrap();
    let rss_max = *rss_samples.iter().max().unwrap();
    println!(
        "summary: scored {:.0} frames in {:.0} s ({:.1} fps); RSS start {:.1} MiB, end {:.1} MiB, max {:.1} MiB; fds start {}, end {}; worst interval p99 {} ms",
        metric(&last, "kensa_frames_scored_total", &[]).unwrap_or(0.0),
        t0.elapsed().as_secs_f64(),
        metric(&last, "kensa_frames_scored_total", &[]).unwrap_or(0.0) / t0.elapsed().as_secs_f64(),
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        fds_start,
        proc_fds(pid),
        p99s.iter().copied().fold(0.0f64, f64::max) * 1000.0
    );
    let hwm = proc_status_kib(pid, "VmHWM");
    println!("peak RSS (VmHWM) {:.1} MiB", hwm / 1024.0);
    let code = d.terminate(Duration::from_secs(60));
    println!("kensa exited with {code:?}");
}
