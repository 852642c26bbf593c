"""Finding the weights to evaluate: one step of a checkpoint directory of this project, or an HF
directory (a single model or ``DIR/step<N>/`` revision folders as the Pythia suite publishes them).

A single HF directory is one checkpoint: its step is N when the folder is named ``step<N>``
(a Hub revision), else 0.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from pythia_jax.convert.sources import _fmt, hf_revision_steps, load_params, read_hf_revision
from pythia_jax.errors import CheckpointError

logger = logging.getLogger(__name__)


def load_model_params(path: str | os.PathLike, step: int | None = None) -> tuple[Any, dict]:
    """``(ModelConfig, params)`` for ``path`` (and ``step``).

    ``path`` is a directory of HF revision folders ``step<N>/`` (newest when ``step`` is None), one
    HF directory (its step: see ``single_hf_step``), or anything ``pythia_jax.api.load_params``
    reads: a checkpoint directory of this project (newest valid step when ``step`` is None) or a
    GPT-NeoX checkpoint. A step that is not there raises CheckpointError listing the steps that are.

    The params are numpy arrays in host memory: ``place_model`` then sends each device only its
    part (loading onto one device first would need the whole model in that device's memory).
    """
    from pythia_jax.convert.hf import is_hf_dir, read_hf_dir

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if is_hf_dir(p):
        own = single_hf_step(p)
        if step is not None and step != own:
            raise CheckpointError(f"{p} is one HF directory (one checkpoint, step {own}), not step {step}; "
                                  f"ask for step {own} (eval: --steps {own} or all) or give the folder of "
                                  "step<N>/ revisions")
        return read_hf_dir(p)
    found = read_hf_revision(p, step)
    if found is not None:
        return found
    from pythia_jax import checkpoint as ckpt

    if step is not None and ckpt.is_checkpoint_dir(p):
        steps = available_steps(p)
        if step not in steps:
            raise CheckpointError(f"{p} has no step {step}; available: {_fmt(steps)}")
    return load_params(p, step=step, host=True)


def single_hf_step(path: str | os.PathLike) -> int:
    """The step of one HF directory: N for a folder named ``step<N>`` (a Hub revision), else 0."""
    m = re.fullmatch(r"step(\d+)", Path(path).resolve().name)
    return int(m.group(1)) if m else 0


def available_steps(path: str | os.PathLike) -> list[int]:
    """Steps that can be evaluated in ``path`` (one HF directory, HF revisions or checkpoint steps)."""
    from pythia_jax.convert.hf import is_hf_dir

    if is_hf_dir(path):
        return [single_hf_step(path)]
    revisions = hf_revision_steps(path)
    if revisions:
        return revisions
    from pythia_jax import checkpoint as ckpt

    if not ckpt.is_checkpoint_dir(path):
        return []
    root, _ = ckpt.resolve_checkpoint_dir(path)
    with ckpt.TrainCheckpointer(root, save_steps=(), async_save=False) as c:
        return c.all_steps()
