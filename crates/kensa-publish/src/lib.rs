//! Protobuf events (`proto/kensa/v1/event.proto`, compiled by prost) and the Kafka producer.
//!
//! Every scored frame becomes one `InspectionEvent` on the results topic, keyed by camera id so
//! each camera's events stay in order; anomalous frames also go to the defects topic. Sends wait
//! for the broker's acknowledgement (`acks=all`); a full local queue is backpressure (the send
//! waits), not an error.

use kensa_core::config::KafkaConfig;
use kensa_core::grid::Cell;
use kensa_core::metrics as m;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use std::time::{Duration, Instant};

pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/kensa.v1.rs"));
}

pub use proto::InspectionEvent;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("Kafka brokers {brokers} unreachable after {waited_s} s: {last}. Check kafka.brokers and that the broker is up")]
    Unreachable { brokers: String, waited_s: u64, last: String },
    #[error("cannot create Kafka topic {topic}: {msg} (create it yourself, or check kafka.partitions and kafka.replication_factor)")]
    Topic { topic: String, msg: String },
    #[error("Kafka client config: {0}")]
    Config(String),
    #[error("Kafka did not acknowledge the event for {topic}: {msg}")]
    Delivery { topic: String, msg: String },
}

pub fn cell_to_proto(c: Cell) -> proto::Cell {
    use proto::Cell as P;
    match c {
        Cell::TopLeft => P::TopLeft,
        Cell::Top => P::Top,
        Cell::TopRight => P::TopRight,
        Cell::Left => P::Left,
        Cell::Center => P::Center,
        Cell::Right => P::Right,
        Cell::BottomLeft => P::BottomLeft,
        Cell::Bottom => P::Bottom,
        Cell::BottomRight => P::BottomRight,
    }
}

pub fn cell_from_proto(c: proto::Cell) -> Option<Cell> {
    Cell::ALL.into_iter().find(|&k| cell_to_proto(k) == c)
}

/// The librdkafka producer config for `cfg` (passthrough properties last, so they win).
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "kensa")
        .set("acks", "all")
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("socket.timeout.ms", "10000");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// Creates the topics that do not exist yet (an existing topic is left as it is).
pub async fn ensure_topics(cfg: &KafkaConfig, topics: &[&str]) -> Result<(), PublishError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> =
        client_config(cfg).create().map_err(|e| PublishError::Config(e.to_string()))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, cfg.partitions, TopicReplication::Fixed(cfg.replication_factor)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|e| PublishError::Topic { topic: topics.join(","), msg: e.to_string() })?;
    for r in results {
        match r {
            Ok(t) => tracing::info!(topic = %t, partitions = cfg.partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(PublishError::Topic { topic: t, msg: format!("{code:?}: {code}") }),
        }
    }
    Ok(())
}

/// Renders a librdkafka config for logs with secrets redacted.
pub fn redacted(cfg: &ClientConfig) -> String {
    let mut items: Vec<String> = cfg
        .config_map()
        .iter()
        .map(|(k, v)| {
            let secret = ["password", "secret", "key.pem", "token"].iter().any(|s| k.contains(s));
            format!("{k}={}", if secret { "<redacted>".to_string() } else { v.to_string() })
        })
        .collect();
    items.sort();
    items.join(" ")
}

#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    pub topic: String,
    pub defects_topic: String,
    timeout: Duration,
}

