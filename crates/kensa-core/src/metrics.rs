//! Every metric name Kensa exports, in one place. Labels: `camera`, `product`, `reason`,
//! `topic`, `stage` only (never frame ids).

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

/// Drop reasons (the `reason` label of [`FRAMES_DROPPED`]).
pub mod reason {
    /// The scoring queue was full and the camera's policy is `drop`.
    pub const QUEUE_FULL: &str = "queue_full";
    /// An image file in a folder camera could not be decoded.
    pub const CORRUPT_IMAGE: &str = "corrupt_image";
    /// A frame whose size or format did not match the caps.
    pub const BAD_FRAME: &str = "bad_frame";
    /// The model failed on the batch that held the frame.
    pub const SCORING_FAILED: &str = "scoring_failed";
    /// The camera's product has no loaded bank.
    pub const NO_BANK: &str = "no_bank";
    /// Kensa was shutting down before the frame could be scored.
    pub const SHUTDOWN: &str = "shutdown";
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
    (SCORE_LATENCY, "Model time for one batch of one product (preprocessing, backbone, scoring, map post-processing).", "seconds"),
    (BATCH_LATENCY, "Model thread time per batch: scoring, verdicts and events (includes waiting for delivery when it pushes back).", "seconds"),
    (STAGE_LATENCY, "Time per frame in each stage: queue, model, verdict.", "seconds"),
    ("kensa_outbox_bytes", "Bytes of the durable outbox on disk.", "bytes"),
    ("kensa_outbox_events", "Events spooled and not yet acknowledged by Kafka.", "count"),
    ("kensa_outbox_appended_total", "Events written durably to the outbox.", "count"),
    ("kensa_outbox_dropped_total", "Events dropped because the outbox was over budget, by reason.", "count"),
    ("kensa_events_rejected_total", "Events Kafka refused for good (kept in the outbox's rejected/ folder), by reason.", "count"),
    (BATCH_SIZE, "Frames per scored batch.", "count"),
    (IMAGE_SCORE, "Image-level anomaly score, per product.", "score"),
    (JUDGE_DISAGREEMENTS, "Frames on which the judges that ran did not agree (needs more than one judge configured).", "count"),
    (QUEUE_DEPTH, "Items waiting in each stage's queue: capture (frames), model (batches), publish (events).", "count"),
    ("kensa_model_info", "The loaded backbone and device.", "info"),
    ("kensa_bank_info", "Bank version per product: 1 for the active one.", "info"),
    ("kensa_bank_reloads_total", "Bank reloads by product and result (ok, rejected).", "count"),
    ("kensa_control_errors_total", "Rejected reloads and changeover commands, by reason.", "count"),
    (CAMERA_UP, "1 while the camera's pipeline is running, 0 otherwise.", "bool"),
    (CAMERA_ERRORS, "Camera pipeline errors.", "count"),
    (CAMERA_STATE, "1 for the camera's current state: up, reconnecting, failed, ended.", "bool"),
    (CAMERA_RECONNECTS, "Reconnection attempts of live cameras.", "count"),
    ("kensa_lm_judgements_total", "Language-model judge runs by product and result (ran, over_budget, error).", "count"),
];
