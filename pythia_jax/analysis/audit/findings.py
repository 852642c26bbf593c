"""The checks over a series' step records: identical steps, duplicate shards / tensors,
configuration mismatches and parameter-norm jumps (``analyze``, ``norm_outliers``).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from pythia_jax.analysis.audit.report import Finding, StepRecord, _some


# ============================================================================ the checks
def analyze(records: Sequence[StepRecord], *, norm_window: int = 4, norm_z: float = 6.0,
            norm_min_jump: float = 0.1) -> list[Finding]:
    """All findings of a series of step records (ordered by step): each record's own problems,
    then identical steps, duplicate shards / tensors, config disagreements, non-finite values and
    norm jumps."""
    findings: list[Finding] = [f for r in records for f in r.problems]
    usable = [r for r in records if r.tensors]
    order = {r.label: i for i, r in enumerate(records)}
    same_as = _identical_steps(usable, order, findings)

    def related(a: StepRecord, b: StepRecord) -> bool:
        return same_as.get(a.label, a.label) == same_as.get(b.label, b.label)

    covered = _duplicate_shards(usable, related, findings)
    _duplicate_tensors(usable, related, covered, order, findings)
    _config_mismatches(records, findings)
    for r in usable:  # non-finite values
        bad = [f"{k} ({t.stats.nonfinite} of {t.stats.numel})" for k, t in r.tensors.items()
               if t.stats is not None and t.stats.nonfinite]
        if bad:
            findings.append(Finding("nonfinite", r.label, f"NaN/inf values in {_some(bad)}"))
    _norm_jumps(records, usable, same_as, findings, window=norm_window, z=norm_z, min_jump=norm_min_jump)
    findings.sort(key=lambda f: (order.get(f.step, -1), f.kind))
    return findings


def _identical_steps(usable: list[StepRecord], order: dict[str, int], findings: list[Finding]) -> dict[str, str]:
    """Steps whose every tensor equals an earlier step's (equal fingerprints): one finding each;
    returns ``{label: label of the first step of its group}``."""
    same_as: dict[str, str] = {}
    by_print: dict[str, list[StepRecord]] = defaultdict(list)
    for r in usable:
        if r.readable:
            by_print[r.fingerprint()].append(r)
    for group in by_print.values():
        for prev, r in zip(group, group[1:]):
            adjacent = order[r.label] == order[prev.label] + 1
            if (prev.step, r.step) == (0, 1):  # lr(0) = 0: the first update leaves the weights as they are
                findings.append(Finding("identical_step", r.label, f"byte-identical to {prev.label}'s, as "
                                        "expected: GPT-NeoX's warmup starts at lr 0, so the first update "
                                        "does not move the weights", "note", other=prev.label))
            else:
                findings.append(Finding("identical_step", r.label,
                                        f"every tensor is byte-identical to {prev.label}'s"
                                        + ("" if adjacent else " (not adjacent in the series)"),
                                        other=prev.label))
            same_as[r.label] = group[0].label
    return same_as


def _duplicate_shards(usable: list[StepRecord], related, findings: list[Finding]) -> set[tuple[str, str, str]]:
    """Weight files (shards) byte-identical across unrelated steps; returns the (step, other,
    file) triples reported, which the tensor check skips."""
    by_file: dict[tuple[str, str], list[StepRecord]] = defaultdict(list)
    for r in usable:
        for name, digest in r.files.items():
            by_file[(name, digest)].append(r)
    covered: set[tuple[str, str, str]] = set()
    for (name, _), group in by_file.items():
        for r in group:
            others = [o for o in group if o is not r and not related(o, r)]
            if others:
                findings.append(Finding("duplicate_shard", r.label,
                                        f"{name} is byte-identical to {_some([o.label for o in others])}'s "
                                        "(a shard from another step?)", other=others[0].label))
                covered.update((r.label, o.label, name) for o in others)
    return covered


def _duplicate_tensors(usable: list[StepRecord], related, covered: set[tuple[str, str, str]],
                       order: dict[str, int], findings: list[Finding]) -> None:
    """Tensors (same key) byte-identical across unrelated steps, outside the shards already
    reported; constant tensors are skipped."""
    from pythia_jax.convert.hf import is_ignored_key

    dup: dict[tuple[str, str], list[str]] = defaultdict(list)
    by_tensor: dict[tuple[str, str, str], list[StepRecord]] = defaultdict(list)
    for r in usable:
        for key, t in r.tensors.items():
            if is_ignored_key(key) or t.stats is None or t.stats.constant or t.stats.numel == 0:
                continue
            by_tensor[(key, t.dtype, t.digest)].append(r)
    for (key, _, _), group in by_tensor.items():
        for r in group:
            for o in group:
                if o is r or related(o, r) or (r.label, o.label, r.tensors[key].file) in covered:
                    continue
                dup[(r.label, o.label)].append(key)
    for (label, other), keys in sorted(dup.items(), key=lambda kv: (order[kv[0][0]], order[kv[0][1]])):
        findings.append(Finding("duplicate_tensor", label,
                                f"{len(keys)} tensor(s) byte-identical to {other}'s: {_some(sorted(keys))}",
                                other=other))


def _config_mismatches(records: Sequence[StepRecord], findings: list[Finding]) -> None:
    """Each step's config compared with the most common architecture of the series."""
    configs = [r for r in records if r.config is not None]
    if not configs:
        return
    common_json, _ = Counter(json.dumps(r.config, sort_keys=True) for r in configs).most_common(1)[0]
    common = json.loads(common_json)
    for r in configs:
        diff = [f"{k} {r.config.get(k)!r} (others: {common.get(k)!r})"
                for k in sorted(set(common) | set(r.config)) if r.config.get(k) != common.get(k)]
        if diff:
            findings.append(Finding("config_mismatch", r.label, "; ".join(diff)))


