//! `pm-lab`: the test harness of DESIGN.md section 8; `pm-lab upstream` runs the fake vendor
//! update server used by the demo, the integration tests and the benchmarks; `pm-lab agents`
//! runs N real agents on loopback addresses.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "pm-lab",
    version,
    about = "Loopback lab: a fake upstream with fault injection, and real agents"
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
    /// Start N pm-agent processes on 127.0.0.2, .3, ... and write DIR/targets.txt; SIGINT or
    /// SIGTERM stops them
    Agents(pm::lab_agents::AgentsArgs),
    /// Serve N simulated agents in this process, each on its own loopback address with its own
    /// certificate, enrolled in the inventory of --home; SIGINT or SIGTERM stops them
    Fleet(pm::lab_fleet::FleetArgs),
    /// Time bare TLS handshakes (manager client certificate) to every active host: the
    /// baseline of the poll benchmark
    Handshakes(pm::lab_fleet::HandshakesArgs),
    /// Fill a fresh inventory in --home with simulated poll history (N hosts polled every
    /// interval for D days), checkpoint it, and print its size and the fleet views' timings
    /// as JSON (scripts/bench-history.sh)
    History {
        /// PM_HOME to create; must not hold an inventory yet
        #[arg(long)]
        home: PathBuf,
        /// Active hosts
        #[arg(long, default_value_t = 10_000)]
        hosts: usize,
        /// Days of history, ending now
        #[arg(long, default_value_t = 90)]
        days: u32,
        /// Poll interval: 300, 300s, 5m, 1h
        #[arg(long, default_value = "5m", value_parser = pm::inventory::parse_interval)]
        interval: std::time::Duration,
        /// Seed of the simulated data
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
    let json = matches!(&args.command, Command::Agents(agents) if agents.json)
        || matches!(&args.command, Command::Handshakes(handshakes) if handshakes.json);
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
                Command::Agents(agents) => pm::lab_agents::run(agents).await,
                Command::Fleet(fleet) => pm::lab_fleet::run(fleet).await,
                Command::Handshakes(handshakes) => pm::lab_fleet::handshakes(handshakes).await,
                Command::History {
                    home,
                    hosts,
                    days,
                    interval,
                    seed,
                } => {
                    if home.join(pm::inventory::INVENTORY_FILE).exists() {
                        anyhow::bail!(
                            "`{}` already holds an inventory: give a new --home",
                            home.display()
                        );
                    }
                    let spec = pm::inventory::HistorySpec {
                        hosts,
                        days,
                        interval,
                        seed,
                    };
                    let report = pm::inventory::history_benchmark(
                        &home,
                        &spec,
                        std::time::Duration::from_secs(10),
                        &mut |line| eprintln!("{line}"),
                    )?;
                    println!("{}", serde_json::to_string_pretty(&report)?);
                    Ok(pm::cli::ExitStatus::Success)
                }
            }
        })
    })();
    pm::cli::finish(result, json)
}
