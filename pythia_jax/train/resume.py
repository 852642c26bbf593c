"""The run record stored in every checkpoint and the check that a resume continues the same run.

:func:`run_config` is what a checkpoint records of its run (data order, schedule, model, how it
started); :func:`check_resume` compares a checkpoint's record with the current configuration and
refuses, with one line, a resume that would train on other rows or another model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from pythia_jax.checkpoint import RunConfigMismatch
from pythia_jax.io_utils import is_url
from pythia_jax.train.batches import cache_prefix
from pythia_jax.train.config import TrainConfig

logger = logging.getLogger(__name__)

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
    (``TransformSpec.to_dict()``: name, parameters, step window; None without one). Step ``n``
    trained on rows ``[n·global_batch, (n+1)·global_batch)`` of that order.
    ``schedule``: ``num_steps`` and the optimizer settings, the LR schedule's fields resolved.
    ``model``: ``ModelConfig.to_dict()``. ``init``: parameter seed, ``init_from`` and
    ``start_step`` (used when the run starts; a resume keeps the record of the run's start and
    refuses other values, ``check_resume``), and for a branch ``adam_moments`` ("source" or
    "zero").
    """
    from pythia_jax.data.indexed import Index

    prefix = cfg.data.resolved_prefix()
    sizes = Index(prefix + ".idx").sizes
    o = cfg.optimizer
    spec = cfg.data.transform_spec()
    transform = spec.to_dict() if spec is not None else None
    return {
        "version": RUN_CONFIG_VERSION,
        "data": {"prefix": prefix if is_url(prefix) else os.path.abspath(prefix),
                 "documents": int(len(sizes)), "tokens": int(np.asarray(sizes).sum(dtype=np.int64)),
                 "order": cfg.data.order, "seed": int(cfg.data.seed), "global_batch": int(cfg.global_batch),
                 "seq_len": int(cfg.seq_length), "train_iters": int(cfg.num_steps), "transform": transform},
        "schedule": {"num_steps": int(cfg.num_steps), "max_lr": float(o.max_lr), "min_lr": float(cfg.min_lr),
                     "warmup_steps": float(cfg.warmup_steps), "decay_steps": int(cfg.decay_steps),
                     "decay_style": o.decay_style,
                     "b1": float(o.b1), "b2": float(o.b2), "eps": float(o.eps),
                     "weight_decay": float(o.weight_decay), "clip_norm": float(o.clip_norm),
                     "loss_scaling": bool(o.loss_scaling), "initial_scale_power": int(o.initial_scale_power),
                     "loss_scale_window": int(o.loss_scale_window), "hysteresis": int(o.hysteresis),
                     "min_loss_scale": float(o.min_loss_scale),
                     "row_parallel_bias_copies": int(o.row_parallel_bias_copies)},
        "model": cfg.model.to_dict(),
        # init_from as an absolute path (as data.prefix): a resume from another working folder, and
        # the fix its refusal names, mean the same source
        "init": {"seed": int(cfg.seed), "start_step": int(cfg.start_step),
                 "init_from": cfg.init_from if cfg.init_from is None or is_url(cfg.init_from)
                 else os.path.abspath(os.path.expanduser(cfg.init_from))},
        "changes": [],
    }


def check_resume(stored: dict | None, current: dict, cfg: TrainConfig, step: int, where: str, *,
                 branch: bool = False) -> dict:
    """Refuse to continue a run from checkpoint ``step`` under a different configuration.

    ``stored``: the checkpoint's record (``checkpoint.read_run_config``; a partial one for
    checkpoints that predate it, None for none); ``current``: ``run_config(cfg)``. Refused
    (``RunConfigMismatch``, one line naming the setting, both values and the way out):

    * another start (``_resumed_init``): an ``init_from`` / ``start_step`` other than the
      recorded ones (leaving both unset is accepted), or, for a run that started from a random
      init, another ``TrainConfig.seed``: a resume continues from its own checkpoint and never
      reads them, so a record claiming them would be false;
    * a different data order: source (its documents/tokens), order, seed, global batch,
      sequence length, transform: the rows already trained on would not be this order's rows;
    * a different model (architecture fields of ``ModelConfig``);
    * a different schedule: ``num_steps`` (the LR schedule's decay/warmup and, with the GPT-NeoX
      order, the index maps) or any optimizer setting, unless ``cfg.allow_schedule_change``.
      Even then, with the GPT-NeoX order a new ``num_steps`` must leave the rows of steps
      ``[0, step)`` unchanged (checked on the two index maps), and must be ``>= step``.

    ``branch``: ``stored`` is the record of another run's step that a new run branches from
    (``where`` names it): the start and the transform are not compared (a branch is where an
    intervention changes the rows from then on), and the messages say how to branch.

    Returns the record to store from now on: ``current`` with the accepted changes appended to
    ``changes`` (``{"step", "changed": {setting: [old, new]}}``) and, on a resume, the run's
    recorded ``init`` carried forward (its ``adam_moments`` marker included). A moved copy of
    the same data (same documents and tokens) is accepted with a warning.
    """
    record = dict(current)
    if not stored:
        return record
    if branch:
        stored = {**stored, "data": {**stored.get("data", {}), "transform": current["data"]["transform"]}}
    else:
        record["init"] = _resumed_init(stored, current, step, where)
    refused, schedule, numerics = _differences(stored, current)
    if refused:
        raise _refusal(stored, current, refused, schedule, where, branch)
    old_prefix = (stored.get("data") or {}).get("prefix")
    if old_prefix and old_prefix != current["data"]["prefix"]:
        logger.warning("%s with the dataset at %s instead of %s (the same %s documents, %s tokens)",
                       "branching" if branch else "resuming", current["data"]["prefix"], old_prefix,
                       current["data"]["documents"], current["data"]["tokens"])
    # the history up to this step (a branch shares its source's up to the branch point only)
    record["changes"] = [c for c in stored.get("changes") or [] if not branch or int(c.get("step", 0)) <= step]
    if schedule:
        _check_schedule_change(schedule, cfg, step, where, branch)
    if numerics:  # accepted (an execution choice), but the record must say from which step
        logger.warning("%s with %s: recorded in the run's changes from step %d", "branching" if branch else "resuming",
                       ", ".join(f"{_setting_name(n)} {v!r} (was {o!r})" for n, o, v in numerics), step)
    if schedule or numerics:
        record["changes"].append(
            {"step": int(step), "changed": {_setting_name(n): [o, v] for n, o, v in schedule + numerics}})
    return record


