"""GPT-NeoX / Megatron ``MMapIndexedDataset`` files (``prefix.bin`` + ``prefix.idx``): read and write.

Layout (little-endian; GPT-NeoX v1.0 ``megatron/data/indexed_dataset.py``, ``MMapIndexedDataset``):

``.idx``: 9-byte magic ``MMIDIDX\\x00\\x00``; uint64 version (1); uint8 dtype code; uint64 ``len``
(items); uint64 ``doc_count``; int32 ``sizes[len]`` (tokens per item); int64 ``pointers[len]``
(byte offsets of the items in ``.bin``); int64 ``doc_idx[doc_count]`` (item index where each
document starts, ``[0, 1, ..., N]`` when every item is one document). File size is
``34 + 12·len + 8·doc_count``.

``.bin``: the raw token ids, no header. It may also be a byte stream split into shards
``prefix-000NN-of-000KK.bin`` (the pre-shuffled Pythia release: 21 shards ``00000..00020``, rows
straddling shard edges); the shards are read as one stream without unsharding.

Dtype codes follow the facts sheet: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float32,
7 float64, 8 uint16 (Pythia uses 8). (Megatron-core maps 6/7 the other way round and the original
fairseq/GPT-NeoX table maps 6 to Python ``float``; only code 8 is used by any Pythia data.)

Paths: a local path is read with ``numpy.memmap``; a URL (``gs://``, ``s3://``, ``file://``,
``memory://``, any tensorstore kvstore URL) is read with tensorstore byte-range reads.

Public API:
- ``IndexedDataset(prefix)``: ``len(ds)``, ``ds.sizes`` (int32 [N]), ``ds.pointers`` (int64
  [N]), ``ds.doc_idx`` (int64 [D]), ``ds.dtype``, ``ds[i]`` / ``ds.get(i, offset=0,
  length=None)`` (1-D array of ``ds.dtype``), ``ds.read_items(a, b)`` (contiguous items as one
  flat array), ``ds.gather(items, starts, lengths)`` (many item slices concatenated, vectorised).
- ``IndexedDatasetWriter(prefix, dtype)``: ``add_item(tokens)``, ``end_document()``,
  ``add_document(tokens)``, ``finalize()``; writes to temporary siblings and renames at the end.
- ``write_indexed_dataset(prefix, documents, dtype)``: one item per document.
- ``save_npy_atomic(path, array)``: an ``.npy`` file written to a temporary sibling, then renamed;
  ``save_npys_together`` publishes several at once (all or none).

Every problem with the files raises ``pythia_jax.errors.DataError`` naming the file.
"""

from __future__ import annotations

import array
import glob
import os
import re
import struct
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pythia_jax.errors import DataError, DataFileNotFound

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype + 8 len + 8 doc_count

DTYPES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}
DTYPE_CODES: dict[np.dtype, int] = {np.dtype(t): c for c, t in DTYPES.items()}

_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.bin$")


def dtype_code(dtype) -> int:
    """The ``.idx`` dtype code of a numpy dtype (raises ``DataError`` for unsupported ones)."""
    try:
        return DTYPE_CODES[np.dtype(dtype)]
    except KeyError:
        raise DataError(f"dtype {np.dtype(dtype)} has no MMapIndexedDataset code "
                        f"(supported: {sorted(str(np.dtype(t)) for t in DTYPES.values())})") from None


def is_url(path: str) -> bool:
    """True for ``scheme://...`` paths, which are read through tensorstore."""
    return "://" in str(path)


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
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if self.size else np.zeros(0, np.uint8)

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
        names = glob.glob(glob.escape(prefix) + "-?????-of-?????.bin")
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


# --------------------------------------------------------------------------- the index


