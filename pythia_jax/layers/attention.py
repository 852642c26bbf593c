"""Attention kernels: the causal mask, the reference / XLA / cuDNN / TPU splash paths, the choice
between them (``ModelConfig.attention``), and attention over a KV cache.

Conventions: ``B`` batch, ``T`` query length, ``S`` key length, ``N`` heads, ``D`` head dim.
q/k/v arrive in the compute dtype; logits and softmax are float32 on every path. The attention
of GPT-NeoX ``megatron/model/transformer.py::ParallelSelfAttention`` and HF ``GPTNeoXAttention``:
softmax(q·kᵀ / sqrt(D)) v under a causal mask.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd as core_spmd

from pythia_jax.layers.logical import logical_to_mesh_spec


def causal_mask(q_slots: jax.Array, num_keys: int, key_valid: jax.Array | None = None) -> jax.Array:
    """Boolean mask [B, 1, T, S]: key slot s is visible from query slot q iff s <= q (and valid).

    q_slots int32 [B, T] or [T]: the key-slot index of each query; key_valid bool [B, S].
    """
    q_slots = jnp.atleast_2d(q_slots)
    mask = jnp.arange(num_keys, dtype=jnp.int32)[None, None, :] <= q_slots[:, :, None]  # [B|1, T, S]
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    return mask[:, None, :, :]


def reference_attention(q, k, v, mask: jax.Array | None, scale: float) -> jax.Array:
    """Plain einsum softmax attention in float32 (for parity checks).

    q [B, T, N, D], k/v [B, S, N, D]; mask bool broadcastable to [B, N, T, S] or None (causal).
    Returns [B, T, N, D] in q's dtype.
    """
    qf, kf, vf = (a.astype(jnp.float32) for a in (q, k, v))
    logits = jnp.einsum("btnd,bsnd->bnts", qf, kf) * jnp.float32(scale)
    if mask is None:
        mask = causal_mask(jnp.arange(q.shape[1], dtype=jnp.int32), k.shape[1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnts,bsnd->btnd", probs, vf).astype(q.dtype)


def _splash_local(q, k, v, scale: float, interpret: bool) -> jax.Array:
    """Causal splash attention on local (unsharded) arrays; q/k/v [B, T, N, D] -> [B, T, N, D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    _, T, N, _ = q.shape
    padded = -(-T // 128) * 128  # the kernel works on blocks of 128; causal keys past T are unseen
    if padded != T:
        pad = lambda a: jnp.pad(a, ((0, 0), (0, padded - T), (0, 0), (0, 0)))
        return _splash_local(pad(q), pad(k), pad(v), scale, interpret)[:, :T]
    block = math.gcd(T, 512)
    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(N)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                interpret=interpret)
    to_heads = lambda a: jnp.swapaxes(a, 1, 2)  # [B, N, T, D]
    out = jax.vmap(kernel)(to_heads(q * jnp.asarray(scale, q.dtype)), to_heads(k), to_heads(v))
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def _splash_attention(q, k, v, scale: float, interpret: bool | None) -> jax.Array:
    """Causal attention with the TPU Pallas splash kernel; q/k/v [B, T, N, D] -> [B, T, N, D].

    Off TPU the kernel runs in Pallas interpret mode (slow; for checks). Under a mesh with logical
    rules the kernel runs per shard with ``shard_map`` over the batch and head axes (a sharded
    length or head_dim axis is not supported).
    """
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    local = functools.partial(_splash_local, scale=scale, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v)
    rules = core_spmd.get_logical_axis_rules()
    if not rules:
        raise ValueError("splash attention under a mesh needs logical axis rules")
    spec = logical_to_mesh_spec(("batch", "length", "heads", "kv"), rules)
    if spec[1] is not None or spec[3] is not None:
        raise ValueError(f"splash attention cannot shard the length or head_dim axis ({spec})")
    return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _cudnn_ok(q: jax.Array) -> bool:
    head_dim = q.shape[-1]
    # cuDNN flash attention: bf16/fp16, head_dim a multiple of 8, ≤ 256 on Hopper (≤ 128 before;
    # JAX raises NotImplementedError at trace time then, and 'auto' falls back to XLA).
    return q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 256


def check_attention_supported(impl: str, dtype, head_dim: int, backend: str | None = None) -> None:
    """Refuse, before any compute, an attention kernel asked for by name that cannot run here.

    impl: ``ModelConfig.attention``; dtype: the compute dtype; backend: ``jax.default_backend()``
    when None. 'auto', 'xla' and 'reference' run everywhere in float32/bfloat16/float16. 'cudnn'
    needs a GPU, a 16-bit compute dtype and head_dim a multiple of 8 up to 256 (the cuDNN flash
    attention that ``jax.nn.dot_product_attention(implementation="cudnn")`` calls). 'splash' is the
    TPU Pallas kernel; elsewhere it runs in Pallas interpret mode (slow, for checks).
    Raises ``ConfigError`` (one line naming the setting, what was found and what to use instead).
    """
    from pythia_jax.config import ConfigError

    if impl != "cudnn":
        return
    backend = backend or jax.default_backend()
    dtype = jnp.dtype(dtype)
    if backend != "gpu":
        raise ConfigError(f"attention='cudnn' needs a GPU (cuDNN flash attention), but the JAX "
                          f"backend is {backend!r}; use attention='auto' (picks the fastest kernel "
                          f"available) or 'xla'")
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ConfigError(f"attention='cudnn' needs dtype bfloat16 or float16, got {dtype.name}; set "
                          f"dtype='bfloat16' or use attention='auto' / 'xla'")
    if head_dim % 8 or head_dim > 256:
        raise ConfigError(f"attention='cudnn' needs head_dim a multiple of 8 and at most 256, got "
                          f"{head_dim}; use attention='auto' / 'xla'")


def resolve_attention_impl(impl: str, q: jax.Array, masked: bool) -> str:
    """The attention path actually used: 'xla', 'cudnn', 'splash' or 'reference'.

    'auto' picks cuDNN on GPU (bf16/fp16, head_dim ≤ 256 and a multiple of 8), the splash kernel
    on TPU (sequences of at least 128; shorter ones are padded up to 128 when asked for
    explicitly), else XLA. Masked attention (a key mask) always takes XLA
    unless 'reference' was asked for: the fused kernels here are causal-only. (Attention over a
    KV cache does not come here: the model uses ``cached_attention`` for it.)
    """
    if impl == "reference":
        return "reference"
    if masked:
        return "xla"
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu" and _cudnn_ok(q):
        return "cudnn"
    if backend == "tpu" and q.shape[1] >= 128:
        return "splash"
    return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None,
                          impl: str = "auto", splash_interpret: bool | None = None) -> jax.Array:
    """Scaled dot-product attention with softmax in float32.

    q [B, T, N, D], k/v [B, S, N, D] in the compute dtype. ``mask`` None means plain causal
    attention with T == S; otherwise a bool mask broadcastable to [B, 1, T, S] (True = attend),
    which already contains the causal part. ``splash_interpret`` None runs the splash kernel in
    Pallas interpret mode off TPU. Returns [B, T, N, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    chosen = resolve_attention_impl(impl, q, masked=mask is not None)
    if chosen == "reference":
        return reference_attention(q, k, v, mask, scale)
    if chosen == "splash":
        try:
            return _splash_attention(q, k, v, scale, interpret=splash_interpret)
        except (ImportError, NotImplementedError, ValueError):
            if impl == "splash":
                raise
            chosen = "xla"  # 'auto': fall back when the kernel is unavailable for this shape
    if chosen == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            if impl == "cudnn":
                raise
            chosen = "xla"
    return xla_attention(q, k, v, mask, scale)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                  scale: float) -> jax.Array:
    """Softmax attention as plain XLA ops, in any compute dtype on any backend.

    q [B, T, N, D], k/v [B, S, N, D]; mask bool broadcastable to [B, N, T, S] or None (causal,
    T == S). The q·k product takes the compute-dtype inputs and accumulates into float32
    (``preferred_element_type``), the scaling, masking and softmax are float32, the probabilities
    are cast to v's dtype for the second product: the numerics of
    ``jax.nn.dot_product_attention(implementation="xla")``. That function is not used because it
    pins the dot algorithm (``F16_F16_F32`` / ``BF16_BF16_F32``), which XLA rejects at compile
    time on CPU (float16), TPU (float16) and some GPUs (bfloat16); its fallback only catches the
    eager error. Plain causal attention (no mask, T == S) of 64 or more positions goes through
    ``blocked_causal_attention``, which skips the key blocks above the diagonal. Returns
    [B, T, N, D] in q's dtype.
    """
    if mask is None and q.shape[1] == k.shape[1]:
        block = causal_block_size(q.shape[1])
        if block:
            return blocked_causal_attention(q, k, v, scale, block)
    logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    if mask is None:
        mask = causal_mask(jnp.arange(q.shape[1], dtype=jnp.int32), k.shape[1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnd->btnd", probs, v).astype(q.dtype)


def causal_block_size(length: int) -> int:
    """Query-block length for ``blocked_causal_attention`` at sequence length ``length``; 0: none.

    A quarter of the sequence, between 32 and 128 query rows; sequences shorter than 64 are not
    split (one block is the plain path). Chosen by measurement on a 2-core CPU (fwd + bwd,
    float32): at T = 128 / 256 / 1024 / 2048 blocks of 32 / 64 / 128 / 128 were the fastest tried.
    """
    if length < 64:
        return 0
    return max(32, min(128, length // 4))


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                             block: int) -> jax.Array:
    """Causal softmax attention computed one block of ``block`` query rows at a time.

    Query rows [i, i + block) can only see keys [0, i + block), so each block multiplies against
    that prefix alone and the key blocks above the diagonal are never computed: at n blocks the
    two products and the softmax cost (n + 1) / 2n of the full square (5/8 at n = 4). Every row's
    softmax is over exactly the keys the full causal computation gives non-zero weight, so the
    result is that of ``xla_attention`` up to float summation order (the numerics are the same:
    float32 logits and softmax, probabilities cast to v's dtype). Heads go in front first
    ([B, N, T, D]), the layout whose batched products XLA:CPU runs fastest.

    q, k, v [B, T, N, D] (T == S); returns [B, T, N, D] in q's dtype.
    """
    length = q.shape[1]
    qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, N, T, D]
    floor = jnp.finfo(jnp.float32).min
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        logits = jnp.einsum("bntd,bnsd->bnts", qh[:, :, start:end], kh[:, :, :end],
                            preferred_element_type=jnp.float32) * jnp.float32(scale)
        visible = causal_mask(jnp.arange(start, end, dtype=jnp.int32), end)  # [1, 1, rows, end]
        probs = jax.nn.softmax(jnp.where(visible, logits, floor), axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bnts,bnsd->bntd", probs, vh[:, :, :end]))
    return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2).astype(q.dtype)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked attention over a KV cache stored heads-major, with the numerics of the XLA path.

    q [B, T, N, D]; k/v [B, N, S, D] (the cache's layout: each head's keys contiguous, so both
    products are plain batched matmuls over (B, N) and the cache is read without a transposed
    copy); mask bool broadcastable to [B, 1, T, S]. Logits and softmax in float32, the
    probabilities cast to v's dtype for the second product. Returns [B, T, N, D] in q's dtype.
    """
    scale = jnp.float32(q.shape[-1] ** -0.5)
    logits = jnp.einsum("btnd,bnsd->bnts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bnsd->btnd", probs, v).astype(q.dtype)
