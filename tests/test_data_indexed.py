"""MMapIndexedDataset I/O: round trips, an independent spec writer, bad files, tensorstore, shards."""

import os
import struct

import numpy as np
import pytest

from pythia_jax.data.indexed import DTYPES, IndexedDataset, IndexedDatasetWriter, write_indexed_dataset
from pythia_jax.errors import DataError

# The dtype codes of GPT-NeoX v1.0 megatron/data/indexed_dataset.py (``dtypes``), restated here
# independently of the package.
SPEC_CODES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f4", 7: "<f8", 8: "<u2"}


def spec_write(prefix, docs, code, *, magic=b"MMIDIDX\x00\x00", version=1, extra_idx=b"",
               doc_idx=None):
    """Minimal writer straight from the spec, with struct.pack (not the package's writer)."""
    dt = np.dtype(SPEC_CODES[code])
    sizes = [len(d) for d in docs]
    pointers, pos = [], 0
    for n in sizes:
        pointers.append(pos)
        pos += n * dt.itemsize
    doc_idx = list(range(len(docs) + 1)) if doc_idx is None else doc_idx
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=dt).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(magic)
        f.write(struct.pack("<Q", version))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))
        f.write(extra_idx)


def random_docs(rng, n, dtype, max_len=300):
    dt = np.dtype(dtype)
    out = []
    for _ in range(n):
        k = int(rng.integers(0, max_len))
        if dt.kind == "f":
            out.append(rng.standard_normal(k).astype(dt))
        else:
            info = np.iinfo(dt)
            out.append(rng.integers(max(info.min, -10**6), min(info.max, 10**6), size=k,
                                    endpoint=True).astype(dt))
    return out


@pytest.mark.parametrize("code", sorted(SPEC_CODES))
def test_reads_spec_files_every_dtype(tmp_path, code):
    rng = np.random.default_rng(code)
    docs = random_docs(rng, 40, SPEC_CODES[code])
    prefix = str(tmp_path / "spec")
    spec_write(prefix, docs, code)
    ds = IndexedDataset(prefix)
    assert len(ds) == 40
    assert ds.dtype == np.dtype(SPEC_CODES[code])
    np.testing.assert_array_equal(ds.doc_idx, np.arange(41))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
        if len(d) > 3:
            np.testing.assert_array_equal(ds.get(i, offset=1, length=2), d[1:3])
            np.testing.assert_array_equal(ds.get(i, offset=2), d[2:])
    np.testing.assert_array_equal(ds.read_items(5, 12), np.concatenate(docs[5:12]))


@pytest.mark.parametrize("code", sorted(SPEC_CODES))
def test_writer_is_byte_identical_to_spec(tmp_path, code):
    rng = np.random.default_rng(100 + code)
    docs = random_docs(rng, 25, SPEC_CODES[code])
    spec_write(str(tmp_path / "a"), docs, code)
    write_indexed_dataset(str(tmp_path / "b"), docs, dtype=DTYPES[code])
    for ext in (".bin", ".idx"):
        assert (tmp_path / ("a" + ext)).read_bytes() == (tmp_path / ("b" + ext)).read_bytes()
    ds = IndexedDataset(str(tmp_path / "b"), check_index=True)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)


def test_writer_items_and_documents(tmp_path):
    prefix = str(tmp_path / "multi")
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_item([1, 2, 3])
        w.add_item([4])
        w.end_document()
        w.add_item([5, 6])
        w.end_document()
    ds = IndexedDataset(prefix)
    np.testing.assert_array_equal(ds.doc_idx, [0, 2, 3])
    np.testing.assert_array_equal(ds.sizes, [3, 1, 2])
    np.testing.assert_array_equal(ds.pointers, [0, 12, 16])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_writer_abort_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "aborted")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_gather_many_slices(tmp_path):
    rng = np.random.default_rng(7)
    docs = random_docs(rng, 30, np.uint16)
    prefix = write_indexed_dataset(str(tmp_path / "g"), docs)
    ds = IndexedDataset(prefix)
    items, starts, lengths, expected = [], [], [], []
    for _ in range(200):
        i = int(rng.integers(0, 30))
        a = int(rng.integers(0, len(docs[i]) + 1))
        b = int(rng.integers(a, len(docs[i]) + 1))
        items.append(i), starts.append(a), lengths.append(b - a), expected.append(docs[i][a:b])
    np.testing.assert_array_equal(ds.gather(np.array(items), np.array(starts), np.array(lengths)),
                                  np.concatenate(expected))


# ---------------------------------------------------------------- bad input