def _norm_jumps(records: Sequence[StepRecord], usable: list[StepRecord], same_as: dict[str, str],
                findings: list[Finding], *, window: int, z: float, min_jump: float) -> None:
    """Norm jumps of the whole model and of each group, among readable steps with finite values
    (``norm_outliers``); a note when fewer than 4 such steps exist."""
    trend = [r for r in usable if r.readable and r.step is not None
             and not any(t.stats is not None and t.stats.nonfinite for t in r.tensors.values())
             and same_as.get(r.label, r.label) == r.label]
    if len(trend) >= 4:
        jumps: dict[str, list[str]] = defaultdict(list)
        series = {"model": [r.norm for r in trend]}
        for g in sorted(set.intersection(*(set(r.groups) for r in trend))):
            series[g] = [r.groups[g].norm for r in trend]
        for name, values in series.items():
            for i, score in norm_outliers(values, window=window, z=z, min_jump=min_jump):
                jumps[trend[i].label].append(f"{name} {values[i]:.4g} ({score:+.2f} log vs trend)")
        for r in trend:
            if jumps.get(r.label):
                findings.append(Finding("norm_jump", r.label,
                                        f"parameter norm off the series' trend: {_some(jumps[r.label], 6)}"))
    elif len(records) > 1:
        findings.append(Finding("norm_trend", "-", f"only {len(trend)} usable step(s): norm trend not "
                                "checked (needs 4)", "note"))


def norm_outliers(values: Sequence[float], *, window: int = 4, z: float = 6.0,
                  min_jump: float = 0.1) -> list[tuple[int, float]]:
    """Indices of ``values`` (positive norms, in step order) that leave their local trend.

    For each point, its up-to-``window`` neighbours on each side (at least 3 in all) are fitted
    with a Theil–Sen line of log(norm) against position in the series (slope from
    ``scipy.stats.theilslopes``, intercept the median residual: robust to a minority of outliers
    among the neighbours); the point is flagged when its
    log-norm is further from the line than ``max(z · 1.4826 · MAD of the neighbours' residuals,
    min_jump)``. ``min_jump`` (natural log units; 0.1 ≈ 10 %) keeps near-constant series from
    flagging noise. Returns ``[(index, signed log distance)]``.
    """
    from scipy import stats

    x = np.log(np.maximum(np.asarray(values, np.float64), 1e-30))
    n = len(x)
    out = []
    for i in range(n):
        idx = [j for j in range(max(0, i - window), min(n, i + window + 1)) if j != i]
        if len(idx) < 3:
            continue
        t = np.asarray(idx, np.float64)
        slope = float(stats.theilslopes(x[idx], t)[0])
        intercept = float(np.median(x[idx] - slope * t))  # (scipy's median(y) - slope*median(t) is
        # biased when the neighbours are unevenly placed around the point)
        resid = x[idx] - (intercept + slope * t)
        mad = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
        dist = float(x[i] - (intercept + slope * i))
        if abs(dist) > max(z * mad, min_jump):
            out.append((i, dist))
    return out
