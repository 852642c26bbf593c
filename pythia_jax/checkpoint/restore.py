"""Restoring one step: restore targets, the read itself, verification (``_restore_items``).

Resharding: restore targets are ``jax.ShapeDtypeStruct``s carrying a ``sharding``; each device
reads only its own slice, whatever mesh (or number of devices/processes) wrote the checkpoint.
A step is read in four parts: its metadata record (:func:`_read_step_record`), the targets of its
array items (:func:`_array_targets`), the Orbax arguments of every item (:func:`_restore_args`,
:func:`_data_iter_args`), then the arrays (:func:`_read_items`), whose checksums are verified.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import numpy as np

from pythia_jax.checkpoint.integrity import _check_shapes, _key_name, _leaf_paths, _verify_checksums, step_problem
from pythia_jax.checkpoint.items import grain_restore_args
from pythia_jax.checkpoint.layout import (
    _ARRAY_ITEMS,
    _INTERNAL_KEY,
    DATA_ITER,
    METADATA,
    OPT_STATE,
    PARAMS,
    CheckpointIntegrityError,
    RunConfigMismatch,
    _agree_on_success,
    _epath,
)
from pythia_jax.errors import CheckpointError, DataError
from pythia_jax.host_memory import cast_overflow

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RestoredState:
    """What :meth:`TrainCheckpointer.restore` returns."""

    step: int
    params: Any
    opt_state: Any = None
    data_state: Any = None  # the restored grain iterator, or the saved JSON document
    metadata: dict = dataclasses.field(default_factory=dict)


def _abstract_like(tree: Any, sharding_for: Callable[[Any], Any]) -> Any:
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(x)), tree)


def _to_abstract(x: Any) -> Any:
    import jax

    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _item_tree_metadata(directory, step: int, item: str) -> Any:
    """Tree of ``ArrayMetadata`` (shape, dtype, …) of a stored PyTree item, without reading arrays."""
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointHandler().metadata(_epath(directory) / str(step) / item)
    return getattr(meta, "tree", meta)


def _restore_items(manager, directory, step: int, abstract_state: dict,
                   data_iterator: Any, host_params: bool = False) -> RestoredState:
    """Restore one step with verification; raises CheckpointIntegrityError for corrupt data.

    Arrays are read in the dtype they are stored in (their checksums are of the stored bits) and
    then cast to the dtype of their target in ``abstract_state`` (e.g. a float16 checkpoint made
    by ``convert hf-to-jax`` restored into a float32 train state); without a target they keep the
    stored dtype."""
    where = f"{directory}/{step}"
    problem = step_problem(directory, step)
    if problem is not None:
        raise CheckpointIntegrityError(f"{where}: {problem}")
    doc, internal, stored = _read_step_record(manager, directory, step, where)
    targets = _array_targets(internal["items"], stored, abstract_state, where)
    args = _restore_args(targets, abstract_state, host_params)
    args.update(_data_iter_args(internal.get("data_iter_format"), data_iterator, directory, step, where))
    restored = _read_items(manager, step, args, where)
    arrays = {item: restored[item] for item in targets}
    data_state = restored[DATA_ITER] if DATA_ITER in args else None
    del restored
    # A collective computation: every process reaches the same verdict. The checksums are of the
    # stored bits, so the arrays are read in their stored dtypes and cast to the targets' after.
    _verify_checksums(arrays, internal.get("checksums", {}), where)
    for item, wanted in abstract_state.items():
        if item in arrays and wanted is not None:
            dtypes = {k: v.dtype for k, v in _leaf_paths(wanted) if hasattr(v, "dtype")}
            arrays[item] = cast_tree(arrays.pop(item), lambda k, _, d=dtypes: d.get(k))
    return RestoredState(step=step, params=arrays[PARAMS], opt_state=arrays.get(OPT_STATE),
                         data_state=data_state, metadata=doc)


def cast_tree(tree: Any, dtype_for: Callable[[str, Any], Any]) -> Any:
    """``tree`` with each array leaf ``x`` at path ``k`` ("a/b/0") cast to ``dtype_for(k, x)``
    (None or the same dtype: unchanged), one leaf at a time: each source leaf is released as
    soon as its cast exists, so the peak is the larger tree plus one leaf when the caller holds
    no other reference. numpy leaves stay numpy (``astype``); a ``jax.Array`` is cast where it
    lies and keeps its sharding. A narrowing cast that would turn finite values into inf (e.g.
    |x| > 65504 to float16) raises ``CheckpointError`` naming the leaf.
    """
    import jax

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    del tree
    paths = ["/".join(_key_name(e) for e in path) for path, _ in flat]
    leaves = [leaf for _, leaf in flat]
    del flat
    for i, key in enumerate(paths):
        leaf = leaves[i]
        if not hasattr(leaf, "dtype"):
            continue
        dtype = dtype_for(key, leaf)
        if dtype is None or np.dtype(dtype) == np.dtype(leaf.dtype):
            continue
        if isinstance(leaf, jax.Array):
            leaves[i] = _astype_fn(np.dtype(dtype), leaf.sharding)(leaf)
        else:
            with np.errstate(over="ignore"):  # counted and refused just below, in one line
                leaves[i] = np.asarray(leaf).astype(dtype)
        bad = cast_overflow(leaves[i], leaf)
        if bad:
            raise CheckpointError(
                f"{key}: {bad} value(s) of this {np.dtype(leaf.dtype).name} array are beyond "
                f"{np.dtype(dtype).name}'s range and would become inf; read it in a wider dtype "
                f"(dtype=None for the model's param_dtype, 'stored', or 'float32')")
        del leaf
    return jax.tree_util.tree_unflatten(treedef, leaves)


@functools.lru_cache(maxsize=64)
def _astype_fn(dtype: np.dtype, sharding: Any) -> Callable:
    """One jitted cast per (dtype, sharding): every leaf of that kind reuses it (a new function
    per leaf would trace and compile once per leaf)."""
    import jax

    return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)


def _read_target(stored_meta: Any, target: Any) -> Any:
    """``target`` with each leaf's dtype replaced by its stored dtype (same shapes, shardings)."""
    import jax

    stored = {k: getattr(v, "dtype", None) for k, v in _leaf_paths(stored_meta)}

    def one(path, leaf):
        dtype = stored.get("/".join(_key_name(e) for e in path))
        if not isinstance(leaf, jax.ShapeDtypeStruct) or dtype is None or np.dtype(dtype) == leaf.dtype:
            return leaf
        return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)

    return jax.tree_util.tree_map_with_path(one, target)


