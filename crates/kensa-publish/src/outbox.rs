//! The durable outbox: every event is appended to an on-disk spool (fsync once per appended
//! batch) before it is sent to Kafka, and forgotten when Kafka acknowledges it. After a crash or
//! a restart, whatever was spooled and not acknowledged is sent again: consumers dedupe on
//! `event_id`, which is the same on every retry.
//!
//! Layout: `DIR/NNNNNNNNNNNN.seg` segment files of records `[len u32 LE][crc32 u32 LE][body]`,
//! and beside each a `.acks` file of acknowledged record indices (u32 LE; not fsynced: losing
//! one only causes a duplicate). A segment is deleted once all its records are acknowledged.
//! Records rejected by Kafka for good (too large, not authorised) are moved to
//! `DIR/rejected/<event id>.bin` and logged, never dropped silently.
//!
//! Budget: `max_bytes` of segments. Past 80 % of it, normal results are refused; past 100 %,
//! defects too. Every refusal is counted by the caller.

use crate::PublishError;
use prost::Message;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// One spooled Kafka record (a prost message, so the spool format can grow compatibly).
#[derive(Clone, PartialEq, Message)]
pub struct SpoolRecord {
    #[prost(string, tag = "1")]
    pub event_id: String,
    /// Topics to send to (results, and defects for anomalous frames).
    #[prost(string, repeated, tag = "2")]
    pub topics: Vec<String>,
    #[prost(string, tag = "3")]
    pub key: String,
    #[prost(bytes = "vec", tag = "4")]
    pub payload: Vec<u8>,
    #[prost(string, repeated, tag = "5")]
    pub header_names: Vec<String>,
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub header_values: Vec<Vec<u8>>,
    #[prost(bool, tag = "7")]
    pub anomalous: bool,
}

/// Where a record lives: (segment, index in segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId {
    pub segment: u64,
    pub index: u32,
}

/// Why an append was refused: the `reason` label of `kensa_outbox_dropped_total`.
pub use kensa_core::metrics::OutboxRefusal as Refused;

struct Segment {
    path: PathBuf,
    acks: Option<File>,
    bytes: u64,
    outstanding: u32,
}

pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    segment_max: u64,
    segments: BTreeMap<u64, Segment>,
    current: Option<(u64, File, u32)>,
    usage: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Outbox { path: path.to_path_buf(), source }
}

