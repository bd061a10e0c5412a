#!/usr/bin/env python3
"""Draws the panels of inbound-audit.json from a Prometheus server into a PNG,
with the dashboard's own queries (range queries over the last minutes), for
the README: a picture of the dashboard without a Grafana server.

usage: render.py PROMETHEUS_URL OUT.png [MINUTES]

Grafana's variables are filled as Grafana would: $instance matches every
agent, $__rate_interval is 15s (the picture's run scrapes every second and
lasts minutes, not hours).
"""
import json
import math
import os
import sys
import time
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def query_range(url, expr, start, end, step):
    params = urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step}
    )
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt, labels):
    out = fmt
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def main():
    url, out = sys.argv[1], sys.argv[2]
    minutes = float(sys.argv[3]) if len(sys.argv) > 3 else 3
    with open(os.path.join(HERE, "inbound-audit.json")) as f:
        dashboard = json.load(f)
    panels = dashboard["panels"]
    end = time.time()
    start = end - minutes * 60
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3.2 * rows), squeeze=False)
    fig.suptitle(dashboard["title"], fontsize=14)
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(panel["title"], fontsize=10)
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "15s").replace(
                "$instance", ".*"
            )
            for series in query_range(url, expr, start, end, 2):
                xs = [float(t) - end for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(target.get("legendFormat", ""), series["metric"]))
        ax.set_xlabel("seconds ago", fontsize=8)
        ax.tick_params(labelsize=8)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    main()
