//! `pm-rollback`: roll the fleet or one host back (see `pm::rollback`).

fn main() -> std::process::ExitCode {
    let args: pm::rollback::Args = pm::cli::parse_args();
    pm::cli::init_logging(&args.global);
    let json = args.global.json;
    pm::cli::finish(pm::rollback::run(args), json)
}
