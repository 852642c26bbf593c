"""The ``.idx`` format of GPT-NeoX / Megatron ``MMapIndexedDataset`` (GPT-NeoX v1.0
``megatron/data/indexed_dataset.py``): the header constants and dtype codes, the ``Index`` reader
and the ``.idx`` byte writer (``write_index`` in ``writers`` publishes it atomically).
"""

from __future__ import annotations

import struct

import numpy as np

from pythia_jax.data.indexed.sources import open_byte_source
from pythia_jax.errors import DataError

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


def dtype_code(dtype) -> int:
    """The ``.idx`` dtype code of a numpy dtype (raises ``DataError`` for unsupported ones)."""
    try:
        return DTYPE_CODES[np.dtype(dtype)]
    except KeyError:
        raise DataError(f"dtype {np.dtype(dtype)} has no MMapIndexedDataset code "
                        f"(supported: {sorted(str(np.dtype(t)) for t in DTYPES.values())})") from None



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
