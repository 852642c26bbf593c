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
    """Pythia's schedule (paper, appendix E) written out independently: warmup max·n/1430 for n <= 1430, then
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


# --------------------------------------------------------------- GPT-NeoX v1.0 AnnealingLR, any run
class AnnealingLR:
    """GPT-NeoX v1.0 ``megatron/learning_rates.py`` ``AnnealingLR``, transcribed (the optimizer's
    param groups replaced by ``self.lr``), with ``get_learning_rate_scheduler``'s arguments from
    ``megatron/training.py``: ``num_iters = max(1, lr_decay_iters or train_iters)``,
    ``warmup_iter = warmup * num_iters``, ``last_iter = 0``."""

    def __init__(self, start_lr, warmup_iter, total_iters, decay_style, last_iter, min_lr=0.0):
        self.start_lr = start_lr
        self.min_lr = min_lr
        self.warmup_iter = warmup_iter
        self.num_iters = last_iter
        self.end_iter = total_iters
        assert self.end_iter > 0
        self.decay_style = decay_style
        self.step(self.num_iters)

    def get_lr(self):
        num_iters_ = min(self.num_iters, self.end_iter - self.warmup_iter)
        # Warmup.
        if self.warmup_iter > 0 and self.num_iters <= self.warmup_iter:
            return float(self.start_lr) * num_iters_ / self.warmup_iter

        num_iters_ = num_iters_ - self.warmup_iter
        if self.decay_style == "linear":
            lr = self.start_lr * (self.end_iter - num_iters_) / self.end_iter
        elif self.decay_style == "cosine":
            lr = (
                self.start_lr
                / 2.0
                * (math.cos(math.pi * num_iters_ / self.end_iter) + 1)
            )
        elif self.decay_style == "exponential":
            # exp(-0.693) = 1/2
            lr = self.start_lr * math.exp(-0.693 * num_iters_ / self.end_iter)
        else:
            lr = self.start_lr
        return max(lr, self.min_lr)

    def step(self, step_num=None):
        if step_num is None:
            step_num = self.num_iters + 1
        self.num_iters = step_num
        self.lr = self.get_lr()

    @classmethod
    def from_neox_args(cls, lr, min_lr, warmup, train_iters, lr_decay_iters, lr_decay_style):
        num_iters = lr_decay_iters if lr_decay_iters is not None else train_iters
        num_iters = max(1, num_iters)
        return cls(start_lr=lr, warmup_iter=warmup * num_iters, total_iters=num_iters,
                   decay_style=lr_decay_style, last_iter=0, min_lr=min_lr)


def neox_rates(sched: AnnealingLR, updates: int) -> list[float]:
    """The lr of updates 1..``updates``: DeepSpeed calls ``lr_scheduler.step()`` after each one."""
    rates = []
    for _ in range(updates):
        rates.append(sched.lr)
        sched.step()
    return rates


def _train_config(**optimizer):
    from pythia_jax.train.config import OptimizerConfig, TrainConfig

    num_steps = optimizer.pop("num_steps")
    return TrainConfig(num_steps=num_steps, optimizer=OptimizerConfig(**optimizer))


def test_short_run_schedule_matches_gpt_neox():
    """Issue example: 20 steps at max_lr 1e-3 warm up over 0.2 steps, so the first update uses lr 0
    (rounding the warmup to 0 steps used [0.001, 0.0009938, 0.0009755]); 150 steps warm up over
    1.5 steps, so update 2 uses 1e-3/1.5."""
    cfg = _train_config(num_steps=20, max_lr=1e-3)
    assert cfg.warmup_steps == pytest.approx(0.2, rel=1e-15)
    rates = np.asarray(opt.schedule_for(cfg)(jnp.arange(3)))
    np.testing.assert_allclose(rates, [0.0, 0.0009961, 0.0009801], rtol=0, atol=5e-8)
    assert rates[0] == 0.0
    np.testing.assert_allclose(rates, neox_rates(AnnealingLR.from_neox_args(
        1e-3, 1e-4, 0.01, 20, None, "cosine"), 3), rtol=1e-6, atol=0)
    cfg150 = _train_config(num_steps=150, max_lr=1e-3)
    assert float(opt.schedule_for(cfg150)(1)) == pytest.approx(1e-3 / 1.5, rel=1e-6)
    assert float(opt.schedule_for(cfg150)(1)) == pytest.approx(6.667e-4, abs=5e-8)


def test_short_run_first_update_does_not_move_the_weights():
    """Through the whole chain: the first applied update of a 20-step run is zero."""
    cfg = _train_config(num_steps=20, max_lr=1e-3)
    tx = opt.build_optimizer(schedule=opt.schedule_for(cfg))
    params = _params(np.random.default_rng(3))
    grads = jax.tree.map(lambda x: np.ones_like(x), params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    lrs = []
    for _ in range(3):
        lrs.append(float(opt.current_lr(state, opt.schedule_for(cfg))))
        updates, state = update(grads, state, params)
        if len(lrs) == 1:
            assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    np.testing.assert_allclose(lrs, [0.0, 0.0009961, 0.0009801], rtol=0, atol=5e-8)


def test_pythia_recipe_warmup_is_exactly_1430():
    cfg = _train_config(num_steps=143000, max_lr=6e-4)
    assert cfg.warmup_steps == 1430 and cfg.decay_steps == 143000
    ref = AnnealingLR.from_neox_args(6e-4, 6e-5, 0.01, 143000, 143000, "cosine")
    assert ref.warmup_iter == cfg.warmup_steps


def _random_settings(rng: np.random.Generator) -> dict:
    num_steps = int(rng.choice([1, 2, 3, 7, 20, 49, 50, 51, 150, 333, 1000, int(rng.integers(1, 5000))]))
    decay = None if rng.random() < 0.5 else int(rng.integers(1, 2 * num_steps + 2))
    warmup = float(rng.choice([0.0, 0.01, 0.01, 0.1, 0.5, 0.7, 1.0, rng.random()]))
    max_lr = float(10 ** rng.uniform(-5, -2))
    min_lr = float(rng.choice([0.0, 0.1 * max_lr, rng.random() * max_lr, max_lr]))
    style = str(rng.choice(opt.DECAY_STYLES))
    return dict(num_steps=num_steps, lr_decay_iters=decay, warmup=warmup, max_lr=max_lr,
                min_lr=min_lr, style=style)


@pytest.mark.parametrize("seed", range(4))
def test_schedule_matches_annealing_lr_for_random_runs(seed):
    """TrainConfig → schedule equals the AnnealingLR transcription for every update of random runs
    (length, decay length shorter or longer than the run, warmup fraction, min_lr, style)."""
    rng = np.random.default_rng(seed)
    for _ in range(60):
        s = _random_settings(rng)
        cfg = _train_config(num_steps=s["num_steps"], max_lr=s["max_lr"], min_lr=s["min_lr"],
                            warmup=s["warmup"], decay_steps=s["lr_decay_iters"], decay_style=s["style"])
        n = 5010  # every update of the run and past its end (one array shape: no recompiles)
        want = neox_rates(AnnealingLR.from_neox_args(s["max_lr"], s["min_lr"], s["warmup"],
                                                     s["num_steps"], s["lr_decay_iters"], s["style"]), n)
        python = [opt.neox_lr(k, s["max_lr"], s["min_lr"], cfg.warmup_steps, cfg.decay_steps,
                              s["style"]) for k in range(n)]
        assert python == want, s  # the library's float64 formula: identical
        got = np.asarray(opt.schedule_for(cfg)(jnp.arange(n)))  # the trainer's float32 schedule
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-7 * s["max_lr"], err_msg=str(s))
        if s["warmup"] > 0:
            assert got[0] == 0.0


def test_schedule_settings_refused():
    with pytest.raises(ValueError, match="decay_style must be one of"):
        opt.neox_lr_schedule(1e-3, 0.0, 1.0, 10, "cosin")
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        opt.neox_lr_schedule(1e-3, 0.0, 11.0, 10)
    from pythia_jax.config import ConfigError
    with pytest.raises(ConfigError, match="decay_style must be one of"):
        _train_config(num_steps=10, decay_style="step")


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
    grads_seq = [jax.tree.map(lambda x, s=s: (rng.normal(size=x.shape) * s).astype(np.float32), params)
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
