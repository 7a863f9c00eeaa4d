//! `pm-lab agents`: N real `pm-agent` processes on loopback addresses (127.0.0.2, .3, ...), one
//! port for all, for the demo, the integration tests and scale work. It writes `targets.txt`
//! for `pm-activate host --targets`, then keeps the agents until SIGINT or SIGTERM.
//!
//! Lab directory:
//!
//! ```text
//! agent-000/            state dir of the first agent (`pm-agent --state`), reused when initialised
//! agent-000/agent.log   its stderr
//! agent-000/pm-agent    with --own-binary: the executable this agent runs (and may replace)
//! agent-000-db/         its ClamAV database dir (beside the state dir, so `rm -r agent-000`
//!                       starts an agent over without touching the databases it installed)
//! targets.txt           `ADDR:PORT` per line, written once every agent accepts connections
//! ```
//!
//! Children never outlive `pm-lab` as long as it can run its own clean-up: on a signal, on an
//! error halfway and on a panic (a drop guard) every agent gets SIGTERM, then SIGKILL after
//! [`STOP_GRACE`]. Only `kill -9` of `pm-lab` itself leaves them running: `PR_SET_PDEATHSIG`
//! would need `unsafe` (forbidden in this crate) and the `libc` crate (not a dependency).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cli::{self, ExitStatus, UserError};

/// The agent API's default port (`pm-agent init --listen IP`).
pub const DEFAULT_PORT: u16 = 7505;

/// How long one agent may take from spawn to accepting TCP connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long agents get between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// The file of agent addresses `pm-activate host --targets` reads.
pub const TARGETS_FILE: &str = "targets.txt";

const POLL: Duration = Duration::from_millis(50);

/// `pm-lab agents` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentsArgs {
    /// How many agents to start
    #[arg(long, value_name = "N")]
    pub count: u32,
    /// Lab directory: state dirs `agent-NNN`, database dirs `agent-NNN-db`, `targets.txt`
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Address of the first agent; agent i listens on this address plus i (inside 127.0.0.0/8)
    #[arg(long, default_value = "127.0.0.2", value_name = "IPV4")]
    pub first_address: Ipv4Addr,
    /// Port of every agent (each has its own address, so one port serves all); not 0, the
    /// manager must know it
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Activation key stored by `pm-agent init` in new state dirs (`pm-activate key new --reusable`)
    #[arg(long, value_name = "FILE")]
    pub activation_key_file: Option<PathBuf>,
    /// Engine adapter of new agents (`pm-agent init --engine`)
    #[arg(long, default_value = "clamav")]
    pub engine: String,
    /// Host names are this prefix and the zero-padded index: `lab-000`, `lab-001`, ...
    #[arg(long, default_value = "lab-")]
    pub host_prefix: String,
    /// Run each agent from its own copy of pm-agent (`agent-NNN/pm-agent`, kept across
    /// restarts), so that an agent can replace its executable (`pm-push upgrade-agent`)
    #[arg(long)]
    pub own_binary: bool,
    /// Print one JSON document on stdout instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Where one lab agent lives and listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabAgent {
    /// Host name in its certificate: `<prefix>NNN`.
    pub host: String,
    /// Its API address.
    pub address: SocketAddrV4,
    /// `DIR/agent-NNN`.
    pub state_dir: PathBuf,
    /// `DIR/agent-NNN-db`.
    pub database_dir: PathBuf,
    /// `DIR/agent-NNN/agent.log`: stderr of `pm-agent run`.
    pub log_file: PathBuf,
}

