"""``pythia_jax.load(folder_of_revisions, step=N)``: the step<N>/ HF folders the Pythia suite publishes."""

from __future__ import annotations

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
