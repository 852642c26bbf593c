"""Original GPT-NeoX (DeepSpeed) checkpoints <-> this project's params (PYTHIA_FACTS §4).

Reading (``read_neox_checkpoint``) accepts a ``global_stepN/`` folder (or its parent, with a
``latest`` file or several ``global_step*`` folders) in either DeepSpeed form:

* pipeline: ``layer_{idx:02d}-model_{tp:02d}-model_states.pt``, one flat tensor dict per layer
  index and tensor-parallel rank (idx 0 embedding, 2…L+1 transformer layers, L+3 final norm,
  L+4 output head);
* sequential: ``mp_rank_{tp:02d}_model_states.pt`` whose ``module`` dict holds
  ``sequential.{idx}.<key>`` tensors.

Layer roles are recognised from the tensors themselves (not only from the index arithmetic),
MLP keys in both conventions (``mlp.dense_h_to_4h`` / ``mlp.linear1`` …). Tensor-parallel ranks
are merged like GPT-NeoX's ``tools/ckpts/convert_neox_to_hf.py``: concatenate on dim 0 (embedding,
QKV, h→4h, head) or dim 1 (attention.dense / 4h→h weights), average LayerNorms, and SUM the
row-parallel biases when the model uses the parallel (GPT-J) residual — each rank adds its own
copy before the all-reduce there. With a sequential residual the bias is added once after the
all-reduce, so rank 0's copy is taken (the NeoX converter sums there too, which is wrong).
The arithmetic runs in the checkpoint's dtype with the converter's operations, so the result is
bit-identical to what that converter would produce.

The model config comes from the ``configs/*.yml`` files saved with the checkpoint (JSON-like
YAML, keys with dashes or underscores) plus the tensor shapes (vocabulary, MLP width).

ZeRO stage 1/2 optimizer shards (``zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt``) are read
by ``read_neox_optimizer_state``: per TP rank the flat fp32 partitions of every data-parallel
rank are laid end to end and cut by the ``param_shapes`` recorded in
``mp_rank_{tp}_model_states.pt`` (the same protocol as DeepSpeed's ``zero_to_fp32.py``); Adam's
``exp_avg`` / ``exp_avg_sq`` are cut the same way. Writing (``write_neox_checkpoint``) produces the
pipeline form at TP 1 plus a yml that GPT-NeoX's HF converter reads.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pickle
import re
import types
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pythia_jax.config import (EXACT_GELU_NAMES, INIT_METHODS, TOKENIZER_VOCAB_SIZE, ConfigError,
                               ModelConfig)
from pythia_jax.convert import hf as hf_convert, neox_yml_keys
from pythia_jax.data.tokenizer import TOKENIZER_FILE
from pythia_jax.errors import CheckpointError

PIPE_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
STEP_DIR = re.compile(r"^global_step(\d+)$")
_SEQ_KEY = re.compile(r"^(?:module\.)?(?:sequential\.)?(\d+)\.(.+)$")

# Merge rules across tensor-parallel ranks.
CAT0, CAT1, ROW_BIAS, NORM, REPLICATED = "cat0", "cat1", "row_bias", "norm", "replicated"

# NeoX layer key -> (HF layer suffix, merge rule), per key convention.
_COMMON_LAYER_KEYS = {
    "input_layernorm.weight": ("input_layernorm.weight", NORM),
    "input_layernorm.bias": ("input_layernorm.bias", NORM),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", NORM),
    "post_attention_layernorm.bias": ("post_attention_layernorm.bias", NORM),
    "attention.query_key_value.weight": ("attention.query_key_value.weight", CAT0),
    "attention.query_key_value.bias": ("attention.query_key_value.bias", CAT0),
    "attention.dense.weight": ("attention.dense.weight", CAT1),
    "attention.dense.bias": ("attention.dense.bias", ROW_BIAS),
}
KEY_CONVENTIONS: dict[str, dict[str, tuple[str, str]]] = {
    # GPT-NeoX v1.x (Pythia)
    "v1": {**_COMMON_LAYER_KEYS,
           "mlp.dense_h_to_4h.weight": ("mlp.dense_h_to_4h.weight", CAT0),
           "mlp.dense_h_to_4h.bias": ("mlp.dense_h_to_4h.bias", CAT0),
           "mlp.dense_4h_to_h.weight": ("mlp.dense_4h_to_h.weight", CAT1),
           "mlp.dense_4h_to_h.bias": ("mlp.dense_4h_to_h.bias", ROW_BIAS)},
    # GPT-NeoX 2.x renamed the MLP linears
    "v2": {**_COMMON_LAYER_KEYS,
           "mlp.linear1.weight": ("mlp.dense_h_to_4h.weight", CAT0),
           "mlp.linear1.bias": ("mlp.dense_h_to_4h.bias", CAT0),
           "mlp.linear2.weight": ("mlp.dense_4h_to_h.weight", CAT1),
           "mlp.linear2.bias": ("mlp.dense_4h_to_h.bias", ROW_BIAS)},
}
_IGNORED_LAYER_KEYS = ("attention.rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")
EMBED_KEYS = {"word_embeddings.weight": ("gpt_neox.embed_in.weight", CAT0)}
FINAL_NORM_KEYS = {"norm.weight": ("gpt_neox.final_layer_norm.weight", NORM),
                   "norm.bias": ("gpt_neox.final_layer_norm.bias", NORM)}
HEAD_KEYS = {"final_linear.weight": ("embed_out.weight", CAT0)}


# =========================================================================== torch loading
class _Stub:
    """Stands in for classes of packages that are not installed (deepspeed, megatron) when
    unpickling engine / optimizer states; keeps constructor args and pickled state."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __call__(self, *args: Any, **kwargs: Any) -> "_Stub":  # stubbed functions
        return _Stub(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<stub {type(self).__module__}.{type(self).__name__} {self._args!r}>"


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {"__module__": module})


_tolerant_pickle = types.SimpleNamespace(
    Unpickler=_TolerantUnpickler,
    load=lambda f, **kw: _TolerantUnpickler(f, **kw).load(),
    __name__="pythia_jax_tolerant_pickle")


