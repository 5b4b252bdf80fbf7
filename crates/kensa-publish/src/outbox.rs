//! The durable outbox: every event is appended to an on-disk spool (fsync once per appended
//! batch) before it is sent to Kafka, and forgotten when Kafka acknowledges it. After a crash or
//! a restart, whatever was spooled and not acknowledged is sent again: consumers dedupe on
//! `event_id`, which is the same on every retry.
//!
//! Layout: `DIR/NNNNNNNNNNNNNNNN.seg` (creation time in microseconds) segment files of records `[len u32 LE][crc32 u32 LE][body]`,
//! and beside each a `.acks` file of acknowledged record indices (u32 LE; not fsynced: losing
//! one only causes a duplicate). A segment is deleted once all its records are acknowledged.
//! `DIR/.lock` is held (flock) while a process has the outbox open: a second Kensa on the same
//! folder is a start-up error. The folder is fsynced after segments are created or removed.
//!
//! Recovery, as trusted disk buffers do it: a record whose checksum fails is skipped and
//! counted (`kensa_outbox_discarded_total{reason="corrupt"}`) and the records after it are
//! kept; a damaged length field is skipped to the next whole record (`garbled`); an incomplete
//! last record (a crash mid-append) is truncated away (`torn_tail`; a damaged length field in
//! the last record looks the same and is counted the same).
//! Each record carries its index in its segment, so acknowledgements stay right after a skip.
//! An append is one write and one fsync; if either fails the segment is cut back to where it
//! was and the whole batch is reported not spooled (the caller retries it), so nothing is ever
//! reported spooled that is not on disk.
//! Records rejected by Kafka for good (too large, not authorised) are moved to
//! `DIR/rejected/<event id>.bin` and logged, never dropped silently.
//!
//! Budget: `max_bytes` of segments. Past 80 % of it, normal results are refused; past 100 %,
//! defects too. Every refusal is counted by the caller.

use crate::PublishError;
use kensa_core::metrics::{self as m, Label, OutboxDiscard};
use prost::Message;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
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
    /// 1 + the record's index in its segment (0: written before the field existed; its index
    /// is then one more than the previous record's).
    #[prost(uint32, tag = "8")]
    pub slot: u32,
    /// When the frame was captured (Unix nanoseconds): the capture→acknowledgement latency.
    #[prost(int64, tag = "9")]
    pub capture_unix_nanos: i64,
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
    /// Opened on the first read of a record from this segment.
    reader: Option<File>,
    bytes: u64,
    outstanding: u32,
}

/// Where a spooled record not yet handed to the sender lies: its bytes stay on disk until
/// [`Outbox::take`] reads them, so a large backlog costs memory for its index only.
#[derive(Clone, Copy, Debug)]
struct Unsent {
    id: EntryId,
    offset: u64,
    len: u32,
}

pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    segment_max: u64,
    segments: BTreeMap<u64, Segment>,
    current: Option<(u64, File, u32)>,
    usage: u64,
    /// Unacknowledged records by id (append order) → when they were appended (µs since the
    /// epoch; a record from an earlier run: its segment's creation time).
    waiting: BTreeMap<EntryId, u64>,
    /// Spooled records not yet taken by the sender, in append order.
    unsent: std::collections::VecDeque<Unsent>,
    /// Held (flock) for as long as this process has the outbox open.
    _lock: File,
}

fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Outbox { path: path.to_path_buf(), source }
}