class Index:
    """The parsed ``.idx`` file: ``dtype``, ``sizes`` int32 [N], ``pointers`` int64 [N],
    ``doc_idx`` int64 [D]. Local files stay memory-mapped."""

    def __init__(self, path: str):
        self.path = path
        source = open_byte_source(path)
        if source.size < HEADER_SIZE:
            raise DataError(f"{path}: truncated index: {source.size} bytes, the header alone is "
                            f"{HEADER_SIZE}")
        header = bytes(source.read(0, HEADER_SIZE))
        if header[:9] != MAGIC:
            raise DataError(f"{path}: not an MMapIndexedDataset index: magic {header[:9]!r}, "
                            f"expected {MAGIC!r}")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise DataError(f"{path}: unsupported index version {version} (expected {VERSION})")
        code = header[17]
        if code not in DTYPES:
            raise DataError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        self.dtype_code = code
        self.length, self.doc_count = struct.unpack("<QQ", header[18:34])
        expected = HEADER_SIZE + 12 * self.length + 8 * self.doc_count
        if source.size != expected:
            raise DataError(
                f"{path}: inconsistent index: the header says {self.length} items and "
                f"{self.doc_count} document entries, so the file should be {expected} bytes, "
                f"but it is {source.size} bytes")
        n, d = self.length, self.doc_count
        buf = source.read(0, source.size)  # a local file: its memory map, no copy
        self.sizes = np.frombuffer(buf, np.int32, n, HEADER_SIZE)
        self.pointers = np.frombuffer(buf, np.int64, n, HEADER_SIZE + 4 * n)
        self.doc_idx = np.frombuffer(buf, np.int64, d, HEADER_SIZE + 12 * n)
        if n and self.pointers[0] != 0:
            raise DataError(f"{path}: inconsistent index: pointers[0] = {self.pointers[0]}, expected 0")
        if n and self.sizes[-1] < 0:
            raise DataError(f"{path}: inconsistent index: negative size {self.sizes[-1]} of the last item")

    @property
    def data_nbytes(self) -> int:
        """Bytes of ``.bin`` data the index describes."""
        if not self.length:
            return 0
        return int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize

    def check_consistent(self) -> None:
        """Full check that ``pointers`` are the running byte offsets of ``sizes`` (O(N))."""
        n = self.length
        step = 1 << 24
        expected_start = 0
        for a in range(0, n, step):
            sizes = self.sizes[a:a + step].astype(np.int64)
            if (sizes < 0).any():
                raise DataError(f"{self.path}: inconsistent index: negative sizes near item {a}")
            expected = np.cumsum(sizes) * self.dtype.itemsize
            expected = np.concatenate([[0], expected[:-1]]) + expected_start
            bad = np.nonzero(self.pointers[a:a + step] != expected)[0]
            if bad.size:
                i = a + int(bad[0])
                raise DataError(f"{self.path}: inconsistent index: pointers[{i}] = "
                                f"{self.pointers[i]}, expected {expected[bad[0]]} from the sizes")
            expected_start = int(expected[-1]) + int(sizes[-1]) * self.dtype.itemsize


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


# --------------------------------------------------------------------------- writing


def _atomic_path(final: str) -> str:
    """A new temporary sibling of ``final`` (same directory, so a rename is atomic)."""
    from pythia_jax.io_utils.outputs import temp_sibling

    return os.fspath(temp_sibling(final))


def publish(tmp: str, final: str) -> None:
    """Give ``tmp`` the usual file mode (mkstemp makes 0600) and rename it to ``final``."""
    publish_together([(tmp, final)])


def publish_together(pairs) -> None:
    """Rename ``(tmp, final)`` pairs into place together or not at all (``io_utils.publish``)."""
    from pythia_jax.io_utils import publish as publish_all

    publish_all(pairs)


def check_dataset_output(prefix: str, inputs=()) -> None:
    """Refuse to write ``prefix.bin``/``prefix.idx`` over anything but an indexed dataset (or
    over one of ``inputs``, dataset prefixes read by the same command)."""
    from pythia_jax.io_utils import check_inputs, check_output_file, describe_path

    for inp in inputs:
        check_inputs(prefix + ".idx", [inp + ".idx"])
    check_output_file(prefix + ".idx", "dataset")
    bin_path = prefix + ".bin"
    if os.path.isdir(bin_path) or (os.path.exists(bin_path) and not os.path.exists(prefix + ".idx")):
        raise DataError(f"output {bin_path} exists and is {describe_path(bin_path)} without a "
                        f"{prefix}.idx beside it; refusing to replace it: choose another output prefix")


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    """``numpy.save`` to a temporary sibling of ``path``, then rename it into place."""
    save_npys_together([(path, array)])


def save_npys_together(items) -> None:
    """``numpy.save`` each ``(path, array)`` to a temporary sibling; publish them all together
    (none on an error: the previous files stay)."""
    from pythia_jax.io_utils import atomic_files

    items = list(items)
    with atomic_files(*(p for p, _ in items)) as temps:
        for tmp, (_, array) in zip(temps, items):
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)


