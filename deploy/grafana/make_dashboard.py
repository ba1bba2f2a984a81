"""Generate deploy/grafana/dashboards/dkdm.json (the DKDM pool dashboard).

    python deploy/grafana/make_dashboard.py           # rewrite the JSON
    python deploy/grafana/make_dashboard.py --check   # exit 1 if the JSON is out of date

Every expression uses metric names from common/metrics.py only (counters as
``<name>`` ending in ``_total``, histograms as ``_bucket``); tests/deploy checks
that each one returns data from a real Prometheus during a real run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import metrics as m  # noqa: E402

OUT = ROOT / "deploy" / "grafana" / "dashboards" / "dkdm.json"
DS = {"type": "prometheus", "uid": "dkdm-prometheus"}   # provisioning/datasources/prometheus.yml
RI = "$__rate_interval"
SHARD = 'shard=~"$shard"'
WORKER = 'worker=~"$worker"'


def _series(name: str, sel: str) -> str:
    return f"{name}{{{sel}}}" if sel else name


def rate(name: str, sel: str = "") -> str:
    return f"rate({_series(name, sel)}[{RI}])"


def quantile(q: float, name: str, by: str = "le", sel: str = "") -> str:
    return f"histogram_quantile({q}, sum by ({by}) ({rate(name + '_bucket', sel)}))"


def target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def timeseries(title: str, unit: str, targets: list[tuple[str, str]], desc: str, stack: bool = False, max_=None) -> dict:
    custom = {"fillOpacity": 20 if stack else 0, "lineWidth": 1, "showPoints": "never",
              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    defaults = {"unit": unit, "custom": custom}
    if max_ is not None:
        defaults.update(min=0, max=max_)
    return {
        "type": "timeseries", "title": title, "description": desc, "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [target(e, lg, chr(ord("A") + i)) for i, (e, lg) in enumerate(targets)],
    }


def heatmap(title: str, expr: str, legend: str, desc: str) -> dict:
    return {
        "type": "heatmap", "title": title, "description": desc, "datasource": DS,
        "fieldConfig": {"defaults": {"custom": {"scaleDistribution": {"type": "linear"}}}, "overrides": []},
        "options": {"calculate": False, "yAxis": {"axisPlacement": "left", "unit": "none"},
                    "rowsFrame": {"layout": "auto", "value": "READY slots"},
                    "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                    "cellGap": 1, "tooltip": {"mode": "single", "yHistogram": False},
                    "legend": {"show": True}},
        "targets": [dict(target(expr, legend, "A"), format="time_series")],
    }


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def panels() -> list[dict]:
    pool = [
        row("Pool"),
        timeseries("Records produced and consumed per second", "ops", [
            (f"sum({rate(m.POOL_RECORDS_PRODUCED_TOTAL, SHARD)})", "produced"),
            (f"sum({rate(m.POOL_RECORDS_CONSUMED_TOTAL, SHARD)})", "consumed"),
        ], "Records filled by teachers and drawn by trainers, all selected shards."),
        timeseries("Records per second per shard", "ops", [
            (f"sum by (shard) ({rate(m.POOL_RECORDS_PRODUCED_TOTAL, SHARD)})", "produced shard {{shard}}"),
            (f"sum by (shard) ({rate(m.POOL_RECORDS_CONSUMED_TOTAL, SHARD)})", "consumed shard {{shard}}"),
        ], "The same rates split by shard: an idle shard stands out."),
        timeseries("Slots per state", "short", [
            (f"sum by (state) ({m.POOL_SLOTS}{{{SHARD}}})", "{{state}}"),
        ], "READY / LEASED / REFILL / FILLING slots; the total is constant.", stack=True),
        timeseries("Draw and fill latency p50 / p99", "s", [
            (quantile(0.5, m.POOL_DRAW_SECONDS), "draw p50"),
            (quantile(0.99, m.POOL_DRAW_SECONDS), "draw p99"),
            (quantile(0.5, m.POOL_FILL_SECONDS), "fill p50"),
            (quantile(0.99, m.POOL_FILL_SECONDS), "fill p99"),
        ], "Latency of one pool draw (trainer side) and one fill (teacher side)."),
        timeseries("Record age at draw", "short", [
            (quantile(0.5, m.POOL_RECORD_AGE_STEPS), "p50"),
            (quantile(0.99, m.POOL_RECORD_AGE_STEPS), "p99"),
            (f"sum(rate({m.POOL_RECORD_AGE_STEPS}_sum[{RI}])) / sum(rate({m.POOL_RECORD_AGE_STEPS}_count[{RI}]))", "mean"),
        ], "Pool operations between a record's teacher forward and its draw."),
        heatmap("Chain index t of READY slots", f"sum by (bucket) ({m.POOL_READY_T}{{{SHARD}}})", "{{bucket}}",
                "READY slots per t bucket over time: a healthy pool covers all of [0, T-1]."),
    ]
    teachers = [
        row("Teachers"),
        timeseries("Teacher records per second", "ops", [
            (f"sum by (worker) ({rate(m.TEACHER_RECORDS_TOTAL, WORKER)})", "teacher {{worker}}"),
        ], "Records each teacher filled into the pool."),
        timeseries("Teacher busy fraction", "percentunit", [
            (f"sum by (worker) ({rate(m.TEACHER_BUSY_SECONDS_TOTAL, WORKER)})", "teacher {{worker}}"),
        ], "Fraction of wall time spent computing (denoising step and forward).", max_=1),
        timeseries("Teacher restarts", "short", [
            (f"sum by (worker) ({m.TEACHER_RESTARTS_TOTAL}{{{WORKER}}})", "teacher {{worker}}"),
        ], "Actor restarts reported by the running teachers (steps up on a restart)."),
    ]
    trainer = [
        row("Trainer"),
        timeseries("Trainer step time p50 / p99", "s", [
            (quantile(0.5, m.TRAINER_STEP_SECONDS, "le, worker", WORKER), "p50 worker {{worker}}"),
            (quantile(0.99, m.TRAINER_STEP_SECONDS, "le, worker", WORKER), "p99 worker {{worker}}"),
        ], "Wall time of one student optimizer step, pool wait included."),
        timeseries("Time waiting for the pool", "percentunit", [
            (f"sum by (worker) ({rate(m.TRAINER_POOL_WAIT_SECONDS_TOTAL, WORKER)})", "worker {{worker}}"),
        ], "Fraction of wall time a trainer waited for a batch (starvation; 0 when teachers keep up).", max_=1),
        timeseries("Loss terms", "short", [
            (f"avg by (term) ({m.TRAINER_LOSS}{{{WORKER}}})", "{{term}}"),
        ], "Latest loss terms, averaged over the selected workers."),
        timeseries("Trainer samples and steps per second", "ops", [
            (f"sum by (worker) ({rate(m.TRAINER_SAMPLES_TOTAL, WORKER)})", "samples/s worker {{worker}}"),
            (f"sum by (worker) ({rate(m.TRAINER_STEPS_TOTAL, WORKER)})", "steps/s worker {{worker}}"),
        ], "Records trained on and optimizer steps per second."),
    ]
    out, y = [], 0
    for group in (pool, teachers, trainer):
        x = 0
        for p in group:
            if p["type"] == "row":
                if x:
                    y += 8
                p["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
                y, x = y + 1, 0
            else:
                p["gridPos"] = {"h": 8, "w": 12, "x": x, "y": y}
                x = (x + 12) % 24
                y += 8 if x == 0 else 0
            out.append(p)
        if x:
            y += 8
    for i, p in enumerate(out, start=1):
        p["id"] = i
    return out


def variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
        "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "sort": 3,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def dashboard() -> dict:
    workers = f'label_values({{__name__=~"{m.TEACHER_RECORDS_TOTAL}|{m.TRAINER_STEPS_TOTAL}"}}, worker)'
    return {
        "uid": "dkdm-pool", "title": "DKDM: pool, teachers, trainer", "tags": ["dkdm"],
        "schemaVersion": 39, "version": 1, "editable": False, "graphTooltip": 1,
        "time": {"from": "now-15m", "to": "now"}, "refresh": "5s", "timezone": "",
        "templating": {"list": [
            variable("shard", "shard", f"label_values({m.POOL_SLOTS}, shard)"),
            variable("worker", "worker", workers),
        ]},
        "annotations": {"list": []},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python deploy/grafana/make_dashboard.py")
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
