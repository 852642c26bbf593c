"""The HF ``GPTNeoXConfig`` field table and the ``config.json`` readers behind ``ModelConfig.from_hf_dict``.

Every field of transformers' ``GPTNeoXConfig`` (``transformers/models/gpt_neox/configuration_gpt_neox.py``,
and the legacy transformers 4.x names) is either read, honoured when the weights are read, ignored for a
stated reason, or refused with a ``ConfigError`` naming the field and its value: see ``HF_FIELDS``.
Re-exported from ``pythia_jax.config``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, NamedTuple

from pythia_jax.errors import ConfigError

# the messages keep the logger they were logged under before this module was split from config
logger = logging.getLogger("pythia_jax.config")

# HF activation names (transformers ``activations.ACT2FN``): "gelu"/"gelu_python" are exact erf
# GELU; these are the tanh approximation 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
TANH_GELU_NAMES = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_tanh", "gelu_accurate",
                   "gelu_python_tanh")
EXACT_GELU_NAMES = ("gelu", "gelu_python")

# ================================================================ HF config.json fields
# What ``from_hf_dict`` does with every ``GPTNeoXConfig`` key (transformers 5.x and the 4.x names).
#   read     -> a ModelConfig field
#   weights  -> honoured while reading the weights (``hf_weight_layout``), see the note
#   checked  -> accepted for the values in the note, otherwise ``ConfigError`` naming key and value
#   ignored  -> does not change the model's outputs here; the note says why
HF_FIELDS: dict[str, tuple[str, str]] = {
    # architecture
    "model_type": ("checked", "must be 'gpt_neox'"),
    "architectures": ("checked", "absent or naming GPTNeoXForCausalLM (other heads have other weights)"),
    "vocab_size": ("read", "vocab_size"),
    "hidden_size": ("read", "hidden_size"),
    "num_hidden_layers": ("read", "num_layers"),
    "num_attention_heads": ("read", "num_heads"),
    "intermediate_size": ("read", "intermediate_size (absent or null: 4 x hidden_size)"),
    "hidden_act": ("read", f"hidden_act; one of {EXACT_GELU_NAMES + TANH_GELU_NAMES}"),
    "max_position_embeddings": ("read", "max_position_embeddings"),
    "layer_norm_eps": ("read", "layer_norm_eps"),
    "use_parallel_residual": ("read", "use_parallel_residual"),
    "rope_parameters": ("checked", "rope_type 'default' (or absent); rope_theta -> rotary_emb_base, "
                                   "partial_rotary_factor -> rotary_pct; other rope types refused "
                                   "(the model has no position scaling)"),
    "rope_scaling": ("checked", "transformers 4.x name of rope_parameters: null or type 'default'; "
                                "when set, transformers reads it instead of rope_parameters"),
    "rotary_pct": ("read", "rotary_pct when rope_parameters has no partial_rotary_factor (transformers "
                           "4.x); else must agree with it"),
    "rotary_emb_base": ("read", "rotary_emb_base when rope_parameters has no rope_theta (transformers 4.x); "
                                "else must agree with it"),
    "partial_rotary_factor": ("checked", "top-level: ignored by GPTNeoXConfig, so it must equal the "
                                         "rotary_pct read (else refused)"),
    "rope_theta": ("checked", "top-level: ignored by GPTNeoXConfig, so it must equal the rotary_emb_base "
                              "read (else refused)"),
    "attention_bias": ("weights", "false: the QKV and attention-output biases are zero (same outputs; "
                                  "training may then learn them)"),
    "tie_word_embeddings": ("weights", "true: a missing embed_out is a copy of embed_in (or the reverse); "
                                       "both stored with different values are both kept, as transformers "
                                       "does (same outputs; training then updates the two separately)"),
    "is_encoder_decoder": ("checked", "must be false"),
    "add_cross_attention": ("checked", "must be false (GPT-NeoX has no cross-attention)"),
    "pruned_heads": ("checked", "must be empty (pruned heads change the QKV shapes)"),
    "quantization_config": ("checked", "must be absent (quantized weights are not read)"),
    # training-time only
    "attention_dropout": ("ignored", "dropout is off at inference; pythia-jax trains without dropout "
                                     "(Pythia used 0), a non-zero value is logged"),
    "hidden_dropout": ("ignored", "dropout is off at inference; pythia-jax trains without dropout "
                                  "(Pythia used 0), a non-zero value is logged"),
    "classifier_dropout": ("ignored", "only GPTNeoXFor{Sequence,Token}Classification use it"),
    "initializer_range": ("ignored", "HF's random init; pythia-jax initialises by init_method"),
    # runtime, generation and tokenizer settings
    "use_cache": ("ignored", "a runtime switch of HF's generate"),
    "bos_token_id": ("ignored", "tokenizer setting; the weights do not depend on it"),
    "eos_token_id": ("ignored", "tokenizer setting; pythia-jax's generate takes its stop id as an argument"),
    "pad_token_id": ("ignored", "tokenizer setting; the weights do not depend on it"),
    "is_decoder": ("ignored", "GPTNeoX attention is always causal (GPTNeoXAttention.is_causal)"),
    "output_hidden_states": ("ignored", "what HF's forward returns, not the model"),
    "output_attentions": ("ignored", "what HF's forward returns, not the model"),
    "return_dict": ("ignored", "what HF's forward returns, not the model"),
    "use_return_dict": ("ignored", "what HF's forward returns, not the model"),
    "chunk_size_feed_forward": ("ignored", "chunking the MLP does not change its result"),
    "id2label": ("ignored", "labels of classification heads"),
    "label2id": ("ignored", "labels of classification heads"),
    "num_labels": ("ignored", "labels of classification heads"),
    "problem_type": ("ignored", "loss of classification heads"),
    "dtype": ("ignored", "dtype the tensors were saved in; each tensor's own dtype is read"),
    "torch_dtype": ("ignored", "transformers 4.x name of dtype"),
    "transformers_version": ("ignored", "metadata"),
    "_name_or_path": ("read", "name (its last path component)"),
    "pythia_jax_name": ("read", "name (written by to_hf_dict)"),
    "pythia_jax_export": ("ignored", "what `convert jax-to-hf --all-steps` or a training run's export wrote the "
                                     "folder from (their resume and replace checks)"),
    "tokenizer_class": ("ignored", "tokenizer setting"),
    "torchscript": ("ignored", "HF export switch"),
}

_HF_REFUSED_TRUE = ("is_encoder_decoder", "add_cross_attention")


class HFWeightLayout(NamedTuple):
    """How an HF checkpoint's tensors map onto the (always untied, biased) params tree."""

    attention_bias: bool = True  # False: QKV / attention-dense biases absent, read as zeros
    tie_word_embeddings: bool = False  # True: a missing embed_out (embed_in) is embed_in.T (embed_out.T)


