"""Rotary position embedding (RoFormer) as GPT-NeoX applies it: partial (the first
``rotary_ndims`` dims of each head), rotate-half pairing, angles in float32.

GPT-NeoX ``megatron/model/positional_embeddings.py`` (``RotaryEmbedding``, ``rotate_half``,
``apply_rotary_pos_emb``); HF ``GPTNeoXRotaryEmbedding`` / ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rotary_cos_sin(positions: jax.Array, rotary_ndims: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables, float32 [B, T, rotary_ndims], from integer positions [B, T].

    inv_freq = 1 / base^(arange(0, rd, 2)/rd); the angle table is repeated twice along the last
    axis (rotate-half pairing: dim i pairs with dim i + rd/2), as in GPT-NeoX / HF.
    """
    # float32 exponents as torch computes them; the power evaluated accurately and rounded to
    # float32, then a float32 reciprocal: bit-identical to torch's table for most sizes (≤ 1 ulp).
    exponents = np.arange(0, rotary_ndims, 2, dtype=np.float32) / np.float32(rotary_ndims)
    powers = (np.float64(base) ** exponents.astype(np.float64)).astype(np.float32)
    inv_freq = jnp.asarray(np.float32(1.0) / powers, dtype=jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first ``cos.shape[-1]`` dims of x [B, T, N, D] (in float32); the rest pass through."""
    rd = cos.shape[-1]
    if rd == 0:
        return x
    x_rot = x[..., :rd].astype(jnp.float32)
    x_pass = x[..., rd:]
    half = rd // 2
    rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = (x_rot * cos + rotated_half * sin).astype(x.dtype)
    return jnp.concatenate([out, x_pass], axis=-1)
