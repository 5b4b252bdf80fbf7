//! Protobuf events (`proto/kensa/v1/event.proto`, compiled by prost) and the Kafka producer.
//!
//! Every scored frame becomes one `InspectionEvent` on the results topic, keyed by camera id so
//! each camera's events stay in order; anomalous frames also go to the defects topic. Sends wait
//! for the broker's acknowledgement (`acks=all`); a full local queue is backpressure (the send
//! waits), not an error.
//!
//! # Layout
//! - this module: the protobuf types ([`proto`]), the Kafka client config, the [`Publisher`],
//!   spool records and their CloudEvents headers, JSON for `kensa tail`, and [`PublishError`],
//!   the crate's one error enum.
//! - [`event`]: a judged frame → an `InspectionEvent`.
//! - [`feedback`]: following inbound topics; the feedback topic's `kensa.v1.Feedback`.
//! - [`outbox`]: the durable on-disk spool and its recovery.
//! - [`delivery`]: the stage that spools events and sends them until acknowledged.
//! - [`tail`]: `kensa tail`, a small consumer.

use kensa_core::config::KafkaConfig;
use kensa_core::grid::Cell;
use kensa_core::metrics::{self as m, Label, PublishFailure};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use std::time::{Duration, Instant};

pub mod delivery;
pub mod event;
pub mod feedback;
pub mod outbox;
pub mod tail;

pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/kensa.v1.rs"));
}

pub use proto::InspectionEvent;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A consumer (`kensa tail`, the control topic) could not read.
    #[error("{0}")]
    Consumer(String),
    #[error("cannot write {path}: {source}")]
    Write { path: std::path::PathBuf, source: std::io::Error },
    /// The durable outbox could not be read or written.
    #[error("outbox {path}: {source}")]
    Outbox { path: std::path::PathBuf, source: std::io::Error },
    #[error(
        "Kafka brokers {brokers} unreachable after {waited_s} s: {last}. Check kafka.brokers and that the broker is up"
    )]
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
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("socket.timeout.ms", "10000")
        // librdkafka waits 5 ms by default to fill a produce batch; events come in bursts of a
        // model batch already, so 1 ms keeps the capture→ack latency low (overridable below).
        .set("linger.ms", "1");
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
            let secret = kensa_core::config::is_secret_key(k);
            format!("{k}={}", if secret { "<redacted>".to_string() } else { v.to_string() })
        })
        .collect();
    items.sort();
    items.join(" ")
}

