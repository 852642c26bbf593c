"""``pythia_jax.load(folder_of_revisions, step=N)``: the step<N>/ HF folders the Pythia suite publishes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pythia_jax
from pythia_jax.config import ModelConfig
from pythia_jax.convert import hf as hfc
from pythia_jax.errors import CheckpointError
from pythia_jax.model import params_to_dict

TINY = ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4)


def test_load_folder_of_revisions(tmp_path):
    models = {s: pythia_jax.init(TINY, seed=s) for s in (0, 8)}
    for s, m in models.items():
        pythia_jax.save_hf(m, tmp_path / f"step{s}", dtype="float32")
    for s, m in models.items():
        loaded = pythia_jax.load(tmp_path, step=s)
        want = params_to_dict(m)["embed_in"]["embedding"]
        got = params_to_dict(loaded)["embed_in"]["embedding"]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    config, params = pythia_jax.api.load_params(tmp_path, step=8)
    assert config.hidden_size == TINY.hidden_size and isinstance(params["embed_in"]["embedding"], np.ndarray)
    # without a step: the newest revision, as eval and generate do
    newest = params_to_dict(pythia_jax.load(tmp_path))["embed_in"]["embedding"]
    np.testing.assert_array_equal(np.asarray(newest),
                                  np.asarray(params_to_dict(models[8])["embed_in"]["embedding"]))
    with pytest.raises(CheckpointError, match="has no step 4; available: 0, 8"):
        pythia_jax.load(tmp_path, step=4)
    # one revision folder still loads directly
    cfg, _ = hfc.read_hf_dir(tmp_path / "step0")
    assert pythia_jax.load(tmp_path / "step0").config.num_layers == cfg.num_layers


def test_load_refuses_a_step_or_keyword_it_would_misread(tmp_path):
    """A step that is not a non-negative integer, and a keyword no source (or not this source)
    takes, are refused by name before anything is read: a typo such as ``shardngs=`` was dropped
    without a word, ``step="1000"`` reported that step 1000 was missing."""
    from pythia_jax.config import ConfigError

    pythia_jax.save_hf(pythia_jax.init(TINY, seed=0), tmp_path / "step1000", dtype="float32")
    for step in ("1000", 1000.0, True, -1):
        with pytest.raises(ConfigError, match=r"step=.*expected a non-negative integer"):
            pythia_jax.load(tmp_path, step=step)
    assert pythia_jax.load(tmp_path, step=np.int64(1000)).config.hidden_size == TINY.hidden_size
    with pytest.raises(ConfigError, match="unknown keyword shardngs; the sources take"):
        pythia_jax.load(tmp_path / "step1000", shardngs=None)
    with pytest.raises(ConfigError, match=r"master_weights does not apply to .*step1000 \(an HF directory\)"):
        pythia_jax.load(tmp_path / "step1000", master_weights=False)
    with pytest.raises(ConfigError, match="host=True .* or shardings=, not both"):
        pythia_jax.api.load_params(tmp_path, host=True, shardings=object())


def test_load_places_hf_params_on_the_given_shardings(tmp_path):
    import jax

    pythia_jax.save_hf(pythia_jax.init(TINY, seed=0), tmp_path / "hf", dtype="float32")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, params = pythia_jax.api.load_params(tmp_path / "hf", shardings=sharding)
    leaves = jax.tree.leaves(params)
    assert all(isinstance(x, jax.Array) and x.sharding == sharding for x in leaves)


def test_init_refuses_a_seed_it_would_truncate():
    from pythia_jax.config import ConfigError

    for seed in (1.7, "3", -1, 2**32):
        with pytest.raises(ConfigError, match="seed must be an integer in"):
            pythia_jax.init(TINY, seed=seed)


def test_hf_to_jax_of_a_folder_of_revisions_converts_the_step_asked(tmp_path, capsys):
    from pythia_jax.checkpoint import load_params as load_checkpoint
    from pythia_jax.cli import main

    models = {s: pythia_jax.init(TINY, seed=s) for s in (0, 8)}
    for s, m in models.items():
        pythia_jax.save_hf(m, tmp_path / "revs" / f"step{s}", dtype="float32")
    for argv, message in (([], "is a folder of HF revisions (no --step): pass --step N for its step<N>/ folder; "
                                "available: 0, 8"),
                          (["--step", "4"], "(no revision step4)")):
        assert main(["convert", "hf-to-jax", str(tmp_path / "revs"), str(tmp_path / "ck"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()
    assert main(["convert", "hf-to-jax", str(tmp_path / "revs"), str(tmp_path / "ck"), "--step", "8",
                 "--no-progress"]) == 0
    _, params = load_checkpoint(tmp_path / "ck", step=8, host=True)
    np.testing.assert_array_equal(params["embed_in"]["embedding"],
                                  np.asarray(params_to_dict(models[8])["embed_in"]["embedding"]))


def test_an_incomplete_revision_is_named_not_skipped(tmp_path, capsys):
    """A step<N>/ left by an interrupted download (config.json only, or empty) was skipped by
    ``--steps all`` without a word, and asking for it said the step did not exist."""
    import shutil

    from pythia_jax.cli import main
    from pythia_jax.eval.loading import available_steps

    for s in (0, 60):
        pythia_jax.save_hf(pythia_jax.init(TINY, seed=s), tmp_path / f"step{s}", dtype="float32")
    (tmp_path / "step20").mkdir()
    shutil.copy(tmp_path / "step0" / "config.json", tmp_path / "step20")
    (tmp_path / "step40").mkdir()
    assert available_steps(tmp_path) == [0, 20, 40, 60]
    with pytest.raises(CheckpointError, match="step20 holds no HF weights"):
        pythia_jax.load(tmp_path, step=20)
    out = tmp_path.parent / "r.jsonl"
    data = Path(__file__).parent / "data" / "eval"
    assert main(["eval", "--checkpoints", str(tmp_path), "--steps", "all", "--tasks", "piqa", "--data-dir", str(data),
                 "--out", str(out), "--no-progress"]) == 2
    assert "step20 is not a complete HF directory" in capsys.readouterr().err and not out.exists()
