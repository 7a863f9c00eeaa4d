#!/usr/bin/env bash
# Runs the roles and playbooks for real, twice each: the first run must change something, the
# second nothing (Ansible's PLAY RECAP), and --check must report without changing. The target is
# this machine inside a systemd box (scripts/systemd-box.sh: systemd as PID 1, /usr /etc /var
# as throwaway overlays) where dpkg installs the packages built from BIN_DIR and systemd runs
# the hardened units; a pm-lab upstream on loopback serves ClamAV's signed test databases; four
# agents (pm-agent@a..c on 127.0.0.2-4, pm-agent.service on 127.0.0.5). Then the README's demo
# runs on the packaged tools. Needs root.
#
#   ansible/test.sh [BIN_DIR]      (default: target/debug; it must hold pm-lab too)
#
# PM_TEST_DEBS=DIR takes the packages from DIR (scripts/package-deb.sh --out DIR) instead.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin_dir="$(cd "${1:-${root}/target/debug}" && pwd)"
ansible_bin="${root}/.cache/ansible/bin"
[[ -x "${ansible_bin}/ansible-playbook" ]] || { echo "error: no Ansible in ${ansible_bin}" >&2; echo "hint: run scripts/setup.sh" >&2; exit 2; }

# Not under /usr, /etc or /var: the box's overlays would keep what it writes there from us.
mkdir -p "${root}/target"
work="$(mktemp -d "${root}/target/ansible-test.XXXXXX")"
box="${work}/box"
pids=()
cleanup() {
  "${root}/scripts/systemd-box.sh" stop "${box}" || true
  for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "${pid}" 2>/dev/null || true; done
  rm -rf "${work}"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
in_box() { "${root}/scripts/systemd-box.sh" run "${box}" "$@"; }

export PATH="${ansible_bin}:${PATH}"
if [[ -n "${PM_TEST_DEBS:-}" ]]; then
  step "packages from ${PM_TEST_DEBS}"
  debs=("${PM_TEST_DEBS}"/pm-manager_*.deb "${PM_TEST_DEBS}"/pm-agent_*.deb)
else
  step "packages from ${bin_dir}"
  mapfile -t debs < <("${root}/scripts/package-deb.sh" --fast --bin-dir "${bin_dir}" --out "${work}/debs")
fi
manager_deb="${debs[0]}"
agent_deb="${debs[1]}"
[[ "${manager_deb}" == *pm-manager_* && "${agent_deb}" == *pm-agent_* ]] || fail "package-deb.sh printed ${debs[*]}"

upstream_port="$(free_port)"
"${bin_dir}/pm-lab" upstream --listen "127.0.0.1:${upstream_port}" --version 3 2>"${work}/upstream.log" &
pids+=($!)
for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:${upstream_port}/clamav/test.cvd" && break; sleep 0.1; done

serve_port="$(free_port)"
exporter_port="$(free_port)"
agent_port="$(free_port)"
mkdir -p "${work}/airgap"
# Every "host" is this machine (inside the box), reached without SSH.
local_hosts='all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: /usr/bin/python3
  children:'
cat > "${work}/inventory.yml" <<YAML
${local_hosts}
    pm_managers:
      hosts:
        manager:
          pm_manager_deb: ${manager_deb}
          pm_manager_products:
            - {name: clamav, kind: clamav, url: "http://127.0.0.1:${upstream_port}/clamav", databases: [test]}
          pm_manager_config:
            serve: {url: "http://127.0.0.1:${serve_port}"}
          pm_manager_serve_listen: "127.0.0.1:${serve_port}"
          pm_manager_exporter_listen: "127.0.0.1:${exporter_port}"
          pm_manager_exporter_allow: [127.0.0.0/8]
    pm_agents:
      vars:
        pm_agent_deb: ${agent_deb}
        pm_agent_group: lab
      hosts:
        agent-a: {pm_agent_instance: a, pm_agent_listen: "127.0.0.2:${agent_port}", pm_agent_address: "127.0.0.2:${agent_port}", pm_agent_labels: [rack=r1]}
        agent-b: {pm_agent_instance: b, pm_agent_listen: "127.0.0.3:${agent_port}", pm_agent_address: "127.0.0.3:${agent_port}"}
        agent-c: {pm_agent_instance: c, pm_agent_listen: "127.0.0.4:${agent_port}", pm_agent_address: "127.0.0.4:${agent_port}"}
        # The one agent of a host: pm-agent.service, /var/lib/pm-agent, /var/lib/clamav.
        agent-d: {pm_agent_listen: "127.0.0.5:${agent_port}", pm_agent_address: "127.0.0.5:${agent_port}"}
YAML
# The closed network's own inventory: a manager without services, fed only by bundles.
cat > "${work}/closed.yml" <<YAML
${local_hosts}
    pm_managers:
      hosts:
        closed:
          pm_manager_deb: ${manager_deb}
          pm_manager_home: /var/lib/pm-closed
          pm_manager_services: false
YAML

# Runs a playbook in the box; $1 = what the recap must show: changed (some change, no failure),
# unchanged (changed=0 everywhere), failed (some failure). The rest are ansible-playbook args.
playbook() {
  local expect="$1"; shift
  local log="${work}/run-$((++runs)).log"
  echo "ansible-playbook $* (expect ${expect})"
  local code=0
  # One host at a time: the test agents share this machine's dpkg lock (real hosts do not).
  (cd "${root}/ansible" && in_box env ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1 ANSIBLE_FORKS=1 \
    ANSIBLE_LOCAL_TEMP="${work}/ansible-tmp" "${ansible_bin}/ansible-playbook" "$@") >"${log}" 2>&1 || code=$?
  local recap
  recap="$(sed -n '/^PLAY RECAP/,$p' "${log}")"
  local changed failed
  changed="$(grep -o ' changed=[0-9]*' <<<"${recap}" | awk -F= '{n += $2} END {if (NR) print n}')"
  failed="$(grep -o ' failed=[0-9]*' <<<"${recap}" | awk -F= '{n += $2} END {if (NR) print n}')"
  local ok=true
  case "${expect}" in
    changed) [[ "${code}" -eq 0 && "${failed:-1}" -eq 0 && "${changed:-0}" -gt 0 ]] || ok=false ;;
    unchanged) [[ "${code}" -eq 0 && "${failed:-1}" -eq 0 && "${changed:-1}" -eq 0 ]] || ok=false ;;
    failed) [[ "${code}" -ne 0 && "${failed:-0}" -gt 0 ]] || ok=false ;;
  esac
  if ! ${ok}; then
    cat "${log}" >&2
    fail "ansible-playbook $* exited ${code} with changed=${changed:-?} failed=${failed:-?}, expected ${expect}"
  fi
  echo "  ok: exit ${code}, changed=${changed}, failed=${failed}"
}
runs=0
json_field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {"d": d}))' "$1"; }
pm() { in_box "$@"; }

