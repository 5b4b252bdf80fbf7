//! Property-based fuzzing of what Kensa reads from outside: event payloads (`kensa tail`,
//! consumers) and outbox segment files (read back after a crash).

use kensa_publish::outbox::{Outbox, SpoolRecord};
use kensa_publish::{decode_event, spool_record, InspectionEvent};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_payload_decodes_or_errors(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_event(&bytes);
    }

    #[test]
    fn mutated_events_never_panic(flip in 0usize..200, val in any::<u8>(), sr in proptest::option::of(any::<u32>())) {
        let ev = InspectionEvent { event_id: "c/1/2".into(), camera_id: "c".into(), answer: "No, there is no anomaly in the image.".into(), mask_png: vec![1, 2, 3], ..Default::default() };
        let mut rec = spool_record(&ev, "t", "d", sr);
        let n = rec.payload.len();
        rec.payload[flip % n] ^= val;
        let _ = decode_event(&rec.payload);
    }

    #[test]
    fn corrupt_outbox_segments_are_survived(garbage in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..400) {
        let dir = std::env::temp_dir().join(format!("kensa-fuzz-outbox-{}-{}", std::process::id(), cut));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let mut ob = Outbox::open(&dir, 1 << 20).unwrap();
            let r = SpoolRecord { event_id: "e".into(), topics: vec!["t".into()], payload: vec![9; 40], ..Default::default() };
            ob.append(&[r.clone(), r]).unwrap();
        }
        let seg = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|e| e == "seg")).unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes.truncate(cut.min(bytes.len()));
        bytes.extend_from_slice(&garbage);
        std::fs::write(&seg, bytes).unwrap();
        let opened = Outbox::open(&dir, 1 << 20);
        prop_assert!(opened.is_ok());
        let pending = opened.unwrap().take(usize::MAX, usize::MAX);
        prop_assert!(pending.len() <= 2 + garbage.len());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
