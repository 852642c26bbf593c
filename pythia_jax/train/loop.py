"""The trainer: restore → iterate → step → log → evaluate → checkpoint (``pythia-jax train``).

Output directory layout (``TrainConfig.output_dir``)::

    checkpoints/      Orbax checkpoints on the Pythia schedule (pythia_jax.checkpoint)
    tensorboard/      TensorBoard event files
    metrics.jsonl     one JSON line per step (step, loss, grad_norm, lr, …) and per evaluation;
                      a resume first drops the lines of the steps after the restored one, so
                      every step appears once; NaN/inf are written as null
    train.lock        held by the running ``train`` (host, pid, start time): a second ``train``
                      on the same directory is refused (``pythia_jax.train.run_lock``)
    index_maps/       GPT-NeoX index-map caches (unless DataConfig.cache_dir)
    hf/ (optional)    the final step exported as a Hugging Face directory

When ``output_dir`` is a URL (``gs://…``) only ``checkpoints/`` goes there; the logs and caches go
to a local mirror folder (``local_output_dir``).

A run always resumes from the newest valid checkpoint in ``checkpoints/`` (data iterator included),
so re-running the same command after a crash, SIGKILL or SIGTERM continues exactly where the last
checkpoint left off. Every checkpoint records the run's configuration (:func:`run_config`: data
source, order, seed, batch, sequence length, steps; schedule; model); a resume whose settings
differ is refused with one line (:func:`check_resume`) instead of starting over: a changed data
order or model always, a changed schedule (``num_steps``, optimizer settings) unless
``TrainConfig.allow_schedule_change``. A failed checkpoint save (e.g. a full disk) stops the run
within a step with ``CheckpointSaveFailed``.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Any, Iterable, Iterator

import jax
import numpy as np

from pythia_jax.config import ConfigError
from pythia_jax.checkpoint import RunConfigMismatch
from pythia_jax.errors import CheckpointError, PythiaJaxError
from pythia_jax.train.config import DistributedConfig, TrainConfig
from pythia_jax.train.paths import local_output_dir  # re-exported: train.loop.local_output_dir

logger = logging.getLogger(__name__)


class TrainingDiverged(PythiaJaxError):
    """N non-finite losses in a row: the run saved a checkpoint and stopped."""


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns (host values)."""
    final_step: int
    params: Any  # jax arrays in their training shardings
    losses: dict[int, float]  # step number (1-based: the loss of the batch of step n-1) -> loss
    eval_losses: dict[int, float]
    stopped: str | None = None  # "preempted" when a stop signal ended the run early
    hf_dir: str | None = None


# ------------------------------------------------------------------------------------ distributed
def maybe_initialize_distributed(cfg: DistributedConfig) -> None:
    """``jax.distributed.initialize`` for multi-process runs (before any device is touched).

    "auto": initialise when a coordinator/process count is configured or a TPU VM is
    detected (its accelerator device files; TPU VMs fill in everything themselves, one host too); "yes": always; "no": never. CPU multi-process
    (tests) uses gloo collectives.
    """
    if cfg.initialize == "no" or jax.distributed.is_initialized():
        return
    explicit = cfg.coordinator_address is not None or (cfg.num_processes or 1) > 1
    if cfg.initialize == "auto" and not (explicit or on_tpu_vm()):
        return
    if "cpu" in os.environ.get("JAX_PLATFORMS", "") and explicit:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in dict(coordinator_address=cfg.coordinator_address,
                                    num_processes=cfg.num_processes, process_id=cfg.process_id,
                                    local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids else None
                                    ).items() if v is not None}
    jax.distributed.initialize(**kwargs)


def on_tpu_vm() -> bool:
    """True on a Cloud TPU VM (single host or pod worker), checked without touching JAX's backends.

    GCE TPU VMs do not always export ``TPU_WORKER_HOSTNAMES`` (JAX reads the pod layout from the
    metadata server), so the TPU device files are checked too: ``/dev/accel*`` (v2–v4) and
    ``/dev/vfio/<n>`` (v5e, v5p, v6e). ``jax.distributed.initialize()`` then finds the other hosts.
    """
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


