"""Where a run starts: the newest valid checkpoint of its own (resume), or a new state (a random
init, or a branch from ``TrainConfig.init_from`` at ``start_step``), checked against the run record.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from pythia_jax.errors import CheckpointError
from pythia_jax.train.config import TrainConfig
from pythia_jax.train.hooks import RunState
from pythia_jax.train.resume import check_resume

logger = logging.getLogger(__name__)


def restore_or_init(run: RunState, ckpt, devices=None, max_steps: int | None = None) -> None:
    """Fill in ``run`` (setup, data iterator, state, step, end, run record) for ``run.cfg``.

    Cheap checks first: a checkpoint directory of a run with another data order, model or
    schedule is refused (``check_resume``) before anything is compiled. Then the newest valid
    checkpoint of ``ckpt`` is restored (data iterator included); with none the run starts from
    :func:`initial_state`. ``run.step`` is set as soon as it is known (the Ctrl-C report uses it).
    """
    from pythia_jax.checkpoint import RUN_CONFIG_KEY
    from pythia_jax.train import builder
    from pythia_jax.train.batches import make_data_iterator
    from pythia_jax.train.resume import run_config

    cfg = run.cfg
    current = run_config(cfg)
    stored = _newest_run_config(ckpt)
    run.record = current
    if stored is not None:
        run.record = check_resume(stored, current, cfg, stored["step"], f"{ckpt.directory}/{stored['step']}")
    run.setup = setup = builder.build(cfg, devices, compile_eval=cfg.eval_every > 0)
    run.data_it = data_it = make_data_iterator(cfg, setup)

    abstract = {"params": setup.abstract_state.params, "opt_state": setup.abstract_state.opt_state}
    restored = ckpt.restore(abstract_state=abstract, data_iterator=data_it)
    if restored is not None:
        if stored is None or restored.step != stored["step"]:  # fell back to an older step
            older = (restored.metadata or {}).get(RUN_CONFIG_KEY)
            run.record = check_resume(older, current, cfg, restored.step, f"{ckpt.directory}/{restored.step}")
        run.state = _state_from_restored(setup, restored)
        if data_it.step != restored.step:
            data_it.set_step(restored.step)
        run.restored_step = restored.step  # on disk already
    else:
        run.state, branch = initial_state(cfg, setup, current)
        changes = branch.pop("changes", [])  # accepted against the source (check_resume): recorded
        run.record = {**current, "init": {**current["init"], **branch}, "changes": changes}
    run.step = int(jax.device_get(run.state.step))
    if data_it.step != run.step:
        data_it.set_step(run.step)
    run.end = cfg.num_steps if max_steps is None else min(cfg.num_steps, run.step + max_steps)


def _state_from_restored(setup, restored):
    """A TrainState from a ``checkpoint.RestoredState`` (scalars from its metadata)."""
    import jax.numpy as jnp

    from pythia_jax.train.optimizer import LossScaleState, no_loss_scale_state
    from pythia_jax.train.step import TrainState

    meta = restored.metadata or {}
    saved = meta.get("loss_scale")
    if setup.loss_scale is None:
        loss_scale = no_loss_scale_state()
    elif saved is not None:
        loss_scale = LossScaleState(jnp.float32(saved["scale"]), jnp.int32(saved["good_steps"]),
                                    jnp.int32(saved["hysteresis"]))
    else:
        loss_scale = setup.loss_scale.init()
    sh = setup.state_shardings
    return TrainState(step=jax.device_put(jnp.int32(restored.step), sh.step), params=restored.params,
                      opt_state=restored.opt_state,
                      loss_scale=jax.tree.map(jax.device_put, loss_scale, sh.loss_scale),
                      skipped=jax.device_put(jnp.int32(meta.get("skipped", 0)), sh.skipped),
                      nonfinite_run=jax.device_put(jnp.int32(meta.get("nonfinite_run", 0)), sh.nonfinite_run))


def initial_state(cfg: TrainConfig, setup, current: dict):
    """The state a run without checkpoints starts from, and what to record of it.

    A random init, or ``cfg.init_from`` at ``cfg.start_step`` (see ``TrainConfig.init_from``):
    a checkpoint of this project gives its params, optimizer state and loss-scale state at that
    step (its data order and model must be this run's; ``check_resume``'s rules), or its params
    only when the step holds no optimizer state (a ``convert hf-to-jax`` output); a GPT-NeoX
    checkpoint its fp32 master weights and ZeRO Adam moments (its iteration must be the step);
    an HF directory the params only, with zero Adam moments and the LR schedule at the step.
    """
    from pythia_jax import checkpoint as ckpt_lib

    S = int(cfg.start_step)
    if not cfg.init_from:
        return setup.init_state(cfg.seed), {}
    source = cfg.init_from
    found = _checkpoint_root(source)
    if found is not None:
        root, folder_step = found
        return _branch_from_checkpoint(cfg, setup, current, root, _folder_step(cfg, source, folder_step, S))
    from pythia_jax.convert.neox import is_neox_checkpoint

    if is_neox_checkpoint(source):
        return _branch_from_neox(cfg, setup, source, S)
    from pythia_jax.convert.sources import load_params, revision_folder_steps

    if revision_folder_steps(source):  # a folder of step<N>/ revisions: the one start_step names
        config, params = load_params(source, step=S, host=True)  # (refused, listing them, if absent)
    else:
        _check_revision_step(source, S)
        config, params = load_params(source, host=True)  # numpy: placed slice by slice
    diff = ckpt_lib.config_differences(config, cfg.model)
    if diff:
        raise CheckpointError(f"{source} holds a different model: {'; '.join(diff)}")
    if not S:
        logger.warning("starting from the weights of %s at step 0: the rows and the LR schedule (warmup "
                       "included) start from the beginning, with zero Adam moments; set TrainConfig.start_step "
                       "to continue at a later step", source)
    return _branch_with_zero_moments(setup, params, S, source)


def _folder_step(cfg: TrainConfig, source: str, step: int | None, S: int) -> int:
    """The step to branch at from a checkpoint source whose folder names ``step`` (None for a root
    or run folder): that step (``run/checkpoints/10``) when ``start_step`` is left 0, as for a
    GPT-NeoX ``global_stepN/``; ``CheckpointError`` when ``start_step`` names another step (the
    folder's step was ignored before)."""
    if step is None or step == S:
        return S
    if S:
        raise CheckpointError(f"cannot branch from {source} at start_step {S}: it is the folder of step {step}; set "
                              f"TrainConfig.start_step = {step}, or name the checkpoint root to branch at {S}")
    if step >= cfg.num_steps:
        raise CheckpointError(f"cannot branch from {source}: its step {step} is not below TrainConfig.num_steps "
                              f"{cfg.num_steps}")
    logger.info("branching at step %d, the step of %s (TrainConfig.start_step left 0)", step, source)
    return step


def _check_revision_step(source: str, S: int) -> None:
    """An HF folder whose weights name their step (a Hub revision ``step<N>``, or an export that
    records its step: ``convert.sources.hf_dir_step``) holds step N's weights: a branch from it must
    continue at step N. ``CheckpointError`` otherwise: step-N weights would train on another step's
    rows, with another step's learning rate."""
    from pythia_jax.convert.sources import hf_dir_step

    N = hf_dir_step(source)
    if N is None or N == S:
        return
    hint = " (to start these weights at step 0, copy them to a folder not named step<N>)" if S == 0 else ""
    raise CheckpointError(f"cannot branch from {source} at start_step {S}: its weights are step {N}'s (a Hub "
                          f"revision or a recorded export); set TrainConfig.start_step = {N} to continue it{hint}")


def _branch_with_zero_moments(setup, params, S: int, source):
    """A state around params that come without optimizer state, at step ``S`` of the schedule."""
    state = setup.state_from_params(params, step=S)
    if S:
        from pythia_jax.train.optimizer import with_schedule_count

        state = state.replace(opt_state=with_schedule_count(state.opt_state, S))
        logger.warning("branching from %s at step %d with zero Adam moments: the source holds no "
                       "optimizer state (recorded in the checkpoints as init.adam_moments = 'zero')",
                       source, S)
    return state, {"start_step": S, "adam_moments": "zero"}


def _checkpoint_root(path: str):
    """(checkpoint root, the step a step folder names, else None) of a checkpoint source of this
    project at ``path`` (a run's output_dir, a checkpoint root or a step folder), else None."""
    from pythia_jax import checkpoint as ckpt_lib

    return ckpt_lib.resolve_checkpoint_dir(path) if ckpt_lib.is_checkpoint_dir(path) else None


def _branch_from_checkpoint(cfg: TrainConfig, setup, current: dict, root, S: int):
    """Params, optimizer and loss-scale state of step ``S`` of another run's checkpoints (params
    only, with zero Adam moments, when the step holds no optimizer state)."""
    from pythia_jax.checkpoint import OPT_STATE, TrainCheckpointer, read_run_config
    from pythia_jax.checkpoint.failures import step_list

    reader = TrainCheckpointer(root, async_save=False)  # a reader: never cleans up the source
    try:
        steps = reader.all_steps()
        if S not in steps:
            raise CheckpointError(f"cannot branch from {root} at step {S}: it has no step {S}; "
                                  f"its steps are {step_list(steps)} (TrainConfig.start_step)")
        stored = read_run_config(root, S)
        changes = []
        if stored and not stored.get("partial"):  # else than the transform must match (check_resume)
            changes = check_resume(stored, current, cfg, S, f"{root}/{S}", branch=True)["changes"]
        abstract = {"params": setup.abstract_state.params}
        # a step saved without optimizer state (``convert hf-to-jax`` without --with-optimizer)
        # branches as an HF directory does: its params, zero Adam moments
        with_moments = (root / str(S) / OPT_STATE).exists()
        if with_moments:
            abstract["opt_state"] = setup.abstract_state.opt_state
        restored = reader.restore(step=S, abstract_state=abstract)
    finally:
        reader.close()
    if not with_moments:
        state, info = _branch_with_zero_moments(setup, restored.params, S, f"{root}/{S}")
        return state, {**info, "changes": changes}
    state = _state_from_restored(setup, restored)
    if _moments_are_zero(state.opt_state):
        # a fresh optimizer state (``convert hf-to-jax --with-optimizer``): the same restart as a
        # source without one, so recorded as such (the record must say what the weights saw)
        logger.warning("branching from %s at step %d with zero Adam moments: the source's optimizer "
                       "state is a fresh one (e.g. from 'convert --with-optimizer'; recorded in the "
                       "checkpoints as init.adam_moments = 'zero')", f"{root}/{S}", S)
        return state, {"start_step": S, "adam_moments": "zero", "changes": changes}
    logger.info("branching from %s at step %d (params, Adam moments and loss scale of the source)", root, S)
    return state, {"start_step": S, "adam_moments": "source", "changes": changes}


def _moments_are_zero(opt_state) -> bool:
    """Whether every Adam first and second moment in ``opt_state`` is exactly 0 (a fresh state)."""
    from pythia_jax.train.optimizer import adam_moments

    mu, nu, _ = adam_moments(opt_state)
    nonzero = jax.device_get([jax.numpy.any(x != 0) for x in jax.tree.leaves((mu, nu))])  # one transfer
    return not any(bool(x) for x in nonzero)


def _branch_from_neox(cfg: TrainConfig, setup, source: str, S: int):
    """fp32 master weights and ZeRO Adam moments of a GPT-NeoX checkpoint at iteration ``S``."""
    from pythia_jax.checkpoint import config_differences
    from pythia_jax.convert.neox import read_neox_checkpoint
    from pythia_jax.convert.neox.layout import holds_model_files
    from pythia_jax.train.continuation import neox_train_state

    # a global_stepN/ folder is read as it is (its iteration is checked below); a parent folder
    # of several is asked for global_step<S>
    step_dir = holds_model_files(source)
    config, _, neox_ckpt = read_neox_checkpoint(source, step=None if step_dir else (S or None))
    diff = config_differences(config, cfg.model)
    if diff:
        raise CheckpointError(f"{source} holds a different model: {'; '.join(diff)}")
    o = cfg.optimizer
    params, opt_state, step, _ = neox_train_state(neox_ckpt, config, dict(
        max_lr=o.max_lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.decay_steps,
        b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm,
        row_parallel_bias_copies=o.row_parallel_bias_copies, decay_style=o.decay_style))
    if S and step != S:
        raise CheckpointError(f"cannot branch from {source} at step {S}: it is iteration {step}")
    state = setup.state_from_params(params, step=step)
    state = state.replace(opt_state=jax.tree.map(
        lambda a, sh: jax.device_put(np.asarray(a), sh), opt_state, setup.state_shardings.opt_state))
    return state, {"start_step": int(step), "adam_moments": "source"}


def _newest_run_config(ckpt) -> dict | None:
    """The run record of the newest step that looks complete, or None (no such step)."""
    from pythia_jax.checkpoint import read_run_config

    if not ckpt.all_steps():
        return None
    try:
        return read_run_config(ckpt.directory)
    except CheckpointError:  # no usable step: restore() reports each and the run starts over
        return None
