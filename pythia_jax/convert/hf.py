"""Hugging Face ``GPTNeoXForCausalLM`` weights <-> this project's parameter tree.

The key table (transformers' ``GPTNeoXForCausalLM`` state dict) maps every HF tensor to one slot
of the canonical params (shapes: ``pythia_jax.config.param_shapes``)::

    HF key (torch layout [out, in])                 params path (ours, [in, out], layers stacked)
    gpt_neox.embed_in.weight            [V, H]      embed_in/embedding                   [V, H]
    gpt_neox.layers.{i}.X.weight (Linear)[out, in]  layers/X/kernel[i]                   [in, out]
    gpt_neox.layers.{i}.X.bias                      layers/X/bias[i]
    gpt_neox.layers.{i}.N.weight (LayerNorm)        layers/N/scale[i]
    gpt_neox.final_layer_norm.{weight,bias} [H]     final_layer_norm/{scale,bias}        [H]
    embed_out.weight                    [V, H]      embed_out/kernel                     [H, V]

Old checkpoints' buffers (``attention.bias``, ``attention.masked_bias``,
``attention.rotary_emb.inv_freq``) are ignored on read and never written. Checkpoints saved with
``attention_bias=false`` (no QKV / attention-output biases) read those biases as zeros, and with
``tie_word_embeddings=true`` (no head tensor) read ``embed_out`` as a copy of ``embed_in``: the
same outputs in the always-untied, biased layout of this project (``config.HFWeightLayout``).

Directory I/O (``read_hf_dir`` / ``write_hf_dir``) streams tensor by tensor: reading holds one
float32 model plus one tensor of the file being read; writing holds the params plus one shard.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from pythia_jax import io_utils
from pythia_jax.config import (HFWeightLayout, ModelConfig, check_param_shapes, hf_weight_layout,
                               param_shapes, read_hf_config_json)
from pythia_jax.data.tokenizer import TOKENIZER_FILE
from pythia_jax.errors import CheckpointError

logger = logging.getLogger(__name__)

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


# HF keys that a checkpoint without attention biases lacks (read as zeros)
_ATTENTION_BIAS_SUFFIXES = ("attention.query_key_value.bias", "attention.dense.bias")
_HEAD_KEY = "embed_out.weight"


class ParamAssembler:
    """Fills a float32 params tree one HF tensor at a time (for streaming readers).

    ``add(key, array)`` checks the shape, casts to float32 and writes the tensor into its slot
    (transposed for Linear weights, at index ``i`` of the layer stack); ``finish()`` checks that
    every tensor arrived and returns the nested dict of ``np.ndarray`` (float32).
    ``layout`` (from ``config.hf_weight_layout``): without attention biases those tensors are
    zeros; with tied embeddings ``embed_out`` is ``embed_in`` transposed. Tensors the layout
    says are absent are skipped when present, as transformers does (logged).
    """

    def __init__(self, config: ModelConfig, source: str = "checkpoint",
                 layout: HFWeightLayout = HFWeightLayout()):
        self.config = config
        self.source = source
        self.layout = layout
        self._shapes = param_shapes(config)
        with plain_pages():  # aligned: to_device_tree then adopts the arrays on CPU (no copy)
            self._arrays = {p: aligned_empty(s, np.float32) for p, s in self._shapes.items()}
        self._expected = {k: s for k, s in hf_shapes(config).items() if not self._absent(k)}
        self._seen: set[str] = set()
        self._skipped: list[str] = []

    def _absent(self, key: str) -> bool:
        """True for a tensor the checkpoint's layout does not have (filled in by ``finish``)."""
        if not self.layout.attention_bias and key.endswith(_ATTENTION_BIAS_SUFFIXES):
            return True
        return self.layout.tie_word_embeddings and key == _HEAD_KEY

    def slot(self, key: str) -> tuple[Path, int | None, bool] | None:
        """(params path, layer index or None, transpose) of an HF key; None for ignored buffers."""
        key = KEY_ALIASES.get(key, key)
        if self._absent(key):
            self._skipped.append(key)  # transformers does not use it either
            return None
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
        target = self._arrays[path] if layer is None else self._arrays[path][layer]
        copy_cast(target, np.asarray(array), transpose)
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
        if self._skipped:
            logger.warning("%s: %d tensor(s) the config says are unused were skipped, as transformers "
                           "does (e.g. %s)", self.source, len(self._skipped), self._skipped[0])
        if not self.layout.attention_bias:
            for name in ("query_key_value", "dense"):
                self._arrays[("layers", "attention", name, "bias")][...] = 0.0
        if self.layout.tie_word_embeddings:
            copy_cast(self._arrays[("embed_out", "kernel")], self._arrays[("embed_in", "embedding")],
                      transpose=True)
        tree: dict[str, Any] = {}
        for path, arr in self._arrays.items():
            _set(tree, path, arr)
        self._arrays = {}
        return tree


