//! `pm-doctor`: checks a manager home and says what to fix (see `pm::doctor`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = pm::doctor::Args::parse();
    pm::cli::init_logging(&args.global);
    let json = args.global.json;
    pm::cli::finish(pm::doctor::run(args), json)
}
