"""GPT-NeoX model: parity with Hugging Face transformers, numerics, scan/remat, attention paths,
KV-cache decoding, padding, initialisation, parameter tree and logical axes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pythia_jax import layers
from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.convert.hf import hf_state_dict_to_params
from pythia_jax.model import (
    GPTNeoX,
    KVCache,
    abstract_params,
    init_kv_cache,
    logical_axes,
    model_from_params,
    params_to_dict,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PARITY_TOL = 1e-5
# bf16 compute vs fp32 on the tiny Pythia-initialised model below; measured max-abs logit
# difference ≈ 1e-2 relative to logits of std ≈ 1 (see test_bfloat16_close_to_float32).
BF16_TOL = 0.06


def tiny(**overrides) -> ModelConfig:
    fields = dict(vocab_size=1001, hidden_size=64, num_layers=2, num_heads=4)
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_model(config: ModelConfig, seed: int = 0, perturb: float = 0.1, everything: bool = True):
    """A random fp32 eager HF GPTNeoXForCausalLM; LayerNorms and biases perturbed to be non-trivial."""
    hf_config = transformers.GPTNeoXConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(hf_config).to(torch.float32).eval()
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if everything or p.ndim == 1:
                p.add_(torch.randn_like(p) * perturb)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def to_params(config: ModelConfig, model) -> dict:
    return hf_state_dict_to_params(config, model.state_dict())


def jax_logits(config: ModelConfig, params: dict, tokens, **kwargs) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(model_from_params(config, params)(jnp.asarray(tokens, jnp.int32), **kwargs))


def random_tokens(config: ModelConfig, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, config.vocab_size, (batch, length)).astype(np.int32)


# ---------------------------------------------------------------------------- HF parity
PARITY_CASES = {
    "parallel-rot0.25": dict(),
    "sequential-rot0.25": dict(use_parallel_residual=False),
    "parallel-rot0.5": dict(rotary_pct=0.5),
    "sequential-rot1.0": dict(use_parallel_residual=False, rotary_pct=1.0),
    "parallel-rot1.0-vocab1": dict(rotary_pct=1.0, vocab_size=997),
    "head_dim80": dict(hidden_size=160, num_heads=2, vocab_size=1003),
    "tanh-gelu": dict(hidden_act="gelu_new"),
    "3-layers-odd-heads": dict(hidden_size=96, num_heads=3, num_layers=3, vocab_size=515),
}


@pytest.mark.parametrize("case", list(PARITY_CASES), ids=list(PARITY_CASES))
def test_hf_parity(case):
    config = tiny(**PARITY_CASES[case])
    hf = hf_model(config)
    tokens = random_tokens(config, 2, 19)
    ref = hf_logits(hf, tokens)
    out = jax_logits(config, to_params(config, hf), tokens)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(out - ref).max() <= PARITY_TOL, np.abs(out - ref).max()


@pytest.mark.parametrize("overrides", [dict(), dict(hidden_size=160, num_heads=2)], ids=["hd16", "hd80"])
def test_hf_parity_at_far_positions(overrides):
    """Rotary tables agree with torch's float32 ones at positions near 2048 too."""
    config = tiny(**overrides)
    hf = hf_model(config)
    tokens = random_tokens(config, 2, 9)
    positions = np.tile(2030 + np.arange(9, dtype=np.int32), (2, 1))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens, dtype=torch.long),
                 position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.numpy()
    out = jax_logits(config, to_params(config, hf), tokens, positions=jnp.asarray(positions))
    assert np.abs(out - ref).max() <= PARITY_TOL, np.abs(out - ref).max()


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("bfloat16", 0.0), ("float16", 0.0)])
def test_gelu_equals_torch(dtype, tol):
    """Exact GELU and its gradient equal ``torch.nn.functional.gelu`` (what HF "gelu" calls) over
    the whole range, including the tails where erf saturates; half types round the float32 result
    as torch's opmath does (identical or one ulp apart)."""
    torch = pytest.importorskip("torch")
    x = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(0).standard_normal(4000) * 3])
    x = x.astype(np.float32)
    tdtype = getattr(torch, dtype)
    tx = torch.tensor(x, dtype=tdtype, requires_grad=True)
    ty = torch.nn.functional.gelu(tx)
    (tg,) = torch.autograd.grad(ty.float().sum(), tx)
    jx = jnp.asarray(x, dtype=dtype)
    jy, vjp = jax.vjp(lambda a: layers.gelu(a, approximate=False), jx)
    (jg,) = vjp(jnp.ones_like(jy))
    assert jy.dtype == jnp.dtype(dtype)
    y, ref = np.asarray(jy, np.float32), ty.detach().float().numpy()
    if tol:
        assert np.abs(y - ref).max() <= tol, np.abs(y - ref).max()
        assert np.abs(np.asarray(jg, np.float32) - tg.float().numpy()).max() <= tol
    else:  # half types: at most one ulp of the type apart
        mantissa, smallest = (10, 2.0 ** -24) if dtype == "float16" else (7, 2.0 ** -133)
        magnitude = np.maximum(np.maximum(np.abs(ref), np.abs(y)), 1e-38)
        ulp = np.maximum(2.0 ** (np.floor(np.log2(magnitude)) - mantissa), smallest)
        # below x ≈ -5 both evaluate 1 + erf(x/√2) in float32, where it is a multiple of 6e-8:
        # GELU there is below 1e-6 in magnitude and both are off the exact value by up to 5e-7
        ulp = np.maximum(ulp, 1e-6)
        assert (np.abs(y - ref) <= ulp).all(), np.abs(y - ref).max()
        assert np.mean(y == ref) > 0.9  # most identical (jax.nn.gelu's erfc form: 56% in bfloat16)


