"""The Hugging Face ``GPTNeoXForCausalLM`` key table: which HF tensor fills which params slot.

The table follows the state dict of transformers' ``GPTNeoXForCausalLM``
(``models/gpt_neox/modeling_gpt_neox.py``; GPT-NeoX's ``tools/ckpts/convert_neox_to_hf.py``
writes the same keys)::

    HF key (torch layout [out, in])                 params path (ours, [in, out], layers stacked)
    gpt_neox.embed_in.weight            [V, H]      embed_in/embedding                   [V, H]
    gpt_neox.layers.{i}.X.weight (Linear)[out, in]  layers/X/kernel[i]                   [in, out]
    gpt_neox.layers.{i}.X.bias                      layers/X/bias[i]
    gpt_neox.layers.{i}.N.weight (LayerNorm)        layers/N/scale[i]
    gpt_neox.final_layer_norm.{weight,bias} [H]     final_layer_norm/{scale,bias}        [H]
    embed_out.weight                    [V, H]      embed_out/kernel                     [H, V]

Old checkpoints' buffers (``attention.bias``, ``attention.masked_bias``,
``attention.rotary_emb.inv_freq``, registered by older transformers releases) are ignored on
read and never written. The shape of every params leaf is ``pythia_jax.config.param_shapes`` (the
one definition, re-exported here). Pure tables and shape arithmetic: no tensors are read or made
here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from pythia_jax.config import ModelConfig, check_param_shapes, param_shapes  # noqa: F401 (re-exported)
from pythia_jax.errors import CheckpointError

Path = tuple[str, ...]

# (params path below "layers", HF suffix below "gpt_neox.layers.{i}.", transpose)
LAYER_TABLE: tuple[tuple[Path, str, bool], ...] = (
    (("input_layernorm", "scale"), "input_layernorm.weight", False),
    (("input_layernorm", "bias"), "input_layernorm.bias", False),
    (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", False),
    (("post_attention_layernorm", "bias"), "post_attention_layernorm.bias", False),
    (("attention", "query_key_value", "kernel"), "attention.query_key_value.weight", True),
    (("attention", "query_key_value", "bias"), "attention.query_key_value.bias", False),
    (("attention", "dense", "kernel"), "attention.dense.weight", True),
    (("attention", "dense", "bias"), "attention.dense.bias", False),
    (("mlp", "dense_h_to_4h", "kernel"), "mlp.dense_h_to_4h.weight", True),
    (("mlp", "dense_h_to_4h", "bias"), "mlp.dense_h_to_4h.bias", False),
    (("mlp", "dense_4h_to_h", "kernel"), "mlp.dense_4h_to_h.weight", True),
    (("mlp", "dense_4h_to_h", "bias"), "mlp.dense_4h_to_h.bias", False),
)
# (params path, HF key, transpose) of the tensors outside the layer stack.
GLOBAL_TABLE: tuple[tuple[Path, str, bool], ...] = (
    (("embed_in", "embedding"), "gpt_neox.embed_in.weight", False),
    (("final_layer_norm", "scale"), "gpt_neox.final_layer_norm.weight", False),
    (("final_layer_norm", "bias"), "gpt_neox.final_layer_norm.bias", False),
    (("embed_out", "kernel"), "embed_out.weight", True),
)
IGNORED_SUFFIXES = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")
LAYER_KEY = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)$")
LAYER_SUFFIX = {suffix: (path, t) for path, suffix, t in LAYER_TABLE}
GLOBAL_KEY = {key: (path, t) for path, key, t in GLOBAL_TABLE}
# transformers 5.x names the head ``lm_head`` in memory (and in files saved from a fresh model);
# the releases and GPT-NeoX's converter use ``embed_out``. Read both, write ``embed_out``.
KEY_ALIASES = {"lm_head.weight": "embed_out.weight"}


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF key of the model (in HF's state-dict order) with its torch-layout shape."""
    shapes = param_shapes(config)
    out: dict[str, tuple[int, ...]] = {}
    emb_path, emb_key, _ = GLOBAL_TABLE[0]
    out[emb_key] = shapes[emb_path]
    for i in range(config.num_layers):
        for path, suffix, transpose in LAYER_TABLE:
            s = shapes[("layers",) + path][1:]
            out[f"gpt_neox.layers.{i}.{suffix}"] = s[::-1] if transpose else s
    for path, key, transpose in GLOBAL_TABLE[1:]:
        s = shapes[path]
        out[key] = s[::-1] if transpose else s
    return out


def is_ignored_key(key: str) -> bool:
    """True for the old non-parameter buffers some checkpoints carry."""
    return any(key.endswith("." + s) or key == s for s in IGNORED_SUFFIXES)


def get_path(tree: Mapping[str, Any], path: Path) -> Any:
    """The leaf at ``path`` of a nested params dict; ``CheckpointError`` when it is absent."""
    node: Any = tree
    for p in path:
        try:
            node = node[p]
        except (KeyError, TypeError, IndexError):
            raise CheckpointError(f"params tree has no entry {'/'.join(path)}") from None
    return node


def set_path(tree: dict, path: Path, value: Any) -> None:
    """Store ``value`` at ``path`` of a nested dict, creating the inner dicts."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def check_params(config: ModelConfig, params: Mapping[str, Any]) -> None:
    """``config.check_param_shapes``: raise ``ParamShapeError`` (a ``CheckpointError``) naming a
    missing, unexpected or wrongly shaped leaf of ``params`` against ``config.param_shapes``."""
    check_param_shapes(config, params)
