//! Hot reload and product changeover, without a restart.
//!
//! Three triggers: a bank file that changes on disk (polled), SIGHUP (the config file is read
//! again: changed bank paths, new products, cameras assigned to another product), and an optional
//! Kafka control topic (`kafka.control_topic`) carrying JSON commands:
//! `{"camera": "line-1", "product": "bottle"}` or `{"product": "bottle", "bank": "bottle-v2.kbank"}`
//! (a file inside `control.banks_dir`; see [`refusal`] for what the topic may ask).
//! Banks are loaded and validated off the model thread; a bad one is rejected with a clear error
//! and the old one keeps running. The model thread swaps a bank between two batches and the
//! batcher reads the [`Lineup`] when it forms a batch, so every frame is scored entirely with
//! one bank: a change is atomic per camera.

use crate::lineup::Lineup;
use crate::model::{note_swap, Loader, ModelHandle};
use kensa_core::config::KensaConfig;
use kensa_core::metrics::{self as m, ControlError, Label, ReloadResult};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// What reloading works with: how to load a bank, where to swap it in, and the lineup.
#[derive(Clone)]
pub struct Reloader {
    pub loader: Loader,
    pub model: ModelHandle,
    pub lineup: Lineup,
    /// Product → the bank file in use.
    pub banks: Arc<Mutex<HashMap<String, PathBuf>>>,
    /// The only folder control commands may load banks from (`control.banks_dir`).
    pub banks_dir: Option<PathBuf>,
    /// Part ids announced on the control topic.
    pub parts: crate::parts::PartIds,
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Reloader {
    pub fn new(
        cfg: &KensaConfig,
        loader: Loader,
        model: ModelHandle,
        lineup: Lineup,
        parts: crate::parts::PartIds,
    ) -> Self {
        let banks = cfg.products.iter().map(|(k, v)| (k.clone(), v.bank.clone())).collect();
        let banks_dir = cfg.control.banks_dir.as_ref().map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()));
        Self { loader, model, lineup, banks: Arc::new(Mutex::new(banks)), banks_dir, parts }
    }

    fn bank_paths(&self) -> HashMap<String, PathBuf> {
        self.banks.lock().expect("reload state").clone()
    }

    /// Loads a bank and swaps it in; false (logged, counted) when it is rejected.
    async fn swap(&self, product: &str, path: &Path, trigger: &'static str) -> bool {
        match self.load(product, path, trigger).await {
            Some(bank) => self.install(product, bank, path, trigger).await,
            None => false,
        }
    }

    /// Loads and validates a bank; None (logged, counted) when it is rejected.
    async fn load(&self, product: &str, path: &Path, trigger: &'static str) -> Option<kensa_model::bank::Bank> {
        match self.loader.load(path).await {
            Ok(b) => Some(b),
            Err(e) => {
                metrics::counter!(m::BANK_RELOADS, "product" => product.to_string(), "result" => ReloadResult::Rejected.as_str())
                    .increment(1);
                tracing::error!(product, trigger, "new bank rejected, the previous one keeps running: {e}");
                None
            }
        }
    }

    /// Swaps a loaded bank in between two batches.
    async fn install(&self, product: &str, bank: kensa_model::bank::Bank, path: &Path, trigger: &'static str) -> bool {
        let new = bank.meta.version();
        match self.model.swap_bank(product, bank).await {
            Ok(old) => {
                note_swap(product, old.as_deref(), &new, path, trigger);
                self.banks.lock().expect("reload state").insert(product.to_string(), path.to_path_buf());
                true
            }
            Err(e) => {
                tracing::error!(product, "bank not swapped: {e}");
                false
            }
        }
    }

    /// Moves a camera to a product with a loaded bank; false (logged, counted) otherwise.
    fn assign(&self, camera: &str, product: &str, trigger: &'static str) -> bool {
        let known_product = self.banks.lock().expect("reload state").contains_key(product);
        if known_product && self.lineup.assign(camera, product) {
            tracing::info!(camera, product, trigger, "camera now inspects another product");
            return true;
        }
        metrics::counter!(m::CONTROL_ERRORS, "reason" => ControlError::Unknown.as_str()).increment(1);
        tracing::error!(
            camera,
            product,
            trigger,
            "changeover ignored: unknown camera or product without a loaded bank"
        );
        false
    }
}

/// Polls every product's bank file; a changed file is loaded and swapped in.
pub async fn watch_files(r: Reloader, every: Duration) {
    let mut seen: HashMap<PathBuf, Option<(SystemTime, u64)>> = r
        .bank_paths()
        .into_values()
        .map(|p| {
            let s = stamp(&p);
            (p, s)
        })
        .collect();
    loop {
        tokio::time::sleep(every).await;
        for (product, path) in r.bank_paths() {
            let now = stamp(&path);
            let before = seen.get(&path).copied().flatten();
            if now.is_some() && now != before {
                seen.insert(path.clone(), now);
                tracing::info!(product = %product, path = %path.display(), "bank file changed; reloading");
                r.swap(&product, &path, "file").await;
            }
        }
    }
}

