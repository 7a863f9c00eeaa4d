//! The Ansible roles and playbooks in `ansible/`, run for real by `ansible/test.sh`: ansible-core
//! and ansible-lint from PyPI (scripts/setup.sh), `--syntax-check` and ansible-lint on every
//! playbook, then site, activate, rollout, rollback and air-gap export/import against this
//! machine inside a systemd box (`scripts/systemd-box.sh`: dpkg installs the `.deb` packages
//! built from the binaries under test, systemd runs their hardened units, four agents listen on
//! 127.0.0.2-5), each run twice (the first changes, the second does not) and in check mode.
//! Then the README's demo on the packaged tools.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::bin;

#[test]
fn the_playbooks_install_activate_roll_out_roll_back_and_carry_bundles_and_a_second_run_changes_nothing()
 {
    let root = env!("CARGO_MANIFEST_DIR");
    let bin_dir = Path::new(bin("pm-mirror")).parent().unwrap();
    let output = Command::new("bash")
        .arg(format!("{root}/ansible/test.sh"))
        .arg(bin_dir)
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .expect("bash runs ansible/test.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    for expected in [
        "ansible-lint: ok",
        "site.yml (expect unchanged)",
        "rollout.yml --check (expect changed)",
        "rollback.yml -e pm_rollback_revision=r1 (expect unchanged)",
        "airgap-import.yml -e",
        "demo done with /usr/bin's tools",
        "both packages at 0.1.1~test, serve and the agents restarted and active",
        "ansible: 24 playbook runs as expected",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
}