impl Outbox {
    /// Opens (or creates) the spool. The records an earlier process left unacknowledged are
    /// indexed (checked, but not kept in memory) and come first from [`Outbox::take`].
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, PublishError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join(".lock");
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        if let Err(e) = lock.try_lock() {
            return Err(PublishError::Outbox {
                path: dir.to_path_buf(),
                source: std::io::Error::other(format!(
                    "in use by another Kensa process ({e}): each daemon needs its own outbox.dir"
                )),
            });
        }
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
            waiting: BTreeMap::new(),
            unsent: std::collections::VecDeque::new(),
            _lock: lock,
        };
        for (n, path) in names {
            let acks_path = path.with_extension("acks");
            let acked = read_acks(&acks_path);
            let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
            let records = read_segment(&path)?;
            let bytes = std::fs::metadata(&path).map_or(bytes, |m| m.len());
            let mut outstanding = 0;
            for (index, offset, len) in records {
                if !acked.contains(&index) {
                    let id = EntryId { segment: n, index };
                    ob.waiting.insert(id, n);
                    ob.unsent.push_back(Unsent { id, offset, len });
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
            ob.segments.insert(n, Segment { path, acks: Some(acks), reader: None, bytes, outstanding });
        }
        Ok(ob)
    }

    /// Up to `max_records` spooled records (and about `max_bytes`; always at least one) not
    /// yet taken, oldest first, read back from disk. A record that no longer reads back whole
    /// is counted (`corrupt`), logged and forgotten; the ones after it still come.
    pub fn take(&mut self, max_records: usize, max_bytes: usize) -> Vec<(EntryId, SpoolRecord)> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max_records && (out.is_empty() || bytes < max_bytes) {
            let Some(u) = self.unsent.pop_front() else { break };
            match self.read_record(u) {
                Ok(rec) => {
                    bytes += u.len as usize;
                    out.push((u.id, rec));
                }
                Err(e) => {
                    metrics::counter!(m::OUTBOX_DISCARDED, "reason" => OutboxDiscard::Corrupt.as_str()).increment(1);
                    tracing::error!(
                        segment = u.id.segment,
                        index = u.id.index,
                        "spooled record cannot be read back ({e}); skipped"
                    );
                    self.ack(u.id);
                }
            }
        }
        out
    }

    /// Whether spooled records wait to be taken.
    pub fn has_unsent(&self) -> bool {
        !self.unsent.is_empty()
    }

    fn read_record(&mut self, u: Unsent) -> std::io::Result<SpoolRecord> {
        use std::os::unix::fs::FileExt;
        let seg = self.segments.get_mut(&u.id.segment).ok_or_else(|| std::io::Error::other("segment is gone"))?;
        if seg.reader.is_none() {
            seg.reader = Some(File::open(&seg.path)?);
        }
        let f = seg.reader.as_ref().expect("opened above");
        let mut buf = vec![0u8; 8 + u.len as usize];
        f.read_exact_at(&mut buf, u.offset)?;
        record_at(&buf, 0).map(|(rec, _)| rec).ok_or_else(|| std::io::Error::other("checksum or encoding fails"))
    }

    /// Bytes of segments on disk.
    pub fn usage(&self) -> u64 {
        self.usage
    }

    /// Records spooled and not yet acknowledged.
    pub fn pending(&self) -> u64 {
        self.segments.values().map(|s| s.outstanding as u64).sum()
    }

    /// Age in seconds of the oldest unacknowledged record: how long the backlog has been
    /// waiting. 0 when nothing waits.
    pub fn oldest_pending_age_s(&self) -> f64 {
        self.waiting.values().next().map_or(0.0, |&t| now_micros().saturating_sub(t) as f64 / 1e6)
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
        sync_dir(&self.dir)?;
        self.segments.insert(n, Segment { path, acks: Some(acks), reader: None, bytes: 0, outstanding: 0 });
        self.current = Some((n, f, 0));
        Ok(())
    }

    /// Appends records durably: one write and one fsync for the whole call. Each gets an id,
    /// or is refused under the budget policy. On an I/O error (disk full) nothing of the call
    /// is spooled: the segment is cut back and the error returned, so the caller can retry.
    pub fn append(&mut self, records: &[SpoolRecord]) -> Result<Vec<Result<EntryId, Refused>>, PublishError> {
        let mut out = Vec::with_capacity(records.len());
        let mut accepted: Vec<usize> = Vec::new();
        let mut added = 0u64;
        for (k, rec) in records.iter().enumerate() {
            // Frame (8) + the slot field (at most 6).
            let size = rec.encoded_len() as u64 + 8 + 6;
            let limit = if rec.anomalous { self.max_bytes } else { self.max_bytes / 10 * 8 };
            if self.usage + added + size > limit {
                out.push(Err(if rec.anomalous { Refused::FullDefect } else { Refused::FullNormal }));
                continue;
            }
            added += size;
            accepted.push(k);
            out.push(Ok(EntryId { segment: 0, index: 0 }));
        }
        if accepted.is_empty() {
            return Ok(out);
        }
        let need_roll = match &self.current {
            None => true,
            Some((n, _, _)) => self.segments[n].bytes > 0 && self.segments[n].bytes + added > self.segment_max,
        };
        if need_roll {
            self.roll()?;
        }
        let (n, f, next) = self.current.as_mut().expect("a current segment");
        let seg = self.segments.get_mut(n).expect("segment state");
        let mut buf = Vec::with_capacity(usize::try_from(added).unwrap_or(0));
        let mut index = *next;
        let mut located = Vec::with_capacity(accepted.len());
        for &k in &accepted {
            let mut rec = records[k].clone();
            rec.slot = index + 1;
            let body = rec.encode_to_vec();
            let id = EntryId { segment: *n, index };
            located.push(Unsent { id, offset: seg.bytes + buf.len() as u64, len: body.len() as u32 });
            buf.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            buf.extend_from_slice(&body);
            out[k] = Ok(id);
            index += 1;
        }
        if let Err(e) = f.write_all(&buf).and_then(|()| f.sync_data()) {
            // Cut back to the last whole, synced batch: nothing of this one counts as spooled. If
            // even that fails, the next append starts a new segment, so it never lands behind
            // bytes of unknown state (reading back skips them).
            if f.set_len(seg.bytes).is_err() {
                self.current = None;
            }
            metrics::counter!(m::OUTBOX_WRITE_ERRORS).increment(1);
            return Err(PublishError::Outbox { path: seg.path.clone(), source: e });
        }
        seg.outstanding += index - *next;
        let t = now_micros();
        for i in *next..index {
            self.waiting.insert(EntryId { segment: *n, index: i }, t);
        }
        *next = index;
        seg.bytes += buf.len() as u64;
        self.usage += buf.len() as u64;
        self.unsent.extend(located);
        Ok(out)
    }

    /// Marks a record acknowledged; a segment whose records are all acknowledged is deleted.
    pub fn ack(&mut self, id: EntryId) {
        // Once per record: a second acknowledgement (a duplicate delivery) changes nothing.
        if self.waiting.remove(&id).is_none() {
            return;
        }
        if let Some(seg) = self.segments.get_mut(&id.segment) {
            if let Some(a) = seg.acks.as_mut() {
                let _ = a.write_all(&id.index.to_le_bytes());
            }
            seg.outstanding = seg.outstanding.saturating_sub(1);
        }
        self.maybe_delete(id.segment);
    }

    /// Moves a record Kafka refused for good to `rejected/`, and acknowledges it.
    /// The record stays spooled (and is sent again at the next start) if it cannot be kept.
    pub fn reject(&mut self, id: EntryId, rec: &SpoolRecord, reason: &str) -> Result<PathBuf, PublishError> {
        let path = self.keep_rejected(rec, reason)?;
        self.ack(id);
        Ok(path)
    }

    /// Keeps a record that will never be sent in `rejected/<event id>.bin`, with its reason
    /// beside it, so nothing disappears silently.
    /// An error when they cannot be written: the caller must not forget the record then.
    pub fn keep_rejected(&self, rec: &SpoolRecord, reason: &str) -> Result<PathBuf, PublishError> {
        let dir = self.dir.join("rejected");
        let safe: String =
            rec.event_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        let path = dir.join(format!("{safe}.bin"));
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(&path, rec.encode_to_vec())?;
            std::fs::write(path.with_extension("reason.txt"), reason)?;
            File::open(&dir)?.sync_all()
        };
        write().map_err(io(&path))?;
        Ok(path)
    }

    fn maybe_delete(&mut self, n: u64) {
        let is_current = self.current.as_ref().is_some_and(|(c, _, _)| *c == n);
        let done = self.segments.get(&n).is_some_and(|s| s.outstanding == 0);
        if done && !is_current {
            if let Some(seg) = self.segments.remove(&n) {
                let _ = std::fs::remove_file(&seg.path);
                let _ = std::fs::remove_file(seg.path.with_extension("acks"));
                let _ = sync_dir(&self.dir);
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

fn sync_dir(dir: &Path) -> Result<(), PublishError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Largest record accepted when reading a segment back.
const MAX_RECORD: usize = 256 << 20;

/// The record at `pos` if one starts there (plausible length, checksum, encoding), with its end.
fn record_at(data: &[u8], pos: usize) -> Option<(SpoolRecord, usize)> {
    let head = data.get(pos..pos + 8)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    // A record starts with field 1 (the non-empty event id, tag 0x0a): a cheap test before the
    // checksum, so scanning a damaged stretch stays fast.
    if !(2..=MAX_RECORD).contains(&len) || data.get(pos + 8) != Some(&0x0a) {
        return None;
    }
    let body = data.get(pos + 8..pos + 8 + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let rec = SpoolRecord::decode(body).ok()?;
    (!rec.event_id.is_empty() && !rec.topics.is_empty()).then_some((rec, pos + 8 + len))
}

/// The next position at or after `from` where a whole record starts, if any.
fn resync(data: &[u8], from: usize) -> Option<usize> {
    (from..data.len().saturating_sub(9)).find(|&p| record_at(data, p).is_some())
}

/// Checks a segment's records and returns where each whole one lies (index, offset, body
/// length), skipping (and counting) damaged ones and truncating an incomplete last record.
/// One segment at a time is in memory (`segment_max`, 16 MiB at most).
fn read_segment(path: &Path) -> Result<Vec<(u32, u64, u32)>, PublishError> {
    let data = std::fs::read(path).map_err(io(path))?;
    let discard = |reason: OutboxDiscard, at: usize| {
        metrics::counter!(m::OUTBOX_DISCARDED, "reason" => reason.as_str()).increment(1);
        tracing::error!(path = %path.display(), offset = at, reason = reason.as_str(),
            "damaged outbox record skipped; the records after it are kept");
    };
    let mut out: Vec<(u32, u64, u32)> = Vec::new();
    let mut pos = 0;
    // Position of the next record, for records written before they carried their slot.
    let mut position = 0u32;
    while pos < data.len() {
        if let Some((rec, end)) = record_at(&data, pos) {
            let index = if rec.slot > 0 { rec.slot - 1 } else { position };
            position = index + 1;
            out.push((index, pos as u64, (end - pos - 8) as u32));
            pos = end;
            continue;
        }
        // A record of the stated length whose checksum or encoding fails, followed by a good
        // record or the end of the segment: that record alone is damaged.
        let stated = data
            .get(pos..pos + 4)
            .map(|h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize)
            .filter(|&l| l <= MAX_RECORD)
            .map(|l| pos + 8 + l);
        if let Some(end) = stated.filter(|&e| e == data.len() || (e < data.len() && record_at(&data, e).is_some())) {
            discard(OutboxDiscard::Corrupt, pos);
            position += 1;
            pos = end;
            continue;
        }
        if let Some(next) = resync(&data, pos + 1) {
            discard(OutboxDiscard::Garbled, pos);
            pos = next;
            continue;
        }
        // Nothing whole follows: an append cut short by a crash, never reported spooled.
        metrics::counter!(m::OUTBOX_DISCARDED, "reason" => OutboxDiscard::TornTail.as_str()).increment(1);
        tracing::warn!(path = %path.display(), records = out.len(), bytes = data.len() - pos,
            "outbox segment ends in a torn record (crash mid-append); truncated");
        OpenOptions::new().write(true).open(path).and_then(|f| f.set_len(pos as u64)).map_err(io(path))?;
        break;
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

    /// Opens the outbox and takes every record waiting in it.
    fn open_all(d: &Path, max_bytes: u64) -> (Outbox, Vec<(EntryId, SpoolRecord)>) {
        let mut ob = Outbox::open(d, max_bytes).unwrap();
        let pending = ob.take(usize::MAX, usize::MAX);
        (ob, pending)
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kensa-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn unacked_records_survive_reopen_and_acked_ones_do_not() {
        let d = tmp("reopen");
        let (mut ob, pending) = open_all(&d, 1 << 30);
        assert!(pending.is_empty());
        let ids: Vec<EntryId> = ob
            .append(&[rec("a", false, 10), rec("b", true, 10), rec("c", false, 10)])
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        ob.ack(ids[1]);
        drop(ob);
        let (mut ob, pending) = open_all(&d, 1 << 30);
        let names: Vec<&str> = pending.iter().map(|(_, r)| r.event_id.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        for (id, _) in &pending {
            ob.ack(*id);
        }
        assert_eq!(ob.pending(), 0);
        drop(ob);
        let (ob, pending) = open_all(&d, 1 << 30);
        assert!(pending.is_empty());
        assert_eq!(ob.usage(), 0, "fully acknowledged segments are deleted");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn torn_tail_is_ignored_not_fatal() {
        let d = tmp("torn");
        let (mut ob, _) = open_all(&d, 1 << 30);
        ob.append(&[rec("a", false, 10), rec("b", false, 10)]).unwrap();
        drop(ob);
        let seg = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&seg, bytes).unwrap();
        let (ob, pending) = open_all(&d, 1 << 30);
        assert_eq!(pending.iter().map(|(_, r)| r.event_id.as_str()).collect::<Vec<_>>(), ["a"]);
        drop(ob);
        let whole = record_at(&std::fs::read(&seg).unwrap(), 0).unwrap().1;
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), whole as u64, "the torn tail is truncated away");
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn segment_of(d: &Path) -> PathBuf {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .unwrap()
    }

    /// Offsets of the records of a segment.
    fn offsets(bytes: &[u8]) -> Vec<usize> {
        let mut v = vec![0];
        while let Some((_, end)) = record_at(bytes, *v.last().unwrap()) {
            v.push(end);
        }
        v.pop();
        v
    }

    fn names(pending: &[(EntryId, SpoolRecord)]) -> Vec<&str> {
        pending.iter().map(|(_, r)| r.event_id.as_str()).collect()
    }

    #[test]
    fn a_flipped_byte_in_the_middle_loses_only_its_record() {
        let d = tmp("flip");
        let (mut ob, _) = open_all(&d, 1 << 30);
        let recs: Vec<SpoolRecord> = (0..5).map(|i| rec(&format!("e{i}"), false, 40)).collect();
        let ids: Vec<EntryId> = ob.append(&recs).unwrap().into_iter().map(Result::unwrap).collect();
        ob.ack(ids[4]);
        drop(ob);
        let seg = segment_of(&d);
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = offsets(&bytes);
        bytes[at[2] + 20] ^= 0x40; // inside e2's body
        std::fs::write(&seg, &bytes).unwrap();
        let (mut ob, pending) = open_all(&d, 1 << 30);
        assert_eq!(names(&pending), ["e0", "e1", "e3"], "e2 alone is lost; e4 stays acknowledged");
        for (id, _) in &pending {
            ob.ack(*id);
        }
        drop(ob);
        let (_, pending) = open_all(&d, 1 << 30);
        assert!(pending.is_empty(), "acknowledgements after a skipped record hit the right records");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_damaged_length_is_skipped_to_the_next_whole_record() {
        let d = tmp("len");
        let (mut ob, _) = open_all(&d, 1 << 30);
        let recs: Vec<SpoolRecord> = (0..4).map(|i| rec(&format!("e{i}"), true, 30)).collect();
        ob.append(&recs).unwrap();
        drop(ob);
        let seg = segment_of(&d);
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = offsets(&bytes);
        bytes[at[1] + 2] = 0xff; // e1's length: now far past the end
        std::fs::write(&seg, &bytes).unwrap();
        let (_, pending) = open_all(&d, 1 << 30);
        assert_eq!(names(&pending), ["e0", "e2", "e3"]);
        assert_eq!(pending[1].0.index, 2, "indices survive the skip");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_duplicate_ack_changes_nothing_and_the_backlog_has_an_age() {
        let d = tmp("dupack");
        let (mut ob, _) = open_all(&d, 1 << 30);
        assert_eq!(ob.oldest_pending_age_s(), 0.0);
        let ids: Vec<EntryId> =
            ob.append(&[rec("a", false, 10), rec("b", false, 10)]).unwrap().into_iter().map(Result::unwrap).collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(ob.oldest_pending_age_s() >= 0.02);
        ob.ack(ids[0]);
        ob.ack(ids[0]);
        assert_eq!(ob.pending(), 1, "acknowledging twice counts once");
        ob.ack(ids[1]);
        assert_eq!((ob.pending(), ob.oldest_pending_age_s()), (0, 0.0));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn zero_filled_bytes_are_not_records() {
        let d = tmp("zeros");
        let (mut ob, _) = open_all(&d, 1 << 30);
        ob.append(&[rec("a", false, 10)]).unwrap();
        drop(ob);
        let seg = segment_of(&d);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes.extend_from_slice(&[0u8; 64]); // a power loss can leave zeros after the last write
        std::fs::write(&seg, &bytes).unwrap();
        let (_, pending) = open_all(&d, 1 << 30);
        assert_eq!(names(&pending), ["a"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_second_process_cannot_open_the_same_outbox() {
        let d = tmp("lock");
        let (ob, _) = open_all(&d, 1 << 30);
        let e = Outbox::open(&d, 1 << 30).err().expect("the folder is locked");
        assert!(e.to_string().contains("in use by another Kensa process"), "{e}");
        drop(ob);
        assert!(Outbox::open(&d, 1 << 30).is_ok(), "free again once closed");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_record_that_cannot_be_kept_aside_stays_spooled() {
        let d = tmp("unkeepable");
        let (mut ob, _) = open_all(&d, 1 << 30);
        std::fs::write(d.join("rejected"), b"a file where the folder should be").unwrap();
        let r = rec("cam/1/9", true, 10);
        let id = ob.append(std::slice::from_ref(&r)).unwrap()[0].unwrap();
        assert!(ob.reject(id, &r, "too large").is_err());
        assert_eq!(ob.pending(), 1, "not acknowledged: nothing is forgotten");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn budget_drops_normal_results_first() {
        let d = tmp("budget");
        let (mut ob, _) = open_all(&d, 1000);
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
        let (mut ob, _) = open_all(&d, 1 << 30);
        let r = rec("cam/1/5", true, 10);
        let id = ob.append(std::slice::from_ref(&r)).unwrap()[0].unwrap();
        let p = ob.reject(id, &r, "MessageSizeTooLarge").unwrap();
        assert!(p.is_file());
        assert_eq!(std::fs::read_to_string(p.with_extension("reason.txt")).unwrap(), "MessageSizeTooLarge");
        assert_eq!(ob.pending(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn take_reads_records_back_in_order_in_bounded_windows() {
        let d = tmp("take");
        let (mut ob, _) = open_all(&d, 1 << 30);
        for b in 0..5 {
            let recs: Vec<SpoolRecord> = (0..10).map(|i| rec(&format!("e{}", b * 10 + i), false, 100)).collect();
            ob.append(&recs).unwrap();
        }
        let first = ob.take(7, usize::MAX);
        assert_eq!(names(&first), (0..7).map(|i| format!("e{i}")).collect::<Vec<_>>());
        let bounded = ob.take(100, 250);
        assert_eq!(bounded.len(), 3, "about 250 bytes: three records of ~110");
        for (id, _) in first.iter().chain(&bounded) {
            ob.ack(*id);
        }
        drop(ob);
        // Reopened: the 40 not acknowledged come back, oldest first, read from disk.
        let mut ob = Outbox::open(&d, 1 << 30).unwrap();
        assert!(ob.has_unsent());
        let rest = ob.take(usize::MAX, usize::MAX);
        assert_eq!(names(&rest), (10..50).map(|i| format!("e{i}")).collect::<Vec<_>>());
        assert!(!ob.has_unsent());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
