//! A LLaMA-architecture decoder in tch, for the AnomalyGPT-style language-model judge.
//!
//! - [`model`]: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU, a KV
//!   cache; prefill from token ids or from raw embeddings (so learned prompt embeddings can be
//!   spliced in); greedy decoding. Loads llama2.c checkpoints and Hugging Face-layout
//!   safetensors (LLaMA, Vicuna: `config.json` + `*.safetensors`).
//! - [`tokenizer`]: the llama2.c tokenizer format (`tok*.bin`: SentencePiece pieces and scores),
//!   encode (score-ordered merges, byte fallback) and decode.
//!
//! Conformance: with `../shared/models/stories260K` the decoder reproduces llama2.c's 64 greedy
//! token ids exactly (`tests/conformance.rs`).

pub mod answers;
pub mod judge;
pub mod model;
pub mod tokenizer;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LmError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, LmError>;
