//! `kensa`: the inspection daemon and its tools. Wiring only; the work is in the crates.

mod commands;
mod deliver;
mod eval;
mod judge;
mod overlay;
mod reload;
mod run;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "kensa", version, about = "Few-shot, thresholdless visual inspection for production lines")]
struct Cli {
    /// Log format on stderr: text or json.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: cameras → scoring → verdicts → Kafka, with /metrics and /healthz.
    Run(run::RunArgs),
    /// Build a product's memory bank from a handful of normal images.
    Enroll(commands::EnrollArgs),
    /// Score still images against a bank; writes <stem>.json and <stem>_map.npy per image.
    Score(commands::ScoreArgs),
    /// Write a synthetic production line data set in MVTec layout.
    Synth(commands::SynthArgs),
    /// Few-shot evaluation on MVTec-layout data: AUROC, pixel AUROC, PRO, verdict accuracy.
    Eval(eval::EvalArgs),
    /// Train the language-model judge (prompt learner) on synthetic anomalies of a bank's references.
    TrainJudge(judge::TrainJudgeArgs),
    /// Print events from a Kafka topic as JSON lines.
    Tail(commands::TailArgs),
    /// Validate a config file and parse every camera's pipeline, without running.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KENSA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> ExitCode {
    kensa_model::tune_allocator();
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let result = match cli.cmd {
        Cmd::Run(a) => run::main(a),
        Cmd::Enroll(a) => commands::enroll(a),
        Cmd::TrainJudge(a) => judge::train_judge(a),
        Cmd::Score(a) => commands::score(a),
        Cmd::Synth(a) => commands::synth(a),
        Cmd::Tail(a) => commands::tail(a),
        Cmd::Eval(a) => eval::main(a),
        Cmd::Check { config } => commands::check(&config),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
