#!/usr/bin/env bash
# Checks dashboards/ without Grafana: the alert rules (promtool check rules and their unit tests),
# the dashboard JSON models (the fields provisioning and the metric contract need), and every
# PromQL expression of the dashboards, parsed by a throwaway Prometheus on a loopback port with an
# empty TSDB (Prometheus 2.42 has no `promtool check query`). Exits non-zero on the first kind
# of failure, saying what failed. Needs promtool, prometheus (apt package `prometheus`) and python3.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)"

fail() {
  echo "error: $*" >&2
  exit 1
}

for tool in promtool prometheus python3; do
  command -v "${tool}" >/dev/null || fail "\`${tool}\` not found (hint: scripts/setup.sh installs it)"
done

echo "== promtool check rules"
promtool check rules "${dir}/alerts/pm-alerts.yml" || fail "promtool check rules failed on alerts/pm-alerts.yml"

echo "== promtool test rules"
promtool test rules "${dir}/alerts/pm-alerts.test.yml" || fail "promtool test rules failed on alerts/pm-alerts.test.yml"

echo "== dashboards"
python3 - "${dir}" <<'PY' || fail "dashboard JSON check failed"
"""Checks what provisioning and the metric contract need of each dashboard."""
import json, pathlib, re, subprocess, sys

directory = pathlib.Path(sys.argv[1])
datasource = {"type": "prometheus", "uid": "${datasource}"}
# The metric contract of issue 7 (pm-exporter): a misspelt name parses fine and returns nothing,
# so names are checked here.
contract = set("""
pm_host_up pm_host_inactive pm_host_last_poll_timestamp_seconds
pm_host_last_successful_poll_timestamp_seconds pm_host_last_update_timestamp_seconds
pm_host_last_update_success pm_host_last_scan_timestamp_seconds pm_host_scan_findings
pm_host_version_status pm_host_scan_status pm_host_license_expiry_timestamp_seconds
pm_host_held pm_host_hold_until_timestamp_seconds pm_host_certificate_expiry_timestamp_seconds
pm_host_agent_info pm_host_component_version pm_host_component_build_timestamp_seconds
pm_host_component_behind_dist pm_host_component_missing pm_hosts pm_hosts_by_scan_status pm_hosts_inactive pm_dist_info
pm_dist_serial pm_dist_published_timestamp_seconds pm_dist_valid_until_timestamp_seconds pm_latest_info pm_backup_info
pm_dist_component_version pm_dist_component_build_timestamp_seconds
pm_upstream_component_version pm_mirror_last_sync_timestamp_seconds
pm_mirror_last_successful_sync_timestamp_seconds pm_mirror_cooldown_until_timestamp_seconds
pm_bundle_last_import_timestamp_seconds pm_rollouts_in_progress pm_rollout_hosts
pm_exporter_build_info pm_inventory_snapshot_timestamp_seconds pm_inventory_snapshot_age_seconds
pm_inventory_read_errors_total pm_inventory_snapshot_read_seconds
pm_exporter_scrape_duration_seconds pm_inventory_size_bytes
""".split())
errors = []
uids = {}

def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))

for path in sorted(directory.glob("*.json")):
    name = path.name
    try:
        dashboard = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        errors.append(f"{name}: not valid JSON: {err}")
        continue
    if "__inputs" in dashboard or "${DS_" in path.read_text():
        errors.append(f"{name}: uses __inputs/${{DS_...}}, which breaks file provisioning")
    for field in ("uid", "title", "schemaVersion", "templating", "panels"):
        if not dashboard.get(field):
            errors.append(f"{name}: no `{field}`")
    uid = dashboard.get("uid")
    if uid in uids:
        errors.append(f"{name}: uid `{uid}` is also the uid of {uids[uid]}")
    uids[uid] = name
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append(f"{name}: no `datasource` variable of type datasource for prometheus")
    for var, query in (("group", "label_values(pm_host_up, group)"),
                       ("host", 'label_values(pm_host_up{group=~"$group"}, host)')):
        v = variables.get(var, {})
        q = v.get("query", {})
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") != "query" or q != query or not v.get("multi") or not v.get("includeAll"):
            errors.append(f"{name}: variable `{var}` is not a multi, include-all query `{query}`")
        if v.get("datasource") != datasource:
            errors.append(f"{name}: variable `{var}` does not use the `${{datasource}}` data source")
    ids = set()
    for panel in panels(dashboard.get("panels", [])):
        title = panel.get("title") or f"panel {panel.get('id')}"
        if panel.get("id") in ids:
            errors.append(f"{name}: `{title}`: panel id {panel.get('id')} is used twice")
        ids.add(panel.get("id"))
        if "gridPos" not in panel:
            errors.append(f"{name}: `{title}`: no gridPos")
        if panel.get("type") == "row":
            continue
        if not panel.get("title"):
            errors.append(f"{name}: panel {panel.get('id')} has no title")
        if not panel.get("description"):
            errors.append(f"{name}: `{title}`: no description")
        if panel.get("datasource") != datasource:
            errors.append(f"{name}: `{title}`: datasource is not {json.dumps(datasource)}")
        if not panel.get("targets"):
            errors.append(f"{name}: `{title}`: no queries")
        for target in panel.get("targets", []):
            if target.get("datasource", datasource) != datasource:
                errors.append(f"{name}: `{title}` {target.get('refId')}: datasource is not the variable")
            if not target.get("expr"):
                errors.append(f"{name}: `{title}` {target.get('refId')}: no expr")

