#!/usr/bin/env python3
"""Renders the dashboard's memory panel for the OOM scenario of tests/tests/cluster_e2e.rs.

The end-to-end test writes what Prometheus recorded while a build was OOM-killed and resumed
with a poorer preset (the dashboard's "Working set vs limit" queries, 1 s scrapes, per build
pod) and what the kubelet and the kernel reported for each attempt, to
$IMAGEINDEX_E2E_OUT/oom-memory.json. This draws it: each attempt's working set against its
limit, the kernel's kill, the poorer preset finishing.

Regenerate (root, a machine set up by scripts/setup.sh):

    IMAGEINDEX_E2E_OUT=/tmp/e2e cargo test -p imageindex-e2e --test cluster_e2e -- --nocapture
    /var/cache/imageindex/tools/venv/bin/python docs/oom-memory.py /tmp/e2e/oom-memory.json docs/oom-memory.png
"""

import json
import sys
from datetime import datetime

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 1024 * 1024
COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]


def seconds(stamp):
    """An RFC 3339 time as Unix seconds."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def main(src, dst):
    with open(src, encoding="utf-8") as f:
        data = json.load(f)
    t0 = seconds(data["appliedAt"])
    limit = data["limitBytes"] / MIB
    series = {s["metric"].get("pod"): s["values"] for s in data["workingSet"]}

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    ax.axhline(limit, color="black", linestyle="--", linewidth=1)
    ax.text(0.3, limit + 1, f"memory limit {data['limit']} (requests = limits)", fontsize=8)
    end = 0.0
    for i, attempt in enumerate(data["attempts"]):
        color = COLORS[i % len(COLORS)]
        kubelet = attempt["kubelet"]
        values = series.get(attempt["pod"], [])
        xs = [float(t) - t0 for t, _ in values]
        ys = [float(v) / MIB for _, v in values]
        # The kubelet's times have whole seconds: the container ran until the later of its
        # finishedAt and its last scrape.
        start = seconds(kubelet.get("startedAt") or attempt["startTime"]) - t0
        finish = max([seconds(kubelet.get("finishedAt") or attempt["endTime"]) - t0] + xs)
        end = max(end, finish)
        ax.axvspan(start, finish, color=color, alpha=0.07)
        label = f"attempt {attempt['number']}: {attempt['preset']}, {attempt['outcome']}"
        ax.plot(xs, ys, color=color, marker="o", markersize=3, linewidth=1.5, label=label)
        peak = (attempt["kernel"].get("podPeakBytes") or 0) / MIB
        if attempt["outcome"] == "OOMKilled":
            # Between the last scrape and the kill the working set climbed to the limit.
            if xs:
                ax.plot([xs[-1], finish], [ys[-1], peak], color=color, linestyle=":", linewidth=1)
            ax.plot([finish], [peak], marker="X", markersize=10, color=color, linestyle="none")
            ax.annotate(
                f"kernel OOM kill at {peak:.0f} MiB\nkubelet: OOMKilled, exit {kubelet.get('exitCode')}",
                (finish, peak),
                xytext=(-150, -48),
                textcoords="offset points",
                fontsize=8,
                arrowprops={"arrowstyle": "->", "color": color},
            )
        else:
            ax.annotate(
                f"{attempt['preset']} resumes and publishes\n(peak {peak:.0f} MiB, kernel)",
                (finish, ys[-1] if ys else peak),
                xytext=(-130, 32),
                textcoords="offset points",
                fontsize=8,
                arrowprops={"arrowstyle": "->", "color": color},
            )
    ax.set_xlim(0, end + 2)
    ax.set_ylim(0, limit * 1.25)
    ax.set_xlabel("seconds after kubectl apply")
    ax.set_ylabel("working set (MiB)")
    ax.set_title(
        f"ImageIndex {data['namespace']}/{data['imageindex']}: build working set vs limit "
        "(Prometheus, dashboard query)",
        fontsize=9,
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst)
    print(f"wrote {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: oom-memory.py OOM-MEMORY.json OUT.png")
    main(sys.argv[1], sys.argv[2])
