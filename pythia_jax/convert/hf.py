"""Hugging Face ``GPTNeoXForCausalLM`` weights <-> this project's parameter tree.

Which HF tensor fills which params slot is the table in ``pythia_jax.convert.hf_keys`` (shapes:
``pythia_jax.config.param_shapes``); here ``ParamAssembler`` fills a params tree from HF tensors
and ``iter_hf_tensors`` streams them back out, and the directory I/O reads and writes the files
``transformers``' ``from_pretrained`` / ``save_pretrained`` use (``model.safetensors``, sharded
safetensors with ``model.safetensors.index.json``, ``pytorch_model.bin`` (+ index); ``config.json``,
tokenizer).

Checkpoints saved with ``attention_bias=false`` (no QKV / attention-output biases) read those
biases as zeros, and with ``tie_word_embeddings=true`` read the embeddings as transformers'
``tie_weights`` does: a missing head is a copy of ``embed_in`` (a missing ``embed_in`` a copy of
the head), and a head stored beside ``embed_in`` with different values is kept (transformers
then does not tie them either): the same outputs in the always-untied, biased layout of this
project (``config.HFWeightLayout``).

Directory I/O (``read_hf_dir`` / ``write_hf_dir``) streams tensor by tensor: reading holds one
model (float32, or each tensor as stored with ``dtype="auto"``) plus one tensor of the file
being read; writing holds the params plus one shard.
The key-table and host-memory names (``LAYER_TABLE``, ``param_shapes``, ``copy_cast``,
``to_device_tree`` …) are importable from here too.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from pythia_jax import io_utils
from pythia_jax.config import HFWeightLayout, ModelConfig, hf_weight_layout, read_hf_config_json
from pythia_jax.convert.dtypes import SlotArrays, canonical_dtype, check_cast, numpy_dtype, torch_to_numpy  # noqa: F401

# Defined here before the split; still importable from this module.
from pythia_jax.convert.hf_keys import (  # noqa: F401
    GLOBAL_KEY,
    GLOBAL_TABLE,
    IGNORED_SUFFIXES,
    KEY_ALIASES,
    LAYER_KEY,
    LAYER_SUFFIX,
    LAYER_TABLE,
    Path,
    check_params,
    get_path,
    hf_shapes,
    is_ignored_key,
    param_shapes,
    set_path,
)
from pythia_jax.convert.progress import TensorProgress
from pythia_jax.data.tokenizer import TOKENIZER_FILE
from pythia_jax.errors import CheckpointError
from pythia_jax.host_memory import (
    aligned_empty,  # noqa: F401
    copy_cast,
    plain_pages,
    to_device_tree,  # noqa: F401
    to_numpy,  # noqa: F401
)

logger = logging.getLogger(__name__)


# HF keys that a checkpoint without attention biases lacks (read as zeros)
_ATTENTION_BIAS_SUFFIXES = ("attention.query_key_value.bias", "attention.dense.bias")
_HEAD_KEY = "embed_out.weight"
_EMBED_KEY = "gpt_neox.embed_in.weight"


class ParamAssembler:
    """Fills a params tree one HF tensor at a time (for streaming readers).

    ``add(key, array)`` checks the shape, casts to ``dtype`` and writes the tensor into its slot
    (transposed for Linear weights, at index ``i`` of the layer stack); ``finish()`` checks that
    every tensor arrived and returns the nested dict of ``np.ndarray``.
    ``dtype``: float32 (default), bfloat16 or float16 for every array, or ``"auto"``: each array
    in the dtype its tensors are stored in (lossless; float64 is read as float32; a layer stack
    whose layers differ takes the wider dtype), see ``convert.dtypes``.
    ``layout`` (from ``config.hf_weight_layout``): without attention biases those tensors are
    zeros (stored ones are skipped, as transformers does, logged). With tied embeddings either
    of ``embed_in`` / ``embed_out`` may be stored: a missing one is a copy of the other; when
    both are stored they are kept as they are, which ties them when they are equal and, when
    they differ, keeps the untied model transformers loads too (with a warning), see
    ``transformers.PreTrainedModel.tie_weights``.
    """

    def __init__(self, config: ModelConfig, source: str = "checkpoint",
                 layout: HFWeightLayout = HFWeightLayout(), dtype: Any = "float32"):
        self.config = config
        self.source = source
        self.layout = layout
        self._shapes = param_shapes(config)
        # aligned (to_device_tree then adopts the arrays on CPU, no copy); made at the first tensor
        self._slots = SlotArrays(self._shapes, dtype)
        self._expected = {k: s for k, s in hf_shapes(config).items() if not self._absent(k)}
        self._seen: set[str] = set()
        self._skipped: list[str] = []

    def _absent(self, key: str) -> bool:
        """True for a tensor the checkpoint's layout does not have (filled in by ``finish``)."""
        return not self.layout.attention_bias and key.endswith(_ATTENTION_BIAS_SUFFIXES)

    def _optional(self, key: str) -> bool:
        """True for a tensor that ``finish`` may make from another: with tied embeddings the head
        when ``embed_in`` may still come, ``embed_in`` when the head came (transformers ties
        whichever one is stored to the other)."""
        if not self.layout.tie_word_embeddings:
            return False
        if key == _HEAD_KEY:
            return True
        return key == _EMBED_KEY and _HEAD_KEY in self._seen

    def slot(self, key: str) -> tuple[Path, int | None, bool] | None:
        """(params path, layer index or None, transpose) of an HF key; None for ignored buffers."""
        key = KEY_ALIASES.get(key, key)
        if self._absent(key):
            self._skipped.append(key)  # transformers does not use it either
            return None
        if key in GLOBAL_KEY:
            path, t = GLOBAL_KEY[key]
            return path, None, t
        m = LAYER_KEY.match(key)
        if m and m.group(2) in LAYER_SUFFIX:
            layer = int(m.group(1))
            if layer >= self.config.num_layers:
                raise CheckpointError(
                    f"{self.source}: tensor {key} belongs to layer {layer}, but the config has "
                    f"{self.config.num_layers} layers")
            path, t = LAYER_SUFFIX[m.group(2)]
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
        array = np.asarray(array)
        target = self._slots.get(path, array.dtype)
        target = target if layer is None else target[layer]
        copy_cast(target, array, transpose)
        check_cast(target, array, f"{self.source}: tensor {key} ({array.dtype.name})",
                   "convert with dtype 'auto' (each tensor as stored) or 'float32' (--dtype)")
        canonical = KEY_ALIASES.get(key, key)
        if canonical in self._seen:
            raise CheckpointError(f"{self.source}: tensor {key} appears twice")
        self._seen.add(canonical)

    def missing(self) -> list[str]:
        """The tensors still to come (not counting one that tied embeddings can make)."""
        return [k for k in self._expected if k not in self._seen and not self._optional(k)]

    def finish(self) -> dict[str, Any]:
        missing = self.missing()
        if missing:
            shown = ", ".join(missing[:5]) + (f" … ({len(missing)} in all)" if len(missing) > 5 else "")
            raise CheckpointError(f"{self.source}: missing tensors: {shown}")
        if self._skipped:
            logger.warning("%s: %d tensor(s) the config says are unused were skipped, as transformers "
                           "does (e.g. %s)", self.source, len(self._skipped), self._skipped[0])
        slots = self._slots
        if not self.layout.attention_bias:
            for name in ("query_key_value", "dense"):  # zeros in the dtype of the layer's weights
                weights = slots.get(("layers", "attention", name, "kernel"), None)
                slots.get(("layers", "attention", name, "bias"), weights.dtype)[...] = 0
        if self.layout.tie_word_embeddings:
            self._tie_embeddings()
        tree: dict[str, Any] = {}
        for path in self._shapes:
            set_path(tree, path, slots.pop(path))
        return tree

    def _tie_embeddings(self) -> None:
        """``tie_word_embeddings: true``: fill the embedding that is not stored from the one that is.

        Both stored: each keeps its own values, as transformers' ``tie_weights`` does when it
        loads such a directory (equal tensors are tied, i.e. the same values; different ones
        are left untied, with a warning); this project's params are always untied.
        """
        embed_path, head_path = ("embed_in", "embedding"), ("embed_out", "kernel")
        if _HEAD_KEY not in self._seen:
            embed = self._slots.get(embed_path, None)
            copy_cast(self._slots.get(head_path, embed.dtype), embed, transpose=True)
        elif _EMBED_KEY not in self._seen:
            head = self._slots.get(head_path, None)
            copy_cast(self._slots.get(embed_path, head.dtype), head, transpose=True)
        elif not np.array_equal(self._slots.get(embed_path, None), self._slots.get(head_path, None).T):
            logger.warning("%s: config.json says tie_word_embeddings=true, but %s and %s are both stored "
                           "with different values: both are kept (an untied model, as transformers loads "
                           "it; its config is written with tie_word_embeddings=false)",
                           self.source, _EMBED_KEY, _HEAD_KEY)


