"""Find a GPT-NeoX checkpoint on disk: its step folder, files, tensor-parallel size and yml.

A checkpoint is a ``global_stepN/`` folder as GPT-NeoX's ``megatron/checkpointing.py``
(``save_checkpoint``, through DeepSpeed's engine) writes it, or its parent holding a ``latest``
file or several ``global_step*`` folders. Inside: the pipeline form's
``layer_XX-model_YY-model_states.pt`` files or the sequential form's
``mp_rank_XX_model_states.pt`` ``module`` dicts, optional ZeRO shards, and ``configs/*.yml``.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Any, Sequence

from pythia_jax.config import ConfigError
from pythia_jax.convert import neox_yml_keys
from pythia_jax.convert.neox.keys import MP_FILE, OPTIM_FILE, PIPE_FILE, STEP_DIR
from pythia_jax.convert.neox.yml import as_int, read_neox_yml, yml_get
from pythia_jax.errors import CheckpointError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class NeoxCheckpoint:
    """A located GPT-NeoX checkpoint folder (what ``locate_neox_checkpoint`` found)."""

    directory: str                 # the global_stepN folder
    layout: str                    # "pipeline" or "sequential"
    tp: int                        # tensor-parallel size
    yml: dict[str, Any]
    yml_files: list[str]
    step: int | None               # N of global_stepN (or the saved iteration)
    pipe_files: dict[int, dict[int, str]]   # idx -> tp -> file (pipeline form)
    mp_files: dict[int, str]                # tp -> mp_rank file
    optim_files: dict[int, dict[int, str]]  # tp -> dp -> file

    @property
    def name(self) -> str:
        if self.yml_files:
            return os.path.splitext(os.path.basename(self.yml_files[0]))[0]
        return "custom"


def holds_model_files(path: str | os.PathLike) -> bool:
    """True when ``path`` itself holds GPT-NeoX model-state files (a ``global_stepN/`` folder)."""
    return any(PIPE_FILE.match(n) or MP_FILE.match(n) for n in os.listdir(path))


def is_neox_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a global_stepN folder or a folder holding global_step* folders."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    if holds_model_files(path):
        return True
    return any(STEP_DIR.match(n) and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path))


def _resolve_step_dir(path: str, step: int | None) -> str:
    names = os.listdir(path)
    if holds_model_files(path):
        if step is not None:
            m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
            if m and int(m.group(1)) != step:
                raise CheckpointError(f"{path} is step {m.group(1)}, not the requested step {step}")
        return path
    steps = {int(m.group(1)): n for n in names if (m := STEP_DIR.match(n))
             and os.path.isdir(os.path.join(path, n))}
    if not steps:
        raise CheckpointError(
            f"{path} has no recognisable GPT-NeoX layout: expected layer_XX-model_YY-model_states.pt "
            "or mp_rank_XX_model_states.pt files, or global_stepN folders")
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{path} has no global_step{step} (steps: {sorted(steps)})")
        return os.path.join(path, steps[step])
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        if tag and os.path.isdir(os.path.join(path, tag)):
            return os.path.join(path, tag)
        if tag:  # GPT-NeoX itself would fail to resume from it
            logger.warning("%s/latest names %s, which is not there; using the newest step folder, %s", path, tag,
                           steps[max(steps)])
    return os.path.join(path, steps[max(steps)])


def _find_yml(step_dir: str, config_files: Sequence[str] | None) -> list[str]:
    if config_files:
        for f in config_files:
            if not os.path.isfile(f):
                raise ConfigError(f"GPT-NeoX config {f} does not exist")
        return list(config_files)
    for folder in (os.path.join(step_dir, "configs"), os.path.join(os.path.dirname(step_dir), "configs")):
        files = sorted(glob.glob(os.path.join(folder, "*.yml")) + glob.glob(os.path.join(folder, "*.yaml")))
        if files:
            return files
    return []



def locate_neox_checkpoint(path: str | os.PathLike, step: int | None = None,
                           config_files: Sequence[str] | None = None) -> NeoxCheckpoint:
    """Find the step folder, its files, its tensor-parallel size and its yml config.

    Raises ``CheckpointError`` for an unrecognisable folder or mixed tensor-parallel sizes,
    ``ConfigError`` when no yml config is found.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    step_dir = _resolve_step_dir(path, step)
    pipe, mp, optim = _list_step_files(step_dir)
    layout, tp = _model_layout(step_dir, pipe, mp)
    yml_files = _find_yml(step_dir, config_files)
    yml = _read_yml(step_dir, yml_files, tp)
    _check_optim_files(step_dir, optim, tp)
    m = STEP_DIR.match(os.path.basename(os.path.normpath(step_dir)))
    return NeoxCheckpoint(directory=step_dir, layout=layout, tp=tp, yml=yml, yml_files=yml_files,
                          step=int(m.group(1)) if m else None, pipe_files=pipe, mp_files=mp,
                          optim_files=optim)


