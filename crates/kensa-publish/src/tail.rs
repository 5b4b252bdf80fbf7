//! `kensa tail`: events from a topic as JSON lines (a small consumer for operators and tests).

use crate::{decode_event, event_to_json, InspectionEvent, PublishError};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct TailArgs {
    /// Bootstrap servers.
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    topic: String,
    /// Start from the oldest retained event instead of the newest.
    #[arg(long)]
    from_beginning: bool,
    /// Stop after this many events.
    #[arg(long)]
    max: Option<u64>,
    /// Stop after this many seconds without an event.
    #[arg(long)]
    idle_timeout_s: Option<u64>,
    /// Only events of this camera.
    #[arg(long)]
    camera: Option<String>,
    /// Only anomalous events.
    #[arg(long)]
    anomalous_only: bool,
    /// Write each event's mask to DIR/<camera>_<frame>.png.
    #[arg(long)]
    masks: Option<PathBuf>,
}

/// Prints events as JSON lines on stdout until `--max`, `--idle-timeout-s` or the reader goes
/// away; returns how many were printed.
pub fn run(a: &TailArgs) -> Result<u64, PublishError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .set("group.id", "kensa-tail")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| PublishError::Consumer(format!("cannot create Kafka consumer: {e}")))?;
    let md = consumer.fetch_metadata(Some(&a.topic), Duration::from_secs(10)).map_err(|e| {
        PublishError::Consumer(format!("cannot reach Kafka at {} for topic {}: {e}", a.brokers, a.topic))
    })?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == a.topic)
        .flat_map(|t| t.partitions().iter().map(rdkafka::metadata::MetadataPartition::id))
        .collect();
    if parts.is_empty() {
        return Err(PublishError::Consumer(format!(
            "topic {} has no partitions on {} (does it exist?)",
            a.topic, a.brokers
        )));
    }
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition_offset(&a.topic, p, if a.from_beginning { Offset::Beginning } else { Offset::End })
            .map_err(|e| PublishError::Consumer(e.to_string()))?;
    }
    consumer.assign(&tpl).map_err(|e| PublishError::Consumer(e.to_string()))?;
    if let Some(d) = &a.masks {
        std::fs::create_dir_all(d).map_err(|source| PublishError::Write { path: d.clone(), source })?;
    }
    let mut n = 0u64;
    let mut last = Instant::now();
    loop {
        if a.max.is_some_and(|m| n >= m) {
            break;
        }
        if a.idle_timeout_s.is_some_and(|s| last.elapsed() > Duration::from_secs(s)) {
            break;
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else { continue };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                eprintln!("warning: {e}");
                continue;
            }
        };
        last = Instant::now();
        let Some(payload) = msg.payload() else { continue };
        let ev: InspectionEvent = match decode_event(payload) {
            Ok(ev) => ev,
            Err(e) => {
                eprintln!("warning: undecodable event at partition {} offset {}: {e}", msg.partition(), msg.offset());
                continue;
            }
        };
        if a.camera.as_ref().is_some_and(|c| *c != ev.camera_id) || (a.anomalous_only && !ev.anomalous) {
            continue;
        }
        if let Some(d) = &a.masks {
            // The camera id comes from whoever produced to the topic: it names a file only when
            // it is a safe name (no `/`, no `..`), so a mask can never land outside DIR.
            if kensa_core::config::safe_name(&ev.camera_id) {
                let p = d.join(format!("{}_{}.png", ev.camera_id, ev.frame_seq));
                std::fs::write(&p, &ev.mask_png).map_err(|source| PublishError::Write { path: p.clone(), source })?;
            } else {
                eprintln!(
                    "warning: event {:?} has camera id {:?}, not a safe file name; its mask is not written",
                    ev.event_id, ev.camera_id
                );
            }
        }
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{}", event_to_json(&ev)).and_then(|_| out.flush()).is_err() {
                break; // the reader went away (e.g. `| head`)
            }
        }
        n += 1;
    }
    Ok(n)
}
