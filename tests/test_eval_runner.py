"""The across-checkpoint runner: tidy table, resume, HF revision folders, missing steps, CLI, plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from pythia_jax.config import ModelConfig
from pythia_jax.errors import CheckpointError, DataError, PythiaJaxError
from pythia_jax.eval import runner as R

DATA = Path(__file__).parent / "data" / "eval"
CFG = ModelConfig(name="tiny", vocab_size=50304, hidden_size=16, num_layers=1, num_heads=2,
                  max_position_embeddings=128)
STEPS = (0, 1000)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same two steps as a pythia-jax checkpoint directory and as HF step<N>/ folders."""
    from flax import nnx

    from pythia_jax.checkpoint import save_params_checkpoint
    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.model import GPTNeoX, params_to_dict

    root = tmp_path_factory.mktemp("runs")
    for i, step in enumerate(STEPS):
        params = params_to_dict(GPTNeoX(CFG, rngs=nnx.Rngs(i)))
        save_params_checkpoint(root / "ckpt", step, CFG, params)
        write_hf_dir(CFG, params, root / "hf" / f"step{step}", dtype="float32")
    return root


def settings(**kw):
    base = dict(tasks=["piqa", "winogrande"], data_dir=str(DATA), limit=4, batch_size=8, progress=False)
    base.update(kw)
    return R.EvalSettings(**base)


def test_table_resume_and_hf_revisions(runs, tmp_path, monkeypatch):
    out = tmp_path / "results.jsonl"
    table = R.evaluate_checkpoints(runs / "ckpt", list(STEPS), settings(), out, log=lambda _: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["step"], r["task"]) for r in rows} == {(s, t) for s in STEPS for t in ("piqa", "winogrande")}
    assert set(rows[0]) == set(R.COLUMNS)
    acc = {(r["step"], r["task"]): r for r in rows if r["metric"] == "acc"}
    assert all(0 <= r["value"] <= 1 and r["num_examples"] == 4 for r in acc.values())
    assert {r["metric"] for r in rows if r["task"] == "piqa"} == {"acc", "acc_norm", "truncated"}
    assert {r["metric"] for r in rows if r["task"] == "winogrande"} == {"acc", "truncated"}
    assert len(table.rows) == len(rows)

    # Resume: nothing left to do, so no model may be loaded.
    import pythia_jax.eval.loading as loading
    monkeypatch.setattr(loading, "load_model_params", lambda *a, **k: pytest.fail("reloaded a model"))
    R.evaluate_checkpoints(runs / "ckpt", list(STEPS), settings(), out, log=lambda _: None)
    assert len(out.read_text().splitlines()) == len(rows)
    monkeypatch.undo()

    # HF revision folders of the same weights give the same table (as CSV this time).
    csv_out = tmp_path / "results.csv"
    R.evaluate_checkpoints(runs / "hf", list(STEPS), settings(), csv_out, log=lambda _: None)
    hf_rows = R.read_table(csv_out)
    key = lambda r: (r["step"], r["task"], r["metric"])  # noqa: E731
    ours = {key(r): r["value"] for r in R.read_table(out)}
    assert {key(r): r["value"] for r in hf_rows} == pytest.approx(ours)


def test_interrupted_run_resumes(runs, tmp_path, monkeypatch):
    """A run killed during its second task keeps the first; the rerun completes the table."""
    out = tmp_path / "r.jsonl"
    calls = {"n": 0}
    real_run = R._Env.run

    def flaky(self, step, task, resolved):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_run(self, step, task, resolved)

    monkeypatch.setattr(R._Env, "run", flaky)
    with pytest.raises(KeyboardInterrupt):
        R.evaluate_checkpoints(runs / "ckpt", [0], settings(), out, log=lambda _: None)
    monkeypatch.undo()
    with open(out, "a") as f:
        f.write('{"step": 0, "task": "winog')  # a line cut short by the interruption
    first = R.read_table(out)
    assert {r["task"] for r in first} == {"piqa"}
    log = []
    R.evaluate_checkpoints(runs / "ckpt", [0], settings(), out, log=log.append)
    assert any("resuming" in line for line in log)
    tasks = [r["task"] for r in R.read_table(out)]
    assert tasks.count("piqa") == 3 and tasks.count("winogrande") == 2


