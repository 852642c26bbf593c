"""Few-shot arithmetic accuracy against how often the operand occurred in training by each
checkpoint: the term-frequency case study of the Pythia paper (Biderman et al. 2023, §5, after
Razeghi et al. 2022).

Inputs:

- a count table of ``pythia-jax count --preset numerals`` (``pythia_jax.data.count``; columns
  window_start, window_end, term, variant, count, cumulative) whose window ends include every
  evaluated checkpoint step: the count of operand x at step c is the ``cumulative`` count of
  term ``str(x)``, variant ``numeral``, at the window ending at c. The windows must start at step 0
  and have no gaps, and every operand must be listed (``operand_counts``);
- the per-item details of ``pythia-jax eval --tasks arithmetic`` (``<details-dir>/step<S>_
  arithmetic_<op>_k<k>.jsonl``, one JSON object per test item with x1 and correct).

Outputs: accuracy per (operation, k, step, operand); accuracy against the operand's count in
log-spaced count bins, one line per checkpoint (``plot_frequency``); and the "frequency gap":
mean accuracy of the ``n`` most frequent operands minus that of the ``n`` least frequent, ×100
(ties broken by the operand's value).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pythia_jax.errors import DataError, PythiaJaxError

logger = logging.getLogger(__name__)

DETAILS_RE = re.compile(r"^step(\d+)_arithmetic_(plus|times)_k(\d+)\.jsonl$")
Key = tuple[str, int, int]  # (operation, k, step)


def operand_counts(count_rows: Iterable[Mapping[str, Any]], steps: Sequence[int], operands: Iterable[int],
                   variant: str = "numeral") -> dict[int, dict[int, int]]:
    """{step: {operand: count in the training rows of steps [0, step)}} from count-table rows.

    The table must answer "how often was the operand seen up to step c": its windows must start
    at step 0 and follow each other without gaps (``cumulative`` is over [first window start,
    window end)), and every operand must have a ``variant`` row somewhere (a table counted with
    ``--numeral-max`` lists every number up to it, zeros included; an operand with no row at all
    was not counted, or the table cannot tell). A listed operand with no row at a window end has
    its cumulative count of the latest earlier window end that lists it (0 before its first row).

    Raises ``DataError`` when the windows do not start at 0 or have gaps, when a step is not a
    window end (its count is unknown) and when an operand has no row in the table.
    """
    operands = list(operands)
    ends: set[int] = set()
    windows: set[tuple[int, int]] = set()
    listed: set[int] = set()
    got: dict[int, dict[int, int]] = defaultdict(dict)
    wanted = {str(x): x for x in operands}
    for r in count_rows:
        start, end = int(r["window_start"]), int(r["window_end"])
        windows.add((start, end))
        ends.add(end)
        if r["variant"] == variant and r["term"] in wanted:
            listed.add(wanted[r["term"]])
            got[end][wanted[r["term"]]] = int(r["cumulative"])
    _check_windows(sorted(windows))
    missing = sorted(set(steps) - ends)
    if missing:
        raise DataError(f"the count table has no window ending at step(s) {missing} (window ends: "
                        f"{sorted(ends)[:8]}{'…' if len(ends) > 8 else ''}); count with "
                        f"--at-steps listing the evaluated checkpoint steps")
    absent = sorted(set(operands) - listed)
    if absent:
        shown = ", ".join(map(str, absent[:8])) + (f", … ({len(absent)} in all)" if len(absent) > 8 else "")
        raise DataError(f"operand(s) {shown} have no {variant!r} row in the count table, so their counts are "
                        f"unknown (not counted, e.g. above its --numeral-max); count with --preset numerals "
                        f"--numeral-max {max(operands)}, which lists every number up to it, zeros included")
    # a term with no occurrence up to a window end has no row there unless it occurred earlier
    out = {}
    for s in steps:
        prev = [e for e in sorted(ends) if e <= s]
        out[s] = {}
        for x in operands:
            c = 0
            for e in prev:  # the latest window end <= s that lists x holds its cumulative count
                c = got.get(e, {}).get(x, c)
            out[s][x] = c
    return out


def _check_windows(windows: Sequence[tuple[int, int]]) -> None:
    """``DataError`` unless the windows (sorted) are [0, e1), [e1, e2), …: cumulative counts from
    step 0 at every window end."""
    if not windows:
        raise DataError("the count table has no rows; count with 'pythia-jax count --preset numerals'")
    if windows[0][0] != 0:
        raise DataError(f"the count table's first window starts at step {windows[0][0]}, not 0, so its "
                        f"cumulative counts leave out steps [0, {windows[0][0]}); count from --start 0")
    for (a0, b0), (a1, b1) in zip(windows, windows[1:]):
        if a1 != b0:
            what = "a gap" if a1 > b0 else "an overlap"
            raise DataError(f"the count table's windows [{a0}, {b0}) and [{a1}, {b1}) leave {what}, so its "
                            "cumulative counts are not the counts up to each step; use one count's table "
                            "from --start 0")


def read_operand_accuracy(details_dir: str | os.PathLike) -> dict[Key, dict[int, float]]:
    """{(operation, k, step): {operand: accuracy}} from the arithmetic details files."""
    d = Path(details_dir)
    if not d.is_dir():
        raise DataError(f"{d}: no such directory; expected the --details-dir of 'pythia-jax eval "
                        f"--tasks arithmetic'")
    out: dict[Key, dict[int, float]] = {}
    for path in sorted(d.iterdir()):
        m = DETAILS_RE.match(path.name)
        if not m:
            continue
        step, op, k = int(m.group(1)), m.group(2), int(m.group(3))
        acc: dict[int, list[bool]] = defaultdict(list)
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    acc[int(r["x1"])].append(bool(r["correct"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise DataError(f"{path}:{lineno}: expected an arithmetic item with x1 and correct ({e})") from None
        out[(op, k, step)] = {x: float(np.mean(v)) for x, v in sorted(acc.items())}
    if not out:
        raise DataError(f"{d}: no step<S>_arithmetic_<op>_k<k>.jsonl files; run 'pythia-jax eval --tasks "
                        f"arithmetic --details-dir {d}' first")
    return out


def log_bins(lo: float, hi: float, n: int = 20) -> np.ndarray:
    """``n + 1`` log-spaced bin edges from ``lo`` to ``hi`` (both > 0)."""
    if not (0 < lo < hi) or n < 1:
        raise PythiaJaxError(f"count bins: expected 0 < low < high and n >= 1, got {lo}, {hi}, {n}")
    return np.logspace(math.log10(lo), math.log10(hi), n + 1)


def binned_accuracy(counts: Mapping[int, int], acc: Mapping[int, float], edges: np.ndarray
                    ) -> list[tuple[float, float, int]]:
    """(bin centre (geometric), mean accuracy of the operands in the bin, number of operands) for
    each non-empty bin; operands outside [edges[0], edges[-1]] (including count 0) are left out."""
    xs = [x for x in acc if x in counts and edges[0] <= counts[x] <= edges[-1]]
    idx = np.clip(np.searchsorted(edges, [counts[x] for x in xs], side="right") - 1, 0, len(edges) - 2)
    out = []
    for b in range(len(edges) - 1):
        members = [acc[x] for x, i in zip(xs, idx) if i == b]
        if members:
            out.append((float(math.sqrt(edges[b] * edges[b + 1])), float(np.mean(members)), len(members)))
    return out


def frequency_gap(counts: Mapping[int, int], acc: Mapping[int, float], n: int = 10) -> float:
    """(mean accuracy of the ``n`` most frequent operands − that of the ``n`` least frequent) × 100."""
    xs = sorted((x for x in acc if x in counts), key=lambda x: (counts[x], x))
    if len(xs) < 2 * n:
        raise PythiaJaxError(f"frequency gap over {n} + {n} operands needs {2 * n}, have {len(xs)}")
    return 100.0 * (float(np.mean([acc[x] for x in xs[-n:]])) - float(np.mean([acc[x] for x in xs[:n]])))


def gap_table(counts: Mapping[int, Mapping[int, int]], accs: Mapping[Key, Mapping[int, float]],
              shots: Sequence[int] = (0, 4, 16), n: int = 10) -> list[dict[str, Any]]:
    """Rows (operation, step, k, gap) for every evaluated (operation, k in ``shots``, step).

    ``PythiaJaxError`` when no k of ``shots`` was evaluated at a counted step (the table would be
    empty); a warning names the k of ``shots`` that were not."""
    have = sorted({key[1] for key in accs if key[2] in counts})
    missing = [k for k in shots if k not in have]
    if len(missing) == len(shots):
        raise PythiaJaxError(f"no arithmetic results at k={','.join(map(str, shots))} for the counted steps; "
                             f"k evaluated: {have}")
    if missing:
        logger.warning("no arithmetic results at k=%s for the counted steps: the gap table has k=%s only",
                       ",".join(map(str, missing)), ",".join(str(k) for k in shots if k in have))
    rows = []
    for (op, k, step), acc in sorted(accs.items()):
        if k in shots and step in counts:
            rows.append({"operation": op, "step": step, "k": k, "gap": frequency_gap(counts[step], acc, n)})
    return rows


def plot_frequency(counts: Mapping[int, Mapping[int, int]], accs: Mapping[Key, Mapping[int, float]],
                   out: str | os.PathLike, *, k: int = 16, bins: int = 20,
                   count_range: tuple[float, float] | None = None) -> str:
    """PNG: accuracy against the operand's count (log-x, ``bins`` log-spaced bins), one panel per
    operation, one line per checkpoint step. ``count_range`` default: the smallest and largest
    positive count over the plotted steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(key for key in accs if key[1] == k and key[2] in counts)
    if not keys:
        have = sorted({key[1] for key in accs})
        raise PythiaJaxError(f"no arithmetic results at k={k} for the counted steps; k evaluated: {have}")
    if count_range is None:
        pos = [c for key in keys for c in counts[key[2]].values() if c > 0]
        if not pos:
            raise DataError("every operand has count 0 at the plotted steps; nothing to place on a log axis")
        count_range = (min(pos), max(pos) * (1 + 1e-9) if min(pos) < max(pos) else min(pos) * 10)
    edges = log_bins(*count_range, bins)
    ops = sorted({key[0] for key in keys})
    fig, axes = plt.subplots(1, len(ops), figsize=(6.5 * len(ops), 4.5), dpi=120, squeeze=False)
    for ax, op in zip(axes[0], ops):
        for _, _, step in (key for key in keys if key[0] == op):
            pts = binned_accuracy(counts[step], accs[(op, k, step)], edges)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=f"step {step}")
        ax.set_xscale("log")
        ax.set_xlabel("operand count in the training data seen so far")
        ax.set_ylabel(f"{k}-shot accuracy")
        ax.set_title(f"{op}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    from pythia_jax.eval.plot import save_figure

    return save_figure(fig, out)
