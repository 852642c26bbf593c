"""Joining numeral counts with arithmetic accuracies: counts at checkpoint steps, log bins, the
frequency gap, the PNG and the ``pythia-jax term-frequency`` command."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pythia_jax.analysis import term_frequency as tf
from pythia_jax.errors import DataError, PythiaJaxError


def _count_rows():
    # windows [0,10), [10,20); operand x occurs x*10 times in each window except 0 (never: listed
    # with zeros, as a --numeral-max table lists it) and 3 (only in the first window: no row in the
    # second, its cumulative stays 30)
    rows, cum = [], {}
    for a, b in ((0, 10), (10, 20)):
        for x in range(0, 30):
            if x == 3 and a == 10:
                continue
            n = x * 10
            cum[x] = cum.get(x, 0) + n
            rows.append({"window_start": a, "window_end": b, "term": str(x), "variant": "numeral",
                         "count": n, "cumulative": cum[x]})
        rows.append({"window_start": a, "window_end": b, "term": "1 2", "variant": "numeral_pair",
                     "count": 999, "cumulative": 999})
    return rows


def test_operand_counts():
    c = tf.operand_counts(_count_rows(), [10, 20], range(30))
    assert c[10][5] == 50 and c[20][5] == 100
    assert c[20][3] == 30 and c[10][0] == 0 and c[20][0] == 0
    with pytest.raises(DataError, match="no window ending at step"):
        tf.operand_counts(_count_rows(), [15], range(30))


def _shifted(rows, by):
    return [dict(r, window_start=r["window_start"] + by, window_end=r["window_end"] + by) for r in rows]


def test_operand_counts_refuse_tables_that_do_not_count_from_step_0():
    """A table whose windows start after step 0 (``count --start 150``) or leave a gap holds counts
    over part of the training data only: refused, not read as the count up to each step."""
    rows = _count_rows()
    with pytest.raises(DataError, match=r"^the count table's first window starts at step 5, not 0, so its "
                                        r"cumulative counts leave out steps \[0, 5\); count from --start 0$"):
        tf.operand_counts(_shifted(rows, 5), [15, 25], range(30))
    gap = [r for r in rows if r["window_start"] == 0] + _shifted([r for r in rows if r["window_start"] == 10], 5)
    with pytest.raises(DataError, match=r"windows \[0, 10\) and \[15, 25\) leave a gap"):
        tf.operand_counts(gap, [10, 25], range(30))
    overlap = rows + [dict(r, window_start=0) for r in rows if r["window_start"] == 10]
    with pytest.raises(DataError, match=r"windows \[0, 10\) and \[0, 20\) leave an overlap"):
        tf.operand_counts(overlap, [10, 20], range(30))


def test_operand_counts_refuse_operands_the_table_does_not_list():
    """An operand with no row at all (a table counted with --numeral-max below it) is not count 0."""
    rows = [r for r in _count_rows() if not 20 <= int(r["term"].split()[0]) < 30]
    with pytest.raises(DataError, match=r"^operand\(s\) 20, 21, 22, 23, 24, 25, 26, 27, … \(10 in all\) "
                                        r"have no 'numeral' row in the count table.*--numeral-max 29, "):
        tf.operand_counts(rows, [10, 20], range(30))
    assert tf.operand_counts(rows, [10, 20], range(20))[20][19] == 380


def test_bins_and_gap():
    edges = tf.log_bins(1, 1000, 3)
    np.testing.assert_allclose(edges, [1, 10, 100, 1000])
    counts = {0: 0, 1: 5, 2: 50, 3: 60, 4: 500, 5: 5000}
    acc = {0: 1.0, 1: 0.2, 2: 0.4, 3: 0.6, 4: 1.0, 5: 1.0}
    got = tf.binned_accuracy(counts, acc, edges)
    assert [(round(c, 6), a, n) for c, a, n in got] == [
        (round(10 ** 0.5, 6), 0.2, 1), (round(10 ** 1.5, 6), 0.5, 2), (round(10 ** 2.5, 6), 1.0, 1)]
    # 2 most frequent (5, 4) minus 2 least frequent (0, 1); ties by value
    assert tf.frequency_gap(counts, acc, n=2) == pytest.approx(100 * ((1.0 + 1.0) / 2 - (1.0 + 0.2) / 2))
    with pytest.raises(Exception, match="needs 20"):
        tf.frequency_gap(counts, acc, n=10)


def _write_details(d, step, op, k, acc_of):
    d.mkdir(exist_ok=True)
    with open(d / f"step{step}_arithmetic_{op}_k{k}.jsonl", "w") as f:
        for x1 in range(30):
            for x2 in range(1, 5):
                f.write(json.dumps({"step": step, "op": op, "x1": x1, "x2": x2, "k": k,
                                    "correct": x2 <= acc_of(x1) * 4}) + "\n")


def _write_count_table(tmp_path):
    """``_count_rows()`` as the CSV table ``count`` writes: (path, rows)."""
    counts, rows = tmp_path / "numerals.csv", _count_rows()
    with open(counts, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return counts, rows


def test_command_plot_and_table(tmp_path):
    from pythia_jax.cli import main

    counts, rows = _write_count_table(tmp_path)
    det = tmp_path / "details"
    for step in (10, 20):
        for k in (0, 4, 16):
            _write_details(det, step, "plus", k, lambda x: 1.0 if x >= 20 else 0.25)
    accs = tf.read_operand_accuracy(det)
    assert accs[("plus", 16, 20)][25] == 1.0 and accs[("plus", 16, 20)][2] == 0.25
    out, table = tmp_path / "freq.png", tmp_path / "gap.csv"
    assert main(["term-frequency", "--counts", str(counts), "--details-dir", str(det), "--out", str(out),
                 "--table", str(table)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    got = list(csv.DictReader(open(table)))
    assert len(got) == 6  # 2 steps x k in 0, 4, 16
    # most frequent 10 operands: 20..29 (acc 1); least: 0, 1, 2, 3 (3 is low at step 20 too), 4..9
    assert all(float(r["gap"]) == pytest.approx(75.0) for r in got)
    # a gap table of k that were not evaluated: one clear error, nothing written (it wrote an empty table)
    capsys_free = tmp_path / "k2.png"
    assert main(["term-frequency", "--counts", str(counts), "--details-dir", str(det), "--out", str(capsys_free),
                 "--table", str(tmp_path / "k2.csv"), "--table-shots", "2,8"]) == 2
    assert not capsys_free.exists() and not (tmp_path / "k2.csv").exists()
    with pytest.raises(PythiaJaxError, match=r"no arithmetic results at k=2,8 for the counted steps; k evaluated: "
                                             r"\[0, 4, 16\]"):
        tf.gap_table({10: {}, 20: {}}, accs, [2, 8])
    many = {x: x for x in range(30)}
    assert len(tf.gap_table({10: many, 20: many}, accs, [2, 16], n=2)) == 2  # k=2 warned about, k=16 kept
    # a count table without the evaluated steps as window ends: one clear error, no PNG
    out2 = tmp_path / "none.png"
    counts2 = tmp_path / "c2.jsonl"
    counts2.write_text("".join(json.dumps(r) + "\n" for r in rows if r["window_end"] == 10))
    assert main(["term-frequency", "--counts", str(counts2), "--details-dir", str(det),
                 "--out", str(out2)]) == 2
    assert not out2.exists()
    assert main(["term-frequency", "--counts", str(counts), "--details-dir", str(tmp_path / "nope"),
                 "--out", str(out2)]) == 2


def test_outputs_are_checked_before_the_work_and_a_folder_is_never_replaced(tmp_path, capsys, monkeypatch):
    from pythia_jax.cli import main

    counts, _ = _write_count_table(tmp_path)
    det = tmp_path / "details"
    for k in (0, 4, 16):
        _write_details(det, 20, "plus", k, lambda x: 1.0 if x >= 20 else 0.25)
    monkeypatch.setattr(tf, "read_operand_accuracy", lambda *a: pytest.fail("read before the output check"))
    (tmp_path / "gap").mkdir()
    (tmp_path / "plot.png").mkdir()
    base = ["term-frequency", "--counts", str(counts), "--details-dir", str(det)]
    assert main(base + ["--out", str(tmp_path / "f.png"), "--table", str(tmp_path / "gap")]) == 2
    assert (f"output {tmp_path / 'gap'} exists and is an empty folder, not a frequency-gap table"
            in capsys.readouterr().err)
    assert main(base + ["--out", str(tmp_path / "plot.png")]) == 2
    assert f"output {tmp_path / 'plot.png'} exists and is an empty folder, not a PNG image" in capsys.readouterr().err
    monkeypatch.undo()
    table = tmp_path / "gap.csv"
    for _ in range(2):  # a gap table is replaced
        assert main(base + ["--out", str(tmp_path / "f.png"), "--table", str(table)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["details", "f.png", "gap", "gap.csv", "numerals.csv",
                                                          "plot.png"]