#[derive(Clone)]
pub struct Publisher {
    /// The producer in use and its generation; replaced when librdkafka reports a fatal error
    /// (a fenced idempotent producer), which no retry on the same producer can get past.
    producer: std::sync::Arc<std::sync::RwLock<(u64, FutureProducer)>>,
    /// What a replacement producer is built from.
    config: ClientConfig,
    pub topic: String,
    pub defects_topic: String,
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
        // Series that dashboards and alerts read exist from the start (at 0), not only after
        // the first delivery or the first timeout.
        for t in [&cfg.topic, &cfg.defects_topic] {
            metrics::counter!(m::EVENTS_PUBLISHED, "topic" => t.clone()).absolute(0);
            metrics::counter!(m::PUBLISH_ERRORS, "topic" => t.clone(), "reason" => PublishFailure::TimedOut.as_str())
                .absolute(0);
        }
        if cfg.create_topics {
            ensure_topics(cfg, &[&cfg.topic, &cfg.defects_topic]).await?;
        } else {
            for topic in [cfg.topic.clone(), cfg.defects_topic.clone()] {
                let p = producer.clone();
                let t = topic.clone();
                let md =
                    tokio::task::spawn_blocking(move || p.client().fetch_metadata(Some(&t), Duration::from_secs(5)))
                        .await
                        .expect("metadata thread");
                let exists = md.is_ok_and(|m| {
                    m.topics().iter().any(|x| x.name() == topic && x.error().is_none() && !x.partitions().is_empty())
                });
                if !exists {
                    tracing::error!(topic = %topic, "Kafka topic {topic} does not exist and kafka.create_topics is false: events wait in the outbox until it is created");
                }
            }
        }
        Ok(Self {
            producer: std::sync::Arc::new(std::sync::RwLock::new((0, producer))),
            config: cc,
            topic: cfg.topic.clone(),
            defects_topic: cfg.defects_topic.clone(),
        })
    }

    /// Hands one spooled record's copy for `topic` to librdkafka, which sends it in order with
    /// the others of its partition (and retries it internally). Resolves to the broker's answer;
    /// the producer generation it was queued on goes with any error to [`Publisher::failed`].
    /// librdkafka's own queue being full is backpressure: this waits.
    pub async fn enqueue(
        &self,
        rec: &outbox::SpoolRecord,
        topic: &str,
    ) -> (u64, Result<rdkafka::producer::DeliveryFuture, rdkafka::error::KafkaError>) {
        let mut headers = OwnedHeaders::new_with_capacity(rec.header_names.len());
        for (k, v) in rec.header_names.iter().zip(&rec.header_values) {
            headers = headers.insert(Header { key: k, value: Some(v) });
        }
        let (generation, producer) = self.current();
        let mut r = FutureRecord::to(topic).key(&rec.key).payload(&rec.payload).headers(headers);
        loop {
            match producer.send_result(r) {
                Ok(delivery) => return (generation, Ok(delivery)),
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    r = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => return (generation, Err(e)),
            }
        }
    }

    /// Counts an acknowledged copy.
    pub fn acknowledged(&self, topic: &str) {
        metrics::counter!(m::EVENTS_PUBLISHED, "topic" => topic.to_string()).increment(1);
    }

    /// Classifies and counts a failed copy. A producer that librdkafka declared unusable (fenced,
    /// a fatal idempotence error) is replaced, once per generation: the copy is then retriable
    /// on the new producer like any other.
    pub fn failed(&self, generation: u64, topic: &str, e: &rdkafka::error::KafkaError) -> SendError {
        let code = e.rdkafka_error_code();
        let reason = failure_of(code);
        metrics::counter!(m::PUBLISH_ERRORS, "topic" => topic.to_string(), "reason" => reason.as_str()).increment(1);
        let mut err = SendError {
            producer_state: needs_new_producer(code),
            fatal: is_fatal(code),
            reason,
            topic: topic.to_string(),
            msg: e.to_string(),
        };
        let (current, producer) = self.current();
        if current == generation {
            let why = match producer.client().fatal_error() {
                Some((code, reason)) => Some(format!("{code:?}: {reason}")),
                None if err.producer_state => Some(err.msg.clone()),
                None => None,
            };
            if let Some(why) = why {
                self.rebuild(generation, &why);
                err.fatal = false;
            }
        } else if err.producer_state {
            err.fatal = false;
        }
        err
    }

    fn current(&self) -> (u64, FutureProducer) {
        let g = self.producer.read().expect("producer lock");
        (g.0, g.1.clone())
    }

    /// Replaces the producer of `generation` (once: concurrent callers see the new one).
    fn rebuild(&self, generation: u64, why: &str) {
        let mut g = self.producer.write().expect("producer lock");
        if g.0 != generation {
            return;
        }
        match self.config.create::<FutureProducer>() {
            Ok(p) => {
                *g = (generation + 1, p);
                metrics::counter!(m::PRODUCER_REBUILDS).increment(1);
                tracing::error!("librdkafka fatal error ({why}): the producer was rebuilt; unacknowledged events are sent again from the outbox");
            }
            Err(e) => tracing::error!("librdkafka fatal error ({why}), and a new producer cannot be made: {e}"),
        }
    }

    /// Whether the brokers answer a metadata request (blocking; call off the async runtime).
    pub fn reachable(&self, timeout: Duration) -> bool {
        self.current().1.client().fetch_metadata(Some(&self.topic), timeout).is_ok()
    }

    /// Waits for everything queued to be delivered (blocking; call off the async runtime).
    pub fn flush(&self, timeout: Duration) -> Result<(), PublishError> {
        self.current()
            .1
            .flush(Timeout::After(timeout))
            .map_err(|e| PublishError::Delivery { topic: self.topic.clone(), msg: format!("flush: {e}") })
    }
}

