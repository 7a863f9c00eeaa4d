//! `pm-agent`: the daemon on every managed host (see `pm::agent`). It must not link DuckDB.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = pm::agent::Args::parse();
    pm::cli::init_logging(&args.logging());
    let json = args.json;
    pm::cli::finish(pm::agent::run(args), json)
}