def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading or writing GPT-NeoX checkpoints needs PyTorch "
                              "(pip install torch)") from None
    return torch


def torch_load(file: str, *, tensors_only: bool = False) -> Any:
    """``torch.load`` on CPU, memory-mapped when possible; DeepSpeed objects become stubs.

    ``tensors_only``: try the safe ``weights_only`` loader first (layer files are plain dicts).
    """
    torch = _torch()
    attempts: list[dict[str, Any]] = []
    if tensors_only:
        attempts += [dict(weights_only=True, mmap=True), dict(weights_only=True)]
    attempts += [dict(weights_only=False, mmap=True, pickle_module=_tolerant_pickle),
                 dict(weights_only=False, pickle_module=_tolerant_pickle)]
    error: Exception | None = None
    for kwargs in attempts:
        try:
            return torch.load(file, map_location="cpu", **kwargs)
        except FileNotFoundError:
            raise CheckpointError(f"{file} does not exist") from None
        except Exception as e:  # noqa: BLE001 - torch raises many types for unreadable files
            error = e
    raise CheckpointError(f"cannot read {file}: {error}")


# =========================================================================== yml config
def read_neox_yml(files: Sequence[str]) -> dict[str, Any]:
    """Merge GPT-NeoX yml files (later files override) into one dict with dashed keys."""
    import yaml

    merged: dict[str, Any] = {}
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read GPT-NeoX config {file}: {e}") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"GPT-NeoX config {file} does not hold a mapping")
        merged.update({str(k).replace("_", "-"): v for k, v in data.items()})
    return merged


