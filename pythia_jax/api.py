"""The public Python API: ``init``, ``load``, ``save_hf`` (re-exported by ``pythia_jax``)."""

from __future__ import annotations

import os
from typing import Any

from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.convert.sources import load_params  # re-exported: api.load_params


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

    from pythia_jax.config import check_seed
    from pythia_jax.model import GPTNeoX

    check_seed("seed", seed)  # an integer in [0, 2**32 - 1]: 1.7 or "3" would be truncated or parsed
    return GPTNeoX(resolve_config(config, **overrides), rngs=nnx.Rngs(int(seed)))


def load(path: str | os.PathLike, step: int | None = None, dtype: str | None = None, **kwargs: Any):
    """A ``GPTNeoX`` from an HF directory, a folder of HF revisions ``step<N>/`` (the newest
    unless ``step``), a pythia-jax checkpoint directory or training run folder (newest valid step unless ``step``) or a
    GPT-NeoX DeepSpeed checkpoint (``global_stepN/`` or its parent; fp32 ZeRO master weights
    when the optimizer shards are there).

    ``dtype``: compute dtype (``"float32"``, ``"bfloat16"``); parameters stay float32.
    ``shardings``: a ``jax.sharding.Sharding`` (or a tree of them matching the params) to place
    the params on; a checkpoint of this project restores only each device's slice.
    Other keywords by source (``convert.sources.SOURCE_OPTIONS``): GPT-NeoX ``config_files``,
    ``hidden_act``, ``master_weights``. ``ConfigError`` for a ``step`` that is not a non-negative
    integer or a keyword the source does not take; ``CheckpointError`` for a missing step or path.
    """
    from pythia_jax.host_memory import to_device_tree
    from pythia_jax.model import model_from_params

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
