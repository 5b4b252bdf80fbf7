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
        Self { lm, tok, answers, learner, pre, mid, post, scale: scale.max(1e-6) }
    }

    /// The prompt embeddings `[T, W]` the judge feeds for `x`.
    pub fn prompt(&self, x: &JudgeInput) -> Tensor {
        // In units of the decision level, bounded so a huge defect cannot blow up training.
        let map = (&x.map / self.scale).clamp(0.0, 4.0).to_device(self.lm.device).to_kind(Kind::Float);
        let img = self.learner.image(&x.image.to_device(self.lm.device).to_kind(Kind::Float));
        let p = self.learner.prompts(&map);
        Tensor::cat(&[self.pre.shallow_clone(), img, self.mid.shallow_clone(), p, self.post.shallow_clone()], 0)
            .to_kind(self.lm.kind)
    }

    /// The answer (cells; empty = normal) and its confidence: the product of the chosen
    /// tokens' probabilities among the allowed ones. A token that is the only one the grammar
    /// allows is taken without asking the model (its probability among the allowed is 1); such
    /// forced tokens are fed to the model together, and only when a later choice needs the
    /// logits after them, so "No, there is no anomaly ..." costs one choice after the prompt.
    pub fn judge(&self, x: &JudgeInput) -> Result<(Vec<Cell>, f32)> {
        let _g = tch::no_grad_guard();
        let prompt = self.prompt(x);
        let mut conf = 1.0f64;
        let mut cache = KvCache::new(&self.lm.config);
        let mut logits = self.lm.forward_embeds(&prompt, &mut cache)?;
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

    /// Cross-entropy of the answer for `cells` given `x` (teacher forcing), with gradients to
    /// the prompt learner only (the LM is frozen).
    pub fn loss(&self, x: &JudgeInput, cells: &[Cell]) -> Result<Tensor> {
        let prompt = self.prompt(x);
        let ids = self.answers.ids_of(cells).to_vec();
        let ans = self.lm.embed_tokens(&ids[..ids.len() - 1]).to_kind(self.lm.kind);
        let seq = Tensor::cat(&[prompt, ans], 0);
        let logits = self.lm.forward_embeds_grad(&seq)?;
        let n = ids.len() as i64;
        let start = seq.size()[0] - n;
        let pred = logits.narrow(0, start, n);
        let target = Tensor::from_slice(&ids).to_device(self.lm.device);
        // The first answer token ("No" / "Yes") carries the verdict; on its own it would be one
        // of 10-20 tokens in the mean, so it is counted once more.
        let verdict = pred.narrow(0, 0, 1).cross_entropy_for_logits(&target.narrow(0, 0, 1));
        Ok(pred.cross_entropy_for_logits(&target) + verdict)
    }

    /// Trains the prompt learner on `(input, cells)` pairs for `epochs`, calling `progress`
    /// after each step with (step, total, running loss).
    pub fn train(
        &mut self,
        data: &[(JudgeInput, Vec<Cell>)],
        epochs: usize,
        lr: f64,
        mut progress: impl FnMut(usize, usize, f64),
    ) -> Result<()> {
        let mut opt = nn::Adam::default().build(&self.learner.vs, lr)?;
        let total = data.len() * epochs;
        let mut running = 0.0;
        let mut step = 0;
        // A fixed interleaving (no RNG): every epoch visits the examples in a rotated order.
        for e in 0..epochs {
            for k in 0..data.len() {
                let (x, cells) = &data[(k * 7 + e) % data.len()];
                let loss = self.loss(x, cells)?;
                opt.backward_step_clip_norm(&loss, 1.0);
                let l = loss.double_value(&[]);
                running = if step == 0 { l } else { 0.95 * running + 0.05 * l };
                step += 1;
                progress(step, total, running);
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
