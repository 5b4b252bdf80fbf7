//! The one owner of camera → product assignments. The config sets them; SIGHUP and the control
//! topic change them (changeover); the batcher reads them when it groups a batch, so every frame
//! is scored with the product its camera had when the batch was formed.

use kensa_core::config::KensaConfig;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

#[derive(Clone, Default)]
pub struct Lineup {
    inner: Arc<RwLock<HashMap<String, Arc<str>>>>,
}

impl Lineup {
    pub fn from_config(cfg: &KensaConfig) -> Self {
        let map = cfg.cameras.iter().map(|c| (c.id.clone(), Arc::<str>::from(c.product.as_str()))).collect();
        Self { inner: Arc::new(RwLock::new(map)) }
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