# ------------------------------------------------------------------------------------------- data
def _cache_prefix(cfg: TrainConfig, prefix: str) -> str:
    cache_dir = cfg.data.cache_dir or os.path.join(local_output_dir(cfg.output_dir), "index_maps")
    return os.path.join(cache_dir, os.path.basename(prefix))


def make_data_iterator(cfg: TrainConfig, setup, start_step: int = 0):
    """This process's training batches by global step (a checkpointable grain iterator)."""
    from pythia_jax.data.pipeline import host_row_range, make_train_iterator

    prefix = cfg.data.resolved_prefix()
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(_cache_prefix(cfg, prefix)), exist_ok=True)
    return make_train_iterator(
        prefix, order=cfg.data.order, seq_len=cfg.seq_length, global_batch=cfg.global_batch,
        seed=cfg.data.seed, train_iters=cfg.num_steps, start_step=start_step,
        host_rows=host_row_range(setup.batch_shardings["inputs"], cfg.global_batch),
        num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch,
        cache_prefix=_cache_prefix(cfg, prefix), transform=cfg.data.transform_spec())


def make_eval_batches(cfg: TrainConfig, setup) -> Iterator[dict]:
    """Held-out batches of ``global_batch`` rows (this process's rows of each)."""
    from pythia_jax.data import pipeline

    prefix = cfg.data.resolved_prefix()
    eval_prefix = cfg.data.resolved_eval_prefix()
    a, b = pipeline.host_row_range(setup.batch_shardings["inputs"], cfg.global_batch)
    common = dict(seq_len=cfg.seq_length, batch_size=cfg.global_batch, max_batches=cfg.eval_batches,
                  seed=cfg.data.seed, train_iters=cfg.num_steps, global_batch=cfg.global_batch)
    if eval_prefix is not None:
        batches = pipeline.make_eval_batches(eval_prefix, order="sequential", **common)
    else:
        batches = pipeline.make_eval_batches(prefix, order=cfg.data.order,
                                             cache_prefix=_cache_prefix(cfg, prefix), **common)
    for batch in batches:  # the full global batch on every host: keep this host's rows
        yield {k: v[a:b] for k, v in batch.items()}


def evaluate(setup, params, batches: Iterable[dict]) -> float:
    """Mean held-out token loss (float) over ``batches`` (all queued, then read back once)."""
    outs = jax.device_get([setup.eval_step(params, setup.put_batch(batch)) for batch in batches])
    total = sum(float(out["loss_sum"]) for out in outs)
    count = sum(float(out["tokens"]) for out in outs)
    if count == 0:
        raise ConfigError("the evaluation set is empty")
    return total / count


# --------------------------------------------------------------------------- run configuration
RUN_CONFIG_VERSION = 1

# Where each recorded setting comes from (for messages), and what changing it does.
_SETTING_NAMES = {
    "data.prefix": "DataConfig.prefix", "data.documents": "DataConfig.prefix",
    "data.tokens": "DataConfig.prefix", "data.order": "DataConfig.order", "data.seed": "DataConfig.seed",
    "data.global_batch": "TrainConfig.global_batch", "data.seq_len": "TrainConfig.seq_length",
    "data.transform": "the row transform", "data.train_iters": "TrainConfig.num_steps",
    "schedule.num_steps": "TrainConfig.num_steps", "schedule.micro_batches": "TrainConfig.micro_batches",
}


def _setting_name(key: str) -> str:
    if key in _SETTING_NAMES:
        return _SETTING_NAMES[key]
    section, _, name = key.partition(".")
    return {"schedule": "OptimizerConfig.", "model": "ModelConfig."}.get(section, section + ".") + name


