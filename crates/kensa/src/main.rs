//! `kensa`: the inspection daemon and its tools. Wiring only: command-line parsing, logging,
//! signals and exit codes; the work is in the crates (docs/architecture.md).

mod commands;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    Run(RunArgs),
    /// Build a product's memory bank from a handful of normal images.
    Enroll(commands::EnrollArgs),
    /// Score still images against a bank; writes <stem>.json per image (and <stem>_map.npy with --maps).
    Score(kensa_eval::score::ScoreArgs),
    /// Ask about an image: the verdict first, then each --question answered by the instruction
    /// model from the facts the anomaly map gives.
    Ask(kensa_eval::ask::AskArgs),
    /// Score images in order as one camera's stream, with the daemon's learning from the line.
    Replay(kensa_eval::replay::ReplayArgs),
    /// A bank's versions: list them, or make an older one current again.
    #[command(subcommand)]
    Bank(commands::BankCmd),
    /// Write a synthetic production line data set in MVTec layout.
    Synth(commands::SynthArgs),
    /// Few-shot evaluation on MVTec-layout data: AUROC, pixel AUROC, PRO, verdict accuracy.
    Eval(kensa_eval::eval::EvalArgs),
    /// Train the language-model judge (prompt learner) on synthetic anomalies of a bank's references.
    TrainJudge(kensa_lm::judging::TrainJudgeArgs),
    /// Language-model tools (GGUF models: SmolLM2, TinyLlama, ...).
    #[command(subcommand)]
    Lm(LmCmd),
    /// Print events from a Kafka topic as JSON lines.
    Tail(kensa_publish::tail::TailArgs),
    /// Validate a config file and parse every camera's pipeline, without running (with
    /// --probe: open every camera for one frame and report what it delivers).
    Check(commands::CheckArgs),
    /// Save reference frames through a configured camera's own pipeline, to enroll from.
    Capture(kensa_capture::commission::CaptureArgs),
    /// Probe a running Kensa's health endpoint: exit 0 when it answers 200 (Docker HEALTHCHECK).
    Healthcheck {
        /// Kensa's telemetry listener.
        #[arg(long, default_value = "127.0.0.1:9898")]
        addr: String,
        /// /livez (the process serves), /readyz (model loaded and broker reachable) or /healthz.
        #[arg(long, default_value = "/livez")]
        path: String,
    },
}

