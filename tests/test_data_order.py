"""GPT-NeoX order: the vectorised maps against slow references written from the spec."""

import os

import numpy as np
import pytest

from pythia_jax.data.indexed import IndexedDataset, write_indexed_dataset
from pythia_jax.data.neox_order import (
    build_index_maps,
    index_map_paths,
    load_or_build_index_maps,
    neox_num_epochs,
    neox_num_samples,
)
from pythia_jax.data.orders import NeoxOrder, open_order
from pythia_jax.errors import DataError

# ------------------------------------------------------------------ references (plain loops)


def ref_epochs(tokens_per_epoch, seq_len, num_samples):
    """GPT-NeoX v1.0 ``megatron/data/gpt2_dataset.py::_num_epochs``: add epochs until enough samples."""
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq_len >= num_samples:
            return epochs


def ref_sample_idx(sizes, doc_idx, seq_len, num_epochs, tokens_per_epoch):
    """The C++ build_sample_idx loop, literally."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_len
    out = [(0, 0)]
    doc_pos, doc_offset = 0, 0
    while len(out) <= num_samples:
        remaining = seq_len + 1
        while remaining != 0:
            doc_length = int(sizes[doc_idx[doc_pos]]) - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_pos += 1
                doc_offset = 0
        out.append((doc_pos, doc_offset))
    return np.array(out, dtype=np.int64)


def ref_rows(docs, num_samples, seq_len, seed):
    """Training rows straight from the spec: stream of shuffled documents, shuffled samples."""
    sizes = [len(d) for d in docs]
    tokens = sum(sizes)
    epochs = ref_epochs(tokens, seq_len, num_samples)
    rng = np.random.RandomState(seed)
    doc_idx = np.array([i for _ in range(epochs) for i in range(len(docs))], dtype=np.int32)
    rng.shuffle(doc_idx)
    stream = []
    for i in doc_idx:
        stream.extend(int(t) for t in docs[i])
    n_samples = (epochs * tokens - 1) // seq_len
    shuffle_idx = np.arange(n_samples, dtype=np.uint32)
    rng.shuffle(shuffle_idx)
    rows = []
    for j in range(n_samples - 1):  # GPT2Dataset's length is S - 1
        s = int(shuffle_idx[j])
        rows.append(stream[s * seq_len: s * seq_len + seq_len + 1])
    return epochs, doc_idx, shuffle_idx, np.array(rows, dtype=np.int64).reshape(-1, seq_len + 1)


def random_corpus(rng, n_docs, max_len, min_len=1):
    lens = rng.integers(min_len, max_len + 1, size=n_docs)
    return [rng.integers(0, 50277, size=int(n)).astype(np.uint16) for n in lens]


CASES = [
    # (n_docs, min_len, max_len, seq_len, train_iters, batch, seed)
    (50, 1, 40, 8, 20, 4, 1),            # many docs shorter than a sample
    (30, 1, 3000, 64, 10, 8, 1234),      # documents of 1..thousands of tokens
    (200, 1, 5, 16, 10, 8, 7),           # tiny docs: several epochs
    (5, 1, 10, 32, 4, 4, 3),             # tokens < seq_len: many epochs
    (1, 1, 1, 2, 3, 1, 0),               # one 1-token document
    (40, 100, 2000, 128, 7, 16, 42),
    (120, 1, 400, 31, 9, 5, 99),         # odd sequence length
    (10, 2047, 2049, 2048, 2, 2, 1234),  # Pythia's seq_len, docs near a sample
]


@pytest.mark.parametrize("case", CASES)
def test_order_matches_spec(tmp_path, case):
    n_docs, lo, hi, seq_len, iters, batch, seed = case
    rng = np.random.default_rng(hash(case) % 2**32)
    docs = random_corpus(rng, n_docs, hi, lo)
    prefix = write_indexed_dataset(str(tmp_path / "c"), docs)
    ds = IndexedDataset(prefix)
    ns = neox_num_samples(iters, batch)
    epochs, ref_doc_idx, ref_shuffle, rows = ref_rows(docs, ns, seq_len, seed)
    maps = build_index_maps(ds.sizes, ns, seq_len, seed)
    assert maps.doc_idx.dtype == np.int32 and maps.shuffle_idx.dtype == np.uint32
    assert maps.sample_idx.dtype == np.int32 and maps.sample_idx.shape[1] == 2
    np.testing.assert_array_equal(maps.doc_idx, ref_doc_idx)
    np.testing.assert_array_equal(maps.shuffle_idx, ref_shuffle)
    tokens = int(ds.sizes.sum())
    np.testing.assert_array_equal(maps.sample_idx,
                                  ref_sample_idx(ds.sizes, maps.doc_idx, seq_len, epochs, tokens))
    order = NeoxOrder(ds, seq_len, maps)
    assert len(order) == len(rows) >= ns - 1
    np.testing.assert_array_equal(order.read_rows(0, len(order)), rows)
    pick = rng.integers(0, len(order), size=min(50, len(order)))
    np.testing.assert_array_equal(order.read_row_indices(pick), rows[pick])


def test_many_random_corpora(tmp_path):
    """Many small random corpora, 1..5+ epochs, several seeds and sequence lengths."""
    rng = np.random.default_rng(2024)
    epochs_seen = set()
    for k in range(40):
        docs = random_corpus(rng, int(rng.integers(1, 60)), int(rng.integers(1, 300)))
        seq_len = int(rng.choice([2, 3, 8, 17, 64]))
        iters, batch, seed = int(rng.integers(1, 12)), int(rng.integers(1, 9)), int(rng.integers(0, 10**6))
        prefix = write_indexed_dataset(str(tmp_path / f"r{k}"), docs)
        ds = IndexedDataset(prefix)
        ns = neox_num_samples(iters, batch)
        epochs, _, _, rows = ref_rows(docs, ns, seq_len, seed)
        epochs_seen.add(min(epochs, 3))
        order = NeoxOrder(ds, seq_len, build_index_maps(ds.sizes, ns, seq_len, seed))
        np.testing.assert_array_equal(order.read_rows(0, len(order)), rows)
    assert epochs_seen == {1, 2, 3}


def test_zero_length_items_follow_the_cpp_convention(tmp_path):
    """Empty items (possible in hand-made data) are skipped exactly like the C++ loop does."""
    rng = np.random.default_rng(11)
    docs = [d if k % 3 else d[:0] for k, d in enumerate(random_corpus(rng, 60, 30))]
    docs[0] = docs[0][:0]
    prefix = write_indexed_dataset(str(tmp_path / "z"), docs)
    ds = IndexedDataset(prefix)
    for seed in range(5):
        ns = neox_num_samples(6, 4)
        epochs, _, _, rows = ref_rows(docs, ns, 16, seed)
        maps = build_index_maps(ds.sizes, ns, 16, seed)
        np.testing.assert_array_equal(
            maps.sample_idx, ref_sample_idx(ds.sizes, maps.doc_idx, 16, epochs, int(ds.sizes.sum())))
        np.testing.assert_array_equal(NeoxOrder(ds, 16, maps).read_rows(0, len(rows)), rows)


def test_pythia_constants():
    assert neox_num_samples(143000, 1024) == 147_164_160
    # The standard Pile: one epoch; two when the epoch has fewer tokens than needed.
    need = 147_164_160 * 2048
    assert neox_num_epochs(need + 1, 2048, 147_164_160) == 1
    assert neox_num_epochs(need, 2048, 147_164_160) == 2
    for t, sl, ns in [(7, 2048, 100), (1, 2, 5), (5000, 64, 3), (10**6, 2048, 1)]:
        assert neox_num_epochs(t, sl, ns) == ref_epochs(t, sl, ns)


def test_cache_files_use_gpt_neox_names_and_published_maps_are_used(tmp_path):
    rng = np.random.default_rng(0)
    docs = random_corpus(rng, 40, 200)
    prefix = write_indexed_dataset(str(tmp_path / "pile_text_document"), docs)
    ds = IndexedDataset(prefix)
    ns = neox_num_samples(10, 8)
    paths = index_map_paths(prefix, ns, 32, 1234)
    assert os.path.basename(paths["doc_idx"]) == (
        f"pile_text_document_train_0_indexmap_{ns}ns_32sl_1234s_doc_idx.npy")
    built = load_or_build_index_maps(prefix, ds.sizes, ns, 32, 1234)
    assert all(os.path.isfile(p) for p in paths.values())
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # "Published" maps dropped in place are used as they are (here: a different shuffle).
    np.save(paths["shuffle_idx"], built.shuffle_idx[::-1].copy())
    loaded = load_or_build_index_maps(prefix, ds.sizes, ns, 32, 1234)
    np.testing.assert_array_equal(loaded.shuffle_idx, built.shuffle_idx[::-1])
    order = open_order(prefix, "neox", seq_len=32, seed=1234, train_iters=10, global_batch=8)
    s = len(built.shuffle_idx)
    np.testing.assert_array_equal(order.read_rows(1, 2),
                                  NeoxOrder(ds, 32, built).read_row_indices(np.array([s - 2])))
    # Maps that don't fit the dataset are refused with the file named.
    np.save(paths["sample_idx"], built.sample_idx[:-1].copy())
    with pytest.raises(DataError, match=r"indexmap.*sample_idx has shape"):
        load_or_build_index_maps(prefix, ds.sizes, ns, 32, 1234)


def test_rows_beyond_the_order(tmp_path):
    docs = random_corpus(np.random.default_rng(1), 10, 50)
    prefix = write_indexed_dataset(str(tmp_path / "small"), docs)
    order = open_order(prefix, "neox", seq_len=16, seed=1, train_iters=2, global_batch=2)
    with pytest.raises(DataError, match=r"small.*beyond the dataset"):
        order.read_rows(len(order) - 1, len(order) + 1)
    with pytest.raises(DataError, match=rf"small.*rows up to {len(order)} requested, "
                                        rf"the GPT-NeoX order has {len(order)} rows of 17 tokens"):
        order.read_row_indices(np.array([0, len(order)]))


def test_neox_order_over_tensorstore_memory_driver(tmp_path):
    """The same rows from a local file and from a tensorstore memory:// copy (byte-range reads)."""
    from pythia_jax.data.indexed import open_kvstore
    rng = np.random.default_rng(8)
    docs = random_corpus(rng, 60, 500)
    prefix = write_indexed_dataset(str(tmp_path / "ts_text_document"), docs)
    kv = open_kvstore("memory://order_ts/")
    for ext in (".bin", ".idx"):
        kv.write("ts_text_document" + ext, open(prefix + ext, "rb").read()).result()
    local = open_order(prefix, "neox", seq_len=64, seed=5, train_iters=6, global_batch=8)
    remote = open_order("memory://order_ts/ts_text_document", "neox", seq_len=64, seed=5,
                        train_iters=6, global_batch=8, cache=False)
    np.testing.assert_array_equal(remote.read_rows(0, len(remote)), local.read_rows(0, len(local)))