def test_missing_step_and_bad_inputs(runs, tmp_path):
    with pytest.raises(CheckpointError, match=r"no step 5\b.*available: 0, 1000"):
        R.evaluate_checkpoints(runs / "ckpt", [0, 5], settings(), tmp_path / "x.jsonl")
    with pytest.raises(CheckpointError, match="no step 7"):
        R.evaluate_checkpoints(runs / "hf", [7], settings(), tmp_path / "x.jsonl")
    with pytest.raises(PythiaJaxError, match="needs --ppl-data"):
        R.evaluate_checkpoints(runs / "ckpt", [0], settings(tasks=["perplexity"]), tmp_path / "x.jsonl")
    with pytest.raises(PythiaJaxError, match=".jsonl or .csv"):
        R.evaluate_checkpoints(runs / "ckpt", [0], settings(), tmp_path / "x.txt")
    assert R.parse_steps("0, 1000,1000", lambda: []) == [0, 1000]
    assert R.parse_steps("all", lambda: [0, 1000]) == [0, 1000]
    assert R.parse_steps("1-2000", lambda: [0, 1000, 3000]) == [1000]


def test_perplexity_task(runs, tmp_path):
    """Per-token loss from the runner equals a direct rolling computation; per-document rows saved."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ["The quick brown fox jumps over the lazy dog.", "Pythia " * 60]))
    out = tmp_path / "ppl.jsonl"
    s = settings(tasks=["perplexity"], ppl_data=str(docs), details_dir=str(tmp_path / "d"))
    R.evaluate_checkpoints(runs / "ckpt", [1000], s, out, log=lambda _: None)
    got = {r["metric"]: r["value"] for r in R.read_table(out)}
    per_doc = [json.loads(x) for x in (tmp_path / "d" / "step1000_perplexity.jsonl").read_text().splitlines()]
    loss = -sum(d["loglik"] for d in per_doc) / sum(d["num_tokens"] for d in per_doc)
    assert got["loss"] == pytest.approx(loss) and got["perplexity"] == pytest.approx(math.exp(loss))
    assert {"doc_loss", "bits_per_byte", "word_perplexity"} <= set(got)
    assert got["loss"] > 5  # a random model is close to uniform over 50k tokens


def test_cli_eval_plot_generate(runs, tmp_path, capsys):
    from pythia_jax.cli import main

    out = tmp_path / "cli.jsonl"
    args = ["eval", "--checkpoints", str(runs / "ckpt"), "--steps", "all", "--tasks", "arc_easy",
            "--data-dir", str(DATA), "--limit", "3", "--out", str(out), "--csv", str(tmp_path / "cli.csv"),
            "--no-progress"]
    assert main(args) == 0
    assert len(R.read_table(tmp_path / "cli.csv")) == len(R.read_table(out)) == 6
    assert main(args) == 0  # a rerun replaces its own earlier export
    # another table's CSV (or a JSONL table) is never replaced by this table's export
    other = ["eval", "--checkpoints", str(runs / "ckpt"), "--steps", "0", "--tasks", "arc_easy", "--data-dir",
             str(DATA), "--limit", "2", "--out", str(tmp_path / "other.jsonl"), "--no-progress"]
    for csv_path, message in ((tmp_path / "cli.csv", "--csv {} holds 6 rows that are not in --out"),
                              (out, "--csv must end in .csv")):
        before = csv_path.read_bytes()
        assert main([*other, "--csv", str(csv_path)]) == 2
        assert message.format(csv_path) in capsys.readouterr().err
        assert csv_path.read_bytes() == before and not (tmp_path / "other.jsonl").exists()
    assert main([*other[:5], "--tasks", " , ", "--out", str(tmp_path / "none.jsonl")]) == 2
    assert "--tasks ' , ' names no task" in capsys.readouterr().err
    png = tmp_path / "fig.png"
    assert main(["plot", str(out), "--metric", "acc", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(out), "--metric", "nope", "--out", str(png)]) == 2
    assert "no rows with metric 'nope'" in capsys.readouterr().err
    assert main(["eval", "--checkpoints", str(runs / "ckpt"), "--steps", "3", "--out", str(out)]) == 2
    assert "no step 3" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "piqa.jsonl").write_text('{"goal": "g", "sol1": "a", "label": 0}\n')
    assert main(["eval", "--checkpoints", str(runs / "ckpt"), "--steps", "0", "--tasks", "piqa",
                 "--data-dir", str(bad), "--out", str(tmp_path / "b.jsonl")]) == 2
    assert "piqa.jsonl:1" in capsys.readouterr().err
    assert main(["generate", str(runs / "hf"), "--step", "1000", "--prompt", "Hello", "--max-new-tokens", "4",
                 "--temperature", "0.8", "--top-k", "20"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_perplexity_on_indexed_dataset(runs, tmp_path):
    """Documents come from doc_idx boundaries of an indexed dataset; the loss equals a direct
    rolling computation over exactly those token lists."""
    from pythia_jax.data.indexed import write_indexed_dataset
    from pythia_jax.eval.loading import load_model_params
    from pythia_jax.eval.perplexity import documents_from_indexed
    from pythia_jax.eval.runtime import place_model
    from pythia_jax.eval.scoring import Scorer

    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 50000, n).tolist() + [0] for n in (10, 200, 40)]
    prefix = write_indexed_dataset(str(tmp_path / "ppl"), docs)
    assert [d.tolist() for d in documents_from_indexed(prefix)] == docs
    out = tmp_path / "p.jsonl"
    R.evaluate_checkpoints(runs / "ckpt", [0], settings(tasks=["perplexity"], ppl_data=prefix), out,
                           log=lambda _: None)
    got = {r["metric"]: r for r in R.read_table(out)}
    config, params = load_model_params(runs / "ckpt", 0)
    # host memory: place_model sends each device only its part
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    res = Scorer(place_model(params, config=config)).loglikelihood_rolling(docs)
    assert got["loss"]["value"] == pytest.approx(-res.loglik.sum() / sum(map(len, docs)), rel=1e-5)
    assert got["loss"]["num_examples"] == 3 and not math.isnan(got["doc_loss"]["stderr"])


def test_plot_compares_runs_with_labels(tmp_path):
    """Several results tables on one figure (baseline vs intervention): a panel per task:metric."""
    from pythia_jax import cli

    def table(path, bias):
        rows = [{"step": s, "task": t, "metric": m, "value": v + bias * s / 100, "stderr": 0.01,
                 "num_examples": 10}
                for s in (0, 50, 100) for t, m, v in (("winobias", "net_bias", 0.1),
                                                       ("crows_pairs_gender", "pct_stereotype", 0.6),
                                                       ("lambada_openai", "acc", 0.2))]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    base, swap = table(tmp_path / "base.jsonl", 0.0), table(tmp_path / "swap.jsonl", 0.05)
    out = tmp_path / "bias.png"
    assert cli.main(["plot", base, swap, "--labels", "baseline,gender_swap", "--panels",
                     "winobias:net_bias,crows_pairs_gender:pct_stereotype,lambada_openai:acc",
                     "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["plot", base, swap, "--metric", "acc", "--out", str(tmp_path / "acc.png")]) == 0
    assert cli.main(["plot", base, swap, "--labels", "one", "--out", str(tmp_path / "x.png")]) == 2
    assert cli.main(["plot", base, swap, "--panels", "winobias:nope", "--out", str(tmp_path / "y.png")]) == 2
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_plot_runs_with_equal_values_stay_visible(tmp_path, monkeypatch):
    """Two runs with the same values (e.g. both 0.0 net bias): each line has its own style and
    marker, so the one drawn last does not hide the other."""
    from pythia_jax.eval import plot as P

    figures = []
    monkeypatch.setattr(P, "save_figure", lambda fig, out: figures.append(fig) or str(out))
    rows = [{"step": s, "task": "winobias", "metric": "net_bias", "value": 0.0, "stderr": 0.0,
             "num_examples": 4} for s in (0, 100, 200)]
    P.plot_compare({"baseline": rows, "gender_swap": rows}, [("winobias", "net_bias")], tmp_path / "b.png")
    runs = {c.get_label(): c.lines[0] for c in figures[0].axes[0].containers}  # errorbar: (data line, ...)
    assert set(runs) == {"baseline", "gender_swap"}
    lines = list(runs.values())
    assert lines[0].get_linestyle() != lines[1].get_linestyle() and lines[0].get_marker() != lines[1].get_marker()


def test_plot_refuses_two_results_per_step_and_warns_on_other_settings(tmp_path, capsys, caplog):
    """A concatenation of two tables (a full and a --limit 5 evaluation) was drawn as one zig-zag
    line: refused, naming the step and how the rows differ. Runs compared on one panel with other
    task settings are drawn with a warning naming the setting."""
    from pythia_jax import cli

    def rows(limit, value):
        return [{"step": s, "task": "piqa", "metric": "acc", "value": value, "stderr": 0.01, "num_examples": 10,
                 "checkpoint": "/runs/a", "weights": f"w{s}", "settings": {"limit": limit, "data": "sha256:ab"}}
                for s in (0, 20)]

    full, lim5, cat = tmp_path / "full.jsonl", tmp_path / "lim5.jsonl", tmp_path / "cat.jsonl"
    for path, table in ((full, rows(None, 0.44)), (lim5, rows(5, 0.4)), (cat, rows(None, 0.44) + rows(5, 0.4))):
        path.write_text("".join(json.dumps(r) + "\n" for r in table))
    assert cli.main(["plot", str(cat), "--out", str(tmp_path / "cat.png")]) == 2
    assert (f"{cat} holds two rows for step 0 piqa acc (settings limit none vs 5); a table plots one result per "
            "step") in capsys.readouterr().err
    assert cli.main(["plot", str(cat), str(full), "--out", str(tmp_path / "cat2.png")]) == 2
    assert "run 'cat' holds two rows for step 0 piqa acc" in capsys.readouterr().err
    assert not (tmp_path / "cat.png").exists() and not (tmp_path / "cat2.png").exists()
    # a duplicate of another task does not block a plot of this one; --tasks "a, b" names both
    arc = [{**r, "task": "arc_easy"} for r in rows(None, 0.3)]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows(None, 0.44) + rows(5, 0.4) + arc))
    assert cli.main(["plot", str(mixed), "--tasks", "arc_easy, lambada", "--out", str(tmp_path / "arc.png")]) == 0
    with caplog.at_level("WARNING"):
        assert cli.main(["plot", str(full), str(lim5), "--out", str(tmp_path / "two.png")]) == 0
    assert "piqa: runs 'full' and 'lim5' were evaluated with different settings (limit none vs 5)" in caplog.text


def test_plot_default_labels_axis_and_suffix(tmp_path, capsys):
    """Tables of the same file name in two run folders get the folders as labels (no --labels
    needed); the step axis fits data that start after step 0 and keeps the last point inside;
    an --out that is not a .png is refused before anything is written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pythia_jax import cli
    from pythia_jax.commands.plot import default_labels
    from pythia_jax.eval.plot import set_step_axis

    assert default_labels(["runs/base/bias.jsonl", "runs/swap/bias.jsonl"]) == ["base/bias", "swap/bias"]
    assert default_labels(["a.jsonl", "b.csv"]) == ["a", "b"]
    with pytest.raises(DataError, match="more than once"):
        default_labels(["x/t.jsonl", "x/t.jsonl"])
    tables = []
    for run in ("base", "swap"):
        (tmp_path / run).mkdir()
        rows = [{"step": s, "task": "piqa", "metric": "acc", "value": 0.5 + s / 1e4, "stderr": 0.01,
                 "num_examples": 10} for s in (100, 150, 200)]
        path = tmp_path / run / "bias.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tables.append(str(path))
    assert cli.main(["plot", *tables, "--metric", "acc", "--out", str(tmp_path / "cmp.png")]) == 0
    assert "2 runs" in capsys.readouterr().out
    assert cli.main(["plot", *tables, "--metric", "acc", "--out", str(tmp_path / "cmp.txt")]) == 2
    assert ".png" in capsys.readouterr().err and not (tmp_path / "cmp.txt").exists()
    fig, ax = plt.subplots()
    set_step_axis(ax, [100, 150, 200])
    lo, hi = ax.get_xlim()
    assert 0 < lo < 100 and hi > 200
    set_step_axis(ax, [0, 1000])
    assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] > 1000
    plt.close(fig)