def test_tanh_gelu_differs_from_exact():
    """The two GELU forms are genuinely different models (guards against a silent fallback)."""
    config = tiny(hidden_act="gelu_new")
    hf = hf_model(config)
    tokens = random_tokens(config, 1, 8)
    params = to_params(config, hf)
    exact = jax_logits(config.replace(hidden_act="gelu"), params, tokens)
    tanh = jax_logits(config, params, tokens)
    assert np.abs(exact - tanh).max() > 10 * PARITY_TOL


def test_hf_parity_pythia_70m_shape():
    config = ModelConfig.preset("pythia-70m")
    hf = hf_model(config, perturb=0.05, everything=False)
    tokens = random_tokens(config, 1, 32)
    ref = hf_logits(hf, tokens)
    out = jax_logits(config, to_params(config, hf), tokens)
    assert out.shape == (1, 32, 50304)
    assert np.abs(out - ref).max() <= PARITY_TOL, np.abs(out - ref).max()


# ---------------------------------------------------------------------------- numerics
@pytest.fixture(scope="module")
def init_model():
    config = tiny(num_layers=3)
    model = GPTNeoX(config, rngs=nnx.Rngs(1))
    return config, params_to_dict(model)


def test_bfloat16_close_to_float32(init_model):
    config, params = init_model
    tokens = random_tokens(config, 2, 24, seed=3)
    ref = jax_logits(config, params, tokens)
    out = jax_logits(config.replace(dtype="bfloat16"), params, tokens)
    assert out.dtype == np.float32
    diff = np.abs(out - ref).max()
    print(f"bf16 vs fp32 max-abs logit diff {diff:.4g} (logit std {ref.std():.3g})")
    assert 0 < diff <= BF16_TOL
    # bf16 parameters too
    out_p = jax_logits(config.replace(dtype="bfloat16", param_dtype="bfloat16"), params, tokens)
    assert np.abs(out_p - ref).max() <= BF16_TOL


def _loss_and_grads(config, params, tokens):
    def loss_fn(p):
        logits = model_from_params(config, p)(tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.fixture(scope="module")
def reference_grads(init_model):
    config, params = init_model
    tokens = jnp.asarray(random_tokens(config, 2, 12, seed=4))
    return (tokens, *_loss_and_grads(config, params, tokens))


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat="full"),
                                     dict(remat="dots_saveable"),
                                     dict(remat="dots_with_no_batch_dims_saveable")])
def test_scan_and_remat_variants_match(init_model, reference_grads, variant):
    config, params = init_model
    tokens, ref_loss, ref_grads = reference_grads
    loss, grads = _loss_and_grads(config.replace(**variant), params, tokens)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads, ref_grads))
    assert max(diffs) <= 1e-6
    np.testing.assert_allclose(jax_logits(config.replace(**variant), params, tokens),
                               jax_logits(config, params, tokens), atol=1e-5, rtol=0)