impl Outbox {
    /// Opens (or creates) the spool and returns the records not yet acknowledged, oldest first.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Self, Vec<(EntryId, SpoolRecord)>), PublishError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut names: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .filter_map(|p| p.file_stem()?.to_str()?.parse::<u64>().ok().map(|n| (n, p)))
            .collect();
        names.sort();
        let mut ob = Outbox {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_max: (max_bytes / 16).clamp(64 << 10, 16 << 20),
            segments: BTreeMap::new(),
            current: None,
            usage: 0,
        };
        let mut pending = Vec::new();
        for (n, path) in names {
            let acks_path = path.with_extension("acks");
            let acked = read_acks(&acks_path);
            let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
            let records = read_segment(&path)?;
            let mut outstanding = 0;
            for (i, rec) in records.into_iter().enumerate() {
                if !acked.contains(&(i as u32)) {
                    pending.push((EntryId { segment: n, index: i as u32 }, rec));
                    outstanding += 1;
                }
            }
            if outstanding == 0 {
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(&acks_path);
                continue;
            }
            let acks = OpenOptions::new().create(true).append(true).open(&acks_path).map_err(io(&acks_path))?;
            ob.usage += bytes;
            ob.segments.insert(n, Segment { path, acks: Some(acks), bytes, outstanding });
        }
        Ok((ob, pending))
    }

    /// Bytes of segments on disk.
    pub fn usage(&self) -> u64 {
        self.usage
    }

    /// Records spooled and not yet acknowledged.
    pub fn pending(&self) -> u64 {
        self.segments.values().map(|s| s.outstanding as u64).sum()
    }

    fn next_segment_id(&self) -> u64 {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let last = self.segments.keys().next_back().copied().unwrap_or(0);
        now.max(last + 1)
    }

    fn roll(&mut self) -> Result<(), PublishError> {
        if let Some((n, _, _)) = self.current.take() {
            self.maybe_delete(n);
        }
        let n = self.next_segment_id();
        let path = self.dir.join(format!("{n:016}.seg"));
        let f = OpenOptions::new().create_new(true).append(true).open(&path).map_err(io(&path))?;
        let acks_path = path.with_extension("acks");
        let acks = OpenOptions::new().create(true).append(true).open(&acks_path).map_err(io(&acks_path))?;
        self.segments.insert(n, Segment { path, acks: Some(acks), bytes: 0, outstanding: 0 });
        self.current = Some((n, f, 0));
        Ok(())
    }

    /// Appends records durably (one fsync for the whole call). Each gets an id, or is refused
    /// under the budget policy.
    pub fn append(&mut self, records: &[SpoolRecord]) -> Result<Vec<Result<EntryId, Refused>>, PublishError> {
        let mut out = Vec::with_capacity(records.len());
        let mut wrote = false;
        for rec in records {
            let body = rec.encode_to_vec();
            let size = body.len() as u64 + 8;
            let limit = if rec.anomalous { self.max_bytes } else { self.max_bytes / 10 * 8 };
            if self.usage + size > limit {
                out.push(Err(if rec.anomalous { Refused::FullDefect } else { Refused::FullNormal }));
                continue;
            }
            let need_roll = match &self.current {
                None => true,
                Some((n, _, _)) => self.segments[n].bytes + size > self.segment_max,
            };
            if need_roll {
                if wrote {
                    self.sync()?;
                }
                self.roll()?;
            }
            let (n, f, next) = self.current.as_mut().expect("a current segment");
            let seg = self.segments.get_mut(n).expect("segment state");
            let mut buf = Vec::with_capacity(body.len() + 8);
            buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            buf.extend_from_slice(&body);
            f.write_all(&buf).map_err(io(&seg.path))?;
            seg.bytes += size;
            seg.outstanding += 1;
            self.usage += size;
            out.push(Ok(EntryId { segment: *n, index: *next }));
            *next += 1;
            wrote = true;
        }
        if wrote {
            self.sync()?;
        }
        Ok(out)
    }

    fn sync(&mut self) -> Result<(), PublishError> {
        if let Some((n, f, _)) = &self.current {
            f.sync_data().map_err(io(&self.segments[n].path))?;
        }
        Ok(())
    }

    /// Marks a record acknowledged; a segment whose records are all acknowledged is deleted.
    pub fn ack(&mut self, id: EntryId) {
        if let Some(seg) = self.segments.get_mut(&id.segment) {
            if let Some(a) = seg.acks.as_mut() {
                let _ = a.write_all(&id.index.to_le_bytes());
            }
            seg.outstanding = seg.outstanding.saturating_sub(1);
        }
        self.maybe_delete(id.segment);
    }

    /// Moves a record Kafka refused for good to `rejected/`, and acknowledges it.
    pub fn reject(&mut self, id: EntryId, rec: &SpoolRecord, reason: &str) -> PathBuf {
        let path = self.keep_rejected(rec, reason);
        self.ack(id);
        path
    }

    /// Keeps a record that will never be sent in `rejected/<event id>.bin`, with its reason
    /// beside it, so nothing disappears silently.
    pub fn keep_rejected(&self, rec: &SpoolRecord, reason: &str) -> PathBuf {
        let dir = self.dir.join("rejected");
        let safe: String =
            rec.event_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        let path = dir.join(format!("{safe}.bin"));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(&path, rec.encode_to_vec());
        let _ = std::fs::write(path.with_extension("reason.txt"), reason);
        path
    }

    fn maybe_delete(&mut self, n: u64) {
        let is_current = self.current.as_ref().is_some_and(|(c, _, _)| *c == n);
        let done = self.segments.get(&n).is_some_and(|s| s.outstanding == 0);
        if done && !is_current {
            if let Some(seg) = self.segments.remove(&n) {
                let _ = std::fs::remove_file(&seg.path);
                let _ = std::fs::remove_file(seg.path.with_extension("acks"));
                self.usage = self.usage.saturating_sub(seg.bytes);
            }
        }
    }
}

fn read_acks(path: &Path) -> std::collections::HashSet<u32> {
    let mut v = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut v);
    }
    v.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Reads a segment's records; a torn or corrupt tail (a crash mid-write) ends the segment.
