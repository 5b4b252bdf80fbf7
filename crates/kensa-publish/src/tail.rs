//! `kensa tail`: events from a topic as JSON lines (a small consumer for operators and tests).

use crate::{decode_event, event_to_json, InspectionEvent, PublishError};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct TailArgs {
    /// A Kensa config file: its `[kafka]` brokers, results topic and properties (TLS, SASL;
    /// secrets from `${VAR}` and `KEY_file`) are used. The flags below override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Bootstrap servers (default: the config's, else 127.0.0.1:9092).
    #[arg(long)]
    brokers: Option<String>,
    /// Topic to read (default: the config's results topic, else kensa.results).
    #[arg(long)]
    topic: Option<String>,
    /// A librdkafka property, like kcat's -X (repeatable): `-X security.protocol=SSL`.
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_property)]
    property: Vec<(String, String)>,
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

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

/// The Kafka settings `tail` uses: the config file's `[kafka]` (if any), then the flags.
fn kafka_settings(a: &TailArgs) -> Result<kensa_core::config::KafkaConfig, PublishError> {
    let mut k = match &a.config {
        Some(path) => {
            kensa_core::config::KensaConfig::load_kafka(path).map_err(|e| PublishError::Config(e.to_string()))?
        }
        None => kensa_core::config::KafkaConfig::default(),
    };
    if let Some(b) = &a.brokers {
        k.brokers.clone_from(b);
    }
    if let Some(t) = &a.topic {
        k.topic.clone_from(t);
    }
    k.properties.extend(a.property.iter().cloned());
    Ok(k)
}

/// A consumer context that keeps librdkafka's last error-level log line (a failed TLS handshake,
/// a refused SASL login), logged from librdkafka's own threads before the request that needed
/// the connection fails, so the error `tail` reports names the real cause.
#[derive(Default)]
struct Witness(std::sync::Mutex<Option<String>>);

impl Witness {
    fn last(&self) -> Option<String> {
        self.0.lock().ok().and_then(|g| g.clone())
    }
}

impl rdkafka::ClientContext for Witness {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, line: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if matches!(level, L::Emerg | L::Alert | L::Critical | L::Error) {
            if let Ok(mut g) = self.0.lock() {
                *g = Some(line.to_string());
            }
        }
        rdkafka::client::DefaultClientContext.log(level, fac, line);
    }
}

impl rdkafka::consumer::ConsumerContext for Witness {}

/// Prints events as JSON lines on stdout until `--max`, `--idle-timeout-s` or the reader goes
/// away; returns how many were printed.
pub fn run(a: &TailArgs) -> Result<u64, PublishError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let k = kafka_settings(a)?;
    let (brokers, topic) = (&k.brokers, &k.topic);
    let mut cc = rdkafka::ClientConfig::new();
    cc.set("bootstrap.servers", brokers).set("group.id", "kensa-tail").set("enable.auto.commit", "false");
    for (key, v) in &k.properties {
        cc.set(key, v);
    }
    let consumer: BaseConsumer<Witness> = cc
        .create_with_context(Witness::default())
        .map_err(|e| PublishError::Consumer(format!("cannot create Kafka consumer: {e}")))?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).map_err(|e| {
        let why = consumer.context().last().map(|w| format!(" (the broker connection said: {w})")).unwrap_or_default();
        PublishError::Consumer(format!("cannot reach Kafka at {brokers} for topic {topic}: {e}{why}"))
    })?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(rdkafka::metadata::MetadataPartition::id))
        .collect();
    if parts.is_empty() {
        return Err(PublishError::Consumer(format!("topic {topic} has no partitions on {brokers} (does it exist?)")));
    }
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition_offset(topic, p, if a.from_beginning { Offset::Beginning } else { Offset::End })
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
