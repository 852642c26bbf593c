"""Hugging Face ``GPTNeoXForCausalLM`` weights <-> this project's parameter tree.

The key table (PYTHIA_FACTS §3) maps every HF tensor to one slot of the canonical params::

    HF key (torch layout [out, in])                 params path (ours, [in, out], layers stacked)
    gpt_neox.embed_in.weight            [V, H]      embed_in/embedding                   [V, H]
    gpt_neox.layers.{i}.X.weight (Linear)[out, in]  layers/X/kernel[i]                   [in, out]
    gpt_neox.layers.{i}.X.bias                      layers/X/bias[i]
    gpt_neox.layers.{i}.N.weight (LayerNorm)        layers/N/scale[i]
    gpt_neox.final_layer_norm.{weight,bias} [H]     final_layer_norm/{scale,bias}        [H]
    embed_out.weight                    [V, H]      embed_out/kernel                     [H, V]

Old checkpoints' buffers (``attention.bias``, ``attention.masked_bias``,
``attention.rotary_emb.inv_freq``) are ignored on read and never written.

Directory I/O (``read_hf_dir`` / ``write_hf_dir``) streams tensor by tensor: reading holds one
float32 model plus one tensor of the file being read; writing holds the params plus one shard.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from pythia_jax.config import ModelConfig
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
_LAYER_KEY = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)$")
_LAYER_SUFFIX = {suffix: (path, t) for path, suffix, t in LAYER_TABLE}
_GLOBAL_KEY = {key: (path, t) for path, key, t in GLOBAL_TABLE}
# transformers 5.x names the head ``lm_head`` in memory (and in files saved from a fresh model);
# the releases and GPT-NeoX's converter use ``embed_out``. Read both, write ``embed_out``.
KEY_ALIASES = {"lm_head.weight": "embed_out.weight"}


def param_shapes(config: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Shape of every leaf of the params tree, keyed by its full path (e.g. ``("layers", "mlp", ...)``)."""
    H, F, L, V = config.hidden_size, config.intermediate_size, config.num_layers, config.vocab_size
    per_layer = {
        ("input_layernorm", "scale"): (H,), ("input_layernorm", "bias"): (H,),
        ("post_attention_layernorm", "scale"): (H,), ("post_attention_layernorm", "bias"): (H,),
        ("attention", "query_key_value", "kernel"): (H, 3 * H),
        ("attention", "query_key_value", "bias"): (3 * H,),
        ("attention", "dense", "kernel"): (H, H), ("attention", "dense", "bias"): (H,),
        ("mlp", "dense_h_to_4h", "kernel"): (H, F), ("mlp", "dense_h_to_4h", "bias"): (F,),
        ("mlp", "dense_4h_to_h", "kernel"): (F, H), ("mlp", "dense_4h_to_h", "bias"): (H,),
    }
    shapes: dict[Path, tuple[int, ...]] = {("embed_in", "embedding"): (V, H)}
    shapes.update({("layers",) + p: (L,) + s for p, s in per_layer.items()})
    shapes.update({("final_layer_norm", "scale"): (H,), ("final_layer_norm", "bias"): (H,),
                   ("embed_out", "kernel"): (H, V)})
    return shapes


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


def _get(tree: Mapping[str, Any], path: Path) -> Any:
    node: Any = tree
    for p in path:
        try:
            node = node[p]
        except (KeyError, TypeError, IndexError):
            raise CheckpointError(f"params tree has no entry {'/'.join(path)}") from None
    return node