@pytest.mark.parametrize("chunk", [1, 2, 7, 64])
def test_sample_idx_across_chunk_edges(tmp_path, monkeypatch, chunk):
    """The chunked vectorised build equals the C++ loop when samples straddle chunk edges."""
    from pythia_jax.data import neox_order
    monkeypatch.setattr(neox_order, "_CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    docs = random_corpus(rng, 90, 80)
    docs[10] = docs[10][:0]  # an empty item too
    prefix = write_indexed_dataset(str(tmp_path / "chunks"), docs)
    ds = IndexedDataset(prefix)
    for seq_len, iters in ((8, 30), (33, 4), (300, 2)):
        ns = neox_num_samples(iters, 4)
        epochs, _, _, rows = ref_rows(docs, ns, seq_len, 17)
        maps = neox_order.build_index_maps(ds.sizes, ns, seq_len, 17)
        np.testing.assert_array_equal(
            maps.sample_idx,
            ref_sample_idx(ds.sizes, maps.doc_idx, seq_len, epochs, int(ds.sizes.sum())))
        np.testing.assert_array_equal(NeoxOrder(ds, seq_len, maps).read_rows(0, len(rows)), rows)


# ------------------------------------------------------------------ 32-bit limits and huge builds


def test_sample_idx_widens_when_positions_pass_int32(tmp_path, monkeypatch):
    """Positions in doc_idx past the int32 range go into an int64 sample_idx with exact values
    (the limit lowered to 50 so a small corpus crosses it); below it the maps stay int32."""
    from pythia_jax.data import neox_order
    rng = np.random.default_rng(5)
    docs = random_corpus(rng, 12, 6)
    prefix = write_indexed_dataset(str(tmp_path / "wide"), docs)
    ds = IndexedDataset(prefix)
    ns = neox_num_samples(10, 4)
    epochs, _, _, rows = ref_rows(docs, ns, 8, 3)
    assert epochs * len(docs) > 51  # doc_idx positions beyond the lowered limit
    narrow = build_index_maps(ds.sizes, ns, 8, 3)
    assert narrow.sample_idx.dtype == np.int32
    monkeypatch.setattr(neox_order, "_INT32_MAX", 50)
    wide = build_index_maps(ds.sizes, ns, 8, 3)
    assert wide.sample_idx.dtype == np.int64 and wide.doc_idx.dtype == np.int32  # 12 item ids fit
    assert int(wide.sample_idx[:, 0].max()) > 50
    np.testing.assert_array_equal(wide.sample_idx, narrow.sample_idx)
    np.testing.assert_array_equal(
        wide.sample_idx, ref_sample_idx(ds.sizes, wide.doc_idx, 8, epochs, int(ds.sizes.sum())))
    np.testing.assert_array_equal(NeoxOrder(ds, 8, wide).read_rows(0, len(rows)), rows)


def test_index_dtypes_at_the_real_int32_boundary():
    from pythia_jax.data import neox_order
    big = 2 ** 31
    assert neox_order.sample_idx_dtype(10, big) == np.int32       # last position 2^31 - 1 fits
    assert neox_order.sample_idx_dtype(10, big + 1) == np.int64   # position 2^31 does not
    assert neox_order.sample_idx_dtype(2 ** 30 - 1, 10) == np.int64  # GPT-NeoX's own 2(S+1) rule
    assert neox_order.sample_idx_dtype(2 ** 30 - 2, 10) == np.int32
    assert neox_order.doc_idx_dtype(big) == np.int32 and neox_order.doc_idx_dtype(big + 1) == np.int64
    # the chunk arithmetic in int64 for a chunk starting past 2^31 (no 2^31-entry array needed)
    lens = np.array([5, 0, 7, 3], np.int64)  # items at positions 2^31+5 .. 2^31+8 (one empty)
    base = 3 * 2 ** 32  # stream tokens before the chunk
    ends = np.cumsum(lens) + base
    pos, off = neox_order._sample_rows(ends, lens, base // 4, (base + 14) // 4, 4, big + 5)
    # sample tokens base, +4, +8, +12: item 0 at 0 and 4, item 2 at 3, item 3 at 0
    np.testing.assert_array_equal(pos, [big + 5, big + 5, big + 7, big + 8])
    np.testing.assert_array_equal(off, [0, 4, 3, 0])
    assert pos.dtype == np.int64 and off.dtype == np.int64


def _bundled_scale_sizes():
    """Sizes like the bundled Wikipedia set: 2,791 items, 339,766 tokens."""
    sizes = np.full(2791, 121, np.int32)
    sizes[:2055] += 1
    assert int(sizes.sum()) == 339_766
    return sizes


def test_plan_of_pythia_settings_on_a_small_dataset():
    """Default Pythia settings on the bundled data: ~887,000 epochs, doc_idx past 2^31 (so a
    64-bit sample_idx), ~12.8 GB of maps — sized without allocating."""
    from pythia_jax.data import neox_order
    plan = neox_order.plan_index_maps(_bundled_scale_sizes(), neox_num_samples(143000, 1024), 2048)
    assert plan.num_epochs == 887_059 and plan.doc_idx_len == 887_059 * 2791 > 2 ** 31
    assert plan.sample_idx_dtype == np.int64 and plan.doc_idx_dtype == np.int32
    assert plan.nbytes["doc_idx"] == 4 * plan.doc_idx_len
    assert 12e9 < plan.total_bytes < 13e9
    # the Pile (210,607,728 items, 1 epoch) stays int32 and under the default limit
    pile = neox_order.IndexMapPlan(210_607_728, 300 * 10 ** 9, 2048, 147_164_160, 1, 162_165_686,
                                   np.dtype(np.int32), neox_order.sample_idx_dtype(162_165_686, 210_607_728),
                                   np.dtype(np.uint32))
    assert pile.sample_idx_dtype == np.int32 and pile.total_bytes < neox_order.DEFAULT_LIMIT_GB * 1e9


def test_huge_build_refused_before_it_starts(tmp_path, monkeypatch):
    from pythia_jax.data import neox_order
    sizes = _bundled_scale_sizes()
    ns = neox_num_samples(143000, 1024)

    def no_build(*a, **k):
        raise AssertionError("must not start building")

    monkeypatch.setattr(neox_order, "build_index_maps", no_build)
    monkeypatch.delenv(neox_order.LIMIT_ENV, raising=False)
    with pytest.raises(DataError) as e:
        load_or_build_index_maps(str(tmp_path / "wiki"), sizes, ns, 2048, 1234, train_iters=143000,
                                 global_batch=1024)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("147,164,160 samples of 2048 tokens", "ceil(143000 steps × 1024 rows × 1.005)",
                 "887,059 epochs", "12.8 GB", "over the 8.0 GB limit", "--train-iters",
                 "TrainConfig.num_steps", neox_order.LIMIT_ENV, str(tmp_path)):
        assert part in msg, part
    assert not os.listdir(tmp_path)
    # over the free disk even when the limit allows it
    monkeypatch.setenv(neox_order.LIMIT_ENV, "inf")
    monkeypatch.setattr(neox_order, "_free_bytes", lambda path: 10 ** 9)
    with pytest.raises(DataError, match=r"over the 1\.0 GB free there.*and free disk space"):
        load_or_build_index_maps(str(tmp_path / "wiki"), sizes, ns, 2048, 1234)
    monkeypatch.setenv(neox_order.LIMIT_ENV, "lots")
    with pytest.raises(DataError, match="PYTHIA_JAX_INDEX_MAP_LIMIT_GB='lots' is not a number"):
        load_or_build_index_maps(str(tmp_path / "wiki"), sizes, ns, 2048, 1234)


def test_limit_override_lets_a_build_run(tmp_path, monkeypatch, caplog):
    """A small limit refuses a small build; the variable raises it; building logs the cache path."""
    import logging

    from pythia_jax.data import neox_order
    docs = random_corpus(np.random.default_rng(2), 30, 50)
    prefix = write_indexed_dataset(str(tmp_path / "lim"), docs)
    ds = IndexedDataset(prefix)
    ns = neox_num_samples(5, 4)
    monkeypatch.setenv(neox_order.LIMIT_ENV, "1e-9")  # 1 byte
    with pytest.raises(DataError, match="over the 0.0 MB limit"):
        load_or_build_index_maps(prefix, ds.sizes, ns, 16, 1)
    monkeypatch.setenv(neox_order.LIMIT_ENV, "1")
    with caplog.at_level(logging.INFO, logger="pythia_jax.data.neox_order"):
        maps = load_or_build_index_maps(prefix, ds.sizes, ns, 16, 1, verbose=True)
    text = caplog.text
    assert "building GPT-NeoX index maps" in text and f"cached at {prefix}_train_0_indexmap" in text
    assert "index maps written to" in text
    np.testing.assert_array_equal(maps.doc_idx, build_index_maps(ds.sizes, ns, 16, 1).doc_idx)


def test_wrapped_int32_maps_are_refused(tmp_path):
    """Maps written with wrapped int32 positions (by an older build or GPT-NeoX's helper past
    2^31) are refused with a clear message instead of a numpy traceback."""
    rng = np.random.default_rng(4)
    docs = random_corpus(rng, 20, 40)
    prefix = write_indexed_dataset(str(tmp_path / "wrap"), docs)
    ds = IndexedDataset(prefix)
    ns = neox_num_samples(6, 4)
    maps = build_index_maps(ds.sizes, ns, 8, 1)
    wrapped = maps.sample_idx.copy()
    wrapped[-3:, 0] = (wrapped[-3:, 0].astype(np.int64) + 2 ** 32 - 2 ** 31 - 5).astype(np.int32)
    assert wrapped[-1, 0] < 0
    bad = type(maps)(maps.doc_idx, wrapped, maps.shuffle_idx)
    last_sample = len(wrapped) - 2
    with pytest.raises(DataError, match=r"index maps are corrupt: sample .* wrapped past 2\^31"):
        bad.sample_segments(np.array([0, last_sample]), ds.sizes)
    paths = index_map_paths(prefix, ns, 8, 1)
    for k, a in (("doc_idx", maps.doc_idx), ("sample_idx", wrapped), ("shuffle_idx", maps.shuffle_idx)):
        np.save(paths[k], a)
    with pytest.raises(DataError, match=r"last position -\d+ is outside doc_idx.*wrapped"):
        load_or_build_index_maps(prefix, ds.sizes, ns, 8, 1)


def test_maps_of_replaced_data_are_removed_or_refused(tmp_path, caplog):
    """Re-tokenizing a dataset in place left the index maps built for the old data beside it; they
    were read for the new data (a numpy traceback, or rows of the wrong length). Replacing a
    dataset now removes them (with a warning), and maps of other data that are still found (copied
    in by hand) fail a spot check naming what to delete."""
    import logging

    rng = np.random.default_rng(3)
    docs = random_corpus(rng, 60, 120)
    prefix = write_indexed_dataset(str(tmp_path / "w1"), docs)
    ns = neox_num_samples(12, 4)
    built = load_or_build_index_maps(prefix, IndexedDataset(prefix).sizes, ns, 16, 1234)
    paths = index_map_paths(prefix, ns, 16, 1234)
    assert all(os.path.isfile(p) for p in paths.values())
    saved = {k: np.load(p) for k, p in paths.items()}
    sibling = write_indexed_dataset(str(tmp_path / "w1_small"), docs[:30])  # its prefix starts with w1's
    load_or_build_index_maps(sibling, IndexedDataset(sibling).sizes, ns, 16, 1234)
    kept = index_map_paths(sibling, ns, 16, 1234)
    write_indexed_dataset(prefix, docs)  # the same data again: its maps still fit, they stay
    assert all(os.path.exists(p) for p in paths.values())
    with caplog.at_level(logging.WARNING):
        write_indexed_dataset(prefix, docs[::-1])  # the same documents in reverse order
    assert not any(os.path.exists(p) for p in paths.values())
    assert all(os.path.exists(p) for p in kept.values())  # another dataset's maps are not touched
    assert "replaced the dataset at" in caplog.text and "removed 3 index map file(s)" in caplog.text
    for k, p in paths.items():  # the old maps put back by hand: refused, not read
        np.save(p, saved[k])
    with pytest.raises(DataError, match=r"sampled rows start beyond the end of their document: the maps were built "
                                        r"for other data .*delete them to rebuild them"):
        load_or_build_index_maps(prefix, IndexedDataset(prefix).sizes, ns, 16, 1234)
    assert built.doc_idx.shape == saved["doc_idx"].shape