def run_config(cfg: TrainConfig) -> dict:
    """The record of a run stored in every checkpoint (``pythia_jax.checkpoint.read_run_config``).

    ``data``: what decides the rows of every step: the source (resolved prefix, plus its number
    of documents and tokens from the ``.idx``, so a moved copy of the same data is recognised),
    order, seed, global batch, sequence length and ``train_iters`` (= ``num_steps``: the GPT-NeoX
    index maps are built for ``train_iters · global_batch`` samples, GPT-NeoX
    ``megatron/data/gpt2_dataset.py`` ``_build_index_mappings``), and the row transform
    (``TransformSpec.to_dict()``: name, parameters, step window; None without one). Step ``n`` trained on rows ``[n·global_batch, (n+1)·global_batch)`` of that order.
    ``schedule``: ``num_steps`` and the optimizer settings, the LR schedule's fields resolved.
    ``model``: ``ModelConfig.to_dict()``. ``init``: parameter seed, ``init_from`` and
    ``start_step`` (used when the run starts; recorded, not checked), and for a branch
    ``adam_moments`` ("source" or "zero").
    """
    from pythia_jax.data.indexed import Index

    prefix = cfg.data.resolved_prefix()
    sizes = Index(prefix + ".idx").sizes
    o = cfg.optimizer
    spec = cfg.data.transform_spec()
    transform = spec.to_dict() if spec is not None else None
    return {
        "version": RUN_CONFIG_VERSION,
        "data": {"prefix": prefix if "://" in prefix else os.path.abspath(prefix),
                 "documents": int(len(sizes)), "tokens": int(np.asarray(sizes).sum(dtype=np.int64)),
                 "order": cfg.data.order, "seed": int(cfg.data.seed), "global_batch": int(cfg.global_batch),
                 "seq_len": int(cfg.seq_length), "train_iters": int(cfg.num_steps), "transform": transform},
        "schedule": {"num_steps": int(cfg.num_steps), "max_lr": float(o.max_lr), "min_lr": float(cfg.min_lr),
                     "warmup_steps": int(cfg.warmup_steps), "decay_steps": int(cfg.decay_steps),
                     "b1": float(o.b1), "b2": float(o.b2), "eps": float(o.eps),
                     "weight_decay": float(o.weight_decay), "clip_norm": float(o.clip_norm),
                     "loss_scaling": bool(o.loss_scaling), "initial_scale_power": int(o.initial_scale_power),
                     "loss_scale_window": int(o.loss_scale_window), "hysteresis": int(o.hysteresis),
                     "min_loss_scale": float(o.min_loss_scale),
                     "row_parallel_bias_copies": int(o.row_parallel_bias_copies)},
        "model": cfg.model.to_dict(),
        "init": {"seed": int(cfg.seed), "init_from": cfg.init_from, "start_step": int(cfg.start_step)},
        "changes": [],
    }


