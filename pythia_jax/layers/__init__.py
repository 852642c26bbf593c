"""Building blocks of GPT-NeoX: dense / embedding / LayerNorm modules, rotary embedding,
attention kernels, the chunked output loss and the logical-axis sharding hook.

Conventions: ``B`` batch, ``T`` query length, ``S`` key length, ``N`` heads, ``D`` head dim,
``H`` hidden size. Parameters carry their logical axis names as the NNX variable metadata
``out_sharding`` (a tuple of names such as ``('embed', 'heads')``); eager sharding is off, so
modules can be built without a mesh. The trainer maps the names to mesh axes with a rule table.

Modules, one job each (lowest first):

- ``logical``: logical axis names → ``PartitionSpec`` (``logical_to_mesh_spec``) and the
  activation constraint (``with_logical_constraint``).
- ``modules``: ``Dense``, ``Embed``, ``LayerNorm``, ``gelu`` and the parameter initialisers.
- ``rotary``: ``rotary_cos_sin``, ``apply_rotary``.
- ``attention``: ``causal_mask``, ``dot_product_attention`` and its kernels (reference, XLA,
  cuDNN, splash), ``check_attention_supported``, ``resolve_attention_impl``, ``cached_attention``.
- ``loss``: ``chunked_cross_entropy`` (``ModelConfig.loss_chunk``).

Everything is re-exported here: ``from pythia_jax.layers import Dense, dot_product_attention, …``.
"""

from __future__ import annotations

from pythia_jax.layers.attention import (
                                         blocked_causal_attention,
                                         cached_attention,
                                         causal_mask,
                                         check_attention_supported,
                                         dot_product_attention,
                                         reference_attention,
                                         resolve_attention_impl,
                                         xla_attention,
)
from pythia_jax.layers.logical import LogicalNames, logical_to_mesh_spec, with_logical_constraint
from pythia_jax.layers.loss import chunked_cross_entropy
from pythia_jax.layers.modules import Dense, Embed, Initializer, LayerNorm, gelu, normal
from pythia_jax.layers.rotary import apply_rotary, rotary_cos_sin

__all__ = [
    "LogicalNames", "logical_to_mesh_spec", "with_logical_constraint",
    "Initializer", "normal", "Dense", "Embed", "LayerNorm", "gelu",
    "rotary_cos_sin", "apply_rotary",
    "causal_mask", "reference_attention", "xla_attention", "blocked_causal_attention", "cached_attention",
    "check_attention_supported", "resolve_attention_impl", "dot_product_attention",
    "chunked_cross_entropy",
]
