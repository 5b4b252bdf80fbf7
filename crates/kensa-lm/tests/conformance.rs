//! The decoder against llama2.c's reference output for stories260K (../shared/models), the
//! KV cache against full recomputation, and the Hugging Face layout round trip.

use kensa_lm::model::{KvCache, Llama};
use kensa_lm::tokenizer::{Tokenizer, BOS};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn model_dir() -> Option<PathBuf> {
    let p = std::env::var("KENSA_SHARED")
        .map_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"), PathBuf::from)
        .join("models/stories260K");
    p.join("stories260K.bin").is_file().then_some(p)
}

fn reference(dir: &Path) -> (Vec<i64>, String) {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let g = &j["greedy_from_bos"];
    let ids = g["token_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    (ids, g["text"].as_str().unwrap().to_string())
}

/// Greedy decoding from BOS, one token at a time through the KV cache.
fn greedy_from_bos(m: &Llama, steps: usize) -> Vec<i64> {
    m.greedy(&m.embed_tokens(&[BOS]), steps, None, |_| None).unwrap()
}

#[test]
fn stories260k_reproduces_llama2c_greedy_tokens() {
    let Some(dir) = model_dir() else {
        eprintln!("SKIP stories260k_reproduces_llama2c_greedy_tokens: ../shared/models/stories260K is absent");
        return;
    };
    let (want, text) = reference(&dir);
    let m = Llama::load_llama2c(&dir.join("stories260K.bin"), Device::Cpu).unwrap();
    assert_eq!((m.config.dim, m.config.n_layers, m.config.n_heads, m.config.n_kv_heads), (64, 5, 8, 4));
    let got = greedy_from_bos(&m, want.len());
    eprintln!("stories260K greedy: {} ids, first {:?}", got.len(), &got[..8]);
    assert_eq!(got, want, "greedy token ids differ from llama2.c's");
    let tok = Tokenizer::load(&dir.join("tok512.bin"), m.config.vocab_size as usize).unwrap();
    let decoded = tok.decode(&got);
    assert!(
        text.starts_with(decoded.trim_end()) || decoded.starts_with(text.trim_end()),
        "decoded {decoded:?}, reference {text:?}"
    );
    // Encoding the reference text gives ids that decode back to it.
    let ids = tok.encode("Once upon a time, there was a little girl named Lily.", false, false);
    assert_eq!(tok.decode(&ids).trim_start(), "Once upon a time, there was a little girl named Lily.");
}

#[test]
fn kv_cache_matches_full_recomputation() {
    let Some(dir) = model_dir() else {
        eprintln!("SKIP kv_cache_matches_full_recomputation: ../shared/models/stories260K is absent");
        return;
    };
    let m = Llama::load_llama2c(&dir.join("stories260K.bin"), Device::Cpu).unwrap();
    let tokens: Vec<i64> = vec![BOS, 403, 407, 261, 378, 432, 383, 286, 261, 376];
    let mut full = KvCache::new(&m.config);
    let all = m.forward_tokens(&tokens, &mut full).unwrap();
    let mut inc = KvCache::new(&m.config);
    let mut rows = Vec::new();
    m.forward_tokens(&tokens[..4], &mut inc).unwrap().split(1, 0).into_iter().for_each(|r| rows.push(r));
    for &t in &tokens[4..] {
        rows.push(m.forward_tokens(&[t], &mut inc).unwrap());
    }
    let inc_all = Tensor::cat(&rows, 0);
    let diff = (&all - &inc_all).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "cached and full logits differ by {diff}");
    assert_eq!(inc.len, tokens.len() as i64);
}