/// Lays out `count` agents from `first` on: consecutive addresses, all inside 127.0.0.0/8.
pub fn plan(
    dir: &Path,
    count: u32,
    first: Ipv4Addr,
    port: u16,
    prefix: &str,
) -> Result<Vec<LabAgent>, UserError> {
    if count == 0 {
        return Err(UserError::usage("--count must be at least 1"));
    }
    if port == 0 {
        return Err(
            UserError::usage("--port 0 is not allowed: the manager must know the port").with_hint(
                format!("use the agent default --port {DEFAULT_PORT} or another free port"),
            ),
        );
    }
    if !first.is_loopback() {
        return Err(UserError::usage(format!(
            "--first-address `{first}` is not a loopback address"
        ))
        .with_hint("lab agents listen inside 127.0.0.0/8, e.g. --first-address 127.0.0.2"));
    }
    let last = u32::from(first)
        .checked_add(count - 1)
        .map(Ipv4Addr::from)
        .filter(Ipv4Addr::is_loopback);
    let Some(last) = last else {
        let room = u32::from(Ipv4Addr::new(127, 255, 255, 255)) - u32::from(first) + 1;
        return Err(UserError::usage(format!(
            "{count} agents from `{first}` on would leave 127.0.0.0/8"
        ))
        .with_hint(format!(
            "at most {room} agents fit from `{first}`: lower --count or --first-address"
        )));
    };
    tracing::debug!(%first, %last, "lab agent addresses");
    Ok((0..count)
        .map(|index| {
            let name = format!("agent-{index:03}");
            let state_dir = dir.join(&name);
            LabAgent {
                host: format!("{prefix}{index:03}"),
                address: SocketAddrV4::new(Ipv4Addr::from(u32::from(first) + index), port),
                log_file: state_dir.join("agent.log"),
                database_dir: dir.join(format!("{name}-db")),
                state_dir,
            }
        })
        .collect())
}

/// Set once SIGINT or SIGTERM arrived.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// Catches SIGINT and SIGTERM from now on (before any child exists, so that no signal
    /// kills `pm-lab` without its clean-up) and raises the flag when one arrives.
    pub fn on_signals() -> Result<StopFlag> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
        let flag = StopFlag::default();
        let raise = flag.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            raise.0.store(true, Ordering::SeqCst);
        });
        Ok(flag)
    }

    /// Whether a stop was asked for.
    pub fn raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The running agents; stops them when dropped.
struct Fleet {
    children: Vec<(LabAgent, Child)>,
}

