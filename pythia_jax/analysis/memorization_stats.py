"""Statistics of per-row memorization results (the analyses of the Pythia paper's memorization
case study, Biderman et al. 2023, section 4.2, and its public ``predictable-memorization``
analysis), as pure functions of arrays.

Inputs are per-row results of one or more checkpoints: the row index in training order, the
memorized flag (all 32 greedy tokens equal the true continuation) and the score (fraction of
the 32 tokens that match, in {0, 1/32, …, 1}).

- Poisson analysis: memorized rows counted in windows of ``window`` (512) consecutive rows and
  compared with Poisson(mean count): Q-Q data (and PNG), the index-of-dispersion test, a
  chi-square goodness-of-fit test on binned counts and a KS test (conservative on discrete
  counts). The paper drew the Q-Q plot only; the tests are added beside it.
- Correlation of per-row scores between checkpoints on the rows every one of them has seen
  (Pearson and Spearman).
- Whether checkpoint A's memorized set predicts checkpoint B's: confusion matrix, precision,
  recall (on the rows both have seen).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pythia_jax.errors import DataError

logger = logging.getLogger(__name__)

WINDOW = 512


# ============================================================================ Poisson analysis
def window_counts(rows: np.ndarray, memorized: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Memorized rows per window of ``window`` consecutive rows: int64 [num_windows].

    ``rows`` (int, any order) must be a full sweep [0, N) with each row once (a sampled run has
    no complete windows): ``DataError`` otherwise. A last window shorter than ``window`` is
    dropped (logged).
    """
    rows = np.asarray(rows, np.int64)
    memorized = np.asarray(memorized, bool)
    if rows.shape != memorized.shape or rows.ndim != 1:
        raise DataError(f"rows and memorized must be 1-D of one length, got {rows.shape} and {memorized.shape}")
    if window < 1:
        raise DataError(f"window must be >= 1, got {window}")
    n = len(rows)
    order = np.argsort(rows, kind="stable")
    if n == 0 or rows[order[0]] != 0 or rows[order[-1]] != n - 1 or np.any(np.diff(rows[order]) != 1):
        raise DataError(f"the Poisson analysis needs every row of [0, N) once (a full sweep); got {n} "
                        f"rows spanning [{rows.min() if n else 0}, {rows.max() + 1 if n else 0}) — rerun "
                        "memorization without --mem-sample")
    full = n // window
    if full == 0:
        raise DataError(f"{n} rows make no complete window of {window}")
    if n % window:
        logger.info("Poisson analysis: the last %d rows (an incomplete window of %d) are left out",
                    n % window, window)
    flags = memorized[order][: full * window]
    return flags.reshape(full, window).sum(axis=1).astype(np.int64)


@dataclasses.dataclass
class TestResult:
    """A test's statistic, degrees of freedom (None for KS) and p-value."""

    statistic: float
    pvalue: float
    dof: int | None = None


def dispersion_test(counts: np.ndarray) -> TestResult:
    """Index-of-dispersion test of Poisson counts: D = (n-1)·s²/mean with s² the sample variance
    (ddof=1), distributed chi2(n-1) under the Poisson hypothesis; two-sided p-value
    ``2·min(P(X ≤ D), P(X ≥ D))`` (small D: under-dispersion, large D: over-dispersion)."""
    from scipy import stats

    c = np.asarray(counts, np.float64)
    n = c.size
    if n < 2:
        raise DataError(f"the dispersion test needs at least 2 windows, got {n}")
    mean = c.mean()
    if mean == 0:
        raise DataError("no memorized rows in any window: the dispersion test is undefined")
    d = (n - 1) * c.var(ddof=1) / mean
    p = 2 * min(stats.chi2.cdf(d, n - 1), stats.chi2.sf(d, n - 1))
    return TestResult(float(d), float(min(p, 1.0)), n - 1)


