//! Many hosts in one write: the lab's simulated fleet (`pm-lab fleet`) enrols thousands of hosts
//! at once, where one `INSERT` per host would keep the inventory locked for seconds.

use duckdb::types::{TimeUnit, Value};

use super::{HostRecord, Inventory, InventoryError};

/// The `hosts` columns in the order the staging table has them.
const HOST_COLUMNS: &str = "host, address, host_group, profile, labels, certificate_serial, \
     certificate_fingerprint, agent_version, engine, activated_at, activation_key_id, state, \
     deactivated_at, setup_failed, license_sha256, certificate_expires_at";

fn timestamp(time: Option<chrono::DateTime<chrono::Utc>>) -> Value {
    time.map_or(Value::Null, |t| {
        Value::Timestamp(TimeUnit::Microsecond, t.timestamp_micros())
    })
}

impl Inventory {
    /// Inserts `hosts`, replacing the rows of hosts with the same names, like
    /// [`Inventory::upsert_host`] for each but in one statement: the rows go into a staging
    /// table through the Appender, then into `hosts` at once. Call inside
    /// [`Inventory::transaction`].
    pub fn insert_hosts(&self, hosts: &[HostRecord]) -> Result<(), InventoryError> {
        self.db(self.conn.execute_batch(&format!(
            "CREATE OR REPLACE TEMP TABLE staged_hosts AS SELECT {HOST_COLUMNS} FROM hosts LIMIT 0"
        )))?;
        let mut appender = self.db(self.conn.appender("staged_hosts"))?;
        for host in hosts {
            let row: [Value; 16] = [
                Value::Text(host.host.clone()),
                Value::Text(host.address.clone()),
                Value::Text(host.group.clone()),
                Value::Text(host.profile.clone()),
                Value::Text(host.labels.clone()),
                host.certificate_serial.clone().into(),
                host.certificate_fingerprint.clone().into(),
                host.agent_version.clone().into(),
                host.engine.clone().into(),
                timestamp(host.activated_at),
                host.activation_key_id.clone().into(),
                Value::Text(host.state.clone()),
                timestamp(host.deactivated_at),
                Value::Text(host.setup_failed.clone()),
                host.license_sha256.clone().into(),
                timestamp(host.certificate_expires_at),
            ];
            self.db(appender.append_row(duckdb::appender_params_from_iter(row)))?;
        }
        self.db(appender.flush())?;
        drop(appender);
        // DuckDB's INSERT OR REPLACE cannot replace a key twice in one statement; the names are
        // distinct here, but deleting first keeps this independent of that rule.
        self.db(self.conn.execute_batch(&format!(
            "DELETE FROM hosts WHERE host IN (SELECT host FROM staged_hosts);
             INSERT INTO hosts ({HOST_COLUMNS}) SELECT {HOST_COLUMNS} FROM staged_hosts;
             DROP TABLE staged_hosts;"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, address: &str) -> HostRecord {
        HostRecord {
            group: "lab".into(),
            labels: r#"{"lab":"fleet"}"#.into(),
            certificate_serial: Some("0a".into()),
            certificate_fingerprint: Some("sha256:00".into()),
            agent_version: Some("0.1.0".into()),
            engine: Some("clamav".into()),
            activated_at: chrono::DateTime::from_timestamp_micros(1_790_000_000_123_456),
            ..HostRecord::active(name, address)
        }
    }

    #[test]
    fn insert_hosts_adds_new_rows_and_replaces_existing_ones() {
        let home = tempfile::tempdir().unwrap();
        let inventory = Inventory::open(home.path(), std::time::Duration::from_secs(5)).unwrap();
        inventory
            .upsert_host(&host("sim-00000", "127.1.0.1:1"))
            .unwrap();
        let hosts = vec![
            host("sim-00000", "127.1.0.1:7600"),
            host("sim-00001", "127.1.0.2:7600"),
        ];
        inventory
            .transaction(|inv| inv.insert_hosts(&hosts))
            .unwrap();
        assert_eq!(inventory.hosts().unwrap(), hosts);
    }
}
