//! `pm-lab agents`: real agents on 127.0.0.2.. that a manager activates in bulk from the
//! `targets.txt` the lab writes, and that never outlive the lab.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Home, Pm, free_port};

/// A running `pm-lab agents`; SIGTERM and a reap on drop so a failed assertion leaves no agent.
pub(crate) struct LabAgents {
    pub(crate) child: Child,
}

impl LabAgents {
    /// `pm-lab agents` with `extra` flags (e.g. `--own-binary`).
    pub(crate) fn start(
        dir: &Path,
        count: usize,
        port: u16,
        key_file: &Path,
        stdout: &Path,
        log: &Path,
        extra: &[&str],
    ) -> LabAgents {
        let child = Pm::new("pm-lab")
            .args([
                "agents",
                "--count",
                &count.to_string(),
                "--port",
                &port.to_string(),
                "--dir",
            ])
            .args([dir])
            .args(["--activation-key-file"])
            .args([key_file])
            .args(["--json"])
            .args(extra)
            .command()
            .stdout(std::fs::File::create(stdout).unwrap())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        LabAgents { child }
    }

    /// Waits (at most `seconds`) for the JSON report pm-lab prints once every agent runs.
    pub(crate) fn report(&mut self, stdout: &Path, log: &Path, seconds: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            let text = std::fs::read_to_string(stdout).unwrap_or_default();
            if let Ok(report) = serde_json::from_str(&text) {
                return report;
            }
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "no report (pm-lab {exited:?}):\n{text}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, as systemd or a CI runner would send it; the exit status within `limit`.
    fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let status = std::process::Command::new("kill")
            .args(["-s", "TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for LabAgents {
    fn drop(&mut self) {
        if self.child.try_wait().unwrap().is_none()
            && self.terminate(Duration::from_secs(10)).is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn accepts(address: &str) -> bool {
    let address: SocketAddr = address.parse().unwrap();
    TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
}

#[test]
fn three_lab_agents_are_activated_from_targets_and_stop_with_the_lab() {
    let home = Home::new();
    let key_file = home.path().join("lab.key");
    Pm::activate(&home)
        .args(["key", "new", "--reusable", "--out"])
        .args([&key_file])
        .json();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("lab");
    let log = work.path().join("pm-lab.log");
    let port = free_port();
    let stdout = work.path().join("pm-lab.json");
    let mut lab = LabAgents::start(&dir, 3, port, &key_file, &stdout, &log, &[]);

    // The report comes once every agent accepts connections and targets.txt is written.
    let lab_report = lab.report(&stdout, &log, 40);
    let targets = dir.join("targets.txt");
    assert_eq!(lab_report["targets_file"], targets.to_str().unwrap());
    let pids: Vec<u64> = lab_report["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "{lab_report}");
    let addresses: Vec<String> = std::fs::read_to_string(&targets)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = (2..5).map(|n| format!("127.0.0.{n}:{port}")).collect();
    assert_eq!(addresses, expected);
    assert!(addresses.iter().all(|a| accepts(a)));

    let report = Pm::activate(&home)
        .args(["host", "--targets"])
        .args([&targets])
        .args(["--key-file"])
        .args([&key_file])
        .args(["--group", "lab", "--dist-url", "http://127.0.0.1:8080"])
        .json();
    assert_eq!(report["summary"]["activated"], 3, "{report}");

    let listed = Pm::activate(&home).args(["list"]).json();
    let mut hosts: Vec<(Value, Value)> = listed["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["host"].clone(), h["address"].clone()))
        .collect();
    hosts.sort_by_key(|(host, _)| host.to_string());
    let expected_hosts: Vec<(Value, Value)> = ["lab-000", "lab-001", "lab-002"]
        .into_iter()
        .zip(&expected)
        .map(|(host, address)| (json!(host), json!(address)))
        .collect();
    assert_eq!(hosts, expected_hosts, "one host per distinct 127.0.0.x");

    let status = lab.terminate(Duration::from_secs(15));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "pm-lab stops cleanly on SIGTERM:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // pm-lab reaped its children before it exited: no process is left, no port answers.
    for pid in &pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "agent process {pid} outlived pm-lab"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while addresses.iter().any(|a| accepts(a)) {
        assert!(
            Instant::now() < deadline,
            "an agent outlived pm-lab: {addresses:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
