//! The one owner of camera → product assignments. The config sets them; SIGHUP and the control
//! topic change them (changeover); the batcher reads them when it groups a batch, so every frame
//! is scored with the product its camera had when the batch was formed. Control-topic
//! changeovers are kept in a file beside the outbox, so a restart keeps them.

use kensa_core::config::KensaConfig;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

#[derive(Clone, Default)]
pub struct Lineup {
    inner: Arc<RwLock<HashMap<String, Arc<str>>>>,
    /// Changeovers made through the control topic, kept in a file so they survive a restart
    /// (the config does not know about them). None: not kept.
    kept: Option<Arc<Kept>>,
}

/// The file of control-topic changeovers (camera → product), written atomically.
struct Kept {
    path: PathBuf,
    changes: Mutex<BTreeMap<String, String>>,
}

impl Lineup {
    pub fn from_config(cfg: &KensaConfig) -> Self {
        let map = cfg.cameras.iter().map(|c| (c.id.clone(), Arc::<str>::from(c.product.as_str()))).collect();
        Self { inner: Arc::new(RwLock::new(map)), kept: None }
    }

    /// Keeps control-topic changeovers in `path`, and applies those already there (for cameras
    /// of the config, to products in `products`; others are dropped with a warning).
    pub fn keep_changeovers(mut self, path: &Path, products: &[&str]) -> Self {
        let mut changes: BTreeMap<String, String> = std::fs::read(path)
            .ok()
            .and_then(|b| match serde_json::from_slice(&b) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "unreadable changeover file ignored: {e}");
                    None
                }
            })
            .unwrap_or_default();
        changes.retain(|camera, product| {
            let ok = products.contains(&product.as_str()) && self.assign(camera, product);
            if ok {
                tracing::info!(camera = %camera, product = %product, "changeover from the control topic kept across the restart");
            } else {
                tracing::warn!(camera = %camera, product = %product, "kept changeover no longer fits the config; dropped");
            }
            ok
        });
        self.kept = Some(Arc::new(Kept { path: path.to_path_buf(), changes: Mutex::new(changes) }));
        self
    }

    /// Records a control-topic changeover (`Some(product)`), or forgets it (`None`: the config
    /// decides again), in the file.
    pub fn remember(&self, camera: &str, product: Option<&str>) {
        let Some(k) = &self.kept else { return };
        let mut changes = k.changes.lock().expect("changeover lock");
        match product {
            Some(p) => changes.insert(camera.to_string(), p.to_string()),
            None => changes.remove(camera),
        };
        let tmp = k.path.with_extension("tmp");
        let written = serde_json::to_vec_pretty(&*changes)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &k.path));
        if let Err(e) = written {
            tracing::error!(path = %k.path.display(), "cannot keep the changeover for the next start: {e}");
        }
    }

    /// The product a camera inspects now (None for a camera not in the config).
    pub fn product_of(&self, camera: &str) -> Option<Arc<str>> {
        self.inner.read().expect("lineup lock").get(camera).cloned()
    }

    pub fn has_camera(&self, camera: &str) -> bool {
        self.inner.read().expect("lineup lock").contains_key(camera)
    }

    /// Assigns a known camera to a product; false for an unknown camera.
    pub fn assign(&self, camera: &str, product: &str) -> bool {
        let mut m = self.inner.write().expect("lineup lock");
        match m.get_mut(camera) {
            Some(p) => {
                *p = Arc::from(product);
                true
            }
            None => false,
        }
    }

    /// Every camera and its product, sorted by camera.
    pub fn snapshot(&self) -> Vec<(String, Arc<str>)> {
        let mut v: Vec<_> =
            self.inner.read().expect("lineup lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_cameras_are_reassigned() {
        let l = Lineup::default();
        assert!(!l.assign("c1", "p"));
        l.inner.write().unwrap().insert("c1".into(), "a".into());
        assert!(l.assign("c1", "b"));
        assert_eq!(l.product_of("c1").as_deref(), Some("b"));
        assert_eq!(l.product_of("c2"), None);
    }
}
