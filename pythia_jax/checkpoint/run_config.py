"""The training run's record in each checkpoint step (``read_run_config``), and the run's rows
read from it (``read_run_data`` / ``resolve_run_data`` -> ``pythia_jax.data.run_data.RunData``).

The trainer (``pythia_jax.train.loop``) stores its run configuration under ``RUN_CONFIG_KEY`` in
every step's metadata item; older steps without it fall back to the data iterator's saved state.
"""

from __future__ import annotations

import json
import os

from pythia_jax.checkpoint.integrity import step_problem
from pythia_jax.checkpoint.layout import (
    DATA_ITER,
    METADATA,
    _read_json,
    resolve_checkpoint_dir,
    resolve_checkpoint_step,
)
from pythia_jax.data.run_data import RunData, RunDataError
from pythia_jax.errors import CheckpointError
from pythia_jax.io_utils import is_url

RUN_CONFIG_KEY = "run_config"  # the trainer's record of the run in each step's metadata


def read_run_config(directory: str | os.PathLike, step: int | None = None) -> dict | None:
    """The training run's configuration as recorded in a checkpoint step's metadata.

    ``directory``: a run's ``output_dir`` (with ``checkpoints/``), a checkpoint root or a step
    directory. ``step``: None = the newest step that looks complete (:func:`step_problem`).
    Returns the trainer's record (``pythia_jax.train.loop.run_config``)::

        {"version": 1,
         "data": {"prefix", "documents", "tokens", "order", "seed", "global_batch", "seq_len",
                  "train_iters", "transform"},
         "schedule": {"num_steps", "max_lr", "min_lr", "warmup_steps", "decay_steps", "decay_style", …},
         "model": ModelConfig.to_dict(),
         "init": {"seed", "init_from", "start_step", "adam_moments" (a branch: "source"/"zero")},
         "changes": [{"step", "changed": {"section.key": [old, new]}}, …],
         "step": <the step read>}

    The rows a step has seen are rows ``[0, step · global_batch)`` of the order that ``data``
    opens. Checkpoints written before this record existed give ``{"partial": True, "step",
    "data": {order, seed, global_batch, seq_len, train_iters}}`` from the data iterator's saved
    state (no prefix). None: the step holds neither (e.g. a converted checkpoint). Raises
    ``CheckpointError`` when there is no usable step.
    """
    root, step = resolve_checkpoint_step(directory, step)  # a run folder: its checkpoints/
    if step is None:  # listed here: a checkpoint manager would clean up a running save's files
        steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
        step = next((s for s in steps if step_problem(root, s) is None), None)
        if step is None:
            raise CheckpointError(f"{root} holds no usable checkpoint step")
    problem = step_problem(root, step)
    if problem is not None:
        raise CheckpointError(f"{root}/{step}: cannot read its run configuration ({problem})")
    doc = _read_json(root / str(step) / METADATA / METADATA)
    record = doc.get(RUN_CONFIG_KEY)
    if isinstance(record, dict):
        return {**record, "step": step}
    state = _legacy_data_state(root, step)
    if state is None:
        return None
    return {"partial": True, "step": step,
            "data": {k: state[k] for k in ("order", "seed", "global_batch", "seq_len", "train_iters")
                     if k in state}}


def _legacy_data_state(root, step: int) -> dict | None:
    """Process 0's saved data-iterator state of a step (grain JSON), or None."""
    folder = root / str(step) / DATA_ITER
    if not folder.exists():
        return None
    for name in sorted(p.name for p in folder.iterdir()):
        if name.startswith("process_0-of-") and name.endswith(".json"):
            try:
                state = json.loads((folder / name).read_text())
            except (OSError, ValueError):
                return None
            return state if isinstance(state, dict) else None
    return None


