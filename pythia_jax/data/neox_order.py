"""GPT-NeoX ``GPT2Dataset`` index maps (doc_idx, sample_idx, shuffle_idx), exactly as GPT-NeoX v1.0.

The recipe (PYTHIA_FACTS §6; GPT-NeoX ``megatron/data/gpt2_dataset.py`` and the C++
``build_sample_idx`` helper), for one dataset of N items with token counts ``sizes``:

1. ``num_samples = ceil(train_iters · global_batch · 1.005)`` (``neox_num_samples``).
2. ``T`` = tokens of one epoch (int64); epochs ``E`` = smallest E ≥ 1 with
   ``(E·T − 1) // seq_len ≥ num_samples`` (``neox_num_epochs``).
3. One ``numpy.random.RandomState(seed)`` drives both shuffles, doc_idx first.
4. ``doc_idx``: E back-to-back copies of ``arange(N)`` as int32, shuffled once (``rng.shuffle``).
5. ``S = (E·T − 1) // seq_len`` samples. ``sample_idx`` int32 [S+1, 2] (int64 if 2(S+1) does not
   fit int32): row s = (position p in doc_idx, offset o in that item) of stream token
   ``s·seq_len``, where the stream F concatenates the items in doc_idx order and p is the item
   that *contains* that token (for s ≥ 1; row 0 is (0, 0)). Sample s is
   ``F[s·seq_len : s·seq_len + seq_len + 1]``: from (p_s, o_s) up to and including (p_{s+1}, o_{s+1}).
6. ``shuffle_idx = arange(S, dtype=uint32)`` (int64 from 2³²−1), shuffled with the same rng.
7. Training row j = sample ``shuffle_idx[j]``; GPT2Dataset's length is S − 1.

Built vectorised (numpy cumsum + searchsorted over chunks of doc_idx), so the full Pile
(210,607,728 items, 162,165,686 samples) needs about 4 GB: doc_idx int32 (0.8 GB), sample_idx
int32 (1.3 GB), shuffle_idx uint32 (0.65 GB) plus chunk temporaries; no E·N int64 arrays.

Maps are cached as ``.npy`` under GPT-NeoX's names
``{data_prefix}_train_0_indexmap_{ns}ns_{sl}sl_{seed}s_{doc,sample,shuffle}_idx.npy``, so the
published seed-1234 maps can be dropped beside the data and are used as they are.

Public API: ``neox_num_samples``, ``neox_num_epochs``, ``build_doc_idx``, ``build_sample_idx``,
``build_shuffle_idx``, ``build_index_maps(sizes, num_samples, seq_len, seed) -> IndexMaps``,
``index_map_paths(data_prefix, num_samples, seq_len, seed)``,
``load_or_build_index_maps(data_prefix, sizes, num_samples, seq_len, seed) -> IndexMaps``,
``IndexMaps.sample_segments(samples)`` (which item slices make each sample).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np

from pythia_jax.data.indexed import save_npys_together
from pythia_jax.errors import DataError

MARGIN = 1.005  # GPT-NeoX asks for 0.5% more samples than training consumes
_CHUNK = 1 << 23  # doc_idx entries per chunk when building sample_idx


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


def build_doc_idx(num_items: int, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """E copies of ``arange(num_items)`` as int32 [E·N], shuffled once with ``rng``."""
    doc_idx = np.tile(np.arange(num_items, dtype=np.int32), num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, num_epochs: int,
                     tokens_per_epoch: int) -> np.ndarray:
    """GPT-NeoX's sample_idx [S+1, 2] (int32 when 2(S+1) < 2³¹−1, else int64), vectorised.

    sizes: int [N] tokens per item; doc_idx: int [E·N] item order.
    """
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_len
    dtype = np.int32 if 2 * (num_samples + 1) < np.iinfo(np.int32).max else np.int64
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    out[0] = 0
    next_sample = 1
    base = 0  # stream tokens before the current chunk
    for a in range(0, len(doc_idx), _CHUNK):
        if next_sample > num_samples:
            break
        lens = sizes[doc_idx[a:a + _CHUNK]].astype(np.int64)
        ends = np.cumsum(lens)
        ends += base
        chunk_end = int(ends[-1])
        last_sample = min(num_samples, (chunk_end - 1) // seq_len)
        if last_sample >= next_sample:
            tokens = np.arange(next_sample, last_sample + 1, dtype=np.int64) * seq_len
            pos = np.searchsorted(ends, tokens, side="right")  # item containing each token
            out[next_sample:last_sample + 1, 0] = pos + a
            out[next_sample:last_sample + 1, 1] = tokens - (ends[pos] - lens[pos])
            del tokens, pos
            next_sample = last_sample + 1
        base = chunk_end
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
    """The three GPT-NeoX maps. doc_idx int32 [E·N]; sample_idx int [S+1, 2]; shuffle_idx uint32 [S]."""

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


def build_index_maps(sizes: np.ndarray, num_samples: int, seq_len: int, seed: int,
                     *, verbose: bool = False) -> IndexMaps:
    """Build the three maps for items ``0..N-1`` of ``sizes`` (int32/int64 [N])."""
    sizes = np.asarray(sizes)
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    num_epochs = neox_num_epochs(tokens_per_epoch, seq_len, num_samples)
    rng = np.random.RandomState(seed=seed)
    t0 = time.time()
    doc_idx = build_doc_idx(len(sizes), num_epochs, rng)
    t1 = time.time()
    sample_idx = build_sample_idx(sizes, doc_idx, seq_len, num_epochs, tokens_per_epoch)
    t2 = time.time()
    shuffle_idx = build_shuffle_idx(sample_idx.shape[0] - 1, rng)
    t3 = time.time()
    if verbose:
        print(f"index maps: {len(sizes):,} items, {tokens_per_epoch:,} tokens/epoch, "
              f"{num_epochs} epoch(s), {sample_idx.shape[0] - 1:,} samples; doc_idx {t1 - t0:.1f}s, "
              f"sample_idx {t2 - t1:.1f}s, shuffle_idx {t3 - t2:.1f}s")
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
    if problems:
        raise DataError(f"{where}: index maps do not match the dataset "
                        f"({len(sizes)} items, {tokens_per_epoch} tokens): " + "; ".join(problems))


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
    if "://" in data_prefix:
        return False
    directory = os.path.dirname(os.path.abspath(data_prefix))
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.commonpath([directory, package_dir]) == package_dir:
        return False
    return os.access(directory, os.W_OK)


def load_or_build_index_maps(data_prefix: str, sizes: np.ndarray, num_samples: int, seq_len: int,
                             seed: int, *, cache: bool = True, cache_prefix: str | None = None,
                             verbose: bool = False) -> IndexMaps:
    """Load the cached maps or build and cache them.

    Looked up, in order: ``cache_prefix`` (if given), GPT-NeoX's names beside the data (where the
    published maps go), then the user cache (``fallback_cache_prefix``). New maps are written
    to ``cache_prefix``, else beside local writable data, else the user cache. Loaded maps are
    memory-mapped and checked against the dataset's shape.
    """
    candidates = [cache_prefix] if cache_prefix else []
    if "://" not in data_prefix:
        candidates.append(data_prefix)
    candidates.append(fallback_cache_prefix(data_prefix))
    for stem_prefix in candidates:
        paths = index_map_paths(stem_prefix, num_samples, seq_len, seed)
        if all(os.path.isfile(p) for p in paths.values()):
            maps = IndexMaps(*(_load_npy(paths[k]) for k in ("doc_idx", "sample_idx", "shuffle_idx")))
            check_index_maps(maps, sizes, num_samples, seq_len, paths["doc_idx"])
            if verbose:
                print(f"index maps loaded from {paths['doc_idx'][:-len('_doc_idx.npy')]}_*.npy")
            return maps
    maps = build_index_maps(sizes, num_samples, seq_len, seed, verbose=verbose)
    if cache:
        target = cache_prefix or (data_prefix if _beside_data_ok(data_prefix)
                                  else fallback_cache_prefix(data_prefix))
        paths = index_map_paths(target, num_samples, seq_len, seed)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(paths["doc_idx"])), exist_ok=True)
            save_npys_together([(paths[k], getattr(maps, k))  # the three maps: all or none
                                for k in ("doc_idx", "sample_idx", "shuffle_idx")])
        except OSError as e:
            if verbose:
                print(f"index maps not cached ({e})")
    return maps
