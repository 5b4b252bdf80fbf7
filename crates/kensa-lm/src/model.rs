//! The decoder. Weights are kept in the layout of `nn.Linear` (`[out, in]`); rotary embeddings
//! rotate interleaved pairs `(2i, 2i+1)` of each head, as Meta's and llama2.c's checkpoints
//! expect. Hugging Face checkpoints store `q_proj`/`k_proj` permuted for their "rotate half"
//! formulation; [`Llama::load_hf`] undoes that permutation so one code path serves both. GGUF
//! files (llama.cpp) store them interleaved already ([`Llama::load_gguf`]).

use crate::{LmError, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub dim: i64,
    pub hidden_dim: i64,
    pub n_layers: i64,
    pub n_heads: i64,
    pub n_kv_heads: i64,
    pub vocab_size: i64,
    pub seq_len: i64,
    pub norm_eps: f64,
    pub rope_theta: f64,
}

impl Config {
    pub fn head_size(&self) -> i64 {
        self.dim / self.n_heads
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.dim <= 0 || self.n_heads <= 0 || self.n_kv_heads <= 0 || self.n_layers <= 0 || self.hidden_dim <= 0 {
            return Err(format!("non-positive sizes in {self:?}"));
        }
        if self.dim % self.n_heads != 0 || self.n_heads % self.n_kv_heads != 0 || self.head_size() % 2 != 0 {
            return Err(format!("inconsistent head sizes in {self:?}"));
        }
        if self.vocab_size <= 0 || self.seq_len <= 0 {
            return Err(format!("bad vocab_size/seq_len in {self:?}"));
        }
        Ok(())
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
}

pub struct Llama {
    pub config: Config,
    pub device: Device,
    pub kind: Kind,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    classifier: Tensor,
    cos: Tensor,
    sin: Tensor,
}

/// Keys and values of every position seen so far, per layer: `[batch, n_kv_heads, len,
/// head_size]` (batch 1 for single sequences).
pub struct KvCache {
    k: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    pub len: i64,
}

impl KvCache {
    pub fn new(config: &Config) -> Self {
        let n = config.n_layers as usize;
        Self { k: (0..n).map(|_| None).collect(), v: (0..n).map(|_| None).collect(), len: 0 }
    }

    /// The same keys and values seen by `batch` sequences (a view, no copy): a constant
    /// prefix computed once for a batch that continues it.
    pub fn expand(&self, batch: i64) -> Self {
        let ex = |t: &Option<Tensor>| t.as_ref().map(|t| t.expand([batch, -1, -1, -1], false));
        Self { k: self.k.iter().map(ex).collect(), v: self.v.iter().map(ex).collect(), len: self.len }
    }
}

fn read_i32s(b: &[u8], n: usize) -> Vec<i32> {
    (0..n).map(|i| i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap())).collect()
}