def hf_weight_layout(hf: Mapping[str, Any]) -> HFWeightLayout:
    """Check every key of an HF ``config.json`` dict against ``HF_FIELDS`` and return the weight layout.

    Raises ``ConfigError`` naming the key and its value for a setting this model cannot run;
    logs (``pythia_jax.config``) keys it does not know and non-zero dropout.
    """
    if not isinstance(hf, Mapping):
        raise ConfigError(f"an HF config must be a JSON object, got {type(hf).__name__}")
    fix = "; this GPT-NeoX implementation cannot run it (see pythia_jax.config.HF_FIELDS)"
    if hf.get("model_type", "gpt_neox") != "gpt_neox":
        raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}, expected 'gpt_neox'")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
               if hf.get(k) is None]
    if missing:
        raise ConfigError(f"config.json is missing required keys: {', '.join(missing)}")
    arch = hf.get("architectures")
    if arch is not None and (not isinstance(arch, (list, tuple)) or "GPTNeoXForCausalLM" not in arch):
        raise ConfigError(f"config.json has architectures={arch!r}: only GPTNeoXForCausalLM checkpoints "
                          "(with the embed_out head) can be read")
    for key in _HF_REFUSED_TRUE:
        if hf.get(key):
            raise ConfigError(f"config.json has {key}={hf[key]!r}{fix}")
    if hf.get("pruned_heads"):
        raise ConfigError(f"config.json has pruned_heads={hf['pruned_heads']!r}{fix}")
    if hf.get("quantization_config") is not None:
        raise ConfigError(f"config.json has quantization_config={hf['quantization_config']!r}; "
                          "dequantize the weights first (pythia-jax reads float16/bfloat16/float32)")
    act = hf.get("hidden_act", "gelu")
    if act not in EXACT_GELU_NAMES + TANH_GELU_NAMES:
        raise ConfigError(f"config.json has hidden_act={act!r}; supported: "
                          f"{', '.join(EXACT_GELU_NAMES + TANH_GELU_NAMES)}")
    _rope_parameters(hf)
    for key in ("attention_dropout", "hidden_dropout"):
        value = hf.get(key)
        if value:
            logger.warning("config.json has %s=%r: dropout is off at inference; pythia-jax has no dropout, "
                           "so training from this model does not apply it", key, value)
    unknown = sorted(k for k in hf if k not in HF_FIELDS)
    if unknown:
        logger.warning("config.json keys not known to pythia-jax, ignored: %s (check they do not change "
                       "the architecture)", ", ".join(unknown))
    return HFWeightLayout(attention_bias=_hf_bool(hf, "attention_bias", True),
                          tie_word_embeddings=_hf_bool(hf, "tie_word_embeddings", False))


