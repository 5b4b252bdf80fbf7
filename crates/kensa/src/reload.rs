//! Hot reload and product changeover, without a restart.
//!
//! Three triggers: a bank file that changes on disk (polled), SIGHUP (the config file is read
//! again: changed bank paths, new products, cameras assigned to another product), and an optional
//! Kafka control topic (`kafka.control_topic`) carrying JSON commands:
//! `{"camera": "line-1", "product": "bottle"}` or `{"product": "bottle", "bank": "/path.kbank"}`.
//! Banks are loaded and validated off the model thread; a bad one is rejected with a clear error
//! and the old one keeps running. The model thread applies each change between two batches, so
//! every frame is scored entirely with one bank: the swap is atomic per camera.

use kensa_core::config::KensaConfig;
use kensa_model::backbone::BackboneMeta;
use kensa_model::bank::Bank;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Work for the model thread: frames to score, or a change to apply between batches.
pub enum Work {
    Batch(Vec<kensa_core::Frame>),
    Control(Control),
    /// No more frames will come (cameras ended, shutdown): the model thread finishes.
    Done,
}

pub enum Control {
    /// Replace (or add) a product's bank.
    SwapBank { product: String, bank: Box<Bank>, path: PathBuf, trigger: &'static str },
    /// Score a camera's frames with another product's bank from now on.
    Assign { camera: String, product: String, trigger: &'static str },
}

pub const BANK_RELOADS: &str = "kensa_bank_reloads_total";
pub const CONTROL_ERRORS: &str = "kensa_control_errors_total";

/// What reloading needs to load banks the way start-up did.
#[derive(Clone)]
pub struct Loader {
    pub backbone: BackboneMeta,
    pub input_size: u32,
    pub device: tch::Device,
    /// The backbone's precision; loaded banks are cast to it.
    pub kind: tch::Kind,
}

impl Loader {
    /// Loads and validates a bank off the async runtime.
    pub async fn load(&self, path: &Path) -> Result<Bank, String> {
        let (p, me) = (path.to_path_buf(), self.clone());
        tokio::task::spawn_blocking(move || Bank::load(&p, &me.backbone, me.input_size, me.device).map(|b| b.cast(me.kind)).map_err(|e| e.to_string()))
            .await
            .map_err(|e| e.to_string())?
    }
}

/// Shared view of what is configured now: product → bank path, camera → product.
#[derive(Clone, Default)]
pub struct Current {
    pub banks: HashMap<String, PathBuf>,
    pub cameras: HashMap<String, String>,
}

impl Current {
    pub fn from_config(cfg: &KensaConfig) -> Self {
        Self {
            banks: cfg.products.iter().map(|(k, v)| (k.clone(), v.bank.clone())).collect(),
            cameras: cfg.cameras.iter().map(|c| (c.id.clone(), c.product.clone())).collect(),
        }
    }
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

async fn swap(loader: &Loader, tx: &mpsc::Sender<Work>, product: &str, path: &Path, trigger: &'static str) -> bool {
    match loader.load(path).await {
        Ok(bank) => {
            let _ = tx
                .send(Work::Control(Control::SwapBank {
                    product: product.to_string(),
                    bank: Box::new(bank),
                    path: path.to_path_buf(),
                    trigger,
                }))
                .await;
            true
        }
        Err(e) => {
            metrics::counter!(BANK_RELOADS, "product" => product.to_string(), "result" => "rejected").increment(1);
            tracing::error!(product, trigger, "new bank rejected, the previous one keeps running: {e}");
            false
        }
    }
}

/// Polls every product's bank file; a changed file is loaded and swapped in.
pub async fn watch_files(loader: Loader, current: Arc<Mutex<Current>>, tx: mpsc::Sender<Work>, every: Duration) {
    let mut seen: HashMap<PathBuf, Option<(SystemTime, u64)>> = HashMap::new();
    {
        let c = current.lock().expect("reload state");
        for p in c.banks.values() {
            seen.insert(p.clone(), stamp(p));
        }
    }
    loop {
        tokio::time::sleep(every).await;
        let banks: Vec<(String, PathBuf)> =
            current.lock().expect("reload state").banks.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (product, path) in banks {
            let now = stamp(&path);
            let before = seen.get(&path).cloned().flatten();
            if now.is_some() && now != before {
                seen.insert(path.clone(), now);
                tracing::info!(product = %product, path = %path.display(), "bank file changed; reloading");
                swap(&loader, &tx, &product, &path, "file").await;
            }
        }
    }
}

/// On SIGHUP, reads the config again and applies bank and camera-product changes.
pub async fn on_sighup(config: PathBuf, loader: Loader, current: Arc<Mutex<Current>>, tx: mpsc::Sender<Work>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        tracing::info!(config = %config.display(), "SIGHUP: reloading the config");
        let cfg = match KensaConfig::load(&config) {
            Ok(c) => c,
            Err(e) => {
                metrics::counter!(CONTROL_ERRORS, "reason" => "config").increment(1);
                tracing::error!("config reload rejected, nothing changed: {e}");
                continue;
            }
        };
        let new = Current::from_config(&cfg);
        let old = current.lock().expect("reload state").clone();
        let mut loaded = old.banks.clone();
        for (product, path) in &new.banks {
            if old.banks.get(product) != Some(path) && swap(&loader, &tx, product, path, "sighup").await {
                loaded.insert(product.clone(), path.clone());
            }
        }
        let mut cams = old.cameras.clone();
        for (camera, product) in &new.cameras {
            match old.cameras.get(camera) {
                None => tracing::warn!(camera = %camera, "a camera added to the config starts only after a restart"),
                Some(p) if p != product => {
                    if loaded.contains_key(product) {
                        let _ = tx
                            .send(Work::Control(Control::Assign { camera: camera.clone(), product: product.clone(), trigger: "sighup" }))
                            .await;
                        cams.insert(camera.clone(), product.clone());
                    } else {
                        tracing::error!(camera = %camera, product = %product, "cannot switch camera: product has no loaded bank");
                    }
                }
                _ => {}
            }
        }
        *current.lock().expect("reload state") = Current { banks: loaded, cameras: cams };
    }
}

/// A command on the control topic.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub camera: Option<String>,
    pub product: String,
    pub bank: Option<PathBuf>,
}

/// Applies one control-topic command.
pub async fn apply(cmd: Command, loader: &Loader, current: &Arc<Mutex<Current>>, tx: &mpsc::Sender<Work>) {
    if let Some(bank) = &cmd.bank {
        if swap(loader, tx, &cmd.product, bank, "control").await {
            current.lock().expect("reload state").banks.insert(cmd.product.clone(), bank.clone());
        } else {
            return;
        }
    }
    if let Some(camera) = cmd.camera {
        let known_camera = current.lock().expect("reload state").cameras.contains_key(&camera);
        let known_product = current.lock().expect("reload state").banks.contains_key(&cmd.product);
        if !known_camera || !known_product {
            metrics::counter!(CONTROL_ERRORS, "reason" => "unknown").increment(1);
            tracing::error!(camera = %camera, product = %cmd.product, "control command ignored: unknown camera or product without a bank");
            return;
        }
        current.lock().expect("reload state").cameras.insert(camera.clone(), cmd.product.clone());
        let _ = tx.send(Work::Control(Control::Assign { camera, product: cmd.product, trigger: "control" })).await;
    }
}

/// Reads the control topic from its end and applies each command.
pub async fn control_topic(
    kafka: kensa_core::config::KafkaConfig,
    topic: String,
    loader: Loader,
    current: Arc<Mutex<Current>>,
    tx: mpsc::Sender<Work>,
) {
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Result<Command, String>>(16);
    let t = topic.clone();
    std::thread::Builder::new()
        .name("kensa-control".into())
        .spawn(move || control_reader(&kafka, &t, cmd_tx))
        .expect("spawn control reader");
    while let Some(cmd) = cmd_rx.recv().await {
        match cmd {
            Ok(cmd) => {
                tracing::info!(topic = %topic, ?cmd, "control command");
                apply(cmd, &loader, &current, &tx).await;
            }
            Err(e) => {
                metrics::counter!(CONTROL_ERRORS, "reason" => "parse").increment(1);
                tracing::error!(topic = %topic, "bad control message ignored: {e}");
            }
        }
    }
}

fn control_reader(kafka: &kensa_core::config::KafkaConfig, topic: &str, out: mpsc::Sender<Result<Command, String>>) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let mut cc = kensa_publish::client_config(kafka);
    cc.set("group.id", "kensa-control").set("enable.auto.commit", "false");
    for k in ["acks", "enable.idempotence", "message.timeout.ms"] {
        cc.remove(k);
    }
    let consumer: BaseConsumer = match cc.create() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(topic, "cannot read the control topic: {e}");
            return;
        }
    };
    let parts: Vec<i32> = match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
        Ok(md) => md.topics().iter().filter(|t| t.name() == topic).flat_map(|t| t.partitions().iter().map(|p| p.id())).collect(),
        Err(e) => {
            tracing::error!(topic, "cannot read the control topic: {e}");
            return;
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        let _ = tpl.add_partition_offset(topic, p, Offset::End);
    }
    if let Err(e) = consumer.assign(&tpl) {
        tracing::error!(topic, "cannot read the control topic: {e}");
        return;
    }
    tracing::info!(topic, "reading control commands");
    loop {
        if out.is_closed() {
            return;
        }
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else { continue };
        let parsed = match msg {
            Ok(m) => {
                let bytes = m.payload().unwrap_or_default();
                if bytes.len() > 64 << 10 {
                    Err(format!("{} bytes is over the 64 KiB control-message limit", bytes.len()))
                } else {
                    serde_json::from_slice::<Command>(bytes).map_err(|e| format!("{e} in {:?}", String::from_utf8_lossy(bytes)))
                }
            }
            Err(e) => Err(e.to_string()),
        };
        if out.blocking_send(parsed).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Command;
    use proptest::prelude::*;

    #[test]
    fn commands_parse() {
        let c: Command = serde_json::from_str(r#"{"camera": "c1", "product": "p"}"#).unwrap();
        assert_eq!((c.camera.as_deref(), c.product.as_str(), c.bank), (Some("c1"), "p", None));
        assert!(serde_json::from_str::<Command>(r#"{"camera": "c1"}"#).is_err(), "product is required");
        assert!(serde_json::from_str::<Command>(r#"{"product": "p", "rm": "-rf"}"#).is_err(), "unknown keys are refused");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn control_messages_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = serde_json::from_slice::<Command>(&bytes);
        }
    }
}
