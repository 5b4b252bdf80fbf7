//! Decoding constrained to AnomalyGPT's answer grammar (`kensa_core::grid::answer`): every
//! valid answer (the normal one, and one per non-empty set of grid cells, 512 in all) is
//! tokenized once; decoding may only follow a prefix of one of them, so its output is always a
//! valid answer, and greedy decoding makes it deterministic.

use crate::tokenizer::TextTokenizer;
use kensa_core::grid::{answer, Cell};
use std::collections::{BTreeSet, HashMap};

pub struct AnswerSet {
    /// Token ids of every answer, with its cells (empty: normal).
    pub answers: Vec<(Vec<i64>, Vec<Cell>)>,
    /// Allowed next tokens after each proper prefix.
    next: HashMap<Vec<i64>, BTreeSet<i64>>,
    complete: HashMap<Vec<i64>, usize>,
}

impl AnswerSet {
    pub fn new(tok: &impl TextTokenizer) -> Self {
        let mut answers = Vec::with_capacity(512);
        for mask in 0u32..512 {
            let cells: Vec<Cell> =
                Cell::ALL.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, c)| *c).collect();
            // A leading space, as the answer follows "### Assistant:" in the prompt.
            let ids = tok.encode_piece(&answer(&cells), false);
            answers.push((ids, cells));
        }
        let mut next: HashMap<Vec<i64>, BTreeSet<i64>> = HashMap::new();
        let mut complete = HashMap::new();
        for (k, (ids, _)) in answers.iter().enumerate() {
            for i in 0..ids.len() {
                next.entry(ids[..i].to_vec()).or_default().insert(ids[i]);
            }
            complete.insert(ids.clone(), k);
        }
        Self { answers, next, complete }
    }

    /// Tokens that may follow `prefix` (empty once `prefix` is a whole answer).
    pub fn allowed(&self, prefix: &[i64]) -> Vec<i64> {
        if self.complete.contains_key(prefix) {
            return Vec::new();
        }
        self.next.get(prefix).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    /// The answer `ids` spell, if they are a whole answer.
    pub fn parse(&self, ids: &[i64]) -> Option<&[Cell]> {
        self.complete.get(ids).map(|&k| self.answers[k].1.as_slice())
    }

    /// Token ids of the answer for `cells` (empty: normal).
    pub fn ids_of(&self, cells: &[Cell]) -> &[i64] {
        let mask: u32 = cells.iter().map(|c| 1u32 << c.index()).sum();
        &self.answers[mask as usize].0
    }

    /// The longest answer, in tokens.
    pub fn max_len(&self) -> usize {
        self.answers.iter().map(|a| a.0.len()).max().unwrap_or(0)
    }
}