def _read_step_record(manager, directory, step: int, where: str) -> tuple[dict, dict, dict]:
    """``(caller's metadata, the __checkpoint__ record, {item: stored array metadata})``."""
    import orbax.checkpoint as ocp

    try:
        doc = manager.restore(step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))[METADATA]
        internal = doc.pop(_INTERNAL_KEY)
        stored = {item: _item_tree_metadata(directory, step, item)
                  for item in _ARRAY_ITEMS if item in internal["items"]}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any read failure means an unusable step
        raise CheckpointIntegrityError(f"{where}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    return doc, internal, stored


def _array_targets(items: list[str], stored: dict, abstract_state: dict, where: str) -> dict[str, Any]:
    """The restore target of each array item to read: params always, the others when asked for.

    Without a target, params go to the first local device in their stored shapes; a given
    target must match the stored shapes (``CheckpointError`` otherwise).
    """
    import jax

    targets: dict[str, Any] = {}
    default_device = jax.local_devices()[0]
    for item in _ARRAY_ITEMS:
        if item != PARAMS and item not in abstract_state:
            continue
        if item not in items:
            if item == PARAMS:
                raise CheckpointIntegrityError(f"{where}: no params item")
            what = "optimizer state" if item == OPT_STATE else item
            raise CheckpointError(f"{where}: the checkpoint holds no {what}")
        stored_meta = stored.get(item)
        if stored_meta is None:
            raise CheckpointIntegrityError(f"{where}: {item} metadata unreadable")
        target = abstract_state.get(item)
        if target is None:
            target = _abstract_like(stored_meta, lambda _: jax.sharding.SingleDeviceSharding(default_device))
        else:
            _check_shapes(item, stored_meta, target, where)
            target = _read_target(stored_meta, jax.tree.map(_to_abstract, target))
        targets[item] = target
    return targets


def _restore_args(targets: dict[str, Any], abstract_state: dict, host_params: bool) -> dict[str, Any]:
    """Orbax restore arguments of the array items (params as numpy with ``host_params``)."""
    import jax
    import orbax.checkpoint as ocp

    args = {item: ocp.args.StandardRestore(t) for item, t in targets.items()}
    if host_params and abstract_state.get(PARAMS) is None:
        # numpy straight from tensorstore: no second (device) copy of every array
        args[PARAMS] = ocp.args.PyTreeRestore(
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), targets[PARAMS]))
    return args


def _data_iter_args(data_format: str | None, data_iterator: Any, directory, step: int,
                    where: str) -> dict[str, Any]:
    """The ``data_iter`` item's restore argument, if it is to be read."""
    import jax
    import orbax.checkpoint as ocp

    if data_format == "grain" and data_iterator is not None and not _grain_state_exists(directory, step):
        logger.warning(f"{where}: the data iterator state was saved by a different number of processes "
                       f"than {jax.process_count()}; not restoring it (position the iterator from the "
                       "step instead)")
    elif data_format == "grain" and data_iterator is not None:
        return {DATA_ITER: grain_restore_args(data_iterator)}
    elif data_format == "json":
        return {DATA_ITER: ocp.args.JsonRestore()}
    return {}


def _read_items(manager, step: int, args: dict[str, Any], where: str) -> Any:
    """Read the step's items; a failure on any process raises on every process."""
    import orbax.checkpoint as ocp

    error: CheckpointIntegrityError | None = None
    restored = None
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - a local read failure; agreed on below
        mismatch = _data_mismatch(e)
        if mismatch is not None:  # another run's data order: intact, not this run's to resume
            raise RunConfigMismatch(f"{where}: {mismatch}; use another output directory, or the "
                                    "checkpoint's value") from e
        error = CheckpointIntegrityError(f"{where}: cannot read arrays ({type(e).__name__}: {e})")
        error.__cause__ = e
    _agree_on_success(where, error)
    return restored


def _data_mismatch(error: BaseException) -> str | None:
    """The message of the ``DataError`` the data iterator raised for a state saved with other
    settings (found anywhere in ``error``'s chain), or None."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DataError) and "data iterator checkpoint was made with" in str(e):
            return str(e)
        e = e.__cause__ or e.__context__
    return None


def _grain_state_exists(directory, step: int) -> bool:
    """Whether grain's per-process state file for this process layout is in the step."""
    import jax

    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return (_epath(directory) / str(step) / DATA_ITER / name).exists()
