//! Integration tests: the real binaries against the real lab upstream, real files, real DuckDB
//! and, where the issue asks for it, the real freshclam, clamscan and duckdb CLI.

mod activate;
mod activate_host;
mod activate_setup;
mod agent;
mod agent_clamd;
mod agent_day2;
mod agent_install;
mod agent_reports;
mod agent_scan;
mod agent_schedule;
mod ansible;
mod bad_input;
mod cli;
mod dashboards;
mod dist_statement;
mod doctor;
mod exporter;
mod faults;
mod holds;
mod host_identity;
mod inventory;
mod keys;
mod keys_agents;
mod keys_mirrors;
mod kit;
mod lab_agents;
mod lab_fleet;
mod mirror_airgap;
mod mirror_chain;
mod mirror_ownership;
mod mirror_products;
mod mirror_publish;
mod mirror_repair;
mod mirror_serve;
mod mirror_status;
mod mirror_sync;
mod net_faults;
mod poll;
mod prometheus;
mod push;
mod query;
mod readme_sql;
// The seeded generator of the lib's fuzz harness, shared by file so no binary ships it.
mod retention;
#[path = "../../src/lib/rng.rs"]
#[allow(dead_code)]
mod rng;
mod rollback;
mod selection;
mod support;
mod upgrade_agent;
