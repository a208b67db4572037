"""The Grafana dashboard shipped in deploy/ asks only for metrics the proxy exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from proxy.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"


def exported_names() -> set[str]:
    metrics = Metrics()
    metrics.watch_queues(lambda: [("q", 0, 0)])
    metrics.watch_certificates(list)
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    # A histogram's buckets and a counter's _total exist once observed; name them all.
    return (
        names
        | {f"{n}_total" for n in names}
        | {f"{n}_bucket" for n in names}
        | {
            "apppass_queue_waiting",
            "apppass_certificate_expiry_timestamp_seconds",
        }
    )


def test_every_query_names_an_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for q in queries for name in re.findall(r"apppass_[a-z_]+", q)}
    assert used and used <= exported_names(), used - exported_names()
