//! The llama2.c tokenizer file (`tok*.bin`, exported from a SentencePiece model): an int32
//! max token length, then per token a float32 merge score, an int32 byte length and the bytes.
//! Encoding follows llama2.c: a dummy-prefix space, one token per UTF-8 character (bytes
//! `<0xXX>` + 3 as fallback), then repeatedly the highest-scoring merge of two neighbours.

use crate::{LmError, Result};
use std::collections::HashMap;
use std::path::Path;

pub const BOS: i64 = 1;
pub const EOS: i64 = 2;

pub struct Tokenizer {
    pieces: Vec<Vec<u8>>,
    scores: Vec<f32>,
    lookup: HashMap<Vec<u8>, i64>,
}

impl Tokenizer {
    pub fn load(path: &Path, vocab_size: usize) -> Result<Self> {
        let err = |msg: String| LmError::File { path: path.to_path_buf(), msg };
        let b = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut off = 4usize; // max_token_length
        let mut pieces = Vec::with_capacity(vocab_size);
        let mut scores = Vec::with_capacity(vocab_size);
        for i in 0..vocab_size {
            let head = b.get(off..off + 8).ok_or_else(|| err(format!("truncated at token {i}")))?;
            let score = f32::from_le_bytes(head[0..4].try_into().unwrap());
            let len = i32::from_le_bytes(head[4..8].try_into().unwrap());
            if len < 0 {
                return Err(err(format!("token {i} has negative length")));
            }
            off += 8;
            let piece = b.get(off..off + len as usize).ok_or_else(|| err(format!("truncated in token {i}")))?;
            off += len as usize;
            pieces.push(piece.to_vec());
            scores.push(score);
        }
        let lookup = pieces.iter().enumerate().map(|(i, p)| (p.clone(), i as i64)).rev().collect();
        Ok(Self { pieces, scores, lookup })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The id of an exact piece, if the vocabulary has it.
    pub fn piece_id(&self, piece: &str) -> Option<i64> {
        self.lookup.get(piece.as_bytes()).copied()
    }

    pub fn encode(&self, text: &str, bos: bool, eos: bool) -> Vec<i64> {
        let mut t: Vec<i64> = Vec::new();
        if bos {
            t.push(BOS);
        }
        let start = t.len();
        if !text.is_empty() {
            if let Some(id) = self.piece_id(" ") {
                t.push(id);
            }
        }
        for ch in text.chars() {
            let mut buf = [0u8; 4];
            let s = ch.encode_utf8(&mut buf);
            match self.lookup.get(s.as_bytes()) {
                Some(&id) => t.push(id),
                None => t.extend(s.bytes().map(|b| b as i64 + 3)),
            }
        }
        loop {
            let mut best: Option<(f32, usize, i64)> = None;
            for i in start..t.len().saturating_sub(1) {
                let mut merged = self.pieces[t[i] as usize].clone();
                merged.extend_from_slice(&self.pieces[t[i + 1] as usize]);
                if let Some(&id) = self.lookup.get(&merged) {
                    let s = self.scores[id as usize];
                    if best.is_none_or(|(bs, _, _)| s > bs) {
                        best = Some((s, i, id));
                    }
                }
            }
            let Some((_, i, id)) = best else { break };
            t[i] = id;
            t.remove(i + 1);
        }
        if eos {
            t.push(EOS);
        }
        t
    }

    /// Text of `tokens` (a leading space after BOS is dropped, `<0xXX>` pieces become bytes).
    pub fn decode(&self, tokens: &[i64]) -> String {
        let mut out: Vec<u8> = Vec::new();
        let mut prev = BOS;
        for &tok in tokens {
            let Some(p) = self.pieces.get(tok as usize) else { continue };
            let mut p: &[u8] = p;
            if prev == BOS && p.first() == Some(&b' ') {
                p = &p[1..];
            }
            if p.len() == 6 && p.starts_with(b"<0x") && p.ends_with(b">") {
                if let Ok(b) = u8::from_str_radix(std::str::from_utf8(&p[3..5]).unwrap_or(""), 16) {
                    out.push(b);
                    prev = tok;
                    continue;
                }
            }
            out.extend_from_slice(p);
            prev = tok;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// What the judge needs from a tokenizer: prompt pieces as ids, the BOS id to start with, and
/// text back. Implemented by the llama2.c tokenizer, the byte-level BPE tokenizer of a GGUF
/// file, and [`LmTokenizer`] (either).
pub trait TextTokenizer {
    /// Ids of `text` as a piece of a prompt: `first` when it starts the prompt, otherwise it
    /// follows other text and begins with a word boundary (a space).
    fn encode_piece(&self, text: &str, first: bool) -> Vec<i64>;
    /// The id a prompt starts with, if the model wants one.
    fn bos(&self) -> Option<i64>;
    fn decode_ids(&self, ids: &[i64]) -> String;
}

impl TextTokenizer for Tokenizer {
    /// llama2.c's SentencePiece convention: every piece gets the dummy-prefix space.
    fn encode_piece(&self, text: &str, _first: bool) -> Vec<i64> {
        self.encode(text, false, false)
    }

    fn bos(&self) -> Option<i64> {
        Some(BOS)
    }

    fn decode_ids(&self, ids: &[i64]) -> String {
        self.decode(ids)
    }
}

impl TextTokenizer for crate::bpe::BpeTokenizer {
    fn encode_piece(&self, text: &str, first: bool) -> Vec<i64> {
        let text = if first { text.to_string() } else { format!(" {text}") };
        // Without BOS (the prompt adds it once), special tokens matched whole.
        let mut ids = self.encode(&text).unwrap_or_default();
        if self.add_bos && !ids.is_empty() && Some(ids[0]) == self.bos {
            ids.remove(0);
        }
        ids
    }

    fn bos(&self) -> Option<i64> {
        if self.add_bos {
            self.bos
        } else {
            None
        }
    }

    fn decode_ids(&self, ids: &[i64]) -> String {
        self.decode(ids, true)
    }
}

/// A language model's tokenizer: llama2.c's, or a GGUF file's byte-level BPE.
pub enum LmTokenizer {
    Llama2c(Tokenizer),
    Bpe(crate::bpe::BpeTokenizer),
}

impl TextTokenizer for LmTokenizer {
    fn encode_piece(&self, text: &str, first: bool) -> Vec<i64> {
        match self {
            Self::Llama2c(t) => t.encode_piece(text, first),
            Self::Bpe(t) => t.encode_piece(text, first),
        }
    }

    fn bos(&self) -> Option<i64> {
        match self {
            Self::Llama2c(t) => t.bos(),
            Self::Bpe(t) => t.bos(),
        }
    }

    fn decode_ids(&self, ids: &[i64]) -> String {
        match self {
            Self::Llama2c(t) => t.decode_ids(ids),
            Self::Bpe(t) => t.decode_ids(ids),
        }
    }
}
