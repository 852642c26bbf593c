"""Orbax checkpoints of this project: Pythia's save schedule, integrity checks, resharding restore.

Layout of a checkpoint directory (an ``orbax.checkpoint.CheckpointManager`` root)::

    <dir>/model_config.json          ModelConfig.to_dict(), written once, atomically
    <dir>/<step>/params/             the canonical params tree (float32), Orbax PyTree (OCDBT)
    <dir>/<step>/opt_state/          optax state (optional)
    <dir>/<step>/extra_state/        other arrays of the train state (loss scale, counters; optional)
    <dir>/<step>/data_iter/          data-iterator state: grain's per-process JSON files
                                     (``process_<i>-of-<n>.json``) or one JSON document
    <dir>/<step>/metadata/           JSON: the caller's metadata plus ``__checkpoint__``
                                     (format version, item list, per-leaf checksums)

A step directory is written under a temporary name and renamed (local disk) or marked with
``commit_success.txt`` (``gs://``) by Orbax when complete, so an interrupted save is never seen
as a step. On top of that every step stores two 32-bit checksums per array (wrap-around sums of
the raw bit patterns, plain and position-weighted: exact under any sharding), verified on
restore. :meth:`TrainCheckpointer.restore` without a step walks back from the newest step,
warning about each incomplete or corrupt one, until one restores and verifies.

Resharding: restore targets are ``jax.ShapeDtypeStruct``s carrying a ``sharding``; each device
reads only its own slice, whatever mesh (or number of devices/processes) wrote the checkpoint.

Multi-host: every process calls every method (Orbax synchronises); ``model_config.json`` and
JSON items are written by process 0; grain iterator states are written per process.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import time
import warnings
from typing import Any, Callable, Collection, Mapping

import numpy as np

from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.errors import CheckpointError


MODEL_CONFIG_FILE = "model_config.json"
PARAMS = "params"
OPT_STATE = "opt_state"
EXTRA_STATE = "extra_state"
DATA_ITER = "data_iter"
METADATA = "metadata"
FORMAT_VERSION = 1
_INTERNAL_KEY = "__checkpoint__"
_COMMIT_MARKER = "commit_success.txt"
_ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"

# ModelConfig fields that describe how the model runs, not what its parameters are.
EXECUTION_FIELDS = ("name", "dtype", "param_dtype", "remat", "attention", "scan_layers", "loss_chunk")


class CheckpointIntegrityError(CheckpointError):
    """A step that is incomplete or whose stored bytes do not match what was saved."""


# ---------------------------------------------------------------------------------- schedule
def pythia_steps(max_step: int = 143000, log_until: int = 512, every: int = 1000) -> list[int]:
    """Pythia's checkpoint steps: 0, the powers of two up to ``log_until``, then every ``every``.

    With the defaults this is the 154 steps of the released suite (0, 1, 2, 4, …, 512, 1000,
    2000, …, 143000). Scaled-down schedules for short runs: e.g. ``pythia_steps(200, 16, 50)``.
    """
    return CheckpointSchedule(max_step=max_step, log_until=log_until, every=every).steps()


@dataclasses.dataclass(frozen=True)
class CheckpointSchedule:
    """Which steps to save: Pythia's log-spaced early steps, a fixed interval, extra steps.

    ``every=0`` disables the interval; ``log_until=-1`` disables the log-spaced steps (and 0).
    """

    max_step: int = 143000
    log_until: int = 512
    every: int = 1000
    extra_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_step < 0 or self.every < 0:
            raise ConfigError(f"CheckpointSchedule: max_step and every must be >= 0, got {self}")

    def steps(self) -> list[int]:
        steps = set(int(s) for s in self.extra_steps)
        if self.log_until >= 0:
            steps.add(0)
            p = 1
            while p <= self.log_until:
                steps.add(p)
                p *= 2
        if self.every > 0:
            steps.update(range(self.every, self.max_step + 1, self.every))
        return sorted(s for s in steps if 0 <= s <= self.max_step)

    def should_save(self, step: int) -> bool:
        step = int(step)
        if step in self.extra_steps:
            return True
        if step < 0 or step > self.max_step:
            return False
        if self.log_until >= 0 and (step == 0 or (step <= self.log_until and step & (step - 1) == 0)):
            return True
        return self.every > 0 and step > 0 and step % self.every == 0


SaveSteps = CheckpointSchedule | Collection[int] | Callable[[int], bool]


def _as_predicate(save_steps: SaveSteps | None) -> Callable[[int], bool]:
    if save_steps is None:
        return CheckpointSchedule().should_save
    if isinstance(save_steps, CheckpointSchedule):
        return save_steps.should_save
    if callable(save_steps):
        return save_steps
    steps = frozenset(int(s) for s in save_steps)
    return steps.__contains__


# ---------------------------------------------------------------------------------- paths
def _epath(directory: str | os.PathLike):
    from etils import epath

    text = os.fspath(directory)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" not in text:
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


def _write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary sibling and a rename (epath: local or gs://)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        tmp.write_text(text)
        tmp.rename(path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


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
        _write_text_atomic(path / MODEL_CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    _sync("pythia_jax_write_model_config")  # every process passes here exactly once
    stored = read_model_config(path)
    diff = config_differences(stored, config) if stored is not None else ["model_config.json missing"]
    if diff:
        raise CheckpointError(
            f"{path} holds checkpoints of a different model ({'; '.join(diff)}); "
            "use another checkpoint directory or the matching model config")


# ---------------------------------------------------------------------------------- checksums
def _key_name(entry: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[("a/b/0", leaf), …]`` for array-like leaves; namedtuple fields and dict keys alike."""
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [("/".join(_key_name(e) for e in path), leaf) for path, leaf in flat
            if hasattr(leaf, "shape")]


