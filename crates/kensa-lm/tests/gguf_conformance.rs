//! SmolLM2-135M-Instruct (Q4_1 GGUF, fetched by scripts/setup.sh into $KENSA_CACHE/models)
//! against Hugging Face transformers' greedy output on the same file
//! (`smollm2_reference.json`, written by `tools/lm_reference.py`).
//!
//! Tolerance: for every prompt (plain and chat) the prompt's token ids are identical, and the
//! generated ids are identical; or the first generated id that differs is a near tie: Kensa's
//! logit for transformers' token is within [`TIE_MARGIN`] of Kensa's best. (Both sides compute in
//! fp32 from the same dequantized weights, so they differ only by summation order, ~1e-5.)

use kensa_lm::bpe::Message;
use kensa_lm::generate::ChatModel;
use kensa_lm::model::KvCache;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Largest logit gap (Kensa's best minus Kensa's logit of the reference token) accepted at the
/// first differing token.
const TIE_MARGIN: f64 = 0.02;

fn model_path() -> Option<PathBuf> {
    let cache = std::env::var("KENSA_CACHE")
        .map_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/kensa"), PathBuf::from);
    let default = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let p = std::env::var("KENSA_SMOLLM2").map_or(default, PathBuf::from);
    p.is_file().then_some(p)
}

/// The model, loaded per test (a tch tensor cannot be shared between the test threads).
fn model() -> Option<ChatModel> {
    let p = model_path()?;
    let t = Instant::now();
    let m = ChatModel::load_gguf(&p, Device::Cpu, Kind::Float).unwrap();
    eprintln!("loaded {} in {:.2} s", p.display(), t.elapsed().as_secs_f64());
    Some(m)
}

macro_rules! model_or_skip {
    ($name:literal) => {
        match model() {
            Some(m) => m,
            None => {
                eprintln!(
                    "SKIP {}: $KENSA_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf is absent (scripts/setup.sh fetches it)",
                    $name
                );
                return;
            }
        }
    };
}

struct Case {
    chat: bool,
    prompt: String,
    prompt_ids: Vec<i64>,
    output_ids: Vec<i64>,
}

fn reference() -> Vec<Case> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/smollm2_reference.json");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect::<Vec<_>>();
    j["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            chat: c["chat"].as_bool().unwrap(),
            prompt: c["prompt"].as_str().unwrap().to_string(),
            prompt_ids: ids(&c["prompt_ids"]),
            output_ids: ids(&c["output_ids"]),
        })
        .collect()
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let m = model_or_skip!("tokenizer_and_chat_template_match_transformers");
    let cases = reference();
    assert!(cases.iter().any(|c| c.chat) && cases.iter().any(|c| !c.chat));
    for c in &cases {
        let ids = m.prompt_ids(&c.prompt, c.chat, None).unwrap();
        assert_eq!(ids, c.prompt_ids, "prompt ids of {:?} (chat: {})", c.prompt, c.chat);
    }
    let tok = &m.tokenizer;
    assert_eq!((tok.bos, tok.eos, tok.add_bos), (Some(1), Some(2), false));
    // Special tokens are whole in the text and in the decoded ids; byte-level text round-trips.
    let text = "<|im_start|>user\nNaïve café, 3 µm scratch!\n\n  indented<|im_end|>";
    let ids = tok.encode(text).unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (1, 2));
    assert_eq!(tok.decode(&ids, false), text);
    let chat = tok.apply_chat_template(&[Message::new("user", "Hi")], true).unwrap();
    assert!(chat.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), "{chat:?}");
    assert!(chat.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), "{chat:?}");
}