def _hlo(config: ModelConfig) -> str:
    abstract = abstract_params(config)
    tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    return jax.jit(lambda p, t: model_from_params(config, p)(t)).lower(abstract, tokens).as_text()


def test_compiled_program_does_not_grow_with_depth():
    hlo = {L: _hlo(tiny(num_layers=L)) for L in (2, 8)}
    count = lambda text, op: len(re.findall(op, text))
    for op in (r"stablehlo\.while", r"stablehlo\.dot_general", r"stablehlo\.exponential"):
        assert count(hlo[2], op) == count(hlo[8], op), op
    assert count(hlo[2], r"stablehlo\.while") >= 1
    assert abs(len(hlo[2]) - len(hlo[8])) < 0.01 * len(hlo[2])
    # the unrolled variant does grow, so the check above can fail
    unrolled = {L: _hlo(tiny(num_layers=L, scan_layers=False)) for L in (2, 8)}
    assert count(unrolled[8], r"stablehlo\.dot_general") > count(unrolled[2], r"stablehlo\.dot_general")


# ---------------------------------------------------------------------------- attention paths
def test_attention_impls_agree_in_model(init_model):
    config, params = init_model
    tokens = random_tokens(config, 2, 16, seed=5)
    ref = jax_logits(config.replace(attention="reference"), params, tokens)
    for impl in ("xla", "auto", "splash"):  # splash runs in Pallas interpret mode off TPU
        out = jax_logits(config.replace(attention=impl), params, tokens)
        assert np.abs(out - ref).max() <= 1e-5, impl
    if jax.default_backend() == "gpu":
        for dtype in ("bfloat16",):
            ref16 = jax_logits(config.replace(attention="reference", dtype=dtype), params, tokens)
            out16 = jax_logits(config.replace(attention="cudnn", dtype=dtype), params, tokens)
            assert np.abs(out16 - ref16).max() <= BF16_TOL


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2), ("float16", 4e-3)])
def test_attention_kernels_agree(dtype, tol):
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(2, 136, 3, 16), dtype) for _ in range(3))
    ref = np.asarray(layers.reference_attention(q, k, v, None, 0.25), np.float32)
    mask = layers.causal_mask(jnp.arange(136), 136, jnp.ones((2, 136), bool))
    outs = {
        "xla": layers.dot_product_attention(q, k, v, mask=None, impl="xla"),
        "xla-masked": layers.dot_product_attention(q, k, v, mask=mask, impl="xla"),
        "splash": layers.dot_product_attention(q, k, v, mask=None, impl="splash"),
        "cached": layers.cached_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask),
    }
    if jax.default_backend() == "gpu" and dtype == "bfloat16":
        outs["cudnn"] = layers.dot_product_attention(q, k, v, mask=None, impl="cudnn")
    for name, out in outs.items():
        assert out.dtype == q.dtype, name
        assert np.abs(np.asarray(out, np.float32) - ref).max() <= tol, name


