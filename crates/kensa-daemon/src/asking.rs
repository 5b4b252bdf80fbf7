//! Questions about the frames the console holds (`POST /v1/frames/{event_id}/ask`): one OS
//! thread owns the instruction model (`ask.model`) and answers them in turn, within the
//! language-model budget (`judges.budget_per_s`, the bucket the judge draws on too); the frame's verdict, regions and size come
//! from the console's board.

use crate::DaemonError;
use kensa_core::config::KensaConfig;
use kensa_core::feedback::AskResult;
use kensa_core::metrics as m;
use kensa_lm::ask::{Asker, Facts, Source, Turn};
use kensa_telemetry::AskRequest;
use tokio::sync::mpsc;

/// Loads the model (an error stops start-up) and starts the thread; None when asking is off.
pub fn start(
    cfg: &KensaConfig,
    board: Option<&kensa_console::Board>,
    budget: crate::verdict::Budget,
) -> Result<Option<mpsc::Sender<AskRequest>>, DaemonError> {
    let (Some(path), Some(board)) = (cfg.ask.model.clone(), board.cloned()) else { return Ok(None) };
    let chat = kensa_lm::generate::ChatModel::load_gguf(&path, tch::Device::Cpu, tch::Kind::Float)
        .map_err(|e| DaemonError::Config(format!("ask.model: {e}")))?;
    tracing::info!(model = %path.display(), "questions about held frames: POST /v1/frames/<event id>/ask");
    let asker = Asker { chat, max_new_tokens: if cfg.ask.max_new_tokens == 0 { 48 } else { cfg.ask.max_new_tokens } };
    let (tx, mut rx) = mpsc::channel::<AskRequest>(4);
    std::thread::Builder::new()
        .name("kensa-ask".into())
        .spawn(move || {
            while let Some((event_id, q, reply)) = rx.blocking_recv() {
                let result = answer(&asker, &board, &budget, &event_id, &q);
                let label = match &result {
                    AskResult::Answered { source, .. } => source.clone(),
                    AskResult::NotHeld => "not_held".into(),
                    AskResult::Busy => "busy".into(),
                    AskResult::Failed { .. } => "failed".into(),
                };
                metrics::counter!(m::QUESTIONS, "result" => label).increment(1);
                let _ = reply.send(result);
            }
        })
        .map_err(|e| DaemonError::Stage { stage: "ask", msg: e.to_string() })?;
    Ok(Some(tx))
}

fn answer(
    asker: &Asker,
    board: &kensa_console::Board,
    budget: &crate::verdict::Budget,
    event_id: &str,
    q: &kensa_core::feedback::Question,
) -> AskResult {
    let Some(shot) = board.find(event_id) else { return AskResult::NotHeld };
    if !budget.take() {
        return AskResult::Busy;
    }
    let facts = Facts::from_parts(
        &shot.product,
        (&shot.decided.answer, shot.decided.anomalous, shot.decided.confidence, shot.decided.score),
        &shot.regions,
        shot.decision,
        (shot.image.width(), shot.image.height()),
    );
    let mut turns = vec![Asker::first(&facts)];
    turns.extend(q.history.iter().map(|e| Turn {
        question: e.question.clone(),
        answer: e.answer.clone(),
        source: Source::Model,
        tokens: 0,
        seconds: 0.0,
    }));
    match asker.ask(&facts, &turns, &q.question) {
        Ok(t) => AskResult::Answered {
            event_id: event_id.to_string(),
            verdict: facts.verdict,
            question: t.question,
            answer: t.answer,
            source: t.source.as_str().to_string(),
            tokens: t.tokens,
            seconds: t.seconds,
        },
        Err(e) => {
            tracing::error!(event_id, "cannot answer: {e}");
            AskResult::Failed { reason: e.to_string() }
        }
    }
}
