//! `pm-exporter`: Prometheus metrics of the inventory (see `pm::exporter`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = pm::exporter::Args::parse();
    pm::cli::init_logging(&args.global());
    pm::cli::finish(pm::exporter::run(args), false)
}
