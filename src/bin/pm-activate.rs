//! `pm-activate`: enrol agents (see `pm::activate`).

fn main() -> std::process::ExitCode {
    let args: pm::activate::Args = pm::cli::parse_args();
    pm::cli::init_logging(&args.global);
    let json = args.global.json;
    pm::cli::finish(pm::activate::run(args), json)
}
