"""GPT-NeoX yml configs: read them into a ``ModelConfig`` / optimizer settings, write them back.

The files saved under ``global_stepN/configs/`` are JSON-like YAML (``#`` comments, trailing
commas; PyYAML reads them) whose keys are GPT-NeoX's ``megatron/neox_arguments/neox_args.py``
arguments, spelled with dashes or underscores interchangeably (``gpt-j-residual`` in most Pythia
configs, ``gpt_j_residual`` in 6.9b / 12b; see the ``models/*.yml`` of EleutherAI's Pythia
repository). ``read_neox_yml`` normalises them to dashes.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Sequence

from pythia_jax.config import EXACT_GELU_NAMES, INIT_METHODS, TOKENIZER_VOCAB_SIZE, ConfigError, ModelConfig


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


def as_int(value: Any, what: str) -> int:
    """An integer setting of a GPT-NeoX yml (``num-layers``, ``hidden-size`` …): an int, or a
    float or string holding one; ``ConfigError`` naming the key otherwise (2.5 is not truncated)."""
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not number.is_integer():
        raise ConfigError(f"GPT-NeoX config: {what} = {value!r} is not an integer")
    return int(number)


def as_bool(value: Any) -> bool:
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
    if as_bool(yml_get(yml, "gpt-j-tied", False)):
        raise ConfigError("gpt-j-tied (one shared LayerNorm per block) has no HF GPT-NeoX equivalent")
    norm = yml_get(yml, "norm", "layernorm")
    if norm != "layernorm":
        raise ConfigError(f"GPT-NeoX config has norm {norm!r}; only layernorm is supported")
    activation = yml_get(yml, "activation", "gelu")
    if activation != "gelu":
        raise ConfigError(f"GPT-NeoX config has activation {activation!r}; only gelu is supported")
    if hidden_act is None:
        # bias-gelu-fusion and openai-gelu run the tanh approximation (what Pythia trained with).
        tanh = as_bool(yml_get(yml, "bias-gelu-fusion", False)) or as_bool(yml_get(yml, "openai-gelu", False))
        hidden_act = "gelu_new" if tanh else "gelu"
    fields: dict[str, Any] = dict(
        name=name,
        vocab_size=int(vocab_size),
        hidden_size=as_int(yml_get(yml, "hidden-size"), "hidden-size"),
        num_layers=as_int(yml_get(yml, "num-layers"), "num-layers"),
        num_heads=as_int(yml_get(yml, "num-attention-heads"), "num-attention-heads"),
        intermediate_size=int(intermediate_size),
        rotary_pct=_as_float(yml_get(yml, "rotary-pct", 1.0), "rotary-pct"),
        rotary_emb_base=_as_float(yml_get(yml, "rotary-emb-base", 10000), "rotary-emb-base"),
        max_position_embeddings=as_int(yml_get(yml, "max-position-embeddings", yml_get(yml, "seq-length", 2048)),
                                       "max-position-embeddings"),
        use_parallel_residual=as_bool(yml_get(yml, "gpt-j-residual", False)),
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
        out["total_steps"] = as_int(total, "lr-decay-iters / train-iters")
        warmup = yml_get(yml, "warmup")
        if warmup is not None:  # AnnealingLR's warmup_iter = warmup * lr_decay_iters, a float
            out["warmup_steps"] = _as_float(warmup, "warmup") * max(1, out["total_steps"])
    # GPT-NeoX's NeoXArgs default lr_decay_style is "linear" (megatron/neox_arguments/neox_args.py)
    out["decay_style"] = str(yml_get(yml, "lr-decay-style", "linear"))
    parallel_residual = as_bool(yml_get(yml, "gpt-j-residual", False))
    out["row_parallel_bias_copies"] = int(tp) if parallel_residual else 1
    return out


def neox_yml(config: ModelConfig, vocab_file: str | None = None, **extra: Any) -> dict[str, Any]:
    """A GPT-NeoX yml (dashed keys) describing ``config`` at TP 1 / pipeline form."""
    V = config.vocab_size
    divisible = 128
    if -(-TOKENIZER_VOCAB_SIZE // divisible) * divisible != V:
        # NeoX pads the tokenizer's 50,277 ids up to a multiple of this; V itself does it when V ≥ 50,277.
        divisible = V if V >= TOKENIZER_VOCAB_SIZE else 128
    if V < TOKENIZER_VOCAB_SIZE:
        logging.getLogger(__name__).warning(
            "vocab_size %d is below the %d ids of the GPT-NeoX-20B tokenizer this yml names: GPT-NeoX would build "
            "a %d-row embedding and fail to load these weights; point its vocab-file at a tokenizer of at most %d "
            "ids (pythia-jax reads the checkpoint either way)", V, TOKENIZER_VOCAB_SIZE,
            -(-TOKENIZER_VOCAB_SIZE // 128) * 128, V)
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