def check_resume(stored: dict | None, current: dict, cfg: TrainConfig, step: int, where: str) -> dict:
    """Refuse to continue a run from checkpoint ``step`` under a different configuration.

    ``stored``: the checkpoint's record (``checkpoint.read_run_config``; a partial one for
    checkpoints that predate it, None for none); ``current``: ``run_config(cfg)``. Refused
    (``RunConfigMismatch``, one line naming the setting, both values and the way out):

    * a different data order: source (its documents/tokens), order, seed, global batch,
      sequence length, transform: the rows already trained on would not be this order's rows;
    * a different model (architecture fields of ``ModelConfig``);
    * a different schedule: ``num_steps`` (the LR schedule's decay/warmup and, with the GPT-NeoX
      order, the index maps) or any optimizer setting, unless ``cfg.allow_schedule_change``.
      Even then, with the GPT-NeoX order a new ``num_steps`` must leave the rows of steps
      ``[0, step)`` unchanged (checked on the two index maps), and must be ``>= step``.

    Returns the record to store from now on: ``current`` with the accepted changes appended to
    ``changes`` (``{"step", "changed": {setting: [old, new]}}``). A moved copy of the same data
    (same documents and tokens) is accepted with a warning.
    """
    from pythia_jax.checkpoint import EXECUTION_FIELDS

    record = dict(current)
    if not stored:
        return record
    refused: list[tuple[str, Any, Any, str]] = []
    schedule: list[tuple[str, Any, Any]] = []
    for section in ("data", "model", "schedule"):
        old_section, new_section = stored.get(section), current.get(section, {})
        if not isinstance(old_section, dict):
            continue
        for key, old in old_section.items():
            new = new_section.get(key)
            name = f"{section}.{key}"
            if old == new or key == "train_iters" or (section == "model" and key in EXECUTION_FIELDS):
                continue  # train_iters is schedule.num_steps (checked there)
            if name == "data.prefix":
                continue  # the documents/tokens decide (below)
            if section == "schedule":
                schedule.append((name, old, new))
            else:
                why = ("the model" if section == "model" else
                       "which rows every step reads")
                refused.append((name, old, new, why))
    old_data = stored.get("data") or {}
    if "train_iters" in old_data and "num_steps" not in (stored.get("schedule") or {}):
        if old_data["train_iters"] != current["data"]["train_iters"]:  # a partial (older) record
            schedule.append(("schedule.num_steps", old_data["train_iters"], current["data"]["train_iters"]))
    if refused:
        name, old, new, why = refused[0]
        if name in ("data.documents", "data.tokens"):
            what = (f"is {old_data.get('prefix')!r} ({old_data.get('documents')} documents, "
                    f"{old_data.get('tokens')} tokens) in the checkpoint but {current['data']['prefix']!r} "
                    f"({current['data']['documents']} documents, {current['data']['tokens']} tokens) now")
            fix = "the checkpoint's dataset"
        else:
            what = f"is {old!r} in the checkpoint but {new!r} now"
            fix = f"{_setting_name(name)} = {old!r}"
        others = sorted({_setting_name(n) for n, *_ in refused[1:] + [(n, 0, 0) for n, *_ in schedule]}
                        - {_setting_name(name)})
        raise RunConfigMismatch(
            f"cannot resume {where}: {_setting_name(name)} {what} (it changes {why})"
            + (f"; also changed: {', '.join(others)}" if others else "")
            + f". To continue this run use {fix}; to start a new run use another output_dir")
    if old_data.get("prefix") and old_data.get("prefix") != current["data"]["prefix"]:
        logger.warning("resuming with the dataset at %s instead of %s (the same %s documents, %s tokens)",
                       current["data"]["prefix"], old_data.get("prefix"), current["data"]["documents"],
                       current["data"]["tokens"])
    if schedule:
        changes = "; ".join(f"{_setting_name(n)} {o!r} -> {v!r}" for n, o, v in schedule)
        num_steps = next(((o, v) for n, o, v in schedule if n == "schedule.num_steps"), None)
        effect = "the learning-rate schedule"
        if num_steps and cfg.data.order == "neox":
            effect += " and the GPT-NeoX index maps (built for num_steps x global_batch samples)"
        if not cfg.allow_schedule_change:
            raise RunConfigMismatch(
                f"cannot resume {where}: the schedule differs from the checkpoint's ({changes}), which "
                f"changes {effect}. Set TrainConfig.allow_schedule_change = True to continue with the "
                "new schedule, restore the checkpoint's values, or use another output_dir")
        if num_steps and num_steps[1] < step:
            raise RunConfigMismatch(f"cannot resume {where}: TrainConfig.num_steps {num_steps[1]} is below "
                                    f"the checkpoint's step {step}")
        if num_steps and cfg.data.order == "neox" and not _same_neox_rows(cfg, num_steps[0], step):
            raise RunConfigMismatch(
                f"cannot resume {where}: with the GPT-NeoX order, TrainConfig.num_steps {num_steps[0]} -> "
                f"{num_steps[1]} rebuilds the index maps and changes rows of steps before {step}, which "
                f"this run has trained on; keep num_steps = {num_steps[0]} or use another output_dir")
        logger.warning("continuing %s with a changed schedule from step %d (allow_schedule_change): %s",
                       where, step, changes)
        record["changes"] = list(stored.get("changes") or []) + [
            {"step": int(step), "changed": {_setting_name(n): [o, v] for n, o, v in schedule}}]
    else:
        record["changes"] = list(stored.get("changes") or [])
    return record


def _same_neox_rows(cfg: TrainConfig, old_steps: int, step: int, chunk: int = 1 << 20) -> bool:
    """Whether the GPT-NeoX maps for ``old_steps`` and for ``cfg.num_steps`` give the same rows
    for steps ``[0, step)`` (compared as the document segments of each row, in chunks)."""
    from pythia_jax.data.orders import open_order

    prefix = cfg.data.resolved_prefix()
    kw = dict(seq_len=cfg.seq_length, seed=cfg.data.seed, global_batch=cfg.global_batch,
              cache_prefix=_cache_prefix(cfg, prefix))
    old = open_order(prefix, "neox", train_iters=old_steps, **kw)
    new = open_order(prefix, "neox", train_iters=cfg.num_steps, **kw)
    n_rows = step * cfg.global_batch
    if min(len(old), len(new)) < n_rows:
        return False
    sizes = old.dataset.sizes
    for start in range(0, n_rows, chunk):
        rows = np.arange(start, min(n_rows, start + chunk), dtype=np.int64)
        a = old.maps.sample_segments(np.asarray(old.maps.shuffle_idx[rows], np.int64), sizes)
        b = new.maps.sample_segments(np.asarray(new.maps.shuffle_idx[rows], np.int64), sizes)
        if any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a, b)):
            return False
    return True


