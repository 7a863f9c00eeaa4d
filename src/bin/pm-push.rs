//! `pm-push`: roll dist out in waves (see `pm::push`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = pm::push::Args::parse();
    pm::cli::init_logging(&args.global);
    let json = args.global.json;
    pm::cli::finish(pm::push::run(args), json)
}
