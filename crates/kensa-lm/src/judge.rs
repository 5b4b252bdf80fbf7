//! The AnomalyGPT-style language-model judge: a prompt learner turns the anomaly map into soft
//! prompt embeddings, an image projection turns pooled image features into one embedding, both
//! are spliced into the prompt template of method.md, and a frozen LLaMA-family decoder answers,
//! greedily and only along the answer grammar.
//!
//! Prompt: `### Human: <Img>` + image embedding + `</Img> ` + 9 learned base embeddings + 9
//! embeddings computed from the map (conv stack 1→4→16→64→256→1024, then a 1×1 conv to the LM
//! width, on a 48×48 map: the 3×3 output is one embedding per grid cell) + optional product
//! description + `Is there any anomaly in the image?` + `### Assistant:`.

use crate::answers::AnswerSet;
use crate::model::{KvCache, Llama};
use crate::tokenizer::{LmTokenizer, TextTokenizer};
use crate::{LmError, Result};
use kensa_core::grid::Cell;
use std::path::Path;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Side the anomaly map is resized to before the conv stack.
pub const MAP_SIDE: i64 = 48;
const CHANNELS: [i64; 6] = [1, 4, 16, 64, 256, 1024];

/// The trainable part: prompt learner and image projection.
pub struct PromptLearner {
    pub vs: nn::VarStore,
    base: Tensor,
    convs: Vec<nn::Conv2D>,
    to_lm: nn::Conv2D,
    img: nn::Linear,
    pub image_dim: i64,
}

impl PromptLearner {
    pub fn new(device: Device, lm_width: i64, image_dim: i64) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let base = root.randn("base", &[9, lm_width], 0.0, 0.02);
        let mut convs = Vec::new();
        for i in 0..CHANNELS.len() - 1 {
            // Stride 2 down to 3×3 (48 → 24 → 12 → 6 → 3), then 1×1.
            let stride = if i < 4 { 2 } else { 1 };
            let k = if i < 4 { 3 } else { 1 };
            let cfg = nn::ConvConfig { stride, padding: k / 2, ..Default::default() };
            convs.push(nn::conv2d(&root / format!("conv{i}"), CHANNELS[i], CHANNELS[i + 1], k, cfg));
        }
        let to_lm = nn::conv2d(&root / "to_lm", CHANNELS[5], lm_width, 1, Default::default());
        let img = nn::linear(&root / "img", image_dim, lm_width, Default::default());
        Self { vs, base, convs, to_lm, img, image_dim }
    }

    /// 18 prompt embeddings `[18, W]` from a `[MAP_SIDE, MAP_SIDE]` map.
    pub fn prompts(&self, map: &Tensor) -> Tensor {
        let mut x = map.view([1, 1, MAP_SIDE, MAP_SIDE]);
        for c in &self.convs {
            x = c.forward(&x).relu();
        }
        let m = self.to_lm.forward(&x); // [1, W, 3, 3]
        let w = m.size()[1];
        let cells = m.view([w, 9]).transpose(0, 1);
        Tensor::cat(&[self.base.shallow_clone(), cells], 0)
    }

    pub fn image(&self, feat: &Tensor) -> Tensor {
        self.img.forward(&feat.view([1, self.image_dim]))
    }
}

/// One judged frame's input: its anomaly map resized to `MAP_SIDE²` (scores, fp32) and its
/// pooled image features.
pub struct JudgeInput {
    pub map: Tensor,
    pub image: Tensor,
}

pub struct LmJudge {
    pub lm: Llama,
    pub tok: LmTokenizer,
    pub answers: AnswerSet,
    pub learner: PromptLearner,
    pre: Tensor,
    /// Keys and values of `pre`, the prompt's constant beginning, computed once.
    prefix: KvCache,
    mid: Tensor,
    post: Tensor,
    /// Map normalisation: scores are divided by this (the bank's calibrated decision level), so
    /// the learner sees maps on a product-independent scale.
    pub scale: f64,
}

impl LmJudge {
    /// A judge with a freshly initialised prompt learner; the initialisation is drawn from
    /// libtorch's global generator, so call `tch::manual_seed` first for a reproducible one.
    pub fn new(lm: Llama, tok: LmTokenizer, image_dim: i64, description: &str, scale: f64) -> Self {
        let device = lm.device;
        let answers = AnswerSet::new(&tok);
        let learner = PromptLearner::new(device, lm.width(), image_dim);
        let pre: Vec<i64> = tok.bos().into_iter().chain(tok.encode_piece("### Human: <Img>", true)).collect();
        let pre = lm.embed_tokens(&pre);
        let mid = lm.embed_tokens(&tok.encode_piece("</Img>", false));
        let question = if description.is_empty() {
            "Is there any anomaly in the image? ### Assistant:".to_string()
        } else {
            format!("{description} Is there any anomaly in the image? ### Assistant:")
        };
        let post = lm.embed_tokens(&tok.encode_piece(&question, false));
        let mut prefix = KvCache::new(&lm.config);
        // `pre` is a few tokens, far below any model's context: this cannot fail.
        {
            let _g = tch::no_grad_guard();
            let _ = lm.hidden(&pre.unsqueeze(0), &mut prefix).expect("the prompt's beginning fits the model");
        }
        Self { lm, tok, answers, learner, pre, prefix, mid, post, scale: scale.max(1e-6) }
    }