# ---------------------------------------------------------------------------------- the run's rows
def read_run_data(checkpoints: str | os.PathLike, step: int | None = None, *, what: str | dict = "",
                  **explicit) -> RunData:
    """The data configuration recorded in ``checkpoints`` (a run's output dir, its
    ``checkpoints/`` root or a step directory) at ``step`` (None: the newest complete step), as a
    ``RunData`` whose GPT-NeoX index maps are looked up first in the run's own
    ``<output_dir>/index_maps/`` (where the trainer built them).

    ``explicit``: settings given by the user (``data``, ``order``, ``seq_len``, ``global_batch``,
    ``seed``, ``train_iters``, and the row transform's ``transform``, ``transform_params``,
    ``transform_steps``; None = not given). Each given one must equal the record (``data``
    may name a moved copy with the same number of documents and tokens); otherwise
    ``RunDataMismatch`` (one line: the flag, the given and the recorded value). ``what`` names
    the flags in messages (a dict setting -> flag, or a prefix). Raises ``RunDataError`` when the
    step holds no record (use ``RunData.from_flags``) and ``CheckpointError`` for an unusable
    directory.
    """
    root, _ = resolve_checkpoint_dir(checkpoints)  # a run folder: its checkpoints/
    record = read_run_config(root, step)
    if record is None:
        raise RunDataError(f"{os.fspath(root)} step {step}: no record of the run's data configuration")
    return _run_data_of(root, record, what, explicit)


def _run_data_of(root, record: dict, what: str | dict, explicit: dict) -> RunData:
    """``read_run_data``'s ``RunData`` of a run record read from checkpoint root ``root``."""
    origin = f"the run recorded in {os.fspath(root)} (step {record['step']})"
    run = RunData.from_record(record, origin=origin, cache_prefix=_run_cache_prefix(root, record),
                              data=explicit.get("data"))
    return run.checked_against(explicit, what=what)


def resolve_run_data(checkpoints: str | os.PathLike | None, step: int | None = None, *,
                     what: str | dict = "", defaults: dict | None = None, **flags) -> RunData:
    """The rows a command or evaluation reads: ``read_run_data`` when ``checkpoints`` (a
    checkpoint directory of this project) holds a run record at ``step``; else the flags
    (``RunData.from_flags``: every setting that decides the rows required). ``defaults`` fill
    unset flags only when no ``checkpoints`` are given at all (the standalone view of a dataset,
    e.g. ``pythia_jax.data.run_data.PYTHIA_DEFAULTS`` for ``batches``/``count``)."""
    from pythia_jax.checkpoint.layout import is_checkpoint_dir
    from pythia_jax.data.run_data import SETTINGS, TRANSFORM_SETTINGS, flag_name

    if checkpoints is not None:
        if not is_url(os.fspath(checkpoints)) and not os.path.exists(checkpoints):
            raise RunDataError(f"the checkpoint folder {os.fspath(checkpoints)} does not exist")
        if is_checkpoint_dir(checkpoints):
            root, _ = resolve_checkpoint_dir(checkpoints)
            record = read_run_config(root, step)  # read once (read_run_data would read it again)
            if record is not None:
                return _run_data_of(root, record, what, flags)
    elif defaults:
        if flags.get("data") is None:
            raise RunDataError(f"give {flag_name('data', what)} (a dataset prefix) or --checkpoints (a run's "
                               "directory, whose recorded data settings are then used)")
        flags = {k: defaults[k] if v is None and k in defaults else v for k, v in flags.items()}
    return RunData.from_flags(what=what, cache_prefix=flags.get("cache_prefix"),
                              **{k: flags.get(k) for k in SETTINGS + TRANSFORM_SETTINGS})


def _run_cache_prefix(root, record: dict) -> str | None:
    """The run's own index-map cache (``<output_dir>/index_maps/<name>``, where the trainer built
    them) when the checkpoints sit in ``<output_dir>/checkpoints`` and that folder exists."""
    prefix = (record.get("data") or {}).get("prefix")
    root = os.fspath(root)
    if not prefix or is_url(root):
        return None
    maps = os.path.join(os.path.dirname(os.path.abspath(root).rstrip("/")), "index_maps")
    if not os.path.isdir(maps):
        return None
    return os.path.join(maps, os.path.basename(prefix.rstrip("/")))