@pytest.mark.parametrize("length", [100, 520])
def test_blocked_causal_attention_equals_full_square(length):
    """The blocked causal path (XLA attention without a mask, T ≥ 64) gives the full square's
    outputs and gradients: the same as the plain masked computation and as the float32 reference,
    including a last block shorter than the others (100 = 3 × 32 + 4, 520 = 4 × 128 + 8; the
    kernels test above covers even blocks)."""
    block = layers.attention.causal_block_size(length)
    assert block > 0
    rng = np.random.RandomState(length)
    q, k, v, g = (jnp.asarray(rng.randn(2, length, 3, 16), jnp.float32) for _ in range(4))
    full_mask = layers.causal_mask(jnp.arange(length), length)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * g)

    blocked = lambda q, k, v: layers.xla_attention(q, k, v, None, 0.25)  # noqa: E731
    full = lambda q, k, v: layers.xla_attention(q, k, v, full_mask, 0.25)  # noqa: E731
    ref = lambda q, k, v: layers.reference_attention(q, k, v, None, 0.25)  # noqa: E731
    n_blocks = -(-length // block)  # two products per block, none above the diagonal
    hlo = jax.jit(blocked).lower(q, k, v).as_text()
    assert hlo.count("stablehlo.dot_general") == 2 * n_blocks
    with jax.default_matmul_precision("highest"):
        out, grads = jax.jit(jax.value_and_grad(loss(blocked), argnums=(0, 1, 2)))(q, k, v)
        for other in (full, ref):
            out2, grads2 = jax.jit(jax.value_and_grad(loss(other), argnums=(0, 1, 2)))(q, k, v)
            assert abs(float(out) - float(out2)) <= 1e-3
            for a, b in zip(grads, grads2):
                assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5
        assert np.abs(np.asarray(jax.jit(blocked)(q, k, v)) - np.asarray(ref(q, k, v))).max() <= 1e-5


def test_causal_block_size():
    assert [layers.attention.causal_block_size(t) for t in (8, 63, 64, 128, 256, 1024, 2048)] == \
        [0, 0, 32, 32, 64, 128, 128]


def test_hf_parity_at_blocked_length():
    """Sequences long enough for the blocked causal path (here 3 blocks of 32) match HF too."""
    config = tiny()
    hf = hf_model(config)
    tokens = random_tokens(config, 2, 96, seed=3)
    out = jax_logits(config, to_params(config, hf), tokens)
    assert np.abs(out - hf_logits(hf, tokens)).max() <= PARITY_TOL


def test_resolve_attention_impl_on_cpu():
    q = jnp.zeros((1, 128, 2, 16), jnp.bfloat16)
    if jax.default_backend() == "cpu":
        assert layers.resolve_attention_impl("auto", q, masked=False) == "xla"
    assert layers.resolve_attention_impl("cudnn", q, masked=True) == "xla"
    assert layers.resolve_attention_impl("reference", q, masked=True) == "reference"


# ---------------------------------------------------------------------------- every dtype on CPU
DTYPES = ("float32", "bfloat16", "float16")
# max-abs logit difference to float32 allowed when a 16-bit type is involved (compute or
# parameters); measured on the tiny model below: bf16 ≈ 1.4e-2, fp16 ≈ 1.8e-3 (fp16 keeps 3 more
# mantissa bits than bf16), with logits of std ≈ 1
DTYPE_TOL = {"float32": 1e-5, "bfloat16": BF16_TOL, "float16": 8e-3}


@pytest.fixture(scope="module")
def small_model():
    config = ModelConfig(vocab_size=128, hidden_size=64, num_layers=1, num_heads=2)
    params = params_to_dict(GPTNeoX(config, rngs=nnx.Rngs(2)))
    tokens = jnp.asarray(random_tokens(config, 2, 12, seed=8))
    return config, params, tokens, jax_logits(config, params, tokens)


@pytest.mark.parametrize("impl", ["xla", "reference", "auto", "splash"])
def test_every_dtype_combination_runs_close_to_float32(small_model, impl):
    """Every compute dtype × parameter dtype gives finite float32 logits close to the float32
    model, with every attention path that runs on this backend (float16 used to fail on CPU with
    XLA's "precision 'F16_F16_F32' is not supported by dot_general")."""
    config, params, tokens, ref = small_model
    combos = [(d, p) for d in DTYPES for p in DTYPES]
    if impl == "splash":  # Pallas interpret mode off TPU: slow, so the compute dtypes only
        combos = [(d, "float32") for d in DTYPES]
    for dtype, param_dtype in combos:
        cfg = config.replace(dtype=dtype, param_dtype=param_dtype, attention=impl)
        out = jax_logits(cfg, params, tokens)
        tol = max(DTYPE_TOL[dtype], DTYPE_TOL[param_dtype])
        assert out.dtype == np.float32 and np.isfinite(out).all(), (dtype, param_dtype)
        assert np.abs(out - ref).max() <= tol, (dtype, param_dtype, float(np.abs(out - ref).max()))


@pytest.mark.parametrize("dtype,param_dtype", [("float16", "float16"), ("float16", "float32"),
                                               ("bfloat16", "bfloat16")])
def test_kv_cache_decoding_in_16_bit(small_model, dtype, param_dtype):
    """The KV-cache path (cache in the compute dtype) runs in float16/bfloat16, agrees with the
    full forward pass of the same model and stays close to float32."""
    config, params, tokens, ref = small_model
    cfg = config.replace(dtype=dtype, param_dtype=param_dtype)
    model = model_from_params(cfg, params)
    full = np.asarray(model(tokens))
    step = jax.jit(lambda m, t, c: m(t, cache=c))
    cache = init_kv_cache(cfg, batch=2, max_len=16, dtype=jnp.dtype(dtype))
    logits, cache = step(model, tokens[:, :7], cache)
    pieces = [np.asarray(logits)]
    for t in range(7, tokens.shape[1]):
        logits, cache = step(model, tokens[:, t:t + 1], cache)
        pieces.append(np.asarray(logits))
    decoded = np.concatenate(pieces, axis=1)
    assert decoded.dtype == np.float32 and np.isfinite(decoded).all()
    tol = max(DTYPE_TOL[dtype], DTYPE_TOL[param_dtype])
    assert np.abs(decoded - full).max() <= tol
    assert np.abs(decoded - ref).max() <= tol


def test_load_in_float16(small_model, tmp_path):
    """``pythia_jax.load(dir, dtype="float16")`` runs (it used to fail like init in float16)."""
    import pythia_jax

    config, params, tokens, ref = small_model
    pythia_jax.save_hf(model_from_params(config, params), tmp_path / "hf", dtype="float32")
    out = np.asarray(pythia_jax.load(tmp_path / "hf", dtype="float16")(tokens))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.abs(out - ref).max() <= DTYPE_TOL["float16"]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs on GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cudnn_attention_refused_off_gpu(small_model, dtype):
    config, params, tokens, _ = small_model
    model = model_from_params(config.replace(attention="cudnn", dtype=dtype), params)
    with pytest.raises(ConfigError, match=r"attention='cudnn' needs a GPU.*use attention='auto'"):
        model(tokens)


def test_cudnn_attention_requirements():
    """What cuDNN flash attention needs, checked without a GPU (the backend is passed in)."""
    layers.check_attention_supported("cudnn", "bfloat16", 64, backend="gpu")
    layers.check_attention_supported("cudnn", "float16", 256, backend="gpu")
    with pytest.raises(ConfigError, match="needs dtype bfloat16 or float16, got float32"):
        layers.check_attention_supported("cudnn", "float32", 64, backend="gpu")
    with pytest.raises(ConfigError, match="head_dim a multiple of 8 and at most 256, got 20"):
        layers.check_attention_supported("cudnn", "bfloat16", 20, backend="gpu")
    with pytest.raises(ConfigError, match="needs a GPU.*'tpu'"):
        layers.check_attention_supported("cudnn", "bfloat16", 64, backend="tpu")
    for impl in ("auto", "xla", "reference", "splash"):
        for backend in ("cpu", "gpu", "tpu"):
            for dtype in DTYPES:
                layers.check_attention_supported(impl, dtype, 20, backend=backend)


# ---------------------------------------------------------------------------- KV cache, padding
@pytest.mark.parametrize("variant", [dict(), dict(scan_layers=False, remat="full")],
                         ids=["scan", "unrolled-remat"])
def test_kv_cache_decoding_matches_full_forward(init_model, variant):
    config, params = init_model
    config = config.replace(**variant)
    model = model_from_params(config, params)
    tokens = jnp.asarray(random_tokens(config, 2, 9, seed=6))
    with jax.default_matmul_precision("highest"):
        full = np.asarray(model(tokens))
        step = jax.jit(lambda m, t, c: m(t, cache=c))
        cache = init_kv_cache(config, batch=2, max_len=16)
        logits, cache = step(model, tokens[:, :5], cache)  # prefill
        pieces = [np.asarray(logits)]
        for t in range(5, 9):
            logits, cache = step(model, tokens[:, t:t + 1], cache)
            pieces.append(np.asarray(logits))
    assert isinstance(cache, KVCache) and int(cache.index) == 9
    assert cache.k.shape == (config.num_layers, 2, config.num_heads, 16, config.head_dim)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)


