//! `sandbox`: the dev-box CLI. Parses arguments, calls the daemon's API, maps errors to
//! exit codes. `sandbox daemon` runs the daemon itself.

mod cli;
mod commands;
mod daemon;
mod monitor;
mod output;
mod progress;
mod stream;
mod tokens;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{ApiCommand, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Daemon { pool_size } => Err(daemon::exec_daemon(&cli, pool_size.as_deref())),
        Command::Api(ApiCommand::Openapi) => commands::print_openapi().map(|_| 0),
        _ => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                let r = rt.block_on(commands::run(&cli));
                // A read of our stdin may still block on a thread; do not wait for it.
                rt.shutdown_background();
                r
            }
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("sandbox: {e:#}");
            ExitCode::from(commands::exit_code_of(&e))
        }
    }
}
