//! The event schema evolves only by addition (issue #20, "added to the protobuf schema under its
//! evolution rules"): every field and enum value consumers already decode keeps its name, number
//! and type; numbers are never reused. New fields may be added. Reads `proto/kensa/v1/event.proto`.

use std::collections::{BTreeMap, BTreeSet};

/// (message or enum, field, number, type) as published; extend it when adding a field.
const PUBLISHED: &[(&str, &str, u32, &str)] = &[
    ("Cell", "CELL_UNSPECIFIED", 0, "enum value"),
    ("Cell", "CELL_TOP_LEFT", 1, "enum value"),
    ("Cell", "CELL_TOP", 2, "enum value"),
    ("Cell", "CELL_TOP_RIGHT", 3, "enum value"),
    ("Cell", "CELL_LEFT", 4, "enum value"),
    ("Cell", "CELL_CENTER", 5, "enum value"),
    ("Cell", "CELL_RIGHT", 6, "enum value"),
    ("Cell", "CELL_BOTTOM_LEFT", 7, "enum value"),
    ("Cell", "CELL_BOTTOM", 8, "enum value"),
    ("Cell", "CELL_BOTTOM_RIGHT", 9, "enum value"),
    ("Region", "cell", 1, "Cell"),
    ("Region", "x0", 2, "uint32"),
    ("Region", "y0", 3, "uint32"),
    ("Region", "x1", 4, "uint32"),
    ("Region", "y1", 5, "uint32"),
    ("Region", "area", 6, "uint32"),
    ("Region", "peak", 7, "float"),
    ("StageLatency", "stage", 1, "string"),
    ("StageLatency", "seconds", 2, "double"),
    ("Judgement", "judge", 1, "string"),
    ("Judgement", "anomalous", 2, "bool"),
    ("Judgement", "answer", 3, "string"),
    ("Judgement", "confidence", 4, "float"),
    ("InspectionEvent", "event_id", 1, "string"),
    ("InspectionEvent", "camera_id", 2, "string"),
    ("InspectionEvent", "product", 3, "string"),
    ("InspectionEvent", "frame_seq", 4, "uint64"),
    ("InspectionEvent", "capture_time_unix_nanos", 5, "int64"),
    ("InspectionEvent", "publish_time_unix_nanos", 6, "int64"),
    ("InspectionEvent", "score", 7, "float"),
    ("InspectionEvent", "anomalous", 8, "bool"),
    ("InspectionEvent", "answer", 9, "string"),
    ("InspectionEvent", "locations", 10, "repeated Cell"),
    ("InspectionEvent", "regions", 11, "repeated Region"),
    ("InspectionEvent", "confidence", 12, "float"),
    ("InspectionEvent", "judge", 13, "string"),
    ("InspectionEvent", "mask_png", 14, "bytes"),
    ("InspectionEvent", "width", 15, "uint32"),
    ("InspectionEvent", "height", 16, "uint32"),
    ("InspectionEvent", "bank_version", 17, "string"),
    ("InspectionEvent", "model_id", 18, "string"),
    ("InspectionEvent", "kensa_version", 19, "string"),
    ("InspectionEvent", "line", 20, "string"),
    ("InspectionEvent", "station", 21, "string"),
    ("InspectionEvent", "stages", 22, "repeated StageLatency"),
    ("InspectionEvent", "verdicts", 23, "repeated Judgement"),
    ("InspectionEvent", "mask_width", 24, "uint32"),
    ("InspectionEvent", "mask_height", 25, "uint32"),
    ("InspectionEvent", "map_path", 26, "string"),
    ("InspectionEvent", "snapshot_path", 27, "string"),
    ("InspectionEvent", "judges_agree", 28, "bool"),
    ("InspectionEvent", "snapshot_url", 29, "string"),
    ("InspectionEvent", "map_url", 30, "string"),
    ("InspectionEvent", "overlay_path", 31, "string"),
    ("InspectionEvent", "overlay_url", 32, "string"),
    ("InspectionEvent", "part_id", 33, "string"),
    ("FeedbackLabel", "FEEDBACK_LABEL_UNSPECIFIED", 0, "enum value"),
    ("FeedbackLabel", "FEEDBACK_LABEL_NORMAL", 1, "enum value"),
    ("FeedbackLabel", "FEEDBACK_LABEL_DEFECT", 2, "enum value"),
    ("Feedback", "event_id", 1, "string"),
    ("Feedback", "label", 2, "FeedbackLabel"),
    ("Feedback", "cells", 3, "repeated Cell"),
    ("Feedback", "who", 4, "string"),
    ("Feedback", "answered_unix_ms", 5, "int64"),
];

/// The fields of every message and enum of a `.proto` text (comments stripped).
fn fields(text: &str) -> Vec<(String, String, u32, String)> {
    let mut out = Vec::new();
    let mut scope: Option<String> = None;
    for line in text.lines() {
        let l = line.split("//").next().unwrap_or_default().trim();
        let words: Vec<&str> = l.split_whitespace().collect();
        if let ["message" | "enum", name, "{"] = words[..] {
            scope = Some(name.to_string());
            continue;
        }
        let (Some(scope), Some((left, right))) = (&scope, l.split_once('=')) else { continue };
        let Ok(number) = right.trim().trim_end_matches(';').trim().parse::<u32>() else { continue };
        let left: Vec<&str> = left.split_whitespace().collect();
        let (name, ty) = match left[..] {
            [name] => (name, "enum value".to_string()),
            [ty, name] => (name, ty.to_string()),
            ["repeated", ty, name] => (name, format!("repeated {ty}")),
            _ => panic!("unexpected line in the schema: {line}"),
        };
        out.push((scope.clone(), name.to_string(), number, ty));
    }
    out
}

#[test]
fn the_event_schema_only_grows() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proto/kensa/v1/event.proto")).unwrap();
    let now = fields(&text);
    assert!(now.len() >= PUBLISHED.len(), "fields were removed: {} now, {} published", now.len(), PUBLISHED.len());
    for &(scope, name, number, ty) in PUBLISHED {
        let found = now.iter().find(|f| f.0 == scope && f.1 == name);
        let f = found.unwrap_or_else(|| panic!("{scope}.{name} was removed or renamed"));
        assert_eq!((f.2, f.3.as_str()), (number, ty), "{scope}.{name} changed its number or type");
    }
    // No number twice in one message or enum, and no published number taken by another name.
    let mut seen: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for f in &now {
        assert!(seen.entry(f.0.as_str()).or_default().insert(f.2), "{}: number {} used twice", f.0, f.2);
        if let Some(p) = PUBLISHED.iter().find(|p| p.0 == f.0 && p.2 == f.2) {
            assert_eq!(p.1, f.1, "{}: number {} reused by another field", f.0, f.2);
        }
    }
}

#[test]
fn the_schema_check_sees_a_removed_or_renumbered_field() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proto/kensa/v1/event.proto")).unwrap();
    let edited = text.replace("string part_id = 33;", "string part_id = 34;");
    let f = fields(&edited);
    let part = f.iter().find(|f| f.0 == "InspectionEvent" && f.1 == "part_id").unwrap();
    assert_eq!(part.2, 34, "the parser reads the edited number");
    assert_eq!(fields(&text).len(), PUBLISHED.len(), "every field of today's schema is pinned");
}
