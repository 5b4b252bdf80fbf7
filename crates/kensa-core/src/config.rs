//! Kensa's configuration.
//!
//! Layering: built-in defaults → the TOML file → environment variables
//! `KENSA__SECTION__KEY` (e.g. `KENSA__KAFKA__BROKERS=host:9092`). Unknown keys are errors
//! (`deny_unknown_fields`), and [`KensaConfig::validate`] reports every problem at once.
//! Relative paths (banks, image folders, video files, the backbone) are resolved against the
//! config file's folder.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Load { path: PathBuf, source: config::ConfigError },
    #[error("invalid config {path}:\n  - {}", problems.join("\n  - "))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KensaConfig {
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub publish: PublishConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub judges: JudgesConfig,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub learn: LearnConfig,
    #[serde(default)]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub ask: AskConfig,
    /// Products by name: each has a memory bank made by `kensa enroll`.
    #[serde(default)]
    pub products: BTreeMap<String, ProductConfig>,
    #[serde(default)]
    pub cameras: Vec<CameraConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// TorchScript backbone; default `$KENSA_BACKBONE`, else `$KENSA_CACHE/models/efficientnet-lite0.pt`.
    pub backbone: Option<PathBuf>,
    /// `auto` (CUDA when present), `cpu` or `cuda`.
    pub device: Device,
    /// Input side (pixels) every bank must have been enrolled at; 0 (the default): any, each
    /// product is scored at its own bank's size (`kensa enroll --input-size`).
    pub input_size: u32,
    /// libtorch intra-op threads; 0 leaves libtorch's default.
    pub threads: usize,
    /// Arithmetic of the backbone and the bank search: `auto` follows the backbone file (export
    /// it with `--dtype fp16` or `bf16` for a GPU); `fp32`, `fp16` or `bf16` must match a frozen
    /// file, or cast an unfrozen one. Maps and scores are always fp32.
    pub precision: Precision,
    /// How often bank files are checked for changes (hot reload); 0 turns polling off.
    pub bank_poll_s: u64,
}

/// What the control topic may do (`kafka.control_topic`): its messages come from outside.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// The only folder control commands may name banks in (regular files, at most the bank
    /// size limit). Unset: commands may change a camera's product, never load a bank.
    pub banks_dir: Option<PathBuf>,
}

/// Where the model runs (`model.device`, `--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when libtorch sees a GPU, the CPU otherwise.
    #[default]
    Auto,
    Cpu,
    /// CUDA device 0; start-up fails when there is none.
    Cuda,
}

/// Arithmetic of the backbone and the bank search (`model.precision`, `--precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The default backbone: bf16 on a CPU with AMX when its bf16 export exists (faster
    /// there), fp32 elsewhere; a backbone file of the user's: its own dtype.
    #[default]
    Auto,
    Fp32,
    Fp16,
    Bf16,
}

/// Parses a lowercase enum value the way the config does, naming the choices on error.
fn parse_choice<T: Copy>(s: &str, what: &str, choices: &[(&str, T)]) -> Result<T, String> {
    choices.iter().find(|(n, _)| *n == s).map(|(_, v)| *v).ok_or_else(|| {
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        format!("unknown {what} `{s}` (one of {})", names.join(", "))
    })
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_choice(s, "device", &[("auto", Device::Auto), ("cpu", Device::Cpu), ("cuda", Device::Cuda)])
    }
}

impl Precision {
    /// The name the config uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_choice(
            s,
            "precision",
            &[
                ("auto", Precision::Auto),
                ("fp32", Precision::Fp32),
                ("fp16", Precision::Fp16),
                ("bf16", Precision::Bf16),
            ],
        )
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            backbone: None,
            device: Device::Auto,
            input_size: 0,
            threads: 0,
            precision: Precision::Auto,
            bank_poll_s: 2,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Largest batch sent to the model; 0 (the default): 1 on a CPU, 16 on a GPU. On a CPU
    /// batches are not faster per frame, and a frame batched with others waits for their
    /// compute too: measured on 2 cores at half load, p99 latency 1.9-2.4× the batch-1 model
    /// step with 4, 1.5-1.6× with 1 (benches/perf.rs, `KENSA_PERF_MODERATE_BATCH`).
    pub max_size: usize,
    /// Longest a frame waits for more frames to join its batch once the model is free, from
    /// the batch's first frame. Batches are formed only when the model is free, from every frame
    /// queued by then, so batches fill by themselves under load; 0 (the default) never waits,
    /// which gives the lowest latency. A few ms can help a GPU at light load.
    pub max_wait_ms: u64,
    /// Frames queued between the cameras and the batcher (all cameras together).
    pub queue: usize,
}

