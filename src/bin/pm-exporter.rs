//! `pm-exporter`: Prometheus metrics of the inventory (see `pm::exporter`).

fn main() -> std::process::ExitCode {
    let args: pm::exporter::Args = pm::cli::parse_args();
    pm::cli::init_logging(&args.global());
    pm::cli::finish(pm::exporter::run(args), false)
}
