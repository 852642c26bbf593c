"""Continue training from a converted checkpoint: optimizer states for ``neox-to-jax`` / ``hf-to-jax``.

``neox_train_state`` turns a GPT-NeoX ZeRO checkpoint's fp32 master weights and Adam moments
into a params tree and an optimizer state of this project's Pythia chain (``build_optimizer``);
``fresh_opt_state`` makes a zero-moment state whose learning-rate schedule starts at a given step
(for sources without optimizer state, like HF releases).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import numpy as np

from pythia_jax.config import ModelConfig
from pythia_jax.convert.neox.layout import NeoxCheckpoint
from pythia_jax.convert.neox.yml import optimizer_settings
from pythia_jax.convert.neox.zero import read_neox_optimizer_state
from pythia_jax.errors import CheckpointError
from pythia_jax.train.optimizer import build_optimizer, state_with_moments

logger = logging.getLogger(__name__)


def fresh_opt_state(params: Mapping[str, Any], optimizer_kwargs: Mapping[str, Any] | None = None,
                    schedule_count: int = 0):
    """A zero-moment optimizer state of the Pythia chain, LR schedule at ``schedule_count``.

    Adam's bias-correction count stays 0 (fresh moments), only the schedule is advanced, so
    training resumed at step N runs with the learning rate of step N.
    """
    # numpy zeros (pages untouched until written): no device copy of the params
    zeros = lambda: jax.tree.map(lambda a: np.zeros(np.shape(a), np.float32), dict(params))  # noqa: E731
    return state_with_moments(build_optimizer(**dict(optimizer_kwargs or {})), zeros(), zeros(), 0,
                              schedule_count=schedule_count)


def neox_train_state(ckpt: NeoxCheckpoint, config: ModelConfig,
                     optimizer_kwargs: Mapping[str, Any] | None = None, *, progress: bool = False
                     ) -> tuple[dict[str, Any], Any, int, dict[str, Any]]:
    """(params = fp32 master weights, opt_state with the imported Adam moments, step, metadata).

    ``optimizer_kwargs`` go to ``build_optimizer``; the yml's values fill what is not given. The
    state's Adam count and LR-schedule count are the Adam steps DeepSpeed applied; ``step`` is
    the training iteration (batches consumed, skipped fp16 steps included).
    """
    state = read_neox_optimizer_state(ckpt, config, progress=progress)
    if state is None:
        raise CheckpointError(f"{ckpt.directory} has no ZeRO optimizer shards "
                              "(zero_pp_rank_*_mp_rank_*_optim_states.pt)")
    kwargs = {**optimizer_settings(ckpt.yml, ckpt.tp), **dict(optimizer_kwargs or {})}
    # numpy throughout: master weights + two moments, the state's own 3x the model, no copies
    params = state.master
    opt_state = state_with_moments(build_optimizer(**kwargs), state.exp_avg, state.exp_avg_sq, state.step)
    step = state.iteration if state.iteration is not None else (ckpt.step or state.step)
    if state.scheduler_steps is not None and state.scheduler_steps != state.step:
        logger.warning(f"{ckpt.directory}: LR scheduler steps ({state.scheduler_steps}) differ from Adam "
                       f"steps ({state.step}); both continue from {state.step}")
    metadata = {"source": "gpt-neox", "neox_checkpoint": ckpt.directory, "adam_steps": state.step,
                "iteration": step, "optimizer": {k: v for k, v in kwargs.items()},
                "saved_param_groups": state.hyperparams}
    return params, opt_state, int(step), metadata
