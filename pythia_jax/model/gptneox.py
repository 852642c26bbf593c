"""GPT-NeoX (the Pythia architecture) in Flax NNX, matching Hugging Face ``GPTNeoXForCausalLM``.

Read top to bottom, this file is the model::

    tokens ─► embed_in ─► L × Block (a scan) ─► final_layer_norm ─► embed_out ─► logits (float32)
    Block (parallel residual):   x + Attention(LN1(x)) + MLP(LN2(x))
    Block (sequential residual): a = x + Attention(LN1(x));  a + MLP(LN2(a))
    Attention: fused QKV projection ─► partial rotary on q, k ─► causal softmax ─► dense
    MLP:       dense_h_to_4h ─► GELU ─► dense_4h_to_h

The same modules, by name, in the two reference implementations::

    here                 HF ``modeling_gpt_neox.py``    GPT-NeoX v1.0 ``megatron/model/``
    GPTNeoX              GPTNeoXForCausalLM             gpt2_model.py::GPT2ModelPipe
      embed_in           GPTNeoXModel.embed_in          word_embeddings.py::EmbeddingPipe
      layers             GPTNeoXModel.layers            transformer.py::ParallelTransformerLayerPipe
      final_layer_norm   GPTNeoXModel.final_layer_norm  transformer.py::NormPipe
      embed_out          GPTNeoXForCausalLM.embed_out   transformer.py::ParallelLinearPipe
    Block                GPTNeoXLayer                   transformer.py::ParallelTransformerLayer
      parallel_residual  use_parallel_residual          gpt_j_residual
    Attention            GPTNeoXAttention               transformer.py::ParallelSelfAttention
    MLP                  GPTNeoXMLP                     transformer.py::ParallelMLP

The L blocks are stacked on a leading ``layers`` axis (built with ``nnx.vmap``) and run with
``jax.lax.scan`` so compile time does not grow with depth; the scan body is rematerialised per
``ModelConfig.remat``. Parameters live in ``param_dtype``, matmuls run in ``dtype``; LayerNorm
statistics, rotary angles and softmax are float32; logits are float32. Activations stay 2-D
([B·T, H]) around the dense layers and are reshaped only for attention.

The building blocks (Dense, LayerNorm, rotary, attention kernels) are in ``pythia_jax.layers``;
the parameter tree as plain data (``params_to_dict``, ``model_from_params``, ``logical_axes``) in
``pythia_jax.model.params``; the decoding cache in ``pythia_jax.model.kv_cache``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pythia_jax.config import ModelConfig
from pythia_jax.layers import (
    Dense,
    Embed,
    LayerNorm,
    apply_rotary,
    cached_attention,
    causal_mask,
    check_attention_supported,
    dot_product_attention,
    gelu,
    rotary_cos_sin,
    with_logical_constraint,
)
from pythia_jax.model.kv_cache import KVCache, LayerCache
from pythia_jax.model.token_ids import check_model_input

_BATCH_LENGTH = ("batch", "length")  # the flattened leading dim of 2-D activations

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _dtypes(config: ModelConfig) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, parameter dtype) of ``config``."""
    return jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)