impl Fleet {
    /// SIGTERM to every agent, SIGKILL to those still running after [`STOP_GRACE`].
    fn stop(&mut self) {
        for (agent, child) in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                terminate(child.id());
                tracing::debug!(host = %agent.host, pid = child.id(), "sent SIGTERM");
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline
            && self
                .children
                .iter_mut()
                .any(|(_, child)| matches!(child.try_wait(), Ok(None)))
        {
            std::thread::sleep(POLL);
        }
        for (agent, mut child) in self.children.drain(..) {
            if matches!(child.try_wait(), Ok(None)) {
                tracing::warn!(host = %agent.host, pid = child.id(), "agent ignored SIGTERM: killed");
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// The first agent that has exited, with its exit status.
    fn exited(&mut self) -> Option<(&LabAgent, std::process::ExitStatus)> {
        self.children
            .iter_mut()
            .find_map(|(agent, child)| match child.try_wait() {
                Ok(Some(status)) => Some((&*agent, status)),
                _ => None,
            })
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGTERM through `kill(1)`: std only sends SIGKILL and this crate forbids the `unsafe` a
/// direct `kill(2)` would take.
fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-s", "TERM", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[derive(Debug, Serialize)]
struct AgentReport<'a> {
    #[serde(flatten)]
    agent: &'a LabAgent,
    /// Whether the state dir was initialised before (activations kept).
    reused: bool,
    pid: u32,
}

/// `pm-lab agents`: starts the agents, prints them, waits for SIGINT/SIGTERM and stops them.
pub async fn run(args: AgentsArgs) -> Result<ExitStatus> {
    let stop = StopFlag::on_signals()?;
    tokio::task::spawn_blocking(move || run_blocking(&args, &stop))
        .await
        .context("the lab agents task failed")?
}

fn run_blocking(args: &AgentsArgs, stop: &StopFlag) -> Result<ExitStatus> {
    // Absolute, because `agent.toml` keeps the database dir and a reused lab compares it.
    let dir = std::path::absolute(&args.dir)
        .with_context(|| format!("cannot resolve `{}`", args.dir.display()))?;
    let agents = plan(
        &dir,
        args.count,
        args.first_address,
        args.port,
        &args.host_prefix,
    )?;
    let pm_agent = pm_agent_binary()?;
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create lab directory `{}`", dir.display()))?;
    let mut fleet = Fleet {
        children: Vec::new(),
    };
    let mut reused = Vec::new();
    for agent in &agents {
        if stop.raised() {
            return Err(UserError::failure("stopped by a signal while starting agents").into());
        }
        reused.push(init(&pm_agent, agent, args)?);
        let executable = if args.own_binary {
            own_binary(&pm_agent, agent)?
        } else {
            pm_agent.clone()
        };
        let child = spawn(&executable, agent)?;
        fleet.children.push((agent.clone(), child));
        wait_until_listening(&mut fleet, stop)?;
    }
    let targets: String = agents.iter().map(|a| format!("{}\n", a.address)).collect();
    let targets_file = dir.join(TARGETS_FILE);
    crate::durable::write_atomic(&targets_file, targets.as_bytes(), 0o644)
        .with_context(|| format!("cannot write `{}`", targets_file.display()))?;
    let reports: Vec<AgentReport> = fleet
        .children
        .iter()
        .zip(reused)
        .map(|((agent, child), reused)| AgentReport {
            agent,
            reused,
            pid: child.id(),
        })
        .collect();
    print_report(args.json, &targets_file, &reports)?;
    eprintln!(
        "{} agents running; targets in `{}`; Ctrl-C or SIGTERM stops them",
        agents.len(),
        targets_file.display()
    );
    while !stop.raised() {
        if let Some((agent, status)) = fleet.exited() {
            return Err(exited_error(agent, status).into());
        }
        std::thread::sleep(POLL);
    }
    tracing::info!("stopping lab agents");
    fleet.stop();
    Ok(ExitStatus::Success)
}

/// `PM_AGENT_BIN` (an installed pm-agent, e.g. /usr/bin/pm-agent of the package), else
/// `pm-agent` next to the running `pm-lab` (both come from one `cargo build`).
fn pm_agent_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("PM_AGENT_BIN") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .context("cannot find the running pm-lab executable")?
            .with_file_name("pm-agent"),
    };
    if !path.is_file() {
        return Err(
            UserError::failure(format!("`{}` does not exist", path.display()))
                .with_hint(
                    "build every binary (cargo build --bins), or point PM_AGENT_BIN at a pm-agent",
                )
                .into(),
        );
    }
    Ok(path)
}

/// The agent's own `agent-NNN/pm-agent`, made from `pm_agent` unless it exists (an agent that
/// upgraded itself keeps its version across lab restarts). A hard link is as good as a copy: an
/// upgrade renames a new file over the path and never writes into the old one.
fn own_binary(pm_agent: &Path, agent: &LabAgent) -> Result<PathBuf> {
    let path = agent.state_dir.join("pm-agent");
    if path.is_file() {
        return Ok(path);
    }
    if std::fs::hard_link(pm_agent, &path).is_err() {
        std::fs::copy(pm_agent, &path).with_context(|| {
            format!(
                "cannot copy `{}` to `{}`",
                pm_agent.display(),
                path.display()
            )
        })?;
    }
    Ok(path)
}

/// `pm-agent init` for a new state dir; for an initialised one (reused, activation kept) the
/// same call without the key only checks that the settings still match. Returns whether the
/// state dir was reused.
fn init(pm_agent: &Path, agent: &LabAgent, args: &AgentsArgs) -> Result<bool> {
    let reused = agent.state_dir.join(crate::agent::CONFIG_FILE).exists();
    let mut command = Command::new(pm_agent);
    command
        .arg("--state")
        .arg(&agent.state_dir)
        .args(["init", "--listen", &agent.address.to_string()])
        .args(["--engine", &args.engine, "--host-name", &agent.host])
        .arg("--database-dir")
        .arg(&agent.database_dir)
        .stdin(Stdio::null());
    if let (false, Some(key)) = (reused, &args.activation_key_file) {
        command.arg("--activation-key-file").arg(key);
    }
    let output = command
        .output()
        .with_context(|| format!("cannot run `{}`", pm_agent.display()))?;
    if !output.status.success() {
        // pm-agent printed `error: ...` and maybe `hint: ...`: fold them into ours.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let line = |prefix: &str| {
            stderr
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(str::to_owned)
        };
        let error = line("error: ").unwrap_or_else(|| stderr.trim().to_owned());
        let hint = match (reused, line("hint: ")) {
            (false, Some(hint)) => hint,
            _ => format!(
                "a lab directory keeps its layout: start with the same --first-address, --port, \
                 --engine and --host-prefix, or remove `{}`",
                args.dir.display()
            ),
        };
        return Err(
            UserError::failure(format!("`pm-agent init` failed: {error}"))
                .with_hint(hint)
                .into(),
        );
    }
    Ok(reused)
}

/// `pm-agent run` with stderr appended to the agent's log.
fn spawn(pm_agent: &Path, agent: &LabAgent) -> Result<Child> {
    // A port someone else holds would answer our readiness probe for an agent that failed.
    TcpListener::bind(agent.address).map_err(|err| {
        UserError::failure(format!("cannot listen on `{}`: {err}", agent.address))
            .with_hint("stop the other lab (or whatever holds the port) or choose another --port")
    })?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&agent.log_file)
        .with_context(|| format!("cannot open `{}`", agent.log_file.display()))?;
    Command::new(pm_agent)
        .arg("--state")
        .arg(&agent.state_dir)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start `{}`", pm_agent.display()))
}