def test_decoding_past_the_cache_is_refused_or_nan(init_model):
    """New tokens that do not fit the cache were written at a clamped slot, overwriting the last
    ones, and every later logit was silently wrong: refused outside jit (the index is concrete),
    NaN inside jit (where nothing can raise)."""
    from pythia_jax.errors import DataError

    config, params = init_model
    model = model_from_params(config, params)
    tokens = jnp.asarray(random_tokens(config, 2, 6, seed=6))
    cache = init_kv_cache(config, batch=2, max_len=5)
    _, full = model(tokens[:, :5], cache=cache)
    with pytest.raises(DataError, match="1 new tokens at slot 5 do not fit the KV cache of max_len 5"):
        model(tokens[:, 5:], cache=full)
    with pytest.raises(DataError, match="6 new tokens at slot 0 do not fit"):
        model(tokens, cache=cache)
    with pytest.raises(DataError, match="the KV cache holds 2 rows but tokens have 1"):
        model(tokens[:1, :1], cache=cache)
    step = jax.jit(lambda m, t, c: m(t, cache=c))
    assert np.isnan(np.asarray(step(model, tokens[:, 5:], full)[0])).all()
    assert np.isfinite(np.asarray(step(model, tokens[:, :1], cache)[0])).all()


def test_malformed_token_input_is_one_line_error(init_model):
    """Shapes and dtypes a forward cannot take are refused by name (they raised ZeroDivisionError,
    unpacking or einsum errors from inside the model); lists and numpy arrays are read as arrays."""
    from pythia_jax.errors import DataError

    config, params = init_model
    model = model_from_params(config, params)
    for bad, message in ((jnp.zeros((0, 8), jnp.int32), r"shape \(0, 8\)"), (jnp.zeros((2, 0), jnp.int32), r"\(2, 0\)"),
                         (jnp.zeros((8,), jnp.int32), r"shape \(8,\); expected int \[batch, seq\]"),
                         (jnp.zeros((2, 3), bool), "dtype bool; expected integer token ids"),
                         (jnp.zeros((2, 3), jnp.float32), "dtype float32")):
        with pytest.raises(DataError, match=message):
            model(bad)
        with pytest.raises(DataError, match=message):
            model.hidden_states(bad)
    ids = [[1, 2, 3], [4, 5, 6]]
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model(jnp.asarray(ids, jnp.int32))))
    np.testing.assert_array_equal(np.asarray(model(np.asarray(ids))), np.asarray(model(jnp.asarray(ids, jnp.int32))))


