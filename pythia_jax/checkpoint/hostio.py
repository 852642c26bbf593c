"""Bounded host I/O for one-off saves and restores (the converters).

Measured at the pythia-1.4b shape (5.7 GB fp32, 1.6 GB largest array): Orbax's defaults write
each array as one chunk, buffer up to a 2 GB OCDBT data file per write and read with 128
concurrent file reads, which together cost 0.3-0.5x the tree on top of the tree itself; with
these bounds a save adds about 0.1x and a restore about 0.15x (scripts/bench_convert.py).
Saves in this mode are not zstd-compressed (``_HOST_COMPRESSION``).

Orbax offers no public switch for these bounds, so this module subclasses its public
``type_handlers.NumpyHandler`` and sets one private attribute of ``PyTreeCheckpointHandler``
(``_bounded_io_registry``), each in one place; a widening save (``SaveArgs.dtype``) of a large
array is written chunk by chunk through the handler's private ``_open_and_write`` (Orbax would
cast the whole array at once).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
from typing import Any

import numpy as np

from pythia_jax.checkpoint.integrity import _host_view


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


_HOST_CHUNK_BYTES = 4 << 20        # largest chunk of an array written from host memory
_HOST_DATA_FILE_BYTES = 16 << 20  # OCDBT data file size: tensorstore buffers about one per write
_WIDENING_WRITES = 8               # chunk writes in flight per array of a widening save
_HOST_READ_FILES = 4               # concurrent file reads when restoring into host memory
# Host restores map local data files (tensorstore's ``file_io_mode`` "memmap") instead of
# ``pread``-ing every chunk into a freshly allocated buffer and copying it again into the result.
# Measured at the pythia-1.4b shape (2.8 GB fp16 checkpoint, fresh processes, 3 alternating
# pairs): page faults 233k-284k -> 73k-78k per restore; over 4 more pairs on an idle machine,
# 5.6-8.0 s against 5.8-13.0 s (faster in each pair). Other storage (gs://) ignores the mode.
_HOST_FILE_IO_MODE = {"mode": "memmap"}
# No zstd in the host I/O mode's saves (the converters' one-step checkpoints). Measured at the
# pythia-410m shape (1.6 GB fp32 from fp16 weights, bare Orbax saves in fresh processes on 2
# cores): zstd level 1 took 2.4 s of CPU per save (saves of 2.7-3.5 s against 1.7-2.1 s without)
# to make the files 1.0 GB instead of 1.6 GB; the restore pays for the decompression again.
# Uncompressed data files are buffered whole, so they are kept small (16 MiB files of 4 MiB
# chunks: the save's peak stayed +0.2 GB over the tree, as with zstd; 64 MiB files: +0.6 GB).
# Restores read either kind (the codec is in each array's metadata).
_HOST_COMPRESSION = False


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

        async def _open_and_write(self, value, tspec, ts_context):
            """A widening save (Orbax ``SaveArgs.dtype``: tensorstore's "cast" driver) of a large
            array, written one storage chunk at a time: tensorstore would otherwise make the
            whole array's cast copy at once, for every array in flight (measured at the
            pythia-410m shape: a peak of +1.6 GB, the whole float32 tree)."""
            if tspec.get("driver") != "cast" or value.nbytes <= _HOST_CHUNK_BYTES:
                return await super()._open_and_write(value, tspec, ts_context)
            import tensorstore as ts

            store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            chunk = store.chunk_layout.write_chunk.shape
            pending: collections.deque = collections.deque()
            for index in np.ndindex(*(-(-n // c) for n, c in zip(value.shape, chunk))):
                box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunk, value.shape))
                if len(pending) >= _WIDENING_WRITES:
                    await pending.popleft()
                pending.append(store[box].write(value[box]))
            for write in pending:
                await write

        async def deserialize(self, infos, args=None):
            args = args or [ocp.RestoreArgs()] * len(infos)
            out = []
            for info, arg in zip(infos, args):
                context = _host_read_context(bool(info.is_ocdbt_checkpoint))
                out.extend(await super().deserialize([with_fields(info, ts_context=context)], [arg]))
                release_free_memory()  # the read's freed chunk buffers, before the next array
            return out

    return HostArrayHandler()


def _host_read_context(use_ocdbt: bool) -> Any:
    """The tensorstore context of a host restore: Orbax's, with few concurrent file reads and
    local files memory-mapped (``_HOST_FILE_IO_MODE``)."""
    import orbax.checkpoint as ocp
    import tensorstore as ts

    context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt, file_io_concurrency_limit=_HOST_READ_FILES)
    return ts.Context(dict(context.spec.to_json(), file_io_mode=_HOST_FILE_IO_MODE))


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
                                         type_handler_registry=_host_type_registry(),
                                         use_compression=_HOST_COMPRESSION)
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

