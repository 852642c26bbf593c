"""Finding the weights to evaluate: one step of a checkpoint directory of this project, or an HF
directory (a single model or ``DIR/step<N>/`` revision folders as the Pythia suite publishes them).

A single HF directory is one checkpoint: its step is N when the folder is named ``step<N>``
(a Hub revision), else 0. A run's output directory stands for its ``checkpoints/`` folder
(``checkpoint.resolve_checkpoint_dir``).

What a result was computed from (``pythia_jax.eval.provenance``): ``checkpoint_source`` (the
resolved folder) and ``weights_fingerprint`` (the weights of one step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from pythia_jax.convert.sources import hf_revision_steps, load_params, read_hf_revision
from pythia_jax.errors import CheckpointError
from pythia_jax.io_utils import is_url

logger = logging.getLogger(__name__)

NO_CHECKPOINTS = ("is not a pythia-jax checkpoint directory (model_config.json and <step>/ folders), "
                  "a run's output directory (with checkpoints/), an HF model directory or a folder of "
                  "step<N>/ HF revisions")


def checkpoint_source(path: str | os.PathLike) -> str:
    """The folder the checkpoints of ``path`` are read from, as one name: the checkpoint root of
    a pythia-jax directory (a step directory or a run directory gives its root), else the HF
    (revisions) folder; absolute, symbolic links resolved (URLs as given)."""
    from pythia_jax import checkpoint as ckpt
    from pythia_jax.convert.hf import is_hf_dir

    p = os.fspath(path)
    if not is_hf_dir(p) and not hf_revision_steps(p) and ckpt.is_checkpoint_dir(p):
        p = os.fspath(ckpt.resolve_checkpoint_dir(p)[0])
    return p.rstrip("/") if is_url(p) else os.path.realpath(p)


def weights_fingerprint(path: str | os.PathLike, step: int) -> str:
    """A short name for the weights of step ``step`` of ``path`` (and the model configuration
    they run with: architecture and dtypes), read without reading the weights.

    A pythia-jax checkpoint: ``ckpt:`` + a digest of ``model_config.json`` and the per-array
    checksums the step was saved with (a copy or a moved run gives the same name, other weights
    another; a step saved without checksums: its save times instead). An HF directory: ``hf:`` +
    a digest of ``config.json`` and the weight files' names, sizes and modification times (the
    files are not read: re-exported weights get a new name, and so does a copy that does not
    keep the times)."""
    from pythia_jax import checkpoint as ckpt
    from pythia_jax.checkpoint.layout import _ORBAX_STEP_METADATA
    from pythia_jax.convert.hf import find_weight_files, is_hf_dir
    from pythia_jax.eval.provenance import digest_hex

    p = os.fspath(path)
    revision = os.path.join(p, f"step{step}")
    if not is_hf_dir(p) and os.path.isdir(revision) and not ckpt.is_checkpoint_dir(p):
        p = revision  # a folder of HF revisions: this step's (not a listing of every revision, once per step)
        if not is_hf_dir(p):  # an interrupted download: named here, before any step is evaluated
            raise CheckpointError(f"{p} is not a complete HF directory (it lacks config.json or the weights "
                                  "model.safetensors / pytorch_model.bin): finish or remove it")
    if is_hf_dir(p):
        _, files = find_weight_files(p)
        with open(os.path.join(p, "config.json"), "rb") as f:
            config = hashlib.sha256(f.read()).hexdigest()
        stats = [(os.path.basename(x), s.st_size, s.st_mtime_ns) for x, s in ((x, os.stat(x)) for x in files)]
        return "hf:" + digest_hex({"config": config, "files": stats})
    root, _ = ckpt.resolve_checkpoint_dir(p)
    config = ckpt.read_model_config(root)
    sums = ckpt.stored_checksums(root, step)
    if sums is None:  # saved before checksums were recorded: the save's own timestamps name it
        try:
            saved = json.loads((root / str(step) / _ORBAX_STEP_METADATA).read_text())
            sums = {k: saved[k] for k in ("init_timestamp_nsecs", "commit_timestamp_nsecs")}
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{root}/{step}: its metadata records neither checksums nor save times "
                                  "of the params, so results cannot name the weights they come from") from None
    return "ckpt:" + digest_hex({"config": None if config is None else config.to_dict(), "params": sums})


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
    from pythia_jax.checkpoint.failures import step_list

    if step is not None and ckpt.is_checkpoint_dir(p):
        steps = available_steps(p)
        if step not in steps:
            raise CheckpointError(f"{p} has no step {step}; available: {step_list(steps)}")
    return load_params(p, step=step, host=True)


def single_hf_step(path: str | os.PathLike) -> int:
    """The step of one HF directory: ``convert.sources.hf_dir_step`` (the step its config.json
    records, else N of a ``step<N>`` folder name), else 0."""
    from pythia_jax.convert.sources import hf_dir_step

    step = hf_dir_step(path)
    return 0 if step is None else step


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
