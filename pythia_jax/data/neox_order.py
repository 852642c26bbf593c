"""GPT-NeoX ``GPT2Dataset`` index maps (doc_idx, sample_idx, shuffle_idx), exactly as GPT-NeoX v1.0.

The recipe (GPT-NeoX v1.0 ``megatron/data/gpt2_dataset.py`` and the C++
``build_sample_idx`` helper in ``megatron/data/helpers.cpp``), for one dataset of N items with token counts ``sizes``:

1. ``num_samples = ceil(train_iters · global_batch · 1.005)`` (``neox_num_samples``).
2. ``T`` = tokens of one epoch (int64); epochs ``E`` = smallest E ≥ 1 with
   ``(E·T − 1) // seq_len ≥ num_samples`` (``neox_num_epochs``).
3. One ``numpy.random.RandomState(seed)`` drives both shuffles, doc_idx first.
4. ``doc_idx``: E back-to-back copies of ``arange(N)`` as int32 (int64 from N > 2³¹), shuffled
   once (``rng.shuffle``).
5. ``S = (E·T − 1) // seq_len`` samples. ``sample_idx`` int32 [S+1, 2], int64 when a value would
   not fit int32 (2(S+1) ≥ 2³¹−1, or positions p ≥ 2³¹ because doc_idx has over 2³¹ entries; the
   C++ helper keeps int32 and wraps there): row s = (position p in doc_idx, offset o in that item) of stream token
   ``s·seq_len``, where the stream F concatenates the items in doc_idx order and p is the item
   that *contains* that token (for s ≥ 1; row 0 is (0, 0)). Sample s is
   ``F[s·seq_len : s·seq_len + seq_len + 1]``: from (p_s, o_s) up to and including (p_{s+1}, o_{s+1}).
6. ``shuffle_idx = arange(S, dtype=uint32)`` (int64 from 2³²−1), shuffled with the same rng.
7. Training row j = sample ``shuffle_idx[j]``; GPT2Dataset's length is S − 1.

Built vectorised (numpy cumsum + searchsorted over chunks of doc_idx), so the full Pile
(210,607,728 items, 162,165,686 samples) needs about 4 GB: doc_idx int32 (0.8 GB), sample_idx
int32 (1.3 GB), shuffle_idx uint32 (0.65 GB) plus chunk temporaries; no E·N int64 arrays.

Before building, ``plan_index_maps`` sizes the job (epochs, entries, bytes) and
``check_index_map_plan`` refuses, in one line naming the settings to change, a build over
``$PYTHIA_JAX_INDEX_MAP_LIMIT_GB`` (default 8 GB; the full Pile needs about 2.6 GB) or over the
free disk of the cache directory: a small dataset with Pythia-scale settings (147M samples) would
otherwise repeat it for hundreds of thousands of epochs. Building logs its progress and the
cache path (module logger).

Maps are cached as ``.npy`` under GPT-NeoX's names
``{data_prefix}_train_0_indexmap_{ns}ns_{sl}sl_{seed}s_{doc,sample,shuffle}_idx.npy``, so the
published seed-1234 maps can be dropped beside the data and are used as they are.

Public API: ``neox_num_samples``, ``neox_num_epochs``, ``build_doc_idx``, ``build_sample_idx``,
``build_shuffle_idx``, ``build_index_maps(sizes, num_samples, seq_len, seed) -> IndexMaps``,
``index_map_paths(data_prefix, num_samples, seq_len, seed)``, ``plan_index_maps`` /
``check_index_map_plan`` (size a build before starting it),
``load_or_build_index_maps(data_prefix, sizes, num_samples, seq_len, seed) -> IndexMaps``,
``IndexMaps.sample_segments(samples)`` (which item slices make each sample).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time

import numpy as np

from pythia_jax.config import SEED_RANGE
from pythia_jax.data.indexed import save_npys_together
from pythia_jax.errors import DataError
from pythia_jax.io_utils import is_url

logger = logging.getLogger(__name__)

MARGIN = 1.005  # GPT-NeoX asks for 0.5% more samples than training consumes
_CHUNK = 1 << 23  # doc_idx entries per chunk when building sample_idx
_INT32_MAX = int(np.iinfo(np.int32).max)  # a module constant so tests can lower it
LIMIT_ENV = "PYTHIA_JAX_INDEX_MAP_LIMIT_GB"
DEFAULT_LIMIT_GB = 8.0


def neox_num_samples(train_iters: int, global_batch: int, weight: float = 1.0) -> int:
    """``ceil(train_iters · global_batch · weight · 1.005)``, with GPT-NeoX's float arithmetic.

    Pythia: 143000 · 1024 → 147,164,160.
    """
    return int(math.ceil(train_iters * global_batch * weight * MARGIN))


def neox_num_epochs(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Smallest E ≥ 1 with ``(E·T − 1) // seq_len ≥ num_samples`` (closed form of GPT-NeoX's loop)."""
    if tokens_per_epoch <= 0:
        raise DataError("the dataset has no tokens")
    need = num_samples * seq_len + 1  # E·T − 1 ≥ num_samples·seq_len
    return max(1, -(-need // tokens_per_epoch))


def doc_idx_dtype(num_items: int) -> np.dtype:
    """int32 (GPT-NeoX's) when every item id fits, else int64."""
    return np.dtype(np.int32 if num_items - 1 <= _INT32_MAX else np.int64)


def sample_idx_dtype(num_samples: int, doc_idx_len: int) -> np.dtype:
    """int32 (GPT-NeoX's, byte-compatible with published maps) when every value fits: the
    positions in doc_idx (< ``doc_idx_len``), the offsets (< 2³¹, item sizes are int32) and
    GPT-NeoX's own size rule 2(S+1) < 2³¹−1; else int64."""
    fits = 2 * (num_samples + 1) < _INT32_MAX and doc_idx_len - 1 <= _INT32_MAX
    return np.dtype(np.int32 if fits else np.int64)


def build_doc_idx(num_items: int, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """E copies of ``arange(num_items)`` [E·N] (``doc_idx_dtype``: int32), shuffled once with ``rng``."""
    doc_idx = np.tile(np.arange(num_items, dtype=doc_idx_dtype(num_items)), num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def _sample_rows(ends: np.ndarray, lens: np.ndarray, first: int, last: int, seq_len: int,
                 chunk_start: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, offsets), int64, of samples ``first..last`` whose first tokens lie in one chunk
    of doc_idx starting at position ``chunk_start``; ``ends`` int64: the stream position after each
    item of the chunk, ``lens`` int64 their sizes."""
    tokens = np.arange(first, last + 1, dtype=np.int64) * seq_len
    pos = np.searchsorted(ends, tokens, side="right")  # item containing each token
    offsets = tokens - (ends[pos] - lens[pos])
    return pos.astype(np.int64) + np.int64(chunk_start), offsets


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, num_epochs: int,
                     tokens_per_epoch: int) -> np.ndarray:
    """GPT-NeoX's sample_idx [S+1, 2] in ``sample_idx_dtype`` (int32 unless a value needs more), vectorised.

    sizes: int [N] tokens per item; doc_idx: int [E·N] item order. Raises ``DataError`` if a
    value would not fit the output type (never stored wrapped).
    """
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_len
    dtype = sample_idx_dtype(num_samples, len(doc_idx))
    limit = np.iinfo(dtype).max
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    out[0] = 0
    next_sample = 1
    base = 0  # stream tokens before the current chunk
    chunks = -(-len(doc_idx) // _CHUNK)
    report_every = max(1, chunks // 10)
    t0 = time.time()
    for c, a in enumerate(range(0, len(doc_idx), _CHUNK)):
        if next_sample > num_samples:
            break
        lens = sizes[doc_idx[a:a + _CHUNK]].astype(np.int64)
        ends = np.cumsum(lens)
        ends += base
        chunk_end = int(ends[-1])
        last_sample = min(num_samples, (chunk_end - 1) // seq_len)
        if last_sample >= next_sample:
            pos, offsets = _sample_rows(ends, lens, next_sample, last_sample, seq_len, a)
            if int(pos[-1]) > limit or int(offsets.max()) > limit:
                raise DataError(f"internal: sample_idx value {max(int(pos[-1]), int(offsets.max()))} "
                                f"does not fit {dtype.name}")
            out[next_sample:last_sample + 1, 0] = pos
            out[next_sample:last_sample + 1, 1] = offsets
            del pos, offsets
            next_sample = last_sample + 1
        base = chunk_end
        if chunks >= 20 and (c + 1) % report_every == 0:
            logger.info("sample_idx: %d of %d samples (%.0f%%, %.0fs)", next_sample - 1, num_samples,
                        100.0 * (next_sample - 1) / max(1, num_samples), time.time() - t0)
    if next_sample <= num_samples:
        raise DataError("internal: doc_idx holds fewer tokens than the sample count needs")
    return out


def build_shuffle_idx(size: int, rng: np.random.RandomState) -> np.ndarray:
    """``arange(size)`` as uint32 (int64 from 2³²−1), shuffled with ``rng``."""
    dtype = np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64
    shuffle_idx = np.arange(size, dtype=dtype)
    rng.shuffle(shuffle_idx)
    return shuffle_idx


@dataclasses.dataclass
class IndexMaps:
    """The three GPT-NeoX maps. doc_idx int32 [E·N]; sample_idx int32 (int64 when needed) [S+1, 2];
    shuffle_idx uint32 [S]. Indexing arithmetic on them is done in int64."""

    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray

    @property
    def num_samples(self) -> int:
        """S, the samples the maps describe."""
        return int(self.sample_idx.shape[0]) - 1

    def __len__(self) -> int:
        """Rows GPT2Dataset exposes: min(len(shuffle_idx) − 1, S) = S − 1."""
        return min(int(self.shuffle_idx.shape[0]) - 1, self.num_samples)

    def sample_segments(self, samples: np.ndarray, sizes: np.ndarray):
        """The item slices that make up each sample, in order.

        samples: int [R] sample ids (already through shuffle_idx); sizes: int [N] item sizes.
        Returns (row_of_segment int64 [K], item int64 [K], start int64 [K], length int64 [K]).
        """
        s = np.asarray(samples, dtype=np.int64)
        first = self.sample_idx[s].astype(np.int64)
        last = self.sample_idx[s + 1].astype(np.int64)
        counts = last[:, 0] - first[:, 0] + 1
        if counts.size and (counts.min() < 1 or first[:, 0].min() < 0
                            or last[:, 0].max() >= self.doc_idx.shape[0]):
            bad = int(np.argmax((counts < 1) | (first[:, 0] < 0) | (last[:, 0] >= self.doc_idx.shape[0])))
            raise DataError(
                f"index maps are corrupt: sample {int(s[bad])} spans doc_idx positions "
                f"{int(first[bad, 0])}..{int(last[bad, 0])} of {self.doc_idx.shape[0]} (sample_idx "
                f"{self.sample_idx.dtype} positions wrapped past 2^31?); delete the "
                f"*_indexmap_* files to rebuild them with 64-bit positions")
        total = int(counts.sum())
        seg_row = np.repeat(np.arange(len(s), dtype=np.int64), counts)
        seg_begin = np.cumsum(counts) - counts
        within = np.arange(total, dtype=np.int64) - np.repeat(seg_begin, counts)
        pos = np.repeat(first[:, 0], counts) + within
        items = self.doc_idx[pos].astype(np.int64)
        item_sizes = np.asarray(sizes)[items].astype(np.int64)
        is_first = within == 0
        is_last = within == np.repeat(counts - 1, counts)
        starts = np.where(is_first, np.repeat(first[:, 1], counts), 0)
        stops = np.where(is_last, np.repeat(last[:, 1], counts) + 1, item_sizes)
        return seg_row, items, starts, stops - starts


@dataclasses.dataclass(frozen=True)
class IndexMapPlan:
    """What building the maps for a dataset and a sample count implies, computed from the sizes only."""

    num_items: int
    tokens_per_epoch: int
    seq_len: int
    requested_samples: int  # ceil(train_iters · global_batch · 1.005)
    num_epochs: int
    num_samples: int  # S = (E·T − 1) // seq_len
    doc_idx_dtype: np.dtype
    sample_idx_dtype: np.dtype
    shuffle_idx_dtype: np.dtype

    @property
    def doc_idx_len(self) -> int:
        return self.num_epochs * self.num_items

    @property
    def samples_per_epoch(self) -> int:
        return max(0, (self.tokens_per_epoch - 1) // self.seq_len)

    @property
    def nbytes(self) -> dict[str, int]:
        """Bytes of each map (= its .npy file, less the 128-byte header)."""
        return {"doc_idx": self.doc_idx_len * self.doc_idx_dtype.itemsize,
                "sample_idx": 2 * (self.num_samples + 1) * self.sample_idx_dtype.itemsize,
                "shuffle_idx": self.num_samples * self.shuffle_idx_dtype.itemsize}

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())


def plan_index_maps(sizes: np.ndarray, num_samples: int, seq_len: int) -> IndexMapPlan:
    """Size the build (epochs, entries, dtypes, bytes) without allocating anything."""
    sizes = np.asarray(sizes)
    tokens = int(sizes.sum(dtype=np.int64))
    epochs = neox_num_epochs(tokens, seq_len, num_samples)
    samples = (epochs * tokens - 1) // seq_len
    return IndexMapPlan(
        num_items=len(sizes), tokens_per_epoch=tokens, seq_len=int(seq_len),
        requested_samples=int(num_samples), num_epochs=epochs, num_samples=samples,
        doc_idx_dtype=doc_idx_dtype(len(sizes)),
        sample_idx_dtype=sample_idx_dtype(samples, epochs * len(sizes)),
        shuffle_idx_dtype=np.dtype(np.uint32 if samples < np.iinfo(np.uint32).max - 1 else np.int64))


def index_map_limit_bytes() -> float:
    """The largest build allowed: ``$PYTHIA_JAX_INDEX_MAP_LIMIT_GB`` GB (default 8; ``inf``: none)."""
    raw = os.environ.get(LIMIT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_LIMIT_GB * 1e9
    try:
        gb = float(raw)
    except ValueError:
        raise DataError(f"{LIMIT_ENV}={raw!r} is not a number of GB (e.g. 20, or inf for no "
                        f"limit)") from None
    if not gb >= 0:
        raise DataError(f"{LIMIT_ENV}={raw!r} must be a non-negative number of GB")
    return gb * 1e9


def _free_bytes(path: str) -> int | None:
    """Free bytes on the file system that holds ``path`` (its nearest existing parent), or None."""
    directory = os.path.dirname(os.path.abspath(path))
    while directory and not os.path.isdir(directory):
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_index_map_plan(plan: IndexMapPlan, *, data_prefix: str, cache_path: str | None,
                         global_batch: int | None = None, train_iters: int | None = None,
                         max_bytes: float | None = None) -> None:
    """Refuse a build bigger than ``max_bytes`` (default ``index_map_limit_bytes()``) or than the
    free disk under ``cache_path`` (None: not cached), with one line that says what the settings
    imply and what to change. The build holds about the same bytes in memory."""
    limit = index_map_limit_bytes() if max_bytes is None else float(max_bytes)
    total = plan.total_bytes
    free = _free_bytes(cache_path) if cache_path else None
    too_big = total > limit
    no_room = free is not None and total > free
    if not (too_big or no_room):
        return
    asked = (f"ceil({train_iters} steps × {global_batch} rows × {MARGIN})" if train_iters and global_batch
             else "requested")
    per_step = (f" = {plan.samples_per_epoch / (global_batch * MARGIN):.3g} steps of {global_batch} rows"
                if global_batch else "")
    where = f"written to {os.path.dirname(os.path.abspath(cache_path))}" if cache_path else "held in memory"
    reason = (f"over the {_gb(limit)} limit" if too_big else "") + \
        (" and " if too_big and no_room else "") + (f"over the {_gb(free)} free there" if no_room else "")
    raise DataError(
        f"{data_prefix}: GPT-NeoX order for {plan.requested_samples:,} samples of {plan.seq_len} "
        f"tokens ({asked}) repeats this dataset ({plan.num_items:,} items, "
        f"{plan.tokens_per_epoch:,} tokens, {plan.samples_per_epoch:,} samples{per_step} per epoch) "
        f"for {plan.num_epochs:,} epochs: index maps of {_gb(total)} (doc_idx "
        f"{plan.doc_idx_len:,} entries) to be built in memory and {where}, {reason}; ask for fewer "
        f"samples (--train-iters / --batch-size / --seq-len, or TrainConfig.num_steps / "
        f"global_batch / seq_length) or use a larger dataset; to build anyway set {LIMIT_ENV} "
        f"(GB, e.g. {max(1, math.ceil(total / 1e9) + 1)})" + (" and free disk space" if no_room else ""))


MAX_SEED = SEED_RANGE[1]  # numpy.random.RandomState's seed range (the shuffles of build_index_maps)


def check_seed(seed, what: str = "seed") -> int:
    """``seed`` as an int, or ``DataError`` (one line naming ``what`` and the range) unless it is
    an integer in [0, 2**32 - 1], the seeds ``numpy.random.RandomState`` (GPT-NeoX's shuffles) takes."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise DataError(f"{what} {seed!r}: expected an integer in [0, 2**32 - 1] = [0, {MAX_SEED}]")
    return int(seed)


def build_index_maps(sizes: np.ndarray, num_samples: int, seq_len: int, seed: int,
                     *, verbose: bool = False) -> IndexMaps:
    """Build the three maps for items ``0..N-1`` of ``sizes`` (int32/int64 [N]).

    No size check here (see ``check_index_map_plan``); progress goes to the module logger.
    """
    sizes = np.asarray(sizes)
    plan = plan_index_maps(sizes, num_samples, seq_len)
    level = logging.INFO if verbose or plan.total_bytes > 1e8 else logging.DEBUG
    logger.log(level, "building GPT-NeoX index maps: %s items, %s tokens/epoch, %s epoch(s), %s "
               "samples, %s", f"{plan.num_items:,}", f"{plan.tokens_per_epoch:,}",
               f"{plan.num_epochs:,}", f"{plan.num_samples:,}", _gb(plan.total_bytes))
    rng = np.random.RandomState(seed=check_seed(seed))
    t0 = time.time()
    doc_idx = build_doc_idx(len(sizes), plan.num_epochs, rng)
    t1 = time.time()
    logger.log(level, "doc_idx: %s entries (%.1fs)", f"{len(doc_idx):,}", t1 - t0)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_len, plan.num_epochs, plan.tokens_per_epoch)
    t2 = time.time()
    logger.log(level, "sample_idx: %s rows %s (%.1fs)", f"{sample_idx.shape[0]:,}",
               sample_idx.dtype.name, t2 - t1)
    shuffle_idx = build_shuffle_idx(sample_idx.shape[0] - 1, rng)
    logger.log(level, "shuffle_idx: %s entries (%.1fs)", f"{len(shuffle_idx):,}", time.time() - t2)
    return IndexMaps(doc_idx, sample_idx, shuffle_idx)


def index_map_prefix(data_prefix: str, num_samples: int, seq_len: int, seed: int,
                     name: str = "train_0") -> str:
    """GPT-NeoX's cache file stem ``{prefix}_{name}_indexmap_{ns}ns_{sl}sl_{seed}s``."""
    return f"{data_prefix}_{name}_indexmap_{num_samples}ns_{seq_len}sl_{seed}s"


def index_map_paths(data_prefix: str, num_samples: int, seq_len: int, seed: int,
                    name: str = "train_0") -> dict[str, str]:
    """{'doc_idx': ..., 'sample_idx': ..., 'shuffle_idx': ...} cache file paths."""
    stem = index_map_prefix(data_prefix, num_samples, seq_len, seed, name)
    return {k: f"{stem}_{k}.npy" for k in ("doc_idx", "sample_idx", "shuffle_idx")}


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises several kinds
        raise DataError(f"{path}: unreadable index map ({e}); delete it to rebuild") from None


def check_index_maps(maps: IndexMaps, sizes: np.ndarray, num_samples: int, seq_len: int,
                     where: str) -> None:
    """Cheap consistency checks of loaded maps against the dataset (shapes, bounds, epochs)."""
    tokens_per_epoch = int(np.asarray(sizes).sum(dtype=np.int64))
    epochs = neox_num_epochs(tokens_per_epoch, seq_len, num_samples)
    expected_s = (epochs * tokens_per_epoch - 1) // seq_len
    problems = []
    if maps.doc_idx.ndim != 1 or maps.doc_idx.shape[0] != epochs * len(sizes):
        problems.append(f"doc_idx has shape {maps.doc_idx.shape}, expected ({epochs * len(sizes)},)")
    if maps.sample_idx.ndim != 2 or maps.sample_idx.shape != (expected_s + 1, 2):
        problems.append(f"sample_idx has shape {maps.sample_idx.shape}, expected ({expected_s + 1}, 2)")
    if maps.shuffle_idx.ndim != 1 or maps.shuffle_idx.shape[0] != expected_s:
        problems.append(f"shuffle_idx has shape {maps.shuffle_idx.shape}, expected ({expected_s},)")
    if not problems and expected_s >= 0:
        last = int(maps.sample_idx[-1, 0])  # cheap: wrapped int32 positions show up here
        if not 0 <= last < maps.doc_idx.shape[0]:
            problems.append(f"sample_idx's last position {last} is outside doc_idx (0..."
                            f"{maps.doc_idx.shape[0] - 1}): {maps.sample_idx.dtype.name} positions "
                            f"wrapped; delete the maps to rebuild them with 64-bit positions")
    if not problems and expected_s > 0:
        problems += _spot_check(maps, np.asarray(sizes), expected_s)
    if problems:
        raise DataError(f"{where}: index maps do not match the dataset "
                        f"({len(sizes)} items, {tokens_per_epoch} tokens): " + "; ".join(problems))


def _spot_check(maps: IndexMaps, sizes: np.ndarray, num: int, probes: int = 4096) -> list[str]:
    """Maps built for other data of the same shape (the dataset re-tokenized in place): at up to
    ``probes`` evenly spaced samples, each start must name a document of the dataset and lie
    inside it (``sample_idx[i] = (position in doc_idx, token offset)``). Costs a few ms."""
    at = np.unique(np.linspace(0, num, min(probes, num + 1)).astype(np.int64))
    pos = np.asarray(maps.sample_idx[at, 0], np.int64)
    offset = np.asarray(maps.sample_idx[at, 1], np.int64)
    if pos.min() < 0 or pos.max() >= maps.doc_idx.shape[0]:
        return [f"sample_idx names doc_idx positions outside 0...{maps.doc_idx.shape[0] - 1}"]
    docs = np.asarray(maps.doc_idx[pos], np.int64)
    if docs.min() < 0 or docs.max() >= len(sizes):
        return [f"doc_idx names documents outside 0...{len(sizes) - 1}"]
    bad = int((offset < 0).sum() + (offset > sizes[docs]).sum())
    if bad:
        return [f"{bad} of {len(at)} sampled rows start beyond the end of their document: the maps were built "
                "for other data (e.g. before the dataset was re-tokenized); delete them to rebuild them"]
    return []


def fallback_cache_prefix(data_prefix: str) -> str:
    """Where maps go when they can't go beside the data (read-only or bundled package data):
    ``$PYTHIA_JAX_CACHE`` or ``~/.cache/pythia_jax``, under ``index_maps/<name>-<hash>``."""
    import hashlib
    root = os.environ.get("PYTHIA_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pythia_jax")
    tag = hashlib.sha1(os.path.abspath(data_prefix).encode()).hexdigest()[:10]
    name = os.path.basename(data_prefix.rstrip("/")) or "data"
    return os.path.join(root, "index_maps", f"{name}-{tag}", name)


def _beside_data_ok(data_prefix: str) -> bool:
    """Cache beside the data only for local, writable directories outside the package."""
    if is_url(data_prefix):
        return False
    directory = os.path.dirname(os.path.abspath(data_prefix))
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.commonpath([directory, package_dir]) == package_dir:
        return False
    return os.access(directory, os.W_OK)


def load_or_build_index_maps(data_prefix: str, sizes: np.ndarray, num_samples: int, seq_len: int,
                             seed: int, *, cache: bool = True, cache_prefix: str | None = None,
                             verbose: bool = False, train_iters: int | None = None,
                             global_batch: int | None = None,
                             max_bytes: float | None = None) -> IndexMaps:
    """Load the cached maps or build and cache them.

    Looked up, in order: ``cache_prefix`` (if given), GPT-NeoX's names beside the data (where the
    published maps go), then the user cache (``fallback_cache_prefix``). New maps are written
    to ``cache_prefix``, else beside local writable data, else the user cache. Loaded maps are
    memory-mapped and checked against the dataset (shapes, and a spot check of where sampled rows
    start: maps built for other data of the same shape are refused, naming the files to delete).

    Before building, ``check_index_map_plan`` refuses (``DataError``, one line) a build over
    ``max_bytes`` (default ``$PYTHIA_JAX_INDEX_MAP_LIMIT_GB``, 8 GB) or the free disk;
    ``train_iters``/``global_batch`` (where ``num_samples`` came from) only word that message.
    """
    candidates = [cache_prefix] if cache_prefix else []
    if not is_url(data_prefix):
        candidates.append(data_prefix)
    candidates.append(fallback_cache_prefix(data_prefix))
    for stem_prefix in candidates:
        paths = index_map_paths(stem_prefix, num_samples, seq_len, seed)
        if all(os.path.isfile(p) for p in paths.values()):
            maps = IndexMaps(*(_load_npy(paths[k]) for k in ("doc_idx", "sample_idx", "shuffle_idx")))
            check_index_maps(maps, sizes, num_samples, seq_len, paths["doc_idx"])
            logger.log(logging.INFO if verbose else logging.DEBUG, "index maps loaded from %s_*.npy",
                       paths["doc_idx"][:-len("_doc_idx.npy")])
            return maps
    target = None
    if cache:
        target = cache_prefix or (data_prefix if _beside_data_ok(data_prefix)
                                  else fallback_cache_prefix(data_prefix))
    paths = index_map_paths(target, num_samples, seq_len, seed) if target else None
    plan = plan_index_maps(sizes, num_samples, seq_len)
    check_index_map_plan(plan, data_prefix=data_prefix, cache_path=paths["doc_idx"] if paths else None,
                         train_iters=train_iters, global_batch=global_batch, max_bytes=max_bytes)
    if paths and (verbose or plan.total_bytes > 1e8):
        logger.info("index maps for %s will be cached at %s_*.npy", data_prefix,
                    paths["doc_idx"][:-len("_doc_idx.npy")])
    maps = build_index_maps(sizes, num_samples, seq_len, seed, verbose=verbose)
    if paths:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(paths["doc_idx"])), exist_ok=True)
            save_npys_together([(paths[k], getattr(maps, k))  # the three maps: all or none
                                for k in ("doc_idx", "sample_idx", "shuffle_idx")])
        except OSError as e:
            logger.warning("index maps not cached at %s (%s); they will be rebuilt next time",
                           paths["doc_idx"][:-len("_doc_idx.npy")], e)
        else:
            logger.log(logging.INFO if verbose or plan.total_bytes > 1e8 else logging.DEBUG,
                       "index maps written to %s_*.npy", paths["doc_idx"][:-len("_doc_idx.npy")])
    return maps
