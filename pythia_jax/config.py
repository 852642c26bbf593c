"""Model configuration: the typed ``ModelConfig``, the Pythia presets and the HF ``config.json`` round trip.

Numbers come from the Pythia paper (Biderman et al. 2023, Table 1 and Appendix E) and the released
HF ``config.json`` files. Nothing here reads gin or the environment; gin binds ``ModelConfig``
fields at the edges (see ``pythia_jax.gin_setup``).

Every field of transformers' ``GPTNeoXConfig`` (and the legacy transformers 4.x names) is either
read, honoured when the weights are read, ignored for a stated reason, or refused with a
``ConfigError`` naming the field and its value: see ``HF_FIELDS`` (in ``pythia_jax.hf_config``,
re-exported here).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import os
import types
import typing
from typing import Any, Mapping, NamedTuple

from pythia_jax.errors import ConfigError, ParamShapeError
from pythia_jax.hf_config import (  # noqa: F401  (re-exported: the HF field table lived here)
    EXACT_GELU_NAMES,
    HF_FIELDS,
    TANH_GELU_NAMES,
    HFWeightLayout,
    _hf_bool,
    _hf_float,
    _hf_int,
    _rope_parameters,
    hf_weight_layout,
    read_hf_config_json,
)

logger = logging.getLogger(__name__)

# Vocabulary of the GPT-NeoX-20B tokenizer (HF ``EleutherAI/gpt-neox-20b``): 50,277 ids,
# <|endoftext|> = 0, <|padding|> = 1.
TOKENIZER_VOCAB_SIZE = 50277
EOD_TOKEN_ID = 0
PAD_TOKEN_ID = 1

INIT_METHODS = ("small_init", "wang_init", "normal", "scaled_normal")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "reference")
DTYPES = ("float32", "bfloat16", "float16")


SEED_RANGE = (0, 2**32 - 1)  # numpy's RandomState (the data order) and the uint32 init key


# ----------------------------------------------------------------- field types of the config classes
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "True or False", str: "a string",
               tuple: "a tuple or list"}


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, tuple[tuple[type, ...], bool]]:
    """``{field: (allowed types, None allowed)}`` of a dataclass, from its annotations; fields
    annotated with anything else (``Any``, a callable …) are left out (not checked)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        want = hints.get(f.name)
        args = typing.get_args(want) if typing.get_origin(want) in (typing.Union, types.UnionType) else (want,)
        optional = type(None) in args
        kinds = tuple(typing.get_origin(a) or a for a in args if a is not type(None))
        if kinds and all(isinstance(k, type) and (k in _TYPE_WORDS or dataclasses.is_dataclass(k))
                         for k in kinds):
            out[f.name] = (kinds, optional)
    return out


def _is_a(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, (tuple, list))
    return isinstance(value, kind)


def check_field_types(obj: Any) -> None:
    """Raise ``ConfigError`` (one line: ``Class.field``, the type it takes, the value) for the first
    field of the dataclass ``obj`` whose value is not of its annotated type, e.g. the gin binding
    ``TrainConfig.num_steps = 'abc'``, before any check compares or computes with it.

    ``int`` takes no bool or float; ``float`` takes an int; ``tuple`` takes a list; ``X | None``
    takes None; a ``str`` field given an ``os.PathLike`` is stored as its string, an ``int`` field
    given a numpy integer as an ``int`` (frozen dataclasses are updated in place). Fields
    annotated otherwise (``Any``) are not checked.
    """
    cls = type(obj)
    for name, (kinds, optional) in _field_types(cls).items():
        value = getattr(obj, name)
        if value is None and optional:
            continue
        if str in kinds and isinstance(value, os.PathLike):
            object.__setattr__(obj, name, os.fspath(value))
            continue
        if int in kinds and _is_a(value, int) and type(value) is not int:  # numpy's: a JSON-able int
            object.__setattr__(obj, name, int(value))
            continue
        if not any(_is_a(value, k) for k in kinds):
            words = " or ".join([_TYPE_WORDS.get(k) or f"a {k.__name__}" for k in kinds]
                                + (["None"] if optional else []))
            raise ConfigError(f"{cls.__name__}.{name} must be {words}, got {value!r}")