impl BatchConfig {
    /// The batch limit in force: `max_size`, or for 0 the device's default.
    pub fn effective_max_size(&self, gpu: bool) -> usize {
        match self.max_size {
            0 if gpu => 16,
            0 => 1,
            n => n,
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_size: 0, max_wait_ms: 0, queue: 64 }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    pub brokers: String,
    /// Every frame's event goes here.
    pub topic: String,
    /// Anomalous frames' events also go here.
    pub defects_topic: String,
    /// How long start-up retries to reach the brokers before giving up with an error.
    pub connect_timeout_s: u64,
    /// librdkafka `message.timeout.ms`: how long an event may wait for an acknowledgement.
    pub message_timeout_ms: u64,
    /// Largest event (payload and headers) Kensa sends; a larger one is rejected, counted and
    /// kept in the outbox's `rejected/` folder. Kafka's own default limit is 1 000 000.
    pub max_message_bytes: usize,
    /// Optional topic of changeover commands (JSON): `{"camera": "c1", "product": "p"}` or
    /// `{"product": "p", "bank": "/path/p.kbank"}`.
    pub control_topic: Option<String>,
    /// Optional topic of operator feedback (`kensa.v1.Feedback` protobuf: event id, label
    /// `normal`/`defect`), consumed when a product learns (`products.<p>.learn`).
    pub feedback_topic: Option<String>,
    /// Create missing topics at start-up (off where topics are managed by the platform team).
    pub create_topics: bool,
    /// Partitions of topics Kensa creates.
    pub partitions: i32,
    /// Replication factor of topics Kensa creates; -1 takes the broker's default.
    pub replication_factor: i32,
    /// Extra librdkafka properties passed through verbatim (TLS, SASL, ...).
    pub properties: BTreeMap<String, String>,
}

/// Secrets in passthrough properties never reach logs or debug output.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret_key(k) { "<redacted>" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("defects_topic", &self.defects_topic)
            .field("connect_timeout_s", &self.connect_timeout_s)
            .field("message_timeout_ms", &self.message_timeout_ms)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("create_topics", &self.create_topics)
            .field("properties", &props)
            .finish_non_exhaustive()
    }
}

/// Whether a librdkafka property holds a secret (passwords, keys, tokens).
pub fn is_secret_key(k: &str) -> bool {
    ["password", "secret", "key.pem", "token", "sasl.oauthbearer.config"].iter().any(|s| k.contains(s))
}

impl KafkaConfig {
    /// Secrets kept out of the config file, in `brokers` and `[kafka.properties]`:
    /// - `${NAME}` in a value is replaced by the environment variable NAME (an unset one is a
    ///   problem, named; `$${` is a literal `${`);
    /// - a property `KEY_file = "PATH"` sets KEY to the contents of the file at PATH (relative
    ///   to the config's folder; one trailing newline removed), as Docker and Kubernetes secrets
    ///   are mounted (`sasl.password_file = "/run/secrets/kafka-password"`);
    /// - a relative `*.location` path (`ssl.ca.location`) is taken from the config's folder.
    ///
    /// Returns the problems, each naming the key; the values never appear in them.
    pub fn resolve_secrets(&mut self, base: &Path, env: impl Fn(&str) -> Option<String>) -> Vec<String> {
        let mut problems = Vec::new();
        match interpolate(&self.brokers, &env) {
            Ok(v) => self.brokers = v,
            Err(var) => problems.push(format!("kafka.brokers: environment variable {var} is not set")),
        }
        let mut resolved = BTreeMap::new();
        for (k, v) in std::mem::take(&mut self.properties) {
            let v = match interpolate(&v, &env) {
                Ok(v) => v,
                Err(var) => {
                    problems.push(format!("kafka.properties.\"{k}\": environment variable {var} is not set"));
                    continue;
                }
            };
            match k.strip_suffix("_file") {
                Some(key) => {
                    let path = base.join(&v);
                    match std::fs::read_to_string(&path) {
                        Ok(text) => {
                            let text = text.strip_suffix('\n').unwrap_or(&text);
                            resolved.insert(key.to_string(), text.strip_suffix('\r').unwrap_or(text).to_string());
                        }
                        Err(e) => {
                            problems.push(format!("kafka.properties.\"{k}\": cannot read {}: {e}", path.display()));
                        }
                    }
                }
                // librdkafka's file paths (`ssl.ca.location`, ...) are relative to the config's folder.
                None if k.ends_with(".location") && !v.is_empty() && Path::new(&v).is_relative() => {
                    resolved.insert(k, base.join(&v).display().to_string());
                }
                None => {
                    resolved.insert(k, v);
                }
            }
        }
        self.properties = resolved;
        problems
    }
}

