"""The training and evaluation steps: pure functions of (state, batch), compiled once with explicit shardings.

Batch (a dict of global arrays, rows in training order; what ``pythia_jax.data.pipeline`` yields):
    inputs     int32 [B, T]   row[:-1] of each 2049-token Pythia row
    labels     int32 [B, T]   row[1:]
    loss_mask  float32 [B, T] optional; 1 = count this target (Pythia: all ones)

Loss: mean token cross-entropy in float32 over all counted targets of the global batch. With
``micro_batches = M`` the batch is split into M parts (part m = rows m, m+M, m+2M, …, so every data
shard holds a piece of every part) and the gradients are summed over a ``lax.scan``; each part's loss
is divided by the token count of the whole batch, so the result is the same mean as without
accumulation. Parameters stay float32 (master weights); the model computes in ``ModelConfig.dtype``.

A step whose loss or gradients are not finite (or, with dynamic loss scaling, whose scaled gradients
would overflow float16) applies no update: params and optimizer state (including the LR-schedule
count) are kept, the batch is consumed, ``skipped`` grows by one and ``nonfinite_run`` counts such
steps in a row (the loop stops after N).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.core import spmd as core_spmd
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pythia_jax.config import ModelConfig
from pythia_jax.train.optimizer import DynamicLossScale, LossScaleState, current_lr, no_loss_scale_state

FLOAT16_MAX = 65504.0


@struct.dataclass
class TrainState:
    """Everything a step reads and writes.

    step: int32 [] training steps done = batches consumed (the checkpoint step number)
    params: the canonical param dict, float32
    opt_state: the optax state of ``build_optimizer`` (its schedule count = updates applied)
    loss_scale: dynamic loss-scale state (scale 1, inert, when loss scaling is off)
    skipped: int32 [] updates skipped so far (non-finite / overflow)
    nonfinite_run: int32 [] consecutive skipped steps ending at the latest one
    """
    step: jax.Array
    params: Any
    opt_state: Any
    loss_scale: LossScaleState
    skipped: jax.Array
    nonfinite_run: jax.Array


def init_train_state(params: Any, optimizer: optax.GradientTransformation,
                     loss_scale: DynamicLossScale | None = None, step: int = 0) -> TrainState:
    """A fresh state around ``params`` (call under ``jax.jit`` with out_shardings for sharded init)."""
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=optimizer.init(params),
                      loss_scale=loss_scale.init() if loss_scale is not None else no_loss_scale_state(),
                      skipped=jnp.int32(0), nonfinite_run=jnp.int32(0))


# ------------------------------------------------------------------------------------------ loss
def _model_apply(config: ModelConfig) -> Callable[[Any, jax.Array], jax.Array]:
    from pythia_jax.model import model_from_params

    def apply(params, inputs):
        return model_from_params(config, params)(inputs)

    return apply


def token_losses(config: ModelConfig, params: Any, inputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-token cross-entropy, float32 [B, T], of int inputs/labels [B, T].

    With ``config.loss_chunk > 0`` the float32 logits are built ``loss_chunk`` positions at a time
    and recomputed in the backward pass (``layers.chunked_cross_entropy``); otherwise all
    [B, T, V] at once. Both give the same losses and gradients up to float32 rounding.
    """
    if config.loss_chunk:
        from pythia_jax.layers import chunked_cross_entropy
        from pythia_jax.model import model_from_params

        model = model_from_params(config, params)
        hidden = model.hidden_states(inputs.astype(jnp.int32))
        return chunked_cross_entropy(hidden, model.embed_out.kernel[...], labels, config.loss_chunk,
                                     dtype=config.dtype)
    logits = _model_apply(config)(params, inputs.astype(jnp.int32)).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def _with_mask(batch: dict) -> dict:
    """The batch with an explicit float32 ``loss_mask`` (all ones when absent)."""
    mask = batch.get("loss_mask")
    mask = jnp.ones(batch["labels"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return {"inputs": batch["inputs"], "labels": batch["labels"], "loss_mask": mask}


def _split_micro(x: jax.Array, micro_batches: int, batch_axes) -> jax.Array:
    """[B, ...] -> [M, B/M, ...] with part m = rows m, m+M, … (balanced over the data shards)."""
    b = x.shape[0] // micro_batches
    y = x.reshape(b, micro_batches, *x.shape[1:]).swapaxes(0, 1)
    if batch_axes is not None:
        y = jax.lax.with_sharding_constraint(y, P(None, batch_axes, *([None] * (x.ndim - 1))))
    return y


# ------------------------------------------------------------------------------------ train step
def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation, *,
                    micro_batches: int = 1, loss_scale: DynamicLossScale | None = None,
                    schedule: Callable[[jax.Array], jax.Array] | None = None,
                    batch_axes: Any = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure ``train_step(state, batch) -> (state, metrics)`` (see the module docstring).

    metrics (float32 / int32 scalars): loss, grad_norm (unscaled, before clipping), lr (the rate
    of this update; the schedule does not advance on a skipped step), finite (1/0), skipped,
    nonfinite_run, loss_scale, tokens (targets counted).
    ``batch_axes``: mesh axes of the batch dimension (sharding constraint on micro-batches).
    """

    def scaled_loss(params, part, total, scale):
        losses = token_losses(config, params, part["inputs"], part["labels"])
        loss_sum = jnp.sum(losses * part["loss_mask"])
        return loss_sum / total * scale, loss_sum

    grad_fn = jax.grad(scaled_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        batch = _with_mask(batch)
        total = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        scale = state.loss_scale.scale
        params = state.params
        if micro_batches == 1:
            grads, loss_sum = grad_fn(params, batch, total, scale)
        else:
            parts = jax.tree.map(lambda x: _split_micro(x, micro_batches, batch_axes), batch)

            def body(carry, part):
                g_acc, l_acc = carry
                g, loss_part = grad_fn(params, part, total, scale)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss_part), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss_sum), _ = jax.lax.scan(body, (zeros, jnp.float32(0.0)), parts)
        loss = loss_sum / total

        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        if loss_scale is not None:  # fp16 mimic: the scaled gradients must fit float16
            fits = jnp.all(jnp.stack([jnp.max(jnp.abs(g)) <= FLOAT16_MAX for g in jax.tree.leaves(grads)]))
            finite = finite & fits
            grads = jax.tree.map(lambda g: g / scale, grads)  # (without loss scaling scale is 1: no pass)
        grad_norm = optax.tree.norm(grads)

        # The update runs under ``lax.cond`` rather than being computed and then discarded with
        # ``where(finite, new, old)``: a select keeps the old params/moments alive next to the new
        # ones, so XLA copies every donated moment buffer before updating it in place (on CPU
        # this was 0.45 s of a 7 s pythia-160m step). The taken branch is the same arithmetic.
        def apply(operands):
            grads, opt_state, params = operands
            updates, new_opt = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        def skip(operands):
            _, opt_state, params = operands
            return params, opt_state

        new_params, new_opt = jax.lax.cond(finite, apply, skip, (grads, state.opt_state, params))
        new_state = TrainState(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt,
            loss_scale=loss_scale.update(state.loss_scale, finite) if loss_scale is not None else state.loss_scale,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1).astype(jnp.int32),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.int32),
                   "skipped": new_state.skipped, "nonfinite_run": new_state.nonfinite_run,
                   "loss_scale": scale, "tokens": total}
        if schedule is not None:
            metrics["lr"] = current_lr(state.opt_state, schedule)
        return new_state, metrics

    return train_step


def make_eval_step(config: ModelConfig) -> Callable[[Any, dict], dict]:
    """``eval_step(params, batch) -> {"loss_sum", "tokens"}`` (float32 scalars; mean = ratio)."""

    def eval_step(params, batch):
        batch = _with_mask(batch)
        losses = token_losses(config, params, batch["inputs"], batch["labels"])
        return {"loss_sum": jnp.sum(losses * batch["loss_mask"]), "tokens": jnp.sum(batch["loss_mask"])}

    return eval_step


# ------------------------------------------------------------------------------------ compiling
@contextlib.contextmanager
def sharding_context(mesh: Mesh | None, rules):
    """Mesh + logical-axis rules in effect while tracing (the model's activation constraints)."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), core_spmd.logical_axis_rules(tuple(rules)):
        yield


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct``s of ``tree``'s leaves (arrays or structs) carrying ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=s), tree, shardings)


def compile_train_step(step_fn, abstract_state: TrainState, state_shardings: TrainState,
                       abstract_batch: dict, batch_shardings: dict, mesh: Mesh | None, rules=()):
    """AOT-compile ``step_fn`` with explicit in/out shardings and the state donated.

    Returns a ``jax.stages.Compiled``: calling it with other shapes/shardings raises instead of
    recompiling. Metrics come back replicated.
    """
    metric_sharding = NamedSharding(mesh, P()) if mesh is not None else None
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, metric_sharding), donate_argnums=(0,))
    with sharding_context(mesh, rules):
        return jitted.lower(abstract_with_shardings(abstract_state, state_shardings),
                            abstract_with_shardings(abstract_batch, batch_shardings)).compile()


def compile_eval_step(eval_fn, abstract_params: Any, param_shardings: Any, abstract_batch: dict,
                      batch_shardings: dict, mesh: Mesh | None, rules=()):
    metric_sharding = NamedSharding(mesh, P()) if mesh is not None else None
    jitted = jax.jit(eval_fn, in_shardings=(param_shardings, batch_shardings), out_shardings=metric_sharding)
    with sharding_context(mesh, rules):
        return jitted.lower(abstract_with_shardings(abstract_params, param_shardings),
                            abstract_with_shardings(abstract_batch, batch_shardings)).compile()
