"""Parameter load/save for the converters and the public API: one step, synchronous, low memory.

``save_params_checkpoint`` and ``load_params`` run the training checkpointer in its bounded host
I/O mode (:mod:`pythia_jax.checkpoint.hostio`): peak memory stays near one copy of the tree.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from pythia_jax.checkpoint.hostio import _io_limit
from pythia_jax.checkpoint.layout import PARAMS, read_model_config, resolve_checkpoint_step
from pythia_jax.checkpoint.manager import TrainCheckpointer
from pythia_jax.checkpoint.restore import _abstract_like, _item_tree_metadata, cast_tree
from pythia_jax.config import DTYPES, ConfigError, ModelConfig
from pythia_jax.errors import CheckpointError
from pythia_jax.host_memory import widened


def save_params_checkpoint(directory: str | os.PathLike, step: int, config: ModelConfig, params: Any,
                           opt_state: Any = None, metadata: Mapping[str, Any] | None = None,
                           dtype: Any = None) -> None:
    """Write one step of params (and optionally optimizer state) as a checkpoint of this project.

    Synchronous. Used by the converters (HF / GPT-NeoX → this format). ``dtype`` (e.g.
    float32): params arrays stored in a narrower float type that it holds exactly (float16,
    bfloat16) are written in it, widened by tensorstore chunk by chunk (Orbax
    ``SaveArgs.dtype``), so a float32 checkpoint of a float16 release never needs a float32 copy
    in memory; None: every array as it is. A Ctrl-C during the
    write is honoured once the write has returned (``io_utils.deferred_interrupts``), so the
    caller's temporary folder can then be removed with nothing still writing into it.
    """
    import jax

    from pythia_jax.io_utils import deferred_interrupts

    stored = params if dtype is None else jax.tree.map(  # sizes as written
        lambda x: jax.ShapeDtypeStruct(x.shape, widened(x.dtype, dtype)), params)
    limit = _io_limit([stored, opt_state])
    # Orbax's writer threads go on after a KeyboardInterrupt unwinds the main thread, and would
    # put files back into a folder being removed: a Ctrl-C lets the save finish, then raises
    with deferred_interrupts("the checkpoint write in progress"), \
            TrainCheckpointer(directory, save_steps=(), async_save=False,
                              model_config=config, io_limit_bytes=limit) as ckpt:
        if int(step) in ckpt.all_steps():
            raise CheckpointError(f"{ckpt.directory}/{step} already exists")
        ckpt.save(step, params, opt_state, None, metadata, force=True, params_dtype=dtype)


def load_params(directory: str | os.PathLike, step: int | None = None,
                shardings: Any = None, host: bool = False, dtype: Any = None) -> tuple[ModelConfig, Any]:
    """Read ``(ModelConfig, params)`` from a checkpoint directory (newest valid step by default).

    ``shardings``: None (first local device), one ``jax.sharding.Sharding`` for every array, or a
    tree of shardings matching params. ``host=True`` (without shardings): numpy arrays, never
    copied to a device (the exporters' path). ``directory`` may also be a step directory
    ``<dir>/<step>``.
    ``dtype``: the params' dtype. None (default): the model's ``param_dtype`` (float32 unless the
    stored ``model_config.json`` says otherwise), so a checkpoint stored in float16 (``convert
    hf-to-jax`` keeps a release's dtype) loads as the float32 upcast of its weights;
    ``"stored"``: each array in the dtype it is stored in (no cast; the exporters and ``audit``);
    or float32 / bfloat16 / float16 (a name or a numpy / JAX dtype; anything else: ``ConfigError``).
    The arrays are read and verified in their stored dtype, then cast one at a time (see
    :func:`stored_dtypes`); a cast that would turn a finite value into inf is a ``CheckpointError``.
    """
    if host and shardings is not None:
        raise ValueError("load_params: host=True reads numpy arrays; do not pass shardings")
    wanted = None if dtype is None or (isinstance(dtype, str) and dtype == STORED) else _weight_dtype(dtype)
    import jax

    root, step = resolve_checkpoint_step(directory, step)
    config = read_model_config(root)
    from pythia_jax.model import abstract_params

    limit = _io_limit([abstract_params(config)]) if config is not None else None
    ckpt = TrainCheckpointer(root, save_steps=(), async_save=False, io_limit_bytes=limit)
    try:
        if step is None and not ckpt.all_steps():
            raise CheckpointError(f"{root} holds no checkpoint steps")
        abstract = None
        if shardings is not None:
            stored = _stored_params_metadata(ckpt, step)
            if isinstance(shardings, jax.sharding.Sharding):
                abstract = _abstract_like(stored, lambda _: shardings)
            else:
                abstract = jax.tree.map(
                    lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), stored, shardings)
        restored = ckpt.restore(step, {PARAMS: abstract} if abstract is not None else None,
                                host_params=abstract is None)
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointError(f"{root}: no valid checkpoint step")
    params = restored.params
    del restored
    if not (isinstance(dtype, str) and dtype == STORED):
        if wanted is None:
            wanted = np.dtype(config.param_dtype if config is not None else np.float32)
        params = cast_tree(params, lambda _, x: wanted)
    if host:
        return config, params
    if abstract is None:  # numpy -> the first local device, leaf by leaf (adopted, not copied, on CPU)
        from pythia_jax.host_memory import to_device_tree

        return config, to_device_tree(params)
    return config, params


STORED = "stored"


def _weight_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of ``load_params``' ``dtype`` argument: one of ``config.DTYPES`` (a name
    or a numpy / JAX dtype); anything else is a ``ConfigError``."""
    import ml_dtypes  # noqa: F401 - registers the name "bfloat16" with numpy

    try:
        wanted = np.dtype(dtype)
    except TypeError:
        wanted = None
    if wanted is None or wanted.name not in DTYPES:
        raise ConfigError(f"load_params: dtype={dtype!r} is not a weight dtype; use None (the model's "
                          f"param_dtype), {STORED!r} (as stored) or one of {', '.join(DTYPES)}")
    return wanted


def stored_dtypes(directory: str | os.PathLike, step: int | None = None) -> dict[str, str]:
    """``{"embed_in/embedding": "float16", …}``: the dtype each params array is stored in at
    ``step`` (newest valid step by default), from Orbax's metadata (no array is read)."""
    from pythia_jax.checkpoint.integrity import _leaf_paths

    root, step = resolve_checkpoint_step(directory, step)
    ckpt = TrainCheckpointer(root, save_steps=(), async_save=False)
    try:
        meta = _stored_params_metadata(ckpt, step)
    finally:
        ckpt.close()
    return {k: np.dtype(v.dtype).name for k, v in _leaf_paths(meta)}


def _stored_params_metadata(ckpt: TrainCheckpointer, step: int | None) -> Any:
    step = ckpt.latest_valid_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{ckpt.directory}: no valid checkpoint step")
    return _item_tree_metadata(ckpt.directory, step, PARAMS)