impl Llama {
    /// Loads a llama2.c checkpoint (`run.c` format, version 0): a header of 7 int32, then
    /// float32 tensors; a negative vocab size means the classifier is stored separately.
    pub fn load_llama2c(path: &Path, device: Device) -> Result<Self> {
        let err = |msg: String| LmError::File { path: path.to_path_buf(), msg };
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        if bytes.len() < 28 {
            return Err(err("too short for a llama2.c header".into()));
        }
        let h = read_i32s(&bytes, 7);
        let shared = h[5] > 0;
        let config = Config {
            dim: h[0] as i64,
            hidden_dim: h[1] as i64,
            n_layers: h[2] as i64,
            n_heads: h[3] as i64,
            n_kv_heads: h[4] as i64,
            vocab_size: (h[5] as i64).abs(),
            seq_len: h[6] as i64,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
        };
        config.check().map_err(err)?;
        let (d, hd, l, v, s) = (config.dim, config.hidden_dim, config.n_layers, config.vocab_size, config.seq_len);
        let kv = config.n_kv_heads * config.head_size();
        let hs = config.head_size();
        let floats = &bytes[28..];
        let mut need = v * d + l * d + l * d * d + 2 * l * kv * d + l * d * d + l * d + 3 * l * hd * d + d + s * hs;
        if !shared {
            need += v * d;
        }
        if (floats.len() as i64) < need * 4 {
            return Err(err(format!(
                "holds {} bytes of weights, the header implies at least {}",
                floats.len(),
                need * 4
            )));
        }
        let mut off = 0usize;
        let mut take = |shape: &[i64]| -> Tensor {
            let n: i64 = shape.iter().product();
            let t = Tensor::from_data_size(&floats[off..off + 4 * n as usize], shape, Kind::Float);
            off += 4 * n as usize;
            t
        };
        let embed = take(&[v, d]);
        let rms_att = take(&[l, d]);
        let wq = take(&[l, d, d]);
        let wk = take(&[l, kv, d]);
        let wv = take(&[l, kv, d]);
        let wo = take(&[l, d, d]);
        let rms_ffn = take(&[l, d]);
        let w1 = take(&[l, hd, d]);
        let w2 = take(&[l, d, hd]);
        let w3 = take(&[l, hd, d]);
        let norm = take(&[d]);
        let _freq_real = take(&[s, hs / 2]);
        let _freq_imag = take(&[s, hs / 2]);
        let classifier = if shared { embed.shallow_clone() } else { take(&[v, d]) };
        let layers = (0..l)
            .map(|i| Layer {
                attn_norm: rms_att.get(i),
                wq: wq.get(i),
                wk: wk.get(i),
                wv: wv.get(i),
                wo: wo.get(i),
                ffn_norm: rms_ffn.get(i),
                w1: w1.get(i),
                w2: w2.get(i),
                w3: w3.get(i),
            })
            .collect();
        Ok(Self::assemble(config, embed, layers, norm, classifier, device, Kind::Float))
    }