def _good(tmp_path, name="bad"):
    prefix = str(tmp_path / name)
    spec_write(prefix, [np.arange(5), np.arange(7), np.arange(3)], 8)
    return prefix


def test_truncated_bin(tmp_path):
    prefix = _good(tmp_path)
    data = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(data[:-3])
    with pytest.raises(DataError, match=r"bad\.bin.*truncated"):
        IndexedDataset(prefix)


def test_bin_longer_than_index(tmp_path):
    prefix = _good(tmp_path)
    open(prefix + ".bin", "ab").write(b"\x00\x00")
    with pytest.raises(DataError, match=r"bad\.bin.*does not match"):
        IndexedDataset(prefix)


def test_wrong_magic(tmp_path):
    prefix = str(tmp_path / "bad")
    spec_write(prefix, [np.arange(5)], 8, magic=b"TNTIDX\x00\x00\x00")
    with pytest.raises(DataError, match=r"bad\.idx.*magic"):
        IndexedDataset(prefix)


def test_wrong_version(tmp_path):
    prefix = str(tmp_path / "bad")
    spec_write(prefix, [np.arange(5)], 8, version=2)
    with pytest.raises(DataError, match=r"bad\.idx.*version 2"):
        IndexedDataset(prefix)


def test_wrong_dtype_code(tmp_path):
    prefix = _good(tmp_path)
    raw = bytearray(open(prefix + ".idx", "rb").read())
    raw[17] = 9
    open(prefix + ".idx", "wb").write(bytes(raw))
    with pytest.raises(DataError, match=r"bad\.idx.*dtype code 9"):
        IndexedDataset(prefix)


def test_inconsistent_sizes(tmp_path):
    prefix = str(tmp_path / "bad")
    spec_write(prefix, [np.arange(5), np.arange(2)], 8, extra_idx=b"\x00" * 8)
    with pytest.raises(DataError, match=r"bad\.idx.*inconsistent.*2 items"):
        IndexedDataset(prefix)
    prefix = _good(tmp_path, "bad2")
    raw = bytearray(open(prefix + ".idx", "rb").read())
    raw[18:26] = struct.pack("<Q", 4)  # claims 4 items
    open(prefix + ".idx", "wb").write(bytes(raw))
    with pytest.raises(DataError, match=r"bad2\.idx.*inconsistent"):
        IndexedDataset(prefix)


def test_truncated_idx_and_bad_pointers(tmp_path):
    prefix = _good(tmp_path)
    raw = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(raw[:20])
    with pytest.raises(DataError, match=r"bad\.idx.*truncated"):
        IndexedDataset(prefix)
    prefix = _good(tmp_path, "ptr")
    raw = bytearray(open(prefix + ".idx", "rb").read())
    off = 34 + 4 * 3 + 8  # pointers[1]
    raw[off:off + 8] = struct.pack("<q", 4)
    open(prefix + ".idx", "wb").write(bytes(raw))
    with pytest.raises(DataError, match=r"ptr\.idx.*pointers\[1\]"):
        IndexedDataset(prefix, check_index=True)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.idx.*not found"):
        IndexedDataset(str(tmp_path / "nothere"))
    prefix = _good(tmp_path)
    os.remove(prefix + ".bin")
    with pytest.raises(DataError, match=r"bad\.bin.*not found"):
        IndexedDataset(prefix)


# ---------------------------------------------------------------- tensorstore and shards


def test_tensorstore_file_driver(tmp_path):
    rng = np.random.default_rng(3)
    docs = random_docs(rng, 20, np.uint16)
    spec_write(str(tmp_path / "ts"), docs, 8)
    ds = IndexedDataset(f"file://{tmp_path}/ts")
    assert len(ds) == 20
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.read_items(3, 9), np.concatenate(docs[3:9]))


def _memory_put(url_dir, files):
    from pythia_jax.data.indexed import open_kvstore
    kv = open_kvstore(url_dir)
    for name, data in files.items():
        kv.write(name, data).result()


def test_tensorstore_memory_driver_and_truncation(tmp_path):
    rng = np.random.default_rng(4)
    docs = random_docs(rng, 15, np.uint16)
    spec_write(str(tmp_path / "m"), docs, 8)
    idx, bin_ = (tmp_path / "m.idx").read_bytes(), (tmp_path / "m.bin").read_bytes()
    _memory_put("memory://mem_ok/", {"m.idx": idx, "m.bin": bin_})
    ds = IndexedDataset("memory://mem_ok/m")
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    _memory_put("memory://mem_bad/", {"m.idx": idx, "m.bin": bin_[:-1]})
    with pytest.raises(DataError, match=r"memory://mem_bad/m\.bin.*truncated"):
        IndexedDataset("memory://mem_bad/m")
    _memory_put("memory://mem_magic/", {"m.idx": b"XXXXXXXXX" + idx[9:], "m.bin": bin_})
    with pytest.raises(DataError, match=r"memory://mem_magic/m\.idx.*magic"):
        IndexedDataset("memory://mem_magic/m")