def test_resume_only_into_results_of_the_same_checkpoints_and_settings(runs, tmp_path, monkeypatch):
    """Each row records what it was computed from; a table holding results of other checkpoints,
    of other settings for a requested task (at any step), or without that record is refused
    before any model loads, never resumed into."""
    import pythia_jax.eval.loading as loading
    from pythia_jax.eval.provenance import ProvenanceError

    out = tmp_path / "r.jsonl"
    R.evaluate_checkpoints(runs / "ckpt", [0], settings(tasks=["piqa"], limit=2), out, log=lambda _: None)
    rows = R.read_table(out)
    assert {r["checkpoint"] for r in rows} == {str((runs / "ckpt").resolve())}
    assert rows[0]["weights"].startswith("ckpt:") and rows[0]["settings"]["limit"] == 2
    before = out.read_text()
    monkeypatch.setattr(loading, "load_model_params", lambda *a, **k: pytest.fail("computed a result"))
    with pytest.raises(ProvenanceError, match=rf"r.jsonl holds results of other checkpoints \({runs / 'ckpt'}; "
                                              rf"these are {runs / 'hf'}\); write these results to another --out"):
        R.evaluate_checkpoints(runs / "hf", [0], settings(tasks=["piqa"], limit=2), out, log=lambda _: None)
    with pytest.raises(ProvenanceError, match=r"piqa results computed with other settings \(step 0: limit: 2 there, "
                                              r"3 now\)"):
        R.evaluate_checkpoints(runs / "ckpt", [0], settings(tasks=["piqa"], limit=3), out, log=lambda _: None)
    with pytest.raises(ProvenanceError, match=r"piqa results computed with other settings \(step 0: limit: 2 there"):
        R.evaluate_checkpoints(runs / "ckpt", [1000], settings(tasks=["piqa"], limit=3), out, log=lambda _: None)
    with pytest.raises(ProvenanceError, match=r"piqa results computed with other settings \(step 0: data: sha256:"):
        other = tmp_path / "data"
        other.mkdir()
        (other / "piqa.jsonl").write_text("".join((DATA / "piqa.jsonl").read_text().splitlines(True)[1:]))
        R.evaluate_checkpoints(runs / "ckpt", [0], settings(tasks=["piqa"], limit=2, data_dir=str(other)), out,
                               log=lambda _: None)
    assert out.read_text() == before
    # the same checkpoints and settings resume: nothing computed
    log = []
    R.evaluate_checkpoints(runs / "ckpt", [0], settings(tasks=["piqa"], limit=2), out, log=log.append)
    assert log == [f"resuming: 1 (step, task) results of these checkpoints and settings already in {out}"]
    # a table of an older version records none of it
    old = tmp_path / "old.csv"
    R.write_csv([{k: r[k] for k in R.COLUMNS[:6]} for r in rows], old)
    assert {r["checkpoint"] for r in R.read_table(old)} == {None}
    with pytest.raises(ProvenanceError, match="old.csv holds results written by an older pythia-jax, which do not "
                                              "record the checkpoints, weights and settings"):
        R.evaluate_checkpoints(runs / "ckpt", [0], settings(tasks=["piqa"], limit=2), old, log=lambda _: None)
    # the record survives a CSV round trip
    R.write_csv(rows, tmp_path / "copy.csv")
    ident = lambda t: [(r["metric"], r["checkpoint"], r["weights"], r["settings"]) for r in t]  # noqa: E731
    assert ident(R.read_table(tmp_path / "copy.csv")) == ident(rows)


