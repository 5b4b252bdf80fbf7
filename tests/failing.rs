//! Failing loudly (issue #19): a stage that cannot go on stops the daemon (not ready, the
//! cause logged, exit 1) for its supervisor to restart it, instead of living on as a process
//! that inspects nothing while its probes say healthy. The faults are injected with
//! `KENSA_FAULT` (`kensa_core::fault`) into a real daemon against the real broker.

use kensa_tests::*;
use std::collections::BTreeSet;
use std::time::Duration;

#[test]
fn a_model_that_fails_every_batch_stops_the_daemon_with_exit_1() {
    let (dir, bank, topic, metrics) = rig("model-error");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.cameras.push(synthetic_camera("cam", 3, 0, 5.0, 0.0));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start_with_env(&cfg, &[], &metrics, &[("KENSA_FAULT", "model-error")]);
    let code = d.wait(Duration::from_secs(90));
    let log = d.log_text();
    assert_eq!(code, Some(1), "exit 1 (a stage failed), not alive nor hung\n{log}");
    assert!(log.contains("scoring failed") && log.contains("injected fault"), "each failed batch is logged\n{log}");
    assert!(log.contains("the model failed every batch in a row"), "the cause is named\n{log}");
    assert!(log.contains("inspection cannot go on"), "{log}");
}

#[test]
fn a_sender_that_panics_stops_the_daemon_and_its_events_wait_for_the_next_start() {
    let (dir, bank, topic, metrics) = rig("sender-panic");
    let mut c = base_config(&bank, &topic, &brokers(), &metrics);
    c.cameras.push(synthetic_camera("cam", 4, 0, 5.0, 0.0));
    let cfg = write_config(dir.path(), &c);
    let mut d = Daemon::start_with_env(&cfg, &[], &metrics, &[("KENSA_FAULT", "sender-panic")]);
    let code = d.wait(Duration::from_secs(90));
    let log = d.log_text();
    assert_eq!(code, Some(1), "exit 1 (the delivery stage failed)\n{log}");
    assert!(log.contains("the sender failed") && log.contains("delivery"), "the stage is named\n{log}");
    // What was spooled before the panic is not lost: the next start sends it. The spool is read
    // from a copy, as Kensa reads it, so the next start meets it untouched.
    let spool = dir.path().join("kensa-outbox");
    let copy = dir.path().join("spool-copy");
    copy_spool(&spool, &copy);
    let mut ob = kensa_publish::outbox::Outbox::open(&copy, c.outbox.max_bytes).unwrap();
    let spooled: BTreeSet<String> = ob.take(usize::MAX, usize::MAX).into_iter().map(|(_, r)| r.event_id).collect();
    drop(ob);
    assert!(!spooled.is_empty(), "the first run spooled events before it stopped\n{log}");
    let mut c2 = c.clone();
    c2.cameras = vec![synthetic_camera("other", 4, 1, 0.0, 0.0)];
    let cfg2 = write_config(dir.path(), &c2);
    let mut d2 = Daemon::start(&cfg2, &[], &metrics);
    let got = consume_until(&brokers(), &topic, Duration::from_secs(60), |r| {
        let ids: BTreeSet<&str> = r.iter().map(|x| x.event.event_id.as_str()).collect();
        spooled.iter().all(|e| ids.contains(e.as_str()))
    })
    .unwrap();
    let ids: BTreeSet<&str> = got.iter().map(|x| x.event.event_id.as_str()).collect();
    let lost: Vec<&String> = spooled.iter().filter(|e| !ids.contains(e.as_str())).collect();
    assert!(lost.is_empty(), "spooled before the panic and never sent: {lost:?}\n{}", d2.log_text());
    let cam: BTreeSet<u64> = got.iter().filter(|x| x.event.camera_id == "cam").map(|x| x.event.frame_seq).collect();
    assert_eq!(cam, (0..cam.len() as u64).collect(), "from the first frame, without a gap: {cam:?}");
    assert_eq!(d2.terminate(Duration::from_secs(60)), Some(0), "{}", d2.log_text());
}
