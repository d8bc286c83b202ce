"""The metrics reference (docs/metrics.md) and the Grafana dashboard (csi/deploy/) agree with
what the daemons serve: every metric the dashboard queries is documented, and every metric name
the code declares with a literal is in the reference."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "csi" / "deploy" / "grafana-dashboard.json"
SUFFIXES = ("_bucket", "_count", "_sum")


def expand(text: str) -> set[str]:
    """Metric names in the reference, `a_{x,y}_total` written out."""
    names: set[str] = set()
    for token in re.findall(r"cachefs_[a-z0-9_{},]+", text):
        parts = re.split(r"\{([^}]*)\}", token)
        choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
        names.update("".join(c) for c in itertools.product(*choices))
    return names


def test_the_dashboard_is_valid_and_queries_documented_metrics() -> None:
    documented = expand(DOC.read_text())
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"], "no panels"
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried.update(re.findall(r"cachefs_[a-z0-9_]+", target["expr"]))
    bases = {next((n.removesuffix(s) for s in SUFFIXES if n.endswith(s)), n) for n in queried}
    missing = sorted(bases - documented)
    assert not missing, f"queried but not in docs/metrics.md: {missing}"


def test_metric_names_in_the_code_are_documented() -> None:
    documented = expand(DOC.read_text())
    declared = set()
    for path in itertools.chain(ROOT.glob("cachefs/**/*.py"), ROOT.glob("master/*.py"),
                                ROOT.glob("storage_server/*.py"), ROOT.glob("csi/*.py")):
        text = path.read_text()
        # Counter("name", ...), Histogram("name", ...), Gauge("name", ...) with a literal name
        for kind, name in re.findall(r"\b(Counter|Histogram|Gauge)\(\s*f?\"(cachefs_[a-z_]+)\"",
                                     text):
            declared.add(name + ("_total" if kind == "Counter" else ""))
    assert declared, "no literal metric names found: the pattern is out of date"
    missing = sorted(n for n in declared if n not in documented)
    assert not missing, f"declared but not in docs/metrics.md: {missing}"