/// `text` with each `${NAME}` replaced by `env(NAME)`; `$${` stays a literal `${`. The name of
/// the first unset variable is the error.
fn interpolate(text: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        if rest[..at].ends_with('$') {
            out.push_str(&rest[..at - 1]);
            out.push_str("${");
            rest = &rest[at + 2..];
            continue;
        }
        out.push_str(&rest[..at]);
        let Some(end) = rest[at..].find('}') else {
            out.push_str(&rest[at..]);
            return Ok(out);
        };
        let name = &rest[at + 2..at + end];
        out.push_str(&env(name).ok_or_else(|| name.to_string())?);
        rest = &rest[at + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "kensa.results".into(),
            defects_topic: "kensa.defects".into(),
            connect_timeout_s: 30,
            message_timeout_ms: 30_000,
            max_message_bytes: 1_000_000,
            control_topic: None,
            feedback_topic: None,
            create_topics: true,
            partitions: 3,
            replication_factor: -1,
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address of `/metrics` and `/healthz`; localhost unless set otherwise.
    pub listen: String,
    /// Token that actions on this listener (`POST /v1/feedback`) need as `Authorization:
    /// Bearer <token>` whenever it listens beyond localhost (without one they are refused
    /// there). `${VAR}` takes it from the environment.
    pub token: Option<String>,
    /// Actions per second this listener accepts (a burst of as many); more answer 429.
    pub actions_per_s: u32,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9898".into(), token: None, actions_per_s: 10 }
    }
}

/// Secrets never reach logs or debug output.
impl std::fmt::Debug for TelemetryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("actions_per_s", &self.actions_per_s)
            .finish()
    }
}

/// How a product learns from the line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LearnMode {
    /// The bank changes only by enrollment.
    #[default]
    Off,
    /// Operator answers: a false alarm answered `normal` becomes a reference, a confirmed
    /// `defect` a real positive of the calibration.
    Feedback,
    /// Feedback, and frames Kensa judges normal with high confidence, spread over time, join
    /// the bank (guarded).
    Auto,
}

impl LearnMode {
    /// The name the config and the command line use.
    pub fn as_name(self) -> &'static str {
        match self {
            LearnMode::Off => "off",
            LearnMode::Feedback => "feedback",
            LearnMode::Auto => "auto",
        }
    }
}

/// Bounds and guards of learning from the line (products with `learn` on).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LearnConfig {
    /// Frames held per product for answers (a ring; an answer for an older frame is counted
    /// as `not_held`). Each holds its RGB pixels.
    pub hold: usize,
    /// Learned references kept per product (past it the oldest learned one goes).
    pub max_learned: usize,
    /// Self-enrolled (`auto`) references kept at most.
    pub max_auto: usize,
    /// Seconds between two frames joining by themselves (`auto`).
    pub min_spacing_s: u64,
    /// Bank versions kept beside each bank file.
    pub keep_versions: usize,
    /// The decision follows the bank: when a reference joins or leaves, the decision is scaled
    /// by how the held normal frames' scores change (docs/learning.md). Off: only confirmed
    /// defects below it move it.
    pub follow: bool,
}

impl Default for LearnConfig {
    fn default() -> Self {
        Self { hold: 64, max_learned: 32, max_auto: 16, min_spacing_s: 600, keep_versions: 20, follow: true }
    }
}

/// The operator console (`/console` on the telemetry listener): what it holds and how often
/// it pushes.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    pub enabled: bool,
    /// Latest frames held per camera (a ring): each holds its pixels and its anomaly map,
    /// about 7 bytes per pixel.
    pub frames_per_camera: usize,
    /// Anomalous frames held for the gallery, across cameras (a ring, oldest out first).
    pub defects: usize,
    /// Most live updates per second sent to one viewer.
    pub push_hz: f64,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self { enabled: true, frames_per_camera: 2, defects: 32, push_hz: 2.0 }
    }
}

