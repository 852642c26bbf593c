"""``IndexedDataset``: reading the items of a ``prefix.bin`` / ``prefix.idx`` pair (local or URL).
"""

from __future__ import annotations

import os

import numpy as np

from pythia_jax.data.indexed.index import Index
from pythia_jax.data.indexed.sources import (
    ByteSource,
    KvStoreFile,
    LocalFile,
    ShardedStream,
    _find_shards,
    open_byte_source,
)
from pythia_jax.errors import DataError, DataFileNotFound
from pythia_jax.io_utils import is_url

# --------------------------------------------------------------------------- the dataset


class IndexedDataset:
    """An ``MMapIndexedDataset`` (local or remote, one ``.bin`` or a sharded byte stream).

    ``prefix`` is the path without ``.bin``/``.idx``. Items are 1-D arrays of ``self.dtype``.
    """

    def __init__(self, prefix: str, *, check_index: bool = False):
        prefix = str(prefix)
        if prefix.endswith(".idx") or prefix.endswith(".bin"):
            prefix = prefix[:-4]
        self.prefix = prefix
        self.idx_path = prefix + ".idx"
        self.index = Index(self.idx_path)
        if check_index:
            self.index.check_consistent()
        self.dtype = self.index.dtype
        self.sizes: np.ndarray = self.index.sizes
        self.pointers: np.ndarray = self.index.pointers
        self.doc_idx: np.ndarray = self.index.doc_idx
        self.data = self._open_data()
        self.bin_path = self.data.name
        expected = self.index.data_nbytes
        if self.data.size < expected:
            raise DataError(f"{self.bin_path}: truncated data: the index {self.idx_path} needs "
                            f"{expected} bytes, the data has {self.data.size}")
        if self.data.size > expected:
            raise DataError(f"{self.bin_path}: data does not match the index {self.idx_path}: "
                            f"{self.data.size} bytes, the index describes {expected}")
        self._flat = self.data.as_array(self.dtype) if isinstance(self.data, LocalFile) else None

    def __getstate__(self) -> dict:
        """Pickle by path (e.g. for grain worker processes), never the memory-mapped data."""
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def _open_data(self) -> ByteSource:
        bin_path = self.prefix + ".bin"
        if is_url(bin_path):
            try:
                return KvStoreFile(bin_path)
            except DataFileNotFound:
                pass  # look for shards
        elif os.path.isfile(bin_path):
            shards = _find_shards(self.prefix)
            if shards:  # which one is this .idx's data? (left by another writer or by hand)
                raise DataError(f"{self.prefix}: both {os.path.basename(bin_path)} and {len(shards)} shard file(s) "
                                f"{os.path.basename(shards[0])} … hold data for this .idx; remove the ones "
                                "that are not its data (or write the dataset again)")
            return LocalFile(bin_path)
        shards = _find_shards(self.prefix)
        if not shards:
            raise DataError(f"{bin_path}: data file not found (nor shards "
                            f"{os.path.basename(self.prefix)}-NNNNN-of-NNNNN.bin beside it)")
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=min(32, len(shards))) as pool:  # remote size probes
            sources = list(pool.map(open_byte_source, shards))
        return ShardedStream(sources, name=f"{self.prefix}-*-of-{len(shards) - 1:05d}.bin")

    # -- basic access

    def __len__(self) -> int:
        return int(self.index.length)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def _check_item(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.prefix}: item {i} out of range ({n} items)")
        return i

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of item ``i`` (to its end when length is None)."""
        i = self._check_item(int(i))
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: slice [{offset}, {offset + length}) of item {i} "
                             f"outside its {size} tokens")
        return self.gather(np.array([i]), np.array([offset]), np.array([length]))

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def read_items(self, start: int, stop: int) -> np.ndarray:
        """Items ``[start, stop)`` as one flat array (one contiguous read)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"{self.prefix}: items [{start}, {stop}) out of range ({len(self)} items)")
        if start == stop:
            return np.zeros(0, self.dtype)
        a = int(self.pointers[start])
        b = int(self.pointers[stop - 1]) + int(self.sizes[stop - 1]) * self.dtype.itemsize
        return self.data.read(a, b).view(self.dtype)

    def gather(self, items: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
               out_dtype=None) -> np.ndarray:
        """Concatenation of ``item[k][starts[k] : starts[k] + lengths[k]]`` for all k.

        items, starts, lengths: integer arrays [K] (not bounds-checked beyond the file size).
        Returns a 1-D array of ``out_dtype`` (default ``self.dtype``) with ``lengths.sum()`` tokens.
        """
        items = np.asarray(items, dtype=np.int64)
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        itemsize = self.dtype.itemsize
        byte_starts = self.pointers[items] + starts * itemsize
        if self._flat is not None and len(lengths) and lengths.sum() >= 256 * len(lengths):
            # Long segments: slice copies beat element-wise fancy indexing.
            flat = self._flat
            if byte_starts.min() < 0 or (byte_starts // itemsize + lengths).max() > flat.shape[0]:
                raise DataError(f"{self.bin_path}: read past the end of the data")
            return np.concatenate([flat[a:a + n] for a, n in
                                   zip((byte_starts // itemsize).tolist(), lengths.tolist())],
                                  dtype=out_dtype)
        if self._flat is not None:
            total = int(lengths.sum())
            elem_starts = byte_starts // itemsize
            seg_offsets = np.cumsum(lengths) - lengths
            positions = np.repeat(elem_starts - seg_offsets, lengths) + np.arange(total, dtype=np.int64)
            if total and (positions.min() < 0 or positions.max() >= self._flat.shape[0]):
                raise DataError(f"{self.bin_path}: read past the end of the data")
            out = self._flat[positions]
            return out if out_dtype is None else out.astype(out_dtype)
        ranges = [(int(a), int(a + n * itemsize)) for a, n in zip(byte_starts, lengths)]
        parts = self.data.read_many(ranges)
        if not parts:
            return np.zeros(0, out_dtype or self.dtype)
        out = np.concatenate(parts).view(self.dtype)
        return out if out_dtype is None else out.astype(out_dtype)