/// A failed send: `fatal` ones will never succeed (too large, not authorised, invalid topic).
#[derive(Debug, Clone)]
pub struct SendError {
    pub fatal: bool,
    /// The broker no longer accepts this producer's id or epoch (fenced): retrying needs a new
    /// producer.
    pub producer_state: bool,
    pub reason: PublishFailure,
    pub topic: String,
    pub msg: String,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.fatal { "rejected for good" } else { "not acknowledged (will retry)" };
        write!(f, "Kafka {kind} on {}: {}", self.topic, self.msg)
    }
}

/// The `reason` label of a librdkafka error code.
pub fn failure_of(code: Option<RDKafkaErrorCode>) -> PublishFailure {
    use RDKafkaErrorCode as C;
    match code {
        Some(C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut) => PublishFailure::TimedOut,
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => PublishFailure::TooLarge,
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition) => PublishFailure::UnknownTopic,
        Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed | C::Authentication) => {
            PublishFailure::NotAuthorized
        }
        Some(
            C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic
            | C::InvalidArgument
            | C::KeySerialization
            | C::ValueSerialization,
        ) => PublishFailure::Invalid,
        Some(C::BrokerTransportFailure | C::AllBrokersDown | C::Resolve | C::NetworkException) => {
            PublishFailure::Transport
        }
        _ => PublishFailure::Other,
    }
}

/// Errors after which the idempotent producer's id or epoch is no longer accepted (after a
/// broker pause tansu answers `ProducerFenced`): only a new producer gets past them.
pub fn needs_new_producer(code: Option<RDKafkaErrorCode>) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        Some(
            C::ProducerFenced
                | C::InvalidProducerEpoch
                | C::OutOfOrderSequenceNumber
                | C::UnknownProducerId
                | C::InvalidProducerIdMapping
                | C::Fatal
        )
    )
}

/// Errors that retrying cannot fix.
pub fn is_fatal(code: Option<RDKafkaErrorCode>) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::InvalidTopic
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidArgument
                | C::KeySerialization
                | C::ValueSerialization
        )
    )
}

/// The CloudEvents type of Kensa's events.
pub const CE_TYPE: &str = "com.kensa.inspection.v1";
/// The schema name carried in `ce_dataschema`.
pub const SCHEMA_NAME: &str = "kensa.v1.InspectionEvent";

/// The spool record for an event: payload (optionally in Confluent Schema Registry framing),
/// key = camera id, CloudEvents binary-mode headers, and its topics.
pub fn spool_record(
    ev: &InspectionEvent,
    topic: &str,
    defects_topic: &str,
    schema_registry_id: Option<u32>,
) -> outbox::SpoolRecord {
    let body = prost::Message::encode_to_vec(ev);
    let payload = match schema_registry_id {
        None => body,
        Some(id) => {
            // Magic byte 0, schema id (big endian), message-index list [0] encoded as one 0 byte.
            let mut v = Vec::with_capacity(body.len() + 6);
            v.push(0);
            v.extend_from_slice(&id.to_be_bytes());
            v.push(0);
            v.extend_from_slice(&body);
            v
        }
    };
    let source = format!("/kensa/{}/{}", if ev.line.is_empty() { "default" } else { &ev.line }, ev.camera_id);
    let secs = ev.capture_time_unix_nanos.div_euclid(1_000_000_000);
    let nanos = ev.capture_time_unix_nanos.rem_euclid(1_000_000_000) as u32;
    let headers: Vec<(&str, String)> = vec![
        ("ce_specversion", "1.0".into()),
        ("ce_id", ev.event_id.clone()),
        ("ce_type", CE_TYPE.into()),
        ("ce_source", source),
        ("ce_time", rfc3339(secs, nanos)),
        ("ce_subject", ev.camera_id.clone()),
        ("ce_dataschema", SCHEMA_NAME.into()),
        ("content-type", "application/protobuf".into()),
    ];
    let mut topics = vec![topic.to_string()];
    if ev.anomalous {
        topics.push(defects_topic.to_string());
    }
    outbox::SpoolRecord {
        event_id: ev.event_id.clone(),
        topics,
        key: ev.camera_id.clone(),
        payload,
        header_names: headers.iter().map(|(k, _)| k.to_string()).collect(),
        header_values: headers.into_iter().map(|(_, v)| v.into_bytes()).collect(),
        anomalous: ev.anomalous,
        slot: 0,
        capture_unix_nanos: ev.capture_time_unix_nanos,
    }
}

