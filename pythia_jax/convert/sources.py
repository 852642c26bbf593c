"""Reading a model from any supported source: which kind of directory ``path`` is, and its params.

Sources: an HF ``GPTNeoXForCausalLM`` directory, a folder of HF revision folders ``step<N>/``
(as the Pythia suite publishes them on the Hub), a checkpoint directory of this project, or a
GPT-NeoX (DeepSpeed) checkpoint. ``pythia_jax.api`` (``load``), evaluation and training
(``init_from``) all read through :func:`load_params` here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.errors import CheckpointError
from pythia_jax.io_utils import is_url

logger = logging.getLogger(__name__)


def detect_source(path: str | os.PathLike) -> str:
    """``"hf"``, ``"checkpoint"`` (this project's Orbax directory) or ``"neox"`` for ``path``."""
    from pythia_jax.checkpoint import is_checkpoint_dir
    from pythia_jax.convert.hf import is_hf_dir
    from pythia_jax.convert.neox import is_neox_checkpoint

    path = os.fspath(path)
    local = not is_url(path)  # remote (gs://…) paths can only be checkpoints of this project
    if local and not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    if local and os.path.isfile(path):
        raise CheckpointError(f"{path} is a file; pass the model directory")
    if local and is_hf_dir(path):
        return "hf"
    if is_checkpoint_dir(path):
        return "checkpoint"
    if local and is_neox_checkpoint(path):
        return "neox"
    if local and os.path.isfile(os.path.join(path, "config.json")):
        return "hf"  # config.json without weights: read_hf_dir names what is missing
    raise CheckpointError(
        f"{path} is not a model directory: expected an HF directory (config.json + model.safetensors "
        "or pytorch_model.bin), a pythia-jax checkpoint (model_config.json) or a GPT-NeoX checkpoint "
        "(global_stepN/ with layer_XX-model_YY-model_states.pt or mp_rank_XX_model_states.pt)")


# the keyword options of load_params, by source (``host``: numpy arrays, which HF and GPT-NeoX
# sources always give; ``shardings``: a jax.sharding.Sharding or a tree of them matching params)
SOURCE_OPTIONS: dict[str, tuple[str, ...]] = {
    "hf": ("host", "shardings"),
    "checkpoint": ("host", "shardings", "dtype"),
    "neox": ("host", "shardings", "config_files", "hidden_act", "master_weights"),
}


def load_params(path: str | os.PathLike, step: int | None = None, **kwargs: Any
                ) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, params) from any supported source (see ``pythia_jax.api.load``).

    HF and GPT-NeoX sources give numpy float32 arrays (placed on ``shardings=`` when given); a
    checkpoint of this project gives arrays on the first local device, on ``shardings=`` when
    given, or numpy with ``host=True``, cast to the model's ``param_dtype`` (or ``dtype=``;
    ``checkpoint.load_params``) whatever dtype they are stored in. A folder of HF revision folders
    ``step<N>/`` (as the Pythia suite publishes them) takes ``step``. ``ConfigError`` for a
    ``step`` that is not a non-negative integer, and for a keyword the source does not take
    (``SOURCE_OPTIONS``), before anything is read.
    """
    step = _check_step(step)
    _check_options(kwargs, None)
    if not is_url(os.fspath(path)) and os.path.isdir(path) and revision_folder_steps(path):
        _check_options(kwargs, "hf", path)
        return _place(read_hf_revision(path, step), kwargs)
    source = detect_source(path)
    _check_options(kwargs, source, path)
    if source == "hf":
        if step is not None:
            raise ConfigError("step= does not apply to an HF directory (one revision per folder)")
        from pythia_jax.convert.hf import read_hf_dir
        return _place(read_hf_dir(path), kwargs)
    if source == "checkpoint":
        from pythia_jax.checkpoint import load_params as load_checkpoint
        return load_checkpoint(path, step=step, shardings=kwargs.get("shardings"), host=kwargs.get("host", False),
                               dtype=kwargs.get("dtype"))
    from pythia_jax.convert.neox import read_neox_checkpoint, read_neox_optimizer_state
    config, params, ckpt = read_neox_checkpoint(path, step=step, config_files=kwargs.get("config_files"),
                                                hidden_act=kwargs.get("hidden_act"))
    if kwargs.get("master_weights", True) and ckpt.optim_files:
        state = read_neox_optimizer_state(ckpt, config)
        if state is not None:
            params = state.master
    return _place((config, params), kwargs)


def _check_step(step: Any) -> int | None:
    """``step`` as an int (numpy integers too), or ``ConfigError``."""
    import numbers

    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ConfigError(f"step={step!r}: expected a non-negative integer (a training step) or None")
    return int(step)


def _check_options(kwargs: dict[str, Any], source: str | None, path=None) -> None:
    """Refuse a keyword no source takes (``source`` None), or one this ``source`` does not take."""
    known = sorted({k for opts in SOURCE_OPTIONS.values() for k in opts})
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(f"unknown keyword {', '.join(unknown)}; the sources take {', '.join(known)} "
                          f"({'; '.join(f'{s}: ' + ', '.join(o) for s, o in SOURCE_OPTIONS.items())})")
    if source is not None:
        wrong = sorted(set(kwargs) - set(SOURCE_OPTIONS[source]))
        if wrong:
            what = {"hf": "an HF directory", "checkpoint": "a pythia-jax checkpoint",
                    "neox": "a GPT-NeoX checkpoint"}[source]
            raise ConfigError(f"{', '.join(wrong)} does not apply to {path} ({what}); it takes "
                              f"{', '.join(SOURCE_OPTIONS[source])}")
    if kwargs.get("host") and kwargs.get("shardings") is not None:
        raise ConfigError("pass either host=True (numpy arrays) or shardings=, not both")


def _place(found: tuple[ModelConfig, dict[str, Any]], kwargs: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
    """numpy params of an HF / GPT-NeoX source, put on ``kwargs["shardings"]`` when given."""
    config, params = found
    if kwargs.get("shardings") is not None:
        import jax

        params = jax.device_put(params, kwargs["shardings"])
    return config, params


def read_hf_revision(path: str | os.PathLike, step: int | None) -> tuple[Any, dict] | None:
    """``(ModelConfig, params)`` of ``path/step<step>/`` when ``path`` is a folder of HF revision
    folders (numpy float32 params, as ``read_hf_dir``; the newest revision when ``step`` is None);
    None when it is not such a folder. Raises CheckpointError for a step that is not there
    (listing those that are)."""
    from pythia_jax.checkpoint.failures import step_list
    from pythia_jax.convert.hf import read_hf_dir

    p = Path(path)
    revisions = revision_folder_steps(p)
    if not revisions:
        return None
    if step is None:
        step = revisions[-1]
        logger.info("%s: using the newest HF revision, step%d (of %s)", p, step, step_list(revisions))
    if step not in revisions:
        raise CheckpointError(f"{p} has no step {step}; available: {step_list(revisions)}")
    return read_hf_dir(p / f"step{step}")


def hf_dir_step(path: str | os.PathLike) -> int | None:
    """The training step of one HF directory's weights, when it says: the step its ``config.json``
    records when this project wrote it (``pythia_jax_export``: a run's final export, ``convert
    jax-to-hf``), else N of a folder named ``step<N>`` (a Hub revision); None otherwise."""
    import re

    from pythia_jax.convert.hf import export_source

    recorded = (export_source(path) or {}).get("step")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 0:
        return recorded
    m = re.fullmatch(r"step(\d+)", Path(path).resolve().name)
    return int(m.group(1)) if m else None


def revision_folder_steps(path: str | os.PathLike) -> list[int]:
    """The steps of a folder of HF revisions; [] for anything else (an HF directory included)."""
    from pythia_jax.convert.hf import is_hf_dir

    return [] if is_hf_dir(path) else hf_revision_steps(path)


def hf_revision_steps(path: str | os.PathLike) -> list[int]:
    """Steps N of the ``path/step<N>/`` folders, sorted, when at least one of them is an HF
    directory ([] otherwise). A ``step<N>/`` that is not a complete HF directory (an interrupted
    download: no weights, or empty) is listed too, so that asking for it, or for every step, fails
    naming what it lacks (``read_hf_dir``) instead of skipping that step without a word."""
    from pythia_jax.convert.hf import is_hf_dir

    p = Path(path)
    if not p.is_dir():
        return []
    folders = {int(c.name[4:]): c for c in p.iterdir()
               if c.name.startswith("step") and c.name[4:].isdigit() and c.is_dir()}
    if not any(is_hf_dir(c) for c in folders.values()):
        return []
    return sorted(folders)


