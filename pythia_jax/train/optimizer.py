"""The Pythia optimizer: GPT-NeoX v1.0's LR schedule (``AnnealingLR``) and the Adam/AdamW recipe
(the Pythia paper, appendix E; GPT-NeoX ``megatron/learning_rates.py``).

``build_optimizer`` returns one ``optax`` chain::

    clip_by_global_norm_torch(1.0)        # torch clip_grad_norm_ / DeepSpeed: coef = max / (norm + 1e-6)
    scale_by_adam(0.9, 0.95, eps=1e-8)    # bias-corrected Adam moments
    add_decayed_weights(0.1, mask)        # decoupled weight decay, only on kernels and embeddings
    scale_by_learning_rate(schedule)      # -lr(k) with k = number of updates applied before this one
    scale_row_parallel_biases(copies)     # GPT-NeoX tensor parallelism's bias copies (identity for 1)

so one update is ``p ← p − lr·wd·p − lr·m̂/(√v̂ + ε)``, the same arithmetic as ``torch.optim.AdamW``
(which first multiplies by ``1 − lr·wd`` and then subtracts the Adam step). The schedule count lives in
the optimizer state and only advances when an update is applied: a step that is skipped (non-finite
gradients, fp16-style overflow) simply keeps the old optimizer state, so it consumes its batch without
moving the schedule, as DeepSpeed did.

Tensor-parallel bias copies: GPT-NeoX with tensor-parallel size T and the parallel (GPT-J)
residual keeps one copy of each row-parallel bias (``attention.dense.bias``,
``mlp.dense_4h_to_h.bias``) per rank and adds every copy before the all-reduce. The model's bias
is their sum (which is how the converters merge them); each copy gets the same gradient, counted
once in the global norm, and the same Adam update, so the sum moves T Adam steps per step.
``row_parallel_bias_copies=T`` reproduces that: Pythia-6.9b trained with T = 2 and Pythia-12b with
T = 4 (the recipes in ``configs/train`` set it); every other Pythia model had T = 1.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


# ---------------------------------------------------------------------------------------- schedule
DECAY_STYLES = ("cosine", "linear", "exponential", "constant")


def check_schedule(max_lr: float, min_lr: float, warmup_steps: float, total_steps: int,
                   decay_style: str = "cosine") -> None:
    """Raise ``ValueError`` for settings the schedule does not accept (see ``neox_lr``)."""
    if decay_style not in DECAY_STYLES:
        raise ValueError(f"decay_style must be one of {DECAY_STYLES}, got {decay_style!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps], got {warmup_steps}")
    if min_lr > max_lr:
        raise ValueError(f"min_lr {min_lr} exceeds max_lr {max_lr}")


def neox_lr(step: int, max_lr: float, min_lr: float, warmup_steps: float, total_steps: int,
            decay_style: str = "cosine") -> float:
    """GPT-NeoX v1.0's ``AnnealingLR.get_lr`` (megatron/learning_rates.py) in Python floats.

    step: scheduler steps taken (updates applied before this one); warmup_steps: GPT-NeoX's
    ``warmup_iter = warmup · lr_decay_iters``, a float that is *not* rounded (1% of 20 steps is
    0.2); total_steps: ``end_iter`` (``lr_decay_iters``, else ``train_iters``). With
    ``n = min(step, total − warmup)``: ``max·n/warmup`` while ``step ≤ warmup``, else with
    ``x = n − warmup``: cosine ``max/2·(cos(π·x/total) + 1)``, linear ``max·(total − x)/total``,
    exponential ``max·exp(−0.693·x/total)`` or constant ``max``, floored at ``min_lr``.
    """
    n = min(step, total_steps - warmup_steps)
    if warmup_steps > 0 and step <= warmup_steps:
        return float(max_lr) * n / warmup_steps
    x = n - warmup_steps
    if decay_style == "linear":
        lr = max_lr * (total_steps - x) / total_steps
    elif decay_style == "cosine":
        lr = max_lr / 2.0 * (math.cos(math.pi * x / total_steps) + 1)
    elif decay_style == "exponential":
        lr = max_lr * math.exp(-0.693 * x / total_steps)
    else:
        lr = max_lr
    return max(lr, min_lr)


def neox_lr_schedule(max_lr: float, min_lr: float, warmup_steps: float, total_steps: int,
                     decay_style: str = "cosine") -> Callable[[jax.Array], jax.Array]:
    """``optax.Schedule``: count (int, updates applied so far) → learning rate (float32 scalar).

    The same function as ``neox_lr`` (GPT-NeoX v1.0 ``AnnealingLR``) for every style, any
    fractional ``warmup_steps`` in [0, total_steps] and any ``total_steps``: lr(0) = 0 whenever
    there is a warmup, so the first update does not move the weights. For Pythia (143,000 steps,
    warmup 1430, cosine) the ``min_lr`` floor is reached at n = 115,139.

    Written out rather than composed from optax schedules (``join_schedules`` of
    ``linear_schedule`` and ``cosine_decay_schedule``) because those cannot say it exactly:
    AnnealingLR clamps the step at ``total − warmup`` (so the decay argument stops at
    ``total − 2·warmup``, not at the decay length), floors with ``max(lr, min_lr)`` (optax's
    ``alpha`` rescales instead), caps the warmup ramp at ``(total − warmup)/warmup·max`` when
    the warmup is over half the run, and its exponential uses 0.693, not ln 2.
    Raises ``ValueError`` for an unknown style or out-of-range settings (``check_schedule``).
    """
    check_schedule(max_lr, min_lr, warmup_steps, total_steps, decay_style)
    warmup = float(warmup_steps)
    total = float(total_steps)

    def schedule(count: jax.Array) -> jax.Array:
        step = jnp.asarray(count).astype(jnp.float32)
        n = jnp.minimum(step, total - warmup)
        x = n - warmup
        if decay_style == "linear":
            lr = max_lr * (total - x) / total
        elif decay_style == "cosine":
            lr = max_lr / 2.0 * (jnp.cos(jnp.pi * x / total) + 1.0)
        elif decay_style == "exponential":
            lr = max_lr * jnp.exp(-0.693 * x / total)
        else:
            lr = jnp.full_like(x, max_lr)
        lr = jnp.maximum(lr, min_lr)
        if warmup > 0:
            lr = jnp.where(step <= warmup, max_lr * n / warmup, lr)
        return lr.astype(jnp.float32)

    return schedule


def schedule_for(cfg) -> Callable[[jax.Array], jax.Array]:
    """The LR schedule of a ``TrainConfig``: ``neox_lr_schedule(max_lr, min_lr, warmup_steps,
    decay_steps, decay_style)`` with the config's resolved values (the trainer's schedule)."""
    return neox_lr_schedule(cfg.optimizer.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps,
                            cfg.optimizer.decay_style)


# ------------------------------------------------------------------------------------ transforms
def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """Global-norm clipping with torch/DeepSpeed arithmetic: ``g · min(1, max_norm / (‖g‖ + 1e-6))``.

    (``optax.clip_by_global_norm`` divides by ‖g‖ exactly; the 1e-6 matters for the PyTorch parity.)
    """

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# name paths (module, linear, "bias") of the row-parallel biases below ``layers``: one copy per
# tensor-parallel rank in GPT-NeoX
ROW_PARALLEL_BIASES = (("attention", "dense", "bias"), ("mlp", "dense_4h_to_h", "bias"))


def scale_row_parallel_biases(copies: int) -> optax.GradientTransformation:
    """Multiply the updates of the row-parallel biases by ``copies`` (see the module docstring).

    Stateless (``EmptyState``) and the identity for ``copies == 1``, so the optimizer state has the
    same structure whatever the value.
    """
    copies = int(copies)
    if copies < 1:
        raise ValueError(f"row_parallel_bias_copies must be >= 1, got {copies}")

    def update_fn(updates, state, params=None):
        del params
        if copies == 1:
            return updates, state

        def scale(path, u):
            names = tuple(_key_name(k) for k in path)
            return u * jnp.asarray(copies, u.dtype) if names[-3:] in ROW_PARALLEL_BIASES else u

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def weight_decay_mask(params: PyTree) -> PyTree:
    """True for matrices that get weight decay (``*/kernel``, ``*/embedding``), False for biases and
    LayerNorm scales/biases — GPT-NeoX's ``get_params_for_weight_decay_optimization``."""

    def decays(path, _leaf) -> bool:
        name = _key_name(path[-1])
        return name in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decays, params)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def build_optimizer(max_lr: float = 1e-3, min_lr: float | None = None, warmup_steps: float = 1430,
                    total_steps: int = 143000, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                    weight_decay: float = 0.1, clip_norm: float | None = 1.0,
                    schedule: Callable[[jax.Array], jax.Array] | None = None,
                    row_parallel_bias_copies: int = 1,
                    decay_style: str = "cosine") -> optax.GradientTransformation:
    """The Pythia AdamW chain (see the module docstring). ``min_lr`` defaults to ``0.1·max_lr``;
    the schedule (unless given) is ``neox_lr_schedule(max_lr, min_lr, warmup_steps, total_steps,
    decay_style)``, ``warmup_steps`` a float as GPT-NeoX keeps it.

    Works on the pure param dict (``embed_in/embedding``, ``…/kernel``, ``…/bias``, ``…/scale``).
    The state's structure does not depend on ``row_parallel_bias_copies`` (a stateless transform).
    """
    if min_lr is None:
        min_lr = 0.1 * max_lr
    if schedule is None:
        schedule = neox_lr_schedule(max_lr, min_lr, warmup_steps, total_steps, decay_style)
    parts = []
    if clip_norm is not None and clip_norm > 0:
        parts.append(clip_by_global_norm_torch(clip_norm))
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    parts.append(scale_row_parallel_biases(row_parallel_bias_copies))
    return optax.chain(*parts)