/// Every case through the full sequence at once (prompt + transformers' output): the argmax
/// after each position must be transformers' next token, up to a near tie at the first
/// difference. Equivalent to greedy decoding while the tokens agree, at the cost of one forward
/// pass per case.
#[test]
fn greedy_tokens_match_transformers() {
    let m = model_or_skip!("greedy_tokens_match_transformers");
    let t0 = Instant::now();
    let mut identical = 0;
    for c in &reference() {
        let seq: Vec<i64> = c.prompt_ids.iter().chain(&c.output_ids).copied().collect();
        let mut cache = KvCache::new(&m.model.config);
        let logits = m.model.forward_tokens(&seq[..seq.len() - 1], &mut cache).unwrap();
        let n = c.prompt_ids.len() as i64;
        let mut first_diff = None;
        for (i, &want) in c.output_ids.iter().enumerate() {
            let row = logits.get(n - 1 + i as i64);
            let best = row.argmax(0, false).int64_value(&[]);
            if best != want {
                let gap = row.double_value(&[best]) - row.double_value(&[want]);
                first_diff = Some((i, best, want, gap));
                break;
            }
        }
        match first_diff {
            None => identical += 1,
            Some((i, best, want, gap)) => {
                eprintln!(
                    "{:?} (chat: {}): token {i}: Kensa {best}, transformers {want}, gap {gap:.5}",
                    c.prompt, c.chat
                );
                assert!(
                    gap <= TIE_MARGIN,
                    "{:?} (chat: {}): generated token {i} is {best}, transformers' is {want}, {gap:.4} logits apart (> {TIE_MARGIN})",
                    c.prompt,
                    c.chat
                );
            }
        }
    }
    eprintln!("{identical} of {} cases identical in {:.1} s", reference().len(), t0.elapsed().as_secs_f64());
}

/// The real greedy loop (KV cache, one token at a time, stop at end-of-sequence) on two cases,
/// one of which ends with `<|im_end|>`.
#[test]
fn incremental_greedy_decoding_matches_transformers() {
    let m = model_or_skip!("incremental_greedy_decoding_matches_transformers");
    let cases = reference();
    for c in cases.iter().filter(|c| c.prompt == "What is the capital of France?" || c.prompt == "def fibonacci(n):") {
        let t = Instant::now();
        let n = c.output_ids.len().min(16);
        let got = m.generate(&c.prompt_ids, n).unwrap();
        eprintln!(
            "{:?}: {} tokens in {:.2} s: {:?}",
            c.prompt,
            got.len(),
            t.elapsed().as_secs_f64(),
            m.tokenizer.decode(&got, false)
        );
        assert_eq!(got, c.output_ids[..n], "{:?} (chat: {})", c.prompt, c.chat);
    }
}

/// The judge on SmolLM2: all 512 answers of the grammar tokenize (with a leading space, as they
/// follow "### Assistant:") to distinct ids that decode back to their sentences, and an untrained
/// judge's constrained decoding gives a whole answer, the same twice. Prints the time per
/// judgement (prefill of the whole prompt + the constrained answer tokens).
#[test]
fn judge_answers_along_the_grammar_on_smollm2() {
    use kensa_core::grid::parse_answer;
    use kensa_lm::answers::AnswerSet;
    use kensa_lm::judge::{JudgeInput, LmJudge};
    use kensa_lm::judging::load_lm;
    use kensa_lm::tokenizer::TextTokenizer;
    let Some(path) = model_path() else {
        eprintln!(
            "SKIP judge_answers_along_the_grammar_on_smollm2: the SmolLM2 GGUF is absent (scripts/setup.sh fetches it)"
        );
        return;
    };
    let (lm, tok) = load_lm(&path, None, Device::Cpu).unwrap();
    assert_eq!(tok.bos(), None, "SmolLM2 adds no BOS");
    let set = AnswerSet::new(&tok);
    assert_eq!(set.answers.len(), 512);
    let distinct: std::collections::HashSet<&Vec<i64>> = set.answers.iter().map(|a| &a.0).collect();
    assert_eq!(distinct.len(), 512);
    for (ids, cells) in &set.answers {
        let text = tok.decode_ids(ids);
        assert_eq!(parse_answer(text.trim()).as_deref(), Some(cells.as_slice()), "{text:?}");
    }
    // The verdict is the first token, " No" or " Yes": the judge's first and weightiest choice.
    let first = set.allowed(&[]);
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(tok.decode_ids(&first[..1]).trim().len() + tok.decode_ids(&first[1..]).trim().len(), 5, "No + Yes");
    tch::manual_seed(0);
    let judge = LmJudge::new(lm, tok, 32, "", 1.0);
    let x = JudgeInput {
        map: Tensor::rand([48, 48], (Kind::Float, Device::Cpu)),
        image: Tensor::zeros([32], (Kind::Float, Device::Cpu)),
    };
    let t = Instant::now();
    let (a, conf) = judge.judge(&x).unwrap();
    let dt = t.elapsed().as_secs_f64();
    let (b, _) = judge.judge(&x).unwrap();
    assert_eq!(a, b);
    assert!(conf > 0.0 && conf <= 1.0);
    eprintln!("SmolLM2 judge: {} cells, confidence {conf:.3}, {dt:.2} s per judgement", a.len());
}