def hf_state_dict_to_params(config: ModelConfig, state_dict: Mapping[str, Any],
                            source: str = "state dict",
                            layout: HFWeightLayout = HFWeightLayout(),
                            dtype: Any = "float32") -> dict[str, Any]:
    """HF state dict (arrays or torch tensors, any float dtype) -> params tree of ``np.ndarray``.

    ``dtype``: float32 (default), bfloat16, float16, or ``"auto"`` (each tensor's own dtype; see
    ``ParamAssembler``). ``layout``: ``config.hf_weight_layout(config_json)`` for checkpoints
    without attention biases or with tied embeddings. Raises ``CheckpointError`` for a missing
    tensor, a wrong shape or an unknown key.
    """
    assembler = ParamAssembler(config, source, layout, dtype)
    for key, value in state_dict.items():
        if assembler.wants(key):
            assembler.add(key, torch_to_numpy(value))
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
    check_params(config, params)
    return _hf_tensors(config, params, np.dtype(dtype))


def _hf_tensors(config: ModelConfig, params: Mapping[str, Any], dtype: np.dtype
                ) -> Iterator[tuple[str, np.ndarray]]:
    expected = hf_shapes(config)

    def host_tensor(path: Path, layer: int | None) -> np.ndarray:
        value = get_path(params, path)
        if isinstance(value, np.ndarray):
            return value if layer is None else value[layer]
        if hasattr(value, "addressable_shards"):  # a jax.Array: fetch a fresh device slice
            import jax.numpy as jnp
            return np.asarray(jnp.array(value, copy=True) if layer is None else value[layer])
        value = np.asarray(value)
        return value if layer is None else value[layer]

    for key in expected:
        if key in GLOBAL_KEY:
            path, transpose = GLOBAL_KEY[key]
            value = host_tensor(path, None)
        else:
            m = LAYER_KEY.match(key)
            assert m is not None
            path, transpose = LAYER_SUFFIX[m.group(2)]
            value = host_tensor(("layers",) + path, int(m.group(1)))
        with plain_pages():
            out = np.empty(expected[key], dtype)
        copy_cast(out, value, transpose)
        check_cast(out, value, f"tensor {key} ({value.dtype.name} in the checkpoint)",
                   "write a wider dtype (--dtype bfloat16 or float32)")
        del value
        yield key, out