fn read_segment(path: &Path) -> Result<Vec<SpoolRecord>, PublishError> {
    let f = File::open(path).map_err(io(path))?;
    let mut r = BufReader::new(f);
    let mut out = Vec::new();
    loop {
        let mut head = [0u8; 8];
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(PublishError::Outbox { path: path.to_path_buf(), source: e }),
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > 256 << 20 {
            tracing::warn!(path = %path.display(), "outbox segment has an impossible record length; ignoring the rest");
            break;
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() || crc32fast::hash(&body) != crc {
            tracing::warn!(path = %path.display(), records = out.len(), "outbox segment ends in a torn record (crash mid-write); ignoring it");
            break;
        }
        match SpoolRecord::decode(&body[..]) {
            Ok(rec) => out.push(rec),
            Err(e) => {
                tracing::warn!(path = %path.display(), "undecodable outbox record: {e}; ignoring the rest");
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, anomalous: bool, size: usize) -> SpoolRecord {
        SpoolRecord {
            event_id: id.into(),
            topics: vec!["t".into()],
            key: "cam".into(),
            payload: vec![7; size],
            anomalous,
            ..Default::default()
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kensa-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn unacked_records_survive_reopen_and_acked_ones_do_not() {
        let d = tmp("reopen");
        let (mut ob, pending) = Outbox::open(&d, 1 << 30).unwrap();
        assert!(pending.is_empty());
        let ids: Vec<EntryId> = ob
            .append(&[rec("a", false, 10), rec("b", true, 10), rec("c", false, 10)])
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        ob.ack(ids[1]);
        drop(ob);
        let (mut ob, pending) = Outbox::open(&d, 1 << 30).unwrap();
        let names: Vec<&str> = pending.iter().map(|(_, r)| r.event_id.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        for (id, _) in &pending {
            ob.ack(*id);
        }
        assert_eq!(ob.pending(), 0);
        drop(ob);
        let (ob, pending) = Outbox::open(&d, 1 << 30).unwrap();
        assert!(pending.is_empty());
        assert_eq!(ob.usage(), 0, "fully acknowledged segments are deleted");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn torn_tail_is_ignored_not_fatal() {
        let d = tmp("torn");
        let (mut ob, _) = Outbox::open(&d, 1 << 30).unwrap();
        ob.append(&[rec("a", false, 10), rec("b", false, 10)]).unwrap();
        drop(ob);
        let seg = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().unwrap() == "seg")
            .unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&seg, bytes).unwrap();
        let (_, pending) = Outbox::open(&d, 1 << 30).unwrap();
        assert_eq!(pending.iter().map(|(_, r)| r.event_id.as_str()).collect::<Vec<_>>(), ["a"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn budget_drops_normal_results_first() {
        let d = tmp("budget");
        let (mut ob, _) = Outbox::open(&d, 1000).unwrap();
        // Fill to ~80 % with normal results: the next normal one is refused, a defect is not.
        let mut accepted = 0;
        for i in 0..20 {
            if ob.append(&[rec(&format!("n{i}"), false, 60)]).unwrap()[0].is_ok() {
                accepted += 1;
            }
        }
        assert!(ob.usage() <= 800, "{}", ob.usage());
        assert!(accepted >= 9);
        assert_eq!(ob.append(&[rec("n", false, 60)]).unwrap()[0], Err(Refused::FullNormal));
        assert!(ob.append(&[rec("d1", true, 60)]).unwrap()[0].is_ok());
        let mut refused_defect = false;
        for i in 0..10 {
            if ob.append(&[rec(&format!("d{i}"), true, 60)]).unwrap()[0] == Err(Refused::FullDefect) {
                refused_defect = true;
            }
        }
        assert!(refused_defect && ob.usage() <= 1000);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rejected_records_are_kept_with_their_reason() {
        let d = tmp("reject");
        let (mut ob, _) = Outbox::open(&d, 1 << 30).unwrap();
        let r = rec("cam/1/5", true, 10);
        let id = ob.append(std::slice::from_ref(&r)).unwrap()[0].unwrap();
        let p = ob.reject(id, &r, "MessageSizeTooLarge");
        assert!(p.is_file());
        assert_eq!(std::fs::read_to_string(p.with_extension("reason.txt")).unwrap(), "MessageSizeTooLarge");
        assert_eq!(ob.pending(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
