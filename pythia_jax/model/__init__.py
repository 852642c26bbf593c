"""GPT-NeoX (the Pythia architecture) in Flax NNX, matching Hugging Face ``GPTNeoXForCausalLM``.

Modules, one job each (lowest first):

- ``kv_cache``: the decoding cache (``KVCache``, ``init_kv_cache``) and one layer's view of it.
- ``gptneox``: the architecture, top to bottom: ``GPTNeoX`` (embedding → L layers in a scan →
  final LayerNorm → output head), ``Block`` (two pre-LayerNorms, attention, MLP, parallel or
  sequential residual), ``Attention``, ``MLP``.
- ``params``: the parameter tree as plain data: ``params_to_dict``, ``model_from_params``,
  ``abstract_params``, ``logical_axes``, ``check_params``.
- ``token_ids``: ``check_token_ids`` (ids outside ``[0, vocab_size)`` raise ``TokenIdError`` on
  the host; nothing can raise inside jit).

Everything is re-exported here: ``from pythia_jax.model import GPTNeoX, params_to_dict, …``.
"""

from __future__ import annotations

from pythia_jax.model.gptneox import _REMAT_POLICIES, MLP, Attention, Block, GPTNeoX  # noqa: F401

# _REMAT_POLICIES is re-exported for the tests, which compare it with config.REMAT_POLICIES.
from pythia_jax.model.kv_cache import KVCache, LayerCache, init_kv_cache
from pythia_jax.model.params import abstract_params, check_params, logical_axes, model_from_params, params_to_dict
from pythia_jax.model.token_ids import check_id_range, check_token_ids

__all__ = [
    "GPTNeoX", "Block", "Attention", "MLP", "KVCache", "LayerCache", "init_kv_cache",
    "params_to_dict", "model_from_params", "abstract_params", "logical_axes", "check_params",
    "check_token_ids", "check_id_range",
]
