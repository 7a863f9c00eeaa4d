//! `pm-query`: read-only SQL against the inventory (see `pm::query`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = pm::query::Args::parse();
    pm::cli::init_logging(&args.global);
    let json = args.output_format() == pm::query::Format::Json;
    pm::cli::finish(pm::query::run(args), json)
}
