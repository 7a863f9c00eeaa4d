//! `pm-lab`'s command line: the fake vendor upstream, real and simulated agents, the history
//! benchmark, and `generate` (completions and man pages, see `kit`). The binary only parses
//! these and calls [`run`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "pm-lab",
    version,
    about = "Loopback lab: a fake upstream with fault injection, and real agents"
)]
pub struct Args {
    /// What to run
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
        #[arg(long = "fault", value_parser = crate::lab::parse_fault)]
        faults: Vec<crate::lab::Fault>,
    },
    /// Start N pm-agent processes on 127.0.0.2, .3, ... and write DIR/targets.txt; SIGINT or
    /// SIGTERM stops them
    Agents(crate::lab_agents::AgentsArgs),
    /// Serve N simulated agents in this process, each on its own loopback address with its own
    /// certificate, enrolled in the inventory of --home; SIGINT or SIGTERM stops them
    Fleet(crate::lab_fleet::FleetArgs),
    /// Time bare TLS handshakes (manager client certificate) to every active host: the
    /// baseline of the poll benchmark
    Handshakes(crate::lab_fleet::HandshakesArgs),
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
        #[arg(long, default_value = "5m", value_parser = crate::inventory::parse_interval)]
        interval: std::time::Duration,
        /// Seed of the simulated data
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Write shell completions (bash, zsh, fish) and man pages of every pm tool under --out
    /// (scripts/install.sh installs them)
    Generate {
        /// Directory to write `completions/{bash,zsh,fish}/` and `man/man1/` into
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

impl Args {
    /// Whether the command prints one JSON document (errors are then JSON too).
    pub fn json(&self) -> bool {
        matches!(&self.command, Command::Agents(agents) if agents.json)
            || matches!(&self.command, Command::Handshakes(handshakes) if handshakes.json)
    }
}

/// Runs one `pm-lab` command to completion.
pub fn run(args: Args) -> anyhow::Result<crate::cli::ExitStatus> {
    if let Command::Generate { out } = &args.command {
        let written = crate::kit::generate(out)?;
        eprintln!("wrote {} files under `{}`", written.len(), out.display());
        return Ok(crate::cli::ExitStatus::Success);
    }
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
                let testdb = testdb.unwrap_or_else(crate::lab::testdb_dir);
                let lab = crate::lab::LabUpstream::new(&testdb, version)?;
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
                let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
                    let _ = stream.set_nodelay(true);
                });
                axum::serve(listener, lab.router())
                    .with_graceful_shutdown(crate::mirror::shutdown_signal())
                    .await?;
                Ok(crate::cli::ExitStatus::Success)
            }
            Command::Agents(agents) => crate::lab_agents::run(agents).await,
            Command::Fleet(fleet) => crate::lab_fleet::run(fleet).await,
            Command::Handshakes(handshakes) => crate::lab_fleet::handshakes(handshakes).await,
            Command::Generate { .. } => unreachable!("handled before the runtime starts"),
            Command::History {
                home,
                hosts,
                days,
                interval,
                seed,
            } => {
                if home.join(crate::inventory::INVENTORY_FILE).exists() {
                    anyhow::bail!(
                        "`{}` already holds an inventory: give a new --home",
                        home.display()
                    );
                }
                let spec = crate::inventory::HistorySpec {
                    hosts,
                    days,
                    interval,
                    seed,
                };
                let report = crate::inventory::history_benchmark(
                    &home,
                    &spec,
                    std::time::Duration::from_secs(10),
                    &mut |line| eprintln!("{line}"),
                )?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(crate::cli::ExitStatus::Success)
            }
        }
    })
}