def check_seed(owner: str, value: int) -> None:
    """Raise ``ConfigError`` unless ``value`` is an integer in ``SEED_RANGE``."""
    lo, hi = SEED_RANGE
    if not _is_a(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{owner} must be an integer in [{lo}, 2**32 - 1 = {hi}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus numerics of one GPT-NeoX model.

    The first block of fields is the architecture (what ``config.json`` stores); the second is
    how this project runs it (dtypes, rematerialisation, attention kernel), which never changes
    the parameters.
    """

    name: str = "custom"
    vocab_size: int = 50304
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    intermediate_size: int = 0  # 0 means 4 * hidden_size
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    use_parallel_residual: bool = True
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    init_method: str = "small_init"
    output_init_method: str = "wang_init"
    # Numerics / execution (not part of the checkpoint format).
    dtype: str = "float32"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    scan_layers: bool = True
    # > 0: the training/eval loss builds the float32 logits this many positions of each row at a
    # time (``layers.chunked_cross_entropy``) instead of all [B, T, V] at once; 0: all at once
    loss_chunk: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.intermediate_size == 0:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first inconsistent field."""
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                      "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{field} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_ndims % 2:
            raise ConfigError(
                f"rotary dims int(head_dim * rotary_pct) = {self.rotary_ndims} must be even")
        if self.hidden_act not in EXACT_GELU_NAMES + TANH_GELU_NAMES:
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; expected one of "
                              f"{EXACT_GELU_NAMES + TANH_GELU_NAMES}")
        for field in ("init_method", "output_init_method"):
            if getattr(self, field) not in INIT_METHODS:
                raise ConfigError(f"{field} must be one of {INIT_METHODS}, got {getattr(self, field)!r}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ConfigError(f"{field} must be one of {DTYPES}, got {getattr(self, field)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if not isinstance(self.loss_chunk, int) or isinstance(self.loss_chunk, bool) or self.loss_chunk < 0:
            raise ConfigError(f"ModelConfig.loss_chunk must be an integer >= 0 (0 = whole logits, "
                              f"else positions per chunk, e.g. 256), got {self.loss_chunk!r}")

    # ------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def tanh_gelu(self) -> bool:
        """True when the MLP uses the tanh approximation (what GPT-NeoX trained with)."""
        return self.hidden_act in TANH_GELU_NAMES

    def init_std(self, method: str | None = None) -> float:
        """Standard deviation of one of the Pythia init methods (GPT-NeoX v1.0 ``megatron/model/init_functions.py``)."""
        method = method or self.init_method
        H, L = self.hidden_size, self.num_layers
        if method == "small_init":
            return math.sqrt(2.0 / (5.0 * H))
        if method == "wang_init":
            return 2.0 / (L * math.sqrt(H))
        if method == "normal":
            return 0.02
        if method == "scaled_normal":
            return 0.02 / math.sqrt(2.0 * L)
        raise ConfigError(f"unknown init method {method!r}")

    @property
    def input_init_std(self) -> float:
        """σ for embeddings, QKV, MLP-in and the output head."""
        return self.init_std(self.init_method)

    @property
    def output_init_std(self) -> float:
        """σ for attention-out and MLP-out."""
        return self.init_std(self.output_init_method)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count from :func:`param_shapes` (embed_in and embed_out are untied)."""
        return sum(math.prod(shape) for path, shape in param_shapes(self).items()
                   if include_embeddings or path[0] not in ("embed_in", "embed_out"))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """One of the Pythia models by name (``pythia-160m``, ``EleutherAI/pythia-1.4b-deduped``,
        ``pythia-160m-v0``, ``14m``…; spellings as in :func:`parse_preset_name`)."""
        preset = parse_preset_name(name)
        L, H, heads, vocab, init, out_init = _PRESET_SHAPES[preset.base]
        fields = dict(name=preset.name, vocab_size=vocab, hidden_size=H, num_layers=L, num_heads=heads,
                      init_method=init, output_init_method=out_init)
        fields.update(overrides)
        return cls(**fields)

    def matching_preset(self) -> str | None:
        """The base preset (``pythia-160m`` …) whose architecture equals this one, or None."""
        arch = {k: v for k, v in self.to_dict().items() if k not in _NOT_ARCHITECTURE}
        for base in _PRESET_SHAPES:
            other = ModelConfig.preset(base)
            if arch == {k: v for k, v in other.to_dict().items() if k not in _NOT_ARCHITECTURE}:
                return base
        return None

    # ------------------------------------------------------------ HF interop
    def to_hf_dict(self) -> dict[str, Any]:
        """The contents of an HF ``config.json`` for ``GPTNeoXForCausalLM``.

        Written with both the transformers 4.x keys (``rotary_pct``, ``rotary_emb_base``) and the
        5.x ``rope_parameters``, plus ``pythia_jax_name`` (transformers keeps unknown keys), so
        :meth:`from_hf_dict` gives this config back, name included.
        """
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "pythia_jax_name": self.name,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": _int_if_whole(self.rotary_emb_base),
            "rope_parameters": {"rope_type": "default",
                                "rope_theta": _int_if_whole(self.rotary_emb_base),
                                "partial_rotary_factor": self.rotary_pct},
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": 0.02,
            "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.use_parallel_residual,
            "tie_word_embeddings": False,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "use_cache": True,
            "bos_token_id": EOD_TOKEN_ID,
            "eos_token_id": EOD_TOKEN_ID,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from an HF ``config.json`` dict (transformers 4.x keys or 5.x ``rope_parameters``).

        Every key is handled as ``HF_FIELDS`` says; a setting this model cannot run raises
        ``ConfigError`` naming the key and its value (before any weights are read). The name is
        ``pythia_jax_name`` when present, else the last part of ``_name_or_path``, else the
        Pythia preset with the same architecture (``pythia-160m`` …), else ``custom``.
        """
        hf_weight_layout(hf)  # every check, before any field is read
        rope = _rope_parameters(hf)
        fields = dict(
            vocab_size=_hf_int(hf, "vocab_size"),
            hidden_size=_hf_int(hf, "hidden_size"),
            num_layers=_hf_int(hf, "num_hidden_layers"),
            num_heads=_hf_int(hf, "num_attention_heads"),
            intermediate_size=(_hf_int(hf, "intermediate_size") if hf.get("intermediate_size") is not None
                               else 4 * _hf_int(hf, "hidden_size")),
            rotary_pct=rope["partial_rotary_factor"],
            rotary_emb_base=rope["rope_theta"],
            max_position_embeddings=(_hf_int(hf, "max_position_embeddings")
                                     if hf.get("max_position_embeddings") is not None else 2048),
            use_parallel_residual=_hf_bool(hf, "use_parallel_residual", True),
            hidden_act=str(hf.get("hidden_act", "gelu")),
            layer_norm_eps=(_hf_float(hf, "layer_norm_eps") if hf.get("layer_norm_eps") is not None
                            else 1e-5),
        )
        config = cls(**fields)
        name = hf.get("pythia_jax_name") or str(hf.get("_name_or_path") or "").rstrip("/").split("/")[-1]
        base = config.matching_preset()
        try:
            named = parse_preset_name(name).base if name else None
        except ConfigError:
            named = None
        if named is not None and named == base:
            # a Pythia model: the init methods of its preset (config.json does not record them)
            preset = cls.preset(name)
            config = config.replace(name=preset.name, init_method=preset.init_method,
                                    output_init_method=preset.output_init_method)
        elif name:
            config = config.replace(name=str(name))
        elif base is not None:
            preset = cls.preset(base)
            config = config.replace(name=base, init_method=preset.init_method,
                                    output_init_method=preset.output_init_method)
        return config.replace(**overrides) if overrides else config

    @classmethod
    def from_hf_file(cls, path: str | os.PathLike, **overrides: Any) -> "ModelConfig":
        """Read ``config.json`` (a file, or a directory holding one)."""
        return cls.from_hf_dict(read_hf_config_json(path), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


# ================================================================ preset names
class PresetName(NamedTuple):
    """A parsed Pythia model name: ``name`` as the preset calls it, ``base`` the size key."""

    name: str  # e.g. "pythia-1.4b-deduped-v0"
    base: str  # e.g. "pythia-1.4b" (key of the shape, learning-rate and tensor-parallel tables)


def parse_preset_name(name: str) -> PresetName:
    """The one normaliser of Pythia model names, used by ``ModelConfig.preset`` and ``pythia_recipe``.

    Accepts the HF repository id or its last part, any case, with or without ``pythia-``,
    ``-deduped`` and the ``-v0`` suffix of the first release (``EleutherAI/pythia-160m``,
    ``pythia-160m-deduped-v0``, ``160m``). Raises ``ConfigError`` for anything else.
    """
    if not isinstance(name, str):
        raise ConfigError(f"a model name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if "/" in key:
        org, _, key = key.rpartition("/")
        if org != "eleutherai":
            key = ""  # only EleutherAI's repositories are Pythia models
    if key and not key.startswith("pythia-"):
        key = "pythia-" + key
    base = key
    for suffix in ("-v0", "-deduped", "-v0"):  # both orders: pythia-160m-deduped-v0 is the HF spelling
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base not in _PRESET_SHAPES:
        raise ConfigError(f"unknown model name {name!r}; known: {', '.join(preset_names())} "
                          "(optionally with 'EleutherAI/' before and '-v0' after)")
    return PresetName(key, base)


# fields that do not change the architecture (nor the weights), for matching against the presets
_NOT_ARCHITECTURE = ("name", "init_method", "output_init_method", "dtype", "param_dtype", "remat",
                     "attention", "scan_layers")


# ================================================================ parameter shapes
ParamPath = tuple[str, ...]


def param_shapes(config: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Shape of every leaf of the parameter tree, keyed by its path: the one definition.

    The tree is this project's canonical layout (names follow HF's ``GPTNeoXForCausalLM``,
    Linear kernels ``[in, out]``, the L layers stacked on axis 0); the model's modules, the
    converters and the checkpoint reader all check against it (``check_param_shapes``)::

        embed_in/embedding                                     [V, H]
        layers/{input,post_attention}_layernorm/{scale,bias}   [L, H]
        layers/attention/query_key_value/{kernel, bias}        [L, H, 3H], [L, 3H]
        layers/attention/dense/{kernel, bias}                  [L, H, H], [L, H]
        layers/mlp/dense_h_to_4h/{kernel, bias}                [L, H, F], [L, F]
        layers/mlp/dense_4h_to_h/{kernel, bias}                [L, F, H], [L, H]
        final_layer_norm/{scale, bias}                         [H]
        embed_out/kernel                                       [H, V]
    """
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
    shapes: dict[ParamPath, tuple[int, ...]] = {("embed_in", "embedding"): (V, H)}
    shapes.update({("layers",) + p: (L,) + s for p, s in per_layer.items()})
    shapes.update({("final_layer_norm", "scale"): (H,), ("final_layer_norm", "bias"): (H,),
                   ("embed_out", "kernel"): (H, V)})
    return shapes


def _leaf_shapes(tree: Any, prefix: ParamPath = ()) -> dict[ParamPath, tuple[int, ...] | None]:
    """Path -> shape of every leaf of a nested mapping (None for leaves without a shape)."""
    if isinstance(tree, Mapping):
        out: dict[ParamPath, tuple[int, ...] | None] = {}
        for k, v in tree.items():
            out.update(_leaf_shapes(v, prefix + (str(k),)))
        return out
    shape = getattr(tree, "shape", None)
    if shape is None:
        try:
            import numpy as np
            shape = np.shape(tree)
        except Exception:  # noqa: BLE001 - an object numpy cannot describe
            return {prefix: None}
    return {prefix: tuple(int(d) for d in shape)}


def check_param_shapes(config: ModelConfig, params: Mapping[str, Any], what: str = "params") -> None:
    """The one parameter check: raise ``ParamShapeError`` (a ``ConfigError`` and a
    ``CheckpointError``) naming missing, unexpected or wrongly shaped leaves of ``params``
    (arrays, ``jax.ShapeDtypeStruct`` or anything with ``.shape``) against :func:`param_shapes`.
    """
    expected = param_shapes(config)
    given = _leaf_shapes(params)
    missing = ["/".join(p) for p in expected if p not in given]
    unexpected = ["/".join(p) for p in given if p not in expected]
    if missing or unexpected:
        raise ParamShapeError(
            f"{what} do not match model {config.name!r}: missing {missing[:5]}"
            f"{f' (+{len(missing) - 5} more)' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{f' (+{len(unexpected) - 5} more)' if len(unexpected) > 5 else ''}; pass the ModelConfig "
            "the weights were made with")
    for path, shape in expected.items():
        if given[path] != shape:
            raise ParamShapeError(
                f"{what}: {'/'.join(path)} has shape {list(given[path] or ())}, expected {list(shape)} "
                f"for model {config.name!r} (hidden {config.hidden_size}, layers {config.num_layers}, "
                f"vocab {config.vocab_size}, MLP {config.intermediate_size}); pass the ModelConfig "
                "the weights were made with")


# name -> (layers, hidden, heads, padded vocab, init, output init): Pythia paper Table 1, released config.json
_PRESET_SHAPES: dict[str, tuple[int, int, int, int, str, str]] = {
    "pythia-14m": (6, 128, 4, 50304, "small_init", "wang_init"),
    "pythia-31m": (6, 256, 8, 50304, "small_init", "wang_init"),
    "pythia-70m": (6, 512, 8, 50304, "small_init", "wang_init"),
    "pythia-160m": (12, 768, 12, 50304, "small_init", "wang_init"),
    "pythia-410m": (24, 1024, 16, 50304, "small_init", "wang_init"),
    "pythia-1b": (16, 2048, 8, 50304, "small_init", "wang_init"),
    "pythia-1.4b": (24, 2048, 16, 50304, "small_init", "wang_init"),
    "pythia-2.8b": (32, 2560, 32, 50304, "small_init", "wang_init"),
    "pythia-6.9b": (32, 4096, 32, 50432, "normal", "scaled_normal"),
    "pythia-12b": (36, 5120, 40, 50688, "normal", "scaled_normal"),
}

# Peak learning rates of the released runs (Pythia paper Table 1 / the released GPT-NeoX ymls); min lr is 0.1 × max.
PRESET_MAX_LR: dict[str, float] = {
    "pythia-14m": 1.0e-3, "pythia-31m": 1.0e-3,
    "pythia-70m": 1.0e-3, "pythia-160m": 6.0e-4, "pythia-410m": 3.0e-4, "pythia-1b": 2.5e-4,
    "pythia-1.4b": 2.0e-4, "pythia-2.8b": 1.6e-4, "pythia-6.9b": 1.2e-4, "pythia-12b": 1.2e-4,
}

# GPT-NeoX tensor-parallel size of the original runs (model-parallel-size of the released ymls);
# the others ran with TP 1.
PRESET_TENSOR_PARALLEL: dict[str, int] = {"pythia-6.9b": 2, "pythia-12b": 4}

RELEASED_SIZES = ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")


def preset_names(include_extras: bool = True) -> list[str]:
    """All preset names: the 16 released models (standard and deduped) plus 14m / 31m."""
    names = []
    for size in RELEASED_SIZES:
        names += [f"pythia-{size}", f"pythia-{size}-deduped"]
    if include_extras:
        names += ["pythia-14m", "pythia-31m"]
    return names