# ------------------------------------------------------------------------------------- state i/o
def _metadata(state, cfg: TrainConfig, record: dict | None = None) -> dict:
    ls = jax.device_get(state.loss_scale)
    out = {"loss_scale": {"scale": float(ls.scale), "good_steps": int(ls.good_steps),
                          "hysteresis": int(ls.hysteresis)},
           "skipped": int(jax.device_get(state.skipped)),
           "nonfinite_run": int(jax.device_get(state.nonfinite_run)),
           "tokens_seen": int(jax.device_get(state.step)) * cfg.tokens_per_step,
           "global_batch": cfg.global_batch, "seq_length": cfg.seq_length}
    if record is not None:
        from pythia_jax.checkpoint import RUN_CONFIG_KEY

        out[RUN_CONFIG_KEY] = record
    return out


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


def _initial_state(cfg: TrainConfig, setup, current: dict):
    """The state a run without checkpoints starts from, and what to record of it.

    A random init, or ``cfg.init_from`` at ``cfg.start_step`` (see ``TrainConfig.init_from``):
    a checkpoint of this project gives its params, optimizer state and loss-scale state at that
    step (its data order and model must be this run's; ``check_resume``'s rules); a GPT-NeoX
    checkpoint its fp32 master weights and ZeRO Adam moments (its iteration must be the step);
    an HF directory the params only, with zero Adam moments and the LR schedule at the step.
    """
    from pythia_jax import checkpoint as ckpt_lib

    S = int(cfg.start_step)
    if not cfg.init_from:
        return setup.init_state(cfg.seed), {}
    source = cfg.init_from
    root = _checkpoint_root(source)
    if root is not None:
        return _branch_from_checkpoint(cfg, setup, current, root, S)
    if _is_neox_checkpoint(source):
        return _branch_from_neox(cfg, setup, source, S)
    from pythia_jax.convert.sources import load_params

    config, params = load_params(source, host=True)  # numpy: placed slice by slice
    diff = ckpt_lib.config_differences(config, cfg.model)
    if diff:
        raise CheckpointError(f"{source} holds a different model: {'; '.join(diff)}")
    state = setup.state_from_params(params, step=S)
    if S:
        from pythia_jax.train.optimizer import with_schedule_count

        state = state.replace(opt_state=with_schedule_count(state.opt_state, S))
        logger.warning("branching from %s at step %d with zero Adam moments: the source holds no "
                       "optimizer state (recorded in the checkpoints as init.adam_moments = 'zero')",
                       source, S)
    return state, {"start_step": S, "adam_moments": "zero"}


def _checkpoint_root(path: str):
    """The checkpoint root of this project at ``path`` (a run's output_dir, a checkpoint root or
    a step folder), else None."""
    from pythia_jax import checkpoint as ckpt_lib

    for candidate in (path, os.path.join(path, "checkpoints")):
        if ckpt_lib.is_checkpoint_dir(candidate):
            return ckpt_lib.resolve_checkpoint_dir(candidate)[0]
    return None


def _is_neox_checkpoint(path: str) -> bool:
    p = os.path.abspath(path)
    return bool(glob.glob(os.path.join(p, "*model_states.pt")) or glob.glob(os.path.join(p, "global_step*"))
                or glob.glob(os.path.join(p, "mp_rank_*")))