def yml_get(yml: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """Value of ``key`` with dashes or underscores (keys in ``yml`` are dashed by ``read_neox_yml``)."""
    dashed = key.replace("_", "-")
    return yml[dashed] if dashed in yml else yml.get(key.replace("-", "_"), default)


def _as_float(value: Any, what: str) -> float:
    try:
        return float(value)  # PyYAML reads "1e-5" (no dot) as a string
    except (TypeError, ValueError):
        raise ConfigError(f"GPT-NeoX config: {what} = {value!r} is not a number") from None


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def config_from_yml(yml: Mapping[str, Any], *, vocab_size: int, intermediate_size: int,
                    name: str = "custom", hidden_act: str | None = None) -> ModelConfig:
    """ModelConfig from a merged NeoX yml plus the shapes only the tensors know."""
    missing = [k for k in ("num-layers", "hidden-size", "num-attention-heads") if yml_get(yml, k) is None]
    if missing:
        raise ConfigError(f"GPT-NeoX config lacks {', '.join(missing)}")
    pos_emb = yml_get(yml, "pos-emb", "rotary")
    if pos_emb != "rotary":
        raise ConfigError(f"GPT-NeoX config has pos-emb {pos_emb!r}; only rotary models map to GPT-NeoX/HF")
    if _as_bool(yml_get(yml, "gpt-j-tied", False)):
        raise ConfigError("gpt-j-tied (one shared LayerNorm per block) has no HF GPT-NeoX equivalent")
    norm = yml_get(yml, "norm", "layernorm")
    if norm != "layernorm":
        raise ConfigError(f"GPT-NeoX config has norm {norm!r}; only layernorm is supported")
    activation = yml_get(yml, "activation", "gelu")
    if activation != "gelu":
        raise ConfigError(f"GPT-NeoX config has activation {activation!r}; only gelu is supported")
    if hidden_act is None:
        # bias-gelu-fusion and openai-gelu run the tanh approximation (what Pythia trained with).
        tanh = _as_bool(yml_get(yml, "bias-gelu-fusion", False)) or _as_bool(yml_get(yml, "openai-gelu", False))
        hidden_act = "gelu_new" if tanh else "gelu"
    fields: dict[str, Any] = dict(
        name=name,
        vocab_size=int(vocab_size),
        hidden_size=int(yml_get(yml, "hidden-size")),
        num_layers=int(yml_get(yml, "num-layers")),
        num_heads=int(yml_get(yml, "num-attention-heads")),
        intermediate_size=int(intermediate_size),
        rotary_pct=_as_float(yml_get(yml, "rotary-pct", 1.0), "rotary-pct"),
        rotary_emb_base=_as_float(yml_get(yml, "rotary-emb-base", 10000), "rotary-emb-base"),
        max_position_embeddings=int(yml_get(yml, "max-position-embeddings",
                                            yml_get(yml, "seq-length", 2048))),
        use_parallel_residual=_as_bool(yml_get(yml, "gpt-j-residual", False)),
        hidden_act=hidden_act,
        layer_norm_eps=_as_float(yml_get(yml, "layernorm-epsilon", 1e-5), "layernorm-epsilon"),
    )
    init = yml_get(yml, "init-method")
    out_init = yml_get(yml, "output-layer-init-method")
    if init in INIT_METHODS:
        fields["init_method"] = init
    if out_init in INIT_METHODS:
        fields["output_init_method"] = out_init
    return ModelConfig(**fields)


# =========================================================================== layout discovery
@dataclasses.dataclass
class NeoxCheckpoint:
    """A located GPT-NeoX checkpoint folder (what ``locate_neox_checkpoint`` found)."""

    directory: str                 # the global_stepN folder
    layout: str                    # "pipeline" or "sequential"
    tp: int                        # tensor-parallel size
    yml: dict[str, Any]
    yml_files: list[str]
    step: int | None               # N of global_stepN (or the saved iteration)
    pipe_files: dict[int, dict[int, str]]   # idx -> tp -> file (pipeline form)
    mp_files: dict[int, str]                # tp -> mp_rank file
    optim_files: dict[int, dict[int, str]]  # tp -> dp -> file

    @property
    def name(self) -> str:
        if self.yml_files:
            return os.path.splitext(os.path.basename(self.yml_files[0]))[0]
        return "custom"


def is_neox_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a global_stepN folder or a folder holding global_step* folders."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    if any(PIPE_FILE.match(n) or MP_FILE.match(n) for n in names):
        return True
    return any(STEP_DIR.match(n) and os.path.isdir(os.path.join(path, n)) for n in names)


def _resolve_step_dir(path: str, step: int | None) -> str:
    names = os.listdir(path)
    if any(PIPE_FILE.match(n) or MP_FILE.match(n) for n in names):
        if step is not None:
            m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
            if m and int(m.group(1)) != step:
                raise CheckpointError(f"{path} is step {m.group(1)}, not the requested step {step}")
        return path
    steps = {int(m.group(1)): n for n in names if (m := STEP_DIR.match(n))
             and os.path.isdir(os.path.join(path, n))}
    if not steps:
        raise CheckpointError(
            f"{path} has no recognisable GPT-NeoX layout: expected layer_XX-model_YY-model_states.pt "
            "or mp_rank_XX_model_states.pt files, or global_stepN folders")
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{path} has no global_step{step} (steps: {sorted(steps)})")
        return os.path.join(path, steps[step])
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        if tag and os.path.isdir(os.path.join(path, tag)):
            return os.path.join(path, tag)
    return os.path.join(path, steps[max(steps)])


def _find_yml(step_dir: str, config_files: Sequence[str] | None) -> list[str]:
    if config_files:
        for f in config_files:
            if not os.path.isfile(f):
                raise ConfigError(f"GPT-NeoX config {f} does not exist")
        return list(config_files)
    for folder in (os.path.join(step_dir, "configs"), os.path.join(os.path.dirname(step_dir), "configs")):
        files = sorted(glob.glob(os.path.join(folder, "*.yml")) + glob.glob(os.path.join(folder, "*.yaml")))
        if files:
            return files
    return []


def locate_neox_checkpoint(path: str | os.PathLike, step: int | None = None,
                           config_files: Sequence[str] | None = None) -> NeoxCheckpoint:
    """Find the step folder, its files, its tensor-parallel size and its yml config.

    Raises ``CheckpointError`` for an unrecognisable folder or mixed tensor-parallel sizes.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    step_dir = _resolve_step_dir(path, step)
    names = sorted(os.listdir(step_dir))
    pipe: dict[int, dict[int, str]] = {}
    mp: dict[int, str] = {}
    optim: dict[int, dict[int, str]] = {}
    for n in names:
        full = os.path.join(step_dir, n)
        if m := PIPE_FILE.match(n):
            pipe.setdefault(int(m.group(1)), {})[int(m.group(2))] = full
        elif m := MP_FILE.match(n):
            mp[int(m.group(1))] = full
        elif m := OPTIM_FILE.match(n):
            optim.setdefault(int(m.group(2)), {})[int(m.group(1))] = full
    if pipe:
        layout = "pipeline"
        rank_sets = {idx: sorted(ranks) for idx, ranks in pipe.items()}
        sizes = {len(r) for r in rank_sets.values()}
        if len(sizes) > 1:
            detail = ", ".join(f"layer_{idx:02d}: {len(r)}" for idx, r in sorted(rank_sets.items()))
            raise CheckpointError(f"{step_dir}: mixed tensor-parallel sizes across layer files ({detail})")
        tp = sizes.pop()
        for idx, ranks in rank_sets.items():
            if ranks != list(range(tp)):
                raise CheckpointError(f"{step_dir}: layer_{idx:02d} has model ranks {ranks}, "
                                      f"expected 0…{tp - 1}")
    elif mp:
        layout = "sequential"
        tp = len(mp)
        if sorted(mp) != list(range(tp)):
            raise CheckpointError(f"{step_dir}: mp_rank files {sorted(mp)} are not 0…{tp - 1}")
    else:
        raise CheckpointError(
            f"{step_dir} has no recognisable GPT-NeoX layout: expected layer_XX-model_YY-model_states.pt "
            "or mp_rank_XX_model_states.pt files")
    yml_files = _find_yml(step_dir, config_files)
    yml = read_neox_yml(yml_files) if yml_files else {}
    if not yml:
        raise ConfigError(f"no GPT-NeoX yml config found in {step_dir}/configs or next to it; "
                          "pass the training yml (config_files=… / --neox-config)")
    neox_yml_keys.check_neox_yml(yml)  # every model key honoured or refused, before any tensor
    yml_tp = yml_get(yml, "model-parallel-size")
    if yml_tp is not None and int(yml_tp) != tp:
        raise CheckpointError(f"{step_dir}: mixed tensor-parallel sizes: the yml says "
                              f"model-parallel-size {yml_tp} but the files hold {tp} rank(s)")
    if optim:
        if sorted(optim) != list(range(tp)):
            raise CheckpointError(f"{step_dir}: optimizer shards exist for model ranks {sorted(optim)}, "
                                  f"expected 0…{tp - 1} (mixed tensor-parallel sizes)")
        dps = {len(d) for d in optim.values()}
        if len(dps) > 1:
            raise CheckpointError(f"{step_dir}: model ranks have different numbers of ZeRO shards {sorted(dps)}")
        for t, d in optim.items():
            if sorted(d) != list(range(len(d))):
                raise CheckpointError(f"{step_dir}: ZeRO shards of model rank {t} are "
                                      f"zero_pp_rank {sorted(d)}, expected 0…{len(d) - 1}")
    m = STEP_DIR.match(os.path.basename(os.path.normpath(step_dir)))
    return NeoxCheckpoint(directory=step_dir, layout=layout, tp=tp, yml=yml, yml_files=yml_files,
                          step=int(m.group(1)) if m else None, pipe_files=pipe, mp_files=mp,
                          optim_files=optim)


# =========================================================================== reading weights
class _LayerSource:
    """Per layer index, the tensor dicts of every TP rank (loaded lazily, memory-mapped)."""

    def __init__(self, ckpt: NeoxCheckpoint):
        self.ckpt = ckpt
        self._seq: list[dict[int, dict[str, Any]]] | None = None
        if ckpt.layout == "sequential":
            self._seq = []
            for t in range(ckpt.tp):
                file = ckpt.mp_files[t]
                state = torch_load(file)
                module = state.get("module") if isinstance(state, Mapping) else None
                if not isinstance(module, Mapping) or not module:
                    raise CheckpointError(f"{file} has no 'module' state dict (a pipeline checkpoint "
                                          "whose layer_XX files are missing?)")
                per_idx: dict[int, dict[str, Any]] = {}
                for key, value in module.items():
                    m = _SEQ_KEY.match(key)
                    if not m:
                        raise CheckpointError(f"{file}: unexpected module key {key!r} "
                                              "(expected sequential.<idx>.<name>)")
                    per_idx.setdefault(int(m.group(1)), {})[m.group(2)] = value
                self._seq.append(per_idx)
            idx_sets = {tuple(sorted(s)) for s in self._seq}
            if len(idx_sets) > 1:
                raise CheckpointError(f"{ckpt.directory}: mp_rank files hold different layers")

    def indices(self) -> list[int]:
        if self._seq is not None:
            return sorted(self._seq[0])
        return sorted(self.ckpt.pipe_files)

    def where(self, idx: int) -> str:
        if self._seq is not None:
            return f"{self.ckpt.mp_files[0]} (sequential.{idx})"
        return self.ckpt.pipe_files[idx][0]

    def load(self, idx: int) -> list[Mapping[str, Any]]:
        if self._seq is not None:
            return [s.get(idx, {}) for s in self._seq]
        ranks = []
        for t in range(self.ckpt.tp):
            file = self.ckpt.pipe_files[idx][t]
            state = torch_load(file, tensors_only=True)
            if not isinstance(state, Mapping):
                raise CheckpointError(f"{file} does not hold a tensor dict")
            ranks.append(state)
        key_sets = {tuple(sorted(r)) for r in ranks}
        if len(key_sets) > 1:
            raise CheckpointError(f"{self.where(idx)}: tensor-parallel ranks hold different tensors")
        return ranks


@dataclasses.dataclass
class _Roles:
    embed: int
    layers: list[int]       # layer indices in order (layer i = layers[i])
    final_norm: int
    head: int
    convention: str

    def table(self, idx: int) -> tuple[dict[str, tuple[str, str]], str]:
        """(NeoX key -> (HF key, rule), description) for one layer index."""
        if idx == self.embed:
            return EMBED_KEYS, "embedding"
        if idx == self.final_norm:
            return FINAL_NORM_KEYS, "final norm"
        if idx == self.head:
            return HEAD_KEYS, "output head"
        i = self.layers.index(idx)
        return ({k: (f"gpt_neox.layers.{i}.{hf}", rule) for k, (hf, rule) in
                 KEY_CONVENTIONS[self.convention].items()}, f"transformer layer {i}")


def _detect_roles(source: _LayerSource, num_layers: int) -> _Roles:
    embed = final_norm = head = None
    layers: list[int] = []
    convention = None
    for idx in source.indices():
        keys = set(source.load(idx)[0]) if source.ckpt.layout == "sequential" else None
        if keys is None:
            keys = set(torch_load(source.ckpt.pipe_files[idx][0], tensors_only=True))
        if "word_embeddings.weight" in keys:
            if "position_embeddings.weight" in keys:
                raise CheckpointError(f"{source.where(idx)}: learned position embeddings are not "
                                      "a GPT-NeoX/HF rotary model")
            embed = idx
        elif "attention.query_key_value.weight" in keys:
            layers.append(idx)
            found = [name for name, table in KEY_CONVENTIONS.items()
                     if any(k.startswith("mlp.") and k in keys for k in table)]
            if len(found) != 1:
                raise CheckpointError(f"{source.where(idx)}: cannot tell the MLP key convention "
                                      f"from its tensors {sorted(keys)}")
            if convention not in (None, found[0]):
                raise CheckpointError(f"{source.ckpt.directory}: layers mix key conventions")
            convention = found[0]
        elif "final_linear.weight" in keys:
            head = idx
        elif "norm.weight" in keys:
            final_norm = idx
        elif keys - {"attention.rotary_emb.inv_freq"}:
            raise CheckpointError(f"{source.where(idx)}: unrecognised tensors {sorted(keys)[:6]}")
    where = source.ckpt.directory
    if embed is None:
        raise CheckpointError(f"{where}: no word_embeddings.weight (layer 0) found")
    if head is None:
        raise CheckpointError(f"{where}: no final_linear.weight found (weight-tied models are not "
                              "supported: GPT-NeoX/Pythia use an untied head)")
    if final_norm is None:
        raise CheckpointError(f"{where}: no final norm (norm.weight) found")
    if len(layers) != num_layers:
        raise CheckpointError(f"{where}: found {len(layers)} transformer layers, the config says "
                              f"num-layers {num_layers}")
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise CheckpointError(f"{where}: transformer layer indices {layers} are not contiguous")
    return _Roles(embed, layers, final_norm, head, convention or "v1")


def merge_tp(tensors: Sequence[Any], rule: str, parallel_residual: bool = True) -> Any:
    """Merge one tensor's TP shards (torch tensors) the way GPT-NeoX's HF converter does."""
    torch = _torch()
    if len(tensors) == 1:
        return tensors[0]
    if rule == CAT0:
        return torch.cat(list(tensors), dim=0)
    if rule == CAT1:
        return torch.cat(list(tensors), dim=1)
    if rule == NORM:
        return sum(tensors) / len(tensors)
    if rule == ROW_BIAS:
        return sum(tensors) if parallel_residual else tensors[0]
    if rule == REPLICATED:
        return tensors[0]
    raise ValueError(f"unknown merge rule {rule}")


def _merge_layer(ranks: Sequence[Mapping[str, Any]], table: Mapping[str, tuple[str, str]],
                 where: str, parallel_residual: bool, rule_override: Mapping[str, str] | None = None
                 ) -> Iterable[tuple[str, Any]]:
    keys = set(ranks[0])
    unknown = keys - set(table) - set(_IGNORED_LAYER_KEYS)
    if unknown:
        raise CheckpointError(f"{where}: unexpected tensors {sorted(unknown)}")
    for neox_key, (hf_key, rule) in table.items():
        if neox_key not in keys:
            raise CheckpointError(f"{where}: missing tensor {neox_key}")
        rule = (rule_override or {}).get(rule, rule)
        try:
            merged = merge_tp([r[neox_key] for r in ranks], rule, parallel_residual)
        except RuntimeError as e:
            raise CheckpointError(f"{where}: cannot merge tensor-parallel shards of {neox_key}: {e}") from None
        yield hf_key, merged


def _infer_shapes(source: _LayerSource, roles: _Roles) -> tuple[int, int]:
    """(vocab size, MLP width) of the merged model, from the TP shards' shapes."""
    embed = source.load(roles.embed)
    vocab = sum(int(r["word_embeddings.weight"].shape[0]) for r in embed)
    layer = source.load(roles.layers[0])
    key = "mlp.dense_h_to_4h.weight" if roles.convention == "v1" else "mlp.linear1.weight"
    ff = sum(int(r[key].shape[0]) for r in layer)
    return vocab, ff


def read_neox_checkpoint(path: str | os.PathLike, *, step: int | None = None,
                         config_files: Sequence[str] | None = None, hidden_act: str | None = None,
                         progress: bool = False) -> tuple[ModelConfig, dict[str, Any], NeoxCheckpoint]:
    """Read a GPT-NeoX checkpoint -> (ModelConfig, params of float32 ``np.ndarray``, located info).

    The params are the module weights (the fp16/bf16 copy DeepSpeed saves); see
    ``read_neox_optimizer_state`` for the fp32 master weights of ZeRO checkpoints.
    ``hidden_act`` overrides the GELU flavour read from the yml (``bias-gelu-fusion`` -> tanh).
    """
    ckpt = locate_neox_checkpoint(path, step, config_files)
    source = _LayerSource(ckpt)
    num_layers = int(yml_get(ckpt.yml, "num-layers", 0) or 0)
    roles = _detect_roles(source, num_layers)
    vocab, ff = _infer_shapes(source, roles)
    config = config_from_yml(ckpt.yml, vocab_size=vocab, intermediate_size=ff, name=ckpt.name,
                             hidden_act=hidden_act)
    assembler = hf_convert.ParamAssembler(config, source=ckpt.directory)
    order = [roles.embed] + roles.layers + [roles.final_norm, roles.head]
    with hf_convert._progress(progress, len(order), f"reading {os.path.basename(ckpt.directory)}") as bar:
        for idx in order:
            table, what = roles.table(idx)
            where = f"{source.where(idx)} ({what})"
            assembler.source = where
            for hf_key, tensor in _merge_layer(source.load(idx), table, where, config.use_parallel_residual):
                assembler.add(hf_key, hf_convert.to_numpy(tensor))
            bar()
    assembler.source = ckpt.directory
    return config, assembler.finish(), ckpt


# =========================================================================== ZeRO optimizer states
@dataclasses.dataclass
class NeoxOptimizerState:
    """fp32 master weights and Adam moments of a ZeRO checkpoint, as params trees (float32)."""

    master: dict[str, Any]
    exp_avg: dict[str, Any]
    exp_avg_sq: dict[str, Any]
    step: int                      # Adam updates applied (bias-correction count)
    iteration: int | None          # training iteration of the checkpoint (batches consumed)
    scheduler_steps: int | None    # LR scheduler steps (num_iters), when saved
    hyperparams: dict[str, Any]    # lr / betas / eps / weight_decay of the param groups when saved


def _value(x: Any) -> Any:
    """Plain Python value of an int/float, 0-d tensor or a stubbed enum."""
    if isinstance(x, _Stub):
        return _value(x._args[0]) if x._args else None
    if hasattr(x, "item") and getattr(x, "numel", lambda: 1)() == 1:
        return x.item()
    return x


class _FlatGroup:
    """One param group's flat vector laid out across data-parallel partitions, read by slices."""

    def __init__(self, parts: Sequence[Any], what: str):
        self.parts = list(parts)
        self.what = what
        self.bounds = np.cumsum([0] + [int(p.numel()) for p in self.parts])

    @property
    def numel(self) -> int:
        return int(self.bounds[-1])

    def slice(self, start: int, length: int) -> Any:
        torch = _torch()
        end = start + length
        if end > self.numel:
            raise CheckpointError(f"{self.what}: flat partitions hold {self.numel} values, "
                                  f"the recorded parameter shapes need at least {end}")
        pieces = []
        for k, part in enumerate(self.parts):
            lo, hi = int(self.bounds[k]), int(self.bounds[k + 1])
            a, b = max(start, lo), min(end, hi)
            if a < b:
                pieces.append(part.reshape(-1)[a - lo:b - lo])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _zero_groups(files: Sequence[str]) -> tuple[list[_FlatGroup], list[_FlatGroup], list[_FlatGroup],
                                                  int | None, dict[str, Any]]:
    """Load one TP rank's ZeRO shards -> (fp32, exp_avg, exp_avg_sq) flat groups, step, hyperparams."""
    shards = []
    for file in files:
        state = torch_load(file)
        osd = state.get("optimizer_state_dict") if isinstance(state, Mapping) else None
        if not isinstance(osd, Mapping):
            raise CheckpointError(f"{file} has no optimizer_state_dict (not a DeepSpeed ZeRO shard)")
        if "local_sub_partitions_of_fp32_groups" in osd:
            raise CheckpointError(f"{file} is a legacy ZeRO stage-1 shard (DeepSpeed < 0.3.17), "
                                  "which is not supported")
        if "single_partition_of_fp32_groups" not in osd:
            raise CheckpointError(f"{file}: no single_partition_of_fp32_groups "
                                  f"(keys: {sorted(map(str, osd))[:10]}); only ZeRO stage 1/2 shards are supported")
        stage = _value(osd.get("zero_stage", 1))
        if stage not in (1, 2, None):
            raise CheckpointError(f"{file}: ZeRO stage {stage} is not supported (stage 1 or 2 only)")
        shards.append((file, osd))
    count = _value(shards[0][1].get("partition_count"))
    if isinstance(count, (list, tuple)):
        count = max(_value(c) for c in count)
    if count is not None and int(count) != len(files):
        raise CheckpointError(f"{os.path.dirname(files[0])}: ZeRO partition_count is {count} but "
                              f"{len(files)} optimizer shard(s) were found for this model rank")
    n_groups = len(shards[0][1]["single_partition_of_fp32_groups"])
    fp32: list[list[Any]] = [[] for _ in range(n_groups)]
    avg: list[list[Any]] = [[] for _ in range(n_groups)]
    avg_sq: list[list[Any]] = [[] for _ in range(n_groups)]
    step: int | None = None
    hyper: dict[str, Any] = {}
    for file, osd in shards:
        groups = osd["single_partition_of_fp32_groups"]
        if len(groups) != n_groups:
            raise CheckpointError(f"{file}: {len(groups)} param groups, expected {n_groups}")
        base = osd.get("base_optimizer_state")
        paddings = [int(_value(p)) for p in (osd.get("group_paddings") or [0] * n_groups)]
        if isinstance(base, Mapping):  # a torch optimizer state_dict: states keep their padding
            states = [base["state"][g] if g in base["state"] else base["state"][str(g)] for g in range(n_groups)]
            param_groups = base.get("param_groups") or []
            for g, group in enumerate(param_groups):
                if "step" in group and step is None:
                    step = int(_value(group["step"]))
                hyper.setdefault(g, {k: _value(v) for k, v in group.items() if k != "params"})
        elif isinstance(base, (list, tuple)):  # elastic form: padding already removed
            states = list(base)
            paddings = [0] * n_groups
        else:
            raise CheckpointError(f"{file}: unrecognised base_optimizer_state {type(base).__name__}")
        if "base_optimizer_state_step" in osd and step is None:
            step = int(_value(osd["base_optimizer_state_step"]))
        for g in range(n_groups):
            fp32[g].append(groups[g])
            st = states[g]
            for key, dest in (("exp_avg", avg), ("exp_avg_sq", avg_sq)):
                if key not in st:
                    raise CheckpointError(f"{file}: param group {g} has no {key} (not an Adam state)")
                t = st[key].reshape(-1)
                dest[g].append(t[: t.numel() - paddings[g]])
            if "step" in st and step is None:
                step = int(_value(st["step"]))
    where = os.path.dirname(files[0])
    return ([_FlatGroup(p, f"{where} fp32 group {g}") for g, p in enumerate(fp32)],
            [_FlatGroup(p, f"{where} exp_avg group {g}") for g, p in enumerate(avg)],
            [_FlatGroup(p, f"{where} exp_avg_sq group {g}") for g, p in enumerate(avg_sq)],
            step, {str(k): v for k, v in hyper.items()})


def _cut_groups(groups: Sequence[_FlatGroup], param_shapes: Sequence[Mapping[str, Any]],
                where: str) -> dict[tuple[int, str], Any]:
    """Cut flat groups by the recorded (name -> shape) lists -> {(layer idx, key): tensor}."""
    if len(param_shapes) != len(groups):
        raise CheckpointError(f"{where}: param_shapes has {len(param_shapes)} groups, the optimizer "
                              f"shards {len(groups)}")
    out: dict[tuple[int, str], Any] = {}
    for shapes, flat in zip(param_shapes, groups):
        offset = 0
        for name, shape in shapes.items():
            m = _SEQ_KEY.match(name)
            if not m:
                raise CheckpointError(f"{where}: cannot map parameter name {name!r} to a layer")
            shape = tuple(int(d) for d in shape)
            n = int(np.prod(shape)) if shape else 1
            out[(int(m.group(1)), m.group(2))] = flat.slice(offset, n).reshape(shape)
            offset += n
        # DeepSpeed aligns each flat group to 2·dp elements; anything beyond that is an error.
        if flat.numel - offset > 2 * max(1, len(flat.parts)):
            raise CheckpointError(f"{where}: optimizer group holds {flat.numel} values but its "
                                  f"parameters only {offset}")
    return out


def read_neox_optimizer_state(ckpt: NeoxCheckpoint, config: ModelConfig, *,
                              progress: bool = False) -> NeoxOptimizerState | None:
    """fp32 master weights + Adam moments of a ZeRO stage 1/2 checkpoint (None without shards).

    Row-parallel biases of a TP>1 parallel-residual model: the master weight is the sum of the
    ranks' copies (as for the weights); the moments are rank 0's (every rank sees the same
    gradient, so their moments are equal). Each copy moved one Adam step per step, so the sum
    moved TP: continue with ``row_parallel_bias_copies=TP`` (``optimizer_settings`` returns it;
    ``neox_train_state`` records it in the metadata) and the continuation is exact.
    """
    if not ckpt.optim_files:
        return None
    _torch()  # fails early with a clear message when torch is missing
    source = _LayerSource(ckpt)
    roles = _detect_roles(source, config.num_layers)
    per_rank: list[tuple[dict, dict, dict]] = []
    step: int | None = None
    iteration = sched = None
    hyper: dict[str, Any] = {}
    for t in range(ckpt.tp):
        mp_file = ckpt.mp_files.get(t)
        if mp_file is None:
            raise CheckpointError(f"{ckpt.directory}: mp_rank_{t:02d}_model_states.pt is missing "
                                  "(it records the parameter order of the ZeRO shards)")
        engine = torch_load(mp_file)
        param_shapes = engine.get("param_shapes") if isinstance(engine, Mapping) else None
        if not param_shapes:
            raise CheckpointError(f"{mp_file} has no param_shapes; cannot unflatten the ZeRO shards")
        if isinstance(param_shapes, Mapping):
            param_shapes = [param_shapes]
        if t == 0:
            iteration = engine.get("iteration", engine.get("global_steps"))
            iteration = None if iteration is None else int(_value(iteration))
            lr_state = engine.get("lr_scheduler")
            if isinstance(lr_state, Mapping) and "num_iters" in lr_state:
                sched = int(_value(lr_state["num_iters"]))
        files = [ckpt.optim_files[t][d] for d in sorted(ckpt.optim_files[t])]
        fp32, avg, avg_sq, rank_step, rank_hyper = _zero_groups(files)
        step = rank_step if step is None else step
        hyper = hyper or rank_hyper
        where = f"{ckpt.directory} (model rank {t})"
        per_rank.append((_cut_groups(fp32, param_shapes, where), _cut_groups(avg, param_shapes, where),
                         _cut_groups(avg_sq, param_shapes, where)))
    if step is None:
        step = sched if sched is not None else iteration
        if step is None:
            raise CheckpointError(f"{ckpt.directory}: the optimizer shards record no step count")
        warnings.warn(f"{ckpt.directory}: Adam step count not stored; using {step}", stacklevel=2)
    trees = []
    for which in range(3):
        assembler = hf_convert.ParamAssembler(config, source=f"{ckpt.directory} ZeRO shards")
        override = {ROW_BIAS: REPLICATED} if which > 0 else None
        for idx in [roles.embed] + roles.layers + [roles.final_norm, roles.head]:
            table, what = roles.table(idx)
            ranks = [{key: tensors[which][(i, key)] for (i, key) in tensors[which] if i == idx}
                     for tensors in per_rank]
            where = f"{ckpt.directory} ZeRO shards, layer index {idx} ({what})"
            for hf_key, tensor in _merge_layer(ranks, table, where, config.use_parallel_residual, override):
                assembler.add(hf_key, hf_convert.to_numpy(tensor.float()))
        trees.append(assembler.finish())
    return NeoxOptimizerState(master=trees[0], exp_avg=trees[1], exp_avg_sq=trees[2], step=int(step),
                              iteration=iteration, scheduler_steps=sched, hyperparams=hyper)


def optimizer_settings(yml: Mapping[str, Any], tp: int = 1) -> dict[str, Any]:
    """``build_optimizer`` keyword arguments from a NeoX yml (lr, min lr, warmup, decay steps …)
    and the run's tensor-parallel size ``tp`` (row-parallel bias copies with the parallel residual)."""
    opt = yml_get(yml, "optimizer", {}) or {}
    params = opt.get("params", {}) if isinstance(opt, Mapping) else {}
    out: dict[str, Any] = {}
    if "lr" in params:
        out["max_lr"] = _as_float(params["lr"], "optimizer.params.lr")
    if "betas" in params:
        out["b1"], out["b2"] = (_as_float(b, "optimizer.params.betas") for b in params["betas"])
    if "eps" in params:
        out["eps"] = _as_float(params["eps"], "optimizer.params.eps")
    if yml_get(yml, "min-lr") is not None:
        out["min_lr"] = _as_float(yml_get(yml, "min-lr"), "min-lr")
    if yml_get(yml, "weight-decay") is not None:
        out["weight_decay"] = _as_float(yml_get(yml, "weight-decay"), "weight-decay")
    if yml_get(yml, "gradient-clipping") is not None:
        out["clip_norm"] = _as_float(yml_get(yml, "gradient-clipping"), "gradient-clipping")
    total = yml_get(yml, "lr-decay-iters", yml_get(yml, "train-iters"))
    if total is not None:
        out["total_steps"] = int(total)
        warmup = yml_get(yml, "warmup")
        if warmup is not None:
            out["warmup_steps"] = int(_as_float(warmup, "warmup") * int(total))
    parallel_residual = _as_bool(yml_get(yml, "gpt-j-residual", False))
    out["row_parallel_bias_copies"] = int(tp) if parallel_residual else 1
    return out


# =========================================================================== writing (TP 1)
def iter_neox_layers(config: ModelConfig, params: Mapping[str, Any], dtype: Any
                     ) -> Iterable[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(pipeline layer index, {NeoX key: np.ndarray})`` one layer at a time (TP 1, v1 names).

    Built from ``iter_hf_tensors`` (HF order groups tensors by layer), so only one layer's
    tensors exist at a time besides ``params``.
    """
    L = config.num_layers
    hf_to_neox = {hf: neox for neox, (hf, _) in KEY_CONVENTIONS["v1"].items()}
    rd = config.rotary_ndims
    inv_freq = 1.0 / (config.rotary_emb_base ** (np.arange(0, rd, 2, dtype=np.float32) / rd))
    current, group = None, {}
    for key, value in hf_convert.iter_hf_tensors(config, params, dtype):
        if key == "gpt_neox.embed_in.weight":
            idx, name = 0, "word_embeddings.weight"
        elif key == "embed_out.weight":
            idx, name = L + 4, "final_linear.weight"
        elif key.startswith("gpt_neox.final_layer_norm."):
            idx, name = L + 3, "norm." + key.rsplit(".", 1)[1]
        else:
            _, _, i, suffix = key.split(".", 3)
            idx, name = int(i) + 2, hf_to_neox[suffix]
        if idx != current and group:
            yield current, group
            group = {}
        current = idx
        if not group and 2 <= idx < L + 2:
            group["attention.rotary_emb.inv_freq"] = inv_freq.astype(dtype)
        group[name] = value
    if group:
        yield current, group


def neox_yml(config: ModelConfig, vocab_file: str | None = None, **extra: Any) -> dict[str, Any]:
    """A GPT-NeoX yml (dashed keys) describing ``config`` at TP 1 / pipeline form."""
    V = config.vocab_size
    divisible = 128
    if -(-TOKENIZER_VOCAB_SIZE // divisible) * divisible != V:
        # NeoX pads the tokenizer's 50,277 ids up to a multiple of this; V itself does it when V ≥ 50,277.
        divisible = V if V >= TOKENIZER_VOCAB_SIZE else 128
    yml: dict[str, Any] = {
        "pipe-parallel-size": 1,
        "model-parallel-size": 1,
        "num-layers": config.num_layers,
        "hidden-size": config.hidden_size,
        "num-attention-heads": config.num_heads,
        "seq-length": config.max_position_embeddings,
        "max-position-embeddings": config.max_position_embeddings,
        "pos-emb": "rotary",
        "rotary-pct": config.rotary_pct,
        "rotary-emb-base": config.rotary_emb_base,
        "no-weight-tying": True,
        "gpt-j-residual": config.use_parallel_residual,
        "output-layer-parallelism": "column",
        "norm": "layernorm",
        "layernorm-epsilon": config.layer_norm_eps,
        "activation": "gelu",
        "bias-gelu-fusion": config.hidden_act not in EXACT_GELU_NAMES,
        "init_method": config.init_method,
        "output_layer_init_method": config.output_init_method,
        "make-vocab-size-divisible-by": divisible,
        "tokenizer-type": "HFTokenizer",
    }
    if config.intermediate_size != 4 * config.hidden_size:
        yml["intermediate-size"] = config.intermediate_size
    if vocab_file:
        yml["vocab-file"] = vocab_file
    yml.update(extra)
    return yml


def _yml_value(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            # YAML 1.1 (PyYAML) reads "1e-05" as a string; "1.0e-05" is a float
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    return json.dumps(value)


def yml_text(yml: Mapping[str, Any]) -> str:
    """A GPT-NeoX style yml (JSON-like mapping) that PyYAML reads back with the same types."""
    lines = ["# GPT-NeoX config written by pythia-jax (jax-to-neox)", "{"]
    lines += [f'  "{key}": {_yml_value(value)},' for key, value in yml.items()]
    return "\n".join(lines + ["}", ""])


def write_neox_checkpoint(config: ModelConfig, params: Mapping[str, Any], out_dir: str | os.PathLike, *,
                          step: int = 0, dtype: Any = "float32", overwrite: bool = False,
                          progress: bool = False, yml_extra: Mapping[str, Any] | None = None) -> str:
    """Write a TP-1 GPT-NeoX pipeline checkpoint, atomically; return the step folder.

    Layout: ``out_dir/latest`` ("global_stepN"), ``out_dir/20B_tokenizer.json`` and
    ``out_dir/global_stepN/`` with ``layer_XX-model_00-model_states.pt`` (XX = 0, 2…L+1, L+3, L+4),
    a minimal ``mp_rank_00_model_states.pt`` (iteration, no optimizer) and ``configs/<name>.yml``.
    """
    torch = _torch()
    from pythia_jax.io_utils import atomic_output_dir, check_output_dir

    name = hf_convert.canonical_dtype(dtype)
    np_dtype = np.float32 if name == "bfloat16" else np.dtype(name)  # bf16 via torch below
    check_output_dir(out_dir, overwrite)
    hf_convert._check_params(config, params)
    final_root = os.path.abspath(os.fspath(out_dir))
    tag = f"global_step{int(step)}"
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    with atomic_output_dir(out_dir, overwrite) as tmp:
        step_dir = tmp / tag
        (step_dir / "configs").mkdir(parents=True)
        with hf_convert._progress(progress, config.num_layers + 3, f"writing {tag}") as bar:
            for idx, layer in iter_neox_layers(config, params, np_dtype):
                tensors = {k: torch.from_numpy(v).to(torch_dtype) for k, v in layer.items()}
                del layer
                torch.save(tensors, step_dir / f"layer_{idx:02d}-model_00-model_states.pt")
                del tensors
                bar()
        torch.save({"module": None, "buffer_names": [], "optimizer": None, "param_shapes": None,
                    "lr_scheduler": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
                    "global_steps": int(step), "global_samples": None, "dp_world_size": 1,
                    "mp_world_size": 1, "iteration": int(step)},
                   step_dir / "mp_rank_00_model_states.pt")
        import shutil
        shutil.copyfile(TOKENIZER_FILE, tmp / "20B_tokenizer.json")
        yml = neox_yml(config, vocab_file=os.path.join(final_root, "20B_tokenizer.json"),
                       **dict(yml_extra or {}))
        yml_name = re.sub(r"[^A-Za-z0-9._-]", "_", config.name or "model") + ".yml"
        with open(step_dir / "configs" / yml_name, "w", encoding="utf-8") as f:
            f.write(yml_text(yml))
        (tmp / "latest").write_text(tag)
    return os.path.join(final_root, tag)


# =========================================================================== train state for continuation
def fresh_opt_state(params: Mapping[str, Any], optimizer_kwargs: Mapping[str, Any] | None = None,
                    schedule_count: int = 0):
    """A zero-moment optimizer state of the Pythia chain, LR schedule at ``schedule_count``.

    Adam's bias-correction count stays 0 (fresh moments), only the schedule is advanced, so
    training resumed at step N runs with the learning rate of step N.
    """
    import jax

    from pythia_jax.train.optimizer import build_optimizer, state_with_moments

    # numpy zeros (pages untouched until written): no device copy of the params
    zeros = lambda: jax.tree.map(lambda a: np.zeros(np.shape(a), np.float32), dict(params))  # noqa: E731
    return state_with_moments(build_optimizer(**dict(optimizer_kwargs or {})), zeros(), zeros(), 0,
                              schedule_count=schedule_count)


def neox_train_state(ckpt: NeoxCheckpoint, config: ModelConfig,
                     optimizer_kwargs: Mapping[str, Any] | None = None, *, progress: bool = False
                     ) -> tuple[dict[str, Any], Any, int, dict[str, Any]]:
    """(params = fp32 master weights, opt_state with the imported Adam moments, step, metadata).

    ``optimizer_kwargs`` go to ``build_optimizer``; the yml's values fill what is not given. The
    state's Adam count and LR-schedule count are the Adam steps DeepSpeed applied; ``step`` is
    the training iteration (batches consumed, skipped fp16 steps included).
    """
    from pythia_jax.train.optimizer import build_optimizer, state_with_moments

    state = read_neox_optimizer_state(ckpt, config, progress=progress)
    if state is None:
        raise CheckpointError(f"{ckpt.directory} has no ZeRO optimizer shards "
                              "(zero_pp_rank_*_mp_rank_*_optim_states.pt)")
    kwargs = {**optimizer_settings(ckpt.yml, ckpt.tp), **dict(optimizer_kwargs or {})}
    # numpy throughout: master weights + two moments, the state's own 3x the model, no copies
    params = state.master
    opt_state = state_with_moments(build_optimizer(**kwargs), state.exp_avg, state.exp_avg_sq, state.step)
    step = state.iteration if state.iteration is not None else (ckpt.step or state.step)
    if state.scheduler_steps is not None and state.scheduler_steps != state.step:
        warnings.warn(f"{ckpt.directory}: LR scheduler steps ({state.scheduler_steps}) differ from Adam "
                      f"steps ({state.step}); both continue from {state.step}", stacklevel=2)
    metadata = {"source": "gpt-neox", "neox_checkpoint": ckpt.directory, "adam_steps": state.step,
                "iteration": step, "optimizer": {k: v for k, v in kwargs.items()},
                "saved_param_groups": state.hyperparams}
    return params, opt_state, int(step), metadata