/// Decodes a payload, plain protobuf or in Schema Registry framing (a protobuf message never
/// starts with byte 0, so the two cannot be confused).
pub fn decode_event(payload: &[u8]) -> Result<InspectionEvent, prost::DecodeError> {
    if payload.first() == Some(&0) && payload.len() >= 6 {
        // Skip magic + id, then the message-index list (varint count, then that many varints).
        let mut rest = &payload[5..];
        let count = prost::encoding::decode_varint(&mut rest)?;
        for _ in 0..count {
            prost::encoding::decode_varint(&mut rest)?;
        }
        return prost::Message::decode(rest);
    }
    prost::Message::decode(payload)
}

/// RFC 3339 UTC time from Unix seconds and nanoseconds (no date crate needed for this).
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil-from-days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

/// An event as JSON (for `kensa tail`): every field, cells by name, the mask by size.
pub fn event_to_json(ev: &InspectionEvent) -> serde_json::Value {
    let cell =
        |c: i32| proto::Cell::try_from(c).ok().and_then(cell_from_proto).map_or("unspecified", kensa_core::Cell::name);
    serde_json::json!({
        "event_id": ev.event_id,
        "camera": ev.camera_id,
        "product": ev.product,
        "frame": ev.frame_seq,
        "part_id": ev.part_id,
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
        "line": ev.line,
        "station": ev.station,
        "stages": ev.stages.iter().map(|s| serde_json::json!({"stage": s.stage, "seconds": s.seconds})).collect::<Vec<_>>(),
        "verdicts": ev.verdicts.iter().map(|v| serde_json::json!({
            "judge": v.judge, "anomalous": v.anomalous, "answer": v.answer, "confidence": v.confidence
        })).collect::<Vec<_>>(),
        "mask_width": ev.mask_width,
        "mask_height": ev.mask_height,
        "map_path": ev.map_path,
        "snapshot_path": ev.snapshot_path,
        "overlay_path": ev.overlay_path,
        "snapshot_url": ev.snapshot_url,
        "map_url": ev.map_url,
        "overlay_url": ev.overlay_url,
        "judges_agree": ev.judges_agree,
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
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339(1_795_607_471, 123_000_000), "2026-11-25T11:51:11.123000000Z");
    }

    #[test]
    fn schema_registry_framing_roundtrips_and_headers_are_cloudevents() {
        let ev = InspectionEvent {
            event_id: "c/1/0".into(),
            camera_id: "c".into(),
            anomalous: true,
            score: 0.5,
            ..Default::default()
        };
        for id in [None, Some(42)] {
            let rec = spool_record(&ev, "r", "d", id);
            assert_eq!(rec.topics, ["r", "d"]);
            if id.is_some() {
                assert_eq!(&rec.payload[..6], &[0, 0, 0, 0, 42, 0]);
            }
            assert_eq!(decode_event(&rec.payload).unwrap(), ev);
            let h: std::collections::HashMap<_, _> = rec.header_names.iter().zip(&rec.header_values).collect();
            assert_eq!(h[&"ce_id".to_string()], b"c/1/0");
            assert_eq!(h[&"ce_specversion".to_string()], b"1.0");
            assert_eq!(h[&"content-type".to_string()], b"application/protobuf");
        }
        let normal = InspectionEvent { anomalous: false, ..ev };
        assert_eq!(spool_record(&normal, "r", "d", None).topics, ["r"]);
    }

    #[test]
    fn fatal_and_retriable_errors_are_told_apart() {
        assert!(is_fatal(Some(RDKafkaErrorCode::MessageSizeTooLarge)));
        assert!(is_fatal(Some(RDKafkaErrorCode::TopicAuthorizationFailed)));
        assert!(!is_fatal(Some(RDKafkaErrorCode::MessageTimedOut)));
        assert!(!is_fatal(Some(RDKafkaErrorCode::BrokerTransportFailure)));
        assert!(!is_fatal(Some(RDKafkaErrorCode::UnknownTopicOrPartition)));
    }

    #[test]
    fn secrets_are_redacted() {
        let mut cfg = KafkaConfig::default();
        cfg.properties.insert("sasl.password".into(), "hunter2".into());
        let s = redacted(&client_config(&cfg));
        assert!(!s.contains("hunter2") && s.contains("sasl.password=<redacted>"), "{s}");
    }
}
