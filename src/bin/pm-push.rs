//! `pm-push`: roll dist out in waves (see `pm::push`).

fn main() -> std::process::ExitCode {
    let args: pm::push::Args = pm::cli::parse_args();
    pm::cli::init_logging(&args.global);
    let json = args.global.json;
    pm::cli::finish(pm::push::run(args), json)
}