#[derive(Subcommand)]
enum LmCmd {
    /// Print the greedy continuation of a prompt (or, with --chat, the model's reply to it).
    Generate(kensa_lm::generate::GenerateArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Config file (TOML); `KENSA__SECTION__KEY` environment variables override it.
    #[arg(long, value_name = "FILE", env = "KENSA_CONFIG", default_value = kensa_core::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Exit once every camera has ended and every event is acknowledged (finite sources).
    #[arg(long)]
    exit_when_done: bool,
    /// Stop by itself after this many seconds (as if sent SIGTERM).
    #[arg(long)]
    max_runtime_s: Option<u64>,
    /// Longest an orderly shutdown may take before Kensa exits anyway.
    #[arg(long, default_value_t = 30)]
    shutdown_deadline_s: u64,
}

fn init_logging(format: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KENSA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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

/// A command line clap refuses: help and version as clap prints them; an error as one JSON log
/// line when the arguments ask for `--log-format json` (log shippers parse every line), else
/// clap's text. Exit 2, as clap's own.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let args: Vec<String> = std::env::args().collect();
    let json = args.windows(2).any(|w| w[0] == "--log-format" && w[1] == "json")
        || args.iter().any(|a| a == "--log-format=json");
    if json && !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        init_logging("json");
        tracing::error!(error = %e.render().to_string().trim(), "invalid command line");
        return ExitCode::from(2);
    }
    let _ = e.print();
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

fn main() -> ExitCode {
    kensa_model::tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    init_logging(&cli.log_format);
    let json = cli.log_format == "json";
    let result = match cli.cmd {
        Cmd::Run(a) => run(&a),
        Cmd::Enroll(a) => commands::enroll(a),
        Cmd::TrainJudge(a) => kensa_lm::judging::train_judge(&a).map(|()| ExitCode::SUCCESS).map_err(Into::into),
        Cmd::Lm(LmCmd::Generate(a)) => kensa_lm::generate::run(&a).map(|()| ExitCode::SUCCESS).map_err(Into::into),
        Cmd::Score(a) => kensa_eval::score::run(&a).map(|o| ExitCode::from(o.exit_code())).map_err(Into::into),
        Cmd::Synth(a) => commands::synth(a),
        Cmd::Ask(a) => kensa_eval::ask::run(&a).map(|_| ExitCode::SUCCESS).map_err(Into::into),
        Cmd::Replay(a) => kensa_eval::replay::run(&a).map(|_| ExitCode::SUCCESS).map_err(Into::into),
        Cmd::Bank(c) => commands::bank(&c),
        Cmd::Tail(a) => kensa_publish::tail::run(&a).map(|_| ExitCode::SUCCESS).map_err(Into::into),
        Cmd::Eval(a) => kensa_eval::eval::run(&a).map(|o| ExitCode::from(o.exit_code())).map_err(Into::into),
        Cmd::Check(a) => commands::check(&a),
        Cmd::Capture(a) => commands::capture(&a),
        Cmd::Healthcheck { addr, path } => {
            kensa_telemetry::probe(&addr, &path, Duration::from_secs(5)).map(|()| ExitCode::SUCCESS).map_err(Into::into)
        }
    };
    result.unwrap_or_else(|e| {
        // With --log-format json the error is one JSON log line too, for log shippers.
        if json {
            tracing::error!(error = %format!("{e:#}"), "command failed");
        } else {
            eprintln!("error: {e:#}");
        }
        ExitCode::from(1)
    })
}

/// `kensa run`. Exit codes: 0 clean, 1 start-up error or a stage that cannot go on, 2 a camera failed or events were
/// dropped, 3 the shutdown deadline passed, 4 a second SIGTERM/SIGINT forced the exit.
fn run(a: &RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = kensa_core::config::KensaConfig::load(&a.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("kensa-rt")
        .build()
        .context("cannot start the async runtime")?;
    let opts = kensa_daemon::RunOptions {
        exit_when_done: a.exit_when_done,
        shutdown_deadline: Duration::from_secs(a.shutdown_deadline_s),
        config_path: Some(a.config.clone()),
    };
    let max_runtime = a.max_runtime_s.map(Duration::from_secs);
    let result = rt.block_on(async move {
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            signal().await;
            tracing::info!("signal received; shutting down");
            let _ = first_tx.send(());
            signal().await;
            tracing::error!("second signal: exiting now; events not yet acknowledged stay in the outbox");
            hard_exit(4);
        });
        let shutdown = async move {
            match max_runtime {
                Some(d) => {
                    tokio::select! {
                        _ = first_rx => {}
                        () = tokio::time::sleep(d) => tracing::info!("max runtime reached; shutting down"),
                    }
                }
                None => {
                    let _ = first_rx.await;
                }
            }
        };
        kensa_daemon::run(cfg, opts, shutdown).await
    });
    // A blocking task still reading a slow file must not hold the exit.
    rt.shutdown_timeout(Duration::from_secs(2));
    let summary = result?;
    if summary.deadline_passed {
        // Stages may still hold libtorch, librdkafka or GStreamer threads: exit without their
        // destructors; the outbox is already durable on disk.
        hard_exit(3);
    }
    Ok(if summary.camera_failures > 0 || summary.events_dropped > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install SIGTERM/SIGINT handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Exits at once, without atexit handlers or destructors.
#[allow(unsafe_code)]
fn hard_exit(code: i32) -> ! {
    // SAFETY: _exit takes no pointers and never returns; skipping destructors is the point.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    #[test]
    fn every_flag_of_every_command_has_help() {
        let cmd = Cli::command();
        let mut missing = Vec::new();
        for sub in cmd.get_subcommands() {
            for a in sub.get_arguments() {
                let id = a.get_id().as_str();
                if a.get_help().is_none() && a.get_long_help().is_none() && id != "help" && id != "version" {
                    missing.push(format!("kensa {} --{id}", sub.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }
}