def poisson_bins(counts: np.ndarray, min_expected: float = 5.0) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Bins of counts for a chi-square test against Poisson(mean): ``([(lo, hi)], observed,
    expected)`` with ``hi`` inclusive (the first bin starts at 0, the last is open-ended:
    ``hi = -1``). Adjacent bins are merged from both tails until every expected count is at least
    ``min_expected`` (the usual rule for the chi-square approximation)."""
    from scipy import stats

    c = np.asarray(counts, np.int64)
    n, mu = c.size, float(c.mean())
    top = int(max(c.max(), stats.poisson.ppf(1 - 1e-9, mu))) if mu > 0 else 0
    edges = list(range(top + 1))
    obs = [int(np.sum(c == k)) for k in edges]
    exp = [n * float(stats.poisson.pmf(k, mu)) for k in edges]
    exp[-1] = n * float(stats.poisson.sf(top - 1, mu))  # P(X >= top)
    bins = [(k, k) for k in edges]
    bins[-1] = (top, -1)

    def merge(i: int, j: int) -> None:  # merge bin j into i (adjacent)
        lo, hi = min(bins[i][0], bins[j][0]), (-1 if -1 in (bins[i][1], bins[j][1]) else max(bins[i][1], bins[j][1]))
        bins[i] = (lo, hi)
        obs[i] += obs[j]
        exp[i] += exp[j]
        del bins[j], obs[j], exp[j]

    while len(bins) > 1 and exp[-1] < min_expected:  # upper tail
        merge(len(bins) - 2, len(bins) - 1)
    while len(bins) > 1 and exp[0] < min_expected:   # lower tail
        merge(0, 1)
    i = 1
    while i < len(bins) - 1:                          # any low bin left in the middle
        if exp[i] < min_expected:
            merge(i, i + 1)
        else:
            i += 1
    return bins, np.asarray(obs, np.float64), np.asarray(exp, np.float64)


def poisson_gof(counts: np.ndarray, min_expected: float = 5.0) -> TestResult:
    """Chi-square goodness of fit of counts to Poisson(mean) on :func:`poisson_bins`
    (``scipy.stats.chisquare`` with ``ddof=1`` for the estimated mean: k-2 degrees of freedom)."""
    from scipy import stats

    bins, obs, exp = poisson_bins(counts, min_expected)
    if len(bins) < 3:
        raise DataError(f"only {len(bins)} bin(s) with expected count >= {min_expected}: too few "
                        "windows for a chi-square test (use more rows or the dispersion test)")
    res = stats.chisquare(obs, exp, ddof=1)
    return TestResult(float(res.statistic), float(res.pvalue), len(bins) - 2)


def poisson_ks(counts: np.ndarray) -> TestResult:
    """Kolmogorov-Smirnov test of counts against Poisson(mean).

    The statistic is D = max over integers k of |ECDF(k) - F(k)| (both step functions jump only
    at integers, so this is the supremum over all x), and the p-value is the continuous-case
    one, ``scipy.stats.kstwo.sf(D, n)``. KS assumes a continuous distribution: for discrete
    data this p-value is conservative (too large), and estimating the mean from the same data
    makes it more conservative still; read it beside the dispersion and chi-square tests.

    ``scipy.stats.kstest(counts, poisson(mean).cdf)`` is *not* used: it evaluates D- as
    ``F(x_i) - (i-1)/n`` at every sample, which on tied (discrete) samples adds the probability
    mass of the tied value and overstates D. On 200 genuine Poisson(3) samples of 400 windows
    it rejected all 200 at 0.05, against none with the statistic above.
    """
    from scipy import stats

    c = np.asarray(counts, np.int64)
    n = c.size
    if n == 0:
        raise DataError("the KS test needs at least one window")
    mu = float(c.mean())
    k = np.arange(0, int(max(c.max(), stats.poisson.ppf(1 - 1e-12, mu))) + 1)
    ecdf = np.searchsorted(np.sort(c), k, side="right") / n
    d = float(np.max(np.abs(ecdf - stats.poisson.cdf(k, mu))))
    return TestResult(d, float(stats.kstwo.sf(d, n)))


def qq_points(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q-Q data: (Poisson(mean) quantiles at plotting positions (i - 0.5)/n, sorted counts)."""
    from scipy import stats

    c = np.sort(np.asarray(counts, np.float64))
    n = c.size
    probs = (np.arange(1, n + 1) - 0.5) / n
    return stats.poisson.ppf(probs, float(c.mean())), c