/// Questions about held frames (`POST /v1/frames/{event_id}/ask`, the console's question box),
/// answered by an instruction model from the facts the map gives.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AskConfig {
    /// The instruction model (GGUF, e.g. SmolLM2-135M-Instruct.Q4_1.gguf). Unset: asking is off.
    pub model: Option<PathBuf>,
    /// Most tokens per answer (0: 48).
    pub max_new_tokens: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    /// Downscale the event's mask PNG so its longer side is at most this (0: frame size).
    pub mask_max_side: u32,
    /// Where full-resolution anomaly maps (.npy) and frame snapshots (.png) are written; the
    /// event carries their paths, not the bytes. Unset: nothing is stored.
    pub store_dir: Option<PathBuf>,
    /// Which frames are stored: `anomalous` or `all`.
    pub store: StoreWhich,
    /// Retention of `store_dir`: the oldest files go first once it holds more than this many
    /// bytes (0: no limit).
    pub store_max_bytes: u64,
    /// Retention of `store_dir`: files older than this many seconds go (0: no limit).
    pub store_max_age_s: u64,
    /// When set, events carry URLs to their evidence: this prefix + `<camera>/<run>/<file>`.
    /// Kensa serves `store_dir` under `/evidence/` on its telemetry listener, so
    /// `http://<host>:9898/evidence` is the usual value.
    pub evidence_url_prefix: Option<String>,
    /// Wrap payloads in Confluent Schema Registry framing with this schema id (magic byte 0,
    /// 4-byte id, message index 0). Unset: plain protobuf.
    pub schema_registry_id: Option<u32>,
    /// How long shutdown waits for Kafka to acknowledge what is in flight; the rest stays in
    /// the outbox and is sent at the next start.
    pub drain_timeout_s: u64,
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            mask_max_side: 0,
            store_dir: None,
            store: StoreWhich::Anomalous,
            store_max_bytes: 10 << 30,
            store_max_age_s: 7 * 86_400,
            evidence_url_prefix: None,
            schema_registry_id: None,
            drain_timeout_s: 15,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StoreWhich {
    Anomalous,
    All,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Durable spool: every event is written (fsync per batch) here before it goes to Kafka
    /// and removed when acknowledged. Default `kensa-outbox` beside the config file.
    pub dir: PathBuf,
    /// Disk budget. Past 80 % normal results are dropped (counted); past 100 % defects too.
    pub max_bytes: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self { dir: PathBuf::from("kensa-outbox"), max_bytes: 1 << 30 }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProductConfig {
    /// Memory bank file written by `kensa enroll`.
    pub bank: PathBuf,
    /// Language-model judge trained for this product by `kensa train-judge` (needed when
    /// `judges.mode` is not `calibrated`).
    #[serde(default)]
    pub judge: Option<PathBuf>,
    /// Learning from the line: `off`, `feedback` (operator answers) or `auto` (also guarded
    /// self-enrollment). Changes write new versions of `bank`.
    #[serde(default)]
    pub learn: LearnMode,
}

/// Which judges decide the verdict.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum JudgeMode {
    /// The self-calibrating judge only.
    #[default]
    Calibrated,
    /// Both on every frame (the language model within the budget); the calibrated one decides.
    Both,
    /// The language model decides (within the budget; the calibrated judge otherwise).
    LanguageModel,
    /// The language model runs, and decides, only on frames the calibrated judge finds
    /// anomalous or uncertain, within the budget.
    LanguageModelOnUncertain,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JudgesConfig {
    pub mode: JudgeMode,
    /// Most language-model judgements per second (token bucket); frames over it keep the
    /// calibrated verdict and are counted in `kensa_lm_judgements_total{result="over_budget"}`.
    pub budget_per_s: f64,
    /// "Uncertain" for `language_model_on_uncertain`: calibrated confidence within this of 0.5.
    pub uncertain_band: f64,
}

impl Default for JudgesConfig {
    fn default() -> Self {
        Self { mode: JudgeMode::Calibrated, budget_per_s: 20.0, uncertain_band: 0.25 }
    }
}

/// What a camera does when the scoring queue is full.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Wait (files, folders, the synthetic line: nothing is lost).
    Block,
    /// Drop the newest frame and count it (live cameras).
    Drop,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    /// Unique id: the Kafka key and the `camera` metric label.
    pub id: String,
    /// Production line and station, copied into every event.
    #[serde(default)]
    pub line: String,
    #[serde(default)]
    pub station: String,
    /// Product name (a key of `[products]`).
    pub product: String,
    pub source: SourceConfig,
    /// Frame size delivered by the pipeline (the appsink's fixed caps).
    #[serde(default = "default_side")]
    pub width: u32,
    #[serde(default = "default_side")]
    pub height: u32,
    /// Appsink `max-buffers`.
    #[serde(default = "default_camera_queue")]
    pub queue: u32,
    /// Full-queue policy; default `drop` for live sources, `block` for the others.
    #[serde(default)]
    pub policy: Option<FullPolicy>,
    /// Live sources: first reconnect delay; it doubles per failed attempt...
    #[serde(default = "default_reconnect_initial_ms")]
    pub reconnect_initial_ms: u64,
    /// ...up to this cap.
    #[serde(default = "default_reconnect_max_s")]
    pub reconnect_max_s: u64,
    /// Failed attempts in a row after which the camera's state is `failed` (still retried at
    /// the capped interval).
    #[serde(default = "default_reconnect_fail_after")]
    pub reconnect_fail_after: u32,
}

fn default_reconnect_initial_ms() -> u64 {
    500
}
fn default_reconnect_max_s() -> u64 {
    30
}
fn default_reconnect_fail_after() -> u32 {
    8
}

fn default_side() -> u32 {
    256
}
fn default_camera_queue() -> u32 {
    4
}

impl CameraConfig {
    /// A synthetic camera with every default, for tests and tools.
    pub fn for_tests(id: &str) -> Self {
        Self {
            id: id.into(),
            line: String::new(),
            station: String::new(),
            product: "p".into(),
            source: SourceConfig::Synthetic { seed: 0, count: 1, fps: 0.0, defect_rate: 0.0, phase: 0.0 },
            width: default_side(),
            height: default_side(),
            queue: default_camera_queue(),
            policy: None,
            reconnect_initial_ms: default_reconnect_initial_ms(),
            reconnect_max_s: default_reconnect_max_s(),
            reconnect_fail_after: default_reconnect_fail_after(),
        }
    }