def _branch_from_checkpoint(cfg: TrainConfig, setup, current: dict, root, S: int):
    """Params, optimizer and loss-scale state of step ``S`` of another run's checkpoints."""
    from pythia_jax.checkpoint import TrainCheckpointer, read_run_config

    reader = TrainCheckpointer(root, async_save=False)  # a reader: never cleans up the source
    try:
        steps = reader.all_steps()
        if S not in steps:
            raise CheckpointError(f"cannot branch from {root} at step {S}: it has no step {S}; "
                                  f"its steps are {_step_list(steps)} (TrainConfig.start_step)")
        stored = read_run_config(root, S)
        if stored and not stored.get("partial"):
            # the branch may change the transform, nothing else that decides the rows or the model
            stored = {**stored, "data": {**stored.get("data", {}), "transform": current["data"]["transform"]}}
            check_resume(stored, current, cfg, S, f"a branch of {root}/{S}")
        abstract = {"params": setup.abstract_state.params, "opt_state": setup.abstract_state.opt_state}
        restored = reader.restore(step=S, abstract_state=abstract)
    finally:
        reader.close()
    logger.info("branching from %s at step %d (params, Adam moments and loss scale of the source)", root, S)
    return _state_from_restored(setup, restored), {"start_step": S, "adam_moments": "source"}


def _branch_from_neox(cfg: TrainConfig, setup, source: str, S: int):
    """fp32 master weights and ZeRO Adam moments of a GPT-NeoX checkpoint at iteration ``S``."""
    from pythia_jax.checkpoint import config_differences
    from pythia_jax.convert.neox import read_neox_checkpoint
    from pythia_jax.train.continuation import neox_train_state

    # a global_stepN/ folder is read as it is (its iteration is checked below); a parent folder
    # of several is asked for global_step<S>
    is_step_dir = bool(glob.glob(os.path.join(source, "*model_states.pt")) or
                       glob.glob(os.path.join(source, "mp_rank_*")))
    config, _, neox_ckpt = read_neox_checkpoint(source, step=None if is_step_dir else (S or None))
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


def _step_list(steps) -> str:
    steps = list(steps)
    if not steps:
        return "none"
    return ", ".join(map(str, steps)) if len(steps) <= 12 else \
        f"{', '.join(map(str, steps[:6]))}, …, {', '.join(map(str, steps[-3:]))} ({len(steps)} in all)"


def export_hf(cfg: TrainConfig, params, out_dir: str) -> str | None:
    """Write ``params`` as an HF directory (process 0).

    One process: ``write_hf_dir`` fetches one tensor (one layer's slice) at a time from the
    devices. Several: each array is gathered to the hosts in turn (``process_allgather``), so no
    device ever holds more than one replicated array.
    """
    from pythia_jax.convert.hf import write_hf_dir

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), params)
    if jax.process_index() != 0:
        return None
    return write_hf_dir(cfg.model, params, out_dir, dtype=cfg.export_dtype, overwrite=True)


# -------------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, devices=None, max_steps: int | None = None) -> TrainResult:
    """Run (or resume) training as configured. ``max_steps``: stop after this many steps of this
    invocation (tests, benchmarks); the schedule and data order still follow ``cfg.num_steps``."""
    from pythia_jax.checkpoint import TrainCheckpointer
    from pythia_jax.train import builder
    from pythia_jax.train.metrics import MetricWriter, Throughput, peak_flops_per_device
    from pythia_jax.train.preemption import PreemptionGuard

    from pythia_jax.train import run_lock

    maybe_initialize_distributed(cfg.distributed)
    # One train per run directory: a second one is refused before it touches anything.
    lock = run_lock.acquire(cfg.output_dir, local_output_dir(cfg.output_dir))
    try:
        return _train(cfg, devices, max_steps)
    finally:
        if lock is not None:
            lock.release()


def _newest_run_config(ckpt) -> dict | None:
    """The run record of the newest step that looks complete, or None (no such step)."""
    from pythia_jax.checkpoint import read_run_config

    if not ckpt.all_steps():
        return None
    try:
        return read_run_config(ckpt.directory)
    except CheckpointError:  # no usable step: restore() reports each and the run starts over
        return None