step "syntax and lint"
for playbook_file in site.yml activate.yml rollout.yml rollback.yml trust-key.yml airgap-export.yml airgap-import.yml; do
  (cd "${root}/ansible" && "${ansible_bin}/ansible-playbook" -i "${work}/inventory.yml" --syntax-check "${playbook_file}" >/dev/null) \
    || fail "--syntax-check ${playbook_file}"
done
echo "  --syntax-check: 7 playbooks ok"
(cd "${root}/ansible" && "${ansible_bin}/ansible-lint" --nocolor -q) || fail "ansible-lint"
echo "  ansible-lint: ok"

step "a systemd box"
"${root}/scripts/systemd-box.sh" start "${box}"

step "site.yml: the manager and four agents installed, started and activated"
# Check mode on a host with nothing installed yet: it says what would change and changes nothing.
playbook changed -i "${work}/inventory.yml" site.yml --check
in_box test ! -e /usr/bin/pm-mirror || fail "site.yml --check installed pm-manager"
playbook changed -i "${work}/inventory.yml" site.yml
playbook unchanged -i "${work}/inventory.yml" site.yml
playbook unchanged -i "${work}/inventory.yml" site.yml --check
for unit in pm-mirror-serve.service pm-exporter.service pm-agent@a.service pm-agent@b.service pm-agent@c.service \
    pm-agent.service pm-mirror-sync.timer pm-poll.timer; do
  [[ "$(in_box systemctl is-active "${unit}")" == active ]] || { in_box systemctl status "${unit}" --no-pager >&2 || true; fail "${unit} is not active"; }
  [[ "$(in_box systemctl is-enabled "${unit}")" == enabled ]] || fail "${unit} is not enabled"