def hf_state_dict_to_params(config: ModelConfig, state_dict: Mapping[str, Any],
                            source: str = "state dict",
                            layout: HFWeightLayout = HFWeightLayout()) -> dict[str, Any]:
    """HF state dict (arrays or torch tensors, any float dtype) -> params tree of float32 ``np.ndarray``.

    ``layout``: ``config.hf_weight_layout(config_json)`` for checkpoints without attention biases
    or with tied embeddings. Raises ``CheckpointError`` for a missing tensor, a wrong shape or an
    unknown key.
    """
    assembler = ParamAssembler(config, source, layout)
    for key, value in state_dict.items():
        if assembler.wants(key):
            assembler.add(key, to_numpy(value))
    return assembler.finish()


def iter_hf_tensors(config: ModelConfig, params: Mapping[str, Any],
                    dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(HF key, contiguous np.ndarray in dtype)`` one tensor at a time, in HF order.

    ``params`` leaves may be numpy or JAX arrays (sharded ones too). Only the yielded tensor
    is materialised on the host: a JAX leaf is sliced on device first and just that slice is
    fetched (``np.asarray`` of a whole JAX leaf would also keep a host copy cached on it).
    Shapes are checked here, before the first tensor is made (``ParamShapeError``, a
    ``CheckpointError``).
    """
    _check_params(config, params)
    return _hf_tensors(config, params, np.dtype(dtype))


def _hf_tensors(config: ModelConfig, params: Mapping[str, Any], dtype: np.dtype
                ) -> Iterator[tuple[str, np.ndarray]]:
    expected = hf_shapes(config)

    def host_tensor(path: Path, layer: int | None) -> np.ndarray:
        value = _get(params, path)
        if isinstance(value, np.ndarray):
            return value if layer is None else value[layer]
        if hasattr(value, "addressable_shards"):  # a jax.Array: fetch a fresh device slice
            import jax.numpy as jnp
            return np.asarray(jnp.array(value, copy=True) if layer is None else value[layer])
        value = np.asarray(value)
        return value if layer is None else value[layer]

    for key in expected:
        if key in _GLOBAL_KEY:
            path, transpose = _GLOBAL_KEY[key]
            value = host_tensor(path, None)
        else:
            m = _LAYER_KEY.match(key)
            assert m is not None
            path, transpose = _LAYER_SUFFIX[m.group(2)]
            value = host_tensor(("layers",) + path, int(m.group(1)))
        with plain_pages():
            out = np.empty(expected[key], dtype)
        copy_cast(out, value, transpose)
        del value
        yield key, out


def params_to_hf_state_dict(config: ModelConfig, params: Mapping[str, Any],
                            dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Params tree -> HF state dict of ``np.ndarray`` (torch layout, ``dtype``, default float32)."""
    return dict(iter_hf_tensors(config, params, dtype))


_BLOCK = 256


@contextlib.contextmanager
def plain_pages() -> Iterator[None]:
    """Allocate numpy arrays without numpy's transparent-huge-page ``madvise`` inside the block.

    On hosts with fragmented memory the huge-page faults stall on compaction: filling a fresh
    model-sized array was 2-2.5x slower with them in testing. Only affects allocations made here.
    """
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy < 2
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            yield
            return
    previous = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(previous)


def aligned_empty(shape: tuple[int, ...], dtype: Any, alignment: int = 64) -> np.ndarray:
    """``np.empty`` with an ``alignment``-byte aligned data pointer. XLA's CPU client adopts such
    a buffer in ``jax.device_put(x, may_alias=True)``; numpy's own (16-byte aligned) ones are copied."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def copy_cast(dst: np.ndarray, src: np.ndarray, transpose: bool = False) -> None:
    """``dst[...] = src.T if transpose else src`` with casting, transposing in cache-sized blocks
    (a one-shot transposed cast is 4-5x slower in numpy). Large arrays are split by source rows
    over a few threads (numpy releases the GIL while copying): 1.5x faster on 2 cores."""
    transpose = transpose and src.ndim == 2
    rows = src.shape[0] if src.ndim else 0
    if src.size < _PARALLEL_COPY_ELEMENTS or rows < 2 * _BLOCK or _copy_threads() == 1:
        _copy_rows(dst, src, transpose, 0, rows)
        return
    pieces = 4 * _copy_threads()
    step = -(-rows // pieces // _BLOCK) * _BLOCK if transpose else -(-rows // pieces)
    list(_copy_pool().map(lambda lo: _copy_rows(dst, src, transpose, lo, min(lo + step, rows)),
                          range(0, rows, step)))


_PARALLEL_COPY_ELEMENTS = 1 << 22


def _copy_rows(dst: np.ndarray, src: np.ndarray, transpose: bool, lo: int, hi: int) -> None:
    """Source rows ``lo:hi`` of :func:`copy_cast` (all of a 0-d array)."""
    if src.ndim == 0:
        dst[...] = src
    elif not transpose:
        dst[lo:hi] = src[lo:hi]
    else:
        for i in range(lo, hi, _BLOCK):
            j = min(i + _BLOCK, hi)
            dst[:, i:j] = src[i:j].T


@functools.lru_cache(maxsize=1)
def _copy_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@functools.lru_cache(maxsize=1)
def _copy_pool() -> Any:
    import concurrent.futures
    return concurrent.futures.ThreadPoolExecutor(_copy_threads(), thread_name_prefix="copy_cast")


def to_numpy(value: Any) -> np.ndarray:
    """A numpy view/copy of an array-like (torch tensors included, bfloat16 via float32)."""
    if type(value).__module__.startswith("torch"):
        import torch
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(value)


# ============================================================== HF directory I/O
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_DTYPE_NAMES = {"float16": "float16", "fp16": "float16", "half": "float16",
                "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float32": "float32", "fp32": "float32", "float": "float32"}


def canonical_dtype(dtype: Any) -> str:
    """``"float16"``, ``"bfloat16"`` or ``"float32"`` from a name (fp16, bf16 …) or numpy dtype."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    try:
        return _DTYPE_NAMES[name.lower()]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use float16, bfloat16 or float32") from None


def numpy_dtype(dtype: Any) -> np.dtype:
    import ml_dtypes
    name = canonical_dtype(dtype)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def find_weight_files(path: str | os.PathLike) -> tuple[str, list[str]]:
    """(format "safetensors"|"bin", absolute weight files) of an HF directory; checks shards exist."""
    path = os.fspath(path)
    for index_name, single, fmt in ((SAFE_INDEX, SAFE_WEIGHTS, "safetensors"),
                                    (BIN_INDEX, BIN_WEIGHTS, "bin")):
        index_path = os.path.join(path, index_name)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"cannot read shard index {index_path}: {e!r}") from None
            missing = [name for name in files if not os.path.isfile(os.path.join(path, name))]
            if missing:
                raise CheckpointError(f"{index_path} names shard(s) that do not exist: "
                                      f"{', '.join(missing)}")
            return fmt, [os.path.join(path, name) for name in files]
        if os.path.isfile(os.path.join(path, single)):
            return fmt, [os.path.join(path, single)]
    raise CheckpointError(f"{path} holds no HF weights ({SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} "
                          f"or {BIN_INDEX})")


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like an HF model directory (config.json plus weights)."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.exists(os.path.join(path, n)) for n in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX))