def _train(cfg: TrainConfig, devices, max_steps: int | None) -> TrainResult:
    from pythia_jax.checkpoint import RUN_CONFIG_KEY, TrainCheckpointer
    from pythia_jax.train import builder
    from pythia_jax.train.metrics import MetricsLog, MetricWriter, Throughput, peak_flops_per_device
    from pythia_jax.train.preemption import PreemptionGuard

    out = cfg.output_dir
    # Cheap checks first: a checkpoint directory of another model shape, or of a run with another
    # data order or schedule, fails before compiling.
    ckpt = TrainCheckpointer(os.path.join(out, "checkpoints"), save_steps=cfg.checkpoint_schedule(),
                             async_save=cfg.async_checkpointing, max_to_keep=cfg.keep_checkpoints,
                             model_config=cfg.model)
    step = None
    ok = False
    try:
        current = run_config(cfg)
        stored = _newest_run_config(ckpt)
        run_record = current
        if stored is not None:
            run_record = check_resume(stored, current, cfg, stored["step"], f"{ckpt.directory}/{stored['step']}")
        setup = builder.build(cfg, devices, compile_eval=cfg.eval_every > 0)
        data_it = make_data_iterator(cfg, setup)

        # ---- restore or initialise
        abstract = {"params": setup.abstract_state.params, "opt_state": setup.abstract_state.opt_state}
        restored = ckpt.restore(abstract_state=abstract, data_iterator=data_it)
        if restored is not None:
            if stored is None or restored.step != stored["step"]:  # fell back to an older step
                older = (restored.metadata or {}).get(RUN_CONFIG_KEY)
                run_record = check_resume(older, current, cfg, restored.step, f"{ckpt.directory}/{restored.step}")
            state = _state_from_restored(setup, restored)
            if data_it.step != restored.step:
                data_it.set_step(restored.step)
        else:
            state, branch = _initial_state(cfg, setup, current)
            run_record = {**current, "init": {**current["init"], **branch}}
        step = int(jax.device_get(state.step))
        if data_it.step != step:
            data_it.set_step(step)
        last_saved = restored.step if restored is not None else None  # on disk already
        metrics_log = MetricsLog(os.path.join(local_output_dir(out), "metrics.jsonl"))
        metrics_log.restart_at(step)  # the steps after the restored one are redone: one row each
        writer = MetricWriter(os.path.join(local_output_dir(out), "tensorboard") if cfg.tensorboard else None, cfg.num_steps,
                              initial_step=step, progress_bar=cfg.progress_bar, tensorboard=cfg.tensorboard)
        writer.message(f"{'resumed from ' + str(ckpt.directory) + '/' + str(step) if restored else 'starting'}: "
                       f"{cfg.model.num_params():,} parameters, mesh {dict(setup.mesh.shape)}, "
                       f"{cfg.global_batch} x {cfg.seq_length} tokens per step, steps {step} -> {cfg.num_steps}")

        def save(force: bool = False) -> None:
            """Checkpoint ``state`` at ``step`` when the schedule says so (or ``force``); the
            metadata's host reads happen only then, not on every step. A step already saved (or
            restored from) is not saved again."""
            nonlocal last_saved
            if step != last_saved and (force or ckpt.should_save(step)):
                ckpt.save(step, state.params, state.opt_state, data_it, _metadata(state, cfg, run_record),
                          force=force)
                last_saved = step

        save()
        throughput = Throughput(cfg.model, cfg.seq_length, cfg.tokens_per_step, setup.num_devices,
                                peak_flops_per_device(cfg.peak_flops_per_device, setup.mesh.devices.flat[0]))
        losses: dict[int, float] = {}
        eval_losses: dict[int, float] = {}
        stopped = None
        end = cfg.num_steps if max_steps is None else min(cfg.num_steps, step + max_steps)

        # Metrics are fetched one step late: step n+1 is already queued on the devices while the
        # host reads step n's, so the host's work (data, logging) does not leave them idle.
        in_flight: list[tuple[int, dict]] = []  # (step, its metrics on device), oldest first
        eval_data: list[dict] | None = None

        def record(done: int, device_metrics: dict, changed=None) -> dict[str, float]:
            """Host side of step ``done``: wait for it, then record and log its metrics
            (``changed``: the row transform's (rows, tokens) changed in the step's batch)."""
            metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            throughput.add_steps()
            losses[done] = metrics["loss"]
            row = {"step": done, **{k: metrics[k] for k in ("loss", "grad_norm", "lr", "loss_scale",
                                                            "skipped") if k in metrics}}
            if changed is not None:
                row["transform_rows"], row["transform_tokens"] = changed
            if done % cfg.log_every == 0 or done == end:
                row.update(throughput.measure())
                writer.write(done, {k: v for k, v in row.items() if k != "step"})
            metrics_log.append(row)
            return metrics

        def settle(keep: int = 0) -> None:
            """Record the steps in flight, all but the newest ``keep``; stop on divergence."""
            while len(in_flight) > keep:
                done, device_metrics, changed = in_flight.pop(0)
                metrics = record(done, device_metrics, changed)
                if metrics["nonfinite_run"] >= cfg.max_nonfinite_steps:
                    while in_flight:  # the step already queued is recorded and saved too
                        record(*in_flight.pop(0))
                    save(force=True)
                    ckpt.wait_until_finished()
                    raise TrainingDiverged(
                        f"{int(metrics['nonfinite_run'])} non-finite losses in a row (last at step {done}); "
                        f"saved {ckpt.directory}/{step} and stopped. Lower the learning rate or check the data.")

        throughput.start()
        # multi-process jobs without JAX's preemption service agree on a stop every log_every steps
        # (an all-gather each step would make the host wait for the step just queued)
        with PreemptionGuard(sync_every=cfg.log_every) as guard:
            while step < end:
                # ---- iterate + step
                batch = setup.put_batch(next(data_it))
                changed = _transform_changes(data_it, step)
                state, device_metrics = setup.train_step(state, batch)
                step += 1
                writer.advance()
                in_flight.append((step, device_metrics, changed))
                settle(keep=1)  # the previous step, while this one runs
                ckpt.check_for_errors()  # a failed background save stops the run within a step
                # ---- evaluate
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.num_steps):
                    settle()
                    if eval_data is None:  # read once per run, reused at every evaluation
                        eval_data = list(make_eval_batches(cfg, setup))
                    eval_losses[step] = evaluate(setup, state.params, eval_data)
                    writer.write(step, {"loss": eval_losses[step]}, prefix="eval")
                    metrics_log.append({"step": step, "eval_loss": eval_losses[step]})
                    throughput.start()
                # ---- checkpoint
                save()
                if guard.should_stop(step):
                    settle()
                    save(force=True)
                    writer.message(guard.message)
                    stopped = "preempted"
                    break
            settle()
        if stopped is None:  # the last step of this invocation is always resumable
            save(force=True)
        ckpt.wait_until_finished()
        hf_dir = None
        if cfg.export_hf and stopped is None and step == cfg.num_steps:
            hf_dir = export_hf(cfg, state.params, cfg.export_hf_dir)
        writer.close()
        ok = True
        return TrainResult(final_step=step, params=state.params, losses=losses, eval_losses=eval_losses,
                           stopped=stopped, hf_dir=hf_dir)
    except KeyboardInterrupt:
        _log_interrupt(ckpt, step)
        raise
    finally:
        ckpt.close(check=ok)  # an error already on its way is not replaced by a save's


