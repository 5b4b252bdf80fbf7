//! Reading Kensa's inbound topics: a small reader that follows a topic from its end (the
//! control topic, the feedback topic), and the feedback topic's `kensa.v1.Feedback` messages
//! turned into [`Feedback`] for the learner.

use crate::proto;
use kensa_core::config::KafkaConfig;
use kensa_core::feedback::{Feedback, FeedbackResult, Label};
use kensa_core::metrics as m;
use std::time::Duration;

/// Largest inbound message read (bigger ones are refused, counted by the caller).
pub const MAX_INBOUND_BYTES: usize = 64 << 10;

/// Follows `topic` (`what` it carries, for the log) from its current end as consumer group `group`, on the calling thread,
/// handing each message's payload (or the error) to `on_message` until it returns false.
/// Errors that stop the reader are logged; it returns then.
pub fn follow(
    kafka: &KafkaConfig,
    topic: &str,
    group: &str,
    what: &str,
    mut on_message: impl FnMut(Result<&[u8], String>) -> bool,
) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let mut cc = crate::client_config(kafka);
    cc.set("group.id", group).set("enable.auto.commit", "false");
    for k in ["acks", "enable.idempotence", "message.timeout.ms"] {
        cc.remove(k);
    }
    let consumer: BaseConsumer = match cc.create() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(topic, "cannot read the topic: {e}");
            return;
        }
    };
    let parts: Vec<i32> = match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
        Ok(md) => md
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(rdkafka::metadata::MetadataPartition::id))
            .collect(),
        Err(e) => {
            tracing::error!(topic, "cannot read the topic: {e}");
            return;
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        let _ = tpl.add_partition_offset(topic, p, Offset::End);
    }
    if let Err(e) = consumer.assign(&tpl) {
        tracing::error!(topic, "cannot read the topic: {e}");
        return;
    }
    tracing::info!(topic, "reading {what}");
    loop {
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            if !on_message(Ok(&[])) {
                return;
            }
            continue;
        };
        let go_on = match msg {
            Ok(m) => {
                let bytes = m.payload().unwrap_or_default();
                if bytes.len() > MAX_INBOUND_BYTES {
                    on_message(Err(format!("{} bytes is over the {MAX_INBOUND_BYTES}-byte limit", bytes.len())))
                } else {
                    on_message(Ok(bytes))
                }
            }
            Err(e) => on_message(Err(e.to_string())),
        };
        if !go_on {
            return;
        }
    }
}

/// A `kensa.v1.Feedback` message as the learner takes it.
pub fn decode_feedback(bytes: &[u8]) -> Result<Feedback, String> {
    use prost::Message;
    let p = proto::Feedback::decode(bytes).map_err(|e| format!("not a kensa.v1.Feedback: {e}"))?;
    let label = match proto::FeedbackLabel::try_from(p.label) {
        Ok(proto::FeedbackLabel::Normal) => Label::Normal,
        Ok(proto::FeedbackLabel::Defect) => Label::Defect,
        _ => return Err(format!("feedback for {} has no label (normal or defect)", p.event_id)),
    };
    let cells = p
        .cells
        .iter()
        .filter_map(|&c| proto::Cell::try_from(c).ok().and_then(crate::cell_from_proto))
        .map(|c| c.name().to_string())
        .collect();
    let fb = Feedback { event_id: p.event_id, label, who: p.who, cells };
    match fb.problem() {
        Some(problem) => Err(problem),
        None => Ok(fb),
    }
}

/// Encodes an answer as `kensa.v1.Feedback` (for producers of the topic and tests).
pub fn encode_feedback(fb: &Feedback, answered_unix_ms: i64) -> Vec<u8> {
    use prost::Message;
    let label = match fb.label {
        Label::Normal => proto::FeedbackLabel::Normal,
        Label::Defect => proto::FeedbackLabel::Defect,
    };
    proto::Feedback {
        event_id: fb.event_id.clone(),
        label: label as i32,
        cells: fb
            .cells
            .iter()
            .filter_map(|c| kensa_core::Cell::from_name(c))
            .map(|c| crate::cell_to_proto(c) as i32)
            .collect(),
        who: fb.who.clone(),
        answered_unix_ms,
    }
    .encode_to_vec()
}

/// Reads the feedback topic and hands every valid answer to the learner (`out`), one at a
/// time; a bad message is counted (`kensa_feedback_total{source="kafka",result="invalid"}`),
/// logged and skipped.
pub async fn consume(
    kafka: KafkaConfig,
    topic: String,
    out: tokio::sync::mpsc::Sender<(Feedback, tokio::sync::oneshot::Sender<FeedbackResult>)>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Feedback, String>>(16);
    let t = topic.clone();
    let reader = std::thread::Builder::new().name("kensa-feedback".into()).spawn(move || {
        follow(&kafka, &t, "kensa-feedback", "operator feedback", |m| match m {
            Ok([]) => !tx.is_closed(),
            Ok(bytes) => tx.blocking_send(decode_feedback(bytes)).is_ok(),
            Err(e) => tx.blocking_send(Err(e)).is_ok(),
        });
    });
    if let Err(e) = reader {
        tracing::error!(topic = %topic, "cannot start the feedback reader: {e}");
        return;
    }
    while let Some(fb) = rx.recv().await {
        match fb {
            Ok(fb) => {
                let (reply, result) = tokio::sync::oneshot::channel();
                let event = fb.event_id.clone();
                if out.send((fb, reply)).await.is_err() {
                    return;
                }
                if let Ok(r) = result.await {
                    tracing::info!(topic = %topic, event = %event, result = r.as_str(), "feedback");
                }
            }
            Err(e) => {
                metrics::counter!(m::FEEDBACK, "source" => "kafka", "result" => "invalid").increment(1);
                tracing::error!(topic = %topic, "bad feedback message ignored: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_round_trips_and_bad_messages_say_why() {
        let fb = Feedback {
            event_id: "cam1/18a/42".into(),
            label: Label::Defect,
            who: "op7".into(),
            cells: vec!["top left".into()],
        };
        assert_eq!(decode_feedback(&encode_feedback(&fb, 1)).unwrap(), fb);
        let mut unlabelled = encode_feedback(&fb, 1);
        unlabelled = {
            use prost::Message;
            let mut p = proto::Feedback::decode(unlabelled.as_slice()).unwrap();
            p.label = 0;
            p.encode_to_vec()
        };
        assert!(decode_feedback(&unlabelled).unwrap_err().contains("no label"));
        assert!(decode_feedback(b"\xff\xff\xff").unwrap_err().contains("not a kensa.v1.Feedback"));
        let bad_id = Feedback { event_id: "../x".into(), ..fb };
        assert!(decode_feedback(&encode_feedback(&bad_id, 1)).unwrap_err().contains("event_id"));
    }
}
