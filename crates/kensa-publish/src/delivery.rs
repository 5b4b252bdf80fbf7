//! Delivery, spool first: scored events → durable outbox (fsync per batch) → sender → Kafka →
//! acknowledged and forgotten.
//!
//! Two halves that never wait on each other:
//! - the **spooler** appends every scored event to the outbox. It waits on the disk only (a
//!   failed append is retried with backoff), never on Kafka: while the outbox has budget the
//!   stages before it run at full speed whatever the broker does. Only the budget policy drops,
//!   and every drop is counted with its reason.
//! - the **sender** takes spooled records from the outbox, oldest first, and keeps a bounded
//!   window of them in flight ([`WINDOW`] records, [`WINDOW_BYTES`]), handed to librdkafka in
//!   spool order, so each camera's events (keyed by camera, so one partition per camera) arrive
//!   in order: librdkafka's idempotent producer keeps a partition's order through its own
//!   retries. Acknowledgement is tracked per destination topic; a record leaves the outbox when
//!   every topic has it. When a copy fails (the message timeout passed, the broker fenced the
//!   producer), nothing new is queued: the sender waits until every copy in flight has its
//!   answer, rebuilds the producer if librdkafka declared it unusable, backs off, and queues the
//!   failed copies again in spool order. Copies Kafka refuses for good (too large, not
//!   authorised) go to the outbox's `rejected/` folder with the reason.
//!
//! On shutdown the spooler ends with its input and the sender gets `drain` to send what is
//! spooled; what remains stays in the outbox and is sent first at the next start.

use crate::outbox::{EntryId, Outbox, Refused, SpoolRecord};
use crate::{spool_record, InspectionEvent, Publisher};
use futures_util::stream::{FuturesUnordered, StreamExt};
use kensa_core::metrics::{
    self as m, Label, PublishFailure, EVENTS_REJECTED, OUTBOX_APPENDED, OUTBOX_BYTES, OUTBOX_DROPPED, OUTBOX_PENDING,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
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

/// The outbox backlog, as `/healthz` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Backlog {
    /// Events spooled and not yet acknowledged by Kafka.
    pub pending: u64,
    /// Bytes of outbox segments on disk.
    pub bytes: u64,
    /// How long the oldest of them has waited, in seconds.
    pub oldest_event_seconds: f64,
}

/// Records in flight at most (each with one copy per destination topic).
pub const WINDOW: usize = 512;
/// Bytes of records in flight at most (one record more if a single one is larger).
pub const WINDOW_BYTES: usize = 32 << 20;

/// The outbox shared by the two halves, and the spooler's "something new" signal.
struct Shared {
    outbox: Mutex<Outbox>,
    appended: Notify,
    backlog: watch::Sender<Backlog>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().expect("outbox lock")
    }

    /// Publishes the backlog gauges (call with the lock held: `ob` is the locked outbox).
    fn report(&self, ob: &Outbox) {
        let b = Backlog { pending: ob.pending(), bytes: ob.usage(), oldest_event_seconds: ob.oldest_pending_age_s() };
        metrics::gauge!(OUTBOX_BYTES).set(b.bytes as f64);
        metrics::gauge!(OUTBOX_PENDING).set(b.pending as f64);
        metrics::gauge!(m::OUTBOX_OLDEST).set(b.oldest_event_seconds);
        self.backlog.send_replace(b);
    }
}

/// Runs delivery until `scored` closes and everything spooled is acknowledged, or `drain` has
/// passed since it closed. `stopping` fires when the daemon shuts down: a batch the disk keeps
/// refusing is then given up, counted. `backlog` follows the outbox.
pub async fn run(
    publisher: Publisher,
    outbox: Outbox,
    scored: mpsc::Receiver<Scored>,
    s: Settings,
    stopping: CancellationToken,
    backlog: watch::Sender<Backlog>,
) -> Summary {
    if outbox.has_unsent() {
        tracing::info!(events = outbox.pending(), "sending the events an earlier run left in the outbox first");
    }
    // Every drop and rejection series exists from the start (at 0), so dashboards show it and
    // an alert on its increase fires on the first one.
    for r in Refused::ALL {
        metrics::counter!(OUTBOX_DROPPED, "reason" => r.as_str()).absolute(0);
    }
    for r in PublishFailure::ALL {
        metrics::counter!(EVENTS_REJECTED, "reason" => r.as_str()).absolute(0);
    }
    let shared = Arc::new(Shared { outbox: Mutex::new(outbox), appended: Notify::new(), backlog });
    shared.report(&shared.lock());
    let input_done = CancellationToken::new();
    let give_up = CancellationToken::new();
    let mut sender = tokio::spawn(send(shared.clone(), publisher.clone(), input_done.clone(), give_up.clone()));
    // The sender ends only once the input is done, so an earlier end is a panic: it is raised
    // here, which ends this stage with it and so the daemon (not ready, exit 1), rather than
    // spooling on while nothing is sent.
    let spooling = spool(&shared, scored, &s, &stopping);
    tokio::pin!(spooling);
    let dropped = tokio::select! {
        d = &mut spooling => d,
        r = &mut sender => {
            raise_panic(r);
            unreachable!("the sender ended before its input")
        }
    };
    input_done.cancel();
    match tokio::time::timeout(s.drain, &mut sender).await {
        Ok(r) => raise_panic(r),
        Err(_) => {
            give_up.cancel();
            raise_panic(sender.await);
        }
    }
    let _ = tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(5))).await;
    let ob = shared.lock();
    shared.report(&ob);
    Summary { dropped, remaining: ob.pending() }
}

