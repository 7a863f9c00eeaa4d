//! `pm-mirror`: mirror, publish and serve signature databases (see `pm::mirror`).

fn main() -> std::process::ExitCode {
    let args: pm::mirror::Args = pm::cli::parse_args();
    pm::cli::init_logging(&args.global);
    let json = args.global.json;
    pm::cli::finish(pm::mirror::run(args), json)
}