def _set(tree: dict, path: Path, value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


class ParamAssembler:
    """Fills a float32 params tree one HF tensor at a time (for streaming readers).

    ``add(key, array)`` checks the shape, casts to float32 and writes the tensor into its slot
    (transposed for Linear weights, at index ``i`` of the layer stack); ``finish()`` checks that
    every tensor arrived and returns the nested dict of ``np.ndarray`` (float32).
    """

    def __init__(self, config: ModelConfig, source: str = "checkpoint"):
        self.config = config
        self.source = source
        self._shapes = param_shapes(config)
        self._arrays = {p: np.empty(s, np.float32) for p, s in self._shapes.items()}
        self._expected = hf_shapes(config)
        self._seen: set[str] = set()

    def slot(self, key: str) -> tuple[Path, int | None, bool] | None:
        """(params path, layer index or None, transpose) of an HF key; None for ignored buffers."""
        key = KEY_ALIASES.get(key, key)
        if key in _GLOBAL_KEY:
            path, t = _GLOBAL_KEY[key]
            return path, None, t
        m = _LAYER_KEY.match(key)
        if m and m.group(2) in _LAYER_SUFFIX:
            layer = int(m.group(1))
            if layer >= self.config.num_layers:
                raise CheckpointError(
                    f"{self.source}: tensor {key} belongs to layer {layer}, but the config has "
                    f"{self.config.num_layers} layers")
            path, t = _LAYER_SUFFIX[m.group(2)]
            return ("layers",) + path, layer, t
        if is_ignored_key(key):
            return None
        raise CheckpointError(f"{self.source}: unexpected tensor {key!r} (not a GPT-NeoX weight)")

    def wants(self, key: str) -> bool:
        return self.slot(key) is not None

    def expected_shape(self, key: str) -> tuple[int, ...]:
        return self._expected[key]

    def check_shape(self, key: str, shape: Iterable[int]) -> None:
        key = KEY_ALIASES.get(key, key)
        shape = tuple(int(d) for d in shape)
        expected = self._expected[key]
        if shape != expected:
            raise CheckpointError(f"{self.source}: tensor {key} has shape {list(shape)}, "
                                  f"expected {list(expected)} for this config")

    def add(self, key: str, array: Any) -> None:
        slot = self.slot(key)
        if slot is None:
            return
        path, layer, transpose = slot
        self.check_shape(key, np.shape(array))
        value = np.asarray(array)
        if transpose:
            value = value.T
        target = self._arrays[path] if layer is None else self._arrays[path][layer]
        target[...] = value  # casts to float32 in place
        canonical = KEY_ALIASES.get(key, key)
        if canonical in self._seen:
            raise CheckpointError(f"{self.source}: tensor {key} appears twice")
        self._seen.add(canonical)

    def missing(self) -> list[str]:
        return [k for k in self._expected if k not in self._seen]

    def finish(self) -> dict[str, Any]:
        missing = self.missing()
        if missing:
            shown = ", ".join(missing[:5]) + (f" … ({len(missing)} in all)" if len(missing) > 5 else "")
            raise CheckpointError(f"{self.source}: missing tensors: {shown}")
        tree: dict[str, Any] = {}
        for path, arr in self._arrays.items():
            _set(tree, path, arr)
        self._arrays = {}
        return tree


def hf_state_dict_to_params(config: ModelConfig, state_dict: Mapping[str, Any],
                            source: str = "state dict") -> dict[str, Any]:
    """HF state dict (arrays or torch tensors, any float dtype) -> params tree of float32 ``np.ndarray``.

    Raises ``CheckpointError`` for a missing tensor, a wrong shape or an unknown key.
    """
    assembler = ParamAssembler(config, source)
    for key, value in state_dict.items():
        if assembler.wants(key):
            assembler.add(key, to_numpy(value))
    return assembler.finish()


def iter_hf_tensors(config: ModelConfig, params: Mapping[str, Any],
                    dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(HF key, contiguous np.ndarray in dtype)`` one tensor at a time, in HF order.

    ``params`` leaves may be numpy or (host-reachable) JAX arrays; nothing but the yielded
    tensor is materialised, so a writer can stream.
    """
    dtype = np.dtype(dtype)
    shapes = param_shapes(config)
    expected = hf_shapes(config)
    host: dict[Path, np.ndarray] = {}

    def leaf(path: Path) -> np.ndarray:
        if path not in host:
            value = _get(params, path)
            if tuple(np.shape(value)) != shapes[path]:
                raise CheckpointError(f"params {'/'.join(path)} has shape {list(np.shape(value))}, "
                                      f"expected {list(shapes[path])} for this config")
            host[path] = np.asarray(value)
        return host[path]

    for key in expected:
        if key in _GLOBAL_KEY:
            path, transpose = _GLOBAL_KEY[key]
            value = leaf(path)
        else:
            m = _LAYER_KEY.match(key)
            assert m is not None
            path, transpose = _LAYER_SUFFIX[m.group(2)]
            value = leaf(("layers",) + path)[int(m.group(1))]
        if transpose:
            value = value.T
        yield key, np.ascontiguousarray(value, dtype=dtype)


def params_to_hf_state_dict(config: ModelConfig, params: Mapping[str, Any],
                            dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Params tree -> HF state dict of ``np.ndarray`` (torch layout, ``dtype``, default float32)."""
    return dict(iter_hf_tensors(config, params, dtype))


def to_numpy(value: Any) -> np.ndarray:
    """A numpy view/copy of an array-like (torch tensors included, bfloat16 via float32)."""
    if type(value).__module__.startswith("torch"):
        import torch
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(value)
