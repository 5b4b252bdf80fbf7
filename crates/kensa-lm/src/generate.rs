//! `kensa lm generate`: the greedy continuation of a prompt (or of a one-turn chat, through the
//! model's chat template) by a GGUF language model. Deterministic: the same file, prompt and
//! precision always give the same tokens.

use crate::bpe::{BpeTokenizer, Message};
use crate::gguf::Gguf;
use crate::model::Llama;
use crate::{LmError, Result};
use kensa_core::config::{Device, Precision};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Kind;

#[derive(clap::Args, Clone, Debug)]
pub struct GenerateArgs {
    /// Language model: a LLaMA-architecture GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt (plain text, or the user's message with --chat).
    #[arg(long)]
    pub prompt: String,
    /// Send the prompt as a user message through the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the template's own, if it has one).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate (stops earlier at the end-of-sequence token).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Where the model runs: auto (CUDA when present), cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub device: String,
    /// Weights and activations: auto (fp32 on the CPU, bf16 on CUDA), fp32, fp16 or bf16.
    #[arg(long, default_value = "auto", value_parser = ["auto", "fp32", "fp16", "bf16"])]
    pub precision: String,
    /// libtorch threads (0: libtorch's default). One token at a time is memory-bound: on a
    /// small or busy CPU, 1 thread is often as fast as several.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON object (prompt and output token ids, text, timings) instead of the text.
    #[arg(long)]
    pub json: bool,
}

/// A language model and its tokenizer, loaded from one GGUF file.
pub struct ChatModel {
    pub model: Llama,
    pub tokenizer: BpeTokenizer,
}

impl ChatModel {
    /// Loads `path` on `device` in `kind` (weights dequantized once, here).
    pub fn load_gguf(path: &Path, device: tch::Device, kind: Kind) -> Result<Self> {
        let g = Gguf::open(path)?;
        let tokenizer = BpeTokenizer::from_gguf(&g)?;
        let model = Llama::load_gguf(&g, device, kind)?;
        if (tokenizer.vocab_size() as i64) > model.config.vocab_size {
            return Err(LmError::File {
                path: path.to_path_buf(),
                msg: format!(
                    "the tokenizer has {} tokens, the model {}",
                    tokenizer.vocab_size(),
                    model.config.vocab_size
                ),
            });
        }
        Ok(Self { model, tokenizer })
    }

    /// Prompt token ids: `text` as is, or as the user's message of a chat (with an optional
    /// system message), rendered by the model's template with the assistant's turn opened.
    pub fn prompt_ids(&self, text: &str, chat: bool, system: Option<&str>) -> Result<Vec<i64>> {
        if !chat {
            return self.tokenizer.encode(text);
        }
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", text));
        self.tokenizer.encode_chat(&messages, true)
    }

    /// Greedy continuation of `prompt` (ids), at most `max_new` tokens, ending with the
    /// end-of-sequence token when the model emits it.
    pub fn generate(&self, prompt: &[i64], max_new: usize) -> Result<Vec<i64>> {
        if prompt.is_empty() {
            return Err(LmError::Decode("empty prompt".into()));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t < 0 || t >= self.model.config.vocab_size) {
            return Err(LmError::Decode(format!("token id {bad} is outside the vocabulary")));
        }
        self.model.greedy(&self.model.embed_tokens(prompt), max_new, self.tokenizer.eos, |_| None)
    }
}

fn device_and_kind(device: &str, precision: &str) -> Result<(tch::Device, Kind)> {
    let d: Device = device.parse().map_err(|e: String| LmError::Model(e))?;
    let dev = kensa_model::torch_device(d).map_err(|e| LmError::Model(e.to_string()))?;
    let p: Precision = precision.parse().map_err(|e: String| LmError::Model(e))?;
    let kind = kensa_model::precision_kind(p).unwrap_or(if dev.is_cuda() { Kind::BFloat16 } else { Kind::Float });
    Ok((dev, kind))
}

/// `kensa lm generate`.
pub fn run(a: &GenerateArgs) -> Result<()> {
    if a.threads > 0 {
        tch::set_num_threads(i32::try_from(a.threads).unwrap_or(i32::MAX));
    }
    let (device, kind) = device_and_kind(&a.device, &a.precision)?;
    let t0 = Instant::now();
    let m = ChatModel::load_gguf(&a.model, device, kind)?;
    let load_s = t0.elapsed().as_secs_f64();
    let prompt = m.prompt_ids(&a.prompt, a.chat, a.system.as_deref())?;
    let t1 = Instant::now();
    let out = m.generate(&prompt, a.max_new_tokens)?;
    let gen_s = t1.elapsed().as_secs_f64();
    let text_ids: &[i64] = match out.last() {
        Some(&l) if Some(l) == m.tokenizer.eos => &out[..out.len() - 1],
        _ => &out,
    };
    let text = m.tokenizer.decode(text_ids, false);
    let tps = out.len() as f64 / gen_s.max(1e-9);
    if a.json {
        let j = serde_json::json!({
            "model": a.model,
            "device": format!("{device:?}"),
            "kind": format!("{kind:?}"),
            "prompt_ids": prompt,
            "output_ids": out,
            "text": text,
            "load_s": load_s,
            "generate_s": gen_s,
            "tokens_per_s": tps,
            "threads": tch::get_num_threads(),
        });
        println!("{j}");
    } else {
        println!("{text}");
        eprintln!(
            "{} prompt tokens, {} generated in {gen_s:.2} s ({tps:.1} tokens/s, prefill included); model loaded in {load_s:.2} s ({device:?}, {kind:?})",
            prompt.len(),
            out.len()
        );
    }
    Ok(())
}
