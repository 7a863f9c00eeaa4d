//! `pm-lab`: the test harness of DESIGN.md section 8; `pm-lab upstream` runs the fake vendor
//! update server used by the demo, the integration tests and the benchmarks; `pm-lab agents`
//! runs N real agents on loopback addresses; `pm-lab generate` writes completions and man
//! pages (see `pm::lab_cli`).

use std::io::IsTerminal;

fn main() -> std::process::ExitCode {
    let args: pm::lab_cli::Args = pm::cli::parse_args();
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
    let json = args.json();
    pm::cli::finish(pm::lab_cli::run(args), json)
}