done
serve_pid="$(in_box systemctl show -P MainPID pm-mirror-serve.service)"
[[ "$(in_box stat -c %U "/proc/${serve_pid}")" == pm ]] || fail "pm-mirror serve does not run as pm"
[[ "$(in_box stat -c '%U %a' /var/lib/pm/pm.toml)" == "pm 640" ]] || fail "pm.toml is not pm's, 0640"
# The network-facing services cannot reach the private keys, even as the pm user that owns them.
for unit in pm-mirror-serve.service pm-exporter.service; do
  pid="$(in_box systemctl show -P MainPID "${unit}")"
  in_box nsenter -t "${pid}" -m test -e /var/lib/pm/pki/ca.key && fail "${unit} can see pki/ca.key"
  in_box test -e /var/lib/pm/pki/ca.key || fail "no pki/ca.key to hide: the check above proves nothing"
done
activated="$(pm pm-activate --home /var/lib/pm --json list | json_field 'sorted((h["host"], h["group"], h["state"]) for h in d["hosts"])')"
[[ "${activated}" == "[('agent-a', 'lab', 'active'), ('agent-b', 'lab', 'active'), ('agent-c', 'lab', 'active'), ('agent-d', 'lab', 'active')]" ]] \
  || fail "pm-activate list: ${activated}"
echo "  units active and enabled, serve runs as pm, four agents active in group lab"
# From here on the test runs sync and poll itself: a timer firing mid-test (poll 2 min, sync
# 5 min after boot) would publish behind the assertions' back.
in_box systemctl stop pm-mirror-sync.timer pm-poll.timer
pm find /var/lib -maxdepth 1 -name '*.activation-key' | grep -q . && fail "an activation key file was left behind"
pm test ! -e /var/lib/pm/ansible-activation.key || fail "the manager's activation key file was left behind"

step "rollout.yml: sync, publish, push, poll; then nothing to do"
playbook changed -i "${work}/inventory.yml" rollout.yml
dist="$(pm pm-mirror --home /var/lib/pm status --json | json_field 'd["generations"]["dist"]')"
for state in /var/lib/pm-agent-a /var/lib/pm-agent-b /var/lib/pm-agent-c /var/lib/pm-agent; do
  installed="$(pm pm-agent --state "${state}" status --json | json_field 'd["installed_revision"]')"
  [[ "${installed}" == "${dist}" ]] || fail "agent ${state} has ${installed}, dist is ${dist}"
done
pm test -s /var/lib/clamav/test.cvd || fail "pm-agent.service did not install into /var/lib/clamav"
echo "  every agent installed dist ${dist}"

step "the timers' services under systemd: sync+publish and poll as pm, hardened"
for unit in pm-mirror-sync.service pm-poll.service; do
  in_box systemctl start "${unit}" || { in_box journalctl -u "${unit}" --no-pager >&2 || true; fail "${unit} failed"; }
  [[ "$(in_box systemctl show -P Result "${unit}")" == success ]] || fail "${unit}: $(in_box systemctl show -P Result "${unit}")"
done
[[ "$(pm stat -c %U /var/lib/pm/inventory.duckdb)" == pm ]] || fail "the inventory is not pm's"
echo "  pm-mirror-sync.service and pm-poll.service succeeded"

step "upstream down: the sync unit fails, and its publish still re-signs dist"
# A closed site's sync and a connected site's whose upstream is down for a week alike: publish
# (ExecStopPost=) must re-sign dist's statement on schedule whatever sync did, or every agent
# refuses dist once [serve] dist_valid_for passes. Here dist_valid_for is 14 s (re-signing due
# after 2 s) and upstream answers 500; then pm.toml is restored and dist re-signed for 7 days.
pm cp -p /var/lib/pm/pm.toml /var/lib/pm/pm.toml.test-saved
pm python3 - <<'PY'
import pathlib
path = pathlib.Path("/var/lib/pm/pm.toml")
text = path.read_text()
assert "[serve]\n" in text, text
path.write_text(text.replace("[serve]\n", '[serve]\ndist_valid_for = "14s"\n') + "\n[http]\nretries = 0\n")
PY
statement() { pm cat /var/lib/pm/repo/view/dist.json | json_field "$1"; }
seconds_since() { statement "__import__('time').time() - __import__('datetime').datetime.fromisoformat(d['$1'].replace('Z', '+00:00')).timestamp()"; }
serial_before="$(statement 'd["dist_serial"]')"
python3 -c "import time; time.sleep(max(0.0, 3 - $(seconds_since signed_at)))"
curl -sf -X POST -H 'content-type: application/json' -d '{"kind": "server_error"}' \
  "http://127.0.0.1:${upstream_port}/_lab/fault" >/dev/null
