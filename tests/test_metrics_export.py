"""must-ray's Ray metrics (issue 6, part 5), offline checks:

* cluster/grafana/must_ray_dashboard.json is a Grafana dashboard whose every query names only
  metrics and tags that must_ray.monitoring declares, and that covers every declared metric (so
  the dashboard and the code cannot drift);
* outside Ray the metric objects are no-ops that cost (almost) nothing.

The metrics themselves, scraped from a real node's Prometheus endpoint while a submitted labelling
job and a submitted training job run, are checked in tests/test_job_submit.py (which shares one
Ray head between both jobs).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

from must_ray.monitoring import METRICS, PROMETHEUS_PREFIX
from tests.conftest import REPO

DASHBOARD = REPO / "cluster" / "grafana" / "must_ray_dashboard.json"


# ----------------------------------------------------------------------------- the Grafana dashboard

_PROM_FUNCS = {"sum", "max", "min", "avg", "rate", "irate", "increase", "histogram_quantile", "time", "by",
               "without", "clamp_min", "count", "absent", "topk", "delta", "deriv", "on", "ignoring",
               "group_left", "vector", "scalar", "label_values", "and", "or", "unless"}
# labels Ray's exporter adds to every custom metric, and the histogram bucket label
_RAY_LABELS = {"SessionName", "NodeAddress", "Component", "Version", "WorkerId", "JobId", "instance", "job", "le"}


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def test_grafana_dashboard_queries_only_declared_metrics_and_covers_them_all():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"

    exported = {}  # Prometheus series name -> spec
    for spec in METRICS.values():
        for name in spec.prometheus_names():
            exported[name] = spec
    used: set[str] = set()
    ids = set()
    panels = [p for p in _panels(dashboard) if p.get("type") != "row"]
    assert panels
    for panel in panels:
        where = f"panel {panel.get('title')!r}"
        assert panel["id"] not in ids, f"{where}: duplicate id"
        ids.add(panel["id"])
        assert panel["datasource"]["uid"] == "${datasource}", where
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], f"{where}: no query"
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{where}: {expr}"
            names = set(re.findall(rf"\b{PROMETHEUS_PREFIX}must_ray_[a-z0-9_]+\b", expr))
            assert names, f"{where}: queries no must-ray metric: {expr}"
            unknown = names - set(exported)
            assert not unknown, f"{where}: {sorted(unknown)} are not metrics must_ray.monitoring defines"
            used |= {exported[n].name for n in names}
            tags = set().union(*(exported[n].tags for n in names)) | _RAY_LABELS
            labels = set(re.findall(r"\b([a-zA-Z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr))
            for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
                labels |= {g.strip() for g in group.split(",") if g.strip()}
            assert labels <= tags, f"{where}: labels {sorted(labels - tags)} are not tags of {sorted(names)}"
            for var in re.findall(r"\$\{?([A-Za-z_]+)", expr):
                assert var in variables or var.startswith("__"), f"{where}: unknown variable ${var}"
    for var in variables.values():  # variables that list label values of our metrics name real ones too
        query = (var.get("query") or {}).get("query", "") if isinstance(var.get("query"), dict) else ""
        unknown = set(re.findall(rf"\b{PROMETHEUS_PREFIX}must_ray_[a-z0-9_]+\b", query)) - set(exported)
        assert not unknown, f"variable {var['name']}: {sorted(unknown)} are not defined"
    missing = set(METRICS) - used
    assert not missing, f"metrics without a panel: {sorted(missing)}"


def test_metrics_are_noops_outside_ray():
    """In a process without Ray the metric objects do nothing and Ray is not even imported."""
    code = ("import sys, time\n"
            "from must_ray.monitoring import TrainMetrics, LabelMetrics, _NoOp\n"
            "m = TrainMetrics('r', 'student'); l = LabelMetrics('o')\n"
            "assert isinstance(m.loss, _NoOp) and isinstance(l.labeled, _NoOp)\n"
            "t = time.perf_counter()\n"
            "for i in range(10000):\n"
            "    m.report({'loss': 1.0, 'images_per_s': 2.0, 'data_wait_frac': 0.0, 'loss_depth': 0.5}, ['depth'], 1)\n"
            "per_call = (time.perf_counter() - t) / 10000\n"
            "assert 'ray' not in sys.modules, 'monitoring imported ray'\n"
            "print(per_call)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip()) < 1e-4  # < 0.1 ms per report (it is ~µs): nothing next to a training step