    pub fn effective_policy(&self) -> FullPolicy {
        self.policy.unwrap_or(if self.source.is_live() { FullPolicy::Drop } else { FullPolicy::Block })
    }
}

/// A camera's source; each kind has a pipeline template in `pipelines/`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Kensa's seeded synthetic production line (appsrc).
    Synthetic {
        #[serde(default)]
        seed: u64,
        /// Frames to produce; 0 runs until stopped.
        #[serde(default)]
        count: u64,
        /// Frames per second; 0 is as fast as the pipeline takes them.
        #[serde(default)]
        fps: f64,
        #[serde(default = "default_defect_rate")]
        defect_rate: f64,
        /// Offset of the first frame, as a fraction of the frame period (0..1): free-running
        /// cameras are not in step; 0 for all cameras models a common hardware trigger.
        #[serde(default)]
        phase: f64,
    },
    /// Every image in a folder, in name order (appsrc).
    ImageFolder {
        path: PathBuf,
        #[serde(default)]
        fps: f64,
    },
    /// A video file (filesrc ! decodebin).
    VideoFile { path: PathBuf },
    /// A V4L2 USB camera.
    V4l2 { device: String },
    /// An RTSP camera (H.264 or H.265).
    Rtsp {
        url: String,
        #[serde(default = "default_latency")]
        latency_ms: u32,
        #[serde(default)]
        codec: RtspCodec,
    },
    /// A GigE Vision camera through aravissrc.
    Gige {
        /// Its name, or better its IP address (pipelines/README.md).
        camera: String,
        #[serde(flatten)]
        settings: GigeSettings,
    },
}

/// The video codec an RTSP camera streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RtspCodec {
    #[default]
    H264,
    H265,
}

impl RtspCodec {
    /// The name GStreamer's elements carry (`rtph264depay`, `h265parse`, `avdec_h264`).
    pub fn gst_name(self) -> &'static str {
        match self {
            RtspCodec::H264 => "h264",
            RtspCodec::H265 => "h265",
        }
    }
}

/// The pixel format a GigE camera is asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    /// Whatever the camera is set to: Bayer is demosaiced (bayer2rgb), other formats converted.
    #[default]
    Auto,
    /// Monochrome 8 bit (GRAY8).
    Mono8,
    /// A Bayer mosaic, demosaiced by bayer2rgb.
    Bayer,
    /// RGB 8 bit.
    Rgb8,
}

/// GigE Vision settings applied when the stream starts.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GigeSettings {
    #[serde(default)]
    pub pixel_format: PixelFormat,
    /// Exposure time in µs (unset: the camera's automatic exposure stays as it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposure_us: Option<f64>,
    /// Gain in dB (unset: as the camera is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gain_db: Option<f64>,
    /// Hardware trigger source (`Line1`, `Software`, ...): TriggerMode=On with that source, so
    /// a frame is taken per part; unset: Kensa sets no trigger feature, the camera's trigger
    /// settings stay as they are (free running only if the camera is set so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// More GenICam feature assignments, space separated (`BinningHorizontal=2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<String>,
}

fn default_defect_rate() -> f64 {
    0.2
}
fn default_latency() -> u32 {
    200
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Synthetic { .. } => "synthetic",
            SourceConfig::ImageFolder { .. } => "image_folder",
            SourceConfig::VideoFile { .. } => "video_file",
            SourceConfig::V4l2 { .. } => "v4l2",
            SourceConfig::Rtsp { .. } => "rtsp",
            SourceConfig::Gige { .. } => "gige",
        }
    }

    pub fn is_live(&self) -> bool {
        matches!(self, SourceConfig::V4l2 { .. } | SourceConfig::Rtsp { .. } | SourceConfig::Gige { .. })
    }
}

/// Where `kensa run`, `check` and `capture` look for their config without `--config` or
/// `KENSA_CONFIG`.
pub const DEFAULT_CONFIG: &str = "/etc/kensa/kensa.toml";

/// The file at `path`, then the `KENSA__SECTION__KEY` environment variables over it.
fn layered(path: &Path) -> Result<config::Config, ConfigError> {
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml).required(true))
        .add_source(config::Environment::with_prefix("KENSA").prefix_separator("__").separator("__").try_parsing(true))
        .build()
        .map_err(|source| ConfigError::Load { path: path.to_path_buf(), source })
}

impl KensaConfig {
    /// Loads defaults → `path` → `KENSA__*` environment, resolves relative paths against the
    /// file's folder, and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let built = layered(path)?;
        let mut cfg: KensaConfig =
            built.try_deserialize().map_err(|source| ConfigError::Load { path: path.to_path_buf(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        cfg.resolve_paths(&base);
        let mut problems = cfg.kafka.resolve_secrets(&base, |name| std::env::var(name).ok());
        if let Some(t) = &cfg.telemetry.token {
            match interpolate(t, &|name: &str| std::env::var(name).ok()) {
                Ok(v) => cfg.telemetry.token = Some(v),
                Err(var) => problems.push(format!("telemetry.token: environment variable {var} is not set")),
            }
        }
        problems.extend(cfg.problems());
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid { path: path.to_path_buf(), problems })
        }
    }