in_box systemctl start pm-mirror-sync.service && fail "pm-mirror-sync.service succeeded with upstream answering 500"
[[ "$(in_box systemctl show -P Result pm-mirror-sync.service)" == exit-code ]] \
  || fail "pm-mirror-sync.service: $(in_box systemctl show -P Result pm-mirror-sync.service), expected exit-code"
serial_after="$(statement 'd["dist_serial"]')"
left="$(python3 -c "print(-$(seconds_since expires_at))")"
(( serial_after > serial_before )) || { in_box journalctl -u pm-mirror-sync.service --no-pager >&2 || true; fail "dist was not re-signed after the failed sync (dist serial ${serial_before} -> ${serial_after})"; }
python3 -c "import sys; sys.exit(not 0 < ${left} <= 14)" || fail "the statement expires in ${left} s, not within dist_valid_for 14 s"
echo "  sync failed (exit-code), publish re-signed dist: serial ${serial_before} -> ${serial_after}, valid ${left%.*} s more"
# Back to the inventory's pm.toml; once the short statement expired, publish signs for 7 days.
curl -sf -X POST "http://127.0.0.1:${upstream_port}/_lab/clear" >/dev/null
pm mv /var/lib/pm/pm.toml.test-saved /var/lib/pm/pm.toml
in_box systemctl reset-failed pm-mirror-sync.service
python3 -c "import time; time.sleep(max(0.0, 0.5 - $(seconds_since expires_at)))"
pm runuser -u pm -- pm-mirror --home /var/lib/pm -q publish || fail "publish after restoring pm.toml"
python3 -c "import sys; sys.exit(not $(seconds_since expires_at) < -86400)" || fail "dist was not re-signed for 7 days"
playbook unchanged -i "${work}/inventory.yml" rollout.yml
playbook unchanged -i "${work}/inventory.yml" rollout.yml --check

step "upstream moves to version 6: --check says so and changes nothing, then the rollout"
curl -sf -X POST "http://127.0.0.1:${upstream_port}/_lab/version?n=6" >/dev/null
playbook changed -i "${work}/inventory.yml" rollout.yml --check
[[ "$(pm pm-mirror --home /var/lib/pm status --json | json_field 'd["generations"]["dist"]')" == "${dist}" ]] \
  || fail "rollout.yml --check changed dist"
playbook changed -i "${work}/inventory.yml" rollout.yml
new_dist="$(pm pm-mirror --home /var/lib/pm status --json | json_field 'd["generations"]["dist"]')"
[[ "${new_dist}" != "${dist}" ]] || fail "dist did not move"
playbook unchanged -i "${work}/inventory.yml" rollout.yml

step "rollback.yml back to ${dist}"
playbook failed -i "${work}/inventory.yml" rollback.yml -e pm_rollback_revision=no-such-revision
playbook changed -i "${work}/inventory.yml" rollback.yml -e "pm_rollback_revision=${dist}"
[[ "$(pm pm-mirror --home /var/lib/pm status --json | json_field 'd["generations"]["dist"]')" == "${dist}" ]] \
  || fail "dist is not ${dist} after the rollback"
for state in /var/lib/pm-agent-a /var/lib/pm-agent-b /var/lib/pm-agent-c /var/lib/pm-agent; do
  installed="$(pm pm-agent --state "${state}" status --json | json_field 'd["installed_revision"]')"
  [[ "${installed}" == "${dist}" ]] || fail "agent ${state} has ${installed} after the rollback"
done
playbook unchanged -i "${work}/inventory.yml" rollback.yml -e "pm_rollback_revision=${dist}"

