//! Delivery: scored events → durable outbox (fsync per batch) → Kafka → acknowledged and
//! forgotten. Retriable errors are retried with capped backoff for as long as Kensa runs (the
//! event stays in the outbox meanwhile); fatal ones move the record to the outbox's
//! `rejected/` folder with the reason. On shutdown, in-flight sends get `drain` to finish; what
//! remains stays spooled and is sent at the next start.

use crate::outbox::{EntryId, Outbox, Refused, SpoolRecord};
use crate::{spool_record, InspectionEvent, Publisher};
use kensa_core::metrics::{
    self as m, Label, PublishFailure, EVENTS_REJECTED, OUTBOX_APPENDED, OUTBOX_BYTES, OUTBOX_DROPPED, OUTBOX_PENDING,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

/// A scored frame on its way to Kafka.
pub struct Scored {
    pub event: InspectionEvent,
    pub captured_at: Instant,
}

/// Where and how events are sent (from `[kafka]` and `[publish]`).
pub struct Settings {
    pub topic: String,
    pub defects_topic: String,
    pub schema_registry_id: Option<u32>,
    pub drain: Duration,
    pub max_message_bytes: usize,
}

impl Settings {
    /// The settings the config gives.
    pub fn from_config(kafka: &kensa_core::config::KafkaConfig, publish: &kensa_core::config::PublishConfig) -> Self {
        Self {
            topic: kafka.topic.clone(),
            defects_topic: kafka.defects_topic.clone(),
            schema_registry_id: publish.schema_registry_id,
            drain: Duration::from_secs(publish.drain_timeout_s),
            max_message_bytes: kafka.max_message_bytes,
        }
    }
}

/// What delivery ended with.
#[derive(Debug, Default)]
pub struct Summary {
    /// Refused by the outbox budget: lost, and counted.
    pub dropped: u64,
    /// Still spooled at exit (sent at the next start).
    pub remaining: u64,
}

const MAX_INFLIGHT: u32 = 512;

fn gauges(ob: &Outbox) {
    metrics::gauge!(OUTBOX_BYTES).set(ob.usage() as f64);
    metrics::gauge!(OUTBOX_PENDING).set(ob.pending() as f64);
    metrics::gauge!(m::OUTBOX_OLDEST).set(ob.oldest_pending_age_s());
}

/// Runs delivery until `scored` closes (`stopping` fires when the daemon shuts down: a batch the
/// disk keeps refusing is then given up, counted) and everything is acknowledged or `drain` has passed.
pub async fn run(
    publisher: Publisher,
    outbox: Outbox,
    pending: Vec<(EntryId, SpoolRecord)>,
    mut scored: mpsc::Receiver<Scored>,
    s: Settings,
    stopping: CancellationToken,
) -> Summary {
    let outbox = Arc::new(Mutex::new(outbox));
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT as usize));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut summary = Summary::default();
    gauges(&outbox.lock().expect("outbox lock"));
    if !pending.is_empty() {
        tracing::info!(events = pending.len(), "resending events left in the outbox by an earlier run");
    }
    for (id, rec) in pending {
        let permit = inflight.clone().acquire_owned().await.expect("semaphore open");
        let (p, ob, stop) = (publisher.clone(), outbox.clone(), stop_rx.clone());
        tokio::spawn(async move {
            deliver(&p, &ob, Some(id), rec, None, stop).await;
            drop(permit);
        });
    }
    while let Some(first) = scored.recv().await {
        let mut batch = vec![first];
        while batch.len() < 64 {
            match scored.try_recv() {
                Ok(x) => batch.push(x),
                Err(_) => break,
            }
        }
        let (batch, recs): (Vec<Scored>, Vec<SpoolRecord>) = batch
            .into_iter()
            .map(|x| {
                let rec = spool_record(&x.event, &s.topic, &s.defects_topic, s.schema_registry_id);
                (x, rec)
            })
            .filter(|(x, rec)| {
                let size = rec.payload.len() + rec.header_values.iter().map(Vec::len).sum::<usize>();
                if size <= s.max_message_bytes {
                    return true;
                }
                let reason = format!("event is {size} bytes, over kafka.max_message_bytes = {}", s.max_message_bytes);
                match outbox.lock().expect("outbox lock").keep_rejected(rec, &reason) {
                    Ok(kept) => {
                        metrics::counter!(EVENTS_REJECTED, "reason" => PublishFailure::TooLarge.as_str()).increment(1);
                        tracing::error!(camera = %x.event.camera_id, frame = x.event.frame_seq, kept = %kept.display(),
                            "{reason}; not sent (lower publish.mask_max_side or raise the limit)");
                        false
                    }
                    Err(e) => {
                        // Not kept aside: it stays in the outbox (and is tried again at every start).
                        tracing::error!(camera = %x.event.camera_id, frame = x.event.frame_seq,
                            "{reason}, and it cannot be kept in rejected/ ({e}); it stays spooled");
                        true
                    }
                }
            })
            .unzip();
        if batch.is_empty() {
            continue;
        }
        // Spooled before it is sent, always: a failed append (disk full) is retried with backoff,
        // holding the pipeline back, until the disk takes it.
        let mut wait = Duration::from_millis(200);
        let results: Vec<Result<EntryId, Refused>> = loop {
            let appended = tokio::task::block_in_place(|| {
                let mut ob = outbox.lock().expect("outbox lock");
                let r = ob.append(&recs);
                gauges(&ob);
                r
            });
            match appended {
                Ok(r) => break r,
                Err(e) => {
                    tracing::error!(
                        events = recs.len(),
                        retry_in_ms = wait.as_millis() as u64,
                        "{e}; the events wait in memory and are not sent until they are spooled"
                    );
                    // Shutting down and the disk still refuses: these events are lost, counted.
                    if stopping.is_cancelled() {
                        break recs.iter().map(|_| Err(Refused::WriteFailed)).collect();
                    }
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stopping.cancelled() => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        };
        // Each record with its outbox id; records refused by the budget are dropped here, counted.
        let accepted: Vec<(Scored, SpoolRecord, Option<EntryId>)> = {
            batch
                .into_iter()
                .zip(recs)
                .zip(results)
                .filter_map(|((x, rec), r)| match r {
                    Ok(id) => {
                        metrics::counter!(OUTBOX_APPENDED).increment(1);
                        Some((x, rec, Some(id)))
                    }
                    Err(refused) => {
                        summary.dropped += 1;
                        metrics::counter!(OUTBOX_DROPPED, "reason" => refused.as_str()).increment(1);
                        tracing::warn!(camera = %x.event.camera_id, frame = x.event.frame_seq, reason = refused.as_str(),
                            "event dropped: not spooled");
                        None
                    }
                })
                .collect()
        };
        for (x, rec, id) in accepted {
            let permit = inflight.clone().acquire_owned().await.expect("semaphore open");
            let (p, ob, stop) = (publisher.clone(), outbox.clone(), stop_rx.clone());
            let origin = Some((x.captured_at, x.event.camera_id.clone()));
            tokio::spawn(async move {
                deliver(&p, &ob, id, rec, origin, stop).await;
                drop(permit);
            });
        }
    }
    // Input closed: give in-flight sends `drain` to finish.
    let all = tokio::time::timeout(s.drain, inflight.clone().acquire_many_owned(MAX_INFLIGHT)).await;
    if all.is_err() {
        let _ = stop_tx.send(true);
        let _ = inflight.acquire_many(MAX_INFLIGHT).await;
    }
    let p = publisher.clone();
    let _ = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(5))).await;
    let ob = outbox.lock().expect("outbox lock");
    gauges(&ob);
    summary.remaining = ob.pending();
    summary
}