/// On SIGHUP, reads the config again and applies bank and camera-product changes.
pub async fn on_sighup(config: PathBuf, r: Reloader) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        tracing::info!(config = %config.display(), "SIGHUP: reloading the config");
        let cfg = match KensaConfig::load(&config) {
            Ok(c) => c,
            Err(e) => {
                metrics::counter!(m::CONTROL_ERRORS, "reason" => ControlError::Config.as_str()).increment(1);
                tracing::error!("config reload rejected, nothing changed: {e}");
                continue;
            }
        };
        let old = r.bank_paths();
        for (product, p) in &cfg.products {
            if old.get(product) != Some(&p.bank) {
                r.swap(product, &p.bank, "sighup").await;
            }
        }
        for cam in &cfg.cameras {
            match r.lineup.product_of(&cam.id) {
                None => tracing::warn!(camera = %cam.id, "a camera added to the config starts only after a restart"),
                Some(p) if *p != *cam.product => {
                    if r.assign(&cam.id, &cam.product, "sighup") {
                        // The config decides again for this camera.
                        r.lineup.remember(&cam.id, None);
                    }
                }
                Some(_) => {}
            }
        }
    }
}

/// A command on the control topic.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub camera: Option<String>,
    pub product: Option<String>,
    pub bank: Option<PathBuf>,
    /// The part the camera's next frame shows (needs `camera`).
    pub part_id: Option<String>,
}

/// Longest a control command's bank may take to load before the command is given up (the
/// next command and the shutdown never wait on one slow file).
const CONTROL_LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a control command is refused before anything is loaded, if it is: messages on the
/// control topic come from outside, so they may only name products of the config and banks
/// that are regular files inside `control.banks_dir`.
pub fn refusal(cmd: &Command, products: &HashMap<String, PathBuf>, banks_dir: Option<&Path>) -> Option<String> {
    if let Some(id) = &cmd.part_id {
        if cmd.camera.is_none() {
            return Some("a part_id needs the camera whose next frame it names".into());
        }
        if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
            return Some("a part_id is 1-128 printable characters".into());
        }
    }
    let Some(product) = &cmd.product else {
        return match (&cmd.part_id, &cmd.bank) {
            (Some(_), None) => None,
            (_, Some(_)) => Some("a bank needs the product it is for".into()),
            (None, None) => Some("neither a product nor a part_id: nothing to do".into()),
        };
    };
    if !products.contains_key(product) {
        return Some("the product is not in the config".into());
    }
    let bank = cmd.bank.as_ref()?;
    let Some(dir) = banks_dir else {
        return Some("control.banks_dir is not set, so control commands may not load banks".into());
    };
    let Ok(real) = dir.join(bank).canonicalize() else {
        return Some(format!("bank {} does not exist", bank.display()));
    };
    if !real.starts_with(dir) {
        return Some(format!("bank {} is outside control.banks_dir {}", bank.display(), dir.display()));
    }
    if !std::fs::metadata(&real).is_ok_and(|m| m.is_file()) {
        return Some(format!("bank {} is not a regular file", bank.display()));
    }
    None
}

/// Applies one control-topic command.
pub async fn apply(cmd: Command, r: &Reloader) {
    if let Some(why) = refusal(&cmd, &r.bank_paths(), r.banks_dir.as_deref()) {
        metrics::counter!(m::CONTROL_ERRORS, "reason" => ControlError::Refused.as_str()).increment(1);
        tracing::error!(product = ?cmd.product, camera = ?cmd.camera, "control command refused: {why}");
        return;
    }
    if let (Some(camera), Some(id)) = (&cmd.camera, &cmd.part_id) {
        if !r.lineup.has_camera(camera) {
            metrics::counter!(m::CONTROL_ERRORS, "reason" => ControlError::Unknown.as_str()).increment(1);
            tracing::error!(camera, part_id = %id, "part id for an unknown camera ignored");
            return;
        }
        r.parts.announce(camera, id, SystemTime::now());
        tracing::debug!(camera, part_id = %id, "part id announced for the camera's next frame");
    }
    let Some(product) = cmd.product else { return };
    if let Some(bank) = &cmd.bank {
        // The very file `refusal` checked (symlinks resolved), not the name again.
        let path =
            r.banks_dir.as_deref().and_then(|d| d.join(bank).canonicalize().ok()).unwrap_or_else(|| bank.clone());
        // Only the load is bounded: once loaded, the swap always completes.
        let Ok(loaded) = tokio::time::timeout(CONTROL_LOAD_TIMEOUT, r.load(&product, &path, "control")).await else {
            metrics::counter!(m::CONTROL_ERRORS, "reason" => ControlError::Refused.as_str()).increment(1);
            tracing::error!(product = %product, bank = %path.display(), "control command given up: the bank took over {}s to load", CONTROL_LOAD_TIMEOUT.as_secs());
            return;
        };
        let Some(bank) = loaded else { return };
        if !r.install(&product, bank, &path, "control").await {
            return;
        }
    }
    if let Some(camera) = cmd.camera {
        if r.assign(&camera, &product, "control") {
            r.lineup.remember(&camera, Some(&product));
        }
    }
}

