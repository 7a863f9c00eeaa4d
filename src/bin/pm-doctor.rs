//! `pm-doctor`: checks a manager home and says what to fix (see `pm::doctor`).

fn main() -> std::process::ExitCode {
    let args: pm::doctor::Args = pm::cli::parse_args();
    pm::cli::init_logging(&args.global);
    let json = args.global.json;
    pm::cli::finish(pm::doctor::run(args), json)
}
