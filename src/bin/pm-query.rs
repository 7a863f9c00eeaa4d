//! `pm-query`: read-only SQL against the inventory (see `pm::query`).

fn main() -> std::process::ExitCode {
    let args: pm::query::Args = pm::cli::parse_args();
    pm::cli::init_logging(&args.global);
    let json = args.output_format() == pm::query::Format::Json;
    pm::cli::finish(pm::query::run(args), json)
}