_ROPE_DEFAULTS = {"rope_theta": 10000.0, "partial_rotary_factor": 0.25}  # GPTNeoXConfig's defaults
_ROPE_LEGACY = {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"}  # transformers 4.x


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """``{"rope_theta", "partial_rotary_factor"}`` as transformers resolves them
    (``GPTNeoXConfig.convert_rope_params_to_dict``): from the ``rope_scaling`` mapping when it is
    set, else from ``rope_parameters``; a value missing there from the transformers 4.x key
    (``rotary_emb_base`` / ``rotary_pct``), else the default (10000, 0.25).

    ``ConfigError`` (one line) for a rope type other than ``default``, and for any other spelling
    of either value in the file that disagrees with the one transformers uses: the mapping it does
    not read, or the top-level ``rope_theta`` / ``partial_rotary_factor`` (which
    ``GPTNeoXConfig`` ignores). Such a file means different models to different readers.
    """
    mappings: dict[str, Mapping[str, Any]] = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = hf.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"config.json has {key}={value!r}; expected a mapping or null")
        rope_type = value.get("rope_type", value.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"config.json has {key}.rope_type={rope_type!r} ({dict(value)!r}); only "
                              "'default' rotary embeddings are supported (no position scaling)")
        extra = sorted(set(value) - {"rope_type", "type", *_ROPE_DEFAULTS})
        if extra:
            logger.warning("config.json %s keys %s are ignored by default rotary embeddings", key, extra)
        mappings[key] = value
    used = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"  # `rope_scaling or ...`
    rope: dict[str, Any] = {}
    for name, default in _ROPE_DEFAULTS.items():
        legacy = _ROPE_LEGACY[name]
        chosen = mappings.get(used) or {}
        if chosen.get(name) is not None:
            source, value = f"{used}.{name}", _hf_float(chosen, name, f"{used}.{name}")
        elif hf.get(legacy) is not None:
            source, value = legacy, _hf_float(hf, legacy)
        else:
            source, value = "the default", default
        rope[name] = value
        others = [(f"{k}.{name}", m) for k, m in mappings.items() if k != used]
        others += [(legacy, hf), (name, hf)]
        for spelling, where in others:
            key = spelling.rsplit(".", 1)[-1]
            if spelling == source or where.get(key) is None:
                continue
            if _hf_float(where, key, spelling) != value:
                raise ConfigError(
                    f"config.json has {spelling}={where[key]!r} but transformers' GPTNeoXConfig uses "
                    f"{source} = {value!r}" + (" and ignores the top-level key" if spelling == name else "")
                    + f"; make them agree or remove {spelling}")
    return rope


def _hf_int(hf: Mapping[str, Any], key: str) -> int:
    value = hf.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ConfigError(f"config.json has {key}={value!r}; expected an integer")
    return int(value)


def _hf_float(hf: Mapping[str, Any], key: str, what: str | None = None) -> float:
    value = hf.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json has {what or key}={value!r}; expected a number")
    return float(value)


def _hf_bool(hf: Mapping[str, Any], key: str, default: bool) -> bool:
    value = hf.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"config.json has {key}={value!r}; expected true or false")
    return value


def read_hf_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The dict of an HF ``config.json`` (a file, or a directory holding one); ``ConfigError`` if unreadable."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return hf
