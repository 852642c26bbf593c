"""The public Python API: ``init``, ``load``, ``save_hf`` (re-exported by ``pythia_jax``)."""

from __future__ import annotations

import os
from typing import Any

from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.errors import CheckpointError


def resolve_config(config: ModelConfig | str, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a ModelConfig or a preset name (``ConfigError`` for an unknown name)."""
    if isinstance(config, ModelConfig):
        return config.replace(**overrides) if overrides else config
    if isinstance(config, str):
        return ModelConfig.preset(config, **overrides)
    raise ConfigError(f"expected a ModelConfig or a preset name, got {type(config).__name__}")


def init(config: ModelConfig | str, seed: int = 0, **overrides: Any):
    """A ``GPTNeoX`` with Pythia initialisation. ``config``: a ModelConfig or a preset name;
    ``overrides``: ModelConfig fields to change (e.g. ``dtype="bfloat16"``)."""
    from flax import nnx

    from pythia_jax.model import GPTNeoX

    return GPTNeoX(resolve_config(config, **overrides), rngs=nnx.Rngs(int(seed)))


def detect_source(path: str | os.PathLike) -> str:
    """``"hf"``, ``"checkpoint"`` (this project's Orbax directory) or ``"neox"`` for ``path``."""
    from pythia_jax.checkpoint import is_checkpoint_dir
    from pythia_jax.convert.hf import is_hf_dir
    from pythia_jax.convert.neox import is_neox_checkpoint

    path = os.fspath(path)
    local = "://" not in path  # remote (gs://…) paths can only be checkpoints of this project
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


def load_params(path: str | os.PathLike, step: int | None = None, **kwargs: Any
                ) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, params) from any supported source (see ``load``).

    HF and GPT-NeoX sources give numpy arrays; a checkpoint of this project gives arrays on the
    first local device, on ``shardings=`` when given, or numpy with ``host=True``. A folder of HF
    revision folders ``step<N>/`` (as the Pythia suite publishes them) needs ``step``.
    """
    if "://" not in os.fspath(path) and os.path.isdir(path):
        from pythia_jax.eval.loading import read_hf_revision
        found = read_hf_revision(path, step)
        if found is not None:
            return found
    source = detect_source(path)
    if source == "hf":
        if step is not None:
            raise ConfigError("step= does not apply to an HF directory (one revision per folder)")
        from pythia_jax.convert.hf import read_hf_dir
        return read_hf_dir(path)
    if source == "checkpoint":
        from pythia_jax.checkpoint import load_params as load_checkpoint
        return load_checkpoint(path, step=step, shardings=kwargs.get("shardings"), host=kwargs.get("host", False))
    from pythia_jax.convert.neox import read_neox_checkpoint, read_neox_optimizer_state
    config, params, ckpt = read_neox_checkpoint(path, step=step, config_files=kwargs.get("config_files"),
                                                hidden_act=kwargs.get("hidden_act"))
    if kwargs.get("master_weights", True) and ckpt.optim_files:
        state = read_neox_optimizer_state(ckpt, config)
        if state is not None:
            params = state.master
    return config, params


def load(path: str | os.PathLike, step: int | None = None, dtype: str | None = None, **kwargs: Any):
    """A ``GPTNeoX`` from an HF directory, a folder of HF revisions ``step<N>/`` (the newest
    unless ``step``), a pythia-jax checkpoint directory (newest valid step unless ``step``) or a
    GPT-NeoX DeepSpeed checkpoint (``global_stepN/`` or its parent; fp32 ZeRO master weights
    when the optimizer shards are there).

    ``dtype``: compute dtype (``"float32"``, ``"bfloat16"``); parameters stay float32.
    ``shardings`` (checkpoints of this project): restore each device's slice only.
    """
    from pythia_jax.model import model_from_params

    from pythia_jax.host_memory import to_device_tree

    config, params = load_params(path, step=step, **kwargs)
    params = to_device_tree(params)  # numpy sources: shared with JAX on CPU, one leaf at a time elsewhere
    if dtype is not None:
        config = config.replace(dtype=dtype)
    return model_from_params(config, params)


def save_hf(model, out_dir: str | os.PathLike, dtype: str = "float16", **kwargs: Any) -> str:
    """Write ``model`` as an HF ``GPTNeoXForCausalLM`` directory (``shard_size``, ``overwrite``).

    ``overwrite=True`` replaces only an existing HF directory, never a run or another folder
    (``PythiaJaxError``, see ``pythia_jax.io_utils``)."""
    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.model import params_to_dict

    return write_hf_dir(model.config, params_to_dict(model), out_dir, dtype=dtype, **kwargs)