@dataclasses.dataclass
class PoissonReport:
    """The Poisson analysis of one checkpoint; ``gof`` is None when too few bins remain."""

    windows: int
    window: int
    mean: float
    variance: float
    dispersion: TestResult
    gof: TestResult | None
    ks: TestResult
    alpha: float

    @property
    def rejects_poisson(self) -> bool:
        """True when the dispersion test (the most powerful of the three against over- or
        under-dispersion) rejects the Poisson hypothesis at ``alpha``."""
        return self.dispersion.pvalue < self.alpha

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rejects_poisson"] = self.rejects_poisson
        return d


def poisson_analysis(counts: np.ndarray, *, window: int = WINDOW, alpha: float = 0.01,
                     min_expected: float = 5.0) -> PoissonReport:
    """All three tests of :func:`window_counts` output against Poisson(mean)."""
    c = np.asarray(counts, np.int64)
    try:
        gof = poisson_gof(c, min_expected)
    except DataError as e:
        logger.info("chi-square test skipped: %s", e)
        gof = None
    return PoissonReport(windows=int(c.size), window=window, mean=float(c.mean()),
                         variance=float(c.var(ddof=1)) if c.size > 1 else float("nan"),
                         dispersion=dispersion_test(c), gof=gof, ks=poisson_ks(c), alpha=alpha)


# ============================================================================ across checkpoints
def common_rows(results: Mapping[int, np.ndarray]) -> np.ndarray:
    """Sorted rows present in every result (structured arrays with a ``row`` field)."""
    rows = None
    for r in results.values():
        rows = np.asarray(r["row"], np.int64) if rows is None else np.intersect1d(rows, r["row"])
    return np.unique(rows) if rows is not None else np.zeros(0, np.int64)


def _on_rows(result: np.ndarray, rows: np.ndarray, field: str) -> np.ndarray:
    order = np.argsort(result["row"], kind="stable")
    pos = np.searchsorted(result["row"][order], rows)
    return np.asarray(result[field])[order][pos]


@dataclasses.dataclass
class Correlation:
    step_a: int
    step_b: int
    rows: int
    pearson: float
    pearson_p: float
    spearman: float
    spearman_p: float


def score_correlations(results: Mapping[int, np.ndarray]) -> tuple[np.ndarray, list[Correlation]]:
    """Pearson and Spearman correlation of per-row scores (``scipy.stats.pearsonr`` /
    ``spearmanr``) for every pair of checkpoints, on the rows all of them have seen.
    Returns (the common rows, one :class:`Correlation` per pair a < b). A constant score vector
    gives NaN (scipy warns and returns NaN)."""
    import warnings

    from scipy import stats

    rows = common_rows(results)
    steps = sorted(results)
    scores = {s: _on_rows(results[s], rows, "score").astype(np.float64) for s in steps}
    out = []
    for i, a in enumerate(steps):
        for b in steps[i + 1:]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if len(rows) >= 2:
                    p = stats.pearsonr(scores[a], scores[b])
                    sp = stats.spearmanr(scores[a], scores[b])
                    vals = (float(p.statistic), float(p.pvalue), float(sp.statistic), float(sp.pvalue))
                else:
                    vals = (math.nan,) * 4
            out.append(Correlation(a, b, int(len(rows)), *vals))
    return rows, out


@dataclasses.dataclass
class Prediction:
    """Checkpoint ``source``'s memorized set as a predictor of ``target``'s, on ``rows`` common
    rows: confusion matrix ``[[tn, fp], [fn, tp]]`` (rows: target not / memorized; columns:
    predicted not / memorized), precision = tp/(tp+fp), recall = tp/(tp+fn) (NaN when undefined)."""

    source: int
    target: int
    rows: int
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def confusion(self) -> np.ndarray:
        return np.array([[self.tn, self.fp], [self.fn, self.tp]], np.int64)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "precision": self.precision, "recall": self.recall}