# --------------------------------------------------------------------------- the model
class GPTNeoX(nnx.Module):
    """The GPT-NeoX causal language model with untied input and output embeddings.

    embed_in [V, H] → ``layers`` (L stacked ``Block``s) → final_layer_norm → embed_out [H, V]:
    HF ``GPTNeoXForCausalLM``; GPT-NeoX ``megatron/model/gpt2_model.py::GPT2ModelPipe``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        H, V = config.hidden_size, config.vocab_size
        dt, pdt = _dtypes(config)
        self.embed_in = Embed(V, H, std=config.input_init_std, dtype=dt, param_dtype=pdt, rngs=rngs)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_layer_norm = LayerNorm(H, eps=config.layer_norm_eps, dtype=dt, param_dtype=pdt,
                                          rngs=rngs)
        self.embed_out = Dense(H, V, kernel_std=config.input_init_std, names=("embed", "vocab"),
                               use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs)

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 key_mask: jax.Array | None = None, cache: KVCache | None = None):
        """Logits float32 [B, T, V] for int tokens [B, T]; with ``cache``: (logits, new_cache).

        positions: int [B, T] rotary positions; default arange(T) (+ cache.index when decoding).
        key_mask: bool, True = real token. Without a cache, [B, T]. With a cache, either [B, T]
        (the new tokens' validity, recorded in the cache) or [B, max_len] (all slots).
        cache: new keys/values are written at slots cache.index … cache.index + T − 1.
        Every compute dtype (float32, bfloat16, float16) with every parameter dtype runs on every
        backend with attention 'auto', 'xla' or 'reference'; raises ``ConfigError`` for
        attention='cudnn' off GPU or in float32 (``layers.check_attention_supported``).
        """
        # shape and dtype always; ids outside the vocabulary (which would read NaN or wrap around
        # silently) and the cache's room on the host, for concrete arrays
        tokens = check_model_input(tokens, self.config.vocab_size, cache)
        x, new_cache = self._hidden(tokens, positions, key_mask, cache)
        B, T = tokens.shape
        logits = self.embed_out(x, out_dtype=jnp.float32).reshape(B, T, -1)
        logits = with_logical_constraint(logits, ("batch", "length", "vocab"))
        if cache is None:
            return logits
        return logits, new_cache

    def hidden_states(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                      key_mask: jax.Array | None = None) -> jax.Array:
        """The final-LayerNorm output [B·T, H] in the compute dtype (what ``embed_out`` reads),
        for int tokens [B, T]: the input of a loss that never builds all [B, T, V] logits at once
        (``layers.chunked_cross_entropy``). Arguments as for ``__call__`` (no cache).
        """
        tokens = check_model_input(tokens, self.config.vocab_size)
        return self._hidden(tokens, positions, key_mask, None)[0]

    def _hidden(self, tokens, positions, key_mask, cache):
        """(final-LayerNorm output [B·T, H], new cache or None); see ``__call__``."""
        cfg = self.config
        # an attention kernel named in the config that cannot run on this backend / dtype is
        # refused here, at trace time, before any compute (ConfigError)
        check_attention_supported(cfg.attention, cfg.dtype, cfg.head_dim)
        B, T = tokens.shape  # checked by the callers (token_ids.check_model_input)
        index = cache.index if cache is not None else jnp.zeros((), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = rotary_cos_sin(positions, cfg.rotary_ndims, cfg.rotary_emb_base)
        mask, new_valid = self._mask(key_mask, cache, index, B, T)

        x = self.embed_in(tokens.reshape(-1))  # [B·T, H]
        x = with_logical_constraint(x, (_BATCH_LENGTH, "embed"))
        kv = (cache.k, cache.v) if cache is not None else None
        x, new_kv = self._run_layers(x, cos, sin, mask, B, kv, index)
        x = self.final_layer_norm(x)
        if cache is None:
            return x, None
        # inside jit a write past the cache's end would be clamped (overwriting the last slots) and
        # the logits silently wrong: they are NaN instead (outside jit check_model_input refuses it)
        x = jnp.where(index + T <= cache.max_len, x, jnp.asarray(jnp.nan, x.dtype))
        return x, KVCache(k=new_kv[0], v=new_kv[1], valid=new_valid, index=index + T)

    @staticmethod
    def _mask(key_mask, cache, index, B, T):
        """(attention mask bool [B, 1, T, S] or None for plain causal, the cache's new ``valid``
        [B, max_len] or None without a cache). The queries sit at slots index … index + T − 1."""
        mask = new_valid = None
        q_slots = index + jnp.arange(T, dtype=jnp.int32)
        if cache is not None:
            if key_mask is not None and key_mask.shape[1] == cache.max_len:
                new_valid = key_mask.astype(bool)
            else:
                step_valid = jnp.ones((B, T), bool) if key_mask is None else key_mask.astype(bool)
                new_valid = jax.lax.dynamic_update_slice(cache.valid, step_valid, (0, index))
            mask = causal_mask(q_slots, cache.max_len, new_valid)
        elif key_mask is not None:
            mask = causal_mask(q_slots, T, key_mask.astype(bool))
        return mask, new_valid

    def _run_layers(self, x, cos, sin, mask, batch, kv, index):
        """Apply the L stacked blocks: a scan (or an unrolled loop when ``scan_layers`` is off).

        kv: None or the whole cache (k, v) [L, B, N, S, D]. It is carried through the scan and
        each layer writes only its new tokens, in place (see ``LayerCache``).
        Returns (x, new (k, v) or None).
        """
        graphdef, state = nnx.split(self.layers)

        def body(carry, layer):
            h, cache_kv = carry
            layer_state, i = layer
            block = nnx.merge(graphdef, layer_state)
            cache = None if cache_kv is None else LayerCache(*cache_kv, layer=i, index=index)
            h, cache = block(h, cos, sin, mask, batch, cache)
            return (h, None if cache is None else (cache.k, cache.v)), None

        if self.config.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.config.remat], prevent_cse=False)

        layer_ids = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        if self.config.scan_layers:
            (x, kv), _ = jax.lax.scan(body, (x, kv), (state, layer_ids))
            return x, kv
        for i in range(self.config.num_layers):
            (x, kv), _ = body((x, kv), (jax.tree.map(lambda a, i=i: a[i], state), layer_ids[i]))
        return x, kv


# --------------------------------------------------------------------------- one layer
class Block(nnx.Module):
    """One transformer layer: two pre-LayerNorms, attention and MLP, parallel or sequential residual.

    HF ``GPTNeoXLayer`` (``use_parallel_residual``); GPT-NeoX
    ``megatron/model/transformer.py::ParallelTransformerLayer`` (``gpt_j_residual``, untied norms).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        H, eps = config.hidden_size, config.layer_norm_eps
        dt, pdt = _dtypes(config)
        self.input_layernorm = LayerNorm(H, eps=eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.post_attention_layernorm = LayerNorm(H, eps=eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.attention = Attention(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)
        self.parallel_residual = config.use_parallel_residual

    def __call__(self, x, cos, sin, mask, batch, cache: LayerCache | None = None):
        """x [B·T, H] in the compute dtype -> ([B·T, H], updated cache or None)."""
        attn, cache = self.attention(self.input_layernorm(x), cos, sin, mask, batch, cache)
        if self.parallel_residual:
            out = x + attn + self.mlp(self.post_attention_layernorm(x))
        else:
            a = x + attn
            out = a + self.mlp(self.post_attention_layernorm(a))
        return with_logical_constraint(out, (_BATCH_LENGTH, "embed")), cache


class Attention(nnx.Module):
    """Causal self-attention with a fused per-head QKV projection and partial rotary.

    query_key_value: kernel [H, 3H] whose output columns are laid out [heads, 3 (q,k,v), head_dim];
    dense: kernel [H, H]. Both with bias. HF ``GPTNeoXAttention``; GPT-NeoX
    ``megatron/model/transformer.py::ParallelSelfAttention`` (rotary from
    ``megatron/model/positional_embeddings.py``).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        H, (dt, pdt) = config.hidden_size, _dtypes(config)
        self.query_key_value = Dense(H, 3 * H, kernel_std=config.input_init_std,
                                     names=("embed", "heads"), dtype=dt, param_dtype=pdt, rngs=rngs)
        self.dense = Dense(H, H, kernel_std=config.output_init_std, names=("heads", "embed"),
                           dtype=dt, param_dtype=pdt, rngs=rngs)
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.impl = config.attention

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None,
                 batch: int, cache: LayerCache | None = None):
        """x [B·T, H]; cos/sin f32 [B, T, rd]; mask bool [B, 1, T, S] or None (plain causal).

        cache: when decoding, the stacked cache and where this layer writes (``LayerCache``).
        Returns ([B·T, H], the cache with this layer's new keys/values written, or None).
        """
        qkv = self.query_key_value(x).reshape(batch, -1, self.num_heads, 3, self.head_dim)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [B, T, N, D] each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        names = ("batch", "length", "heads", "kv")
        q, k, v = (with_logical_constraint(a, names) for a in (q, k, v))
        if cache is None:
            out = dot_product_attention(q, k, v, mask=mask, impl=self.impl)
        else:
            cache = cache.write(k, v)
            k, v = cache.read(q.dtype)  # [B, N, S, D]: every slot of this layer, new tokens included
            out = cached_attention(q, k, v, mask)
        out = out.reshape(-1, self.num_heads * self.head_dim)
        return self.dense(with_logical_constraint(out, (_BATCH_LENGTH, "heads"))), cache


class MLP(nnx.Module):
    """dense_h_to_4h [H, F] → GELU (exact or tanh) → dense_4h_to_h [F, H], both with bias.

    HF ``GPTNeoXMLP``; GPT-NeoX ``megatron/model/transformer.py::ParallelMLP``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        H, F = config.hidden_size, config.intermediate_size
        dt, pdt = _dtypes(config)
        self.dense_h_to_4h = Dense(H, F, kernel_std=config.input_init_std, names=("embed", "mlp"),
                                   dtype=dt, param_dtype=pdt, rngs=rngs)
        self.dense_4h_to_h = Dense(F, H, kernel_std=config.output_init_std, names=("mlp", "embed"),
                                   dtype=dt, param_dtype=pdt, rngs=rngs)
        self.tanh_gelu = config.tanh_gelu

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B·T, H] -> [B·T, H]."""
        h = gelu(self.dense_h_to_4h(x), approximate=self.tanh_gelu)
        return self.dense_4h_to_h(with_logical_constraint(h, (_BATCH_LENGTH, "mlp")))