# Metric names in the dashboards' and the alert rules' expressions.
listed = json.loads(subprocess.run([sys.executable, str(directory / "promql-exprs.py"), "--json"],
                                   check=True, capture_output=True, text=True).stdout)
texts = [(f"{e['dashboard']}: `{e['panel']}`", e["expr"]) for e in listed]
texts.append(("alerts/pm-alerts.yml", (directory / "alerts" / "pm-alerts.yml").read_text()))
for where, text in texts:
    for metric in sorted(set(re.findall(r"\bpm_[a-z0-9_]+", text))):
        if metric not in contract:
            errors.append(f"{where}: `{metric}` is not in the metric contract")

for error in errors:
    print(f"error: {error}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"{len(uids)} dashboards, {len(listed)} expressions: ok")
PY

echo "== PromQL expressions (throwaway prometheus)"
tmp="$(mktemp -d)"
prometheus_pid=""
cleanup() {
  if [[ -n "${prometheus_pid}" ]]; then
    kill "${prometheus_pid}" 2>/dev/null || true
    wait "${prometheus_pid}" 2>/dev/null || true
  fi
  rm -rf "${tmp}"
}
trap cleanup EXIT

printf 'global:\n  evaluation_interval: 1m\nscrape_configs: []\n' >"${tmp}/prometheus.yml"
# A free loopback port: the kernel picks one, and the socket is closed just before prometheus binds.
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
prometheus --config.file="${tmp}/prometheus.yml" --storage.tsdb.path="${tmp}/data" \
  --web.listen-address="127.0.0.1:${port}" >"${tmp}/prometheus.log" 2>&1 &
prometheus_pid=$!

python3 - "${dir}" "${port}" "${prometheus_pid}" "${tmp}/prometheus.log" <<'PY' || fail "PromQL check failed"
"""Waits (bounded) for the throwaway prometheus, then asks it to evaluate every expression."""
import json, os, subprocess, sys, time, urllib.error, urllib.parse, urllib.request

directory, port, pid, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
base = f"http://127.0.0.1:{port}"

deadline = time.monotonic() + 30
while True:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
            if response.status == 200:
                break
    except (urllib.error.URLError, OSError):
        pass
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    if not alive or time.monotonic() > deadline:
        reason = "exited" if not alive else "was not ready within 30 s"
        print(f"error: throwaway prometheus on 127.0.0.1:{port} {reason}; its log:", file=sys.stderr)
        print(open(log).read()[-4000:], file=sys.stderr)
        sys.exit(1)
    time.sleep(0.2)

listed = json.loads(subprocess.run([sys.executable, os.path.join(directory, "promql-exprs.py"), "--json"],
                                   check=True, capture_output=True, text=True).stdout)
failed = 0
for item in listed:
    data = urllib.parse.urlencode({"query": item["expr"]}).encode()
    try:
        with urllib.request.urlopen(f"{base}/api/v1/query", data=data, timeout=10) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as err:
        # Prometheus answers a bad query with 400 and a JSON body.
        answer = json.load(err)
    if answer.get("status") != "success":
        failed += 1
        print(f"error: {item['dashboard']}: `{item['panel']}` {item['ref']}: {answer.get('errorType')}: "
              f"{answer.get('error')}\n  expr: {item['expr']}", file=sys.stderr)
if failed:
    sys.exit(1)
print(f"{len(listed)} expressions parse and evaluate: ok")
PY

echo "ok: dashboards/ checks passed"
