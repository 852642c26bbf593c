"""What one step's save writes: the Orbax arguments of each item and the metadata document.

Items: ``params`` and ``opt_state`` (PyTrees of arrays), ``data_iter`` (a grain iterator, saved
per process by grain's own Orbax handler, or a JSON document), ``metadata`` (the caller's JSON
plus the ``__checkpoint__`` record: format version, item list, data-iterator format and the
per-array checksums of :func:`pythia_jax.checkpoint.integrity.tree_checksums`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pythia_jax.checkpoint.hostio import _host_leaf
from pythia_jax.checkpoint.integrity import _items_checksums
from pythia_jax.checkpoint.layout import _INTERNAL_KEY, DATA_ITER, FORMAT_VERSION, METADATA, OPT_STATE, PARAMS
from pythia_jax.host_memory import widens


def _is_grain_iterator(obj: Any) -> bool:
    return hasattr(obj, "get_state") and hasattr(obj, "set_state")


def grain_save_args(iterator: Any) -> Any:
    """Orbax args saving a grain iterator (``grain.checkpoint.CheckpointSave``: one JSON file per
    process, written by ``grain.checkpoint.CheckpointHandler``, which importing
    ``grain.checkpoint`` registers with Orbax)."""
    import grain.checkpoint

    return grain.checkpoint.CheckpointSave(iterator)


def grain_restore_args(iterator: Any) -> Any:
    """Orbax args restoring into a grain iterator in place (``grain.checkpoint.CheckpointRestore``)."""
    import grain.checkpoint

    return grain.checkpoint.CheckpointRestore(iterator)


def _save_args(params, opt_state, data_state, metadata, step,
               host_io: bool = False, params_dtype: Any = None) -> tuple[dict, dict]:
    """``(Orbax args per item, checksums per item)`` of one step's save.

    ``params_dtype`` (host I/O mode only, e.g. float32): params leaves that it holds exactly
    (``integrity.widens``) are stored in it, cast by tensorstore chunk by chunk as they are
    written (Orbax ``SaveArgs.dtype``); their checksums are those of the stored values.
    """
    import jax
    import orbax.checkpoint as ocp

    trees = {item: tree for item, tree in ((PARAMS, params), (OPT_STATE, opt_state)) if tree is not None}
    if params_dtype is not None and not host_io:
        raise ValueError("params_dtype needs the host I/O mode (io_limit_bytes)")
    if host_io:  # host-resident leaves as numpy views: written by the bounded host handler, no copies
        trees = {item: jax.tree.map(_host_leaf, tree) for item, tree in trees.items()}
        args: dict[str, Any] = {item: ocp.args.PyTreeSave(tree) for item, tree in trees.items()}
        if params_dtype is not None and PARAMS in trees:
            target = np.dtype(params_dtype)
            save_args = jax.tree.map(
                lambda x: ocp.SaveArgs(dtype=target if widens(x.dtype, target) else None), trees[PARAMS])
            args[PARAMS] = ocp.args.PyTreeSave(trees[PARAMS], save_args=save_args)
    else:
        args = {item: ocp.args.StandardSave(tree) for item, tree in trees.items()}
    checksums = _items_checksums(trees, {PARAMS: params_dtype})
    data_format = None
    if data_state is not None:
        if _is_grain_iterator(data_state):
            args[DATA_ITER] = grain_save_args(data_state)
            data_format = "grain"
        else:
            args[DATA_ITER] = ocp.args.JsonSave(_jsonable(data_state, "data_state"))
            data_format = "json"
    doc = dict(_jsonable(dict(metadata or {}), "metadata"))
    doc[_INTERNAL_KEY] = {"format_version": FORMAT_VERSION, "step": step,
                          "items": sorted(args) + [METADATA], "data_iter_format": data_format,
                          "checksums": checksums}
    args[METADATA] = ocp.args.JsonSave(doc)
    return args, checksums


def _jsonable(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj, default=_json_default))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "shape") and getattr(obj, "shape", None) == ():
        return np.asarray(obj).item()
    raise TypeError(f"cannot serialise {type(obj).__name__}")