def test_replaced_checkpoint_and_shared_details_are_refused(runs, tmp_path):
    """Other weights under the same path (a run trained again) are not resumed; a details folder
    holds the outputs of one set of checkpoints and settings, like the table."""
    import shutil

    from flax import nnx

    from pythia_jax.checkpoint import save_params_checkpoint
    from pythia_jax.eval.provenance import ProvenanceError
    from pythia_jax.model import GPTNeoX, params_to_dict

    ckpt = tmp_path / "ckpt"
    shutil.copytree(runs / "ckpt", ckpt)
    out, details = tmp_path / "r.jsonl", tmp_path / "d"
    s = settings(tasks=["piqa"], limit=2, details_dir=str(details))
    R.evaluate_checkpoints(ckpt, [0], s, out, log=lambda _: None)
    assert [json.loads(x)["file"] for x in (details / "provenance.jsonl").read_text().splitlines()] == \
        ["step0_piqa.jsonl"]
    shutil.rmtree(ckpt / "0")
    save_params_checkpoint(ckpt, 0, CFG, params_to_dict(GPTNeoX(CFG, rngs=nnx.Rngs(5))))
    with pytest.raises(ProvenanceError, match=r"holds step 0 piqa results of other weights than .* holds for step 0 "
                                              r"now \(ckpt:\w+ there, ckpt:\w+ now: the checkpoint was replaced\)"):
        R.evaluate_checkpoints(ckpt, [0], s, out, log=lambda _: None)
    # a new table, but the details folder of the earlier one
    with pytest.raises(ProvenanceError, match=r"d holds step 0 piqa results of other weights .*; use another "
                                              r"--details-dir"):
        R.evaluate_checkpoints(ckpt, [0], s, tmp_path / "new.jsonl", log=lambda _: None)
    with pytest.raises(ProvenanceError, match=r"d holds piqa results computed with other settings \(step 0: limit: "
                                              r"2 there, 3 now\); use another --details-dir"):
        R.evaluate_checkpoints(ckpt, [1000], settings(tasks=["piqa"], limit=3, details_dir=str(details)),
                               tmp_path / "new.jsonl", log=lambda _: None)
    # per-example files of a version that did not record their origin
    (details / "provenance.jsonl").unlink()
    with pytest.raises(ProvenanceError, match=r"d holds per-example outputs \(step0_piqa.jsonl, …\) without a record"):
        R.evaluate_checkpoints(ckpt, [0], s, tmp_path / "new.jsonl", log=lambda _: None)
    assert not (tmp_path / "new.jsonl").exists()