    /// The prompt embeddings `[T, W]` the judge feeds for `x`.
    pub fn prompt(&self, x: &JudgeInput) -> Tensor {
        Tensor::cat(&[self.pre.to_kind(self.lm.kind), self.prompt_after_prefix(x)], 0)
    }

    /// The prompt after its constant beginning (whose keys and values are computed once):
    /// image embedding, `</Img>`, the 18 prompt embeddings and the question.
    fn prompt_after_prefix(&self, x: &JudgeInput) -> Tensor {
        // In units of the decision level, bounded so a huge defect cannot blow up training.
        let map = (&x.map / self.scale).clamp(0.0, 4.0).to_device(self.lm.device).to_kind(Kind::Float);
        let img = self.learner.image(&x.image.to_device(self.lm.device).to_kind(Kind::Float));
        let p = self.learner.prompts(&map);
        Tensor::cat(&[img, self.mid.shallow_clone(), p, self.post.shallow_clone()], 0).to_kind(self.lm.kind)
    }

    /// The choices in the answer `ids`: for each token the grammar does not force, its
    /// position, the tokens allowed there and which of them the answer takes.
    fn choices(&self, ids: &[i64]) -> Vec<(usize, Vec<i64>, usize)> {
        (0..ids.len())
            .filter_map(|j| {
                let allowed = self.answers.allowed(&ids[..j]);
                let pick = allowed.iter().position(|&t| t == ids[j])?;
                (allowed.len() > 1).then_some((j, allowed, pick))
            })
            .collect()
    }

    /// The answer (cells; empty = normal) and its confidence: the product of the chosen
    /// tokens' probabilities among the allowed ones. A token that is the only one the grammar
    /// allows is taken without asking the model (its probability among the allowed is 1); such
    /// forced tokens are fed to the model together, and only when a later choice needs the
    /// logits after them, so "No, there is no anomaly ..." costs one choice after the prompt.
    pub fn judge(&self, x: &JudgeInput) -> Result<(Vec<Cell>, f32)> {
        let _g = tch::no_grad_guard();
        let mut conf = 1.0f64;
        let mut cache = self.prefix.expand(1);
        let mut logits = self.lm.forward_embeds(&self.prompt_after_prefix(x), &mut cache)?;
        let mut out: Vec<i64> = Vec::new();
        let mut pending: Vec<i64> = Vec::new();
        loop {
            let allowed = self.answers.allowed(&out);
            if allowed.is_empty() {
                break;
            }
            if out.len() > self.answers.max_len() {
                return Err(LmError::Decode("answer decoding did not terminate".into()));
            }
            if let [only] = allowed[..] {
                out.push(only);
                pending.push(only);
                continue;
            }
            if !pending.is_empty() {
                logits = self.lm.forward_tokens(&pending, &mut cache)?;
                pending.clear();
            }
            let last = logits.get(logits.size()[0] - 1);
            let ids = Tensor::from_slice(&allowed).to_device(self.lm.device);
            let p = last.index_select(0, &ids).softmax(0, Kind::Float);
            let best = p.argmax(0, false).int64_value(&[]);
            conf *= p.double_value(&[best]);
            let next = allowed[best as usize];
            out.push(next);
            pending.push(next);
        }
        let cells = self.answers.parse(&out).ok_or_else(|| LmError::Decode("decoded ids are not an answer".into()))?;
        Ok((cells.to_vec(), conf as f32))
    }

