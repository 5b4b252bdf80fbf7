//! Event assembly: a judged frame becomes one `kensa.v1.InspectionEvent`, field by field as
//! `proto/kensa/v1/event.proto` documents them.

use crate::{cell_to_proto, proto, InspectionEvent};
use kensa_core::metrics::Label;
use kensa_core::metrics::Stage;
use kensa_verdict::Verdict;
use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch (0 before it).
pub fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Where a frame came from.
pub struct Origin<'a> {
    pub camera: &'a str,
    pub product: &'a str,
    pub line: &'a str,
    pub station: &'a str,
    /// The daemon process's run id: with the camera and sequence, the event id.
    pub run_id: &'a str,
    pub seq: u64,
    /// The part in the picture, when named ("" otherwise).
    pub part_id: &'a str,
    pub capture_time: SystemTime,
    /// The frame's size.
    pub width: u32,
    pub height: u32,
}

/// What scored and judged it.
pub struct Judgement<'a> {
    /// The deciding verdict.
    pub decided: &'a Verdict,
    /// Every judge that ran, the calibrated judge first.
    pub verdicts: &'a [&'a Verdict],
    /// The region mask as PNG, and its size.
    pub mask_png: Vec<u8>,
    pub mask_size: (u32, u32),
    pub bank_version: String,
    pub model_id: &'a str,
    /// Where the frame's evidence was stored (empty when not stored).
    pub evidence: EvidenceRefs,
    /// Seconds per stage.
    pub stages: &'a [(Stage, f64)],
}

/// Where a frame's snapshot, map and overlay were stored, and their URLs (empty: not stored,
/// or no `publish.evidence_url_prefix`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EvidenceRefs {
    pub snapshot_path: String,
    pub map_path: String,
    pub overlay_path: String,
    pub snapshot_url: String,
    pub map_url: String,
    pub overlay_url: String,
}

/// The event of one judged frame; `publish_time_unix_nanos` is now.
pub fn build(o: &Origin<'_>, j: Judgement<'_>) -> InspectionEvent {
    let v = j.decided;
    InspectionEvent {
        event_id: format!("{}/{}/{}", o.camera, o.run_id, o.seq),
        camera_id: o.camera.to_string(),
        product: o.product.to_string(),
        frame_seq: o.seq,
        part_id: o.part_id.to_string(),
        capture_time_unix_nanos: unix_nanos(o.capture_time),
        publish_time_unix_nanos: unix_nanos(SystemTime::now()),
        score: v.score,
        anomalous: v.anomalous,
        answer: v.answer.clone(),
        locations: v.locations.iter().map(|&c| cell_to_proto(c) as i32).collect(),
        regions: v
            .regions
            .iter()
            .map(|r| proto::Region {
                cell: cell_to_proto(r.cell) as i32,
                x0: r.bbox[0],
                y0: r.bbox[1],
                x1: r.bbox[2],
                y1: r.bbox[3],
                area: r.area,
                peak: r.peak,
            })
            .collect(),
        confidence: v.confidence,
        judge: v.judge.to_string(),
        mask_png: j.mask_png,
        width: o.width,
        height: o.height,
        bank_version: j.bank_version,
        model_id: j.model_id.to_string(),
        kensa_version: env!("CARGO_PKG_VERSION").to_string(),
        line: o.line.to_string(),
        station: o.station.to_string(),
        stages: j
            .stages
            .iter()
            .map(|&(stage, seconds)| proto::StageLatency { stage: stage.as_str().to_string(), seconds })
            .collect(),
        verdicts: j
            .verdicts
            .iter()
            .map(|x| proto::Judgement {
                judge: x.judge.to_string(),
                anomalous: x.anomalous,
                answer: x.answer.clone(),
                confidence: x.confidence,
            })
            .collect(),
        judges_agree: j.verdicts.iter().all(|x| x.anomalous == j.verdicts[0].anomalous),
        mask_width: j.mask_size.0,
        mask_height: j.mask_size.1,
        map_path: j.evidence.map_path,
        snapshot_path: j.evidence.snapshot_path,
        snapshot_url: j.evidence.snapshot_url,
        map_url: j.evidence.map_url,
        overlay_path: j.evidence.overlay_path,
        overlay_url: j.evidence.overlay_url,
    }
}
