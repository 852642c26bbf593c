"""What a checkpoint directory holds on disk, and the path / multi-host helpers around it.

Layout of a checkpoint directory (an ``orbax.checkpoint.CheckpointManager`` root)::

    <dir>/model_config.json          ModelConfig.to_dict(), written once, atomically
    <dir>/<step>/params/             the canonical params tree (float32), Orbax PyTree (OCDBT)
    <dir>/<step>/opt_state/          optax state (optional)
    <dir>/<step>/data_iter/          data-iterator state: grain's per-process JSON files
                                     (``process_<i>-of-<n>.json``) or one JSON document
    <dir>/<step>/metadata/           JSON: the caller's metadata plus ``__checkpoint__``
                                     (format version, item list, per-leaf checksums)

Multi-host: ``model_config.json`` is written by process 0 (``_is_primary``), then every process
meets at a barrier (``_sync``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.errors import CheckpointError
from pythia_jax.io_utils import is_url, write_text_atomic

MODEL_CONFIG_FILE = "model_config.json"
PARAMS = "params"
OPT_STATE = "opt_state"
DATA_ITER = "data_iter"
METADATA = "metadata"
_ARRAY_ITEMS = (PARAMS, OPT_STATE)  # the PyTree items of a step (arrays, checksummed)
FORMAT_VERSION = 1
_INTERNAL_KEY = "__checkpoint__"
_COMMIT_MARKER = "commit_success.txt"
_ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"

# ModelConfig fields that describe how the model runs, not what its parameters are.
EXECUTION_FIELDS = ("name", "dtype", "param_dtype", "remat", "attention", "scan_layers", "loss_chunk")


class CheckpointIntegrityError(CheckpointError):
    """A step that is incomplete or whose stored bytes do not match what was saved."""


class RunConfigMismatch(CheckpointError):
    """A checkpoint written by a run whose data order, model or schedule differ from this one's
    (not corruption: the step is intact, it belongs to another configuration)."""


class CheckpointSaveFailed(CheckpointError):
    """A checkpoint save (synchronous or in the background) failed: disk full, permissions, …"""


# ---------------------------------------------------------------------------------- paths
def _epath(directory: str | os.PathLike):
    from etils import epath

    text = os.fspath(directory)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if not is_url(text):
        text = os.path.abspath(text)
    return epath.Path(text)


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def _sync(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _read_json(path) -> Any:
    return json.loads(path.read_text())


RUN_CHECKPOINTS = "checkpoints"  # a training run's checkpoint root: <output_dir>/checkpoints


def resolve_checkpoint_dir(path: str | os.PathLike) -> tuple[Any, int | None]:
    """Accept a checkpoint root, a step directory inside one, or a training run's folder (its
    ``checkpoints/`` root): -> (root, step or None). The one place every reader of a checkpoint
    source (convert, generate, ``load``, ``init_from``, eval, audit) resolves a path."""
    p = _epath(path)
    if (p / MODEL_CONFIG_FILE).exists():
        return p, None
    if p.name.isdigit() and (p.parent / MODEL_CONFIG_FILE).exists():
        return p.parent, int(p.name)
    if (p / RUN_CHECKPOINTS / MODEL_CONFIG_FILE).exists():
        return p / RUN_CHECKPOINTS, None
    if (p / RUN_CHECKPOINTS).is_dir():
        raise CheckpointError(f"{p} is a training run folder whose {RUN_CHECKPOINTS}/ holds no checkpoint yet "
                              f"(no {MODEL_CONFIG_FILE})")
    raise CheckpointError(f"{p} is not a pythia-jax checkpoint directory or training run folder "
                          f"(no {MODEL_CONFIG_FILE})")


def resolve_checkpoint_step(path: str | os.PathLike, step: int | None) -> tuple[Any, int | None]:
    """:func:`resolve_checkpoint_dir` with an explicit ``step`` (None: the path's own step, if it
    names one): -> (root, step). A step folder with a different explicit step is a
    ``CheckpointError`` (which of the two was meant cannot be told)."""
    root, dir_step = resolve_checkpoint_dir(path)
    if step is not None and dir_step is not None and int(step) != dir_step:
        raise CheckpointError(f"{path} is the folder of step {dir_step}, but step {step} was asked for: "
                              f"give the step folder or the step, or both the same")
    step = dir_step if step is None else int(step)
    if step is not None and not (root / str(step)).exists():
        from pythia_jax.checkpoint.failures import step_list

        steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
        raise CheckpointError(f"{root} has no checkpoint step {step}; available: {step_list(steps)}")
    return root, step


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a checkpoint root of this project or a step directory in one."""
    try:
        resolve_checkpoint_dir(path)
        return True
    except CheckpointError:
        return False


# ---------------------------------------------------------------------------------- model config
def config_differences(stored: ModelConfig, current: ModelConfig) -> list[str]:
    """Architecture fields where two configs differ (execution-only fields ignored)."""
    a, b = stored.to_dict(), current.to_dict()
    return [f"{k}: checkpoint {a[k]!r} vs current {b[k]!r}"
            for k in a if k not in EXECUTION_FIELDS and a[k] != b.get(k)]


def read_model_config(directory: str | os.PathLike) -> ModelConfig | None:
    """The ``model_config.json`` of a checkpoint directory, or None when there is none."""
    path = _epath(directory) / MODEL_CONFIG_FILE
    if not path.exists():
        return None
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: unreadable model config ({e})") from None


def write_model_config(directory: str | os.PathLike, config: ModelConfig) -> None:
    """Write ``<dir>/model_config.json`` atomically, or check it matches the one already there.

    Raises ``CheckpointError`` when the directory holds checkpoints of a different model shape.
    """
    path = _epath(directory)
    if _is_primary() and not (path / MODEL_CONFIG_FILE).exists():
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path / MODEL_CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    _sync("pythia_jax_write_model_config")  # every process passes here exactly once
    stored = read_model_config(path)
    diff = config_differences(stored, config) if stored is not None else ["model_config.json missing"]
    if diff:
        raise CheckpointError(
            f"{path} holds checkpoints of a different model ({'; '.join(diff)}); "
            "use another checkpoint directory or the matching model config")



def _agree_on_success(where: str, error: Exception | None) -> None:
    """Raise on every process when any process failed to read the step (so all fall back together)."""
    import jax
    import numpy as np

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(int(error is None), np.int32))
        if error is None and int(np.min(flags)) != 1:
            error = CheckpointIntegrityError(f"{where}: another process failed to read this step")
    if error is not None:
        raise error
