//! `svcplane`: a Kubernetes Service dataplane, drop-in for kube-proxy.

mod bench;
mod cli;
mod commands;
mod compat;
mod config;
#[cfg(test)]
mod deploy_tests;
mod dns;
mod duration;
mod lab;
mod lab_walk;
mod settings;
mod trace;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    // The lab prints its own walk (with the proxy's log lines that matter); its own
    // renders' info lines would only repeat them.
    let quiet = matches!(cli.command, Some(cli::Command::Lab(_))) && cli.verbosity() == 0;
    init_logging(if quiet { None } else { Some(cli.verbosity()) });
    match commands::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// kube-proxy's `-v N`: 0–1 info, 2–3 debug, 4+ trace. `RUST_LOG` overrides.
/// `None`: warnings only.
fn init_logging(verbosity: Option<u8>) {
    let level = match verbosity {
        None => "warn",
        Some(0 | 1) => "info",
        Some(2 | 3) => "debug",
        Some(_) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},hickory_server=warn"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colour only on a terminal: log files and CI output stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