/// Reads the control topic from its end and applies each command.
pub async fn control_topic(kafka: kensa_core::config::KafkaConfig, topic: String, r: Reloader) {
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Result<Command, String>>(16);
    let t = topic.clone();
    if let Err(e) =
        std::thread::Builder::new().name("kensa-control".into()).spawn(move || control_reader(&kafka, &t, &cmd_tx))
    {
        tracing::error!(topic = %topic, "cannot start the control-topic reader: {e}");
        return;
    }
    while let Some(cmd) = cmd_rx.recv().await {
        match cmd {
            Ok(cmd) => {
                tracing::info!(topic = %topic, ?cmd, "control command");
                apply(cmd, &r).await;
            }
            Err(e) => {
                metrics::counter!(m::CONTROL_ERRORS, "reason" => ControlError::Parse.as_str()).increment(1);
                tracing::error!(topic = %topic, "bad control message ignored: {e}");
            }
        }
    }
}

fn control_reader(kafka: &kensa_core::config::KafkaConfig, topic: &str, out: &mpsc::Sender<Result<Command, String>>) {
    kensa_publish::feedback::follow(kafka, topic, "kensa-control", "control commands", |m| {
        let parsed = match m {
            Ok([]) => return !out.is_closed(),
            Ok(bytes) => serde_json::from_slice::<Command>(bytes)
                .map_err(|e| format!("{e} in {:?}", String::from_utf8_lossy(bytes))),
            Err(e) => Err(e),
        };
        out.blocking_send(parsed).is_ok()
    });
}

#[cfg(test)]
mod tests {
    use super::{refusal, Command};
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    #[test]
    fn commands_may_only_name_config_products_and_banks_inside_banks_dir() {
        let root = std::env::temp_dir().join(format!("kensa-refusal-{}", std::process::id()));
        let dir = root.join("banks");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("ok.kbank"), b"x").unwrap();
        std::fs::write(root.join("outside.kbank"), b"x").unwrap();
        let dir = dir.canonicalize().unwrap();
        let products: HashMap<String, PathBuf> = HashMap::from([("disc".into(), PathBuf::from("disc.kbank"))]);
        let cmd = |product: &str, bank: Option<&str>| Command {
            camera: None,
            product: Some(product.into()),
            bank: bank.map(PathBuf::from),
            part_id: None,
        };
        let refused = |c: Command, d: Option<&std::path::Path>| refusal(&c, &products, d);
        assert_eq!(refused(cmd("disc", Some("ok.kbank")), Some(&dir)), None);
        assert_eq!(refused(cmd("disc", None), None), None, "a changeover needs no bank folder");
        assert!(refused(cmd("made-up", None), Some(&dir)).unwrap().contains("not in the config"));
        assert!(refused(cmd("disc", Some("ok.kbank")), None).unwrap().contains("banks_dir is not set"));
        assert!(refused(cmd("disc", Some("../outside.kbank")), Some(&dir)).unwrap().contains("outside"));
        assert!(refused(cmd("disc", Some("/dev/zero")), Some(&dir)).unwrap().contains("outside"));
        assert!(refused(cmd("disc", Some("sub")), Some(&dir)).unwrap().contains("not a regular file"));
        assert!(refused(cmd("disc", Some("missing.kbank")), Some(&dir)).unwrap().contains("does not exist"));
        let part = |camera: Option<&str>, id: &str| Command {
            camera: camera.map(Into::into),
            product: None,
            bank: None,
            part_id: Some(id.into()),
        };
        assert_eq!(refused(part(Some("c1"), "P-42"), None), None, "a part id needs no product");
        assert!(refused(part(None, "P-42"), None).unwrap().contains("needs the camera"));
        assert!(refused(part(Some("c1"), "bad\nid"), None).unwrap().contains("printable"));
        let nothing = Command { camera: Some("c1".into()), product: None, bank: None, part_id: None };
        assert!(refused(nothing, None).unwrap().contains("nothing to do"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn commands_parse() {
        let c: Command = serde_json::from_str(r#"{"camera": "c1", "product": "p"}"#).unwrap();
        assert_eq!((c.camera.as_deref(), c.product.as_deref(), c.bank), (Some("c1"), Some("p"), None));
        let c: Command = serde_json::from_str(r#"{"camera": "c1", "part_id": "P-7"}"#).unwrap();
        assert_eq!((c.product, c.part_id.as_deref()), (None, Some("P-7")));
        assert!(
            serde_json::from_str::<Command>(r#"{"product": "p", "rm": "-rf"}"#).is_err(),
            "unknown keys are refused"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn control_messages_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = serde_json::from_slice::<Command>(&bytes);
        }
    }
}
