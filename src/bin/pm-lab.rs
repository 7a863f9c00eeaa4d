//! `pm-lab`: the test harness of DESIGN.md section 8; `pm-lab upstream` runs the fake vendor
//! update server used by the demo, the integration tests and the benchmarks.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "pm-lab",
    version,
    about = "Loopback lab: a fake upstream with fault injection"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve ClamAV's test databases (and an optional files feed) like a vendor update server
    Upstream {
        /// Address to listen on (loopback only is sensible)
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: String,
        /// ClamAV test databases [default: $PM_CLAMAV_TESTDB or ../shared/clamav-testdb]
        #[arg(long)]
        testdb: Option<PathBuf>,
        /// Test database version to start at (1..=6); move it with POST /_lab/version?n=N
        #[arg(long, default_value_t = 3)]
        version: u32,
        /// Serve every file under this directory as a `files` feed at /vendor/index.json
        #[arg(long)]
        files_dir: Option<PathBuf>,
        /// Version string of the files feed index
        #[arg(long, default_value = "1")]
        files_version: String,
        /// Inject a fault, e.g. `429:retry_after=60,path=test.cvd,times=1` (repeatable)
        #[arg(long = "fault", value_parser = pm::lab::parse_fault)]
        faults: Vec<pm::lab::Fault>,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let result = (|| -> anyhow::Result<pm::cli::ExitStatus> {
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async {
            match args.command {
                Command::Upstream {
                    listen,
                    testdb,
                    version,
                    files_dir,
                    files_version,
                    faults,
                } => {
                    let testdb = testdb.unwrap_or_else(pm::lab::testdb_dir);
                    let lab = pm::lab::LabUpstream::new(&testdb, version)?;
                    if let Some(dir) = files_dir {
                        lab.set_feed(&dir, &files_version)?;
                    }
                    for fault in faults {
                        lab.inject(fault);
                    }
                    let listener = tokio::net::TcpListener::bind(&listen).await?;
                    eprintln!(
                        "lab upstream on http://{}/ (test.cvd version {version})",
                        listener.local_addr()?
                    );
                    axum::serve(listener, lab.router())
                        .with_graceful_shutdown(pm::mirror::shutdown_signal())
                        .await?;
                    Ok(pm::cli::ExitStatus::Success)
                }
            }
        })
    })();
    pm::cli::finish(result, false)
}
