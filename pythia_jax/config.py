"""Model configuration: the typed ``ModelConfig``, the Pythia presets and the HF ``config.json`` round trip.

Numbers come from PYTHIA_FACTS §1–3. Nothing here reads gin or the environment; gin binds
``ModelConfig`` fields at the edges (see ``pythia_jax.gin_setup``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

# Vocabulary facts (PYTHIA_FACTS §3).
TOKENIZER_VOCAB_SIZE = 50277
EOD_TOKEN_ID = 0
PAD_TOKEN_ID = 1

# HF activation names: "gelu" is exact erf GELU; these are the tanh approximation.
TANH_GELU_NAMES = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_tanh")
EXACT_GELU_NAMES = ("gelu",)
INIT_METHODS = ("small_init", "wang_init", "normal", "scaled_normal")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "reference")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


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
        """Standard deviation of one of the Pythia init methods for this shape (PYTHIA_FACTS §1)."""
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
        """Exact parameter count from the shapes (embed_in and embed_out are untied)."""
        H, F, L, V = self.hidden_size, self.intermediate_size, self.num_layers, self.vocab_size
        per_layer = (4 * H  # two LayerNorms
                     + H * 3 * H + 3 * H  # QKV
                     + H * H + H  # attention dense
                     + H * F + F + F * H + H)  # MLP
        non_embedding = L * per_layer + 2 * H
        return non_embedding + (2 * V * H if include_embeddings else 0)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """One of the Pythia models by name (``pythia-160m``, ``pythia-1.4b-deduped``, ``14m``…)."""
        key = name.strip().lower()
        if key.startswith("eleutherai/"):
            key = key[len("eleutherai/"):]
        if not key.startswith("pythia-"):
            key = "pythia-" + key
        base = key[: -len("-deduped")] if key.endswith("-deduped") else key
        if base.endswith("-v0"):
            base = base[: -len("-v0")]
        if base not in _PRESET_SHAPES:
            raise ConfigError(f"unknown model name {name!r}; known: {', '.join(preset_names())}")
        L, H, heads, vocab, init, out_init = _PRESET_SHAPES[base]
        fields = dict(name=key, vocab_size=vocab, hidden_size=H, num_layers=L, num_heads=heads,
                      init_method=init, output_init_method=out_init)
        fields.update(overrides)
        return cls(**fields)

    # ------------------------------------------------------------ HF interop
    def to_hf_dict(self) -> dict[str, Any]:
        """The contents of an HF ``config.json`` for ``GPTNeoXForCausalLM``."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
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
        """Build from an HF ``config.json`` dict (legacy keys or transformers 5.x ``rope_parameters``)."""
        if hf.get("model_type", "gpt_neox") != "gpt_neox":
            raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}, expected 'gpt_neox'")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
                   if k not in hf]
        if missing:
            raise ConfigError(f"config.json is missing required keys: {', '.join(missing)}")
        if hf.get("tie_word_embeddings", False):
            raise ConfigError("tie_word_embeddings=true is not a GPT-NeoX/Pythia layout")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"rope type {rope_type!r} is not supported (Pythia uses default rotary)")
        rotary_pct = hf.get("rotary_pct", rope.get("partial_rotary_factor", 0.25))
        base = hf.get("rotary_emb_base", rope.get("rope_theta", 10000.0))
        fields = dict(
            name=str(hf.get("_name_or_path") or "custom").split("/")[-1] or "custom",
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            intermediate_size=int(hf.get("intermediate_size") or 4 * int(hf["hidden_size"])),
            rotary_pct=float(rotary_pct),
            rotary_emb_base=float(base),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
            hidden_act=str(hf.get("hidden_act", "gelu")),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_file(cls, path: str | os.PathLike, **overrides: Any) -> "ModelConfig":
        """Read ``config.json`` (a file, or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return cls.from_hf_dict(hf, **overrides)

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


# name -> (layers, hidden, heads, padded vocab, init, output init)   (PYTHIA_FACTS §1)
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

# Peak learning rates of the released runs (PYTHIA_FACTS §1/§5); min lr is 0.1 × max.
PRESET_MAX_LR: dict[str, float] = {
    "pythia-14m": 1.0e-3, "pythia-31m": 1.0e-3,
    "pythia-70m": 1.0e-3, "pythia-160m": 6.0e-4, "pythia-410m": 3.0e-4, "pythia-1b": 2.5e-4,
    "pythia-1.4b": 2.0e-4, "pythia-2.8b": 1.6e-4, "pythia-6.9b": 1.2e-4, "pythia-12b": 1.2e-4,
}

# GPT-NeoX tensor-parallel size of the original runs (PYTHIA_FACTS §4); the others ran with TP 1.
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
