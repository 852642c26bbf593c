"""The public API: pythia_jax.init / load / save_hf on every supported source."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import pythia_jax
from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.convert import hf as hfc
from pythia_jax.errors import CheckpointError
from pythia_jax.model import params_to_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4)


def same_params(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_init_by_config_and_name():
    model = pythia_jax.init(TINY, seed=0)
    assert model.config == TINY
    again = pythia_jax.init(TINY, seed=0)
    other = pythia_jax.init(TINY, seed=1)
    assert same_params(params_to_dict(model), params_to_dict(again))
    assert not same_params(params_to_dict(model), params_to_dict(other))
    small = pythia_jax.init("pythia-14m", seed=0, num_layers=1, vocab_size=128)
    assert small.config.hidden_size == 128 and small.config.num_layers == 1
    logits = small(np.zeros((1, 3), np.int32))
    assert logits.shape == (1, 3, 128) and logits.dtype == np.float32
    with pytest.raises(ConfigError, match="unknown model name 'pythia-3b'"):
        pythia_jax.init("pythia-3b")


def test_forward_refuses_token_ids_outside_vocab():
    """A concrete array with ids >= vocab_size gave NaN logits, negative ids wrapped around; both
    raise TokenIdError (also an IndexError, as HF's embedding raises). Traced arrays run as before."""
    from pythia_jax.errors import TokenIdError

    model = pythia_jax.init(TINY, seed=0)
    msg = r"token ids lie outside the model's vocabulary: ids from 5 to 101, but vocab_size is 101 \(valid ids 0..100\)"
    with pytest.raises(TokenIdError, match=msg):
        model(jax.numpy.array([[5, 100, 101]], jax.numpy.int32))
    with pytest.raises(IndexError, match="ids from -1 to -1"):
        model(np.full((1, 4), -1, np.int32))
    with pytest.raises(TokenIdError, match="ids from 0 to 101"):
        model.hidden_states(np.array([[0, 101]], np.int32))
    ok = model(np.array([[0, 100]], np.int32))
    assert np.isfinite(np.asarray(ok)).all()
    assert np.allclose(jax.jit(lambda t: model(t))(np.array([[0, 100]], np.int32)), ok, atol=1e-5)
    closed = jax.numpy.array([[0, 100]], jax.numpy.int32)  # a concrete array captured by a trace
    assert np.allclose(jax.jit(lambda: model(closed))(), ok, atol=1e-5)


def test_load_every_source_and_save_hf(tmp_path):
    from pythia_jax.checkpoint import save_params_checkpoint
    from pythia_jax.convert.neox import write_neox_checkpoint
    from pythia_jax.model import model_from_params

    model = pythia_jax.init(TINY, seed=0)
    params = params_to_dict(model)
    tokens = np.array([[1, 5, 7, 9]], np.int32)
    forward = jax.jit(lambda p, t: model_from_params(TINY, p)(t))  # one compile for every load
    with jax.default_matmul_precision("highest"):
        want = np.asarray(model(tokens))

    pythia_jax.save_hf(model, tmp_path / "hf", dtype="float32")
    save_params_checkpoint(tmp_path / "ck", 42, TINY, params)
    write_neox_checkpoint(TINY, params, tmp_path / "nx", step=42)
    for source in (tmp_path / "hf", tmp_path / "ck", tmp_path / "ck" / "42", tmp_path / "nx",
                   tmp_path / "nx" / "global_step42"):
        loaded = pythia_jax.load(source)
        assert loaded.config.replace(name=TINY.name) == TINY, source
        assert same_params(params_to_dict(loaded), params), source
        with jax.default_matmul_precision("highest"):
            got = np.asarray(forward(params_to_dict(loaded), tokens))
        assert np.abs(got - want).max() <= 1e-6, source
    assert pythia_jax.load(tmp_path / "ck", dtype="bfloat16").config.dtype == "bfloat16"

    # fp16 export (the release dtype) loads in transformers and matches within fp16 rounding
    pythia_jax.save_hf(model, tmp_path / "hf16")
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf16", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert np.abs(theirs - want).max() < 1e-2


def test_load_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        pythia_jax.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model directory"):
        pythia_jax.load(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        pythia_jax.load(tmp_path / "file")
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="missing required keys"):
        pythia_jax.load(tmp_path / "cfg_only")


def test_load_neox_zero_uses_master_weights(tmp_path):
    import test_convert as tc

    step_dir, master, _ = tc.build_zero(tmp_path, tp=1, dp=2)
    model = pythia_jax.load(step_dir)
    sd = hfc.params_to_hf_state_dict(model.config, jax.tree.map(np.asarray, params_to_dict(model)))
    np.testing.assert_array_equal(sd["gpt_neox.layers.0.attention.dense.weight"],
                                  master[0][2]["attention.dense.weight"].numpy())
    from pythia_jax.api import load_params
    _, fp16_copy = load_params(step_dir, master_weights=False)
    assert not np.array_equal(fp16_copy["layers"]["attention"]["dense"]["kernel"][0],
                              master[0][2]["attention.dense.weight"].numpy().T)