    /// The `[kafka]` section of a config file (with the `KENSA__*` environment layer and its
    /// secrets resolved), without checking the rest: for `kensa tail` on a machine that has
    /// the plant's config but not its banks.
    pub fn load_kafka(path: &Path) -> Result<KafkaConfig, ConfigError> {
        let built = layered(path)?;
        let mut kafka: KafkaConfig = built
            .get::<Option<KafkaConfig>>("kafka")
            .map_err(|source| ConfigError::Load { path: path.to_path_buf(), source })?
            .unwrap_or_default();
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let problems = kafka.resolve_secrets(&base, |name| std::env::var(name).ok());
        if problems.is_empty() {
            Ok(kafka)
        } else {
            Err(ConfigError::Invalid { path: path.to_path_buf(), problems })
        }
    }

    /// Parses TOML text (no environment layer, no path resolution): for tests and tools.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|source| ConfigError::Load { path: PathBuf::from("<string>"), source })?;
        Ok(built)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(b) = self.model.backbone.as_mut() {
            fix(b);
        }
        for p in self.products.values_mut() {
            fix(&mut p.bank);
            if let Some(j) = p.judge.as_mut() {
                fix(j);
            }
        }
        fix(&mut self.outbox.dir);
        if let Some(d) = self.control.banks_dir.as_mut() {
            fix(d);
        }
        if let Some(d) = self.publish.store_dir.as_mut() {
            fix(d);
        }
        for c in &mut self.cameras {
            match &mut c.source {
                SourceConfig::ImageFolder { path, .. } | SourceConfig::VideoFile { path } => fix(path),
                _ => {}
            }
        }
    }

    /// Products whose bank file does not exist yet: their cameras run but are not scored
    /// (`waiting_for_bank`) until it appears (`kensa capture`, then `kensa enroll`).
    pub fn waiting_for_bank(&self) -> Vec<(&str, &Path)> {
        self.products.iter().filter(|(_, p)| !p.bank.exists()).map(|(n, p)| (n.as_str(), p.bank.as_path())).collect()
    }

    /// Every problem with this config, each naming the key it is about. Empty when valid.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.model.input_size != 0 && !(32..=4096).contains(&self.model.input_size) {
            p.push(format!(
                "model.input_size: {} is outside 32..=4096 (or 0: follow each bank)",
                self.model.input_size
            ));
        }
        if self.batch.max_size > 256 {
            p.push(format!("batch.max_size: {} is outside 0..=256 (0: 1 on a CPU, 16 on a GPU)", self.batch.max_size));
        }
        if self.batch.queue == 0 {
            p.push("batch.queue: must be at least 1".into());
        }
        if self.kafka.brokers.trim().is_empty() {
            p.push("kafka.brokers: empty".into());
        }
        for (key, topic) in [("kafka.topic", &self.kafka.topic), ("kafka.defects_topic", &self.kafka.defects_topic)] {
            if !valid_topic(topic) {
                p.push(format!("{key}: `{topic}` is not a valid Kafka topic name (1-249 of [a-zA-Z0-9._-])"));
            }
        }
        if self.kafka.partitions < 1 {
            p.push(format!("kafka.partitions: {} must be at least 1", self.kafka.partitions));
        }
        if self.kafka.replication_factor == 0 || self.kafka.replication_factor < -1 {
            p.push(format!(
                "kafka.replication_factor: {} must be -1 (broker default) or at least 1",
                self.kafka.replication_factor
            ));
        }
        if self.outbox.max_bytes < (1 << 20) {
            p.push(format!("outbox.max_bytes: {} is below the 1 MiB minimum", self.outbox.max_bytes));
        }
        if self.telemetry.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!("telemetry.listen: `{}` is not an address like 127.0.0.1:9898", self.telemetry.listen));
        }
        if self.telemetry.token.as_deref().is_some_and(|t| t.len() < 16) {
            p.push("telemetry.token: at least 16 characters".into());
        }
        if self.telemetry.actions_per_s == 0 {
            p.push("telemetry.actions_per_s: must be at least 1".into());
        }
        let c = &self.console;
        if c.enabled && (c.frames_per_camera == 0 || c.frames_per_camera > 64 || c.defects > 1024) {
            p.push(format!(
                "console: frames_per_camera {} (1..=64) and defects {} (0..=1024)",
                c.frames_per_camera, c.defects
            ));
        }
        if c.enabled && !(c.push_hz > 0.0 && c.push_hz <= 30.0) {
            p.push(format!("console.push_hz: {} is outside (0, 30]", c.push_hz));
        }
        if let Some(m) = &self.ask.model {
            if !m.is_file() {
                p.push(format!("ask.model: {} is not a file (a GGUF instruction model)", m.display()));
            }
            if !self.console.enabled {
                p.push("ask.model: questions are about the frames the console holds: set console.enabled".into());
            }
        }
        if self.ask.max_new_tokens > 512 {
            p.push(format!("ask.max_new_tokens: {} is outside 0..=512", self.ask.max_new_tokens));
        }
        let l = &self.learn;
        if l.hold == 0 || l.hold > 4096 || l.max_learned == 0 || l.keep_versions == 0 {
            p.push(format!(
                "learn: hold {} (1..=4096), max_learned {} and keep_versions {} (at least 1)",
                l.hold, l.max_learned, l.keep_versions
            ));
        }
        if !(self.judges.budget_per_s > 0.0 && self.judges.budget_per_s.is_finite()) {
            p.push(format!("judges.budget_per_s: {} must be > 0", self.judges.budget_per_s));
        }
        if !(0.0..=0.5).contains(&self.judges.uncertain_band) {
            p.push(format!("judges.uncertain_band: {} is outside 0..=0.5", self.judges.uncertain_band));
        }
        for (name, prod) in &self.products {
            match &prod.judge {
                Some(j) if !j.is_file() => p.push(format!(
                    "products.{name}.judge: judge file not found: {} (make one with `kensa train-judge`)",
                    j.display()
                )),
                None if self.judges.mode != JudgeMode::Calibrated => p.push(format!(
                    "products.{name}.judge: judges.mode = {:?} needs a language-model judge for every product (make one with `kensa train-judge`)",
                    self.judges.mode
                )),
                _ => {}
            }
            // A bank not made yet is not a problem: its cameras wait for it (`waiting_for_bank`).
            if prod.bank.exists() && !prod.bank.is_file() {
                p.push(format!("products.{name}.bank: {} is not a file", prod.bank.display()));
            }
        }
        if self.cameras.is_empty() {
            p.push("cameras: no camera configured (add a [[cameras]] table)".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.cameras.iter().enumerate() {
            let at = format!("cameras[{i}] ({})", c.id);
            if !safe_name(&c.id) {
                p.push(format!("{at}.id: `{}` must be 1-64 of [A-Za-z0-9._-], not `.` or `..`", c.id));
            }
            if !seen.insert(c.id.clone()) {
                p.push(format!("{at}.id: duplicate camera id `{}`", c.id));
            }
            if !self.products.contains_key(&c.product) {
                p.push(format!("{at}.product: unknown product `{}` (not in [products])", c.product));
            }
            if !(16..=8192).contains(&c.width) || !(16..=8192).contains(&c.height) {
                p.push(format!("{at}: frame size {}x{} is outside 16..=8192", c.width, c.height));
            }
            if c.queue == 0 {
                p.push(format!("{at}.queue: must be at least 1"));
            }
            match &c.source {
                SourceConfig::Synthetic { fps, defect_rate, phase, .. } => {
                    if !(0.0..1.0).contains(phase) {
                        p.push(format!("{at}.source.phase: {phase} is outside 0..1"));
                    }
                    if !(0.0..=1.0).contains(defect_rate) {
                        p.push(format!("{at}.source.defect_rate: {defect_rate} is outside 0..=1"));
                    }
                    if !(*fps >= 0.0 && fps.is_finite()) {
                        p.push(format!("{at}.source.fps: {fps} must be >= 0"));
                    }
                }
                SourceConfig::ImageFolder { fps, .. } if !(*fps >= 0.0 && fps.is_finite()) => {
                    p.push(format!("{at}.source.fps: {fps} must be >= 0"));
                }
                _ => {}
            }
        }
        p
    }
}

