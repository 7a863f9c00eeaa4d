//! `pm-activate`: enrol agents (see `pm::activate`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = pm::activate::Args::parse();
    pm::cli::init_logging(&args.global);
    let json = args.global.json;
    pm::cli::finish(pm::activate::run(args), json)
}