def _list_step_files(step_dir: str) -> tuple[dict[int, dict[int, str]], dict[int, str],
                                             dict[int, dict[int, str]]]:
    """(layer idx -> tp -> file, tp -> mp_rank file, tp -> dp -> ZeRO shard) of a step folder."""
    pipe: dict[int, dict[int, str]] = {}
    mp: dict[int, str] = {}
    optim: dict[int, dict[int, str]] = {}
    for n in sorted(os.listdir(step_dir)):
        full = os.path.join(step_dir, n)
        if m := PIPE_FILE.match(n):
            pipe.setdefault(int(m.group(1)), {})[int(m.group(2))] = full
        elif m := MP_FILE.match(n):
            mp[int(m.group(1))] = full
        elif m := OPTIM_FILE.match(n):
            optim.setdefault(int(m.group(2)), {})[int(m.group(1))] = full
    return pipe, mp, optim


def _model_layout(step_dir: str, pipe: dict[int, dict[int, str]], mp: dict[int, str]) -> tuple[str, int]:
    """("pipeline" | "sequential", tensor-parallel size); every layer must have ranks 0…TP-1."""
    if pipe:
        rank_sets = {idx: sorted(ranks) for idx, ranks in pipe.items()}
        sizes = {len(r) for r in rank_sets.values()}
        if len(sizes) > 1:
            detail = ", ".join(f"layer_{idx:02d}: {len(r)}" for idx, r in sorted(rank_sets.items()))
            raise CheckpointError(f"{step_dir}: mixed tensor-parallel sizes across layer files ({detail})")
        tp = sizes.pop()
        for idx, ranks in rank_sets.items():
            if ranks != list(range(tp)):
                raise CheckpointError(f"{step_dir}: layer_{idx:02d} has model ranks {ranks}, "
                                      f"expected 0…{tp - 1}")
        return "pipeline", tp
    if mp:
        tp = len(mp)
        if sorted(mp) != list(range(tp)):
            raise CheckpointError(f"{step_dir}: mp_rank files {sorted(mp)} are not 0…{tp - 1}")
        return "sequential", tp
    raise CheckpointError(
        f"{step_dir} has no recognisable GPT-NeoX layout: expected layer_XX-model_YY-model_states.pt "
        "or mp_rank_XX_model_states.pt files")


def _read_yml(step_dir: str, yml_files: list[str], tp: int) -> dict[str, Any]:
    """The merged yml; it must exist and agree with the files' tensor-parallel size."""
    yml = read_neox_yml(yml_files) if yml_files else {}
    if not yml:
        raise ConfigError(f"no GPT-NeoX yml config found in {step_dir}/configs or next to it; "
                          "pass the training yml (config_files=… / --neox-config)")
    neox_yml_keys.check_neox_yml(yml)  # every model key honoured or refused, before any tensor
    yml_tp = yml_get(yml, "model-parallel-size")
    if yml_tp is not None and as_int(yml_tp, "model-parallel-size") != tp:
        raise CheckpointError(f"{step_dir}: mixed tensor-parallel sizes: the yml says "
                              f"model-parallel-size {yml_tp} but the files hold {tp} rank(s)")
    return yml


def _check_optim_files(step_dir: str, optim: dict[int, dict[int, str]], tp: int) -> None:
    """ZeRO shards, when present, must cover model ranks 0…TP-1, each with ranks 0…DP-1."""
    if not optim:
        return
    if sorted(optim) != list(range(tp)):
        raise CheckpointError(f"{step_dir}: optimizer shards exist for model ranks {sorted(optim)}, "
                              f"expected 0…{tp - 1} (mixed tensor-parallel sizes)")
    dps = {len(d) for d in optim.values()}
    if len(dps) > 1:
        raise CheckpointError(f"{step_dir}: model ranks have different numbers of ZeRO shards {sorted(dps)}")
    for t, d in optim.items():
        if sorted(d) != list(range(len(d))):
            raise CheckpointError(f"{step_dir}: ZeRO shards of model rank {t} are "
                                  f"zero_pp_rank {sorted(d)}, expected 0…{len(d) - 1}")
