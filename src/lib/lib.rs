//! pm keeps a fleet of scanning hosts on fresh signature databases: a mirror of vendor updates
//! with rollback generations, a private mirror server, and (later) agents, rollouts and metrics.

pub mod activate;
pub mod agent;
pub mod bundle;
pub mod clamav;
pub mod cli;
pub mod config;
pub mod dist_statement;
pub mod doctor;
pub mod durable;
pub mod exporter;
#[cfg(test)]
mod fuzz;
pub mod hosts;
pub mod integrity;
pub mod inventory;
pub mod kit;
pub mod lab;
pub mod lab_agents;
pub mod lab_cli;
pub mod lab_fleet;
pub mod manifest;
pub mod mirror;
pub mod ownership;
pub mod pki;
pub mod poll;
pub mod profile;
pub mod proto;
pub mod push;
pub mod query;
pub mod repo;
#[cfg(test)]
mod rng;
pub mod rollback;
pub mod static_files;
pub mod targets;
pub mod tls;
