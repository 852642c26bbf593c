"""The key/value cache of incremental decoding: the whole model's cache and one layer's view of it.

The cache plays the part of ``layer_past`` / ``use_cache`` in GPT-NeoX ``megatron/model/
transformer.py::ParallelSelfAttention`` and of ``past_key_values`` in Hugging Face
``GPTNeoXAttention``, but is one preallocated buffer for all layers (stacked on a leading axis,
like the layer parameters) that each layer updates in place inside the layer scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pythia_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    """Per-layer keys/values for incremental decoding (a pytree; ``max_len`` is static).

    k, v:  [L, B, N, max_len, D] (keys after rotary; heads-major, so attention reads each head's
           slots contiguously), in the cache dtype.
    valid: bool [B, max_len], True where a slot holds a real token.
    index: int32 scalar, the next slot to write (the same for every row).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def init_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens.

    k/v zeros [L, B, N, max_len, D] in ``dtype``; valid all False [B, max_len]; index 0.
    """
    shape = (config.num_layers, batch, config.num_heads, max_len, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


@struct.dataclass
class LayerCache:
    """The stacked keys/values [L, B, N, S, D] seen from one layer: ``layer`` and the write slot
    ``index`` (int32 scalars, traced inside the layer scan).

    Each layer first writes its new tokens into the stacked buffers, then reads its slice back
    from the *updated* buffers. Reading before writing would leave two live versions of the
    buffer (the old one still to be read, the new one written), and XLA then copies the whole
    cache at every layer of every decoding step; written first, the update happens in place.
    """

    k: jax.Array
    v: jax.Array
    layer: jax.Array
    index: jax.Array

    def write(self, k_new: jax.Array, v_new: jax.Array) -> "LayerCache":
        """Store this layer's new keys/values [B, T, N, D] at slots index … index + T − 1."""
        at = (self.layer, 0, 0, self.index, 0)
        put = lambda buf, new: jax.lax.dynamic_update_slice(
            buf, jnp.swapaxes(new, 1, 2).astype(buf.dtype)[None], at)
        return self.replace(k=put(self.k, k_new), v=put(self.v, v_new))

    def read(self, dtype) -> tuple[jax.Array, jax.Array]:
        """This layer's keys and values [B, N, S, D] (all slots) in ``dtype``."""
        take = lambda buf: jax.lax.dynamic_index_in_dim(buf, self.layer, 0, keepdims=False).astype(dtype)
        return take(self.k), take(self.v)