def predict_memorized(source: np.ndarray, target: np.ndarray, source_step: int = 0,
                      target_step: int = 0) -> Prediction:
    """How well ``source``'s memorized rows predict ``target``'s, on the rows both have
    (structured arrays with ``row`` and ``memorized`` fields)."""
    rows = common_rows({0: source, 1: target})
    a = _on_rows(source, rows, "memorized").astype(bool)
    b = _on_rows(target, rows, "memorized").astype(bool)
    return Prediction(source_step, target_step, int(len(rows)), tp=int(np.sum(a & b)), fp=int(np.sum(a & ~b)),
                      fn=int(np.sum(~a & b)), tn=int(np.sum(~a & ~b)))


# ============================================================================ reading results
RESULT_DTYPE = np.dtype([("row", np.int64), ("memorized", np.bool_), ("score", np.float64)])
_STEP_FILE = re.compile(r"step(\d+)_memorization.*\.npy$")


def normalize_result(raw: np.ndarray, gen_len: int = 32, source: str = "result") -> np.ndarray:
    """A per-row structured array -> RESULT_DTYPE (row, memorized, score).

    The score is the ``score`` field when there is one (fraction of the ``gen_len`` tokens
    correct), else ``matched / gen_len`` (matched token count), else the memorized flag (0/1).
    ``memorized`` is taken from its field, else ``score == 1``."""
    names = raw.dtype.names or ()
    if "row" not in names or not ({"memorized", "score", "matched"} & set(names)):
        raise DataError(f"{source}: expected per-row memorization results with fields row and "
                        f"score / matched / memorized, found fields {list(names) or raw.dtype}")
    out = np.zeros(len(raw), RESULT_DTYPE)
    out["row"] = raw["row"]
    if "score" in names:
        out["score"] = raw["score"]
    elif "matched" in names:
        out["score"] = np.asarray(raw["matched"], np.float64) / gen_len
    else:
        out["score"] = np.asarray(raw["memorized"], np.float64)
    out["memorized"] = raw["memorized"] if "memorized" in names else out["score"] >= 1.0
    if np.any((out["score"] < 0) | (out["score"] > 1)):
        raise DataError(f"{source}: scores outside [0, 1] (is --gen-len {gen_len} right?)")
    if len(np.unique(out["row"])) != len(out):
        raise DataError(f"{source}: a row appears more than once")
    return out


