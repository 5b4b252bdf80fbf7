//! `kensa_daemon::run` in-process: a synthetic camera, the real broker, and a shutdown future
//! injected by the test, fired while a batch is still being formed.

use kensa_core::config::KensaConfig;
use kensa_daemon::RunOptions;
use kensa_tests::*;
use std::time::{Duration, Instant};

/// A config for one endless synthetic camera of product `disc`, built as a value.
fn config(dir: &std::path::Path, bank: &std::path::Path, topic: &str, fps: f64) -> KensaConfig {
    let mut cfg = base_config(bank, topic, &brokers(), &local_addr());
    cfg.model.bank_poll_s = 0;
    // A batch waits up to 60 s for 8 frames: at 4 fps, a shutdown always finds one half-formed.
    cfg.batch.max_size = 8;
    cfg.batch.max_wait_ms = 60_000;
    // Start-up gives up on the brokers after the default 30 s, not the tests' usual 10 s.
    cfg.kafka.connect_timeout_s = 30;
    cfg.outbox.dir = dir.join("outbox");
    cfg.cameras.push(synthetic_camera("cam-in", 3, 0, fps, 0.3));
    cfg
}

#[test]
fn runs_in_process_and_drains_a_half_formed_batch_on_shutdown() {
    let dir = TempDir::new("inproc");
    let bank = synthetic_bank(dir.path(), "disc");
    let topic = unique_topic("inproc");
    let cfg = config(dir.path(), &bank, &topic, 4.0);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let broker_addr = brokers();
    let watcher_topic = topic.clone();
    // Fire the shutdown once 10 events are on the topic: with batches of up to 8 frames at
    // 4 fps and a 60 s wait, the next batch is then half-formed.
    let watcher = std::thread::spawn(move || {
        let got = consume(&broker_addr, &watcher_topic, 10, Duration::from_secs(120)).unwrap();
        let fired = Instant::now();
        let _ = stop_tx.send(());
        (got.len(), fired)
    });
    let opts = RunOptions { shutdown_deadline: Duration::from_secs(30), ..RunOptions::default() };
    let summary = rt
        .block_on(kensa_daemon::run(cfg, opts, async move {
            let _ = stop_rx.await;
        }))
        .expect("the daemon runs");
    let (seen, fired) = watcher.join().unwrap();
    assert!(seen >= 10, "only {seen} events before the shutdown");
    assert!(
        fired.elapsed() < Duration::from_secs(20),
        "the partial batch was flushed on shutdown, not held for its 60 s wait ({:?})",
        fired.elapsed()
    );
    assert_eq!(summary, kensa_daemon::Summary::default(), "no failures, nothing dropped or left spooled");

    // Every captured frame was scored and delivered exactly once, in order: sequence numbers
    // 0..n without a gap (the frames of the half-formed batch included).
    let events = consume(&brokers(), &topic, usize::MAX, Duration::from_secs(5)).unwrap();
    let mut seqs: Vec<u64> = events.iter().map(|(_, e)| e.frame_seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), events.len(), "no duplicates without failures");
    assert!(seqs.len() > seen, "frames captured after the 10th event were delivered too: {} > {seen}", seqs.len());
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "no gap in the frame sequence");
}
