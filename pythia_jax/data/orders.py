"""Order sources: training row j -> seq_len+1 tokens.

- ``PreshuffledOrder``: a pre-shuffled dataset (the Pythia release, or ``pythia-jax preshuffle``
  output): row j is item j, which must hold exactly seq_len+1 tokens.
- ``NeoxOrder``: a raw document dataset + GPT-NeoX index maps (``neox_order``); row j is sample
  ``shuffle_idx[j]``.
- ``SequentialOrder``: unshuffled consecutive windows ``F[j·L : j·L + L + 1]`` of the item stream
  in file order (for held-out evaluation data).

Every order has ``len(order)`` (rows available), ``seq_len``, ``name`` (for errors) and
``read_rows(start, stop) -> [stop-start, seq_len+1]`` array of the dataset dtype (uint16 for
Pythia), and ``read_row_indices(rows)`` for arbitrary rows. ``open_order(...)`` builds one by name.
"""

from __future__ import annotations

import numpy as np

from pythia_jax.data.indexed import IndexedDataset
from pythia_jax.data.neox_order import IndexMaps, check_seed, load_or_build_index_maps, neox_num_samples
from pythia_jax.errors import DataError

ORDERS = ("preshuffled", "neox", "sequential")


class Order:
    """Base class: maps training rows to token rows of length seq_len+1."""

    dataset: IndexedDataset
    seq_len: int
    name: str
    kind: str  # the name open_order knows it by
    what = "dataset"  # for errors: "the dataset has N rows"

    def __len__(self) -> int:
        raise NotImplementedError

    def read_row_indices(self, rows: np.ndarray, dtype=None) -> np.ndarray:
        """Rows at the given indices, [len(rows), seq_len+1] of ``dtype`` (default: the data's)."""
        raise NotImplementedError

    def _row_indices(self, rows) -> np.ndarray:
        """``rows`` as int64, checked to lie in ``[0, len(self))``."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise DataError(f"{self.name}: rows up to {int(rows.max())} requested, the "
                            f"{self.what} has {len(self)} rows of {self.seq_len + 1} tokens")
        return rows

    def _check_rows(self, start: int, stop: int) -> None:
        if start < 0 or stop > len(self) or start > stop:
            raise DataError(f"{self.name}: rows [{start}, {stop}) are beyond the dataset, which has "
                            f"{len(self)} rows of {self.seq_len + 1} tokens")

    def read_rows(self, start: int, stop: int, dtype=None) -> np.ndarray:
        """Rows [start, stop) as an array [stop-start, seq_len+1] of ``dtype`` (default: the data's)."""
        self._check_rows(start, stop)
        return self.read_row_indices(np.arange(start, stop, dtype=np.int64), dtype)

    def _assemble(self, tokens: np.ndarray, n_rows: int) -> np.ndarray:
        width = self.seq_len + 1
        if tokens.shape[0] != n_rows * width:
            raise DataError(f"{self.name}: rows did not come out as {width} tokens each "
                            f"({tokens.shape[0]} tokens for {n_rows} rows)")
        return tokens.reshape(n_rows, width)


class PreshuffledOrder(Order):
    """Row j = item j of a pre-shuffled dataset (items of exactly seq_len+1 tokens)."""

    kind = "preshuffled"

    def __init__(self, dataset: IndexedDataset, seq_len: int):
        self.dataset = dataset
        self.seq_len = int(seq_len)
        self.name = dataset.prefix
        if len(dataset) and int(dataset.sizes[0]) != self.seq_len + 1:
            if np.unique(dataset.sizes[:1024]).size > 1:  # items of many lengths: raw documents
                raise DataError(
                    f"{dataset.idx_path}: items of different lengths ({int(dataset.sizes.min())} to "
                    f"{int(dataset.sizes.max())} tokens) look like a raw document dataset, not pre-shuffled "
                    f"rows of seq_len+1 = {self.seq_len + 1}; use --order neox (DataConfig.order = 'neox') "
                    "to read it in GPT-NeoX order, or check --seq-len")
            raise DataError(
                f"{dataset.idx_path}: pre-shuffled rows have {int(dataset.sizes[0])} tokens but "
                f"seq_len {self.seq_len} needs {self.seq_len + 1}; check --seq-len, or use --order neox "
                "if this is a raw document dataset")

    def __len__(self) -> int:
        return len(self.dataset)

    def _check_sizes(self, rows: np.ndarray) -> None:
        sizes = self.dataset.sizes[rows]
        bad = np.nonzero(sizes != self.seq_len + 1)[0]
        if bad.size:
            j = int(rows[bad[0]])
            raise DataError(f"{self.dataset.idx_path}: pre-shuffled row {j} has {int(sizes[bad[0]])} "
                            f"tokens, expected seq_len+1 = {self.seq_len + 1}")

    def read_rows(self, start: int, stop: int, dtype=None) -> np.ndarray:
        self._check_rows(start, stop)
        self._check_sizes(np.arange(start, stop))
        tokens = self.dataset.read_items(start, stop)
        if dtype is not None:
            tokens = tokens.astype(dtype)
        return self._assemble(tokens, stop - start)

    def read_row_indices(self, rows: np.ndarray, dtype=None) -> np.ndarray:
        rows = self._row_indices(rows)
        self._check_sizes(rows)
        n = self.seq_len + 1
        tokens = self.dataset.gather(rows, np.zeros_like(rows), np.full_like(rows, n), dtype)
        return self._assemble(tokens, len(rows))


class NeoxOrder(Order):
    """Row j = GPT-NeoX sample shuffle_idx[j] of a raw document dataset."""

    kind = "neox"
    what = "GPT-NeoX order"

    def __init__(self, dataset: IndexedDataset, seq_len: int, maps: IndexMaps):
        self.dataset = dataset
        self.seq_len = int(seq_len)
        self.maps = maps
        self.name = dataset.prefix

    @classmethod
    def build(cls, dataset: IndexedDataset, *, seq_len: int, seed: int, train_iters: int,
              global_batch: int, num_samples: int | None = None, cache: bool = True,
              cache_prefix: str | None = None, verbose: bool = False) -> "NeoxOrder":
        """Load or build the maps for ``num_samples`` (default GPT-NeoX's
        ceil(train_iters·global_batch·1.005)). A build too large for the limit or the disk is
        refused before it starts (``neox_order.check_index_map_plan``, ``DataError``)."""
        derived = num_samples is None
        if derived:
            num_samples = neox_num_samples(train_iters, global_batch)
        maps = load_or_build_index_maps(dataset.prefix, dataset.sizes, num_samples, seq_len, seed,
                                        cache=cache, cache_prefix=cache_prefix, verbose=verbose,
                                        train_iters=train_iters if derived else None,
                                        global_batch=global_batch)
        return cls(dataset, seq_len, maps)

    def __len__(self) -> int:
        return len(self.maps)

    def read_row_indices(self, rows: np.ndarray, dtype=None) -> np.ndarray:
        rows = self._row_indices(rows)
        samples = np.asarray(self.maps.shuffle_idx[rows], dtype=np.int64)
        _, items, starts, lengths = self.maps.sample_segments(samples, self.dataset.sizes)
        return self._assemble(self.dataset.gather(items, starts, lengths, dtype), len(rows))


class SequentialOrder(Order):
    """Row j = stream tokens [j·seq_len, j·seq_len + seq_len + 1) of the items in file order."""

    kind = "sequential"

    def __init__(self, dataset: IndexedDataset, seq_len: int):
        self.dataset = dataset
        self.seq_len = int(seq_len)
        self.name = dataset.prefix
        self._ends = np.cumsum(dataset.sizes, dtype=np.int64)
        total = int(self._ends[-1]) if len(self._ends) else 0
        self._rows = max(0, (total - 1) // self.seq_len)

    def __len__(self) -> int:
        return self._rows

    def read_row_indices(self, rows: np.ndarray, dtype=None) -> np.ndarray:
        rows = self._row_indices(rows)
        width = self.seq_len + 1
        first = rows * self.seq_len
        item_first = np.searchsorted(self._ends, first, side="right")
        item_last = np.searchsorted(self._ends, first + width - 1, side="right")
        counts = item_last - item_first + 1
        total = int(counts.sum())
        seg_begin = np.cumsum(counts) - counts
        within = np.arange(total, dtype=np.int64) - np.repeat(seg_begin, counts)
        items = np.repeat(item_first, counts) + within
        item_start_tok = self._ends[items] - self.dataset.sizes[items]
        lo = np.maximum(np.repeat(first, counts), item_start_tok)
        hi = np.minimum(np.repeat(first + width, counts), self._ends[items])
        tokens = self.dataset.gather(items, lo - item_start_tok, hi - lo, dtype)
        return self._assemble(tokens, len(rows))


def open_order(data_prefix: str | IndexedDataset, order: str, *, seq_len: int, seed: int = 1234,
               train_iters: int = 143000, global_batch: int = 1024, num_samples: int | None = None,
               cache: bool = True, cache_prefix: str | None = None, verbose: bool = False) -> Order:
    """Open ``data_prefix`` with the order named ``order`` (``preshuffled``, ``neox``, ``sequential``).
    A ``neox`` seed outside [0, 2**32 - 1] is refused (``neox_order.check_seed``, ``DataError``)."""
    if order == "neox":
        seed = check_seed(seed, "the GPT-NeoX order seed")
    dataset = data_prefix if isinstance(data_prefix, IndexedDataset) else IndexedDataset(data_prefix)
    if order == "preshuffled":
        return PreshuffledOrder(dataset, seq_len)
    if order == "neox":
        return NeoxOrder.build(dataset, seq_len=seq_len, seed=seed, train_iters=train_iters,
                               global_batch=global_batch, num_samples=num_samples, cache=cache,
                               cache_prefix=cache_prefix, verbose=verbose)
    if order == "sequential":
        return SequentialOrder(dataset, seq_len)
    raise DataError(f"unknown data order {order!r}; choose one of {', '.join(ORDERS)}")