#[test]
fn hugging_face_layout_round_trip() {
    let Some(dir) = model_dir() else {
        eprintln!("SKIP hugging_face_layout_round_trip: ../shared/models/stories260K is absent");
        return;
    };
    let (want, _) = reference(&dir);
    let m = Llama::load_llama2c(&dir.join("stories260K.bin"), Device::Cpu).unwrap();
    let out = std::env::temp_dir().join(format!("kensa-lm-hf-{}", std::process::id()));
    m.save_hf(&out).unwrap();
    let hf = Llama::load_hf(&out, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(hf.config.n_kv_heads, 4);
    assert_eq!(greedy_from_bos(&hf, 16), want[..16]);
    // bf16 weights (what a GPU would run) still decode the same first tokens.
    let half = Llama::load_hf(&out, Device::Cpu, Kind::BFloat16).unwrap();
    let got = greedy_from_bos(&half, 8);
    let _ = std::fs::remove_dir_all(&out);
    assert_eq!(got, want[..8]);
}

#[test]
fn constrained_decoding_only_emits_allowed_tokens() {
    let Some(dir) = model_dir() else {
        eprintln!("SKIP constrained_decoding_only_emits_allowed_tokens: ../shared/models/stories260K is absent");
        return;
    };
    let m = Llama::load_llama2c(&dir.join("stories260K.bin"), Device::Cpu).unwrap();
    let allowed = [300i64, 301, 302];
    let a = m.greedy(&m.embed_tokens(&[BOS]), 6, None, |_| Some(allowed.to_vec())).unwrap();
    let b = m.greedy(&m.embed_tokens(&[BOS]), 6, None, |_| Some(allowed.to_vec())).unwrap();
    assert_eq!(a.len(), 6);
    assert!(a.iter().all(|t| allowed.contains(t)), "{a:?}");
    assert_eq!(a, b, "greedy decoding is deterministic");
}

#[test]
fn truncated_checkpoint_is_a_clear_error() {
    let p = std::env::temp_dir().join(format!("kensa-lm-bad-{}.bin", std::process::id()));
    let mut bytes: Vec<u8> = [64i32, 172, 5, 8, 4, 512, 512].iter().flat_map(|x| x.to_le_bytes()).collect();
    bytes.extend_from_slice(&[0u8; 1000]);
    std::fs::write(&p, &bytes).unwrap();
    let e = Llama::load_llama2c(&p, Device::Cpu).err().expect("must fail").to_string();
    let _ = std::fs::remove_file(&p);
    assert!(e.contains("kensa-lm-bad") && e.contains("header implies"), "{e}");
}

#[test]
fn decoding_follows_the_answer_grammar() {
    use kensa_core::grid::{parse_answer, Cell};
    use kensa_lm::answers::AnswerSet;
    let Some(dir) = model_dir() else {
        eprintln!("SKIP decoding_follows_the_answer_grammar: ../shared/models/stories260K is absent");
        return;
    };
    let m = Llama::load_llama2c(&dir.join("stories260K.bin"), Device::Cpu).unwrap();
    let tok = Tokenizer::load(&dir.join("tok512.bin"), m.config.vocab_size as usize).unwrap();
    let set = AnswerSet::new(&tok);
    assert_eq!(set.answers.len(), 512);
    // Every answer's tokens decode to its sentence, which parses back to its cells.
    for (ids, cells) in &set.answers {
        let text = tok.decode(ids);
        assert_eq!(parse_answer(text.trim()).as_deref(), Some(cells.as_slice()), "{text:?}");
    }
    // An untrained model, constrained, still says a whole valid answer, the same every time.
    let prompt =
        m.embed_tokens(&tok.encode("### Human: Is there any anomaly in the image? ### Assistant:", true, false));
    let run = || m.greedy(&prompt, set.max_len() + 1, None, |p| Some(set.allowed(p))).unwrap();
    let a = run();
    assert!(set.parse(&a).is_some(), "not an answer: {:?}", tok.decode(&a));
    assert_eq!(a, run());
    assert_eq!(set.ids_of(&[Cell::TopLeft]), set.answers[1].0.as_slice());
}

/// The judge's decoding (grammar-forced tokens taken without the model, fed together) gives
/// the answers and confidences of plain step-by-step constrained decoding.
#[test]
fn judge_decoding_matches_step_by_step_decoding() {
    use kensa_lm::judge::{JudgeInput, LmJudge};
    use kensa_lm::tokenizer::LmTokenizer;
    let Some(dir) = model_dir() else {
        eprintln!("SKIP judge_decoding_matches_step_by_step_decoding: ../shared/models/stories260K is absent");
        return;
    };
    let m = Llama::load_llama2c(&dir.join("stories260K.bin"), Device::Cpu).unwrap();
    let tok = Tokenizer::load(&dir.join("tok512.bin"), m.config.vocab_size as usize).unwrap();
    tch::manual_seed(3);
    let judge = LmJudge::new(m, LmTokenizer::Llama2c(tok), 16, "", 1.0);
    let mut answers = std::collections::HashSet::new();
    for seed in 0..12 {
        tch::manual_seed(seed);
        let x = JudgeInput {
            map: Tensor::rand([48, 48], (Kind::Float, Device::Cpu)) * (seed as f64),
            // Large, varied image embeddings push the untrained judge to different answers.
            image: Tensor::randn([16], (Kind::Float, Device::Cpu)) * (30.0 * seed as f64),
        };
        let (cells, conf) = judge.judge(&x).unwrap();
        // Step by step: every token through the model, the choice among the allowed.
        let _g = tch::no_grad_guard();
        let mut cache = KvCache::new(&judge.lm.config);
        let mut logits = judge.lm.forward_embeds(&judge.prompt(&x), &mut cache).unwrap();
        let (mut out, mut want_conf) = (Vec::new(), 1.0f64);
        loop {
            let allowed = judge.answers.allowed(&out);
            if allowed.is_empty() {
                break;
            }
            let last = logits.get(logits.size()[0] - 1);
            let p = last.index_select(0, &Tensor::from_slice(&allowed)).softmax(0, Kind::Float);
            let best = p.argmax(0, false).int64_value(&[]);
            want_conf *= p.double_value(&[best]);
            out.push(allowed[best as usize]);
            logits = judge.lm.forward_tokens(&[allowed[best as usize]], &mut cache).unwrap();
        }
        assert_eq!(judge.answers.parse(&out).unwrap(), cells.as_slice(), "seed {seed}");
        assert!((f64::from(conf) - want_conf).abs() < 1e-4, "seed {seed}: {conf} vs {want_conf}");
        answers.insert(cells);
    }
    eprintln!("{} distinct answers over 12 inputs", answers.len());
    assert!(
        answers.len() >= 2 && answers.iter().any(|c| !c.is_empty()),
        "a \"Yes\" answer (branching) must be among them"
    );
}

/// The judge's training loss: a batch (right-padded, the constant prefix from its cache) gives
/// the mean of its examples' losses alone, so padding never leaks into an example; and the
/// loss of the normal answer is the decoder's own probability of "No" among the allowed tokens
/// at its one choice (every other token of it is forced).
#[test]
fn judge_training_loss_is_the_constrained_decoders_and_batching_does_not_change_it() {
    use kensa_core::grid::Cell;
    use kensa_lm::judge::{JudgeInput, LmJudge};
    use kensa_lm::tokenizer::LmTokenizer;
    let Some(dir) = model_dir() else {
        eprintln!("SKIP judge_training_loss_is_the_constrained_decoders_and_batching_does_not_change_it: ../shared/models/stories260K is absent");
        return;
    };
    let m = Llama::load_llama2c(&dir.join("stories260K.bin"), Device::Cpu).unwrap();
    let tok = Tokenizer::load(&dir.join("tok512.bin"), m.config.vocab_size as usize).unwrap();
    tch::manual_seed(5);
    let judge = LmJudge::new(m, LmTokenizer::Llama2c(tok), 16, "", 1.0);
    let inputs: Vec<JudgeInput> = (0..3)
        .map(|s| {
            tch::manual_seed(s);
            JudgeInput {
                map: Tensor::rand([48, 48], (Kind::Float, Device::Cpu)) * (s as f64 + 0.5),
                image: Tensor::randn([16], (Kind::Float, Device::Cpu)),
            }
        })
        .collect();
    // Answers of different lengths: normal, one cell, three cells.
    let answers: Vec<Vec<Cell>> =
        vec![vec![], vec![Cell::Center], vec![Cell::TopLeft, Cell::Center, Cell::BottomRight]];
    let _g = tch::no_grad_guard();
    let single: Vec<f64> = inputs
        .iter()
        .zip(&answers)
        .map(|(x, c)| judge.batch_loss(&[(x, c.as_slice())]).unwrap().double_value(&[]))
        .collect();
    let batch: Vec<(&JudgeInput, &[Cell])> = inputs.iter().zip(&answers).map(|(x, c)| (x, c.as_slice())).collect();
    let together = judge.batch_loss(&batch).unwrap().double_value(&[]);
    let mean = single.iter().sum::<f64>() / 3.0;
    eprintln!("losses alone {single:?}, mean {mean:.6}, as one batch {together:.6}");
    assert!((together - mean).abs() < 1e-4 * mean.abs().max(1.0), "batch {together} vs mean of singles {mean}");
    // The normal answer: -ln p("No" among the allowed tokens at its one choice) from a plain
    // forward pass over the prompt and the forced tokens before it.
    let ids = judge.answers.ids_of(&[]).to_vec();
    let j = (0..ids.len()).find(|&j| judge.answers.allowed(&ids[..j]).len() > 1).expect("a choice");
    let allowed = judge.answers.allowed(&ids[..j]);
    let seq = Tensor::cat(&[judge.prompt(&inputs[0]), judge.lm.embed_tokens(&ids[..j]).to_kind(judge.lm.kind)], 0);
    let mut cache = KvCache::new(&judge.lm.config);
    let logits = judge.lm.forward_embeds(&seq, &mut cache).unwrap();
    let p = logits.get(logits.size()[0] - 1).index_select(0, &Tensor::from_slice(&allowed)).softmax(0, Kind::Float);
    let want = -p.double_value(&[allowed.iter().position(|&t| t == ids[j]).unwrap() as i64]).ln();
    // Later tokens of the normal answer are forced: nothing else is counted.
    assert!((j + 1..ids.len()).all(|k| judge.answers.allowed(&ids[..k]).len() == 1));
    assert!((single[0] - want).abs() < 1e-4, "normal answer's loss {} vs -ln p(No) {want}", single[0]);
}