def tree_checksums(tree: Any) -> dict[str, list[int]]:
    """Per-leaf ``[sum, weighted sum]`` of the raw bit patterns, modulo 2**32.

    Integer wrap-around sums are associative, so the value does not depend on how the array is
    sharded or on reduction order. Works on numpy arrays, single-device and (multi-host)
    sharded ``jax.Array``s alike. Keys are ``"a/b/0"`` paths.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    leaves = [(k, v) for k, v in _leaf_paths(tree) if hasattr(v, "shape") and hasattr(v, "dtype")]
    out: dict[str, list[int]] = {}
    on_device = []
    for k, v in leaves:
        host = _host_view(v)
        if host is not None:  # numpy, or a one-device CPU array: summed in chunks, no copies
            out[k] = list(_host_checksum(host))
        else:
            on_device.append((k, v if isinstance(v, jax.Array) else jnp.asarray(v)))
    if on_device:
        values = [v for _, v in on_device]
        mesh = next((v.sharding.mesh for v in values if isinstance(v.sharding, NamedSharding)), None)
        sums = np.asarray(_checksum_fn(mesh)(values).addressable_data(0))
        out.update({k: [int(a), int(b)] for (k, _), (a, b) in zip(on_device, sums)})
    return {k: out[k] for k, _ in leaves}


def _host_view(value: Any) -> np.ndarray | None:
    """A numpy view of ``value`` when that costs no copy (numpy, or a one-device CPU jax.Array)."""
    import jax

    if isinstance(value, np.ndarray):
        canonical = jax.dtypes.canonicalize_dtype(value.dtype)  # as jnp.asarray would store it
        return value if canonical == value.dtype else value.astype(canonical)
    if (isinstance(value, jax.Array) and value.is_fully_addressable and len(value.sharding.device_set) == 1
            and next(iter(value.sharding.device_set)).platform == "cpu"):
        return np.asarray(value)
    return None


_CHECKSUM_CHUNK = 1 << 22  # elements per jitted host-checksum call (16 MiB of uint32)


def _host_checksum(x: np.ndarray, chunk: int = _CHECKSUM_CHUNK) -> tuple[int, int]:
    """``tree_checksums``' two sums for one host array, in fixed-size chunks (bounded memory).

    Same values as the jitted path: bit patterns widened to uint32 (8-byte types folded), flat
    row-major index i weighted by 2·i + 1, both sums modulo 2**32. Large arrays go through one
    compiled chunk kernel (a single fused pass, ~7x numpy's speed); the last chunk is padded
    with zeros, which add nothing to either sum.
    """
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype == np.bool_:
        bits = flat.view(np.uint8)
    elif flat.dtype.itemsize in (1, 2, 4):
        bits = flat.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[flat.dtype.itemsize])
    else:  # 8-byte types: fold the two 32-bit halves like the jitted path
        halves = flat.view(np.uint32).reshape(-1, 2)
        bits = halves[:, 0] ^ (halves[:, 1] * np.uint32(0x9E3779B1))
    if bits.size <= chunk:
        b = bits.astype(np.uint64)
        weights = np.arange(b.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        return int(b.sum()) % (1 << 32), int((b * weights).sum(dtype=np.uint64)) % (1 << 32)
    kernel = _chunk_checksum_kernel()
    total = weighted = 0
    for start in range(0, bits.size, chunk):
        piece = bits[start:start + chunk]
        if piece.size < chunk:
            piece = np.concatenate([piece, np.zeros(chunk - piece.size, piece.dtype)])
        sums = np.asarray(kernel(piece, np.uint32(start & 0xFFFFFFFF)))
        total += int(sums[0])
        weighted += int(sums[1])
    return total % (1 << 32), weighted % (1 << 32)


@functools.lru_cache(maxsize=1)
def _chunk_checksum_kernel() -> Callable:
    """``(bits uint8/16/32[n], start uint32) -> uint32[2]``: the two sums of one chunk whose first
    element has flat index ``start`` (uint32 arithmetic wraps, which is the modulus we want)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def kernel(bits, start):
        b = bits.astype(jnp.uint32)
        index = start + jax.lax.iota(jnp.uint32, b.shape[0])
        weights = index * jnp.uint32(2) + jnp.uint32(1)
        return jnp.stack([jnp.sum(b, dtype=jnp.uint32), jnp.sum(b * weights, dtype=jnp.uint32)])

    return kernel


@functools.lru_cache(maxsize=8)
def _checksum_fn(mesh: Any) -> Callable:
    """One jitted checksum function per mesh (jit then caches one executable per tree layout)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    def one(x):
        itemsize = jnp.dtype(x.dtype).itemsize
        if x.dtype == jnp.bool_:
            bits = x.astype(jnp.uint32)
        elif itemsize in (1, 2, 4):
            bits = jax.lax.bitcast_convert_type(
                x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[itemsize]).astype(jnp.uint32)
        else:  # 8-byte types (x64 mode): fold the two halves
            halves = jax.lax.bitcast_convert_type(x, jnp.uint32)
            bits = halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x9E3779B1))
        index = jnp.zeros(bits.shape, jnp.uint32)
        stride = 1
        for axis in range(bits.ndim - 1, -1, -1):
            index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
            stride = (stride * bits.shape[axis]) % (1 << 32)
        weights = index * jnp.uint32(2) + jnp.uint32(1)
        return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])

    out_sharding = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    return jax.jit(lambda xs: jnp.stack([one(x) for x in xs]), out_shardings=out_sharding)


def _items_checksums(trees: Mapping[str, Any]) -> dict[str, dict[str, list[int]]]:
    """``{item: tree_checksums(tree)}`` computed in one call (one compilation for all items)."""
    flat = tree_checksums(dict(trees))
    out: dict[str, dict[str, list[int]]] = {item: {} for item in trees}
    for key, value in flat.items():
        item, _, rest = key.partition("/")
        out[item][rest] = value
    return out


def _verify_checksums(trees: Mapping[str, Any], expected: Mapping[str, Mapping[str, list[int]]],
                      where: str) -> None:
    trees = {item: tree for item, tree in trees.items() if expected.get(item)}
    if not trees:
        return
    got = _items_checksums(trees)
    for item in trees:
        bad = [k for k, v in expected[item].items() if got[item].get(k) != list(v)]
        if bad:
            raise CheckpointIntegrityError(
                f"{where}: {item} failed its checksum for {len(bad)} array(s) (first: {bad[0]}); "
                "the files are corrupt")


# ---------------------------------------------------------------------------------- restore state
@dataclasses.dataclass
class RestoredState:
    """What :meth:`TrainCheckpointer.restore` returns."""

    step: int
    params: Any
    opt_state: Any = None
    extra_state: Any = None
    data_state: Any = None  # the restored grain iterator, or the saved JSON document
    metadata: dict = dataclasses.field(default_factory=dict)


def _is_grain_iterator(obj: Any) -> bool:
    return hasattr(obj, "get_state") and hasattr(obj, "set_state")


def _abstract_like(tree: Any, sharding_for: Callable[[Any], Any]) -> Any:
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(x)), tree)


def _check_shapes(item: str, stored: Any, target: Any, where: str) -> None:
    """Compare stored array metadata with the restore target: CheckpointError on any mismatch."""
    stored_leaves = dict(_leaf_paths(stored))
    target_leaves = dict(_leaf_paths(target))
    missing = sorted(set(target_leaves) - set(stored_leaves))
    extra = sorted(set(stored_leaves) - set(target_leaves))
    problems = []
    if missing:
        problems.append(f"missing arrays {missing[:3]}")
    if extra:
        problems.append(f"unexpected arrays {extra[:3]}")
    for k in sorted(set(stored_leaves) & set(target_leaves)):
        s, t = stored_leaves[k], target_leaves[k]
        s_shape = tuple(getattr(s, "shape", ()) or ())
        t_shape = tuple(getattr(t, "shape", ()) or ())
        if s_shape != t_shape:
            problems.append(f"{k} has shape {s_shape} in the checkpoint but {t_shape} in the model")
    if problems:
        raise CheckpointError(f"{where}: {item} does not match the model: " + "; ".join(problems[:4]))


# ---------------------------------------------------------------------------------- manager
class TrainCheckpointer:
    """Saves and restores training state on a step schedule with Orbax (local disk or ``gs://``).

    Args:
      directory: checkpoint root (local path, ``file://`` path or ``gs://bucket/path``).
      save_steps: a :class:`CheckpointSchedule`, a collection of steps or a ``step -> bool``
        predicate (default: Pythia's 154 steps).
      async_save: write in a background thread (device→host copy happens before ``save`` returns,
        so the caller may donate/overwrite its arrays afterwards).
      max_to_keep: keep only the newest N steps (default: keep all, as Pythia does).
      model_config: when given, ``<dir>/model_config.json`` is written (or checked: a directory
        of a different model shape raises ``CheckpointError`` right away).
      io_limit_bytes: when given, the checkpointer works in "host I/O" mode for one-off saves and
        restores (the converters): host arrays (numpy, or one-device CPU jax.Arrays) are written
        straight from memory in chunks of at most 16 MiB, restores to host memory read one array
        at a time, and device arrays move at most this many bytes at a time (must be at least
        the largest array). Peak memory stays near one copy of the tree; the files are ordinary
        checkpoints (chunked), restorable by any checkpointer onto any mesh.
    """

    def __init__(self, directory: str | os.PathLike, *, save_steps: SaveSteps | None = None,
                 async_save: bool = True, max_to_keep: int | None = None,
                 model_config: ModelConfig | None = None, io_limit_bytes: int | None = None):
        import orbax.checkpoint as ocp

        self.directory = _epath(directory)
        self._should_save = _as_predicate(save_steps)
        self.model_config = model_config
        if model_config is not None:
            write_model_config(self.directory, model_config)
        self._warn_tmp_dirs()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            enable_should_save_is_saving_in_progress_check=False)
        registry = _bounded_io_registry(io_limit_bytes) if io_limit_bytes else None
        self._host_io = registry is not None
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        self._bad_steps: set[int] = set()  # found unusable by restore/latest_valid_step

    # -------------------------------------------------------------- queries
    def should_save(self, step: int) -> bool:
        return bool(self._should_save(int(step)))

    def all_steps(self) -> list[int]:
        """Every step Orbax sees as finalized (valid or not), ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_valid_step(self) -> int | None:
        """Newest step that looks complete (commit marker, readable metadata, all items present).

        Incomplete or unreadable steps are skipped with a warning. Array bytes are verified on
        restore (checksums), not here.
        """
        for step in reversed(self.all_steps()):
            problem = step_problem(self.directory, step)
            if problem is None:
                return step
            self._bad_steps.add(step)
            warnings.warn(f"checkpoint step {step} in {self.directory} is unusable ({problem}); "
                          "falling back to an earlier step", stacklevel=2)
        return None

    # -------------------------------------------------------------- save
    def save(self, step: int, params: Any, opt_state: Any = None, data_state: Any = None,
             metadata: Mapping[str, Any] | None = None, *, extra_state: Any = None,
             force: bool = False) -> bool:
        """Save the state of ``step`` when the schedule says so (or ``force``). Returns True if saved.

        ``params``/``opt_state``/``extra_state``: pytrees of (sharded) arrays; ``extra_state`` is
        for the rest of a train state (loss-scale state, skip counters). ``data_state`` is a grain
        iterator (``get_state``/``set_state``; saved per process) or a JSON-serialisable document
        (saved once, by process 0: use it for global positions). ``metadata``: a JSON document.
        Asynchronous unless ``async_save=False``; a step already on disk is not overwritten.
        """
        import orbax.checkpoint as ocp

        step = int(step)
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            if step not in self._bad_steps:
                return False  # already saved (e.g. the step a run resumed from)
            self._quarantine(step)
        args, _ = _save_args(params, opt_state, extra_state, data_state, metadata, step,
                             host_io=self._host_io)
        saved = self._manager.save(step, args=ocp.args.Composite(**args), force=True)
        return bool(saved)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- restore
    def restore(self, step: int | None = None, abstract_state: Mapping[str, Any] | None = None, *,
                data_iterator: Any = None, host_params: bool = False) -> RestoredState | None:
        """Restore ``step`` (or the newest valid step) onto the shardings of ``abstract_state``.

        ``abstract_state`` maps ``"params"`` (optionally ``"opt_state"``, ``"extra_state"``) to trees of
        ``jax.ShapeDtypeStruct`` with ``sharding`` (e.g. ``jax.eval_shape`` output plus the
        training shardings) or real arrays; each device reads only its slice. Without it,
        params are restored onto the first local device and the optimizer state is skipped.
        ``data_iterator``: the grain iterator to restore into (when grain state was saved).

        With ``step=None``, steps that are incomplete or fail verification are skipped with a
        warning; returns None when no step is usable. A checkpoint whose shapes differ from the
        target raises ``CheckpointError`` at once. ``host_params=True`` (without a params target)
        restores params as numpy arrays (no device copy: the converters' low-memory path).
        """
        if step is not None:
            return self._restore_step(int(step), abstract_state, data_iterator, host_params)
        for candidate in reversed(self.all_steps()):
            problem = step_problem(self.directory, candidate)
            if problem is None:
                try:
                    return self._restore_step(candidate, abstract_state, data_iterator, host_params)
                except CheckpointIntegrityError as e:
                    problem = str(e)
            self._bad_steps.add(candidate)
            warnings.warn(f"checkpoint step {candidate} in {self.directory} is unusable ({problem}); "
                          "falling back to an earlier step", stacklevel=2)
        return None

    def _restore_step(self, step: int, abstract_state: Mapping[str, Any] | None,
                      data_iterator: Any, host_params: bool = False) -> RestoredState:
        abstract_state = dict(abstract_state or {})
        unknown = set(abstract_state) - {PARAMS, OPT_STATE, EXTRA_STATE}
        if unknown:
            raise ValueError(f"abstract_state has unknown keys {sorted(unknown)}; "
                             "expected params/opt_state/extra_state")
        if self.model_config is not None:
            stored = read_model_config(self.directory)
            if stored is not None and config_differences(stored, self.model_config):
                raise CheckpointError(f"{self.directory}: different model shape: "
                                      + "; ".join(config_differences(stored, self.model_config)))
        return _restore_items(self._manager, self.directory, step, abstract_state, data_iterator,
                              host_params=host_params)

    def _quarantine(self, step: int) -> None:
        """Move an unusable step aside (``<step>.unusable-<time>``, kept for inspection) so it can be re-saved."""
        target = self.directory / f"{step}.unusable-{int(time.time())}"
        if _is_primary():
            (self.directory / str(step)).rename(target)
        _sync(f"pythia_jax_quarantine_{step}")
        warnings.warn(f"re-saving step {step}: the unusable copy was moved to {target}", stacklevel=3)
        self._bad_steps.discard(step)
        self._manager.reload()

    def _warn_tmp_dirs(self) -> None:
        if not self.directory.exists():
            return
        leftovers = sorted(p.name for p in self.directory.iterdir() if _TMP_SUFFIX in p.name)
        if leftovers:
            warnings.warn(f"{self.directory}: removing incomplete checkpoint(s) from an interrupted "
                          f"save: {', '.join(leftovers)}", stacklevel=3)


def _save_args(params, opt_state, extra_state, data_state, metadata, step,
               host_io: bool = False) -> tuple[dict, dict]:
    import jax
    import orbax.checkpoint as ocp

    trees = {item: tree for item, tree in ((PARAMS, params), (OPT_STATE, opt_state),
                                           (EXTRA_STATE, extra_state)) if tree is not None}
    if host_io:  # host-resident leaves as numpy views: written by _host_array_handler(), no copies
        trees = {item: jax.tree.map(_host_leaf, tree) for item, tree in trees.items()}
        args: dict[str, Any] = {item: ocp.args.PyTreeSave(tree) for item, tree in trees.items()}
    else:
        args = {item: ocp.args.StandardSave(tree) for item, tree in trees.items()}
    checksums = _items_checksums(trees)
    data_format = None
    if data_state is not None:
        if _is_grain_iterator(data_state):
            import grain.checkpoint  # noqa: F401  (registers CheckpointSave/Restore with orbax)
            from grain._src.python.checkpoint.handler import CheckpointSave

            args[DATA_ITER] = CheckpointSave(data_state)
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


def _read_json(path) -> Any:
    return json.loads(path.read_text())


def step_problem(directory: str | os.PathLike, step: int) -> str | None:
    """Why ``<dir>/<step>`` cannot be restored (incomplete, unreadable metadata…), or None if it looks fine."""
    step_dir = _epath(directory) / str(step)
    if not step_dir.exists():
        return "missing"
    if not (step_dir / _COMMIT_MARKER).exists():
        return f"no {_COMMIT_MARKER}: the save did not complete"
    try:
        _read_json(step_dir / _ORBAX_STEP_METADATA)
        doc = _read_json(step_dir / METADATA / METADATA)
    except FileNotFoundError as e:
        return f"missing file {e.filename or e}"
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"unreadable metadata: {type(e).__name__}: {e}"
    internal = doc.get(_INTERNAL_KEY) if isinstance(doc, dict) else None
    if not isinstance(internal, dict) or "items" not in internal:
        return "metadata lacks the checkpoint record"
    for item in internal["items"]:
        item_dir = step_dir / item
        if not item_dir.exists():
            return f"item {item!r} is missing"
        if item in _ARRAY_ITEMS:
            try:
                _read_json(item_dir / "_METADATA")
            except (OSError, ValueError, UnicodeDecodeError) as e:
                return f"{item}/_METADATA unreadable: {type(e).__name__}"
    return None


_ARRAY_ITEMS = (PARAMS, OPT_STATE, EXTRA_STATE)


def _restore_items(manager, directory, step: int, abstract_state: dict,
                   data_iterator: Any, host_params: bool = False) -> RestoredState:
    """Restore one step with verification; raises CheckpointIntegrityError for corrupt data."""
    import jax
    import orbax.checkpoint as ocp

    where = f"{directory}/{step}"
    problem = step_problem(directory, step)
    if problem is not None:
        raise CheckpointIntegrityError(f"{where}: {problem}")
    try:
        doc = manager.restore(step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))[METADATA]
        internal = doc.pop(_INTERNAL_KEY)
        stored = {item: _item_tree_metadata(directory, step, item)
                  for item in _ARRAY_ITEMS if item in internal["items"]}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any read failure means an unusable step
        raise CheckpointIntegrityError(f"{where}: unreadable checkpoint ({type(e).__name__}: {e})") from e

    targets: dict[str, Any] = {}
    default_device = jax.local_devices()[0]
    for item in _ARRAY_ITEMS:
        if item != PARAMS and item not in abstract_state:
            continue
        if item not in internal["items"]:
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
            target = jax.tree.map(_to_abstract, target)
        targets[item] = target

    args = {item: ocp.args.StandardRestore(t) for item, t in targets.items()}
    if host_params and abstract_state.get(PARAMS) is None:
        # numpy straight from tensorstore: no second (device) copy of every array
        args[PARAMS] = ocp.args.PyTreeRestore(
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), targets[PARAMS]))
    data_format = internal.get("data_iter_format")
    if data_format == "grain" and data_iterator is not None and not _grain_state_exists(directory, step):
        warnings.warn(f"{where}: the data iterator state was saved by a different number of processes "
                      f"than {jax.process_count()}; not restoring it (position the iterator from the "
                      "step instead)", stacklevel=3)
    elif data_format == "grain" and data_iterator is not None:
        import grain.checkpoint  # noqa: F401
        from grain._src.python.checkpoint.handler import CheckpointRestore

        args[DATA_ITER] = CheckpointRestore(data_iterator)
    elif data_format == "json":
        args[DATA_ITER] = ocp.args.JsonRestore()
    error: CheckpointIntegrityError | None = None
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - a local read failure; agreed on below
        error = CheckpointIntegrityError(f"{where}: cannot read arrays ({type(e).__name__}: {e})")
        error.__cause__ = e
    _agree_on_success(where, error)
    checksums = internal.get("checksums", {})
    # A collective computation: every process reaches the same verdict.
    _verify_checksums({item: restored[item] for item in targets}, checksums, where)
    return RestoredState(step=step, params=restored[PARAMS],
                         opt_state=restored[OPT_STATE] if OPT_STATE in targets else None,
                         extra_state=restored[EXTRA_STATE] if EXTRA_STATE in targets else None,
                         data_state=restored[DATA_ITER] if DATA_ITER in args else None,
                         metadata=doc)


def _grain_state_exists(directory, step: int) -> bool:
    """Whether grain's per-process state file for this process layout is in the step."""
    import jax

    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return (_epath(directory) / str(step) / DATA_ITER / name).exists()


def _to_abstract(x: Any) -> Any:
    import jax

    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _agree_on_success(where: str, error: Exception | None) -> None:
    """Raise on every process when any process failed to read the step (so all fall back together)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(int(error is None), np.int32))
        if error is None and int(np.min(flags)) != 1:
            error = CheckpointIntegrityError(f"{where}: another process failed to read this step")
    if error is not None:
        raise error


# ---------------------------------------------------------------------------------- params API
def save_params_checkpoint(directory: str | os.PathLike, step: int, config: ModelConfig, params: Any,
                           opt_state: Any = None, metadata: Mapping[str, Any] | None = None) -> None:
    """Write one step of params (and optionally optimizer state) as a checkpoint of this project.

    Synchronous. Used by the converters (HF / GPT-NeoX → this format).
    """
    limit = _io_limit([params, opt_state])
    with TrainCheckpointer(directory, save_steps=(), async_save=False,
                           model_config=config, io_limit_bytes=limit) as ckpt:
        if int(step) in ckpt.all_steps():
            raise CheckpointError(f"{ckpt.directory}/{step} already exists")
        ckpt.save(step, params, opt_state, None, metadata, force=True)


def resolve_checkpoint_dir(path: str | os.PathLike) -> tuple[Any, int | None]:
    """Accept a checkpoint root or a step directory inside one: -> (root, step or None)."""
    p = _epath(path)
    if (p / MODEL_CONFIG_FILE).exists():
        return p, None
    if p.name.isdigit() and (p.parent / MODEL_CONFIG_FILE).exists():
        return p.parent, int(p.name)
    raise CheckpointError(f"{p} is not a pythia-jax checkpoint directory (no {MODEL_CONFIG_FILE})")


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a checkpoint root of this project or a step directory in one."""
    try:
        resolve_checkpoint_dir(path)
        return True
    except CheckpointError:
        return False


def load_params(directory: str | os.PathLike, step: int | None = None,
                shardings: Any = None, host: bool = False) -> tuple[ModelConfig, Any]:
    """Read ``(ModelConfig, params)`` from a checkpoint directory (newest valid step by default).

    ``shardings``: None (first local device), one ``jax.sharding.Sharding`` for every array, or a
    tree of shardings matching params. ``host=True`` (without shardings): numpy arrays, never
    copied to a device (the exporters' path). ``directory`` may also be a step directory
    ``<dir>/<step>``.
    """
    if host and shardings is not None:
        raise ValueError("load_params: host=True reads numpy arrays; do not pass shardings")
    import jax

    root, dir_step = resolve_checkpoint_dir(directory)
    step = dir_step if step is None else step
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
    if host:
        return config, restored.params
    if abstract is None:  # numpy -> the first local device, leaf by leaf (adopted, not copied, on CPU)
        from pythia_jax.host_memory import to_device_tree

        return config, to_device_tree(restored.params)
    return config, restored.params


def _io_limit(trees: list[Any]) -> int:
    """Bytes Orbax may have in flight at once: the largest array (+1 MiB), at least 64 MiB."""
    import jax

    sizes = [int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(trees) if hasattr(x, "shape") and hasattr(x, "dtype")]
    return max(max(sizes, default=0) + (1 << 20), 64 << 20)


def _host_leaf(x: Any) -> Any:
    """A numpy view of a host-resident leaf (no copy); anything else unchanged."""
    view = _host_view(x) if hasattr(x, "shape") and hasattr(x, "dtype") else None
    return x if view is None else view


# Host I/O mode (converters). Measured at the pythia-1.4b shape (5.7 GB fp32, 1.6 GB largest
# array): Orbax's defaults write each array as one chunk, buffer up to a 2 GB OCDBT data file
# per write and read with 128 concurrent file reads, which together cost 0.3-0.5x the tree
# on top of the tree itself; with these bounds a save adds about 0.1x and a restore about 0.15x
# (scripts/bench_convert.py).
_HOST_CHUNK_BYTES = 16 << 20       # largest chunk of an array written from host memory
_HOST_DATA_FILE_BYTES = 64 << 20  # OCDBT data file size: tensorstore buffers about one per write
_HOST_READ_FILES = 4               # concurrent file reads when restoring into host memory


@functools.lru_cache(maxsize=1)
def _host_array_handler() -> Any:
    """Orbax's numpy handler, bounded: no defensive copy of every array before a save (the
    converters never modify what they save), chunked writes into small OCDBT data files, and
    restores that read one array at a time with few concurrent file reads."""
    import orbax.checkpoint as ocp

    from pythia_jax.io_utils import release_free_memory

    def with_fields(info: Any, **fields: Any) -> Any:
        info = copy.copy(info)
        for name, value in fields.items():
            setattr(info, name, value)
        return info

    class HostArrayHandler(ocp.type_handlers.NumpyHandler):
        def __init__(self) -> None:
            super().__init__(deepcopy_host_arrays=False)

        async def serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            args = [dataclasses.replace(a, chunk_byte_size=a.chunk_byte_size or _HOST_CHUNK_BYTES)
                    for a in args]
            infos = [with_fields(i, ocdbt_target_data_file_size=i.ocdbt_target_data_file_size
                                 or _HOST_DATA_FILE_BYTES) for i in infos]
            return await super().serialize(values, infos, args)

        async def deserialize(self, infos, args=None):
            args = args or [ocp.RestoreArgs()] * len(infos)
            out = []
            for info, arg in zip(infos, args):
                context = ocp.type_handlers.get_ts_context(
                    use_ocdbt=bool(info.is_ocdbt_checkpoint), file_io_concurrency_limit=_HOST_READ_FILES)
                out.extend(await super().deserialize([with_fields(info, ts_context=context)], [arg]))
                release_free_memory()  # the read's freed chunk buffers, before the next array
            return out

    return HostArrayHandler()


def _host_type_registry() -> Any:
    """Orbax's default type handlers with numpy arrays going through :func:`_host_array_handler`."""
    import jax
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    return th.create_type_handler_registry(
        *[(t, th.get_type_handler(t)) for t in (int, float, bytes, np.number)],
        (np.ndarray, _host_array_handler()),
        (jax.Array, th.get_type_handler(jax.Array)),
        (str, th.get_type_handler(str)))


def _bounded_io_registry(limit_bytes: int) -> Any:
    """Handlers of the host I/O mode (see :class:`TrainCheckpointer`'s ``io_limit_bytes``).

    Saves (always PyTreeSave in this mode) and host restores (PyTreeRestore) go through the
    bounded host handler for numpy leaves; jax leaves, and restores onto shardings
    (StandardRestore), keep at most ``limit_bytes`` in flight. Without a limit Orbax starts every
    array's write (or read) at once, and tensorstore's staging buffers plus the device->host
    copies add up to about another copy of the tree.
    """
    import orbax.checkpoint as ocp

    gb = limit_bytes / 1e9
    pytree = ocp.PyTreeCheckpointHandler(save_concurrent_gb=gb, restore_concurrent_gb=gb,
                                         type_handler_registry=_host_type_registry())
    impl = getattr(pytree, "_handler_impl", None)
    if impl is not None and hasattr(impl, "_save_device_host_concurrent_bytes"):
        impl._save_device_host_concurrent_bytes = int(limit_bytes)  # also bound device->host copies
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(None, ocp.args.StandardRestore, ocp.StandardCheckpointHandler(restore_concurrent_gb=gb))
    registry.add(None, ocp.args.PyTreeSave, pytree)
    registry.add(None, ocp.args.PyTreeRestore, pytree)
    json_handler = ocp.JsonCheckpointHandler()
    registry.add(None, ocp.args.JsonSave, json_handler)
    registry.add(None, ocp.args.JsonRestore, json_handler)
    return registry


def _stored_params_metadata(ckpt: TrainCheckpointer, step: int | None) -> Any:
    step = ckpt.latest_valid_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{ckpt.directory}: no valid checkpoint step")
    return _item_tree_metadata(ckpt.directory, step, PARAMS)


def _item_tree_metadata(directory, step: int, item: str) -> Any:
    """Tree of ``ArrayMetadata`` (shape, dtype, …) of a stored PyTree item, without reading arrays."""
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointHandler().metadata(_epath(directory) / str(step) / item)
    return getattr(meta, "tree", meta)


__all__ = [
    "CheckpointIntegrityError", "CheckpointSchedule", "RestoredState", "TrainCheckpointer",
    "pythia_steps", "save_params_checkpoint", "load_params", "read_model_config",
    "write_model_config", "config_differences", "tree_checksums", "step_problem",
    "is_checkpoint_dir", "resolve_checkpoint_dir",
]