def _full_cache_copies(config: ModelConfig) -> list[str]:
    """Instructions of a compiled decoding step (cache donated) that copy or transpose a whole
    [L, B, ·, ·, D] cache buffer instead of updating it in place."""
    model = GPTNeoX(config, rngs=nnx.Rngs(0))
    cache = init_kv_cache(config, batch=3, max_len=40)
    step = jax.jit(lambda m, t, c: m(t, cache=c), donate_argnums=2)
    hlo = step.lower(model, jnp.ones((3, 1), jnp.int32), cache).compile().as_text()
    shape = "f32[" + ",".join(map(str, cache.k.shape)) + "]"
    op = re.compile(r"=\s*" + re.escape(shape) + r"\{[^}]*\}\s+(copy|transpose)\(|"
                    + re.escape(shape) + r"\{[^}]*\}\s+fusion\(.*calls=%\S*(copy|transpose)")
    return [line.strip()[:160] for line in hlo.splitlines() if op.search(line)]


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_decoding_step_updates_the_cache_in_place(scan_layers):
    """A decoding step writes only the new slots: no copy of the whole cache per layer (which
    made a step cost grow steeply with the cache length)."""
    assert _full_cache_copies(tiny(num_layers=3, scan_layers=scan_layers)) == []


def test_left_padding_with_key_mask(init_model):
    config, params = init_model
    model = model_from_params(config, params)
    rng = np.random.RandomState(7)
    lengths = [7, 4]
    T = max(lengths)
    rows = [rng.randint(2, config.vocab_size, n).astype(np.int32) for n in lengths]
    padded = np.ones((2, T), np.int32)  # pad id 1
    key_mask = np.zeros((2, T), bool)
    for i, row in enumerate(rows):
        padded[i, T - len(row):] = row
        key_mask[i, T - len(row):] = True
    positions = np.maximum(np.cumsum(key_mask, axis=1) - 1, 0).astype(np.int32)
    with jax.default_matmul_precision("highest"):
        out = np.asarray(model(jnp.asarray(padded), positions=jnp.asarray(positions),
                               key_mask=jnp.asarray(key_mask)))
        # left-padded prefill into a cache, then one decoding step
        cache = init_kv_cache(config, 2, T + 1)
        pre, cache = model(jnp.asarray(padded), positions=jnp.asarray(positions),
                           key_mask=jnp.asarray(key_mask), cache=cache)
        nxt = np.array([[5], [6]], np.int32)
        dec, cache = model(jnp.asarray(nxt), positions=jnp.asarray(positions[:, -1:] + 1), cache=cache)
        for i, row in enumerate(rows):
            alone = np.asarray(model(jnp.asarray(row[None])))[0]
            np.testing.assert_allclose(out[i, T - len(row):], alone, atol=1e-5, rtol=0)
            np.testing.assert_allclose(np.asarray(pre)[i, T - len(row):], alone, atol=1e-5, rtol=0)
            extended = np.asarray(model(jnp.asarray(np.append(row, nxt[i])[None])))[0, -1]
            np.testing.assert_allclose(np.asarray(dec)[i, 0], extended, atol=1e-5, rtol=0)
    assert np.isfinite(out).all()