def params_to_hf_state_dict(config: ModelConfig, params: Mapping[str, Any],
                            dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Params tree -> HF state dict of ``np.ndarray`` (torch layout, ``dtype``, default float32)."""
    return dict(iter_hf_tensors(config, params, dtype))



# ============================================================== HF directory I/O
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


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
        assembler.add(key, torch_to_numpy(value))
        step()


def read_hf_dir(path: str | os.PathLike, *, progress: bool = False,
                dtype: Any = "float32") -> tuple[ModelConfig, dict[str, Any]]:
    """Read an HF GPT-NeoX directory -> (ModelConfig, params of ``np.ndarray``).

    Accepts model.safetensors, sharded safetensors with model.safetensors.index.json,
    pytorch_model.bin (+ index); fp16 / bf16 / fp32 tensors. ``dtype``: the params' dtype,
    float32 (default), bfloat16, float16, or ``"auto"``: each tensor as stored, no cast (what
    ``pythia-jax convert hf-to-jax`` writes by default). Streams tensor by tensor: peak
    memory is one model in ``dtype`` plus one tensor (safetensors) or one shard (.bin).
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
    assembler = ParamAssembler(config, source=path, layout=layout, dtype=dtype)
    total = len(assembler.missing())
    if layout.tie_word_embeddings and _HEAD_KEY in _listed_keys(fmt, files):
        total += 1  # a head stored beside embed_in is read too
    with TensorProgress(progress, total, f"reading {os.path.basename(path.rstrip('/')) or path}") as bar:
        for file in files:
            assembler.source = file
            reader = _read_safetensors if fmt == "safetensors" else _read_torch_bin
            reader(file, assembler, bar)
    assembler.source = path
    return config, assembler.finish()


def _listed_keys(fmt: str, files: list[str]) -> set[str]:
    """The canonical keys the weight files list without reading tensors (empty for a single
    ``pytorch_model.bin``, whose keys are known only once it is loaded; for progress totals)."""
    keys: set[str] = set()
    for file in files:
        if fmt != "safetensors":
            return keys
        try:
            keys.update(k for k in _safetensors_header(file)[1] if k != "__metadata__")
        except (OSError, ValueError):
            return keys  # the reader reports it
    return {KEY_ALIASES.get(k, k) for k in keys}


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


# ``config.check_param_shapes`` under its old name here (``hf_keys.check_params``).
_check_params = check_params


def write_hf_dir(config: ModelConfig, params: Mapping[str, Any], out_dir: str | os.PathLike, *,
                 dtype: Any = "float16", shard_size: int | str = "2GB", overwrite: bool = False,
                 progress: bool = False, source: Mapping[str, Any] | None = None) -> str:
    """Write ``params`` as an HF ``GPTNeoXForCausalLM`` directory, atomically; return its path.

    Files: config.json, model.safetensors (or model-0000k-of-0000N.safetensors +
    model.safetensors.index.json when over ``shard_size``), generation_config.json and the
    GPT-NeoX-20B tokenizer files. Streams: besides ``params`` it holds one converted tensor.
    An existing ``out_dir`` is refused unless ``overwrite``, which replaces only an HF directory
    (``io_utils.check_output_dir``; a run folder or any other folder raises ``PythiaJaxError``).
    ``source``: a JSON record of what the weights were exported from, kept in ``config.json`` as
    ``pythia_jax_export`` (transformers keeps unknown keys; readers ignore it).
    """
    from pythia_jax.io_utils import atomic_output_dir, check_output_dir

    name = canonical_dtype(dtype)
    np_dtype = numpy_dtype(name)
    check_output_dir(out_dir, overwrite, kind="hf")
    tensors = iter_hf_tensors(config, params, np_dtype)  # checks the shapes now, before any output
    shards = plan_shards(config, name, shard_size)
    n = len(shards)
    files = [SAFE_WEIGHTS] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    # the next tensor is converted on a thread while the current one is written (+1 tensor of memory)
    tensors = io_utils.prefetch(tensors)
    weight_map: dict[str, str] = {}
    total_size = 0
    with atomic_output_dir(out_dir, overwrite, kind="hf") as tmp, \
            TensorProgress(progress, sum(map(len, shards)), f"writing {os.path.basename(os.fspath(out_dir))}") as bar:
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
        if source is not None:
            hf_config[EXPORT_KEY] = dict(source)
        _write_json(tmp / "config.json", hf_config)
        _write_json(tmp / "generation_config.json",
                    {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 0})
        write_tokenizer_files(tmp, config.max_position_embeddings)
    return os.fspath(os.path.abspath(out_dir))


EXPORT_KEY = "pythia_jax_export"  # config.json: what an exported folder was written from


def export_source(path: str | os.PathLike) -> dict | None:
    """The ``pythia_jax_export`` record of an HF folder's ``config.json`` (None without one)."""
    try:
        with open(os.path.join(os.fspath(path), "config.json"), encoding="utf-8") as f:
            record = json.load(f).get(EXPORT_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


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