def current_lr(opt_state: optax.OptState, schedule: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """The learning rate the NEXT update will use (schedule at the applied-update count)."""
    return schedule(schedule_count(opt_state))


def schedule_count(opt_state: optax.OptState) -> jax.Array:
    """Number of updates applied so far (the LR scheduler's step), int32 scalar."""
    states = _find(opt_state, optax.ScaleByScheduleState)
    if not states:
        raise ValueError("optimizer state has no ScaleByScheduleState")
    return states[0][1].count


def with_schedule_count(opt_state: optax.OptState, count: int) -> optax.OptState:
    """``opt_state`` with the LR schedule's count set to ``count`` (Adam's own count unchanged):
    a branch that starts with fresh moments at step ``count`` gets that step's learning rate."""
    sched = jnp.asarray(int(count), jnp.int32)

    def setter(n):
        if isinstance(n, optax.ScaleByScheduleState):
            return n._replace(count=jax.device_put(sched, getattr(n.count, "sharding", None))
                              if isinstance(n.count, jax.Array) else sched)
        return n

    return _map_states(opt_state, setter)


# ------------------------------------------------------------------------ Adam moments for converters
def adam_moments(opt_state: optax.OptState) -> tuple[PyTree, PyTree, jax.Array]:
    """``(mu, nu, count)`` of the Adam state: first/second moments (same tree as the params, float32)
    and the number of Adam updates applied (int32 scalar)."""
    found = _find(opt_state, optax.ScaleByAdamState)
    if len(found) != 1:
        raise ValueError(f"expected exactly one ScaleByAdamState in the optimizer state, found {len(found)}")
    s = found[0][1]
    return s.mu, s.nu, s.count


def with_adam_moments(opt_state: optax.OptState, mu: PyTree, nu: PyTree, count) -> optax.OptState:
    """A copy of ``opt_state`` with the Adam moments replaced; ``count`` (updates applied) is set on
    both the Adam bias correction and the LR schedule, which advance together in this recipe.
    ``opt_state`` may be abstract (``jax.eval_shape`` of ``init``): every array leaf is replaced."""
    count = jnp.asarray(count, jnp.int32)
    old_mu, old_nu, _ = adam_moments(opt_state)
    for name, new, old in (("mu", mu, old_mu), ("nu", nu, old_nu)):
        if jax.tree.structure(new) != jax.tree.structure(old):
            raise ValueError(f"Adam {name} tree does not match the optimizer state's parameter tree")
        bad = [(jax.tree_util.keystr(p), jnp.shape(a), jnp.shape(b)) for (p, a), b in
               zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(old)) if jnp.shape(a) != jnp.shape(b)]
        if bad:
            raise ValueError(f"Adam {name} shape mismatch: {bad[:3]}")

    def moment(a, old):  # numpy of the right dtype is kept as it is (the converters: no copy)
        return a if isinstance(a, np.ndarray) and a.dtype == old.dtype else jnp.asarray(a, old.dtype)

    def replace(node):
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(mu=jax.tree.map(moment, mu, old_mu), nu=jax.tree.map(moment, nu, old_nu),
                                 count=count)
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=count)
        return node

    return _map_states(opt_state, replace)


