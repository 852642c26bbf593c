"""Writing indexed datasets and ``.npy`` files: atomic ``.idx`` / ``.bin`` publication,
``IndexedDatasetWriter`` (GPT-NeoX ``MMapIndexedDatasetBuilder``), ``write_indexed_dataset``,
``save_npy_atomic`` / ``save_npys_together`` and the output check of a dataset prefix.
"""

from __future__ import annotations

import array
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pythia_jax.data.indexed.index import Index, _write_index_file, dtype_code
from pythia_jax.data.indexed.sources import local_shard_files
from pythia_jax.errors import DataError
from pythia_jax.io_utils import is_url
from pythia_jax.io_utils.outputs import outermost_missing, remove_empty_folders

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
    shards = [] if is_url(prefix) else local_shard_files(prefix)
    if shards and not os.path.exists(prefix + ".idx"):
        raise DataError(f"output {prefix}: shard file(s) {os.path.basename(shards[0])} … exist without a "
                        f"{prefix}.idx beside them; refusing to replace them: choose another output prefix")


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
    # another dataset's index (document sizes) at this path: the maps cached for it are stale
    replaced = (with_files and path.endswith(".idx") and not is_url(path) and os.path.exists(path)
                and not _same_index(path, sizes, doc_idx))
    publish_together([*with_files, (tmp, path)])
    if with_files and path.endswith(".idx"):
        _remove_other_layout(path[:-4], {os.path.abspath(final) for _, final in with_files})
    if replaced:
        _replaced_dataset(path[:-4])


def _same_index(path: str, sizes: np.ndarray, doc_idx: np.ndarray) -> bool:
    """Whether the ``.idx`` at ``path`` holds these item sizes and document index (what GPT-NeoX
    index maps are built from); False for one that cannot be read."""
    try:
        old = Index(path)
    except Exception:  # noqa: BLE001 - an unreadable index is another one
        return False
    return np.array_equal(old.sizes, sizes) and np.array_equal(old.doc_idx, doc_idx)


# GPT-NeoX's index-map cache files of one prefix (megatron/data/gpt2_dataset.py _build_index_mappings:
# {prefix}_{name}_indexmap_{N}ns_{L}sl_{S}s_{doc,sample,shuffle}_idx.npy), and no other dataset's
_INDEX_MAP_FILE = r"_[A-Za-z]+(?:_\d+)?_indexmap_\d+ns_\d+sl_\d+s_(?:doc|sample|shuffle)_idx\.npy"


def _replaced_dataset(prefix: str) -> None:
    """After a dataset with another index replaced the one at ``prefix``: say so, and remove the
    GPT-NeoX index maps cached beside it, which were built for the replaced data and would
    otherwise be read for the new one (``neox_order.check_index_maps`` only spot-checks). Maps of
    another dataset whose prefix starts with this one (``wiki_small`` beside ``wiki``) are kept."""
    import logging
    import re

    log = logging.getLogger(__name__)
    log.warning("replaced the dataset at %s (other documents than its previous .idx)", prefix)
    folder, stem = os.path.split(os.path.abspath(prefix))
    own = re.compile(re.escape(stem) + _INDEX_MAP_FILE)
    maps = sorted(os.path.join(folder, f) for f in os.listdir(folder) if own.fullmatch(f))
    for f in maps:
        os.remove(f)
    if maps:
        log.warning("removed %d index map file(s) %s… built for the replaced dataset (rebuilt when next needed)",
                    len(maps), os.path.basename(maps[0]))


def _data_files(prefix: str) -> list[str]:
    """The local data files of a dataset prefix, either layout: ``prefix.bin`` and the shards
    ``prefix-NNNNN-of-NNNNN.bin``."""
    return local_shard_files(prefix) + ([prefix + ".bin"] if os.path.isfile(prefix + ".bin") else [])


def _remove_other_layout(prefix: str, written: set[str]) -> None:
    """After a dataset was published at ``prefix``: remove the data files of the dataset its
    ``.idx`` replaced that it did not overwrite (a ``prefix.bin`` replaced by shards, shards
    replaced by ``prefix.bin`` or by another shard count), which readers would otherwise take
    for the new data (``check_dataset_output`` refused such files without an ``.idx``)."""
    import logging

    if is_url(prefix):
        return
    stale = [f for f in _data_files(prefix) if os.path.abspath(f) not in written]
    for f in stale:
        logging.getLogger(__name__).warning("removing %s: data of the dataset %s.idx replaced", f, prefix)
        os.remove(f)


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
        folder = os.path.dirname(os.path.abspath(self.prefix)) or "."
        self._created = outermost_missing(folder)  # removed again (if still empty) when it aborts
        os.makedirs(folder, exist_ok=True)
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
        """Remove the temporary data, and the folders this writer created if nothing else is in them."""
        if not self._closed:
            self._bin.close()
            if os.path.exists(self._bin_tmp):
                os.remove(self._bin_tmp)
            self._closed = True
            remove_empty_folders(os.path.dirname(os.path.abspath(self.prefix)), self._created)

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