def _read_safetensors(file: str, assembler: ParamAssembler, step: Callable[[], None]) -> None:
    """Stream one safetensors file into ``assembler``; shapes are checked before data is read.

    ``safe_open`` validates the header and lists the tensors; each tensor's bytes are then read
    with one positioned read into a private buffer (not through a memory map, so the file's
    pages never count towards the process's resident memory).
    """
    from safetensors import safe_open
    try:
        handle = safe_open(file, framework="numpy")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise CheckpointError(f"cannot read {file}: {e}") from None
    data_start, entries = _safetensors_header(file)
    with handle as f, open(file, "rb") as raw:
        for key in f.keys():
            if not assembler.wants(key):
                continue
            info = f.get_slice(key)
            assembler.check_shape(key, info.get_shape())
            st_dtype = info.get_dtype()
            if st_dtype not in _ST_DTYPES:
                raise CheckpointError(f"{file}: tensor {key} has dtype {st_dtype}, expected a float type")
            begin, end = entries[key]["data_offsets"]
            dtype = _ST_DTYPES[st_dtype]()
            count = (end - begin) // dtype.itemsize
            raw.seek(data_start + begin)
            array = np.fromfile(raw, dtype=dtype, count=count)
            if array.size != count:
                raise CheckpointError(f"{file} is truncated (tensor {key})")
            assembler.add(key, array.reshape(info.get_shape()))
            del array
            step()


