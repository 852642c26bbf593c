"""fp32 master weights and Adam moments from DeepSpeed ZeRO stage 1/2 optimizer shards.

``zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt`` hold, per data-parallel rank, one flat fp32
partition of every param group (``single_partition_of_fp32_groups``) and the base (Adam)
optimizer's state of that partition (what DeepSpeed's ZeRO stage 1/2 optimizer,
``DeepSpeedZeroOptimizer.state_dict``, saves). Per TP rank the partitions of every data-parallel
rank are laid end to end and cut by the ``param_shapes`` recorded in
``mp_rank_{tp}_model_states.pt``, the protocol of DeepSpeed's ``utils/zero_to_fp32.py``; Adam's
``exp_avg`` / ``exp_avg_sq`` are cut the same way, then the TP ranks are merged like the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from pythia_jax.config import ModelConfig
from pythia_jax.convert.hf import ParamAssembler
from pythia_jax.convert.neox.keys import REPLICATED, ROW_BIAS, SEQ_KEY
from pythia_jax.convert.neox.layout import NeoxCheckpoint
from pythia_jax.convert.neox.read import LayerRoles, LayerSource, detect_roles, merge_layer
from pythia_jax.convert.neox.torch_io import plain_value, require_torch, torch_load
from pythia_jax.errors import CheckpointError
from pythia_jax.host_memory import to_numpy

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class NeoxOptimizerState:
    """fp32 master weights and Adam moments of a ZeRO checkpoint, as params trees (float32)."""

    master: dict[str, Any]
    exp_avg: dict[str, Any]
    exp_avg_sq: dict[str, Any]
    step: int                      # Adam updates applied (bias-correction count)
    iteration: int | None          # training iteration of the checkpoint (batches consumed)
    scheduler_steps: int | None    # LR scheduler steps (num_iters), when saved
    hyperparams: dict[str, Any]    # lr / betas / eps / weight_decay of the param groups when saved


class _FlatGroup:
    """One param group's flat vector laid out across data-parallel partitions, read by slices."""

    def __init__(self, parts: Sequence[Any], what: str):
        self.parts = list(parts)
        self.what = what
        self.bounds = np.cumsum([0] + [int(p.numel()) for p in self.parts])

    @property
    def numel(self) -> int:
        return int(self.bounds[-1])

    def slice(self, start: int, length: int) -> Any:
        torch = require_torch()
        end = start + length
        if end > self.numel:
            raise CheckpointError(f"{self.what}: flat partitions hold {self.numel} values, "
                                  f"the recorded parameter shapes need at least {end}")
        pieces = []
        for k, part in enumerate(self.parts):
            lo, hi = int(self.bounds[k]), int(self.bounds[k + 1])
            a, b = max(start, lo), min(end, hi)
            if a < b:
                pieces.append(part.reshape(-1)[a - lo:b - lo])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _zero_groups(files: Sequence[str]) -> tuple[list[_FlatGroup], list[_FlatGroup], list[_FlatGroup],
                                                  int | None, dict[str, Any]]:
    """Load one TP rank's ZeRO shards -> (fp32, exp_avg, exp_avg_sq) flat groups, step, hyperparams."""
    shards = _load_zero_shards(files)
    n_groups = len(shards[0][1]["single_partition_of_fp32_groups"])
    fp32: list[list[Any]] = [[] for _ in range(n_groups)]
    avg: list[list[Any]] = [[] for _ in range(n_groups)]
    avg_sq: list[list[Any]] = [[] for _ in range(n_groups)]
    step: int | None = None
    hyper: dict[int, Any] = {}
    for file, osd in shards:
        groups = osd["single_partition_of_fp32_groups"]
        if len(groups) != n_groups:
            raise CheckpointError(f"{file}: {len(groups)} param groups, expected {n_groups}")
        states, paddings, steps, shard_hyper = _shard_adam_states(file, osd, n_groups)
        if step is None and steps:
            step = int(plain_value(steps[0]))
        for g, values in shard_hyper.items():
            hyper.setdefault(g, values)
        for g in range(n_groups):
            fp32[g].append(groups[g])
            for key, dest in (("exp_avg", avg), ("exp_avg_sq", avg_sq)):
                if key not in states[g]:
                    raise CheckpointError(f"{file}: param group {g} has no {key} (not an Adam state)")
                t = states[g][key].reshape(-1)
                dest[g].append(t[: t.numel() - paddings[g]])
    where = os.path.dirname(files[0])
    return ([_FlatGroup(p, f"{where} fp32 group {g}") for g, p in enumerate(fp32)],
            [_FlatGroup(p, f"{where} exp_avg group {g}") for g, p in enumerate(avg)],
            [_FlatGroup(p, f"{where} exp_avg_sq group {g}") for g, p in enumerate(avg_sq)],
            step, {str(k): v for k, v in hyper.items()})


