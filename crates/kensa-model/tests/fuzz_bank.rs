//! Property-based fuzzing of bank files: any corruption is a clear error, never a crash.

use kensa_model::bank::{Bank, BankMeta, BANK_FORMAT};
use kensa_verdict::Calibration;
use proptest::prelude::*;

fn valid_bank() -> Vec<u8> {
    let meta = BankMeta {
        format: BANK_FORMAT.into(),
        product: "p".into(),
        backbone: "b".into(),
        backbone_weights: "w".into(),
        backbone_sha256: String::new(),
        input_size: 64,
        strides: vec![8, 16],
        channels: vec![4, 6],
        references: 1,
        reference_files: vec!["a.png".into()],
        created_unix: 0,
        calibration: Calibration::fit(&[0.1], &[0.5]),
        content_sha256: String::new(),
        coreset: 1.0,
        aggregation: vec![1, 3],
        augment: vec!["rot90".into()],
        crop: None,
        self_match: true,
        lineage: None,
        thumbnails: Default::default(),
    };
    let layers = vec![
        tch::Tensor::rand([10, 4], (tch::Kind::Float, tch::Device::Cpu)),
        tch::Tensor::rand([5, 6], (tch::Kind::Float, tch::Device::Cpu)),
    ];
    let bank = Bank::new(meta, layers);
    // A file of its own per call: the tests of this binary run in parallel.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let p = std::env::temp_dir().join(format!("kensa-fuzz-valid-{}-{n}.kbank", std::process::id()));
    bank.save(&p).unwrap();
    let b = std::fs::read(&p).unwrap();
    let _ = std::fs::remove_file(&p);
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn corrupted_banks_are_errors(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6), cut in any::<usize>()) {
        let mut b = valid_bank();
        let n = b.len();
        for (i, v) in &flips {
            b[i % n] ^= v;
        }
        b.truncate(cut % (n + 1));
        let p = std::env::temp_dir().join(format!("kensa-fuzz-{}-{cut}.kbank", std::process::id()));
        std::fs::write(&p, &b).unwrap();
        let r = Bank::load_unchecked(&p, tch::Device::Cpu);
        let _ = std::fs::remove_file(&p);
        if flips.iter().all(|(_, v)| *v == 0) && cut % (n + 1) == n {
            prop_assert!(r.is_ok());
        } else if let Err(e) = r {
            prop_assert!(e.to_string().contains("kensa-fuzz"), "{}", e);
        }
    }
}

/// A valid bank's bytes with its metadata JSON edited by `edit` and written back as it is (the
/// hash field untouched), as someone editing the file by hand would.
fn with_metadata(edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    use safetensors::SafeTensors;
    let bytes = valid_bank();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let md = header.metadata().as_ref().unwrap();
    let raw = md["kensa"].clone();
    let original: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let mut meta = original.clone();
    edit(&mut meta);
    // Unchanged: the very same text (the seal covers the metadata as stored).
    let text = if meta == original { raw } else { meta.to_string() };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors().into_iter().collect();
    let mut info = md.clone();
    info.insert("kensa".to_string(), text);
    safetensors::serialize(views, Some(info)).unwrap()
}

fn load_bytes(name: &str, b: &[u8]) -> Result<Bank, kensa_model::ModelError> {
    let p = std::env::temp_dir().join(format!("kensa-meta-{name}-{}.kbank", std::process::id()));
    std::fs::write(&p, b).unwrap();
    let r = Bank::load_unchecked(&p, tch::Device::Cpu);
    let _ = std::fs::remove_file(&p);
    r
}

#[test]
fn edited_metadata_is_refused() {
    assert!(load_bytes("untouched", &with_metadata(|_| {})).is_ok(), "a faithful rewrite still loads");
    let e = load_bytes("threshold", &with_metadata(|m| m["calibration"]["image_threshold"] = 9.0.into()))
        .err()
        .expect("an edited calibration is refused");
    assert!(e.to_string().contains("content hash mismatch"), "{e}");
}

#[test]
fn impossible_metadata_is_refused_before_use() {
    for (what, edit) in [
        (
            "input_size",
            Box::new(|m: &mut serde_json::Value| m["input_size"] = 0.into()) as Box<dyn Fn(&mut serde_json::Value)>,
        ),
        ("strides", Box::new(|m: &mut serde_json::Value| m["strides"] = serde_json::json!([8]))),
        ("coreset", Box::new(|m: &mut serde_json::Value| m["coreset"] = 0.0.into())),
        ("calibration", Box::new(|m: &mut serde_json::Value| m["calibration"]["logistic_scale"] = (-1.0).into())),
    ] {
        let e = load_bytes(what, &with_metadata(edit)).err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(e.to_string().contains("impossible metadata"), "{what}: {e}");
    }
}

#[test]
fn a_fifo_or_a_device_named_as_a_bank_is_refused_without_waiting() {
    let p = std::env::temp_dir().join(format!("kensa-fifo-{}.kbank", std::process::id()));
    let _ = std::fs::remove_file(&p);
    let made = std::process::Command::new("mkfifo").arg(&p).status().expect("mkfifo");
    assert!(made.success());
    // Without a writer, a blocking open would never return: the load runs on a thread so a
    // regression fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let q = p.clone();
    std::thread::spawn(move || {
        let _ = tx.send(Bank::load_unchecked(&q, tch::Device::Cpu).err().map(|e| e.to_string()));
    });
    let e = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the load returns at once");
    let _ = std::fs::remove_file(&p);
    assert!(e.as_deref().is_some_and(|e| e.contains("not a regular file")), "{e:?}");
    let e = Bank::load_unchecked(std::path::Path::new("/dev/zero"), tch::Device::Cpu).err().expect("refused");
    assert!(e.to_string().contains("not a regular file"), "{e}");
}