async fn deliver(
    p: &Publisher,
    outbox: &Arc<Mutex<Outbox>>,
    id: Option<EntryId>,
    rec: SpoolRecord,
    origin: Option<(Instant, String)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    let mut attempt = 0u32;
    // Acknowledgement is per destination: a topic that has the record is not sent it again
    // (a missing defects topic never re-sends results).
    let mut topics = rec.topics.clone();
    loop {
        attempt += 1;
        let res = tokio::select! {
            r = p.send(&rec, &mut topics) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match res {
            Ok(()) => {
                if let Some(id) = id {
                    let mut ob = outbox.lock().expect("outbox lock");
                    ob.ack(id);
                    gauges(&ob);
                }
                if let Some((t, camera)) = origin {
                    metrics::histogram!(m::END_TO_END_LATENCY, "camera" => camera).record(t.elapsed().as_secs_f64());
                }
                return;
            }
            Err(e) if e.fatal => {
                metrics::counter!(EVENTS_REJECTED, "reason" => e.reason.as_str()).increment(1);
                match id.map(|id| outbox.lock().expect("outbox lock").reject(id, &rec, &e.to_string())) {
                    Some(Ok(kept)) => tracing::error!(event = %rec.event_id, kept = %kept.display(), "{e}"),
                    Some(Err(keep)) => tracing::error!(event = %rec.event_id,
                        "{e}; it cannot be kept in rejected/ ({keep}), so it stays spooled and is tried again at the next start"),
                    None => tracing::error!(event = %rec.event_id, "{e}"),
                }
                return;
            }
            Err(e) => {
                if attempt == 1 || attempt.is_multiple_of(20) {
                    tracing::warn!(event = %rec.event_id, attempt, "{e}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
