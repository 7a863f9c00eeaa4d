//! `pm-poll`: record the status of every agent (see `pm::poll`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = pm::poll::Args::parse();
    pm::cli::init_logging(&args.global);
    let json = args.global.json;
    pm::cli::finish(pm::poll::run(args), json)
}