def _load_zero_shards(files: Sequence[str]) -> list[tuple[str, Mapping[str, Any]]]:
    """(file, optimizer_state_dict) of one TP rank's shards, checked to be ZeRO stage 1/2 and complete."""
    shards = []
    for file in files:
        state = torch_load(file)
        osd = state.get("optimizer_state_dict") if isinstance(state, Mapping) else None
        if not isinstance(osd, Mapping):
            raise CheckpointError(f"{file} has no optimizer_state_dict (not a DeepSpeed ZeRO shard)")
        if "local_sub_partitions_of_fp32_groups" in osd:
            raise CheckpointError(f"{file} is a legacy ZeRO stage-1 shard (DeepSpeed < 0.3.17), "
                                  "which is not supported")
        if "single_partition_of_fp32_groups" not in osd:
            raise CheckpointError(f"{file}: no single_partition_of_fp32_groups "
                                  f"(keys: {sorted(map(str, osd))[:10]}); only ZeRO stage 1/2 shards are supported")
        stage = plain_value(osd.get("zero_stage", 1))
        if stage not in (1, 2, None):
            raise CheckpointError(f"{file}: ZeRO stage {stage} is not supported (stage 1 or 2 only)")
        shards.append((file, osd))
    count = plain_value(shards[0][1].get("partition_count"))
    if isinstance(count, (list, tuple)):
        count = max(plain_value(c) for c in count)
    if count is not None and int(count) != len(files):
        raise CheckpointError(f"{os.path.dirname(files[0])}: ZeRO partition_count is {count} but "
                              f"{len(files)} optimizer shard(s) were found for this model rank")
    return shards


def _shard_adam_states(file: str, osd: Mapping[str, Any], n_groups: int
                       ) -> tuple[list[Any], list[int], list[Any], dict[int, dict[str, Any]]]:
    """One shard's (Adam state per param group, padding per group, recorded step counts in order
    of precedence, hyperparameters per group).

    A torch ``state_dict`` base state keeps the groups' alignment padding (``group_paddings``
    says how much); the elastic (list) form has it removed already.
    """
    base = osd.get("base_optimizer_state")
    paddings = [int(plain_value(p)) for p in (osd.get("group_paddings") or [0] * n_groups)]
    steps: list[Any] = []
    hyper: dict[int, dict[str, Any]] = {}
    if isinstance(base, Mapping):  # a torch optimizer state_dict: states keep their padding
        states = [base["state"][g] if g in base["state"] else base["state"][str(g)] for g in range(n_groups)]
        for g, group in enumerate(base.get("param_groups") or []):
            if "step" in group:
                steps.append(group["step"])
            hyper.setdefault(g, {k: plain_value(v) for k, v in group.items() if k != "params"})
    elif isinstance(base, (list, tuple)):  # elastic form: padding already removed
        states = list(base)
        paddings = [0] * n_groups
    else:
        raise CheckpointError(f"{file}: unrecognised base_optimizer_state {type(base).__name__}")
    if "base_optimizer_state_step" in osd:
        steps.append(osd["base_optimizer_state_step"])
    steps += [states[g]["step"] for g in range(n_groups) if "step" in states[g]]
    return states, paddings, steps, hyper


def _cut_groups(groups: Sequence[_FlatGroup], param_shapes: Sequence[Mapping[str, Any]],
                where: str) -> dict[tuple[int, str], Any]:
    """Cut flat groups by the recorded (name -> shape) lists -> {(layer idx, key): tensor}."""
    if len(param_shapes) != len(groups):
        raise CheckpointError(f"{where}: param_shapes has {len(param_shapes)} groups, the optimizer "
                              f"shards {len(groups)}")
    out: dict[tuple[int, str], Any] = {}
    for shapes, flat in zip(param_shapes, groups):
        offset = 0
        for name, shape in shapes.items():
            m = SEQ_KEY.match(name)
            if not m:
                raise CheckpointError(f"{where}: cannot map parameter name {name!r} to a layer")
            shape = tuple(int(d) for d in shape)
            n = int(np.prod(shape)) if shape else 1
            out[(int(m.group(1)), m.group(2))] = flat.slice(offset, n).reshape(shape)
            offset += n
        # DeepSpeed aligns each flat group to 2·dp elements; anything beyond that is an error.
        if flat.numel - offset > 2 * max(1, len(flat.parts)):
            raise CheckpointError(f"{where}: optimizer group holds {flat.numel} values but its "
                                  f"parameters only {offset}")
    return out


