//! `kensa ask`: asks about a still image, AnomalyGPT's dialogue. The image is scored with the
//! bank; the first answer is the calibrated verdict; each `--question` is answered by the
//! instruction model from the facts the map gives (`kensa_lm::ask`).

use crate::score::engine_and_bank;
use crate::Result;
use kensa_lm::ask::{Asker, Facts, Turn};
use kensa_model::cli::ModelArgs;
use std::path::PathBuf;

#[derive(clap::Args, Clone, Debug)]
pub struct AskArgs {
    /// Bank made by `kensa enroll`.
    #[arg(long)]
    pub bank: PathBuf,
    /// The image to ask about.
    #[arg(long)]
    pub image: PathBuf,
    /// A follow-up question (repeat for a dialogue, in order).
    #[arg(long = "question")]
    pub questions: Vec<String>,
    /// The instruction model (GGUF); default `$KENSA_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
    #[arg(long, env = "KENSA_CHAT_MODEL")]
    pub chat_model: Option<PathBuf>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// Print the dialogue as JSON (facts and turns, with tokens and seconds).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The chat model's default place: where `scripts/setup.sh` puts SmolLM2.
pub fn default_chat_model() -> PathBuf {
    let home = || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kensa");
    let cache = std::env::var_os("KENSA_CACHE").map_or_else(home, PathBuf::from);
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// `kensa ask`: prints the dialogue (question, answer) and returns its turns.
pub fn run(a: &AskArgs) -> Result<Vec<Turn>> {
    let (engine, bank) = engine_and_bank(&a.model, &a.bank)?;
    let img = kensa_capture::images::load_rgb(&a.image)?;
    let map = engine.score(&[(img.as_raw().as_slice(), img.width(), img.height())], &bank)?.remove(0);
    let cal = &bank.meta.calibration;
    let (verdict, _) = kensa_verdict::judge(&map, cal);
    let facts = Facts::new(&bank.meta.product, &verdict, cal.image_threshold, (img.width(), img.height()));
    let mut turns = vec![Asker::first(&facts)];
    if !a.questions.is_empty() {
        let path = a.chat_model.clone().unwrap_or_else(default_chat_model);
        let asker = Asker {
            chat: kensa_lm::generate::ChatModel::load_gguf(&path, tch::Device::Cpu, tch::Kind::Float)?,
            max_new_tokens: a.max_new_tokens,
        };
        for q in &a.questions {
            let t = asker.ask(&facts, &turns, q)?;
            turns.push(t);
        }
    }
    if a.json {
        println!("{}", serde_json::json!({ "image": a.image, "facts": facts, "turns": turns }));
    } else {
        for t in &turns {
            println!("Q: {}\nA: {}", t.question, t.answer);
        }
    }
    Ok(turns)
}