    /// Loads a Hugging Face-layout LLaMA (LLaMA, Vicuna, TinyLlama, ...): `config.json` and one
    /// or more `*.safetensors` files in `dir`. Weights are converted to `kind` on `device`
    /// (fp16/bf16 on a GPU halve the memory: a 7B model needs ~14 GB in fp16).
    pub fn load_hf(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let err = |msg: String| LmError::File { path: dir.to_path_buf(), msg };
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("config.json")).map_err(|e| err(format!("config.json: {e}")))?,
        )
        .map_err(|e| err(format!("config.json: {e}")))?;
        let int = |k: &str| cfg.get(k).and_then(serde_json::Value::as_i64);
        let dim = int("hidden_size").ok_or_else(|| err("config.json: no hidden_size".into()))?;
        let n_heads = int("num_attention_heads").ok_or_else(|| err("config.json: no num_attention_heads".into()))?;
        let config = Config {
            dim,
            hidden_dim: int("intermediate_size").ok_or_else(|| err("config.json: no intermediate_size".into()))?,
            n_layers: int("num_hidden_layers").ok_or_else(|| err("config.json: no num_hidden_layers".into()))?,
            n_heads,
            n_kv_heads: int("num_key_value_heads").unwrap_or(n_heads),
            vocab_size: int("vocab_size").ok_or_else(|| err("config.json: no vocab_size".into()))?,
            seq_len: int("max_position_embeddings").unwrap_or(2048),
            norm_eps: cfg.get("rms_norm_eps").and_then(serde_json::Value::as_f64).unwrap_or(1e-6),
            rope_theta: cfg.get("rope_theta").and_then(serde_json::Value::as_f64).unwrap_or(10000.0),
        };
        config.check().map_err(err)?;
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| err(e.to_string()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(err("no *.safetensors files".into()));
        }
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for f in &files {
            for (name, t) in Tensor::read_safetensors(f).map_err(|e| err(format!("{}: {e}", f.display())))? {
                tensors.insert(name, t.to_kind(Kind::Float));
            }
        }
        let mut get = |name: &str| tensors.remove(name).ok_or_else(|| err(format!("missing tensor {name}")));
        let (hs, nh, nkv) = (config.head_size(), config.n_heads, config.n_kv_heads);
        // HF's q/k rows are grouped as [head][half][pair index]; back to interleaved pairs.
        let unpermute = |w: Tensor, heads: i64| -> Tensor {
            let cols = w.size()[1];
            w.view([heads, 2, hs / 2, cols]).transpose(1, 2).reshape([heads * hs, cols])
        };
        let embed = get("model.embed_tokens.weight")?;
        let mut layers = Vec::new();
        for i in 0..config.n_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: get(&format!("{p}.input_layernorm.weight"))?,
                wq: unpermute(get(&format!("{p}.self_attn.q_proj.weight"))?, nh),
                wk: unpermute(get(&format!("{p}.self_attn.k_proj.weight"))?, nkv),
                wv: get(&format!("{p}.self_attn.v_proj.weight"))?,
                wo: get(&format!("{p}.self_attn.o_proj.weight"))?,
                ffn_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                w1: get(&format!("{p}.mlp.gate_proj.weight"))?,
                w2: get(&format!("{p}.mlp.down_proj.weight"))?,
                w3: get(&format!("{p}.mlp.up_proj.weight"))?,
            });
        }
        let norm = get("model.norm.weight")?;
        let classifier = match get("lm_head.weight") {
            Ok(t) => t,
            Err(_) => embed.shallow_clone(), // tied embeddings
        };
        Ok(Self::assemble(config, embed, layers, norm, classifier, device, kind))
    }

    /// Loads a LLaMA-architecture GGUF file (llama.cpp's format: SmolLM2, TinyLlama, ...),
    /// dequantizing every tensor and converting it to `kind` on `device`. llama.cpp's converter
    /// stores `attn_q`/`attn_k` in Meta's interleaved-pair rotary layout (it permutes Hugging
    /// Face's "rotate half" rows back), which is this decoder's own layout: no permutation is
    /// needed. Without `output.weight` the classifier is the token embedding (tied).
    pub fn load_gguf(g: &crate::gguf::Gguf, device: Device, kind: Kind) -> Result<Self> {
        let err = |msg: String| LmError::File { path: g.path.clone(), msg: format!("GGUF: {msg}") };
        let arch = g.str("general.architecture")?;
        if arch != "llama" {
            return Err(err(format!("general.architecture is {arch:?}; only \"llama\" is supported")));
        }
        let int = |k: &str| g.u64(&format!("llama.{k}")).map(|v| v as i64);
        let float = |k: &str| g.get(&format!("llama.{k}")).and_then(crate::gguf::Value::as_f64);
        let n_heads = int("attention.head_count")?;
        let embd = g.info("token_embd.weight").ok_or_else(|| err("missing tensor token_embd.weight".into()))?;
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => embd.shape()[0],
        };
        let config = Config {
            dim: int("embedding_length")?,
            hidden_dim: int("feed_forward_length")?,
            n_layers: int("block_count")?,
            n_heads,
            n_kv_heads: int("attention.head_count_kv").unwrap_or(n_heads),
            vocab_size,
            seq_len: int("context_length").unwrap_or(2048),
            norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: float("rope.freq_base").unwrap_or(10000.0),
        };
        config.check().map_err(err)?;
        if let Ok(rd) = int("rope.dimension_count") {
            if rd != config.head_size() {
                return Err(err(format!(
                    "partial rotary embeddings ({rd} of {}) are not supported",
                    config.head_size()
                )));
            }
        }
        if g.get("llama.rope.scaling.type").and_then(crate::gguf::Value::as_str).is_some_and(|t| t != "none") {
            return Err(err("rotary scaling (llama.rope.scaling.type) is not supported".into()));
        }
        let (d, hd, v) = (config.dim, config.hidden_dim, config.vocab_size);
        let kv = config.n_kv_heads * config.head_size();
        let embed = g.tensor_shaped("token_embd.weight", &[v, d])?;
        let mut layers = Vec::new();
        for i in 0..config.n_layers {
            let t = |name: &str, shape: &[i64]| g.tensor_shaped(&format!("blk.{i}.{name}.weight"), shape);
            layers.push(Layer {
                attn_norm: t("attn_norm", &[d])?,
                wq: t("attn_q", &[d, d])?,
                wk: t("attn_k", &[kv, d])?,
                wv: t("attn_v", &[kv, d])?,
                wo: t("attn_output", &[d, d])?,
                ffn_norm: t("ffn_norm", &[d])?,
                w1: t("ffn_gate", &[hd, d])?,
                w2: t("ffn_down", &[d, hd])?,
                w3: t("ffn_up", &[hd, d])?,
            });
        }
        let norm = g.tensor_shaped("output_norm.weight", &[d])?;
        let classifier = match g.info("output.weight") {
            Some(_) => g.tensor_shaped("output.weight", &[v, d])?,
            None => embed.shallow_clone(),
        };
        Ok(Self::assemble(config, embed, layers, norm, classifier, device, kind))
    }

    /// Writes this model in Hugging Face layout (`config.json` + `model.safetensors`, fp32),
    /// with q/k permuted as HF's conversion script does. Used to test [`Llama::load_hf`].
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let err = |msg: String| LmError::File { path: dir.to_path_buf(), msg };
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let c = &self.config;
        let hs = c.head_size();
        let permute = |w: &Tensor, heads: i64| -> Tensor {
            let cols = w.size()[1];
            w.view([heads, hs / 2, 2, cols]).transpose(1, 2).reshape([heads * hs, cols])
        };
        let cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let mut named: Vec<(String, Tensor)> = vec![
            ("model.embed_tokens.weight".into(), cpu(&self.embed)),
            ("model.norm.weight".into(), cpu(&self.norm)),
            ("lm_head.weight".into(), cpu(&self.classifier)),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            named.push((format!("{p}.input_layernorm.weight"), cpu(&l.attn_norm)));
            named.push((format!("{p}.self_attn.q_proj.weight"), cpu(&permute(&l.wq, c.n_heads))));
            named.push((format!("{p}.self_attn.k_proj.weight"), cpu(&permute(&l.wk, c.n_kv_heads))));
            named.push((format!("{p}.self_attn.v_proj.weight"), cpu(&l.wv)));
            named.push((format!("{p}.self_attn.o_proj.weight"), cpu(&l.wo)));
            named.push((format!("{p}.post_attention_layernorm.weight"), cpu(&l.ffn_norm)));
            named.push((format!("{p}.mlp.gate_proj.weight"), cpu(&l.w1)));
            named.push((format!("{p}.mlp.down_proj.weight"), cpu(&l.w2)));
            named.push((format!("{p}.mlp.up_proj.weight"), cpu(&l.w3)));
        }
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, dir.join("model.safetensors")).map_err(|e| err(e.to_string()))?;
        let cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": c.dim,
            "intermediate_size": c.hidden_dim,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.seq_len,
            "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,
            "tie_word_embeddings": false,
        });
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap())
            .map_err(|e| err(e.to_string()))
    }

    fn assemble(
        config: Config,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        classifier: Tensor,
        device: Device,
        kind: Kind,
    ) -> Self {
        let mv = |t: Tensor| t.to_device(device).to_kind(kind);
        let layers = layers
            .into_iter()
            .map(|l| Layer {
                attn_norm: mv(l.attn_norm),
                wq: mv(l.wq),
                wk: mv(l.wk),
                wv: mv(l.wv),
                wo: mv(l.wo),
                ffn_norm: mv(l.ffn_norm),
                w1: mv(l.w1),
                w2: mv(l.w2),
                w3: mv(l.w3),
            })
            .collect();
        // Rotary tables in fp32: angle(pos, i) = pos / theta^(2i / head_size).
        let hs = config.head_size();
        let inv: Vec<f32> =
            (0..hs / 2).map(|i| (1.0 / config.rope_theta.powf((2 * i) as f64 / hs as f64)) as f32).collect();
        let inv = Tensor::from_slice(&inv);
        let pos = Tensor::arange(config.seq_len, (Kind::Float, Device::Cpu));
        let ang = pos.unsqueeze(1) * inv.unsqueeze(0);
        Self {
            embed: mv(embed),
            layers,
            norm: mv(norm),
            classifier: mv(classifier),
            cos: ang.cos().to_device(device),
            sin: ang.sin().to_device(device),
            device,
            kind,
            config,
        }
    }

    /// Token embeddings `[T, dim]` of `tokens`, e.g. to splice learned embeddings between them.
    pub fn embed_tokens(&self, tokens: &[i64]) -> Tensor {
        let ids = Tensor::from_slice(tokens).to_device(self.device);
        self.embed.index_select(0, &ids)
    }

    /// The model width (embedding size) and the tensor kind inputs must have.
    pub fn width(&self) -> i64 {
        self.config.dim
    }

    fn rms(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let ms = xf.square().mean_dim(-1, true, Kind::Float);
        (xf * (ms + self.config.norm_eps).rsqrt()).to_kind(self.kind) * w
    }

    /// Interleaved rotary embedding of `x: [B, T, heads, head_size]` at positions
    /// `start..start+T`.
    fn rope(&self, x: &Tensor, start: i64) -> Tensor {
        let (b, t, h, hs) = x.size4().expect("[B, T, heads, head_size]");
        let cos = self.cos.narrow(0, start, t).view([t, 1, hs / 2]);
        let sin = self.sin.narrow(0, start, t).view([t, 1, hs / 2]);
        let xf = x.to_kind(Kind::Float).view([b, t, h, hs / 2, 2]);
        let x0 = xf.select(4, 0);
        let x1 = xf.select(4, 1);
        let r0 = &x0 * &cos - &x1 * &sin;
        let r1 = &x0 * &sin + &x1 * &cos;
        Tensor::stack(&[r0, r1], 4).view([b, t, h, hs]).to_kind(self.kind)
    }

    /// Runs `embeds: [T, dim]` at positions `cache.len..cache.len+T`, appending to the cache.
    /// Returns the logits of every position, `[T, vocab]` (fp32).
    pub fn forward_embeds(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let h = self.hidden(&embeds.unsqueeze(0), cache)?.squeeze_dim(0);
        Ok(self.logits(&h, None))
    }

    /// The final (normed) hidden states `[B, T, dim]` of a batch of sequences `embeds: [B, T,
    /// dim]` at positions `cache.len..cache.len+T`, appending to the cache (whose batch must be
    /// `B`, or empty). Gradients flow to `embeds` unless called under `no_grad`. Sequences of
    /// different lengths are right-padded: a position never sees the ones after it.
    pub fn hidden(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let x = self.layers_forward(embeds, cache)?;
        Ok(self.rms(&x, &self.norm))
    }

    /// Logits (fp32) of hidden states `h: [.., dim]`: over the whole vocabulary, or over
    /// `only` these token ids (in that order), which is much cheaper when few are allowed.
    pub fn logits(&self, h: &Tensor, only: Option<&[i64]>) -> Tensor {
        match only {
            None => h.matmul(&self.classifier.tr()).to_kind(Kind::Float),
            Some(ids) => {
                let rows = self.classifier.index_select(0, &Tensor::from_slice(ids).to_device(self.device));
                h.matmul(&rows.tr()).to_kind(Kind::Float)
            }
        }
    }

    // `x = x + ...` on purpose: `+=` on a tch tensor is an in-place add (see below).
    #[allow(clippy::assign_op_pattern)]
    fn layers_forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = embeds.size3().map_err(|e| LmError::Decode(format!("embeddings must be [B, T, dim]: {e}")))?;
        let start = cache.len;
        if start + t > c.seq_len {
            return Err(LmError::Decode(format!("sequence of {} tokens exceeds the model's {}", start + t, c.seq_len)));
        }
        let (hs, nh, nkv) = (c.head_size(), c.n_heads, c.n_kv_heads);
        let group = nh / nkv;
        let mut x = embeds.to_device(self.device).to_kind(self.kind);
        // Causal mask for the new queries against all keys (old ones always visible).
        let total = start + t;
        let qpos = Tensor::arange_start(start, total, (Kind::Int64, self.device)).unsqueeze(1);
        let kpos = Tensor::arange(total, (Kind::Int64, self.device)).unsqueeze(0);
        let mask = kpos.gt_tensor(&qpos); // [T, total]: true where masked
        let scale = 1.0 / (hs as f64).sqrt();
        for (i, l) in self.layers.iter().enumerate() {
            let xb = self.rms(&x, &l.attn_norm);
            let q = self.rope(&xb.matmul(&l.wq.tr()).view([b, t, nh, hs]), start);
            let k = self.rope(&xb.matmul(&l.wk.tr()).view([b, t, nkv, hs]), start);
            let v = xb.matmul(&l.wv.tr()).view([b, t, nkv, hs]);
            let (k, v) = (k.transpose(1, 2), v.transpose(1, 2)); // [B, nkv, T, hs]
            let k_all = match cache.k[i].take() {
                Some(prev) => Tensor::cat(&[prev, k], 2),
                None => k,
            };
            let v_all = match cache.v[i].take() {
                Some(prev) => Tensor::cat(&[prev, v], 2),
                None => v,
            };
            let kq = k_all.repeat_interleave_self_int(group, Some(1), None::<i64>); // [B, nh, total, hs]
            let vq = v_all.repeat_interleave_self_int(group, Some(1), None::<i64>);
            let qh = q.transpose(1, 2); // [B, nh, T, hs]
            let scores = qh.to_kind(Kind::Float).matmul(&kq.to_kind(Kind::Float).transpose(2, 3)) * scale;
            let att = scores.masked_fill(&mask, f64::NEG_INFINITY).softmax(-1, Kind::Float);
            let out = att.to_kind(self.kind).matmul(&vq).transpose(1, 2).reshape([b, t, c.dim]);
            // Not `+=`: on a tch tensor that is an in-place add, which breaks the autograd graph
            // the judge's training backpropagates through.
            x = x + out.matmul(&l.wo.tr());
            let xb = self.rms(&x, &l.ffn_norm);
            let hb = xb.matmul(&l.w1.tr()).silu() * xb.matmul(&l.w3.tr());
            x = x + hb.matmul(&l.w2.tr());
            cache.k[i] = Some(k_all);
            cache.v[i] = Some(v_all);
        }
        cache.len = total;
        Ok(x)
    }

    /// Runs `tokens` (see [`Llama::forward_embeds`]).
    pub fn forward_tokens(&self, tokens: &[i64], cache: &mut KvCache) -> Result<Tensor> {
        self.forward_embeds(&self.embed_tokens(tokens), cache)
    }

    /// Greedy decoding: feeds `prompt` (embeddings), then the argmax token up to `steps` times.
    /// `allowed(prefix)` constrains each step: `None` leaves it free, `Some(ids)` restricts it
    /// to `ids`, and `Some(empty)` ends decoding (e.g. a whole answer). Stops at `eos` too.
    /// Deterministic: the same input always gives the same ids.
    pub fn greedy(
        &self,
        prompt: &Tensor,
        steps: usize,
        eos: Option<i64>,
        mut allowed: impl FnMut(&[i64]) -> Option<Vec<i64>>,
    ) -> Result<Vec<i64>> {
        let mut cache = KvCache::new(&self.config);
        let mut logits = self.forward_embeds(prompt, &mut cache)?;
        let mut out = Vec::new();
        for _ in 0..steps {
            let last = logits.get(logits.size()[0] - 1);
            let next = match allowed(&out) {
                None => last.argmax(0, false).int64_value(&[]),
                Some(choice) if choice.is_empty() => break,
                Some(choice) => {
                    let ids = Tensor::from_slice(&choice).to_device(self.device);
                    let best = last.index_select(0, &ids).argmax(0, false).int64_value(&[]);
                    choice[best as usize]
                }
            };
            out.push(next);
            if Some(next) == eos || cache.len >= self.config.seq_len {
                break;
            }
            logits = self.forward_tokens(&[next], &mut cache)?;
        }
        Ok(out)
    }
}