def test_weights_fingerprint_names_the_weights(runs, tmp_path):
    """A copy of a run has the same weights; other steps have others; HF folders are named by
    their files."""
    import shutil

    from pythia_jax.eval.loading import checkpoint_source, weights_fingerprint

    shutil.copytree(runs / "ckpt", tmp_path / "moved")
    fp = {s: weights_fingerprint(runs / "ckpt", s) for s in STEPS}
    assert fp[0] != fp[1000] and all(v.startswith("ckpt:") for v in fp.values())
    assert weights_fingerprint(tmp_path / "moved", 0) == fp[0]
    assert weights_fingerprint(runs / "ckpt" / "1000", 1000) == fp[1000]
    assert checkpoint_source(runs / "ckpt" / "1000") == str((runs / "ckpt").resolve())
    hf = {s: weights_fingerprint(runs / "hf", s) for s in STEPS}
    assert hf[0] != hf[1000] and hf[0].startswith("hf:")
    assert weights_fingerprint(runs / "hf" / "step0", 0) == hf[0]


def test_run_directory_unknown_task_and_progress_messages(runs, tmp_path, capsys, monkeypatch):
    """A run's output directory stands for its checkpoints/ (as for batches and count); a folder
    without checkpoints says so; an unknown task lists every task eval accepts; --no-progress
    silences the harness's bars too (tqdm's and datasets' switches, read when they are imported)."""
    from pythia_jax.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(runs / "ckpt")
    out = tmp_path / "r.jsonl"
    R.evaluate_checkpoints(runs / "ckpt", [0], settings(tasks=["arc_easy"], limit=2), out, log=lambda _: None)
    log = []
    R.evaluate_checkpoints(run, [0], settings(tasks=["arc_easy"], limit=2), out, log=log.append)
    assert log == [f"resuming: 1 (step, task) results of these checkpoints and settings already in {out}"]
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "0")
    import pythia_jax.eval.loading as loading

    seen = []
    steps_of = loading.available_steps
    monkeypatch.setattr(loading, "available_steps", lambda p: seen.append(
        (os.environ.get("TQDM_DISABLE"), os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS"))) or steps_of(p))
    assert main(["eval", "--checkpoints", str(tmp_path), "--steps", "0", "--out", str(tmp_path / "x.jsonl"),
                 "--no-progress"]) == 2
    assert seen == [("1", "1")]  # set while the command runs, restored after (in-process callers keep bars)
    assert "TQDM_DISABLE" not in os.environ and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "0"
    err = capsys.readouterr().err
    assert f"--checkpoints {tmp_path} holds no checkpoints: it is not a pythia-jax checkpoint directory" in err
    assert main(["eval", "--checkpoints", str(run), "--steps", "0", "--tasks", "piqq", "--out",
                 str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'piqq'; eval accepts: " in err
    for name in ("piqa", "lambada_openai", "logiqa", "wsc", "crows_pairs", "winobias", "arithmetic",
                 "arithmetic_plus_k<N>", "triviaqa", "perplexity", "memorization", "paper", "bias"):
        assert f" {name}" in err, name


def test_harness_lm_progress_follows_the_setting(runs, capfd):
    """``progress=False`` turns off the adapter's scoring bar and the harness's tokenizing bar."""
    pytest.importorskip("lm_eval")
    from pythia_jax.eval.harness import build_task, evaluate_task
    from pythia_jax.eval.lm_eval_adapter import PythiaJaxLM

    task = build_task("piqa", DATA / "piqa.jsonl")
    capfd.readouterr()
    evaluate_task(PythiaJaxLM(path=str(runs / "hf"), step=0, progress=False), task, limit=2)
    err = capfd.readouterr().err
    assert "scoring" not in err and "Tokenizing inputs" not in err


def test_large_data_files_are_named_without_reading_them_whole(tmp_path, monkeypatch):
    """A --ppl-data file over the whole-file limit (a tokenized corpus can be hundreds of GB,
    named at every start) is named by its size, modification time and first and last MiB:
    only those bytes are read; a change to either edge or to the time gives another name.
    Smaller files keep the hash of all their bytes."""
    from pythia_jax.eval import provenance as P

    monkeypatch.setattr(P, "_WHOLE_FILE_DIGEST_BYTES", 4096)
    monkeypatch.setattr(P, "_EDGE_BYTES", 1024)
    big = tmp_path / "corpus.bin"
    big.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    os.utime(big, ns=(1_000_000_000, 1_000_000_000))
    read = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: _CountingFile(real_open(*a, **k), read))
    name = P.file_digest(big)
    monkeypatch.setattr("builtins.open", real_open)
    assert name.startswith("stat:") and sum(read) == 2048  # the two edges only

    def renamed(offset: int, value: int) -> str:
        data = bytearray(big.read_bytes())
        data[offset] = value
        big.write_bytes(bytes(data))
        os.utime(big, ns=(1_000_000_000, 1_000_000_000))
        return P.file_digest(big)

    assert renamed(5000, 7) == name  # the middle is not read (the time is the guard)
    assert renamed(10, 7) != name and renamed(10, 10) == name
    assert renamed(16000, 1) != name
    os.utime(big, ns=(2_000_000_000, 2_000_000_000))
    assert P.file_digest(big) != name
    small = tmp_path / "small.jsonl"
    small.write_bytes(b"x" * 100)
    assert P.file_digest(small).startswith("sha256:")


class _CountingFile:
    def __init__(self, f, read):
        self._f, self._read = f, read

    def read(self, *a):
        data = self._f.read(*a)
        self._read.append(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
