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

Modules: ``sources`` (local / URL / sharded byte streams), ``index`` (the ``.idx`` format),
``dataset`` (``IndexedDataset``), ``writers`` (atomic writers); this package re-exports them.
"""

from pythia_jax.data.indexed.dataset import IndexedDataset
from pythia_jax.data.indexed.index import (
    DTYPE_CODES,
    DTYPES,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Index,
    _write_index_file,
    dtype_code,
)
from pythia_jax.data.indexed.sources import (
    _SHARD_RE,
    ByteSource,
    KvStoreFile,
    LocalFile,
    ShardedStream,
    _find_shards,
    _split_url,
    _ts_context,
    open_byte_source,
    open_kvstore,
)
from pythia_jax.data.indexed.writers import (
    IndexedDatasetWriter,
    _atomic_path,
    check_dataset_output,
    publish,
    publish_together,
    save_npy_atomic,
    save_npys_together,
    write_index,
    write_indexed_dataset,
)
from pythia_jax.io_utils import is_url