/// `text` with the credentials of every URL in it (`scheme://user:password@host`) replaced by
/// `***`, for logs, errors, `kensa check` and `/healthz`.
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail.find(|c: char| c == '/' || c == '"' || c == '\'' || c.is_whitespace()).unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// A name that is safe as one path component and a label value: camera ids and product names
/// (they name folders under `publish.store_dir` and files written by `kensa tail --masks`).
pub fn safe_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s != "."
        && s != ".."
        && s.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[kafka]
brokers = "127.0.0.1:1"
[products.widget]
bank = "/nonexistent/widget.kbank"
[[cameras]]
id = "cam-1"
product = "widget"
source = { kind = "synthetic", seed = 3, count = 10 }
"#;

    #[test]
    fn parses_with_defaults() {
        let c = KensaConfig::from_toml_str(GOOD).unwrap();
        assert_eq!(c.batch.max_size, 0, "auto");
        assert_eq!(c.batch.effective_max_size(false), 1);
        assert_eq!(c.batch.effective_max_size(true), 16);
        assert_eq!(c.cameras[0].width, 256);
        assert_eq!(c.cameras[0].effective_policy(), FullPolicy::Block);
        assert!(matches!(c.cameras[0].source, SourceConfig::Synthetic { seed: 3, count: 10, .. }));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = GOOD.replace("[kafka]", "[kafka]\nbrokerz = \"x\"");
        let err = KensaConfig::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("brokerz"), "{err}");
        let text = GOOD.replace("count = 10", "count = 10, colour = 1");
        let err = KensaConfig::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn url_credentials_are_redacted() {
        assert_eq!(
            redact_credentials("rtspsrc location=\"rtsp://op:s3cr@t@10.0.0.5:554/line\" latency=50"),
            "rtspsrc location=\"rtsp://***@10.0.0.5:554/line\" latency=50"
        );
        assert_eq!(redact_credentials("rtsp://cam/line and http://x"), "rtsp://cam/line and http://x");
        assert!(!safe_name("..") && !safe_name("a/b") && !safe_name("") && safe_name("line-1.cam_2"));
    }

    #[test]
    fn validation_reports_every_problem() {
        let text = GOOD
            .replace("product = \"widget\"", "product = \"gadget\"")
            .replace("[kafka]", "[batch]\nmax_size = 300\n[kafka]");
        let c = KensaConfig::from_toml_str(&text).unwrap();
        let p = c.problems();
        // A bank not made yet is not a problem: its product waits for it.
        assert!(!p.iter().any(|s| s.contains("products.widget.bank")), "{p:?}");
        assert_eq!(c.waiting_for_bank(), [("widget", Path::new("/nonexistent/widget.kbank"))]);
        let mut dir_bank = c.clone();
        dir_bank.products.get_mut("widget").unwrap().bank = std::env::temp_dir();
        assert!(dir_bank.problems().iter().any(|s| s.contains("products.widget.bank") && s.contains("is not a file")));
        assert!(p.iter().any(|s| s.contains("unknown product `gadget`")), "{p:?}");
        assert!(p.iter().any(|s| s.starts_with("batch.max_size")), "{p:?}");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let mut k = KafkaConfig::default();
        k.properties.insert("sasl.password".into(), "hunter2".into());
        k.properties.insert("sasl.username".into(), "kensa".into());
        let d = format!("{k:?}");
        assert!(!d.contains("hunter2") && d.contains("<redacted>") && d.contains("kensa"), "{d}");
    }

    #[test]
    fn live_sources_drop_by_default() {
        let text =
            GOOD.replace("{ kind = \"synthetic\", seed = 3, count = 10 }", "{ kind = \"rtsp\", url = \"rtsp://x\" }");
        let c = KensaConfig::from_toml_str(&text).unwrap();
        assert_eq!(c.cameras[0].effective_policy(), FullPolicy::Drop);
    }
}

