"""``pythia-jax audit``: a clean series yields nothing; each planted fault is flagged."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pythia_jax.analysis import audit
from pythia_jax.cli import main
from pythia_jax.config import ModelConfig
from pythia_jax.convert import hf as hfc

TINY = ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4)
STEPS = (0, 1, 2, 4, 8)


def tiny_params(step: int, seed: int = 0) -> dict:
    """A params tree whose values drift slowly with ``step`` (like training)."""
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for path, shape in hfc.param_shapes(TINY).items():
        base = rng.normal(0, 0.02, shape).astype(np.float32)
        drift = np.random.default_rng([seed, step, len(tree)]).normal(0, 0.002, shape).astype(np.float32)
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = base + (drift if step else 0) + (1.0 if path[-1] == "scale" else 0.0)
    return tree


def write_series(root, steps=STEPS, dtype="float16", shard_size="4KB", **kw):
    for s in steps:
        hfc.write_hf_dir(TINY, tiny_params(s, **kw), root / f"step{s}", dtype=dtype, shard_size=shard_size)
    return root


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return write_series(tmp_path_factory.mktemp("series"))


def fresh(clean, tmp_path):
    root = tmp_path / "series"
    shutil.copytree(clean, root)
    return root


def flagged(report) -> dict[str, list[str]]:
    return report.kinds()


def test_clean_series_yields_nothing(clean):
    report = audit.audit_series(clean)
    assert report.ok, report.table()
    assert [f for f in report.findings if f.severity == "error"] == []
    assert [r.label for r in report.steps] == [f"step{s}" for s in STEPS]
    assert all(len(r.files) > 2 for r in report.steps)  # sharded
    assert report.bytes_read > 0
    # every float tensor's norm matches numpy on the stored fp16 values
    r = report.steps[2]
    _, params = hfc.read_hf_dir(clean / "step2")
    want = float(np.linalg.norm(params["embed_in"]["embedding"].astype(np.float64)))
    assert r.tensors["gpt_neox.embed_in.weight"].stats.norm == pytest.approx(want, rel=1e-6)


def test_identical_consecutive_steps(clean, tmp_path):
    root = fresh(clean, tmp_path)
    shutil.rmtree(root / "step2")
    shutil.copytree(root / "step1", root / "step2")
    report = audit.audit_series(root)
    assert flagged(report) == {"step2": ["identical_step"]}
    (f,) = report.errors()
    assert f.other == "step1"


def test_steps_0_and_1_identical_is_expected(clean, tmp_path):
    root = fresh(clean, tmp_path)
    shutil.rmtree(root / "step1")
    shutil.copytree(root / "step0", root / "step1")
    report = audit.audit_series(root)
    assert report.ok, report.table()
    assert [(f.kind, f.step, f.severity) for f in report.findings] == [("identical_step", "step1", "note")]


def test_shard_from_another_step(clean, tmp_path):
    root = fresh(clean, tmp_path)
    name = "model-00001-of-" + sorted((root / "step1").glob("model-00001-of-*"))[0].name.split("-of-")[1]
    shutil.copyfile(root / "step8" / name, root / "step1" / name)
    report = audit.audit_series(root)
    kinds = flagged(report)
    assert "duplicate_shard" in kinds["step1"] and "duplicate_shard" in kinds["step8"]
    assert set(kinds) == {"step1", "step8"}
    assert any(f.kind == "duplicate_shard" and f.step == "step1" and f.other == "step8" and name in f.detail
               for f in report.findings)


def test_single_tensor_from_another_step(tmp_path):
    root = tmp_path / "series"
    for s in STEPS:
        params = tiny_params(s)
        if s == 2:
            params["embed_out"]["kernel"] = tiny_params(8)["embed_out"]["kernel"]
        hfc.write_hf_dir(TINY, params, root / f"step{s}", dtype="float32")
    report = audit.audit_series(root)
    kinds = flagged(report)
    assert kinds["step2"] == ["duplicate_tensor"] and kinds["step8"] == ["duplicate_tensor"]
    assert set(kinds) == {"step2", "step8"}
    assert "embed_out.weight" in report.errors()[0].detail


def test_truncated_file_and_missing_shard(clean, tmp_path):
    root = fresh(clean, tmp_path)
    shard = sorted((root / "step2").glob("model-*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    gone = sorted((root / "step4").glob("model-*.safetensors"))[0]
    gone.unlink()
    report = audit.audit_series(root)
    kinds = flagged(report)
    assert "truncated_file" in kinds["step2"] and "missing_file" in kinds["step4"]
    assert set(kinds) == {"step2", "step4"}
    assert any(gone.name in f.detail for f in report.findings if f.kind == "missing_file")


def test_nan_tensor(clean, tmp_path):
    root = fresh(clean, tmp_path)
    params = tiny_params(4)
    params["layers"]["mlp"]["dense_4h_to_h"]["kernel"][1, 3, 5] = np.nan
    shutil.rmtree(root / "step4")
    hfc.write_hf_dir(TINY, params, root / "step4", dtype="bfloat16", shard_size="4KB")
    report = audit.audit_series(root)
    assert flagged(report) == {"step4": ["nonfinite"]}
    assert "gpt_neox.layers.1.mlp.dense_4h_to_h.weight (1 of" in report.errors()[0].detail


def test_mismatched_config(clean, tmp_path):
    root = fresh(clean, tmp_path)
    cfg = json.loads((root / "step4" / "config.json").read_text())
    cfg["rotary_pct"] = 0.5
    cfg.pop("rope_parameters", None)
    (root / "step4" / "config.json").write_text(json.dumps(cfg))
    report = audit.audit_series(root)
    assert flagged(report) == {"step4": ["config_mismatch"]}
    assert "rotary_pct 0.5 (others: 0.25)" in report.errors()[0].detail


def test_norm_jump(tmp_path):
    root = tmp_path / "series"
    steps = (0, 1, 2, 4, 8, 16)
    for s in steps:
        params = tiny_params(s)
        if s == 4:  # layer 0 with 3x the norm, as if from a much later era
            for module in params["layers"].values():
                for leaf in module.values():
                    if isinstance(leaf, dict):
                        for x in leaf.values():
                            x[0] *= 3
                    else:
                        leaf[0] *= 3
        hfc.write_hf_dir(TINY, params, root / f"step{s}", dtype="float32")
    report = audit.audit_series(root)
    assert flagged(report) == {"step4": ["norm_jump"]}
    assert "layers.0" in report.errors()[0].detail


def test_norm_outliers_follow_trend():
    growing = np.exp(np.linspace(0, 2, 12))  # a steady trend is not an outlier, endpoints included
    assert audit.norm_outliers(growing) == []
    jumped = growing.copy()
    jumped[7] *= 1.5
    assert [i for i, _ in audit.norm_outliers(jumped)] == [7]


def test_checkpoint_directory(tmp_path):
    from pythia_jax.checkpoint import save_params_checkpoint

    root = tmp_path / "ckpt"
    for s in (1, 2, 3, 4):
        save_params_checkpoint(root, s, TINY, tiny_params(1 if s == 2 else s))
    report = audit.audit_series(root)
    assert report.layout == "checkpoint"
    assert flagged(report) == {"2": ["identical_step"]}
    assert len(report.steps[0].tensors) == len(hfc.param_shapes(TINY))
    assert set(report.steps[0].groups) == {"embed_in", "embed_out", "final_layer_norm", "layers.0", "layers.1"}


def test_cli_exit_status_and_json(clean, tmp_path, capsys):
    assert main(["audit", str(clean), "--out", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "step8" in out
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["ok"] and len(doc["steps"]) == len(STEPS)
    root = fresh(clean, tmp_path)
    shutil.rmtree(root / "step2")
    shutil.copytree(root / "step1", root / "step2")
    assert main(["audit", str(root)]) == 1
    assert "identical_step" in capsys.readouterr().out
    assert main(["audit", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["audit", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoints" in capsys.readouterr().err


def test_out_is_checked_before_the_audit_and_written_through_a_hidden_temporary(clean, tmp_path, capsys,
                                                                                  monkeypatch):
    """--out naming a folder (or an unrelated file) is refused before any step is read, naming the
    user's path; a failing write leaves no temporary; a previous report is replaced."""
    import os

    from pythia_jax.io_utils import write_text_atomic

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "mine.txt").write_text("keep")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    real = audit.audit_series
    monkeypatch.setattr(audit, "audit_series", lambda *a, **k: pytest.fail("audited before the check"))
    for out, what in ((scratch, "a folder of 1 other entries (mine.txt)"), (notes, "an unrelated file")):
        assert main(["audit", str(clean), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"pythia-jax audit: error: output {out} exists and is {what}, not an audit report "
                       "(.json of 'pythia-jax audit'); refusing to replace it: choose another output path"), err
    assert main(["audit", str(clean), "--out", str(clean / "step0" / "a.json")]) == 2
    assert "is inside the input" in capsys.readouterr().err
    monkeypatch.setattr(audit, "audit_series", real)
    report = tmp_path / "a.json"
    assert main(["audit", str(clean), "--out", str(report), "--quiet"]) == 0
    first = report.read_text()
    assert main(["audit", str(clean), "--out", str(report), "--quiet"]) == 0  # a report is replaced
    assert json.loads(report.read_text())["ok"]

    def failing(path, text):
        def boom(*a, **k):
            raise OSError(28, "No space left on device (simulated)")
        monkeypatch.setattr("pythia_jax.io_utils.outputs.os.rename", boom)
        write_text_atomic(path, text)

    monkeypatch.setattr("pythia_jax.io_utils.write_text_atomic", failing)
    assert main(["audit", str(clean), "--out", str(report), "--quiet"]) == 2
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a.json", "notes.json", "scratch"]
    assert json.loads(report.read_text())["directory"] == json.loads(first)["directory"]
    assert sorted(os.listdir(scratch)) == ["mine.txt"]


def test_steps_missing_from_the_pythia_schedule_are_noted(clean, tmp_path):
    """A series on the Pythia schedule with a step gone (a download that stopped part-way) passed
    as 'no problems found' without a word: a note names the missing steps (not a failure: a
    subset may be kept on purpose)."""
    root = fresh(clean, tmp_path)
    shutil.rmtree(root / "step2")
    report = audit.audit_series(root)
    (note,) = [f for f in report.findings if f.kind == "missing_steps"]
    assert note.severity == "note" and report.ok
    assert note.detail == "1 step(s) of the Pythia checkpoint schedule between 0 and 8 are not in this series: 2"
    assert not [f for f in audit.audit_series(clean).findings if f.kind == "missing_steps"]


def test_a_gpt_neox_folder_is_named_as_such(tmp_path, capsys):
    step = tmp_path / "global_step10"
    step.mkdir()
    (step / "layer_00-model_00-model_states.pt").write_bytes(b"")
    assert main(["audit", str(step)]) == 2
    assert "is a GPT-NeoX checkpoint, which audit does not read: convert its steps first" in capsys.readouterr().err