def load_results(paths: Iterable[str | os.PathLike], gen_len: int = 32) -> dict[int, np.ndarray]:
    """``{step: RESULT_DTYPE array sorted by row}`` from ``step<N>_memorization*.npy`` files or
    directories holding them (``pythia-jax eval``'s ``<out>_details/``). Several files of one step
    (per-host parts) are concatenated. ``DataError`` for a missing path, no files or bad content."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if _STEP_FILE.search(f.name))
            if not found:
                raise DataError(f"{p} holds no step<N>_memorization*.npy files")
            files += found
        elif p.is_file():
            if not _STEP_FILE.search(p.name):
                raise DataError(f"{p}: expected a file named step<N>_memorization*.npy (the step is "
                                "read from the name)")
            files.append(p)
        else:
            raise DataError(f"{p} does not exist")
    _check_same_rows(files)
    parts: dict[int, list[np.ndarray]] = {}
    for f in files:
        m = _STEP_FILE.search(f.name)
        assert m is not None
        try:
            raw = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {f}: {e}") from None
        parts.setdefault(int(m.group(1)), []).append((f, normalize_result(raw, gen_len, str(f))))
    out = {}
    for step, ps in sorted(parts.items()):
        merged = np.concatenate([p for _, p in ps])
        if len(np.unique(merged["row"])) != len(merged):  # each file is duplicate-free (above)
            names = ", ".join(str(f) for f, _ in ps)
            raise DataError(f"step {step}: {len(ps)} files hold results for the same rows ({names}); "
                            "per-host parts of one step cover disjoint rows: pass one result per step")
        out[step] = normalize_result(merged, gen_len, f"step {step}")[np.argsort(merged["row"], kind="stable")]
    return out


def _check_same_rows(files: list[Path]) -> None:
    """Row i must mean the same training sequence in every file: the ``rows`` each file was scored
    on (data, order, seed, batch, sequence length, transform), read from its details folder's
    ``provenance.jsonl`` (``pythia_jax.eval.provenance.DetailsLedger``), must agree, else
    ``DataError`` naming both files and the settings that differ. Files without a record (copied
    out of their folder, written by an older pythia-jax) are reported with a warning."""
    from pythia_jax.eval.provenance import DetailsLedger

    ledgers: dict[Path, dict[str, dict]] = {}
    rows: dict[Path, dict] = {}
    unrecorded = []
    for f in files:
        folder = f.parent
        if folder not in ledgers:  # the newest record of each memorization file
            ledgers[folder] = {r.get("file"): r for r in DetailsLedger(folder).records
                               if isinstance(r, dict) and r.get("task") == "memorization"}
        rec = ledgers[folder].get(f.name)
        fp = ((rec or {}).get("settings") or {}).get("rows")
        if fp is None:
            unrecorded.append(f)
        else:
            rows[f] = fp
    if rows:
        # train_iters may change between steps of one run (an accepted num_steps change keeps the
        # rows of the steps already trained; eval lets the rows record differ per step): not compared
        rows = {f: {k: v for k, v in fp.items() if k != "train_iters"} for f, fp in rows.items()}
        (first, want), *others = rows.items()
        for f, fp in others:
            if fp != want:
                keys = sorted(k for k in set(want) | set(fp) if want.get(k) != fp.get(k))
                diff = "; ".join(f"{k} {want.get(k)!r} vs {fp.get(k)!r}" for k in keys)
                raise DataError(f"{first} and {f} were scored on different training rows ({diff}), so row i is "
                                "not the same sequence in both: report each run's results separately")
    if unrecorded and len(files) > 1:
        logger.warning("no provenance record for %s (not in its eval details folder?): cannot check that every "
                       "file covers the same training rows", ", ".join(map(str, unrecorded[:3]))
                       + (" …" if len(unrecorded) > 3 else ""))


# ============================================================================ figures
def plot_qq(counts: np.ndarray, out: str | os.PathLike, title: str = "") -> str:
    """Q-Q plot of window counts against Poisson(mean) as a PNG (written aside, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    theo, emp = qq_points(counts)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.scatter(theo, emp, s=8, alpha=0.6)
    hi = float(max(theo.max(initial=0), emp.max(initial=0))) + 1
    ax.plot([0, hi], [0, hi], color="gray", linewidth=1, linestyle="--")
    ax.set_xlabel(f"Poisson({float(np.mean(counts)):.3g}) quantiles")
    ax.set_ylabel("memorized rows per window")
    ax.set_title(title or "memorized counts vs Poisson")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_correlations(steps: Sequence[int], corrs: Sequence[Correlation], out: str | os.PathLike,
                      method: str = "spearman") -> str:
    """Heat map of the pairwise score correlations as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = {s: i for i, s in enumerate(steps)}
    m = np.eye(len(steps))
    for c in corrs:
        v = getattr(c, method)
        m[idx[c.step_a], idx[c.step_b]] = m[idx[c.step_b], idx[c.step_a]] = v
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(steps), 1 + 0.6 * len(steps)), dpi=120)
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90)
    ax.set_yticks(range(len(steps)), [str(s) for s in steps])
    for i in range(len(steps)):
        for j in range(len(steps)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    ax.set_title(f"{method} correlation of per-row scores")
    fig.tight_layout()
    return _save(fig, out)


def _save(fig: Any, out: str | os.PathLike) -> str:
    from pythia_jax.eval.plot import save_figure

    return save_figure(fig, out)


__all__ = ["WINDOW", "window_counts", "dispersion_test", "poisson_bins", "poisson_gof", "poisson_ks",
           "qq_points", "PoissonReport", "poisson_analysis", "common_rows", "Correlation",
           "score_correlations", "Prediction", "predict_memorized", "RESULT_DTYPE", "normalize_result",
           "load_results", "plot_qq", "plot_correlations", "TestResult"]