step "trust-key.yml: every agent trusts the manager's key already"
manifest_key="$(pm pm-agent --state /var/lib/pm-agent status --json | json_field 'd["manifest_key"]')"
[[ "${manifest_key}" == sha256:* ]] || fail "pm-agent status shows no manifest key: ${manifest_key}"
playbook failed -i "${work}/inventory.yml" trust-key.yml
playbook unchanged -i "${work}/inventory.yml" trust-key.yml -e "pm_trust_key_fingerprint=${manifest_key}" --check
playbook unchanged -i "${work}/inventory.yml" trust-key.yml -e "pm_trust_key_fingerprint=${manifest_key}"

step "airgap-export.yml, then airgap-import.yml into a closed manager"
playbook changed -i "${work}/inventory.yml" airgap-export.yml -e "pm_airgap_dir=${work}/airgap"
playbook unchanged -i "${work}/inventory.yml" airgap-export.yml -e "pm_airgap_dir=${work}/airgap"
ls "${work}/airgap"/pm-*.bundle "${work}/airgap/exporter.pub.pem" >/dev/null || fail "nothing fetched to the controller"
playbook changed -i "${work}/closed.yml" site.yml
playbook changed -i "${work}/closed.yml" airgap-import.yml -e "pm_airgap_dir=${work}/airgap"
playbook unchanged -i "${work}/closed.yml" airgap-import.yml -e "pm_airgap_dir=${work}/airgap"
playbook unchanged -i "${work}/closed.yml" airgap-import.yml -e "pm_airgap_dir=${work}/airgap" --check
latest="$(pm pm-mirror --home /var/lib/pm status --json | json_field 'd["generations"]["latest"]')"
closed_dist="$(pm pm-mirror --home /var/lib/pm-closed status --json | json_field 'd["generations"]["dist"]')"
[[ -n "${closed_dist}" && "${closed_dist}" != None ]] || fail "the closed manager has no dist"
echo "  closed dist ${closed_dist} (connected latest ${latest})"

step "a package upgrade through site.yml: the running services restart on the new binaries"
mapfile -t next_debs < <("${root}/scripts/package-deb.sh" --fast --version 0.1.1~test --bin-dir "${bin_dir}" --out "${work}/debs-next")
serve_before="$(in_box systemctl show -P MainPID pm-mirror-serve.service)"
agent_before="$(in_box systemctl show -P MainPID pm-agent@a.service)"
playbook changed -i "${work}/inventory.yml" site.yml -e "pm_manager_deb=${next_debs[0]}" -e "pm_agent_deb=${next_debs[1]}"
playbook unchanged -i "${work}/inventory.yml" site.yml -e "pm_manager_deb=${next_debs[0]}" -e "pm_agent_deb=${next_debs[1]}"
[[ "$(in_box dpkg-query -W -f '${Version} ' pm-manager pm-agent)" == "0.1.1~test 0.1.1~test " ]] \
  || fail "the packages were not upgraded: $(in_box dpkg-query -W pm-manager pm-agent)"
for unit in pm-mirror-serve.service pm-agent@a.service; do
  [[ "$(in_box systemctl is-active "${unit}")" == active ]] || fail "${unit} is not active after the upgrade"
done
[[ "$(in_box systemctl show -P MainPID pm-mirror-serve.service)" != "${serve_before}" ]] || fail "pm-mirror serve was not restarted"
[[ "$(in_box systemctl show -P MainPID pm-agent@a.service)" != "${agent_before}" ]] || fail "pm-agent@a was not restarted"
echo "  both packages at 0.1.1~test, serve and the agents restarted and active"

step "pm-doctor on the installed manager"
pm runuser -u pm -- pm-doctor --home /var/lib/pm --serve "http://127.0.0.1:${serve_port}" \
  --exporter "http://127.0.0.1:${exporter_port}" || fail "pm-doctor"

step "the README's demo on the packaged tools"
(in_box env PM_BIN_DIR=/usr/bin PM_LAB="${bin_dir}/pm-lab" "${root}/scripts/demo.sh" >"${work}/demo.log" 2>&1) \
  || { cat "${work}/demo.log" >&2; fail "the demo on the packaged tools"; }
grep -q '== demo done' "${work}/demo.log" || fail "the demo did not finish"
echo "  demo done with /usr/bin's tools"

# The activation key (pmk1.…) is only ever in no_log tasks and private files that are removed.
if grep -l 'pmk1\.' "${work}"/run-*.log; then fail "an activation key is in the playbook output above"; fi

step "ansible: ${runs} playbook runs as expected"