def _same_source(a: str | None, b: str | None) -> bool:
    """Whether two ``init_from`` values name the same source (equal, or the same local folder)."""
    if a == b:
        return True
    if a is None or b is None or is_url(a) or is_url(b):
        return False
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _describe_start(init: dict) -> str:
    if init.get("init_from") is None:
        return f"a random init (TrainConfig.seed {init.get('seed')!r}, no init_from)"
    return f"TrainConfig.init_from {init['init_from']!r} at start_step {init.get('start_step')!r}"


def _resumed_init(stored: dict, current: dict, step: int, where: str) -> dict:
    """The ``init`` record a resume keeps: the run's own (carried forward from the checkpoint
    being resumed), after refusing a command that names another start (see ``check_resume``)."""
    old = stored.get("init")
    if not isinstance(old, dict):  # a partial (older) record: its start is unknown
        return current["init"]
    new = current["init"]
    names_a_start = new.get("init_from") is not None or new.get("start_step", 0) != 0
    if old.get("init_from") is None:  # a random init: the seed decided the weights
        differs = names_a_start or new.get("seed") != old.get("seed")
    else:  # a branch: a command without init_from / start_step resumes it as well
        # start_step 0 with the same source: the step came from the source (a step folder, a GPT-NeoX
        # global_stepN/), which is what the record holds
        differs = names_a_start and (not _same_source(old["init_from"], new.get("init_from"))
                                     or new.get("start_step") not in (0, old.get("start_step")))
    if differs:
        if old.get("init_from") is None:
            keep = (f"TrainConfig.seed = {old.get('seed')!r} and leave init_from / start_step unset"
                    if names_a_start else f"TrainConfig.seed = {old.get('seed')!r}")
        else:
            keep = (f"TrainConfig.init_from = {old['init_from']!r} and start_step = {old.get('start_step')!r} "
                    "(or leave both unset)")
        raise RunConfigMismatch(
            f"cannot resume {where}: this run started from {_describe_start(old)}, but the command "
            f"asks for {_describe_start(new)}, which a resume would not use (it continues from the run's "
            f"own step {step}). To continue this run use {keep}; to start from {_describe_start(new)} "
            "use a new output_dir")
    return dict(old)


NUMERICS_FIELDS = ("dtype", "param_dtype")  # execution fields that change the numbers: recorded when changed


def _differences(stored: dict, current: dict):
    """The settings that differ between two run records: ``(refused, schedule, numerics)``, where
    ``refused`` holds ``(name, old, new, what it changes)`` of the data order and the model,
    ``schedule`` holds ``(name, old, new)`` of the schedule (accepted with the flag) and
    ``numerics`` those of the model's compute and parameter dtypes (accepted, recorded)."""
    from pythia_jax.checkpoint import EXECUTION_FIELDS

    refused: list[tuple[str, Any, Any, str]] = []
    schedule: list[tuple[str, Any, Any]] = []
    numerics: list[tuple[str, Any, Any]] = []
    for section in ("data", "model", "schedule"):
        old_section, new_section = stored.get(section), current.get(section, {})
        if not isinstance(old_section, dict):
            continue
        for key, old in old_section.items():
            new = new_section.get(key)
            name = f"{section}.{key}"
            if (name == "schedule.warmup_steps" and "decay_style" not in old_section and isinstance(old, int)
                    and isinstance(new, float)):
                new = int(new)  # a record written before the warmup was stored unrounded (and the decay style)
            if section == "model" and key in NUMERICS_FIELDS and old != new:
                numerics.append((name, old, new))
                continue
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
    return refused, schedule, numerics