impl Publisher {
    /// Creates the producer and waits (retrying, with a log line per attempt) until the
    /// brokers answer, or fails after `kafka.connect_timeout_s` with a clear error.
    pub async fn connect(cfg: &KafkaConfig) -> Result<Self, PublishError> {
        let cc = client_config(cfg);
        tracing::info!(config = %redacted(&cc), "connecting to Kafka");
        let producer: FutureProducer = cc.create().map_err(|e| PublishError::Config(e.to_string()))?;
        let start = Instant::now();
        let deadline = Duration::from_secs(cfg.connect_timeout_s);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let p = producer.clone();
            let probe = Duration::from_secs(1);
            let res = tokio::task::spawn_blocking(move || p.client().fetch_metadata(None, probe).map(|_| ()))
                .await
                .expect("metadata probe thread");
            match res {
                Ok(()) => break,
                Err(e) => {
                    if start.elapsed() >= deadline {
                        return Err(PublishError::Unreachable {
                            brokers: cfg.brokers.clone(),
                            waited_s: start.elapsed().as_secs(),
                            last: e.to_string(),
                        });
                    }
                    tracing::warn!(brokers = %cfg.brokers, attempt, "Kafka not reachable yet ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        tracing::info!(brokers = %cfg.brokers, "Kafka reachable");
        if cfg.create_topics {
            ensure_topics(cfg, &[&cfg.topic, &cfg.defects_topic]).await?;
        }
        Ok(Self {
            producer,
            topic: cfg.topic.clone(),
            defects_topic: cfg.defects_topic.clone(),
            timeout: Duration::from_millis(cfg.message_timeout_ms),
        })
    }

    async fn send_one(&self, topic: &str, key: &str, payload: &[u8]) -> Result<(), PublishError> {
        let rec = FutureRecord::to(topic).key(key).payload(payload);
        match self.producer.send(rec, Timeout::After(self.timeout)).await {
            Ok(_) => {
                metrics::counter!(m::EVENTS_PUBLISHED, "topic" => topic.to_string()).increment(1);
                Ok(())
            }
            Err((e, _)) => {
                let reason = match e.rdkafka_error_code() {
                    Some(code) => format!("{code:?}"),
                    None => "client".to_string(),
                };
                metrics::counter!(m::PUBLISH_ERRORS, "topic" => topic.to_string(), "reason" => reason).increment(1);
                Err(PublishError::Delivery { topic: topic.to_string(), msg: e.to_string() })
            }
        }
    }

    /// Publishes one event (and, if anomalous, its copy on the defects topic), waiting for the
    /// acknowledgements.
    pub async fn publish(&self, ev: &InspectionEvent) -> Result<(), PublishError> {
        let payload = prost::Message::encode_to_vec(ev);
        if ev.anomalous {
            let (a, b) = tokio::join!(
                self.send_one(&self.topic, &ev.camera_id, &payload),
                self.send_one(&self.defects_topic, &ev.camera_id, &payload)
            );
            a.and(b)
        } else {
            self.send_one(&self.topic, &ev.camera_id, &payload).await
        }
    }

    /// Waits for everything queued to be delivered (blocking; call off the async runtime).
    pub fn flush(&self, timeout: Duration) -> Result<(), PublishError> {
        self.producer
            .flush(Timeout::After(timeout))
            .map_err(|e| PublishError::Delivery { topic: self.topic.clone(), msg: format!("flush: {e}") })
    }
}

/// An event as JSON (for `kensa tail`): every field, cells by name, the mask by size.
pub fn event_to_json(ev: &InspectionEvent) -> serde_json::Value {
    let cell = |c: i32| {
        proto::Cell::try_from(c).ok().and_then(cell_from_proto).map(|c| c.name()).unwrap_or("unspecified")
    };
    serde_json::json!({
        "event_id": ev.event_id,
        "camera": ev.camera_id,
        "product": ev.product,
        "frame": ev.frame_seq,
        "capture_time_unix_nanos": ev.capture_time_unix_nanos,
        "publish_time_unix_nanos": ev.publish_time_unix_nanos,
        "score": ev.score,
        "anomalous": ev.anomalous,
        "answer": ev.answer,
        "locations": ev.locations.iter().map(|&c| cell(c)).collect::<Vec<_>>(),
        "regions": ev.regions.iter().map(|r| serde_json::json!({
            "cell": cell(r.cell), "bbox": [r.x0, r.y0, r.x1, r.y1], "area": r.area, "peak": r.peak
        })).collect::<Vec<_>>(),
        "confidence": ev.confidence,
        "judge": ev.judge,
        "mask_png_bytes": ev.mask_png.len(),
        "width": ev.width,
        "height": ev.height,
        "bank_version": ev.bank_version,
        "model": ev.model_id,
        "kensa_version": ev.kensa_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_roundtrip_and_json_names_them() {
        for c in Cell::ALL {
            assert_eq!(cell_from_proto(cell_to_proto(c)), Some(c));
        }
        let ev = InspectionEvent {
            camera_id: "cam".into(),
            locations: vec![cell_to_proto(Cell::TopLeft) as i32],
            anomalous: true,
            ..Default::default()
        };
        let bytes = prost::Message::encode_to_vec(&ev);
        let back: InspectionEvent = prost::Message::decode(&bytes[..]).unwrap();
        assert_eq!(back, ev);
        let j = event_to_json(&back);
        assert_eq!(j["locations"][0], "top left");
        assert_eq!(j["camera"], "cam");
    }

    #[test]
    fn secrets_are_redacted() {
        let mut cfg = KafkaConfig::default();
        cfg.properties.insert("sasl.password".into(), "hunter2".into());
        let s = redacted(&client_config(&cfg));
        assert!(!s.contains("hunter2") && s.contains("sasl.password=<redacted>"), "{s}");
    }
}