/// Waits until the newest agent of `fleet` accepts TCP connections, at most [`START_TIMEOUT`].
fn wait_until_listening(fleet: &mut Fleet, stop: &StopFlag) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let (agent, child) = fleet
        .children
        .last_mut()
        .expect("an agent was just spawned");
    loop {
        if let Some(status) = child.try_wait().context("cannot check an agent")? {
            return Err(exited_error(agent, status).into());
        }
        if TcpStream::connect_timeout(&SocketAddr::V4(agent.address), POLL * 4).is_ok() {
            return Ok(());
        }
        if stop.raised() {
            return Err(UserError::failure("stopped by a signal while starting agents").into());
        }
        if Instant::now() >= deadline {
            return Err(UserError::failure(format!(
                "agent `{}` does not accept connections on `{}` after {}s",
                agent.host,
                agent.address,
                START_TIMEOUT.as_secs()
            ))
            .with_hint(format!("see `{}`", agent.log_file.display()))
            .into());
        }
        std::thread::sleep(POLL);
    }
}

fn exited_error(agent: &LabAgent, status: std::process::ExitStatus) -> UserError {
    UserError::failure(format!(
        "agent `{}` on `{}` exited ({status})",
        agent.host, agent.address
    ))
    .with_hint(format!("see `{}`", agent.log_file.display()))
}

fn print_report(json: bool, targets_file: &Path, reports: &[AgentReport]) -> Result<()> {
    if json {
        return cli::print_json(&serde_json::json!({
            "targets_file": targets_file,
            "agents": reports,
        }));
    }
    let mut table = cli::table(&["host", "address", "state dir"]);
    for report in reports {
        table.add_row(vec![
            report.agent.host.clone(),
            report.agent.address.to_string(),
            report.agent.state_dir.display().to_string(),
        ]);
    }
    cli::print_text(table)?;
    std::io::stdout().flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(count: u32, first: &str, port: u16, expected: Result<(&str, &str), &str>) {
        let result = plan(
            Path::new("/lab"),
            count,
            first.parse().unwrap(),
            port,
            "lab-",
        );
        match (result, expected) {
            (Ok(agents), Ok((first_address, last_address))) => {
                assert_eq!(agents.len(), count as usize);
                assert_eq!(agents[0].address.to_string(), first_address);
                assert_eq!(agents.last().unwrap().address.to_string(), last_address);
            }
            (Err(err), Err(message)) => {
                assert!(err.message.contains(message), "{}", err.message);
                assert_eq!(err.status, ExitStatus::Usage);
            }
            (result, expected) => {
                panic!("{count} from {first}:{port}: {result:?}, expected {expected:?}")
            }
        }
    }

    #[test]
    fn addresses_count_up_inside_loopback_and_never_leave_it() {
        check(
            3,
            "127.0.0.2",
            7505,
            Ok(("127.0.0.2:7505", "127.0.0.4:7505")),
        );
        check(
            300,
            "127.0.0.2",
            7505,
            Ok(("127.0.0.2:7505", "127.0.1.45:7505")),
        );
        check(
            2,
            "127.255.255.254",
            1,
            Ok(("127.255.255.254:1", "127.255.255.255:1")),
        );
        check(3, "127.255.255.254", 7505, Err("would leave 127.0.0.0/8"));
        check(3, "10.0.0.2", 7505, Err("is not a loopback address"));
        check(0, "127.0.0.2", 7505, Err("at least 1"));
        check(1, "127.0.0.2", 0, Err("--port 0"));
    }

    #[test]
    fn each_agent_gets_a_padded_name_a_state_dir_and_a_database_dir_beside_it() {
        let agents = plan(
            Path::new("/lab"),
            2,
            Ipv4Addr::new(127, 0, 0, 2),
            7505,
            "demo-",
        )
        .unwrap();
        assert_eq!(
            agents[1],
            LabAgent {
                host: "demo-001".into(),
                address: "127.0.0.3:7505".parse().unwrap(),
                state_dir: "/lab/agent-001".into(),
                database_dir: "/lab/agent-001-db".into(),
                log_file: "/lab/agent-001/agent.log".into(),
            }
        );
    }
}