def state_with_moments(optimizer: optax.GradientTransformation, mu: PyTree, nu: PyTree, count,
                       schedule_count=None) -> optax.OptState:
    """An optimizer state around given Adam moments, built without allocating anything else: the
    structure comes from an abstract ``optimizer.init`` (numpy moments are kept as they are, so a
    converter holds the moments once). ``count``: Adam updates applied; ``schedule_count``: the LR
    schedule's count when it differs (fresh moments at a later step)."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.float32), mu)
    state = with_adam_moments(jax.eval_shape(optimizer.init, shapes), mu, nu, count)
    if schedule_count is not None:
        sched = jnp.asarray(int(schedule_count), jnp.int32)
        state = _map_states(state, lambda n: n._replace(count=sched)
                            if isinstance(n, optax.ScaleByScheduleState) else n)
    leftover = [x for x in jax.tree.leaves(state) if isinstance(x, jax.ShapeDtypeStruct)]
    if leftover:
        raise ValueError(f"optimizer state leaves not set from the moments: {leftover[:3]}")
    return state


_STATE_TYPES = (optax.ScaleByAdamState, optax.ScaleByScheduleState)


def _is_state(node) -> bool:
    return isinstance(node, _STATE_TYPES)


def _find(tree, cls) -> list[tuple[Any, Any]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_state)
    return [(p, x) for p, x in leaves if isinstance(x, cls)]


def _map_states(tree, fn):
    return jax.tree.map(lambda x: fn(x) if _is_state(x) else x, tree, is_leaf=_is_state)


# ------------------------------------------------------------------------------ dynamic loss scale
class LossScaleState(NamedTuple):
    """DeepSpeed-style dynamic loss scale (fp16 mimic). All scalars.

    scale: float32, the current loss scale (1.0 and never changed when scaling is off)
    good_steps: int32, finite steps since the last change of the scale
    hysteresis: int32, overflows still tolerated before the scale is halved
    """
    scale: jax.Array
    good_steps: jax.Array
    hysteresis: jax.Array


class DynamicLossScale(NamedTuple):
    """Settings of DeepSpeed's ``DynamicLossScaler`` as Pythia used it (fp16 block of its configs:
    initial_scale_power 12, loss_scale_window 1000, hysteresis 2, min_loss_scale 1)."""
    initial_scale: float = 2.0 ** 12
    window: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    factor: float = 2.0

    def init(self) -> LossScaleState:
        return LossScaleState(jnp.float32(self.initial_scale), jnp.int32(0), jnp.int32(self.hysteresis))

    def update(self, state: LossScaleState, finite: jax.Array) -> LossScaleState:
        """Next state after a step whose (scaled) gradients were ``finite`` (bool scalar).

        Overflow: spend one hysteresis credit; with none left, divide the scale by ``factor``
        (not below ``min_scale``). ``window`` finite steps in a row: multiply by ``factor`` and
        restore the hysteresis credits.
        """
        # overflow branch
        halve = state.hysteresis <= 1
        o_scale = jnp.where(halve, jnp.maximum(state.scale / self.factor, self.min_scale), state.scale)
        o_hyst = jnp.where(halve, state.hysteresis, state.hysteresis - 1)
        overflow = LossScaleState(o_scale, jnp.int32(0), o_hyst)
        # finite branch
        good = state.good_steps + 1
        grow = good >= self.window
        ok = LossScaleState(jnp.where(grow, state.scale * self.factor, state.scale),
                            jnp.where(grow, 0, good).astype(jnp.int32),
                            jnp.where(grow, jnp.int32(self.hysteresis), state.hysteresis))
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), ok, overflow)


def no_loss_scale_state() -> LossScaleState:
    """The state used when dynamic loss scaling is off (scale 1, never updated)."""
    return LossScaleState(jnp.float32(1.0), jnp.int32(0), jnp.int32(0))
