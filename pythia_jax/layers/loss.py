"""The output layer's cross-entropy computed a chunk of positions at a time
(``ModelConfig.loss_chunk``), so the float32 [B, T, V] logits are never built whole."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from pythia_jax.layers.logical import with_logical_constraint


def chunked_cross_entropy(x: jax.Array, kernel: jax.Array, labels: jax.Array, chunk: int,
                          dtype=jnp.float32) -> jax.Array:
    """Per-token softmax cross-entropy of the output layer without materialising [B, T, V] logits.

    x: final hidden states [B·T, H] (any float dtype); kernel: the output layer [H, V];
    labels: int [B, T]; chunk: tokens of each row per chunk (``ModelConfig.loss_chunk``);
    dtype: the matmul compute dtype. Returns float32 [B, T].

    The sequence is cut into chunks of ``chunk`` positions (the last one padded); a
    ``lax.scan`` computes each chunk's float32 logits [B, chunk, V] exactly as ``Dense`` with
    ``out_dtype=float32`` does (inputs in ``dtype``, float32 accumulation), then the cross-entropy
    of ``optax.softmax_cross_entropy_with_integer_labels``. The scan body is rematerialised, so the
    backward pass recomputes one chunk's logits at a time instead of keeping all of them: peak
    logits memory is B·chunk·V floats instead of B·T·V. Same per-token arithmetic as the plain
    loss (within float32 rounding of the matmul blocking).
    """
    B, T = labels.shape
    H = x.shape[-1]
    n = -(-T // chunk)
    pad = n * chunk - T
    h = x.reshape(B, T, H)
    labels = labels.astype(jnp.int32)
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
    # [n, B, chunk, ...]: the batch axis keeps its data-parallel sharding inside every chunk
    h = jnp.swapaxes(h.reshape(B, n, chunk, H), 0, 1)
    labels = jnp.swapaxes(labels.reshape(B, n, chunk), 0, 1)
    w = kernel.astype(dtype)

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable,
                       prevent_cse=False)
    def one_chunk(hc, lc):
        logits = jnp.dot(hc.astype(dtype), w, preferred_element_type=jnp.float32).astype(jnp.float32)
        logits = with_logical_constraint(logits, ("batch", "length", "vocab"))
        return optax.softmax_cross_entropy_with_integer_labels(logits, lc)

    _, losses = jax.lax.scan(lambda c, xs: (c, one_chunk(*xs)), None, (h, labels))
    return jnp.swapaxes(losses, 0, 1).reshape(B, n * chunk)[:, :T]
