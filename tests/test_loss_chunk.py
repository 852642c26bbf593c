"""The chunked cross-entropy (``ModelConfig.loss_chunk``) gives the losses and gradients of the
plain [B, T, V] loss, for chunks that divide the sequence and for a padded last chunk."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.model import GPTNeoX, params_to_dict
from pythia_jax.train.step import token_losses

B, T = 3, 16


def tiny(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=80, hidden_size=32, num_layers=2, num_heads=4,
                       max_position_embeddings=32, **kw)


@pytest.fixture(scope="module")
def case():
    cfg = tiny()
    params = params_to_dict(GPTNeoX(cfg, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.integers(0, 80, (B, T)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, 80, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) < 0.8, jnp.float32)
    return cfg, params, inputs, labels, mask


def loss_and_grads(cfg, params, inputs, labels, mask):
    def f(p):
        losses = token_losses(cfg, p, inputs, labels)
        return jnp.sum(losses * mask) / jnp.sum(mask), losses
    (loss, losses), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return loss, losses, grads


@pytest.mark.parametrize("chunk", [4, 5, 16, 40])
def test_chunked_loss_and_grads_equal_plain(case, chunk):
    cfg, params, inputs, labels, mask = case
    want_loss, want_losses, want_grads = loss_and_grads(cfg, params, inputs, labels, mask)
    got_loss, got_losses, got_grads = loss_and_grads(dataclasses.replace(cfg, loss_chunk=chunk),
                                                     params, inputs, labels, mask)
    assert got_losses.shape == (B, T) and got_losses.dtype == jnp.float32
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        scale = float(np.max(np.abs(w))) or 1.0
        np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(w) / scale, rtol=0, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_chunked_loss_never_builds_full_logits(case):
    """No [B, T, V] float32 array in the program of the chunked loss and its gradient (the
    lowered StableHLO: at these toy sizes XLA may unroll the 4-trip loop and merge the dots)."""
    cfg, params, inputs, labels, mask = case
    chunked = dataclasses.replace(cfg, loss_chunk=4)
    f = lambda p: jnp.sum(token_losses(chunked, p, inputs, labels))  # noqa: E731
    ir = jax.jit(jax.grad(f)).lower(params).as_text()
    V = cfg.vocab_size
    assert f"tensor<{B}x{T}x{V}xf32>" not in ir and f"tensor<{B * T}x{V}xf32>" not in ir
    assert f"tensor<{B}x4x{V}xf32>" in ir
    plain = jax.jit(jax.grad(lambda p: jnp.sum(token_losses(cfg, p, inputs, labels)))).lower(params).as_text()
    assert f"tensor<{B}x{T}x{V}xf32>" in plain  # (the check can see full logits where they exist)


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_loss_chunk_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="loss_chunk"):
        tiny(loss_chunk=bad)
