"""File names and tensor keys of GPT-NeoX (DeepSpeed) checkpoints, and how TP ranks merge.

Layer indices follow GPT-NeoX's ``megatron/model/gpt2_model.py`` (``GPT2ModelPipe``): 0 the
embedding, 2…L+1 the transformer layers, L+3 the final norm, L+4 the output head (1 and L+2 hold
no parameters). DeepSpeed's ``PipelineModule`` saves one ``layer_{idx:02d}-model_{tp:02d}-model_states.pt``
per index and tensor-parallel rank; engine and ZeRO states are ``mp_rank_{tp:02d}_model_states.pt``
and ``zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt``. The merge rule of each key is that of
GPT-NeoX's ``tools/ckpts/convert_neox_to_hf.py`` (column-parallel tensors concatenate on dim 0,
row-parallel weights on dim 1, LayerNorms are replicated).
"""

from __future__ import annotations

import re

PIPE_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
STEP_DIR = re.compile(r"^global_step(\d+)$")
SEQ_KEY = re.compile(r"^(?:module\.)?(?:sequential\.)?(\d+)\.(.+)$")

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
IGNORED_LAYER_KEYS = ("attention.rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")
EMBED_KEYS = {"word_embeddings.weight": ("gpt_neox.embed_in.weight", CAT0)}
FINAL_NORM_KEYS = {"norm.weight": ("gpt_neox.final_layer_norm.weight", NORM),
                   "norm.bias": ("gpt_neox.final_layer_norm.bias", NORM)}
HEAD_KEYS = {"final_linear.weight": ("embed_out.weight", CAT0)}
