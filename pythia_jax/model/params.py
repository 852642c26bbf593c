"""The parameter tree of ``GPTNeoX`` as plain data: the pure dict, its abstract shapes and logical
axis names, the shape check, and a model built from a dict.

The pure dict is what checkpoints, converters, the trainer and the evaluators pass around; the
names follow Hugging Face ``GPTNeoXForCausalLM`` (``gpt_neox.`` prefix dropped, ``weight`` →
``kernel`` transposed, LayerNorm ``weight`` → ``scale``), layers stacked on axis 0::

    embed_in/embedding                                    [V, H]
    layers/{input,post_attention}_layernorm/{scale,bias}  [L, H]
    layers/attention/query_key_value/{kernel [L, H, 3H], bias [L, 3H]}
                                 (HF weight.T; columns per head: [heads, (q, k, v), head_dim])
    layers/attention/dense/{kernel [L, H, H], bias [L, H]}
    layers/mlp/dense_h_to_4h/{kernel [L, H, F], bias [L, F]}
    layers/mlp/dense_4h_to_h/{kernel [L, F, H], bias [L, H]}
    final_layer_norm/{scale, bias}                        [H]
    embed_out/kernel                                      [H, V]   (HF embed_out.weight.T)

The expected shapes are defined once, in ``pythia_jax.config.param_shapes``; the HF key table is
``pythia_jax.convert.hf_keys``.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from pythia_jax.config import ModelConfig, check_param_shapes
from pythia_jax.model.gptneox import GPTNeoX


def params_to_dict(model: GPTNeoX) -> dict:
    """The canonical nested dict of parameter arrays (layout in this module's docstring)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(config: ModelConfig) -> dict:
    """Parameter tree of ``jax.ShapeDtypeStruct`` (shapes and ``param_dtype``), no memory spent."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), _abstract_tree(config)[0])


def logical_axes(config: ModelConfig) -> dict:
    """Logical axis names of every parameter: a dict of tuples with the tree of ``abstract_params``
    (e.g. ``('layers', 'embed', 'heads')`` for the stacked QKV kernel); ``sharding.py`` maps them
    to mesh axes with a rule table."""
    return _logical_axes_copy(_abstract_tree(config)[1])


def check_params(config: ModelConfig, params: Mapping) -> None:
    """Raise ``ParamShapeError`` (a ``ConfigError``) naming missing, unexpected or wrongly shaped
    parameters: ``config.check_param_shapes``, the one check against ``config.param_shapes``."""
    check_param_shapes(config, params, what="parameters")


def model_from_params(config: ModelConfig, params: Mapping) -> GPTNeoX:
    """A ``GPTNeoX`` holding ``params`` (cast to ``param_dtype``), without random init work.

    Works on concrete arrays (sharded or not) and inside ``jax.jit`` on traced ones. Raises
    ``ParamShapeError`` (``check_params``) when the tree does not fit ``config``.
    """
    check_params(config, params)
    pdt = jnp.dtype(config.param_dtype)
    params = jax.tree.map(lambda a: a if a.dtype == pdt else a.astype(pdt),
                          jax.tree.map(jnp.asarray, dict(params)))
    graphdef, state = _abstract_split(config)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _abstract_split(config: ModelConfig):
    """(graphdef, State of ShapeDtypeStruct) of a model, traced with ``jax.eval_shape``: no memory.

    ``jax.eval_shape`` rather than ``nnx.eval_shape``: the latter resolves every logical name
    against an active mesh and rule table, failing for names the rules do not mention.
    """
    box = {}

    def build():
        graphdef, state = nnx.split(GPTNeoX(config, rngs=nnx.Rngs(0)))
        box["graphdef"] = graphdef
        return state

    state = jax.eval_shape(build)
    return box["graphdef"], state


@functools.lru_cache(maxsize=64)
def _abstract_tree(config: ModelConfig) -> tuple[dict, dict]:
    """(pure tree of ShapeDtypeStruct, pure tree of logical-name tuples), memoised per config."""
    state = _abstract_split(config)[1]
    names: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = names
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = tuple(var.get_metadata()["out_sharding"])
    return nnx.to_pure_dict(state), names


def _logical_axes_copy(tree):
    """A fresh copy of the memoised name tree, so callers cannot change the cache."""
    if isinstance(tree, Mapping):
        return {k: _logical_axes_copy(v) for k, v in tree.items()}
    return tuple(tree)