# ---------------------------------------------------------------------------- init, tree, axes
@pytest.mark.parametrize("methods", [("small_init", "wang_init"), ("normal", "scaled_normal")])
def test_init_statistics(methods):
    config = ModelConfig(vocab_size=3000, hidden_size=256, num_layers=4, num_heads=4,
                         init_method=methods[0], output_init_method=methods[1])
    params = params_to_dict(GPTNeoX(config, rngs=nnx.Rngs(0)))
    input_std, output_std = config.input_init_std, config.output_init_std
    expected_std = {
        "embed_in/embedding": input_std, "embed_out/kernel": input_std,
        "layers/attention/query_key_value/kernel": input_std,
        "layers/mlp/dense_h_to_4h/kernel": input_std,
        "layers/attention/dense/kernel": output_std, "layers/mlp/dense_4h_to_h/kernel": output_std,
    }
    flat = {"/".join(k): np.asarray(v) for k, v in _flat_items(params)}
    for key, value in flat.items():
        assert value.dtype == np.float32
        if key in expected_std:
            assert abs(value.std() / expected_std[key] - 1) < 0.03, (key, value.std())
            assert abs(value.mean()) < 0.05 * expected_std[key], key
        elif key.endswith("scale"):
            assert (value == 1).all(), key
        else:
            assert key.endswith("bias") and (value == 0).all(), key
    assert set(flat) - set(expected_std) == {
        k for k in flat if k.endswith(("bias", "scale"))}
    # every layer gets its own draw
    qkv = flat["layers/attention/query_key_value/kernel"]
    assert not np.allclose(qkv[0], qkv[1])