def read_neox_optimizer_state(ckpt: NeoxCheckpoint, config: ModelConfig, *,
                              progress: bool = False) -> NeoxOptimizerState | None:
    """fp32 master weights + Adam moments of a ZeRO stage 1/2 checkpoint (None without shards).

    Row-parallel biases of a TP>1 parallel-residual model: the master weight is the sum of the
    ranks' copies (as for the weights); the moments are rank 0's (every rank sees the same
    gradient, so their moments are equal). Each copy moved one Adam step per step, so the sum
    moved TP: continue with ``row_parallel_bias_copies=TP`` (``optimizer_settings`` returns it;
    ``pythia_jax.train.continuation.neox_train_state`` records it in the metadata) and the
    continuation is exact. Raises ``CheckpointError`` for missing or inconsistent shards.
    """
    if not ckpt.optim_files:
        return None
    require_torch()  # fails early with a clear message when torch is missing
    source = LayerSource(ckpt)
    roles = detect_roles(source, config.num_layers)
    per_rank: list[tuple[dict, dict, dict]] = []
    step: int | None = None
    iteration = sched = None
    hyper: dict[str, Any] = {}
    for t in range(ckpt.tp):
        param_shapes, engine = _engine_state(ckpt, t)
        if t == 0:
            iteration, sched = _saved_counts(engine)
        files = [ckpt.optim_files[t][d] for d in sorted(ckpt.optim_files[t])]
        fp32, avg, avg_sq, rank_step, rank_hyper = _zero_groups(files)
        step = rank_step if step is None else step
        hyper = hyper or rank_hyper
        where = f"{ckpt.directory} (model rank {t})"
        per_rank.append((_cut_groups(fp32, param_shapes, where), _cut_groups(avg, param_shapes, where),
                         _cut_groups(avg_sq, param_shapes, where)))
    if step is None:
        step = sched if sched is not None else iteration
        if step is None:
            raise CheckpointError(f"{ckpt.directory}: the optimizer shards record no step count")
        logger.warning(f"{ckpt.directory}: Adam step count not stored; using {step}")
    master, exp_avg, exp_avg_sq = (_merged_tree(per_rank, which, roles, ckpt, config) for which in range(3))
    return NeoxOptimizerState(master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, step=int(step),
                              iteration=iteration, scheduler_steps=sched, hyperparams=hyper)


def _engine_state(ckpt: NeoxCheckpoint, t: int) -> tuple[list[Mapping[str, Any]], Mapping[str, Any]]:
    """(param_shapes per param group, engine state) of model rank ``t``'s mp_rank file."""
    mp_file = ckpt.mp_files.get(t)
    if mp_file is None:
        raise CheckpointError(f"{ckpt.directory}: mp_rank_{t:02d}_model_states.pt is missing "
                              "(it records the parameter order of the ZeRO shards)")
    engine = torch_load(mp_file)
    param_shapes = engine.get("param_shapes") if isinstance(engine, Mapping) else None
    if not param_shapes:
        raise CheckpointError(f"{mp_file} has no param_shapes; cannot unflatten the ZeRO shards")
    if isinstance(param_shapes, Mapping):
        param_shapes = [param_shapes]
    return param_shapes, engine


def saved_iteration(ckpt: NeoxCheckpoint) -> int | None:
    """The training iteration a GPT-NeoX step folder's ``mp_rank_00_model_states.pt`` records
    (DeepSpeed's ``iteration`` / ``global_steps``; memory-mapped, so cheap), None without one."""
    mp_file = ckpt.mp_files.get(0)
    if mp_file is None:
        return None
    from pythia_jax.convert.neox.torch_io import torch_load

    engine = torch_load(mp_file)
    return _saved_counts(engine)[0] if isinstance(engine, Mapping) else None


def _saved_counts(engine: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(training iteration, LR scheduler steps) recorded in an engine state, None when absent."""
    iteration = engine.get("iteration", engine.get("global_steps"))
    iteration = None if iteration is None else int(plain_value(iteration))
    sched = None
    lr_state = engine.get("lr_scheduler")
    if isinstance(lr_state, Mapping) and "num_iters" in lr_state:
        sched = int(plain_value(lr_state["num_iters"]))
    return iteration, sched


def _merged_tree(per_rank: Sequence[tuple[dict, dict, dict]], which: int, roles: LayerRoles,
                 ckpt: NeoxCheckpoint, config: ModelConfig) -> dict[str, Any]:
    """Params tree (float32) of the master weights (``which`` 0), exp_avg (1) or exp_avg_sq (2),
    the TP ranks merged like the weights except row-parallel biases' moments (rank 0's)."""
    assembler = ParamAssembler(config, source=f"{ckpt.directory} ZeRO shards")
    override = {ROW_BIAS: REPLICATED} if which > 0 else None
    for idx in [roles.embed] + roles.layers + [roles.final_norm, roles.head]:
        table, what = roles.table(idx)
        ranks = [{key: tensors[which][(i, key)] for (i, key) in tensors[which] if i == idx}
                 for tensors in per_rank]
        where = f"{ckpt.directory} ZeRO shards, layer index {idx} ({what})"
        for hf_key, tensor in merge_layer(ranks, table, where, config.use_parallel_residual, override):
            assembler.add(hf_key, to_numpy(tensor.float()))
    return assembler.finish()
