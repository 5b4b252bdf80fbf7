//! Bank versions on disk: every change to a bank is written as `<bank>.versions/<version>.kbank`
//! beside the bank, then over the bank itself (each write atomic: a temporary file renamed into
//! place), keeping the newest `keep` versions. `kensa bank log` lists them, `kensa bank
//! rollback` copies one back as a new version. Daemons that hot-reload the bank file (one host,
//! or several sharing the folder) pick the new version up by themselves.

use crate::bank::{Bank, BankMeta};
use crate::lineage::{Change, Lineage};
use crate::{ModelError, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Versions kept beside a bank unless configured otherwise.
pub const DEFAULT_KEEP: usize = 20;

/// The folder of a bank's versions: `<bank>.versions`.
pub fn dir_of(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".versions");
    PathBuf::from(s)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Gives `bank` its lineage for `change` made from `parent` (its metadata before the change):
/// the parent's version, the change, and a new version over tensors, calibration and parent.
/// `lineage` carries the learned state (rows, observations) the caller computed.
pub fn stamp(bank: &mut Bank, parent: &BankMeta, change: Change, mut lineage: Lineage) {
    lineage.parent = parent.version();
    lineage.change = change;
    lineage.changed_unix = now_unix();
    let mut h = Sha256::new();
    h.update(bank.meta.content_sha256.as_bytes());
    h.update(serde_json::to_string(&bank.meta.calibration).unwrap_or_default().as_bytes());
    h.update(lineage.parent.as_bytes());
    h.update(serde_json::to_string(&lineage.change).unwrap_or_default().as_bytes());
    lineage.version = hex::encode(h.finalize()).chars().take(12).collect();
    bank.meta.lineage = Some(lineage);
}

/// The lineage a first change starts from: the enrolled bank's rows and decision.
pub fn initial_lineage(meta: &BankMeta, layers: &[tch::Tensor]) -> Lineage {
    meta.lineage.clone().unwrap_or_else(|| Lineage {
        version: meta.version(),
        parent: String::new(),
        change: Change::Enrolled,
        changed_unix: meta.created_unix,
        enrolled_rows: layers.iter().map(|t| t.size()[0]).collect(),
        learned: Vec::new(),
        observations: Vec::new(),
        enrolled_threshold: meta.calibration.image_threshold,
    })
}

/// Writes `bank` as a new version of the bank at `path` and then over `path`; the version the
/// file held before is kept too (an enrolled bank's first change keeps the enrolled one).
/// Keeps the newest `keep` versions. Returns the new version.
pub fn commit(bank: &Bank, path: &Path, keep: usize) -> Result<String> {
    let dir = dir_of(path);
    let err = |msg: String| ModelError::Bank { path: path.to_path_buf(), msg };
    std::fs::create_dir_all(&dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    if let Ok(current) = Bank::load_unchecked(path, tch::Device::Cpu) {
        let kept = dir.join(format!("{}.kbank", current.meta.version()));
        if !kept.exists() {
            current.save(&kept)?;
        }
    }
    let version = bank.meta.version();
    bank.save(&dir.join(format!("{version}.kbank")))?;
    bank.save(path)?;
    prune(&dir, keep.max(1));
    Ok(version)
}

/// Deletes all but the newest `keep` version files (by modification time).
fn prune(dir: &Path, keep: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "kbank"))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, p) in files.into_iter().skip(keep) {
        if let Err(e) = std::fs::remove_file(&p) {
            tracing::warn!(path = %p.display(), "cannot delete an old bank version: {e}");
        }
    }
}

/// One version of a bank, as `kensa bank log` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VersionInfo {
    pub version: String,
    pub parent: String,
    pub change: String,
    pub changed_unix: u64,
    pub references: usize,
    pub learned: usize,
    pub rows: i64,
    pub image_threshold: f32,
    pub current: bool,
    pub file: PathBuf,
}

/// Every kept version of the bank at `path`, newest first; unreadable files are skipped with a
/// warning.
pub fn log(path: &Path) -> Result<Vec<VersionInfo>> {
    let current = Bank::load_unchecked(path, tch::Device::Cpu)?.meta.version();
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir_of(path)) {
        for p in rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "kbank")) {
            match Bank::load_unchecked(&p, tch::Device::Cpu) {
                Ok(b) => out.push(info(&b, &current, p)),
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
    if !out.iter().any(|v| v.current) {
        out.push(info(&Bank::load_unchecked(path, tch::Device::Cpu)?, &current, path.to_path_buf()));
    }
    out.sort_by(|a, b| b.changed_unix.cmp(&a.changed_unix).then(b.current.cmp(&a.current)));
    Ok(out)
}

fn info(b: &Bank, current: &str, file: PathBuf) -> VersionInfo {
    let m = &b.meta;
    let (parent, change, changed, learned) = match &m.lineage {
        Some(l) => (l.parent.clone(), l.change.to_string(), l.changed_unix, l.learned.len()),
        None => (String::new(), Change::Enrolled.to_string(), m.created_unix, 0),
    };
    VersionInfo {
        version: m.version(),
        parent,
        change,
        changed_unix: changed,
        references: m.references,
        learned,
        rows: b.layers.iter().map(|t| t.size()[0]).sum(),
        image_threshold: m.calibration.image_threshold,
        current: m.version() == current,
        file,
    }
}

/// Makes the kept version `to` (a prefix of its version is enough) current again, as a new
/// version whose parent is the one it replaces. Returns the new version.
pub fn rollback(path: &Path, to: &str, keep: usize) -> Result<String> {
    let err = |msg: String| ModelError::Bank { path: path.to_path_buf(), msg };
    let versions = log(path)?;
    let matches: Vec<&VersionInfo> = versions.iter().filter(|v| !to.is_empty() && v.version.starts_with(to)).collect();
    let target = match matches.as_slice() {
        [one] => *one,
        [] => {
            let known: Vec<&str> = versions.iter().map(|v| v.version.as_str()).collect();
            return Err(err(format!("no kept version {to} (kept: {})", known.join(", "))));
        }
        _ => return Err(err(format!("{to} names {} versions; give more of it", matches.len()))),
    };
    let current = Bank::load_unchecked(path, tch::Device::Cpu)?;
    let mut bank = Bank::load_unchecked(&target.file, tch::Device::Cpu)?;
    let lineage = initial_lineage(&bank.meta, &bank.layers);
    let to = target.version.clone();
    stamp(&mut bank, &current.meta, Change::RolledBack { to }, lineage);
    commit(&bank, path, keep)
}