def _shard_files(data: bytes, cuts):
    edges = [0] + list(cuts) + [len(data)]
    return [data[a:b] for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_sharded_stream_rows_straddle_edges(tmp_path, where):
    """Pre-shuffled-style rows of 17 uint16 tokens, shards cut at odd byte offsets."""
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 50000, size=(50, 17)).astype(np.uint16)
    spec_write(str(tmp_path / "document"), list(rows), 8)
    data = (tmp_path / "document.bin").read_bytes()
    cuts = [33, 34, 35, 700, 1201, 1202]  # odd offsets split tokens, empty-ish shards too
    shards = _shard_files(data, cuts)
    k = len(shards)
    names = {f"document-{i:05d}-of-{k - 1:05d}.bin": s for i, s in enumerate(shards)}
    if where == "local":
        os.remove(tmp_path / "document.bin")
        for name, s in names.items():
            (tmp_path / name).write_bytes(s)
        prefix = str(tmp_path / "document")
    else:
        names["document.idx"] = (tmp_path / "document.idx").read_bytes()
        _memory_put("memory://sharded/", names)
        prefix = "memory://sharded/document"
    ds = IndexedDataset(prefix)
    assert len(ds) == 50
    for j in range(50):
        np.testing.assert_array_equal(ds[j], rows[j])
    np.testing.assert_array_equal(ds.read_items(0, 50).reshape(50, 17), rows)
    np.testing.assert_array_equal(ds.read_items(1, 4).reshape(3, 17), rows[1:4])


def test_sharded_stream_missing_shard(tmp_path):
    rows = np.arange(10 * 5, dtype=np.uint16).reshape(10, 5)
    spec_write(str(tmp_path / "document"), list(rows), 8)
    data = (tmp_path / "document.bin").read_bytes()
    os.remove(tmp_path / "document.bin")
    for i, s in enumerate(_shard_files(data, [30, 60])):
        if i != 1:
            (tmp_path / f"document-{i:05d}-of-00002.bin").write_bytes(s)
    with pytest.raises(DataError, match=r"document.*missing indices \[1\]"):
        IndexedDataset(str(tmp_path / "document"))


def test_pickles_by_path(tmp_path):
    import pickle
    docs = [np.arange(n, dtype=np.uint16) for n in (3, 9, 1)]
    prefix = write_indexed_dataset(str(tmp_path / "p"), docs)
    blob = pickle.dumps(IndexedDataset(prefix))
    assert len(blob) < 500
    np.testing.assert_array_equal(pickle.loads(blob)[1], docs[1])


def test_remote_size_by_bisection(monkeypatch):
    """Drivers whose range errors don't state the size: found with 1-byte range reads."""
    import re

    from pythia_jax.data import indexed
    monkeypatch.setattr(indexed.sources, "_SIZE_RE", re.compile(r"(?!x)x"))  # where KvStoreFile reads it
    for n in (0, 1, 2, 3, 1000, 4097):
        _memory_put("memory://bisect/", {f"f{n}.bin": bytes(range(256)) * (n // 256) + bytes(n % 256)})
        assert indexed.KvStoreFile(f"memory://bisect/f{n}.bin").size == n
    with pytest.raises(DataError, match="nothing.bin: file not found"):
        indexed.KvStoreFile("memory://bisect/nothing.bin")


def test_item_sizes_past_int32_refused_without_wrapping(tmp_path):
    """The .idx format stores item sizes as int32: a larger item is refused by name (before
    anything is written for the writer), never stored wrapped."""
    from pythia_jax.data.indexed import write_index
    huge = np.broadcast_to(np.uint16(7), (2 ** 31,))  # 4 GiB of tokens, no memory
    with IndexedDatasetWriter(str(tmp_path / "huge"), np.uint16) as w:
        with pytest.raises(DataError, match=r"2,147,483,648 tokens does not fit the index's int32 sizes"):
            w.add_item(huge)
        assert os.path.getsize(w._bin_tmp) == 0
    with pytest.raises(DataError, match=r"item sizes must be in \[0, 2,147,483,647\].*got 3\.\.2147483648"):
        write_index(str(tmp_path / "x.idx"), np.uint16, np.array([3, 2 ** 31]), np.array([0, 1, 2]))
    assert not (tmp_path / "x.idx").exists()
