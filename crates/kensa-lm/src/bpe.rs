//! Byte-level BPE tokenizers (GPT-2 style, as SmolLM2, Qwen and LLaMA-3 use) built with the
//! `tokenizers` crate from a GGUF file's metadata, and the model's chat template.
//!
//! From the GGUF (`tokenizer.ggml.model = "gpt2"`) the tokenizer is built the way Hugging Face
//! `transformers` builds it from the same file: a BPE model over `tokenizer.ggml.tokens` (ids are
//! positions) and `tokenizer.ggml.merges` (in rank order), the byte-level pre-tokenizer (GPT-2's
//! split regex, no prefix space) and decoder, and every token the file marks as control
//! (`token_type` 3: `<|im_start|>`, `<|im_end|>`, ...) as a special token that is matched whole in
//! the text and never split. BOS is added only when `tokenizer.ggml.add_bos_token` says so.
//!
//! The chat template (`tokenizer.chat_template`, Jinja) is rendered with `minijinja`, with the
//! settings `transformers` renders it with (`trim_blocks`, `lstrip_blocks`) and the same
//! variables (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`).

use crate::gguf::{Gguf, Value};
use crate::{LmError, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// One turn of a conversation.
#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

pub struct BpeTokenizer {
    inner: Tokenizer,
    pub bos: Option<i64>,
    pub eos: Option<i64>,
    pub add_bos: bool,
    chat_template: Option<String>,
    path: PathBuf,
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others are
/// shifted to U+0100 and up, so every byte string is a string of visible characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid char")
        };
    }
    table
}

impl BpeTokenizer {
    /// The tokenizer a GGUF file describes (byte-level BPE only: `tokenizer.ggml.model = gpt2`).
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let err = |msg: String| LmError::File { path: g.path.clone(), msg: format!("GGUF tokenizer: {msg}") };
        let model = g.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(err(format!("tokenizer.ggml.model is {model:?}; only byte-level BPE (\"gpt2\") is supported")));
        }
        let tokens = g.strings("tokenizer.ggml.tokens")?;
        let merges = g.strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        // Tokens are stored in the byte alphabet already; one that is not (a mislabelled raw
        // string) is respelled byte by byte, as transformers does.
        let spell = bytes_to_unicode();
        let alphabet: std::collections::HashSet<char> = spell.iter().copied().collect();
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let s = if t.chars().all(|c| alphabet.contains(&c)) {
                    (*t).to_string()
                } else {
                    t.bytes().map(|b| spell[b as usize]).collect()
                };
                (s, i as u32)
            })
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("merge {m:?} is not two tokens")))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| err(format!("BPE: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(t, &ty)| ty == 3 && t.chars().all(|c| alphabet.contains(&c)))
            .map(|(t, _)| AddedToken::from((*t).to_string(), true).normalized(false))
            .collect();
        inner.add_special_tokens(&special);
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == 4)
            .map(|(t, _)| AddedToken::from((*t).to_string(), false).normalized(false))
            .collect();
        inner.add_tokens(&user);
        let id = |k: &str| g.get(k).and_then(Value::as_u64).map(|v| v as i64);
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false),
            chat_template: g.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string),
            path: g.path.clone(),
        })
    }

    fn err(&self, msg: String) -> LmError {
        LmError::File { path: self.path.clone(), msg }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of an exact token (in the byte alphabet: a leading space is `Ġ`).
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// Token ids of `text`; special tokens written in it (`<|im_start|>`) are matched whole.
    /// BOS is prepended when the model asks for it (`add_bos`).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.err(format!("cannot tokenize: {e}")))?;
        let mut ids: Vec<i64> = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend(enc.get_ids().iter().map(|&i| i64::from(i)));
        Ok(ids)
    }

    /// Text of `ids`, special tokens included unless `skip_special`.
    pub fn decode(&self, ids: &[i64], skip_special: bool) -> String {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        self.inner.decode(&ids, skip_special).unwrap_or_default()
    }

    fn token_text(&self, id: Option<i64>) -> String {
        id.and_then(|i| self.inner.id_to_token(i as u32)).unwrap_or_default()
    }

    /// The conversation rendered by the model's chat template, ending with the assistant's
    /// turn opened when `add_generation_prompt`.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template =
            self.chat_template.as_deref().ok_or_else(|| self.err("the model has no chat template".into()))?;
        render_chat(template, messages, add_generation_prompt, &self.token_text(self.bos), &self.token_text(self.eos))
            .map_err(|e| self.err(format!("chat template: {e}")))
    }

    /// Token ids of a conversation (the rendered template; its special tokens matched whole).
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<i64>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        let enc = self.inner.encode(text.as_str(), false).map_err(|e| self.err(format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Where the tokenizer came from (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Renders a Hugging Face chat template as `transformers` does (Jinja with `trim_blocks` and
/// `lstrip_blocks`; `raise_exception(msg)` fails the rendering).
pub fn render_chat(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> std::result::Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    env.render_str(template, ctx).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn chatml_template_renders_as_transformers_does() {
        let one = render_chat(CHATML, &[Message::new("user", "Hi?")], true, "<|im_start|>", "<|im_end|>").unwrap();
        assert_eq!(
            one,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        let sys = [Message::new("system", "Be brief."), Message::new("user", "Hi?")];
        let two = render_chat(CHATML, &sys, false, "", "").unwrap();
        assert_eq!(two, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n");
        let e = render_chat("{{ raise_exception('roles must alternate') }}", &sys, true, "", "").unwrap_err();
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn byte_table_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t.iter().collect::<std::collections::HashSet<_>>().len(), 256);
    }
}
