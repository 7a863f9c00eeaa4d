//! `pm-agent`: the daemon on every managed host (see `pm::agent`). It must not link DuckDB.

fn main() -> std::process::ExitCode {
    let args: pm::agent::Args = pm::cli::parse_args();
    pm::cli::init_logging(&args.logging());
    let json = args.json;
    pm::cli::finish(pm::agent::run(args), json)
}
