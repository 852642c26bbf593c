"""The Pythia LR schedule (value by value) and the AdamW chain against a NumPy/torch-semantics reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pythia_jax.train import optimizer as opt

MAX, MIN, WARM, TOTAL = 1.0e-3, 1.0e-4, 1430, 143000


def facts_formula(n: int) -> float:
    """PYTHIA_FACTS §5 written out independently: warmup max·n/1430 for n <= 1430, then
    max/2·(1 + cos(π·(min(n, 143000−1430) − 1430)/143000)) floored at min."""
    if n <= WARM:
        return MAX * n / WARM
    m = min(n, TOTAL - WARM) - WARM
    return max(MAX / 2 * (1 + math.cos(math.pi * m / TOTAL)), MIN)


STEPS = [0, 1, 2, 715, 1429, 1430, 1431, 1432, 10000, 50000, 71500, 100000, 115138, 115139, 115140,
         141569, 141570, 141571, 142999, 143000, 150000]


@pytest.mark.parametrize("n", STEPS)
def test_schedule_matches_formula(n):
    sched = opt.neox_lr_schedule(MAX, MIN, WARM, TOTAL)
    want = facts_formula(n)
    assert opt.neox_lr(n, MAX, MIN, WARM, TOTAL) == pytest.approx(want, rel=1e-12, abs=0)
    got = float(sched(jnp.int32(n)))
    assert got == pytest.approx(want, rel=2e-6, abs=0), (n, got, want)


def test_schedule_landmarks():
    sched = jax.jit(opt.neox_lr_schedule(MAX, MIN, WARM, TOTAL))
    assert float(sched(0)) == 0.0  # the very first update does not move the weights
    assert float(sched(1430)) == pytest.approx(MAX, rel=1e-7)
    assert float(sched(5000)) < MAX
    assert float(sched(115138)) > MIN  # still decaying
    assert float(sched(115139)) == pytest.approx(MIN, rel=1e-7)  # first step on the floor
    vals = np.asarray(jax.vmap(sched)(jnp.arange(0, 143001)))
    ref = np.array([facts_formula(n) for n in range(0, 143001)])
    np.testing.assert_allclose(vals, ref, rtol=2e-6, atol=1e-12)
    after = vals[WARM + 1:]
    assert WARM + 1 + int(np.argmax(np.isclose(after, MIN, rtol=1e-7, atol=0))) == 115139


def _params(rng):
    return {
        "embed_in": {"embedding": rng.normal(size=(11, 4)).astype(np.float32)},
        "layers": {"attention": {"dense": {"kernel": rng.normal(size=(2, 4, 4)).astype(np.float32),
                                           "bias": rng.normal(size=(2, 4)).astype(np.float32)}},
                   "input_layernorm": {"scale": 1 + 0.1 * rng.normal(size=(2, 4)).astype(np.float32),
                                       "bias": rng.normal(size=(2, 4)).astype(np.float32)}},
        "embed_out": {"kernel": rng.normal(size=(4, 11)).astype(np.float32)},
    }


def test_weight_decay_mask():
    mask = opt.weight_decay_mask(_params(np.random.default_rng(0)))
    assert mask["embed_in"]["embedding"] and mask["embed_out"]["kernel"]
    assert mask["layers"]["attention"]["dense"]["kernel"]
    assert not mask["layers"]["attention"]["dense"]["bias"]
    assert not mask["layers"]["input_layernorm"]["scale"] and not mask["layers"]["input_layernorm"]["bias"]


def _reference_adamw(params, grads_seq, lrs, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=1.0):
    """torch.optim.AdamW + clip_grad_norm_ arithmetic in float64 NumPy."""
    flat, tree = jax.tree.flatten(params)
    mask = jax.tree.leaves(opt.weight_decay_mask(params))
    p = [x.astype(np.float64) for x in flat]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
        g = [x.astype(np.float64) for x in jax.tree.leaves(grads)]
        norm = math.sqrt(sum(float((x ** 2).sum()) for x in g))
        coef = min(1.0, clip / (norm + 1e-6))
        g = [x * coef for x in g]
        for i in range(len(p)):
            if mask[i]:
                p[i] = p[i] * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            mhat = m[i] / (1 - b1 ** t)
            vhat = v[i] / (1 - b2 ** t)
            p[i] = p[i] - lr * mhat / (np.sqrt(vhat) + eps)
    return jax.tree.unflatten(tree, p)


def test_adamw_chain_matches_reference():
    rng = np.random.default_rng(1)
    params = _params(rng)
    warm, total = 3, 20
    tx = opt.build_optimizer(max_lr=1e-2, warmup_steps=warm, total_steps=total)
    sched = opt.neox_lr_schedule(1e-2, 1e-3, warm, total)
    grads_seq = [jax.tree.map(lambda x: (rng.normal(size=x.shape) * s).astype(np.float32), params)
                 for s in (0.1, 5.0, 0.3, 2.0, 0.01, 1.0)]  # some steps clip, some don't
    state = tx.init(params)
    p = jax.tree.map(jnp.asarray, params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for g in grads_seq:
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
    lrs = [float(sched(k)) for k in range(len(grads_seq))]
    assert lrs[0] == 0.0
    ref = _reference_adamw(params, grads_seq, lrs)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)
    assert int(opt.schedule_count(state)) == len(grads_seq)


def test_first_update_keeps_weights():
    params = _params(np.random.default_rng(2))
    tx = opt.build_optimizer(max_lr=1e-3)
    g = jax.tree.map(jnp.ones_like, params)
    u, state = tx.update(g, tx.init(params), params)
    new = optax.apply_updates(params, u)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    mu, nu, count = opt.adam_moments(state)
    assert int(count) == 1 and float(jnp.abs(mu["embed_out"]["kernel"]).sum()) > 0  # moments moved


def test_adam_moments_round_trip():
    params = _params(np.random.default_rng(3))
    tx = opt.build_optimizer(max_lr=1e-3, warmup_steps=10, total_steps=100)
    state = tx.init(params)
    mu = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, jnp.float32), params)
    nu = jax.tree.map(lambda x: jnp.full(x.shape, 0.25, jnp.float32), params)
    new = opt.with_adam_moments(state, mu, nu, 7)
    mu2, nu2, count = opt.adam_moments(new)
    assert int(count) == 7 and int(opt.schedule_count(new)) == 7
    assert float(mu2["layers"]["attention"]["dense"]["kernel"][0, 0, 0]) == 0.5
    assert float(nu2["embed_in"]["embedding"][0, 0]) == 0.25
    assert jax.tree.structure(new) == jax.tree.structure(state)
    bad = dict(mu, embed_in={"embedding": jnp.zeros((3, 4))})
    with pytest.raises(ValueError, match="shape mismatch"):
        opt.with_adam_moments(state, bad, nu, 1)


def test_dynamic_loss_scale():
    ls = opt.DynamicLossScale(initial_scale=16.0, window=3, hysteresis=2, min_scale=1.0)
    s = ls.init()
    s = ls.update(s, jnp.bool_(False))  # first overflow: spend hysteresis, keep scale
    assert float(s.scale) == 16.0 and int(s.hysteresis) == 1
    s = ls.update(s, jnp.bool_(False))  # second: halve
    assert float(s.scale) == 8.0
    for _ in range(2):
        s = ls.update(s, jnp.bool_(True))
    assert float(s.scale) == 8.0
    s = ls.update(s, jnp.bool_(True))  # third finite step in a row: double, restore hysteresis
    assert float(s.scale) == 16.0 and int(s.hysteresis) == 2 and int(s.good_steps) == 0
    low = opt.LossScaleState(jnp.float32(1.0), jnp.int32(0), jnp.int32(1))
    assert float(ls.update(low, jnp.bool_(False)).scale) == 1.0  # never below min_scale


def test_row_parallel_bias_copies_scale_only_those_updates():
    """GPT-NeoX TP copies of attention.dense.bias / mlp.dense_4h_to_h.bias: their updates (and only
    theirs) are multiplied by the number of copies; the optimizer state keeps one structure."""
    from pythia_jax.config import ModelConfig
    from pythia_jax.model import abstract_params

    config = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), abstract_params(config))
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    one, four = opt.build_optimizer(warmup_steps=0, total_steps=10), \
        opt.build_optimizer(warmup_steps=0, total_steps=10, row_parallel_bias_copies=4)
    s1, s4 = one.init(params), four.init(params)
    assert jax.tree.structure(s1) == jax.tree.structure(s4)
    u1, _ = one.update(grads, s1, params)
    u4, _ = four.update(grads, s4, params)
    scaled = []
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(u1), jax.tree.leaves(u4)):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        factor = 4 if name.endswith(("attention/dense/bias", "mlp/dense_4h_to_h/bias")) else 1
        np.testing.assert_allclose(np.asarray(b), factor * np.asarray(a), rtol=1e-6, err_msg=name)
        scaled += [name] if factor == 4 else []
    assert scaled == ["layers/attention/dense/bias", "layers/mlp/dense_4h_to_h/bias"]
    with pytest.raises(ValueError, match=">= 1"):
        opt.scale_row_parallel_biases(0)


def test_row_parallel_bias_copies_need_the_parallel_residual():
    from pythia_jax.config import ConfigError, ModelConfig
    from pythia_jax.train.config import OptimizerConfig, TrainConfig

    model = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, use_parallel_residual=False)
    with pytest.raises(ConfigError, match="parallel residual"):
        TrainConfig(model=model, optimizer=OptimizerConfig(row_parallel_bias_copies=2)).validate()
    TrainConfig(model=model.replace(use_parallel_residual=True),
                optimizer=OptimizerConfig(row_parallel_bias_copies=2)).validate()