    /// The training loss of a batch of `(input, answer cells)` pairs (teacher forcing), with
    /// gradients to the prompt learner only (the LM is frozen). It is the loss of the
    /// constrained decoding the judge does: at each token of the answer the grammar does not
    /// force, the cross-entropy of the answer's token among the allowed ones (a forced token's
    /// probability is 1 whatever the model says, so it costs nothing to learn). Per example:
    /// the verdict's choice ("No" / "Yes") plus half the mean of the location choices, so the
    /// verdict weighs most. A sequence ends at its last choice, the constant beginning of the
    /// prompt is not run again, and logits are computed only for the allowed tokens where a
    /// choice is made: a "No" example costs the prompt alone.
    pub fn batch_loss(&self, batch: &[(&JudgeInput, &[Cell])]) -> Result<Tensor> {
        if batch.is_empty() {
            return Err(LmError::Decode("an empty training batch".into()));
        }
        let device = self.lm.device;
        let mut rests = Vec::with_capacity(batch.len());
        let mut fed: Vec<Vec<i64>> = Vec::with_capacity(batch.len());
        let mut terms = Vec::new(); // (example, position in the answer, allowed, pick, weight)
        for (i, (x, cells)) in batch.iter().enumerate() {
            let ids = self.answers.ids_of(cells);
            let choices = self.choices(ids);
            let last = choices.last().map_or(0, |c| c.0);
            fed.push(ids[..last].to_vec());
            rests.push(self.prompt_after_prefix(x));
            // The first choice is the verdict ("No" / "Yes"), the rest are its locations.
            let locations = choices.len().saturating_sub(1).max(1) as f32;
            terms.extend(choices.into_iter().enumerate().map(|(k, (j, allowed, pick))| {
                let weight = if k == 0 { 1.0 } else { 0.5 / locations };
                (i, j, allowed, pick, weight)
            }));
        }
        let r = rests[0].size()[0];
        let longest = fed.iter().map(Vec::len).max().unwrap_or(0) as i64;
        let width = self.lm.width();
        let seqs: Vec<Tensor> = rests
            .into_iter()
            .zip(&fed)
            .map(|(rest, ids)| {
                let mut parts = vec![rest];
                if !ids.is_empty() {
                    parts.push(self.lm.embed_tokens(ids).to_kind(self.lm.kind));
                }
                let pad = longest - ids.len() as i64;
                if pad > 0 {
                    parts.push(Tensor::zeros([pad, width], (self.lm.kind, device)));
                }
                Tensor::cat(&parts, 0)
            })
            .collect();
        let t = r + longest;
        let mut cache = self.prefix.expand(batch.len() as i64);
        let h = self.lm.hidden(&Tensor::stack(&seqs, 0), &mut cache)?.view([-1, width]);
        // The hidden state before each choice: the prompt's last position predicts the answer's
        // first token.
        let rows: Vec<i64> = terms.iter().map(|(i, j, ..)| *i as i64 * t + r - 1 + *j as i64).collect();
        let h = h.index_select(0, &Tensor::from_slice(&rows).to_device(device));
        let mut union: Vec<i64> = terms.iter().flat_map(|(_, _, allowed, ..)| allowed.iter().copied()).collect();
        union.sort_unstable();
        union.dedup();
        let col = |id: i64| union.binary_search(&id).expect("in the union") as i64;
        let (n, u) = (terms.len() as i64, union.len() as i64);
        let mut barred = vec![true; (n * u) as usize];
        let mut targets = Vec::with_capacity(terms.len());
        let mut weights = Vec::with_capacity(terms.len());
        for (k, (_, _, allowed, pick, weight)) in terms.iter().enumerate() {
            for &id in allowed {
                barred[k * u as usize + col(id) as usize] = false;
            }
            targets.push(col(allowed[*pick]));
            weights.push(*weight);
        }
        let logits = self.lm.logits(&h, Some(&union));
        let barred = Tensor::from_slice(&barred).view([n, u]).to_device(device);
        let logp = logits.masked_fill(&barred, f64::NEG_INFINITY).log_softmax(-1, Kind::Float);
        let picked = logp.gather(1, &Tensor::from_slice(&targets).to_device(device).unsqueeze(1), false).squeeze_dim(1);
        let w = Tensor::from_slice(&weights).to_device(device);
        Ok(-(picked * w).sum(Kind::Float) / batch.len() as f64)
    }

    /// Trains the prompt learner on `(input, cells)` pairs for `epochs`, `batch` examples a
    /// step, calling `progress` after each step with (examples seen, total, running loss).
    pub fn train(
        &mut self,
        data: &[(JudgeInput, Vec<Cell>)],
        epochs: usize,
        batch: usize,
        lr: f64,
        mut progress: impl FnMut(usize, usize, f64),
    ) -> Result<()> {
        let mut opt = nn::Adam::default().build(&self.learner.vs, lr)?;
        let total = data.len() * epochs;
        let batch = batch.max(1);
        let mut running = 0.0;
        let mut seen = 0;
        // A fixed interleaving (no RNG): every epoch visits every example once, in a strided
        // and rotated order (a stride coprime with the count, so it is a permutation).
        let n = data.len();
        let stride = [7, 11, 13, 17, 19, 23].into_iter().find(|s| !n.is_multiple_of(*s)).unwrap_or(1);
        for e in 0..epochs {
            let order: Vec<usize> = (0..n).map(|k| (k * stride + e) % n).collect();
            for chunk in order.chunks(batch) {
                let items: Vec<(&JudgeInput, &[Cell])> =
                    chunk.iter().map(|&k| (&data[k].0, data[k].1.as_slice())).collect();
                let loss = self.batch_loss(&items)?;
                opt.backward_step_clip_norm(&loss, 1.0);
                let l = loss.double_value(&[]);
                running = if seen == 0 { l } else { 0.9 * running + 0.1 * l };
                seen += chunk.len();
                progress(seen, total, running);
            }
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.learner.vs.save(path).map_err(|e| LmError::File { path: path.to_path_buf(), msg: e.to_string() })
    }

    pub fn load_weights(&mut self, path: &Path) -> Result<()> {
        self.learner.vs.load(path).map_err(|e| LmError::File { path: path.to_path_buf(), msg: e.to_string() })
    }
}