def _bf16() -> np.dtype:
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


_ST_DTYPES: dict[str, Callable[[], np.dtype]] = {
    "F16": lambda: np.dtype("<f2"), "BF16": _bf16, "F32": lambda: np.dtype("<f4"),
    "F64": lambda: np.dtype("<f8")}


def _safetensors_header(file: str) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, header entries) of a safetensors file."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 8 + n, json.loads(fh.read(n))


def _read_torch_bin(file: str, assembler: ParamAssembler, step: Callable[[], None]) -> None:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading {file} needs PyTorch (pip install torch, or convert the "
                              "weights to safetensors)") from None
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file} does not hold a state dict")
    for key in list(state):
        value = state.pop(key)
        if not assembler.wants(key):
            continue
        assembler.check_shape(key, tuple(value.shape))
        if not value.is_floating_point():
            raise CheckpointError(f"{file}: tensor {key} has dtype {value.dtype}, expected a float type")
        assembler.add(key, to_numpy(value))
        step()


def read_hf_dir(path: str | os.PathLike, *, progress: bool = False) -> tuple[ModelConfig, dict[str, Any]]:
    """Read an HF GPT-NeoX directory -> (ModelConfig, params of float32 ``np.ndarray``).

    Accepts model.safetensors, sharded safetensors with model.safetensors.index.json,
    pytorch_model.bin (+ index); fp16 / bf16 / fp32 tensors. Streams tensor by tensor: peak
    memory is one float32 model plus one tensor (safetensors) or one shard (.bin).
    Every ``config.json`` key is checked first (``ConfigError`` naming an unsupported setting,
    before any tensor is read; see ``config.HF_FIELDS``).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    hf_config = read_hf_config_json(path)
    layout = hf_weight_layout(hf_config)
    config = ModelConfig.from_hf_dict(hf_config)
    fmt, files = find_weight_files(path)
    assembler = ParamAssembler(config, source=path, layout=layout)
    total = len(assembler.missing())
    with _progress(progress, total, f"reading {os.path.basename(path.rstrip('/')) or path}") as bar:
        for file in files:
            assembler.source = file
            reader = _read_safetensors if fmt == "safetensors" else _read_torch_bin
            reader(file, assembler, bar)
    assembler.source = path
    return config, assembler.finish()


def plan_shards(config: ModelConfig, dtype: Any, shard_size: int | str) -> list[list[str]]:
    """Group HF keys (in order) into shards of at most ``shard_size`` bytes (a bigger tensor alone)."""
    from pythia_jax.io_utils import parse_size
    limit = parse_size(shard_size)
    itemsize = numpy_dtype(dtype).itemsize
    shards: list[list[str]] = [[]]
    used = 0
    for key, shape in hf_shapes(config).items():
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


def _check_params(config: ModelConfig, params: Mapping[str, Any]) -> None:
    """``config.check_param_shapes`` (kept under this name for the GPT-NeoX writer)."""
    check_param_shapes(config, params)


def write_hf_dir(config: ModelConfig, params: Mapping[str, Any], out_dir: str | os.PathLike, *,
                 dtype: Any = "float16", shard_size: int | str = "2GB", overwrite: bool = False,
                 progress: bool = False) -> str:
    """Write ``params`` as an HF ``GPTNeoXForCausalLM`` directory, atomically; return its path.

    Files: config.json, model.safetensors (or model-0000k-of-0000N.safetensors +
    model.safetensors.index.json when over ``shard_size``), generation_config.json and the
    GPT-NeoX-20B tokenizer files. Streams: besides ``params`` it holds one converted tensor.
    """
    from pythia_jax.io_utils import atomic_output_dir, check_output_dir

    name = canonical_dtype(dtype)
    np_dtype = numpy_dtype(name)
    check_output_dir(out_dir, overwrite)
    tensors = iter_hf_tensors(config, params, np_dtype)  # checks the shapes now, before any output
    shards = plan_shards(config, name, shard_size)
    n = len(shards)
    files = [SAFE_WEIGHTS] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    # the next tensor is converted on a thread while the current one is written (+1 tensor of memory)
    tensors = io_utils.prefetch(tensors)
    weight_map: dict[str, str] = {}
    total_size = 0
    with atomic_output_dir(out_dir, overwrite) as tmp, \
            _progress(progress, sum(map(len, shards)), f"writing {os.path.basename(os.fspath(out_dir))}") as bar:
        shapes = hf_shapes(config)
        for keys, file in zip(shards, files):
            total_size += write_safetensors(tmp / file, [(k, shapes[k]) for k in keys], np_dtype,
                                            tensors, metadata={"format": "pt"}, on_tensor=bar)
            weight_map.update({k: file for k in keys})
        if n > 1:
            _write_json(tmp / SAFE_INDEX, {"metadata": {"total_size": total_size},
                                           "weight_map": dict(sorted(weight_map.items()))})
        hf_config = config.to_hf_dict()
        hf_config["torch_dtype"] = name
        hf_config["dtype"] = name
        _write_json(tmp / "config.json", hf_config)
        _write_json(tmp / "generation_config.json",
                    {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 0})
        write_tokenizer_files(tmp, config.max_position_embeddings)
    return os.fspath(os.path.abspath(out_dir))


_ST_CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def write_safetensors(path: str | os.PathLike, entries: list[tuple[str, tuple[int, ...]]], dtype: np.dtype,
                      tensors: Iterator[tuple[str, np.ndarray]], metadata: Mapping[str, str] | None = None,
                      on_tensor: Callable[[], None] | None = None) -> int:
    """Write a safetensors file tensor by tensor; return the bytes of tensor data.

    ``entries`` (key, shape) fix the header up front (the format puts all offsets first), then
    ``tensors`` yields the arrays in that order, each written and dropped before the next is
    made, so a shard never has to sit in memory (``safetensors.numpy.save_file`` needs the whole
    dict). Same layout as the library writes: little-endian u64 header size, JSON header padded
    with spaces to 8 bytes, ``__metadata__``, contiguous ``data_offsets``.
    """
    dtype = np.dtype(dtype)
    code = _ST_CODES[canonical_dtype(dtype)]
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, shape in entries:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, shape in entries:
            got, value = next(tensors)
            if got != key or value.shape != tuple(shape) or value.dtype != dtype:
                raise AssertionError(f"tensor stream out of order: {got} {value.shape} for {key} {shape}")
            value = np.ascontiguousarray(value)
            if value.dtype.byteorder == ">":
                value = value.byteswap()
            f.write(value.view(np.uint8).data)
            del value
            if on_tensor is not None:
                on_tensor()
    return offset


def write_tokenizer_files(directory: str | os.PathLike, model_max_length: int = 2048) -> None:
    """tokenizer.json (GPT-NeoX-20B BPE), tokenizer_config.json, special_tokens_map.json."""
    import shutil
    directory = os.fspath(directory)
    shutil.copyfile(TOKENIZER_FILE, os.path.join(directory, "tokenizer.json"))
    eot = "<|endoftext|>"
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "GPTNeoXTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    })
    _write_json(os.path.join(directory, "special_tokens_map.json"),
                {"bos_token": eot, "eos_token": eot, "unk_token": eot})


def _write_json(path: str | os.PathLike, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


class _progress:
    """A tqdm bar (or a no-op) used as ``with _progress(on, total, desc) as step: step()``."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, unit="tensor")

    def __enter__(self) -> Callable[[], None]:
        return self._step

    def _step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()


def to_device_tree(params: Mapping[str, Any]) -> dict[str, Any]:
    """Move a params tree of numpy arrays to JAX arrays leaf by leaf, releasing each numpy leaf
    as it goes, so the peak is one model plus one leaf (not two models).

    ``jax.device_put(..., may_alias=True)`` lets the CPU backend adopt the numpy buffer instead
    of copying it. (Sharing through ``jnp.from_dlpack`` hung the interpreter at exit in testing.)
    """
    import jax

    out: dict[str, Any] = {}
    for key in list(params):
        value = params[key]
        if isinstance(value, Mapping):
            out[key] = to_device_tree(value)
        else:
            # wait for the (asynchronous) transfer so a copied numpy buffer is released before
            # the next leaf is transferred
            out[key] = jax.device_put(value, may_alias=True).block_until_ready()
        if isinstance(params, dict):
            del params[key]  # drop our reference to the numpy leaf
        del value
    return out
