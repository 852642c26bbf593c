"""Memorization statistics: the Poisson tests equal scipy's, and flag only over-dispersed counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from pythia_jax.analysis import memorization_stats as ms
from pythia_jax.cli import main
from pythia_jax.errors import DataError

N_WINDOWS = 400
MEAN = 3.0


def synthetic(seed: int = 0):
    rng = np.random.default_rng(seed)
    poisson = rng.poisson(MEAN, N_WINDOWS)
    r = 2.0  # negative binomial with the same mean, variance MEAN + MEAN**2 / r
    over = rng.negative_binomial(r, r / (r + MEAN), N_WINDOWS)
    return poisson, over


def rows_from_counts(counts, window=512, seed=0):
    """A full sweep of rows whose windows hold exactly ``counts`` memorized rows."""
    rng = np.random.default_rng(seed)
    flags = np.zeros(len(counts) * window, bool)
    for w, c in enumerate(counts):
        flags[w * window + rng.choice(window, size=int(c), replace=False)] = True
    perm = rng.permutation(len(flags))  # any order in, counted by row
    return np.arange(len(flags))[perm], flags[perm]


def test_window_counts_full_sweep_only():
    counts = np.array([0, 3, 1, 7])
    rows, flags = rows_from_counts(counts, window=16)
    np.testing.assert_array_equal(ms.window_counts(rows, flags, window=16), counts)
    # an incomplete last window is dropped
    np.testing.assert_array_equal(ms.window_counts(rows[rows < 60], flags[rows < 60], window=16), counts[:3])
    with pytest.raises(DataError, match="full sweep"):
        ms.window_counts(rows[rows != 5], flags[rows != 5], window=16)


@pytest.mark.parametrize("which", [0, 1])
def test_statistics_equal_scipy(which):
    counts = synthetic()[which]
    n, mean, var = counts.size, counts.mean(), counts.var(ddof=1)
    d = ms.dispersion_test(counts)
    assert d.statistic == pytest.approx((n - 1) * var / mean, rel=1e-12)
    assert d.dof == n - 1
    assert d.pvalue == pytest.approx(2 * min(stats.chi2.cdf(d.statistic, n - 1), stats.chi2.sf(d.statistic, n - 1)))

    bins, obs, exp = ms.poisson_bins(counts)
    assert obs.sum() == n and exp.sum() == pytest.approx(n)
    assert exp.min() >= 5
    # the observed counts match the bins, computed independently
    for (lo, hi), o in zip(bins, obs):
        assert o == np.sum((counts >= lo) & ((counts <= hi) if hi >= 0 else True))
    gof = ms.poisson_gof(counts)
    chi2 = float(np.sum((obs - exp) ** 2 / exp))
    assert gof.statistic == pytest.approx(chi2, rel=1e-12)
    assert gof.dof == len(bins) - 2
    assert gof.pvalue == pytest.approx(stats.chi2.sf(chi2, len(bins) - 2), rel=1e-9)

    ks = ms.poisson_ks(counts)
    # sup over x of |ECDF - F|, evaluated on a fine grid of x (not only at the integers)
    x = np.linspace(-0.5, counts.max() + 20, 20001)
    ecdf = np.array([np.mean(counts <= v) for v in x[::10]])
    d = np.max(np.abs(ecdf - stats.poisson.cdf(x[::10], mean)))
    assert ks.statistic == pytest.approx(d, rel=1e-12)
    assert ks.pvalue == pytest.approx(stats.kstwo.sf(d, n))
    # scipy's D+ (ECDF above F) is right for discrete data; its D- is not (see poisson_ks)
    ref = stats.kstest(counts, stats.poisson(mean).cdf, alternative="greater")
    assert ks.statistic >= ref.statistic - 1e-12

    theo, emp = ms.qq_points(counts)
    np.testing.assert_array_equal(emp, np.sort(counts))
    assert theo[0] == stats.poisson.ppf(0.5 / n, mean)


def test_flags_only_overdispersed():
    poisson, over = synthetic()
    a = ms.poisson_analysis(poisson, alpha=0.01)
    b = ms.poisson_analysis(over, alpha=0.01)
    assert not a.rejects_poisson and a.gof.pvalue > 0.01 and a.ks.pvalue > 0.01
    assert b.rejects_poisson and b.gof.pvalue < 0.01
    assert b.dispersion.statistic > b.dispersion.dof  # over-, not under-dispersed


def test_correlations_and_prediction():
    rng = np.random.default_rng(1)
    n = 300
    base = rng.integers(0, 33, n) / 32
    later = np.clip(base + rng.normal(0, 0.1, n), 0, 1)

    def result(rows, scores):
        r = np.zeros(len(rows), ms.RESULT_DTYPE)
        r["row"], r["score"], r["memorized"] = rows, scores, scores >= 1
        return r

    a = result(np.arange(200), base[:200])            # an early checkpoint has seen fewer rows
    b = result(np.arange(n)[::-1], later[::-1])       # any row order
    rows, (c,) = ms.score_correlations({100: a, 200: b})
    np.testing.assert_array_equal(rows, np.arange(200))
    assert c.rows == 200
    assert c.pearson == pytest.approx(stats.pearsonr(base[:200], later[:200]).statistic)
    assert c.spearman == pytest.approx(stats.spearmanr(base[:200], later[:200]).statistic)
    p = ms.predict_memorized(a, b, 100, 200)
    ma, mb = base[:200] >= 1, later[:200] >= 1
    assert (p.tp, p.fp, p.fn, p.tn) == (np.sum(ma & mb), np.sum(ma & ~mb), np.sum(~ma & mb), np.sum(~ma & ~mb))
    assert p.precision == pytest.approx(p.tp / (p.tp + p.fp))
    assert p.recall == pytest.approx(p.tp / (p.tp + p.fn))
    assert p.confusion.sum() == 200


def test_normalize_existing_format_and_score():
    old = np.zeros(3, [("row", np.int64), ("memorized", np.bool_), ("matched", np.int16)])  # no score field
    old["row"], old["matched"], old["memorized"] = [0, 1, 2], [32, 16, 0], [True, False, False]
    r = ms.normalize_result(old)
    np.testing.assert_allclose(r["score"], [1, 0.5, 0])
    np.testing.assert_array_equal(r["memorized"], [True, False, False])
    flag_only = np.zeros(2, [("row", np.int64), ("memorized", np.bool_)])
    flag_only["memorized"] = [True, False]
    flag_only["row"] = [0, 1]
    np.testing.assert_allclose(ms.normalize_result(flag_only)["score"], [1, 0])
    with pytest.raises(DataError, match="expected per-row memorization results"):
        ms.normalize_result(np.zeros(2, [("x", np.int64)]))


def test_report_command(tmp_path, capsys):
    details = tmp_path / "results_details"
    details.mkdir()
    poisson, over = synthetic()
    for step, counts in ((10, poisson[:40]), (20, over[:40])):
        rows, flags = rows_from_counts(counts, seed=step)
        r = np.zeros(len(rows), [("row", np.int64), ("memorized", np.bool_), ("score", np.float64)])
        r["row"], r["memorized"] = rows, flags
        r["score"] = np.where(flags, 1.0, np.random.default_rng(step).integers(0, 32, len(rows)) / 32)
        np.save(details / f"step{step}_memorization.npy", r)
    out = tmp_path / "report"
    assert main(["memorization-report", str(details), "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "not rejected" in text and "rejected" in text
    assert sorted(p.name for p in out.iterdir()) == ["correlation.png", "qq_step10.png", "qq_step20.png",
                                                    "report.json", "report.txt"]
    doc = json.loads((out / "report.json").read_text())
    assert doc["steps"]["20"]["poisson"]["rejects_poisson"] and not doc["steps"]["10"]["poisson"]["rejects_poisson"]
    assert doc["prediction"][0]["source"] == 10 and doc["prediction"][0]["target"] == 20
    # existing output refused; bad input is one line, nothing written
    assert main(["memorization-report", str(details), "--out-dir", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["memorization-report", str(tmp_path / "none"), "--out-dir", str(tmp_path / "r2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def _write_result(path, rows, memorized):
    r = np.zeros(len(rows), ms.RESULT_DTYPE)
    r["row"], r["memorized"], r["score"] = rows, memorized, np.asarray(memorized, np.float64)
    np.save(path, r)


def test_report_overwrites_its_own_output_and_writes_strict_json(tmp_path, capsys):
    """--overwrite replaces an earlier report (and nothing else); undefined statistics are JSON
    null, not the NaN token (json.loads(..., parse_constant) of other readers rejects it)."""
    details = tmp_path / "d"
    details.mkdir()
    rows = np.arange(2048)
    _write_result(details / "step10_memorization.npy", rows, np.zeros(2048, bool))  # nothing memorized
    _write_result(details / "step20_memorization.npy", rows, rows % 7 == 0)
    out = tmp_path / "report"
    assert main(["memorization-report", str(details), "--out-dir", str(out)]) == 0
    assert main(["memorization-report", str(details), "--out-dir", str(out), "--overwrite", "--window", "256"]) == 0
    text = (out / "report.json").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert doc["window"] == 256
    pred = doc["prediction"][0]  # step 10 predicts nothing memorized: precision is undefined
    assert pred["tp"] == pred["fp"] == 0 and pred["precision"] is None and pred["recall"] == 0.0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["memorization-report", str(details), "--out-dir", str(other), "--overwrite"]) == 2
    assert "not a memorization-report folder" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"


def test_two_result_files_for_one_step_name_both(tmp_path):
    """Two files of one step over the same rows (a copy, or two runs' results in one folder) are
    named in the error; per-host parts over disjoint rows are joined."""
    d = tmp_path / "d"
    d.mkdir()
    _write_result(d / "step5_memorization.npy", np.arange(10), np.arange(10) < 3)
    _write_result(d / "step5_memorization_host1.npy", np.arange(10, 20), np.zeros(10, bool))
    joined = ms.load_results([d])[5]
    np.testing.assert_array_equal(joined["row"], np.arange(20))
    assert joined["memorized"].sum() == 3
    _write_result(d / "step5_memorization_copy.npy", np.arange(10), np.arange(10) < 3)
    with pytest.raises(DataError, match=r"step 5: 3 files hold results for the same rows .*copy\.npy"):
        ms.load_results([d])


def test_results_scored_on_other_training_rows_are_not_compared(tmp_path, caplog):
    """Row i is a training sequence only within one data order: results whose details folders
    record other rows (here seq_len 128 against 63) are refused by name instead of correlated row
    by row; files without a record are compared with a warning."""
    from pythia_jax.eval.provenance import DetailsLedger

    rows = np.arange(64)
    fp = {"data": "wiki", "global_batch": 8, "order": "neox", "seed": 1234, "seq_len": 128, "train_iters": 60}
    for name, step, seq_len, iters in (("a", 60, 128, 60), ("b", 20, 63, 60), ("c", 20, 128, 60), ("e", 30, 128, 90)):
        d = tmp_path / name
        d.mkdir()
        _write_result(d / f"step{step}_memorization.npy", rows, rows % 3 == 0)
        DetailsLedger(d).add([d / f"step{step}_memorization.npy"], step, "memorization",
                             {"checkpoint": f"/runs/{name}", "weights": "w",
                              "settings": {"rows": {**fp, "seq_len": seq_len, "train_iters": iters}, "sample": None,
                                           "sample_seed": None}})
    with pytest.raises(DataError, match=r"a/step60_memorization.npy and .*b/step20_memorization.npy were scored on "
                                        r"different training rows \(seq_len 128 vs 63\)"):
        ms.load_results([tmp_path / "a", tmp_path / "b"])
    assert sorted(ms.load_results([tmp_path / "a", tmp_path / "c"])) == [20, 60]
    # a num_steps change accepted later in the run keeps the rows already trained: not a difference
    assert sorted(ms.load_results([tmp_path / "a", tmp_path / "e"])) == [30, 60]
    loose = tmp_path / "loose"
    loose.mkdir()
    _write_result(loose / "step5_memorization.npy", rows, rows % 2 == 0)
    with caplog.at_level("WARNING"):
        assert sorted(ms.load_results([tmp_path / "a", loose / "step5_memorization.npy"])) == [5, 60]
    assert "no provenance record for" in caplog.text and "step5_memorization.npy" in caplog.text