def _transform_changes(data_it, step: int) -> tuple[int, int] | None:
    """(rows, tokens) the row transform changed in ``step``'s global batch, or None when the step
    was not transformed. Multi-process: summed over the hosts (one small all-gather, only for
    steps inside the transform's window)."""
    stats = data_it.pop_transform_stats(step) if hasattr(data_it, "pop_transform_stats") else None
    source = getattr(data_it, "source", None)
    if source is None or not source.transforms_step(step):
        return None
    counts = np.array([stats.rows_changed, stats.tokens_changed] if stats else [0, 0], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(0)
    return int(counts[0]), int(counts[1])


def _log_interrupt(ckpt, step: int | None) -> None:
    """Ctrl-C: say how many steps since the newest checkpoint are lost (after a save in flight ends)."""
    import logging

    log = logging.getLogger(__name__)
    if step is None:
        log.warning("interrupted before the first step; nothing was trained")
        return
    try:
        ckpt.wait_until_finished()
        saved = [s for s in ckpt.all_steps() if s <= step]
    except Exception:  # noqa: BLE001 - the report must not hide the interrupt
        saved = []
    if not saved:
        log.warning("interrupted at step %d with no checkpoint saved: all %d steps are lost", step, step)
        return
    last = max(saved)
    log.warning("interrupted at step %d: the newest checkpoint is step %d, so %d step(s) since it are lost; "
                "the same command resumes from step %d", step, last, step - last, last)