def _write_index_file(path, dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
    dtype = np.dtype(dtype)
    code = dtype_code(dtype)
    sizes = np.asarray(sizes, dtype=np.int64)
    if (sizes < 0).any() or (sizes > np.iinfo(np.int32).max).any():
        raise DataError(f"{path}: item sizes must be in [0, {np.iinfo(np.int32).max:,}] (the .idx "
                        f"format stores them as int32), got {int(sizes.min())}..{int(sizes.max())}")
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1] * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(np.asarray(doc_idx, dtype="<i8").tobytes())


def write_index(path: str, dtype, sizes: np.ndarray, doc_idx: np.ndarray, *, with_files=()) -> None:
    """Write an ``.idx`` file atomically. sizes: int [N] tokens per item; doc_idx: int [D].

    ``with_files``: ``(tmp, final)`` pairs (the ``.bin`` data) published together with it.
    """
    from pythia_jax.io_utils.outputs import _remove

    try:
        tmp = _atomic_path(path)
    except BaseException:
        for t, _ in with_files:
            _remove(Path(t))
        raise
    try:
        _write_index_file(tmp, dtype, sizes, doc_idx)
    except BaseException:
        for t in [tmp, *(t for t, _ in with_files)]:
            _remove(Path(t))
        raise
    publish_together([*with_files, (tmp, path)])


class IndexedDatasetWriter:
    """Write ``prefix.bin`` / ``prefix.idx`` like GPT-NeoX's ``MMapIndexedDatasetBuilder``.

    ``add_item(tokens)`` appends one item; ``end_document()`` marks a document boundary (GPT-NeoX
    calls it after every document, giving ``doc_idx = [0, 1, ..., N]``). Data go to temporary
    siblings; ``finalize()`` renames them into place (``.bin`` first, then ``.idx``), so readers
    never see a half-written dataset. Use as a context manager to clean up on errors.
    """

    def __init__(self, prefix: str, dtype=np.uint16, inputs=()):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        check_dataset_output(self.prefix, inputs)
        os.makedirs(os.path.dirname(os.path.abspath(self.prefix)) or ".", exist_ok=True)
        self._bin_tmp = _atomic_path(self.prefix + ".bin")
        try:
            self._bin = open(self._bin_tmp, "wb")
        except BaseException:
            os.remove(self._bin_tmp)
            raise
        self._sizes = array.array("q")
        self._doc_idx = array.array("q", [0])
        self._closed = False

    def add_item(self, tokens: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size > np.iinfo(np.int32).max:  # the .idx format stores item sizes as int32
            raise DataError(f"{self.prefix}: an item of {arr.size:,} tokens does not fit the index's "
                            f"int32 sizes (at most {np.iinfo(np.int32).max:,}); split it into items")
        if arr.size and arr.dtype != self.dtype:
            info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
            if info is not None and arr.dtype.kind in "iu" and (
                    arr.min() < info.min or arr.max() > info.max):
                raise DataError(f"{self.prefix}: token ids out of range for {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).astype(self.dtype.newbyteorder("<"),
                                                                  copy=False).tobytes())
        self._sizes.append(int(arr.size))

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens) -> None:
        self.add_item(tokens)
        self.end_document()

    def finalize(self) -> str:
        """Close and move the files into place, ``.bin`` and ``.idx`` together. Returns the prefix."""
        self._bin.close()
        try:
            write_index(self.prefix + ".idx", self.dtype, np.frombuffer(self._sizes, np.int64),
                        np.frombuffer(self._doc_idx, np.int64),
                        with_files=[(self._bin_tmp, self.prefix + ".bin")])
        finally:
            self._closed = True
            if os.path.exists(self._bin_tmp):
                os.remove(self._bin_tmp)
        return self.prefix

    def abort(self) -> None:
        if not self._closed:
            self._bin.close()
            if os.path.exists(self._bin_tmp):
                os.remove(self._bin_tmp)
            self._closed = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()


def write_indexed_dataset(prefix: str, documents: Iterable[Sequence[int] | np.ndarray],
                          dtype=np.uint16) -> str:
    """Write one item per document (like GPT-NeoX preprocessing). Returns the prefix."""
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in documents:
            w.add_document(doc)
    return prefix
