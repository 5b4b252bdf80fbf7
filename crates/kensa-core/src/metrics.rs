//! Every metric name Kensa exports, with its description, and every label value, in one place.
//! Labels: `camera`, `product`, `reason`, `result`, `topic`, `stage`, `state` only (never frame
//! ids); each label's values are an enum here, so a value cannot be misspelt or invented.

pub const FRAMES_CAPTURED: &str = "kensa_frames_captured_total";
pub const FRAMES_DROPPED: &str = "kensa_frames_dropped_total";
pub const FRAMES_SCORED: &str = "kensa_frames_scored_total";
pub const ANOMALIES: &str = "kensa_anomalies_total";
pub const EVENTS_PUBLISHED: &str = "kensa_events_published_total";
pub const PUBLISH_ERRORS: &str = "kensa_publish_errors_total";
pub const END_TO_END_LATENCY: &str = "kensa_end_to_end_latency_seconds";
pub const SCORE_LATENCY: &str = "kensa_score_batch_seconds";
pub const BATCH_LATENCY: &str = "kensa_model_batch_seconds";
pub const STAGE_LATENCY: &str = "kensa_stage_latency_seconds";
pub const BATCH_SIZE: &str = "kensa_batch_size";
pub const IMAGE_SCORE: &str = "kensa_image_score";
pub const CAMERA_UP: &str = "kensa_camera_up";
pub const QUEUE_DEPTH: &str = "kensa_queue_depth";
pub const JUDGE_DISAGREEMENTS: &str = "kensa_judge_disagreements_total";
pub const CAMERA_ERRORS: &str = "kensa_camera_errors_total";
pub const CAMERA_STATE: &str = "kensa_camera_state";
pub const CAMERA_RECONNECTS: &str = "kensa_camera_reconnects_total";
pub const OUTBOX_BYTES: &str = "kensa_outbox_bytes";
pub const OUTBOX_PENDING: &str = "kensa_outbox_events";
pub const OUTBOX_APPENDED: &str = "kensa_outbox_appended_total";
pub const OUTBOX_DROPPED: &str = "kensa_outbox_dropped_total";
pub const EVENTS_REJECTED: &str = "kensa_events_rejected_total";
pub const OUTBOX_OLDEST: &str = "kensa_outbox_oldest_event_seconds";
pub const OUTBOX_DISCARDED: &str = "kensa_outbox_discarded_total";
pub const OUTBOX_WRITE_ERRORS: &str = "kensa_outbox_write_errors_total";
pub const MODEL_INFO: &str = "kensa_model_info";
pub const BANK_INFO: &str = "kensa_bank_info";
pub const BANK_RELOADS: &str = "kensa_bank_reloads_total";
pub const CONTROL_ERRORS: &str = "kensa_control_errors_total";
pub const LM_JUDGEMENTS: &str = "kensa_lm_judgements_total";
pub const BUILD_INFO: &str = "kensa_build_info";
pub const PRODUCER_REBUILDS: &str = "kensa_producer_rebuilds_total";
pub const FEEDBACK: &str = "kensa_feedback_total";
pub const LEARNED: &str = "kensa_bank_learning_total";
pub const FRAMES_HELD: &str = "kensa_frames_held";
pub const QUESTIONS: &str = "kensa_questions_total";

/// A label value: one enum per label, rendered in snake case.
pub trait Label: Copy {
    fn as_str(self) -> &'static str;
}

macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }
        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
        }
        impl Label for $name {
            fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_enum! {
    /// Why a frame was dropped before scoring (`reason` of [`FRAMES_DROPPED`]).
    DropReason {
        /// The scoring queue was full and the camera's policy is `drop`.
        QueueFull => "queue_full",
        /// An image file in a folder camera could not be decoded.
        CorruptImage => "corrupt_image",
        /// A frame whose size or format did not match the caps.
        BadFrame => "bad_frame",
        /// The model failed on the batch that held the frame.
        ScoringFailed => "scoring_failed",
        /// The camera's product has no loaded bank.
        NoBank => "no_bank",
    }
}

label_enum! {
    /// Why Kafka did not acknowledge an event (`reason` of [`PUBLISH_ERRORS`] and
    /// [`EVENTS_REJECTED`]).
    PublishFailure {
        /// No acknowledgement within `kafka.message_timeout_ms` (broker down or slow).
        TimedOut => "timed_out",
        /// Over `kafka.max_message_bytes` or the broker's limit.
        TooLarge => "too_large",
        /// The topic does not exist (yet).
        UnknownTopic => "unknown_topic",
        /// The credentials may not write the topic.
        NotAuthorized => "not_authorized",
        /// The broker refused the record or topic as invalid.
        Invalid => "invalid",
        /// Connection or transport errors.
        Transport => "transport",
        /// Any other librdkafka error.
        Other => "other",
    }
}

label_enum! {
    /// Why the outbox refused an event (`reason` of [`OUTBOX_DROPPED`]).
    OutboxRefusal {
        /// A normal result while the spool is over 80 % of its budget.
        FullNormal => "outbox_full_normal",
        /// A defect while the spool is at its budget.
        FullDefect => "outbox_full_defect",
        /// The disk refused the append until the daemon shut down.
        WriteFailed => "outbox_write_failed",
    }
}

label_enum! {
    /// Why spooled bytes were discarded when the outbox was opened (`reason` of
    /// [`OUTBOX_DISCARDED`]).
    OutboxDiscard {
        /// A whole record whose checksum or encoding is wrong (a flipped bit on disk): that
        /// record alone is lost.
        Corrupt => "corrupt",
        /// An unreadable stretch of a segment skipped to the next whole record (a damaged
        /// length field), counted once per stretch.
        Garbled => "garbled",
        /// The incomplete last record of a segment (a crash mid-append), truncated away; it
        /// was never reported spooled.
        TornTail => "torn_tail",
    }
}

label_enum! {
    /// Outcome of a bank reload (`result` of [`BANK_RELOADS`]).
    ReloadResult {
        Ok => "ok",
        Rejected => "rejected",
    }
}

label_enum! {
    /// Why a reload or changeover was refused (`reason` of [`CONTROL_ERRORS`]).
    ControlError {
        /// The config file could not be read again (SIGHUP).
        Config => "config",
        /// An unknown camera, or a product without a loaded bank.
        Unknown => "unknown",
        /// A control message that is not a valid command.
        Parse => "parse",
        /// A command naming a product outside the config or a bank outside
        /// `control.banks_dir` (or not a regular file), or whose bank took too long to load.
        Refused => "refused",
    }
}

label_enum! {
    /// What happened to a language-model judgement (`result` of [`LM_JUDGEMENTS`]).
    LmResult {
        Ran => "ran",
        OverBudget => "over_budget",
        Error => "error",
    }
}

label_enum! {
    /// A stage of the frame path (`stage` of [`STAGE_LATENCY`] and [`QUEUE_DEPTH`]).
    Stage {
        /// Capture → batch (frames waiting for the model).
        Queue => "queue",
        /// The frame's share of its batch's model time.
        Model => "model",
        /// Verdicts, masks and the event.
        Verdict => "verdict",
        /// The capture queue (frames).
        Capture => "capture",
        /// Scored batches waiting for the verdict stage.
        Scored => "scored",
        /// Events waiting for the outbox.
        Publish => "publish",
    }
}

label_enum! {
    /// A camera's state (`state` of [`CAMERA_STATE`], and `/healthz`).
    CameraState {
        Up => "up",
        Reconnecting => "reconnecting",
        Failed => "failed",
        Ended => "ended",
    }
}

/// (name, description, unit) of every metric, registered with `describe_*` at start-up.
pub const DESCRIPTIONS: &[(&str, &str, &str)] = &[
    (FRAMES_CAPTURED, "Frames pulled from a camera's appsink.", "count"),
    (FRAMES_DROPPED, "Frames dropped before scoring, by reason.", "count"),
    (FRAMES_SCORED, "Frames scored by the model.", "count"),
    (ANOMALIES, "Frames judged anomalous.", "count"),
    (EVENTS_PUBLISHED, "Events acknowledged by Kafka, by topic.", "count"),
    (PUBLISH_ERRORS, "Events Kafka did not acknowledge, by reason.", "count"),
    (END_TO_END_LATENCY, "Capture to Kafka acknowledgement.", "seconds"),
    (
        SCORE_LATENCY,
        "Model time for one batch of one product (preprocessing, backbone, scoring, map post-processing).",
        "seconds",
    ),
    (BATCH_LATENCY, "Model thread time per batch (tensors only: verdicts and events are a later stage).", "seconds"),
    (STAGE_LATENCY, "Time per frame in each stage: queue, model, verdict.", "seconds"),
    (OUTBOX_BYTES, "Bytes of the durable outbox on disk.", "bytes"),
    (OUTBOX_PENDING, "Events spooled and not yet acknowledged by Kafka.", "count"),
    (OUTBOX_APPENDED, "Events written durably to the outbox.", "count"),
    (OUTBOX_DROPPED, "Events dropped because the outbox was over budget, by reason.", "count"),
    (
        OUTBOX_DISCARDED,
        "Spooled records found damaged when the outbox was opened, by reason (only those records are lost).",
        "count",
    ),
    (
        OUTBOX_WRITE_ERRORS,
        "Failed outbox appends (disk full, I/O errors); the batch is retried, never sent unspooled.",
        "count",
    ),
    (EVENTS_REJECTED, "Events Kafka refused for good (kept in the outbox's rejected/ folder), by reason.", "count"),
    (BATCH_SIZE, "Frames per scored batch.", "count"),
    (IMAGE_SCORE, "Image-level anomaly score, per product.", "score"),
    (
        JUDGE_DISAGREEMENTS,
        "Frames on which the judges that ran did not agree (needs more than one judge configured).",
        "count",
    ),
    (
        QUEUE_DEPTH,
        "Items waiting in each stage's queue: capture (frames), scored (batches), publish (events).",
        "count",
    ),
    (MODEL_INFO, "The loaded backbone and device; label precision: what it runs in (fp32, bf16, fp16).", "info"),
    (BANK_INFO, "Bank version per product: 1 for the active one.", "info"),
    (BANK_RELOADS, "Bank reloads by product and result (ok, rejected).", "count"),
    (CONTROL_ERRORS, "Rejected reloads and changeover commands, by reason.", "count"),
    (CAMERA_UP, "1 while the camera's pipeline is running, 0 otherwise.", "bool"),
    (CAMERA_ERRORS, "Camera pipeline errors.", "count"),
    (CAMERA_STATE, "1 for the camera's current state: up, reconnecting, failed, ended.", "bool"),
    (CAMERA_RECONNECTS, "Reconnection attempts of live cameras.", "count"),
    (BUILD_INFO, "Kensa's version.", "info"),
    (
        PRODUCER_REBUILDS,
        "Kafka producers replaced after a librdkafka fatal error (e.g. a fenced idempotent producer).",
        "count",
    ),
    (LM_JUDGEMENTS, "Language-model judge runs by product and result (ran, over_budget, error).", "count"),
    (
        QUESTIONS,
        "Questions about held frames by result (model, facts: the model's answer contradicted the verdict; not_held, busy, failed).",
        "count",
    ),
    (
        FEEDBACK,
        "Operator answers by source (http, kafka) and result (changed, duplicate, not_held, learning_off, invalid, failed).",
        "count",
    ),
    (
        LEARNED,
        "Bank changes learned from the line, by product and change (added_operator, added_auto, removed, defect, refused_spacing, refused_budget).",
        "count",
    ),
    (FRAMES_HELD, "Frames held per product for operator answers.", "count"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_snake_case_and_distinct() {
        let mut all: Vec<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        all.extend(PublishFailure::ALL.iter().map(|r| r.as_str()));
        all.extend(Stage::ALL.iter().map(|r| r.as_str()));
        all.extend(CameraState::ALL.iter().map(|r| r.as_str()));
        for v in &all {
            assert!(v.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{v}");
        }
        let n = DropReason::ALL.len() + PublishFailure::ALL.len();
        let mut d: Vec<&str> = all[..n].to_vec();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), n);
    }

    #[test]
    fn every_metric_is_described_once() {
        let mut names: Vec<&str> = DESCRIPTIONS.iter().map(|d| d.0).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
        assert!(names.contains(&LM_JUDGEMENTS) && names.contains(&OUTBOX_DROPPED));
    }
}
