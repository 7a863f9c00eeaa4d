//! `pm-rollback`: roll the fleet or one host back (see `pm::rollback`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = pm::rollback::Args::parse();
    pm::cli::init_logging(&args.global);
    let json = args.global.json;
    pm::cli::finish(pm::rollback::run(args), json)
}