def _refusal(stored: dict, current: dict, refused: list, schedule: list, where: str,
             branch: bool = False) -> RunConfigMismatch:
    """The one-line error for a changed data order or model: the first setting, both values, the
    other changed settings and the way out (for a ``branch``: the source's values)."""
    old_data = stored.get("data") or {}
    name, old, new, why = refused[0]
    if name in ("data.documents", "data.tokens"):
        what = (f"is {old_data.get('prefix')!r} ({old_data.get('documents')} documents, "
                f"{old_data.get('tokens')} tokens) in the checkpoint but {current['data']['prefix']!r} "
                f"({current['data']['documents']} documents, {current['data']['tokens']} tokens) now")
        fix = "the checkpoint's dataset"
    elif name == "data.transform":  # a record, not one binding: name the gin bindings that make it
        what = f"is {old!r} in the checkpoint but {new!r} now"
        fix = ("no transform (leave DataConfig.transform unset)" if not old else
               f"DataConfig.transform = {old.get('name')!r}, transform_params = {old.get('params')!r} and "
               f"transform_steps = {tuple(old['steps']) if old.get('steps') else None!r}")
    else:
        what = f"is {old!r} in the checkpoint but {new!r} now"
        fix = f"{_setting_name(name)} = {old!r}"
    others = sorted({_setting_name(n) for n, *_ in refused[1:] + [(n, 0, 0) for n, *_ in schedule]}
                    - {_setting_name(name)})
    also = f"; also changed: {', '.join(others)}" if others else ""
    if branch:
        return RunConfigMismatch(
            f"cannot branch from {where}: {_setting_name(name)} {what} (it changes {why}){also}. A branch "
            f"continues the source's rows and model (only the row transform may change): use {fix}")
    return RunConfigMismatch(
        f"cannot resume {where}: {_setting_name(name)} {what} (it changes {why}){also}"
        f". To continue this run use {fix}; to start a new run use another output_dir")


def _check_schedule_change(schedule: list[tuple[str, Any, Any]], cfg: TrainConfig, step: int, where: str,
                           branch: bool = False) -> None:
    """Accept a changed schedule (with a warning) only with ``cfg.allow_schedule_change``, a
    ``num_steps`` not below ``step`` and, with the GPT-NeoX order, the rows of steps before
    ``step`` unchanged; else raise ``RunConfigMismatch`` (for a ``branch``, saying how to branch)."""
    changes = "; ".join(f"{_setting_name(n)} {o!r} -> {v!r}" for n, o, v in schedule)
    num_steps = next(((o, v) for n, o, v in schedule if n == "schedule.num_steps"), None)
    effect = "the learning-rate schedule"
    if num_steps and cfg.data.order == "neox":
        effect += " and the GPT-NeoX index maps (built for num_steps x global_batch samples)"
    cannot = f"cannot branch from {where}" if branch else f"cannot resume {where}"
    if not cfg.allow_schedule_change:
        if branch:
            raise RunConfigMismatch(
                f"{cannot}: the schedule differs from the source's ({changes}), which changes {effect}. "
                "Set TrainConfig.allow_schedule_change = True to branch with the new schedule, or use "
                "the source's values")
        raise RunConfigMismatch(
            f"{cannot}: the schedule differs from the checkpoint's ({changes}), which "
            f"changes {effect}. Set TrainConfig.allow_schedule_change = True to continue with the "
            "new schedule, restore the checkpoint's values, or use another output_dir")
    if num_steps and num_steps[1] < step:
        raise RunConfigMismatch(f"{cannot}: TrainConfig.num_steps {num_steps[1]} is below "
                                f"the checkpoint's step {step}")
    if num_steps and cfg.data.order == "neox" and not _same_neox_rows(cfg, num_steps[0], step):
        raise RunConfigMismatch(
            f"{cannot}: with the GPT-NeoX order, TrainConfig.num_steps {num_steps[0]} -> "
            f"{num_steps[1]} rebuilds the index maps and changes rows of steps before {step}, which "
            f"{'the source' if branch else 'this run'} has trained on; keep num_steps = {num_steps[0]}"
            + ("" if branch else " or use another output_dir"))
    logger.warning("%s %s with a changed schedule from step %d (allow_schedule_change): %s",
                   "branching from" if branch else "continuing", where, step, changes)


def _same_neox_rows(cfg: TrainConfig, old_steps: int, step: int, chunk: int = 1 << 20) -> bool:
    """Whether the GPT-NeoX maps for ``old_steps`` and for ``cfg.num_steps`` give the same rows
    for steps ``[0, step)`` (compared as the document segments of each row, in chunks)."""
    from pythia_jax.data.orders import open_order

    prefix = cfg.data.resolved_prefix()
    kw = dict(seq_len=cfg.seq_length, seed=cfg.data.seed, global_batch=cfg.global_batch,
              cache_prefix=cache_prefix(cfg, prefix))
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
