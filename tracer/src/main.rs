//! droptrace: which connection was refused, at which socket, by which
//! process, because of which limit, and what to change.
//!
//! Data flows one way, and the folders say so: `contract` (the records)
//! and `config` (nginx and uWSGI readers) at the bottom; `probes` (the
//! kernel) and `host` (the machine) above them; `families` (one module per
//! drop family: decode, attribute, explain) above those; `sinks` (terminal,
//! JSON, capture) next; the subcommands (`live`, `record`, `report`,
//! `doctor`, `schema`) on top. `main.rs` only wires them.
mod cli;
mod config;
mod contract;
mod doctor;
mod exporter;
mod families;
mod host;
mod live;
mod probes;
mod record;
mod report;
mod schema;
mod sinks;

use std::process::ExitCode;

use clap::Parser;
use cli::Command;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .with_env_filter(
            // The live view and record say what they attach; the one-shot
            // commands only warn.
            EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                EnvFilter::new(match args.command {
                    None | Some(Command::Record(_)) => "info",
                    Some(_) => "warn",
                })
            }),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("droptrace: error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.command {
        None => runtime.block_on(live::run(
            args.watch,
            live::Output::Terminal { json: args.json },
        )),
        Some(Command::Record(record)) => runtime.block_on(live::run(
            record.watch,
            live::Output::Capture {
                path: record.output,
                max_size: record.max_size,
            },
        )),
        Some(Command::Report(report)) => report::run(&report),
        Some(Command::Doctor(doctor)) => {
            return match doctor::run(&doctor) {
                Ok(verdict) => verdict,
                Err(err) => {
                    eprintln!("droptrace: error: {err:#}");
                    doctor::cannot_look()
                }
            }
        }
        Some(Command::Schema) => schema::print(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("droptrace: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
