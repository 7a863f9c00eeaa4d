//! `pm::lab_fleet`: simulated agents served in-process, polled by the real `pm-poll`: every
//! failure kind is told apart and recorded, an unchanged fleet polls as unchanged, and a fleet
//! of hundreds polls in bounded time.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pm::inventory::Inventory;
use pm::lab_fleet::{Behaviour, FleetSpec, RunningFleet, SimFleet};
use serde_json::Value;

use crate::support::Home;

/// A runtime serving a simulated fleet enrolled in `home`; its port is a free one.
fn serve_fleet(
    home: &Home,
    count: u32,
    first_address: Ipv4Addr,
) -> (tokio::runtime::Runtime, RunningFleet) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let spec = FleetSpec {
        count,
        first_address,
        port: 0,
        ..FleetSpec::default()
    };
    let fleet = SimFleet::enrol(home.path(), &spec).unwrap();
    let running = runtime.block_on(fleet.serve()).unwrap();
    (runtime, running)
}

/// The real `pm-poll --home HOME --json ARGS`: exit code and the JSON document.
fn poll(home: &Home, args: &[&str]) -> (i32, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_pm-poll"))
        .arg("--home")
        .arg(home.path())
        .arg("--json")
        .args(args)
        .env_remove("PM_HOME")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let document = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "stdout is not one JSON document ({err}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().unwrap_or(-1), document)
}

/// `host -> polled` of a pm-poll document.
fn polled(document: &Value) -> std::collections::BTreeMap<String, String> {
    document["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                h["polled"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn poll_tells_hang_garbage_down_and_refuse_apart_and_records_them() {
    let home = Home::new();
    let (_runtime, fleet) = serve_fleet(&home, 20, Ipv4Addr::new(127, 203, 0, 1));
    let spec = fleet.spec().clone();
    let odd = [
        (3, Behaviour::Hang, &["timeout"][..]),
        (5, Behaviour::Garbage, &["bad_response"][..]),
        (7, Behaviour::Down, &["refused", "unreachable"][..]),
        (9, Behaviour::Refuse, &["rejected"][..]),
    ];
    for (index, behaviour, _) in odd {
        fleet.set_behaviour(index, behaviour);
    }

    let started = Instant::now();
    let (code, first) = poll(&home, &["--timeout", "2s"]);
    assert!(started.elapsed() < Duration::from_secs(20), "{first}");
    assert_eq!(code, 3, "some hosts answered, some did not: {first}");
    let kinds = polled(&first);
    assert_eq!(kinds.len(), 20, "every host is listed: {first}");
    for index in 0..20 {
        let name = spec.host_name(index);
        let kind = &kinds[&name];
        match odd.iter().find(|(i, _, _)| *i == index as usize) {
            Some((_, behaviour, expected)) => {
                assert!(
                    expected.contains(&kind.as_str()),
                    "{behaviour:?} {name}: {kind}"
                )
            }
            None => assert_eq!(kind, "ok", "{name}"),
        }
    }
    assert_eq!(first["summary"]["ok"], 16);
    assert_eq!(first["summary"]["unreachable"], 4);
    // Hosts 0 and 10 scan; host 0 found EICAR.
    assert_eq!(first["summary"]["new_scans"], 2);
    assert_eq!(first["summary"]["new_findings"], 1);
    assert_eq!(first["changed"], true);

    let (code, second) = poll(&home, &["--timeout", "2s"]);
    assert_eq!(code, 3);
    assert_eq!(second["changed"], false, "nothing changed: {second}");
    assert_eq!(second["summary"]["new_scans"], 0);

    let inventory = Inventory::open_read_only(home.path(), Duration::from_secs(10))
        .unwrap()
        .unwrap();
    let rows = inventory.fleet_status(None).unwrap();
    assert_eq!(rows.len(), 20);
    for row in &rows {
        let index: usize = row.host.trim_start_matches("sim-").parse().unwrap();
        let failing = odd.iter().any(|(i, _, _)| *i == index);
        assert_eq!(row.reachable, !failing, "{row:?}");
        assert_eq!(row.error_kind.is_some(), failing, "{row:?}");
    }
    drop(inventory);

    // Back up again: the poll notices.
    fleet.set_behaviour(7, Behaviour::Ok);
    let (_, third) = poll(&home, &["--timeout", "2s"]);
    assert_eq!(polled(&third)[&spec.host_name(7)], "ok");
    assert_eq!(third["changed"], true);
}

#[test]
fn poll_of_200_simulated_hosts_finishes_in_bounded_time_and_records_200_polls() {
    let home = Home::new();
    let (_runtime, fleet) = serve_fleet(&home, 200, Ipv4Addr::new(127, 204, 0, 1));
    let started = Instant::now();
    let (code, document) = poll(&home, &[]);
    let elapsed = started.elapsed();
    assert_eq!(code, 0, "{document}");
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    assert_eq!(document["summary"]["polled"], 200);
    assert_eq!(document["summary"]["ok"], 200);
    assert_eq!(fleet.polls_answered(), 200);
    let inventory = Inventory::open_read_only(home.path(), Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert_eq!(
        inventory
            .query_strings("SELECT count(*)::VARCHAR FROM polls WHERE ok")
            .unwrap(),
        ["200"]
    );
    assert!(
        inventory
            .fleet_status(None)
            .unwrap()
            .iter()
            .all(|row| row.reachable)
    );
}
