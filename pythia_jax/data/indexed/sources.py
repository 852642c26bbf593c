"""Byte sources of indexed datasets: local files (``numpy.memmap``), tensorstore kvstore URLs
(``gs://``, ``s3://``, ``file://``, ``memory://``) and the sharded ``prefix-000NN-of-000KK.bin``
streams, all read as one byte stream with ``read(start, stop)``.
"""

from __future__ import annotations

import glob
import os
import re
import threading
from typing import Sequence

import numpy as np

from pythia_jax.errors import DataError, DataFileNotFound
from pythia_jax.io_utils import is_url

_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.bin$")


# --------------------------------------------------------------------------- byte sources


class ByteSource:
    """A read-only byte stream of known size. ``read(start, stop)`` returns a uint8 array."""

    name: str
    size: int

    def read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        return [self.read(a, b) for a, b in ranges]

    def _check_range(self, start: int, stop: int) -> None:
        if start < 0 or stop > self.size or start > stop:
            raise DataError(f"{self.name}: byte range [{start}, {stop}) is outside the file "
                            f"({self.size} bytes); the file is truncated or the index is wrong")


class LocalFile(ByteSource):
    """A local file as a read-only memory map."""

    def __init__(self, path: str):
        self.name = str(path)
        if not os.path.isfile(path):
            raise DataFileNotFound(f"{path}: file not found")
        self.size = os.path.getsize(path)
        # A plain ndarray view of the map (the map stays open through ``.base``): slicing a
        # ``np.memmap`` subclass runs ``__array_finalize__`` per slice, which cost as much as the
        # copies themselves when a loader step gathers thousands of document segments.
        self._mm = (np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray) if self.size
                    else np.zeros(0, np.uint8))

    def read(self, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        return self._mm[start:stop]

    def as_array(self, dtype) -> np.ndarray | None:
        """The whole file viewed as ``dtype`` (no copy), or None when its size doesn't divide."""
        itemsize = np.dtype(dtype).itemsize
        if self.size % itemsize:
            return None
        return self._mm.view(dtype)


_TS_CONTEXT = None
_TS_LOCK = threading.Lock()


def _ts_context():
    """One tensorstore Context for the process, so ``memory://`` stores are shared between opens."""
    global _TS_CONTEXT
    import tensorstore as ts
    with _TS_LOCK:
        if _TS_CONTEXT is None:
            _TS_CONTEXT = ts.Context()
        return _TS_CONTEXT


def _split_url(url: str) -> tuple[str, str]:
    """``scheme://dir/name`` -> (``scheme://dir/``, ``name``)."""
    head, _, name = url.rpartition("/")
    return head + "/", name


def open_kvstore(directory_url: str):
    """Open a tensorstore kvstore for a directory URL (shared process-wide context)."""
    import tensorstore as ts
    try:
        return ts.KvStore.open(directory_url, context=_ts_context()).result()
    except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/others
        raise DataError(f"{directory_url}: cannot open with tensorstore: {e}") from None


_SIZE_RE = re.compile(r"value of size (\d+)")


class KvStoreFile(ByteSource):
    """A file behind a tensorstore kvstore, read with byte-range requests."""

    def __init__(self, url: str, kvstore=None):
        directory, key = _split_url(url)
        self.name = url
        self._kv = kvstore if kvstore is not None else open_kvstore(directory)
        self._key = key
        self.size = self._find_size()

    def _find_size(self) -> int:
        # Ask for a range far past the end: tensorstore's OUT_OF_RANGE error states the size
        # for most drivers (file, memory). Otherwise find it with a bisection of 1-byte reads.
        try:
            res = self._kv.read(self._key, byte_range=slice(1 << 62, (1 << 62) + 1)).result()
        except ValueError as e:
            m = _SIZE_RE.search(str(e))
            if m:
                return int(m.group(1))
        else:
            if res.state == "missing":
                raise DataFileNotFound(f"{self.name}: file not found")
        res = self._kv.read(self._key, byte_range=slice(0, 0)).result()
        if res.state == "missing":
            raise DataFileNotFound(f"{self.name}: file not found")
        lo, hi = 0, 1  # invariant: size >= lo; find hi with size < hi
        while self._has_byte(hi - 1):
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # size in [lo, hi)
            mid = (lo + hi) // 2
            if self._has_byte(mid - 1):
                lo = mid
            else:
                hi = mid
        return lo

    def _has_byte(self, pos: int) -> bool:
        try:
            r = self._kv.read(self._key, byte_range=slice(pos, pos + 1)).result()
            return r.state == "value" and len(r.value) == 1
        except ValueError:
            return False

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.read_many([(start, stop)])[0]

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        futures = []
        for a, b in ranges:
            self._check_range(a, b)
            futures.append(None if a == b else
                           self._kv.read(self._key, byte_range=slice(int(a), int(b))))
        out = []
        for (a, b), fut in zip(ranges, futures):
            if fut is None:
                out.append(np.zeros(0, np.uint8))
                continue
            try:
                res = fut.result()
            except ValueError as e:
                raise DataError(f"{self.name}: reading bytes [{a}, {b}) failed: {e}") from None
            if res.state != "value" or len(res.value) != b - a:
                raise DataError(f"{self.name}: short read of bytes [{a}, {b}) ({len(res.value)} bytes)")
            out.append(np.frombuffer(res.value, dtype=np.uint8))
        return out


class ShardedStream(ByteSource):
    """Several byte sources read as one stream (rows may straddle the shard edges)."""

    def __init__(self, shards: Sequence[ByteSource], name: str):
        self.shards = list(shards)
        self.name = name
        sizes = np.array([s.size for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.size = int(self.starts[-1])

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(shard, local start, local stop) pieces covering [start, stop)."""
        pieces = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            local_stop = min(stop, int(self.starts[k + 1]))
            if local_stop > pos:
                pieces.append((k, pos - int(self.starts[k]), local_stop - int(self.starts[k])))
            pos = local_stop
            k += 1
        return pieces

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.read_many([(start, stop)])[0]

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        for a, b in ranges:
            self._check_range(a, b)
        per_range = [self._pieces(a, b) for a, b in ranges]
        # Group the reads per shard so remote shards get all their requests at once.
        requests: dict[int, list[tuple[int, int]]] = {}
        for pieces in per_range:
            for k, a, b in pieces:
                requests.setdefault(k, []).append((a, b))
        results = {k: iter(self.shards[k].read_many(r)) for k, r in requests.items()}
        out = []
        for pieces in per_range:
            parts = [next(results[k]) for k, _, _ in pieces]
            out.append(parts[0] if len(parts) == 1 else
                       np.concatenate(parts) if parts else np.zeros(0, np.uint8))
        return out


def open_byte_source(path: str) -> ByteSource:
    """A local file (memory map) or a URL (tensorstore)."""
    if is_url(path):
        return KvStoreFile(path)
    return LocalFile(path)


def local_shard_files(prefix: str) -> list[str]:
    """The local files named like shards of ``prefix`` (``prefix-NNNNN-of-NNNNN.bin``), sorted,
    unchecked (:func:`_find_shards` checks the set)."""
    return sorted(n for n in glob.glob(glob.escape(prefix) + "-?????-of-?????.bin") if _SHARD_RE.search(n))


def _find_shards(prefix: str) -> list[str]:
    """Shard files ``prefix-000NN-of-000KK.bin`` of a prefix, checked for completeness."""
    if is_url(prefix):
        directory, base = _split_url(prefix)
        kv = open_kvstore(directory)
        try:
            keys = [k.decode() if isinstance(k, bytes) else k for k in kv.list().result()]
        except Exception:  # noqa: BLE001 - a driver without listing
            keys = []
        pattern = re.compile(re.escape(base) + r"-\d{5}-of-\d{5}\.bin")
        names = [directory + k for k in keys if pattern.fullmatch(k)]
    else:
        names = local_shard_files(prefix)
    parsed = sorted((int(m.group(1)), int(m.group(2)), n)
                    for n, m in ((n, _SHARD_RE.search(n)) for n in names) if m)
    if not parsed:
        return []
    last = {p[1] for p in parsed}
    if len(last) != 1:
        raise DataError(f"{prefix}: shard files disagree on the shard count: {sorted(last)}")
    of = last.pop()
    have = [p[0] for p in parsed]
    # The Pythia release numbers its 21 shards 00000..00020 "of-00020"; also accept 0..of-1.
    if have != list(range(of + 1)) and have != list(range(of)):
        missing = sorted(set(range(of + 1)) - set(have))
        raise DataError(f"{prefix}: incomplete shard set: have {len(have)} shards "
                        f"-of-{of:05d}, missing indices {missing[:10]}")
    return [p[2] for p in parsed]