def _flat_items(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat_items(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_param_tree_shapes_and_logical_axes():
    config = tiny(hidden_size=48, num_heads=3, num_layers=3, intermediate_size=100)
    L, H, F, V = 3, 48, 100, 1001
    expected = {
        ("embed_in", "embedding"): ((V, H), ("vocab", "embed")),
        ("layers", "input_layernorm", "scale"): ((L, H), ("layers", "norm")),
        ("layers", "input_layernorm", "bias"): ((L, H), ("layers", "norm")),
        ("layers", "post_attention_layernorm", "scale"): ((L, H), ("layers", "norm")),
        ("layers", "post_attention_layernorm", "bias"): ((L, H), ("layers", "norm")),
        ("layers", "attention", "query_key_value", "kernel"): ((L, H, 3 * H), ("layers", "embed", "heads")),
        ("layers", "attention", "query_key_value", "bias"): ((L, 3 * H), ("layers", "heads")),
        ("layers", "attention", "dense", "kernel"): ((L, H, H), ("layers", "heads", "embed")),
        ("layers", "attention", "dense", "bias"): ((L, H), ("layers", "embed")),
        ("layers", "mlp", "dense_h_to_4h", "kernel"): ((L, H, F), ("layers", "embed", "mlp")),
        ("layers", "mlp", "dense_h_to_4h", "bias"): ((L, F), ("layers", "mlp")),
        ("layers", "mlp", "dense_4h_to_h", "kernel"): ((L, F, H), ("layers", "mlp", "embed")),
        ("layers", "mlp", "dense_4h_to_h", "bias"): ((L, H), ("layers", "embed")),
        ("final_layer_norm", "scale"): ((H,), ("norm",)),
        ("final_layer_norm", "bias"): ((H,), ("norm",)),
        ("embed_out", "kernel"): ((H, V), ("embed", "vocab")),
    }
    model = GPTNeoX(config, rngs=nnx.Rngs(0))
    params = dict(_flat_items(params_to_dict(model)))
    shapes = dict(_flat_items(abstract_params(config)))
    names = {k: v for k, v in _flat_items(logical_axes(config))}
    assert set(params) == set(shapes) == set(names) == set(expected)
    for key, (shape, axes) in expected.items():
        assert params[key].shape == shape and shapes[key].shape == shape, key
        assert names[key] == axes, key
        assert len(axes) == len(shape)
    # the same names are on the NNX variables as metadata
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert tuple(var.get_metadata()["out_sharding"]) == expected[tuple(map(str, path))][1]


def test_abstract_params_of_big_preset_costs_no_memory():
    shapes = abstract_params(ModelConfig.preset("pythia-12b"))
    assert isinstance(shapes["embed_out"]["kernel"], jax.ShapeDtypeStruct)
    assert shapes["embed_out"]["kernel"].shape == (5120, 50688)


def test_model_from_params_rejects_bad_trees(init_model):
    config, params = init_model
    broken = jax.tree.map(lambda a: a, params)
    del broken["final_layer_norm"]["bias"]
    with pytest.raises(ConfigError, match="final_layer_norm/bias"):
        model_from_params(config, broken)
    wrong = jax.tree.map(lambda a: a, params)
    wrong["embed_out"]["kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ConfigError, match="embed_out/kernel"):
        model_from_params(config, wrong)


def test_model_from_params_inside_jit(init_model):
    config, params = init_model
    tokens = jnp.asarray(random_tokens(config, 1, 6))
    eager = model_from_params(config, params)(tokens)
    jitted = jax.jit(lambda p, t: model_from_params(config, p)(t))(params, tokens)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)
    graphdef, state = nnx.split(model_from_params(config, params), nnx.Param)
    merged = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(eager), atol=1e-5)


def test_logical_to_mesh_spec():
    P = jax.sharding.PartitionSpec
    rules = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
             ("vocab", "tensor"), ("length", None)]
    assert layers.logical_to_mesh_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp"), None, None)
    assert layers.logical_to_mesh_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert layers.logical_to_mesh_spec((("batch", "length"), "heads"), rules) == P(("data", "fsdp"), "tensor")
    assert layers.logical_to_mesh_spec(("layers", "kv"), rules) == P(None, None)
    x = jnp.ones((2, 3))
    assert layers.with_logical_constraint(x, ("batch", "embed")) is x  # no rules, no mesh: no-op


SHARDED_SCRIPT = textwrap.dedent(r"""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from pythia_jax.config import ModelConfig
    from pythia_jax.model import GPTNeoX, params_to_dict, model_from_params, logical_axes
    from pythia_jax.layers import logical_to_mesh_spec
    cfg = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4)
    params = params_to_dict(GPTNeoX(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (4, 128)), jnp.int32)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(model_from_params(cfg, params)(tokens))
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"),
             ("mlp", "tensor"), ("vocab", "tensor")]
    names = logical_axes(cfg)
    plain = jax.jit(lambda p, t: model_from_params(cfg, p)(t)).lower(params, tokens).as_text()
    assert "sharding_constraint" not in plain  # no rules, no mesh: constraints are no-ops
    for impl in ("xla", "splash"):
        c = cfg.replace(attention=impl)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), jax.default_matmul_precision("highest"):
            shard = jax.tree.map(lambda n: jax.sharding.NamedSharding(mesh, logical_to_mesh_spec(n, rules)),
                                 names, is_leaf=lambda x: isinstance(x, tuple))
            p = jax.device_put(params, shard)
            f = jax.jit(lambda p, t: model_from_params(c, p)(t))
            hlo = f.lower(p, tokens).as_text()
            out = f(p, tokens)
        # activation constraints by logical name: batch on (data, fsdp), heads on tensor
        assert re.search(r'sdy.sharding_constraint .*\[\{"data", "fsdp"\}, \{\}, \{"tensor"\}, \{\}\]', hlo)
        assert hlo.count("sdy.sharding_constraint") >= 6
        d = float(np.abs(np.asarray(out) - ref).max())
        print(impl, d)
        assert d < 1e-5, (impl, d)
    print("OK")
""")


def test_sharded_forward_with_logical_rules_matches_single_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]


def test_every_configurable_remat_policy_has_an_implementation():
    """config.REMAT_POLICIES (validation) and the model's policy table must name the same policies."""
    from pythia_jax import config as config_module
    from pythia_jax import model as model_module

    assert set(config_module.REMAT_POLICIES) == {"none"} | set(model_module._REMAT_POLICIES)
