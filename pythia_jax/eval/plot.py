"""Metric vs. training step, one line per task: the figure researchers draw first.

Log-x with step 0 kept: the x axis is ``symlog`` (linear below step 1), so the initial
checkpoint sits at the left edge. Error bars are the stored standard errors.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, Sequence

from pythia_jax.errors import DataError
from pythia_jax.io_utils import atomic_files, check_output_file


def plot_metric(rows: Sequence[dict[str, Any]], metric: str, out: str | os.PathLike, *,
                tasks: Sequence[str] | None = None, title: str | None = None) -> str:
    """Render ``metric`` vs. step for every task in ``rows`` (tidy table rows) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for r in rows:
        if r["metric"] == metric and (tasks is None or r["task"] in tasks):
            series[r["task"]].append((int(r["step"]), float(r["value"]), float(r["stderr"])))
    if not series:
        have = sorted({r["metric"] for r in rows})
        raise DataError(f"no rows with metric {metric!r}" + (f" for tasks {list(tasks)}" if tasks else "")
                        + f"; metrics present: {', '.join(have) or 'none'}")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for task in sorted(series):
        pts = sorted(series[task])
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        errs = [0.0 if math.isnan(p[2]) else p[2] for p in pts]
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", markersize=3,
                    capsize=2, linewidth=1.2, label=task)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel("training step (log scale; step 0 at the left)")
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} across training")
    fig.tight_layout()
    out = os.fspath(out)
    check_output_file(out, "png")  # replaces a PNG, nothing else
    try:
        with atomic_files(out) as (tmp,):
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out
