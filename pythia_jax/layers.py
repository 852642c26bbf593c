"""Building blocks of GPT-NeoX: dense / embedding / LayerNorm modules, rotary embedding,
attention kernels and the logical-axis sharding hook.

Conventions: ``B`` batch, ``T`` query length, ``S`` key length, ``N`` heads, ``D`` head dim,
``H`` hidden size. Parameters carry their logical axis names as the NNX variable metadata
``out_sharding`` (a tuple of names such as ``('embed', 'heads')``); eager sharding is off, so
modules can be built without a mesh. The trainer maps the names to mesh axes with a rule table.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.core import spmd as core_spmd

Initializer = Callable[..., jax.Array]
LogicalNames = Sequence[str | tuple[str, ...] | None]


# --------------------------------------------------------------------------- sharding hook
def logical_to_mesh_spec(names: LogicalNames, rules: Sequence[tuple[str, object]]) -> jax.sharding.PartitionSpec:
    """Translate logical axis names to a ``PartitionSpec`` with a rule table.

    ``rules`` is a sequence of ``(logical_name, mesh_axes)`` pairs (``mesh_axes``: a mesh axis
    name, a tuple of them, or None), as in ``flax.linen.logical_axis_rules``. The first rule for a
    name whose mesh axes are still unused wins; a name without a usable rule is unsharded. An entry
    of ``names`` may be a tuple of logical names (a flattened dimension such as batch·length): its
    mesh axes are concatenated.
    """
    used: set[str] = set()

    def lookup(name: str) -> tuple[str, ...]:
        for logical, mesh_axes in rules:
            if logical != name:
                continue
            axes = () if mesh_axes is None else (
                (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
            if used.intersection(axes):
                continue
            used.update(axes)
            return axes
        return ()

    spec = []
    for entry in names:
        if entry is None:
            spec.append(None)
            continue
        group = (entry,) if isinstance(entry, str) else tuple(entry)
        axes: tuple[str, ...] = ()
        for name in group:
            axes += lookup(name)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return jax.sharding.PartitionSpec(*spec)


def with_logical_constraint(x: jax.Array, names: LogicalNames) -> jax.Array:
    """Constrain the sharding of activation ``x`` by logical axis names.

    A no-op unless both a logical rule context (``flax.nnx.logical_axis_rules`` /
    ``flax.linen.logical_axis_rules``) and a mesh (``jax.set_mesh`` / ``jax.sharding.use_mesh``)
    are active, so the model runs unchanged on one device.
    """
    rules = core_spmd.get_logical_axis_rules()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"logical names {tuple(names)} do not match an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(names, rules))


# --------------------------------------------------------------------------- parameters
def _param(init: Initializer, rngs: nnx.Rngs, shape: tuple[int, ...], dtype, names: tuple[str, ...]) -> nnx.Param:
    """A parameter initialised by ``init`` and tagged with its logical axis names."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def normal(std: float) -> Initializer:
    """Plain (untruncated) normal initializer with standard deviation ``std``."""
    return jax.nn.initializers.normal(stddev=std)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` on 2-D activations.

    kernel [in, out] (the transpose of torch's weight), bias [out]; input [M, in] in any dtype,
    computed in ``dtype``; output [M, out] in ``dtype`` (or ``out_dtype``).
    """

    def __init__(self, in_features: int, out_features: int, *, kernel_std: float,
                 names: tuple[str, str], use_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = _param(normal(kernel_std), rngs, (in_features, out_features), param_dtype, names)
        self.bias = (_param(jax.nn.initializers.zeros, rngs, (out_features,), param_dtype, names[1:])
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        out_dtype = out_dtype or self.dtype
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                    preferred_element_type=out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(out_dtype)
        return y.astype(out_dtype)


class Embed(nnx.Module):
    """Token embedding table ``embedding`` [V, H]; tokens [M] int -> [M, H] in ``dtype``."""

    def __init__(self, num_embeddings: int, features: int, *, std: float, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = _param(normal(std), rngs, (num_embeddings, features), param_dtype,
                                ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch-style LayerNorm: biased variance, ``eps`` inside the sqrt, statistics in float32.

    scale [H] (init 1), bias [H] (init 0); x [..., H] -> same shape in ``dtype``.
    """

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.scale = _param(jax.nn.initializers.ones, rngs, (features,), param_dtype, ("norm",))
        self.bias = _param(jax.nn.initializers.zeros, rngs, (features,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
    """GELU: exact erf form (HF "gelu") or the tanh approximation ("gelu_new", NeoX training)."""
    return jax.nn.gelu(x, approximate=approximate)


# --------------------------------------------------------------------------- loss
def chunked_cross_entropy(x: jax.Array, kernel: jax.Array, labels: jax.Array, chunk: int,
                          dtype=jnp.float32) -> jax.Array:
    """Per-token softmax cross-entropy of the output layer without materialising [B, T, V] logits.

    x: final hidden states [B·T, H] (any float dtype); kernel: the output layer [H, V];
    labels: int [B, T]; chunk: tokens of each row per chunk (``ModelConfig.loss_chunk``);
    dtype: the matmul compute dtype. Returns float32 [B, T].

    The sequence is cut into chunks of ``chunk`` positions (the last one padded); a
    ``lax.scan`` computes each chunk's float32 logits [B, chunk, V] exactly as ``Dense`` with
    ``out_dtype=float32`` does (inputs in ``dtype``, float32 accumulation), then the cross-entropy
    of ``optax.softmax_cross_entropy_with_integer_labels``. The scan body is rematerialised, so the
    backward pass recomputes one chunk's logits at a time instead of keeping all of them: peak
    logits memory is B·chunk·V floats instead of B·T·V. Same per-token arithmetic as the plain
    loss (within float32 rounding of the matmul blocking).
    """
    B, T = labels.shape
    H = x.shape[-1]
    n = -(-T // chunk)
    pad = n * chunk - T
    h = x.reshape(B, T, H)
    labels = labels.astype(jnp.int32)
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
    # [n, B, chunk, ...]: the batch axis keeps its data-parallel sharding inside every chunk
    h = jnp.swapaxes(h.reshape(B, n, chunk, H), 0, 1)
    labels = jnp.swapaxes(labels.reshape(B, n, chunk), 0, 1)
    w = kernel.astype(dtype)

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable,
                       prevent_cse=False)
    def one_chunk(hc, lc):
        logits = jnp.dot(hc.astype(dtype), w, preferred_element_type=jnp.float32).astype(jnp.float32)
        logits = with_logical_constraint(logits, ("batch", "length", "vocab"))
        return optax.softmax_cross_entropy_with_integer_labels(logits, lc)

    _, losses = jax.lax.scan(lambda c, xs: (c, one_chunk(*xs)), None, (h, labels))
    return jnp.swapaxes(losses, 0, 1).reshape(B, n * chunk)[:, :T]


# --------------------------------------------------------------------------- rotary
def rotary_cos_sin(positions: jax.Array, rotary_ndims: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables, float32 [B, T, rotary_ndims], from integer positions [B, T].

    inv_freq = 1 / base^(arange(0, rd, 2)/rd); the angle table is repeated twice along the last
    axis (rotate-half pairing: dim i pairs with dim i + rd/2), as in GPT-NeoX / HF.
    """
    # float32 exponents as torch computes them; the power evaluated accurately and rounded to
    # float32, then a float32 reciprocal: bit-identical to torch's table for most sizes (≤ 1 ulp).
    exponents = np.arange(0, rotary_ndims, 2, dtype=np.float32) / np.float32(rotary_ndims)
    powers = (np.float64(base) ** exponents.astype(np.float64)).astype(np.float32)
    inv_freq = jnp.asarray(np.float32(1.0) / powers, dtype=jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first ``cos.shape[-1]`` dims of x [B, T, N, D] (in float32); the rest pass through."""
    rd = cos.shape[-1]
    if rd == 0:
        return x
    x_rot = x[..., :rd].astype(jnp.float32)
    x_pass = x[..., rd:]
    half = rd // 2
    rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = (x_rot * cos + rotated_half * sin).astype(x.dtype)
    return jnp.concatenate([out, x_pass], axis=-1)


# --------------------------------------------------------------------------- attention
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
    eager error. Returns [B, T, N, D] in q's dtype.
    """
    logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    if mask is None:
        mask = causal_mask(jnp.arange(q.shape[1], dtype=jnp.int32), k.shape[1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnd->btnd", probs, v).astype(q.dtype)


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
