#!/usr/bin/env python3
"""Prints every PromQL expression of the pm Grafana dashboards, ready to send to Prometheus.

Takes panel targets, template variable queries (`label_values(m, l)` becomes `m`) and annotation
queries, and replaces Grafana's variables with concrete values. One expression a line, or with
`--json` one JSON array of {dashboard, panel, ref, expr} so a failure can name its panel.
Used by dashboards/check.sh (every expression must parse) and by the integration test (every
expression must return data from a real exporter). Standard library only.
"""

import argparse
import json
import pathlib
import re
import sys

DASHBOARDS = ("pm-fleet-overview.json", "pm-host-detail.json", "pm-rollouts.json")
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<metric>.+),\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$")
VARIABLE = re.compile(r"\$\{(?P<braced>[a-zA-Z_][a-zA-Z0-9_]*)(?::[a-z]+)?\}|\$(?P<plain>[a-zA-Z_][a-zA-Z0-9_]*)")


def panels(items):
    """Every panel, including those inside collapsed rows."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def variable_query(variable):
    """The PromQL behind a query variable, or None for other variable types."""
    if variable.get("type") != "query":
        return None
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    if not query:
        query = variable.get("definition")
    match = LABEL_VALUES.match(query)
    if match:
        return match.group("metric")
    if query.strip().startswith("label_values("):
        raise SystemExit(f"error: variable `{variable.get('name')}`: cannot translate `{query}`")
    return query


def substitute(expr, values):
    def replace(match):
        name = match.group("braced") or match.group("plain")
        if name not in values:
            raise SystemExit(f"error: no value for variable `${name}` in `{expr}`")
        return values[name]

    # PromQL ignores newlines outside strings; one expression a line keeps the output simple.
    return VARIABLE.sub(replace, " ".join(expr.split("\n")).strip())


def expressions(directory, values):
    for name in DASHBOARDS:
        dashboard = json.loads((directory / name).read_text())
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable_query(variable)
            if query:
                yield name, f"variable {variable['name']}", "query", substitute(query, values)
        for annotation in dashboard.get("annotations", {}).get("list", []):
            if annotation.get("expr"):
                yield name, f"annotation {annotation['name']}", "expr", substitute(annotation["expr"], values)
        for panel in panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield name, panel["title"], target.get("refId", ""), substitute(target["expr"], values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON array with the panel of each expression")
    parser.add_argument("--group", default=".*", help="value of $group (a regex; default: all)")
    parser.add_argument("--host", default=".*", help="value of $host (a regex; default: all)")
    parser.add_argument("--job-id", default=".*", help="value of $job_id (a regex; default: all)")
    parser.add_argument("--range", default="1h", help="value of $__range")
    parser.add_argument("--interval", default="1m", help="value of $__interval")
    parser.add_argument("--rate-interval", default="5m", help="value of $__rate_interval")
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent,
                        help="directory holding the dashboards (default: this script's)")
    args = parser.parse_args()
    values = {
        "group": args.group, "host": args.host, "job_id": args.job_id, "datasource": "prometheus",
        "__range": args.range, "__interval": args.interval, "__rate_interval": args.rate_interval,
    }
    found = [
        {"dashboard": dashboard, "panel": panel, "ref": ref, "expr": expr}
        for dashboard, panel, ref, expr in expressions(args.dir, values)
    ]
    if args.json:
        json.dump(found, sys.stdout, indent=1)
        print()
    else:
        for item in found:
            print(item["expr"])


if __name__ == "__main__":
    main()
