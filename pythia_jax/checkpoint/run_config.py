"""The training run's record in each checkpoint step (``read_run_config``).

The trainer (``pythia_jax.train.loop``) stores its run configuration under ``RUN_CONFIG_KEY`` in
every step's metadata item; older steps without it fall back to the data iterator's saved state.
"""

from __future__ import annotations

import json
import os

from pythia_jax.checkpoint.integrity import step_problem
from pythia_jax.checkpoint.layout import (DATA_ITER, METADATA, MODEL_CONFIG_FILE, _epath, _read_json,
                                          resolve_checkpoint_dir)
from pythia_jax.errors import CheckpointError

RUN_CONFIG_KEY = "run_config"  # the trainer's record of the run in each step's metadata


def read_run_config(directory: str | os.PathLike, step: int | None = None) -> dict | None:
    """The training run's configuration as recorded in a checkpoint step's metadata.

    ``directory``: a run's ``output_dir`` (with ``checkpoints/``), a checkpoint root or a step
    directory. ``step``: None = the newest step that looks complete (:func:`step_problem`).
    Returns the trainer's record (``pythia_jax.train.loop.run_config``)::

        {"version": 1,
         "data": {"prefix", "documents", "tokens", "order", "seed", "global_batch", "seq_len",
                  "train_iters", "transform"},
         "schedule": {"num_steps", "max_lr", "min_lr", "warmup_steps", "decay_steps", …},
         "model": ModelConfig.to_dict(), "init": {"seed", "init_from"},
         "changes": [{"step", "changed": {"section.key": [old, new]}}, …],
         "step": <the step read>}

    The rows a step has seen are rows ``[0, step · global_batch)`` of the order that ``data``
    opens. Checkpoints written before this record existed give ``{"partial": True, "step",
    "data": {order, seed, global_batch, seq_len, train_iters}}`` from the data iterator's saved
    state (no prefix). None: the step holds neither (e.g. a converted checkpoint). Raises
    ``CheckpointError`` when there is no usable step.
    """
    path = _epath(directory)
    if not (path / MODEL_CONFIG_FILE).exists() and (path / "checkpoints" / MODEL_CONFIG_FILE).exists():
        path = path / "checkpoints"
    root, dir_step = resolve_checkpoint_dir(path)
    step = dir_step if step is None else int(step)
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

