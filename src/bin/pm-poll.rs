//! `pm-poll`: record the status of every agent (see `pm::poll`).

fn main() -> std::process::ExitCode {
    let args: pm::poll::Args = pm::cli::parse_args();
    pm::cli::init_logging(&args.global);
    let json = args.global.json;
    pm::cli::finish(pm::poll::run(args), json)
}
