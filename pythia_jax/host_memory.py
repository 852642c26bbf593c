"""Host-memory helpers for moving model-sized arrays: allocation, casting copies, host -> device.

- ``plain_pages``: allocate without numpy's transparent-huge-page ``madvise`` (faster first fill).
- ``aligned_empty``: a 64-byte aligned ``np.empty`` that XLA's CPU client adopts without a copy.
- ``copy_cast``: ``dst[...] = src`` (optionally transposed) with casting, blocked and threaded.
- ``cast_overflow``: how many finite values a narrowing cast turned into inf (``may_hold_nonfinite``
  first: one pass over the result's bits).
- ``to_numpy``: a numpy view/copy of any array-like (torch tensors included).
- ``to_device_tree``: a numpy params tree -> JAX arrays, one leaf at a time.

Used by the converters (``pythia_jax.convert``) and the checkpoint loaders alike; it imports no
other module of this package.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator, Mapping

import numpy as np

_BLOCK = 256  # rows per transposed block in copy_cast (cache-sized)


@contextlib.contextmanager
def plain_pages() -> Iterator[None]:
    """Allocate numpy arrays without numpy's transparent-huge-page ``madvise`` inside the block.

    On hosts with fragmented memory the huge-page faults stall on compaction: filling a fresh
    model-sized array was 2-2.5x slower with them in testing. Only affects allocations made here.
    """
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy < 2
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            yield
            return
    previous = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(previous)


def aligned_empty(shape: tuple[int, ...], dtype: Any, alignment: int = 64) -> np.ndarray:
    """``np.empty`` with an ``alignment``-byte aligned data pointer. XLA's CPU client adopts such
    a buffer in ``jax.device_put(x, may_alias=True)``; numpy's own (16-byte aligned) ones are copied."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def copy_cast(dst: np.ndarray, src: np.ndarray, transpose: bool = False) -> None:
    """``dst[...] = src.T if transpose else src`` with casting, transposing in cache-sized blocks
    (a one-shot transposed cast is 4-5x slower in numpy). Large arrays are split by source rows
    over a few threads (numpy releases the GIL while copying): 1.5x faster on 2 cores. A
    transpose without a cast into a C-contiguous ``dst`` moves 8 source rows at a time as one
    word per column (:func:`_transpose_words`), 2-3x faster again."""
    transpose = transpose and src.ndim == 2
    rows = src.shape[0] if src.ndim else 0
    if src.size < _PARALLEL_COPY_ELEMENTS or rows < 2 * _BLOCK or _copy_threads() == 1:
        _copy_rows(dst, src, transpose, 0, rows)
        return
    pieces = 4 * _copy_threads()
    step = -(-rows // pieces // _BLOCK) * _BLOCK if transpose else -(-rows // pieces)
    list(_copy_pool().map(lambda lo: _copy_rows(dst, src, transpose, lo, min(lo + step, rows)),
                          range(0, rows, step)))


def narrows_range(dst_dtype: Any, src_dtype: Any) -> bool:
    """True when a finite ``src_dtype`` value can exceed ``dst_dtype``'s largest finite value
    (float32 or bfloat16 -> float16: 65504; float32 -> bfloat16 near 3.4e38)."""
    import ml_dtypes

    dst, src = np.dtype(dst_dtype), np.dtype(src_dtype)
    if dst.kind not in "fV" or src.kind not in "fV" or dst == src:
        return False
    return float(ml_dtypes.finfo(dst).max) < float(ml_dtypes.finfo(src).max)


def widens(src_dtype: Any, dst_dtype: Any) -> bool:
    """True when ``dst_dtype`` is another float type that holds every ``src_dtype`` value
    exactly, inf and NaN included (float16 / bfloat16 -> float32; not float16 <-> bfloat16)."""
    import ml_dtypes

    src, dst = np.dtype(src_dtype), np.dtype(dst_dtype)
    if dst.kind not in "fV" or src.kind not in "fV" or dst == src:
        return False
    try:
        a, b = ml_dtypes.finfo(src), ml_dtypes.finfo(dst)
    except (TypeError, ValueError):  # not a float type
        return False
    return b.nmant >= a.nmant and b.maxexp >= a.maxexp and b.minexp <= a.minexp


def widened(dtype: Any, target: Any) -> np.dtype:
    """The dtype an array of ``dtype`` has after a widening to ``target`` (None: no widening):
    ``target`` where it :func:`widens` ``dtype``, else ``dtype`` itself."""
    return np.dtype(target) if target is not None and widens(dtype, target) else np.dtype(dtype)


def cast_overflow(dst: Any, src: Any) -> int:
    """The number of finite values of ``src`` that became ±inf in ``dst``, its cast (any
    layout, e.g. transposed). 0 without a look at the data when ``dst``'s dtype holds
    ``src``'s range; inf/NaN already in ``src`` are not counted. numpy or ``jax.Array``."""
    if not narrows_range(dst.dtype, src.dtype):
        return 0
    if isinstance(dst, np.ndarray) and isinstance(src, np.ndarray):
        if not may_hold_nonfinite(dst):  # the common case, one cheap pass over dst's bits
            return 0
        bad = dst.size - int(np.count_nonzero(np.isfinite(dst)))
        return bad and bad - (src.size - int(np.count_nonzero(np.isfinite(src))))
    import jax.numpy as jnp

    return int(jnp.sum(~jnp.isfinite(dst))) - int(jnp.sum(~jnp.isfinite(src)))


# (bits as unsigned int, all bits but the sign, the exponent bits): a value is inf or NaN when its
# bits without the sign are >= the exponent mask (IEEE 754 binary16/32/64 and bfloat16)
_FLOAT_BITS = {"float16": (np.uint16, 0x7FFF, 0x7C00), "bfloat16": (np.uint16, 0x7FFF, 0x7F80),
               "float32": (np.uint32, 0x7FFFFFFF, 0x7F800000),
               "float64": (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


def may_hold_nonfinite(a: np.ndarray) -> bool:
    """True when the float array ``a`` holds an inf or NaN (exact for the dtypes above; other
    dtypes go through ``np.isfinite``). Reads the bits as unsigned integers, a masked max per
    block of rows (large arrays on the copy threads): 0.02–0.08 s per 134M float16 values,
    against 0.5–0.7 s for the exact count of ``cast_overflow`` (model-sized boolean
    temporaries), which cost about 5 s per 1.4b fp16 export when it ran on every tensor."""
    layout = _FLOAT_BITS.get(a.dtype.name)
    if layout is None or a.size == 0:
        return a.size > 0 and not bool(np.isfinite(a).all())
    uint, magnitude, exponent = layout
    bits = a.view(uint)
    if bits.ndim == 0:
        return int(bits & uint(magnitude)) >= exponent
    # in blocks of leading rows of about 1M values: the masked temporary stays small (reused
    # heap memory, in cache) instead of a fresh model-sized buffer that would be paged in
    rows = max(1, (1 << 20) // max(1, bits[0].size))

    def block_max(lo: int) -> int:
        return int(np.max(bits[lo:lo + rows] & uint(magnitude)))

    starts = range(0, bits.shape[0], rows)
    if bits.size < _PARALLEL_COPY_ELEMENTS or _copy_threads() == 1:
        return any(block_max(lo) >= exponent for lo in starts)
    return max(_copy_pool().map(block_max, starts)) >= exponent  # numpy releases the GIL


_PARALLEL_COPY_ELEMENTS = 1 << 22


def _copy_rows(dst: np.ndarray, src: np.ndarray, transpose: bool, lo: int, hi: int) -> None:
    """Source rows ``lo:hi`` of :func:`copy_cast` (all of a 0-d array). A value beyond ``dst``'s
    range becomes inf without numpy's RuntimeWarning (per thread: ``np.errstate`` is not
    inherited by the copy threads): the callers count such values (:func:`cast_overflow`) and
    refuse the tensor in one line of their own."""
    with np.errstate(over="ignore"):
        _copy_rows_unchecked(dst, src, transpose, lo, hi)


def _copy_rows_unchecked(dst: np.ndarray, src: np.ndarray, transpose: bool, lo: int, hi: int) -> None:
    if src.ndim == 0:
        dst[...] = src
    elif not transpose:
        dst[lo:hi] = src[lo:hi]
    else:
        end = lo + (hi - lo) // _WORD_ROWS * _WORD_ROWS
        if end > lo and lo % _WORD_ROWS == 0 and _word_rows(dst, src):
            _transpose_words(dst, src, lo, end)
            lo = end
        for i in range(lo, hi, _BLOCK):
            j = min(i + _BLOCK, hi)
            dst[:, i:j] = src[i:j].T


_WORD_ROWS = 8           # source rows moved together, as one word per column, by _transpose_words
_WORD_BUDGET = 1 << 20   # bytes of source rows regrouped at a time (stays in cache)


def _word_rows(dst: np.ndarray, src: np.ndarray) -> bool:
    """True when :func:`_transpose_words` applies: same dtype, a C-contiguous destination of exactly
    ``src.T``'s shape (anything else keeps numpy's broadcasting or its error) and rows narrow
    enough that at least 16 of them fit in the regrouping budget."""
    return (dst.dtype == src.dtype and dst.flags.c_contiguous and src.ndim == 2
            and dst.shape == src.shape[::-1]
            and _WORD_BUDGET // (_WORD_ROWS * src.shape[1] * src.dtype.itemsize) >= 2)


def _transpose_words(dst: np.ndarray, src: np.ndarray, lo: int, hi: int) -> None:
    """``dst[:, lo:hi] = src[lo:hi].T`` for ``hi - lo`` a multiple of ``_WORD_ROWS``, without casting.

    numpy transposes element by element, at about 0.7 GB/s per thread for 2-byte values. Here each
    group of 8 source rows is first interleaved (a cache-resident copy) so that the 8 values of
    one column sit side by side; read as one 16-byte (float16) or 32-byte (float32) word per
    column, the group is then one transpose of words, which writes 8 destination values at a
    time: 3x faster for float16 and 2x for float32 per thread on the pythia-1.4b layer shapes
    (measured tensor by tensor against the blocked copy below; ``scripts/bench_convert.py`` times
    the conversions that use it).
    """
    rows, cols = src.shape
    k = _WORD_ROWS
    word = np.dtype(f"V{k * dst.dtype.itemsize}")
    # dst (C-contiguous [cols, rows]) as [cols, rows // k] words; the last rows % k are not covered
    words = np.ndarray((cols, rows // k), dtype=word, buffer=dst, strides=(dst.strides[0], word.itemsize))
    block = k * (_WORD_BUDGET // (k * cols * src.dtype.itemsize))
    grouped = np.empty((block // k, cols, k), dst.dtype)
    for i in range(lo, hi, block):
        j = min(i + block, hi)
        g = grouped[:(j - i) // k]
        g[...] = src[i:j].reshape(-1, k, cols).transpose(0, 2, 1)  # [groups, cols, k]
        words[:, i // k:j // k] = g.reshape(-1, cols * k).view(word).T


@functools.lru_cache(maxsize=1)
def _copy_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@functools.lru_cache(maxsize=1)
def _copy_pool() -> Any:
    import concurrent.futures
    return concurrent.futures.ThreadPoolExecutor(_copy_threads(), thread_name_prefix="copy_cast")


def to_numpy(value: Any) -> np.ndarray:
    """A numpy view/copy of an array-like (torch tensors included, bfloat16 via float32)."""
    if type(value).__module__.startswith("torch"):
        import torch
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(value)


def to_device_tree(params: Mapping[str, Any]) -> dict[str, Any]:
    """Move a params tree of numpy arrays to JAX arrays leaf by leaf, releasing each numpy leaf
    as it goes, so the peak is one model plus one leaf (not two models).

    ``jax.device_put(..., may_alias=True)`` lets the CPU backend adopt the numpy buffer instead
    of copying it. (Sharing through ``jnp.from_dlpack`` hung the interpreter at exit in testing.)
    """
    import jax

    out: dict[str, Any] = {}
    for key in list(params):
        value = params[key]
        if isinstance(value, Mapping):
            out[key] = to_device_tree(value)
        else:
            # wait for the (asynchronous) transfer so a copied numpy buffer is released before
            # the next leaf is transferred
            out[key] = jax.device_put(value, may_alias=True).block_until_ready()
        if isinstance(params, dict):
            del params[key]  # drop our reference to the numpy leaf
        del value
    return out
