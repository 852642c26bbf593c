"""Metric vs. training step, one line per task: the figure researchers draw first.

Log-x with step 0 kept: the x axis is ``symlog`` (linear below step 1), so the initial
checkpoint sits at the left edge. Error bars are the stored standard errors.

``plot_compare`` puts several runs on one figure (e.g. a baseline and an intervention branched
from it): one panel per (task, metric), one line per run.

A table holds one result per (step, task, metric): two (a concatenation of tables, results of
other checkpoints or settings) are refused by name rather than drawn as one zig-zag line. Runs
compared on one panel whose task settings differ (``--limit``, the task data, the context
window ...) are drawn with a warning naming the difference.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from typing import Any, Mapping, Sequence

from pythia_jax.errors import DataError
from pythia_jax.eval.provenance import PER_STEP_KEYS
from pythia_jax.io_utils import atomic_files, check_output_file

logger = logging.getLogger(__name__)


def check_one_result_per_step(rows: Sequence[dict[str, Any]], where: str) -> None:
    """``DataError`` naming the first (step, task, metric) that ``rows`` (one table, ``where``)
    holds twice, and how the two rows' origins differ."""
    seen: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (int(r["step"]), r["task"], r["metric"])
        if key in seen:
            why = _origin_difference(seen[key], r) or "the same origin: the rows were written twice"
            raise DataError(f"{where} holds two rows for step {key[0]} {key[1]} {key[2]} ({why}); a table plots one "
                            "result per step: keep one eval --out per checkpoints and settings")
        seen[key] = r


def _origin_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """How two rows' identities differ: checkpoints, weights or the settings that differ ("" if none)."""
    if a.get("checkpoint") != b.get("checkpoint"):
        return f"checkpoints {a.get('checkpoint')} and {b.get('checkpoint')}"
    if a.get("weights") != b.get("weights"):
        return "other weights of the same checkpoints"
    diff = _settings_difference(a.get("settings"), b.get("settings"))
    return f"settings {diff}" if diff else ""


def _settings_difference(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> str:
    a, b = a or {}, b or {}

    def show(v):
        text = "none" if v is None else v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        return text if len(text) <= 40 else text[:37] + "..."

    keys = sorted(k for k in set(a) | set(b) if k not in PER_STEP_KEYS
                  and json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True))
    return "; ".join(f"{k} {show(a.get(k))} vs {show(b.get(k))}" for k in keys)


def plot_metric(rows: Sequence[dict[str, Any]], metric: str, out: str | os.PathLike, *,
                tasks: Sequence[str] | None = None, title: str | None = None, where: str = "the table") -> str:
    """Render ``metric`` vs. step for every task in ``rows`` (tidy table rows; ``where`` names
    them in errors) as a PNG. ``DataError`` for no such rows, or two rows of one (step, task,
    metric) (``check_one_result_per_step``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_one_result_per_step([r for r in rows if r["metric"] == metric and (tasks is None or r["task"] in tasks)],
                              where)  # only what is drawn: a duplicate of another task does not block it

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
    set_step_axis(ax, [p[0] for pts in series.values() for p in pts])
    ax.set_xlabel("training step (log scale; step 0 at the left)")
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} across training")
    return save_figure(fig, out)


def set_step_axis(ax, steps: Sequence[int]) -> None:
    """A log-scaled training-step axis (``symlog``, linear below step 1) fitted to ``steps``:
    from step 0 when the data start there, else from just below the first step (a series of
    steps 100..200 spans the axis instead of sitting against its right edge), with a margin
    after the last step so its marker is not cut."""
    ax.set_xscale("symlog", linthresh=1.0)
    lo, hi = min(steps), max(steps)
    right = hi * 1.25 if hi > 0 else 1.0
    ax.set_xlim(left=0 if lo <= 0 else lo / 1.25, right=right)


def save_figure(fig, out: str | os.PathLike) -> str:
    """Write a matplotlib figure as a PNG at ``out`` (written aside, then renamed; replaces only a
    PNG) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = os.fspath(out)
    check_output_file(out, "png")  # replaces a PNG, nothing else
    try:
        with atomic_files(out) as (tmp,):
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out


def _points(rows: Sequence[dict[str, Any]], task: str, metric: str) -> list[tuple[int, float, float]]:
    return sorted((int(r["step"]), float(r["value"]), float(r["stderr"]))
                  for r in rows if r["task"] == task and r["metric"] == metric)


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v")


def plot_compare(runs: Mapping[str, Sequence[dict[str, Any]]], panels: Sequence[tuple[str, str]],
                 out: str | os.PathLike, *, title: str | None = None) -> str:
    """Several runs' results tables on one figure: a panel per ``(task, metric)`` in ``panels``,
    a line per run (labelled by its key in ``runs``), value vs. step with standard errors.

    Raises DataError when a panel has no rows in any run (naming what the tables hold).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs or not panels:
        raise DataError("plot_compare needs at least one run and one (task, metric) panel")
    for label, rows in runs.items():
        check_one_result_per_step([r for r in rows if (r["task"], r["metric"]) in set(panels)], f"run {label!r}")
    for task in dict.fromkeys(t for t, _ in panels):
        settings = {label: next((r.get("settings") for r in rows if r["task"] == task), None)
                    for label, rows in runs.items() if any(r["task"] == task for r in rows)}
        if len(settings) < 2:
            continue
        (first, base), *others = settings.items()
        for label, other in others:
            diff = _settings_difference(base, other)
            if diff:
                logger.warning("%s: runs %r and %r were evaluated with different settings (%s); their values "
                               "may not be comparable", task, first, label, diff)
    for task, metric in panels:
        if not any(_points(rows, task, metric) for rows in runs.values()):
            have = sorted({f"{r['task']}:{r['metric']}" for rows in runs.values() for r in rows})
            raise DataError(f"no run has {task}:{metric}; the tables hold {', '.join(have[:20]) or 'nothing'}")
    n = len(panels)
    cols = min(n, 3)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), dpi=120, squeeze=False)
    for ax, (task, metric) in zip(axes.flat, panels):
        for k, (label, rows) in enumerate(runs.items()):
            pts = _points(rows, task, metric)
            if not pts:
                continue
            errs = [0.0 if math.isnan(p[2]) else p[2] for p in pts]
            # each run its own line style and marker: runs with equal values stay visible
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=errs if any(errs) else None,
                        marker=_MARKERS[k % len(_MARKERS)], linestyle=_LINESTYLES[k % len(_LINESTYLES)],
                        markersize=3.5, capsize=2, linewidth=1.2, label=label)
        set_step_axis(ax, [p[0] for rows in runs.values() for p in _points(rows, task, metric)])
        ax.set_title(f"{task}: {metric}", fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)