/// Raises the sender's panic in the caller (its cancellation never happens: nothing aborts it).
fn raise_panic(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        if e.is_panic() {
            tracing::error!("the sender failed: {e}");
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// The spooler: every scored event into the outbox, in batches of what has arrived (up to 64),
/// one fsync per batch. Returns how many were dropped (budget, or a disk that still refused
/// them at shutdown).
async fn spool(shared: &Shared, mut scored: mpsc::Receiver<Scored>, s: &Settings, stopping: &CancellationToken) -> u64 {
    let mut dropped = 0;
    while let Some(first) = scored.recv().await {
        let mut batch = vec![first];
        while batch.len() < 64 {
            match scored.try_recv() {
                Ok(x) => batch.push(x),
                Err(_) => break,
            }
        }
        let recs: Vec<SpoolRecord> = batch
            .iter()
            .map(|x| spool_record(&x.event, &s.topic, &s.defects_topic, s.schema_registry_id))
            .filter(|rec| sendable(shared, rec, s.max_message_bytes))
            .collect();
        if recs.is_empty() {
            continue;
        }
        let mut wait = Duration::from_millis(200);
        let results: Vec<Result<EntryId, Refused>> = loop {
            let appended = tokio::task::block_in_place(|| {
                let mut ob = shared.lock();
                let r = ob.append(&recs);
                shared.report(&ob);
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
        for (rec, r) in recs.iter().zip(results) {
            match r {
                Ok(_) => metrics::counter!(OUTBOX_APPENDED).increment(1),
                Err(refused) => {
                    dropped += 1;
                    metrics::counter!(OUTBOX_DROPPED, "reason" => refused.as_str()).increment(1);
                    tracing::warn!(event = %rec.event_id, reason = refused.as_str(), "event dropped: not spooled");
                }
            }
        }
        shared.appended.notify_one();
    }
    dropped
}

/// Whether a record fits Kafka's message size; one that does not is kept in `rejected/` and
/// counted (or, if it cannot be kept, spooled anyway so it is never lost silently).
fn sendable(shared: &Shared, rec: &SpoolRecord, max: usize) -> bool {
    let size = rec.payload.len() + rec.header_values.iter().map(Vec::len).sum::<usize>();
    if size <= max {
        return true;
    }
    let reason = format!("event is {size} bytes, over kafka.max_message_bytes = {max}");
    match shared.lock().keep_rejected(rec, &reason) {
        Ok(kept) => {
            metrics::counter!(EVENTS_REJECTED, "reason" => PublishFailure::TooLarge.as_str()).increment(1);
            tracing::error!(event = %rec.event_id, kept = %kept.display(),
                "{reason}; not sent (lower publish.mask_max_side or raise the limit)");
            false
        }
        Err(e) => {
            tracing::error!(event = %rec.event_id, "{reason}, and it cannot be kept in rejected/ ({e}); it stays spooled");
            true
        }
    }
}

/// A spooled record in the sender's window.
struct Slot {
    id: EntryId,
    rec: SpoolRecord,
    /// Topics that have not acknowledged it yet.
    left: Vec<String>,
}

/// A copy's answer: (window position, topic, producer generation, result).
type Answer = (u64, String, u64, Result<(), rdkafka::error::KafkaError>);

/// The sender: see the module doc. Ends when the input is done and the outbox is empty, or
/// when `give_up` fires (what is in flight stays spooled).
async fn send(shared: Arc<Shared>, publisher: Publisher, input_done: CancellationToken, give_up: CancellationToken) {
    let mut window: BTreeMap<u64, Slot> = BTreeMap::new();
    let mut window_bytes = 0usize;
    let mut next = 0u64;
    let mut inflight: FuturesUnordered<futures_util::future::BoxFuture<'static, Answer>> = FuturesUnordered::new();
    // Copies that failed and wait to be queued again, in window order.
    let mut retry: BTreeSet<(u64, String)> = BTreeSet::new();
    let mut backoff = Duration::from_millis(200);
    let mut failures = 0u32;
    let mut retry_at = tokio::time::Instant::now();
    loop {
        // Queue new records only while nothing waits to be retried: a failed copy goes out
        // again before anything spooled after it.
        if retry.is_empty() {
            while window.len() < WINDOW && window_bytes < WINDOW_BYTES {
                let room = WINDOW - window.len();
                let taken = tokio::task::block_in_place(|| shared.lock().take(room, WINDOW_BYTES - window_bytes));
                if taken.is_empty() {
                    break;
                }
                for (id, rec) in taken {
                    assert!(
                        !kensa_core::fault::injected(kensa_core::fault::Point::SenderPanic),
                        "injected fault (KENSA_FAULT=sender-panic)"
                    );
                    let seq = next;
                    next += 1;
                    for topic in &rec.topics {
                        let copy = queue(&publisher, seq, &rec, topic).await;
                        inflight.push(copy);
                    }
                    window_bytes += rec.payload.len();
                    window.insert(seq, Slot { id, left: rec.topics.clone(), rec });
                }
            }
        }
        if window.is_empty() && input_done.is_cancelled() && !shared.lock().has_unsent() {
            return;
        }
        let retry_due = !retry.is_empty() && inflight.is_empty();
        tokio::select! {
            () = give_up.cancelled() => return,
            Some((seq, topic, generation, res)) = inflight.next(), if !inflight.is_empty() => {
                let Some(slot) = window.get_mut(&seq) else { continue };
                match res {
                    Ok(()) => {
                        publisher.acknowledged(&topic);
                        slot.left.retain(|t| *t != topic);
                        if failures > 0 && retry.is_empty() {
                            tracing::info!(after = failures, "Kafka acknowledges again");
                            failures = 0;
                            backoff = Duration::from_millis(200);
                        }
                        if slot.left.is_empty() {
                            let slot = window.remove(&seq).expect("slot in window");
                            window_bytes -= slot.rec.payload.len();
                            done(&shared, &slot);
                        }
                    }
                    Err(e) => {
                        let err = publisher.failed(generation, &topic, &e);
                        if err.fatal {
                            reject(&shared, slot, &err);
                            let slot = window.remove(&seq).expect("slot in window");
                            window_bytes -= slot.rec.payload.len();
                            retry.retain(|(s, _)| *s != seq);
                        } else {
                            failures += 1;
                            if failures == 1 || failures.is_multiple_of(100) {
                                tracing::warn!(event = %slot.rec.event_id, failures, "{err}; it is sent again from the outbox");
                            }
                            retry.insert((seq, topic));
                            retry_at = tokio::time::Instant::now() + backoff;
                        }
                    }
                }
            }
            () = tokio::time::sleep_until(retry_at), if retry_due => {
                for (seq, topic) in std::mem::take(&mut retry) {
                    if let Some(slot) = window.get(&seq) {
                        let copy = queue(&publisher, seq, &slot.rec, &topic).await;
                        inflight.push(copy);
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            () = shared.appended.notified(), if retry.is_empty() && window.len() < WINDOW => {}
            () = input_done.cancelled(), if !input_done.is_cancelled() => {}
        }
    }
}

/// Hands one copy to librdkafka and returns the future of its answer.
async fn queue(
    p: &Publisher,
    seq: u64,
    rec: &SpoolRecord,
    topic: &str,
) -> futures_util::future::BoxFuture<'static, Answer> {
    let (generation, queued) = p.enqueue(rec, topic).await;
    let topic = topic.to_string();
    Box::pin(async move {
        let res = match queued {
            Ok(delivery) => match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                Err(_) => Err(rdkafka::error::KafkaError::Canceled),
            },
            Err(e) => Err(e),
        };
        (seq, topic, generation, res)
    })
}

/// Every topic has the record: it leaves the outbox.
fn done(shared: &Shared, slot: &Slot) {
    let mut ob = shared.lock();
    ob.ack(slot.id);
    shared.report(&ob);
    drop(ob);
    if slot.rec.capture_unix_nanos > 0 {
        let now = crate::event::unix_nanos(std::time::SystemTime::now());
        let seconds = (now - slot.rec.capture_unix_nanos).max(0) as f64 / 1e9;
        metrics::histogram!(m::END_TO_END_LATENCY, "camera" => slot.rec.key.clone()).record(seconds);
    }
}

/// Kafka refused a copy for good: the record is kept in `rejected/` and leaves the outbox.
fn reject(shared: &Shared, slot: &Slot, err: &crate::SendError) {
    metrics::counter!(EVENTS_REJECTED, "reason" => err.reason.as_str()).increment(1);
    let mut ob = shared.lock();
    match ob.reject(slot.id, &slot.rec, &err.to_string()) {
        Ok(kept) => tracing::error!(event = %slot.rec.event_id, kept = %kept.display(), "{err}"),
        Err(keep) => tracing::error!(event = %slot.rec.event_id,
            "{err}; it cannot be kept in rejected/ ({keep}), so it stays spooled and is tried again at the next start"),
    }
    shared.report(&ob);
}
