"""Everything a run needs before its first step: mesh, shardings, optimizer, compiled steps, initial state.

``build(cfg)`` checks the mesh against the devices, the batch against the data shards and every
parameter dimension against its shard count (``ConfigError`` before any compute), then compiles
the train and eval steps once (ahead of time, explicit in/out shardings, state donated).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from pythia_jax import sharding as shd
from pythia_jax.train.config import TrainConfig
from pythia_jax.train.optimizer import DynamicLossScale, build_optimizer, schedule_for
from pythia_jax.train.step import (
    TrainState,
    abstract_with_shardings,
    compile_eval_step,
    compile_train_step,
    init_train_state,
    make_eval_step,
    make_train_step,
)

BATCH_KEYS = ("inputs", "labels")  # int32 [global_batch, seq_length] each (the data pipeline's batch)


@dataclasses.dataclass
class TrainSetup:
    """The compiled pieces of a run (see ``build``)."""
    config: TrainConfig
    mesh: Mesh
    rules: tuple
    optimizer: optax.GradientTransformation
    schedule: Callable[[jax.Array], jax.Array]
    loss_scale: DynamicLossScale | None
    param_shardings: Any
    state_shardings: TrainState
    batch_shardings: dict
    abstract_state: TrainState  # ShapeDtypeStructs with shardings
    train_step: Any  # jax.stages.Compiled: (TrainState, batch) -> (TrainState, metrics)
    eval_step: Any  # jax.stages.Compiled: (params, batch) -> {"loss_sum", "tokens"}
    _init_fn: Any = None
    _from_params_fn: Any = None

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def init_state(self, seed: int | None = None) -> TrainState:
        """A fresh state with Pythia initialisation, created directly in its shardings."""
        seed = self.config.seed if seed is None else seed
        return self._init_fn(jnp.asarray(seed, jnp.uint32))

    def state_from_params(self, params: Any, step: int = 0) -> TrainState:
        """A fresh optimizer state around given params (e.g. an HF model), placed in the shardings."""
        from pythia_jax.model import check_params

        check_params(self.config.model, params)

        def place(a, sharding):  # host arrays go straight to their shards (never whole onto one device)
            if isinstance(a, np.ndarray):
                return jax.device_put(np.asarray(a, np.float32), sharding)
            return jax.device_put(a, sharding).astype(jnp.float32)

        params = jax.tree.map(place, dict(params), self.param_shardings)
        state = self._from_params_fn(params)
        return state.replace(step=jax.device_put(jnp.asarray(step, jnp.int32), state.step.sharding))

    def put_batch(self, batch: dict) -> dict:
        """Host arrays (this process's rows or, single-process, the global batch) → global jax arrays."""
        out = {}
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing}; expected keys {BATCH_KEYS}")
        for k in BATCH_KEYS:
            v = batch[k]
            sharding = self.batch_shardings[k]
            v = np.asarray(v, np.int32)
            if jax.process_count() == 1:
                out[k] = jax.device_put(v, sharding)
            else:
                global_shape = (self.config.global_batch,) + v.shape[1:]
                out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
        return out


def build(cfg: TrainConfig, devices: Sequence[jax.Device] | None = None, *, compile_eval: bool = True) -> TrainSetup:
    """Mesh, shardings and compiled steps for ``cfg`` (all shape/mesh checks happen here)."""
    from flax import nnx

    from pythia_jax.model import GPTNeoX, abstract_params, params_to_dict

    mesh = shd.make_mesh(cfg.mesh, devices)
    rules = shd.make_rules(cfg.mesh.rules)
    shd.check_batch(cfg.global_batch, cfg.micro_batches, mesh, rules)
    param_sh = shd.param_shardings(cfg.model, mesh, rules)

    schedule = schedule_for(cfg)
    o = cfg.optimizer
    optimizer = build_optimizer(b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                clip_norm=o.clip_norm, schedule=schedule,
                                row_parallel_bias_copies=o.row_parallel_bias_copies)
    loss_scale = (DynamicLossScale(initial_scale=2.0 ** o.initial_scale_power, window=o.loss_scale_window,
                                   hysteresis=o.hysteresis, min_scale=o.min_loss_scale)
                  if o.loss_scaling else None)

    params_abs = abstract_params(cfg.model)
    opt_sh = shd.opt_state_shardings(optimizer, params_abs, param_sh, mesh)
    abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer, loss_scale), params_abs)
    rep = shd.replicated(mesh)
    state_sh = TrainState(step=rep, params=param_sh, opt_state=opt_sh,
                          loss_scale=jax.tree.map(lambda _: rep, abstract.loss_scale),
                          skipped=rep, nonfinite_run=rep)
    batch_sh = {k: shd.batch_sharding(mesh, rules) for k in BATCH_KEYS}
    batch_abs = {k: jax.ShapeDtypeStruct((cfg.global_batch, cfg.seq_length), jnp.int32) for k in BATCH_KEYS}
    batch_axes = tuple(shd.batch_spec(rules))[0]

    step_fn = make_train_step(cfg.model, optimizer, micro_batches=cfg.micro_batches,
                              loss_scale=loss_scale, schedule=schedule, batch_axes=batch_axes)
    train_step = compile_train_step(step_fn, abstract, state_sh, batch_abs, batch_sh, mesh, rules)
    eval_step = None
    if compile_eval:
        eval_step = compile_eval_step(make_eval_step(cfg.model), params_abs, param_sh, batch_abs,
                                      batch_sh, mesh, rules)

    def init_fn(seed):
        model = GPTNeoX(cfg.model, rngs=nnx.Rngs(jax.random.key(seed)))  # = nnx.Rngs(int seed)
        params = jax.tree.map(lambda a: a.astype(jnp.float32), params_to_dict(model))
        return init_train_state(params, optimizer, loss_scale)

    init_jit = jax.jit(init_fn, out_shardings=state_sh)
    from_params = jax.jit(lambda p: init_train_state(p, optimizer, loss_scale), in_shardings=(param_sh,),
                          out_shardings=state_sh)
    return TrainSetup(config=cfg, mesh=mesh, rules=rules, optimizer=optimizer, schedule=schedule,
                      loss_scale=loss_scale, param_shardings=param_sh, state_shardings=state_sh,
                      batch_shardings=batch_sh, abstract_state=abstract_with_shardings(abstract, state_sh),
                      train_step=train_step, eval_step=eval_step, _init_fn=init_jit, _from_params_fn=from_params)