#[cfg(test)]
mod example_tests {
    /// The documented example config parses (paths and banks aside).
    #[test]
    fn example_config_parses() {
        for f in ["kensa.example.toml", "demo.toml"] {
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config").join(f);
            let text = std::fs::read_to_string(&p).unwrap();
            let c = super::KensaConfig::from_toml_str(&text).unwrap_or_else(|e| panic!("{f}: {e}"));
            let problems: Vec<String> = c.problems();
            assert!(problems.is_empty(), "{f}: {problems:?}");
        }
    }

    #[test]
    fn secrets_come_from_the_environment_and_from_files() {
        use super::KafkaConfig;
        let dir = std::env::temp_dir().join(format!("kensa-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "s3cret\n").unwrap();
        let mut k = KafkaConfig { brokers: "${BROKER_HOST}:9093".into(), ..KafkaConfig::default() };
        k.properties.insert("sasl.username".into(), "${USER_NAME}".into());
        k.properties.insert("sasl.password_file".into(), "pw".into());
        k.properties.insert("client.rack".into(), "$${literal}".into());
        let env = |n: &str| match n {
            "BROKER_HOST" => Some("kafka.plant".to_string()),
            "USER_NAME" => Some("kensa".to_string()),
            _ => None,
        };
        assert!(k.resolve_secrets(&dir, env).is_empty());
        assert_eq!(k.brokers, "kafka.plant:9093");
        assert_eq!(k.properties["sasl.username"], "kensa");
        assert_eq!(k.properties["sasl.password"], "s3cret", "read from the file, newline removed");
        assert!(!k.properties.contains_key("sasl.password_file"));
        assert_eq!(k.properties["client.rack"], "${literal}");

        let mut bad = KafkaConfig::default();
        bad.properties.insert("sasl.password".into(), "${NOT_SET_ANYWHERE}".into());
        bad.properties.insert("ssl.key.password_file".into(), "missing".into());
        let p = bad.resolve_secrets(&dir, |_| None);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("NOT_SET_ANYWHERE") || p[1].contains("NOT_SET_ANYWHERE"), "{p:?}");
        assert!(p.iter().any(|x| x.contains("ssl.key.password_file") && x.contains("missing")), "{p:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
