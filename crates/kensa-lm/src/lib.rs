//! A LLaMA-architecture decoder in tch, and the AnomalyGPT-style language-model judge built on it.
//!
//! # Layout
//!
//! - [`model`]: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU, a KV
//!   cache; prefill from token ids or from raw embeddings (so learned prompt embeddings can be
//!   spliced in); greedy decoding. Loads llama2.c checkpoints and Hugging Face-layout
//!   safetensors (LLaMA, Vicuna: `config.json` + `*.safetensors`) and llama.cpp's GGUF files.
//! - [`gguf`]: the GGUF reader: header, metadata, tensors dequantized (F32, F16, BF16, Q8_0,
//!   Q4_0, Q4_1).
//! - [`bpe`]: byte-level BPE tokenizers (`tokenizers` crate) built from a GGUF's metadata, and
//!   the model's chat template (Jinja, rendered with `minijinja`).
//! - [`generate`]: `kensa lm generate`: greedy continuation of a prompt or a one-turn chat.
//! - [`ask`]: asking about a frame: the verdict first, then follow-ups answered by an
//!   instruction model from the map's facts, never contradicting the verdict.
//! - [`judging`]: the judge of a bank: its `Judge` impl over the engine's features, the
//!   labelling rules and training of its prompt learner, its sidecar file.
//! - [`tokenizer`]: the llama2.c tokenizer format (`tok*.bin`: SentencePiece pieces and scores),
//!   encode (score-ordered merges, byte fallback) and decode.
//!
//! Conformance: with `../shared/models/stories260K` the decoder reproduces llama2.c's 64 greedy
//! token ids exactly (`tests/conformance.rs`); with SmolLM2-135M-Instruct (Q4_1 GGUF) it
//! reproduces Hugging Face transformers' greedy token ids on plain and chat prompts
//! (`tests/gguf_conformance.rs`, reference from `tools/lm_reference.py`).

pub mod answers;
pub mod ask;
pub mod bpe;
pub mod generate;
pub mod gguf;
pub mod judge;
pub mod judging;
pub mod model;
pub mod tokenizer;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LmError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// Decoding went off the answer grammar, or a checkpoint's contents are inconsistent.
    #[error("{0}")]
    Decode(String),
    /// A trained judge that does not fit the bank or backbone it is used with.
    #[error("language-model judge: {0}")]
    Mismatch(String),
    /// The vision side (backbone, bank) failed while preparing the judge's input.
    #[error("model: {0}")]
    Model(String),
}

pub type Result<T> = std::result::Result<T, LmError>;
