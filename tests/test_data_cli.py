"""`pythia-jax preprocess`, `preshuffle` and `batches` through pythia_jax.cli.main."""

import gzip
import json
import os

import numpy as np
import pytest

from pythia_jax.cli import main
from pythia_jax.data.indexed import IndexedDataset, write_indexed_dataset
from pythia_jax.data.orders import open_order
from pythia_jax.data.tokenizer import encode

TEXTS = ["Hello, I am a document.", "", "Second doc\nwith a newline and ünïcödé.",
         "He said she would come.", "x" * 3000, "Last one."]


def _write_jsonl(path, texts, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "meta": {"src": "test"}}) + "\n")


@pytest.mark.parametrize("ext", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_preprocess_matches_gpt_neox_encoding(tmp_path, ext, capsys):
    path = str(tmp_path / f"in.{ext}")
    if ext.endswith("gz"):
        _write_jsonl(path, TEXTS, gzip.open)
    elif ext.endswith("zst"):
        import zstandard
        data = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
        open(path, "wb").write(zstandard.ZstdCompressor().compress(data))
    else:
        _write_jsonl(path, TEXTS)
    workers = 2 if ext == "jsonl" else 1
    assert main(["preprocess", "--input", path, "--output-prefix", str(tmp_path / "out"),
                 "--workers", str(workers)]) == 0
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    kept = [t for t in TEXTS if t]  # GPT-NeoX's reader drops empty documents
    assert len(ds) == len(kept) and ds.dtype == np.uint16
    np.testing.assert_array_equal(ds.doc_idx, np.arange(len(kept) + 1))
    for i, t in enumerate(kept):
        np.testing.assert_array_equal(ds[i], encode(t) + [0])
    assert "documents" in capsys.readouterr().out


def test_preprocess_bad_input(tmp_path, capsys):
    assert main(["preprocess", "--input", str(tmp_path / "none.jsonl"),
                 "--output-prefix", str(tmp_path / "o")]) == 2
    assert "none.jsonl: input file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    assert main(["preprocess", "--input", str(bad), "--output-prefix", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o_")]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(1)
    docs = [rng.integers(2, 50000, size=int(n)).astype(np.uint16) for n in rng.integers(1, 90, 200)]
    return write_indexed_dataset(str(d / "raw_text_document"), docs)


SEQ, B, ITERS = 16, 4, 30
COMMON = ["--batch-size", str(B), "--seq-len", str(SEQ), "--seed", "1234",
          "--train-iters", str(ITERS)]


def test_batches_neox_and_preshuffled_and_off_by_one(raw, tmp_path):
    order = open_order(raw, "neox", seq_len=SEQ, seed=1234, train_iters=ITERS, global_batch=B)
    out = str(tmp_path / "b.npy")
    assert main(["batches", "--data", raw, "--order", "neox", "--start", "3", "--end", "5",
                 "--out", out] + COMMON) == 0
    got = np.load(out)
    assert got.dtype == np.uint16 and got.shape == (3 * B, SEQ + 1)  # steps 3,4,5 inclusive
    np.testing.assert_array_equal(got, order.read_rows(3 * B, 6 * B))

    pre = str(tmp_path / "pre" / "document")
    assert main(["preshuffle", "--data", raw, "--out", pre, "--shards", "3"] + COMMON) == 0
    assert sorted(os.listdir(tmp_path / "pre")) == [
        "document-00000-of-00002.bin", "document-00001-of-00002.bin",
        "document-00002-of-00002.bin", "document.idx"]
    out2 = str(tmp_path / "p.npy")
    assert main(["batches", "--data", pre, "--order", "preshuffled", "--start", "3", "--end", "5",
                 "--out", out2] + COMMON) == 0
    np.testing.assert_array_equal(np.load(out2), got)
    # The last step is a full batch (the old viewer's stray-row bug is not reproduced).
    out3 = str(tmp_path / "last.npy")
    assert main(["batches", "--data", pre, "--order", "preshuffled", "--start", str(ITERS - 1),
                 "--end", str(ITERS - 1), "--out", out3] + COMMON) == 0
    np.testing.assert_array_equal(np.load(out3), order.read_rows((ITERS - 1) * B, ITERS * B))


def test_batches_printing_and_decoding(raw, tmp_path, capsys):
    assert main(["batches", "--data", raw, "--order", "neox", "--start", "0", "--end", "0",
                 "--rows", "2"] + COMMON) == 0
    out = capsys.readouterr().out
    assert "step 0 row 0:" in out and "step 0 row 1:" in out and "row 2" not in out
    texts = ["The quick brown fox.", "Jumps over the lazy dog."] * 20
    prefix = write_indexed_dataset(str(tmp_path / "txt"), [encode(t) + [0] for t in texts])
    assert main(["batches", "--data", prefix, "--order", "neox", "--start", "1", "--end", "1",
                 "--decode", "--batch-size", "2", "--seq-len", "8", "--train-iters", "3"]) == 0
    out = capsys.readouterr().out
    assert "=== step 1 row 2 ===" in out and "=== step 1 row 3 ===" in out
    assert "fox" in out or "dog" in out or "<|endoftext|>" in out


def test_batches_errors(raw, tmp_path, capsys):
    assert main(["batches", "--data", raw, "--order", "neox", "--start", "0", "--end", "10000",
                 "--out", str(tmp_path / "x.npy")] + COMMON) == 2
    err = capsys.readouterr().err
    assert "raw_text_document: steps 0..10000 need rows [0, 40004), the neox order has" in err
    assert not (tmp_path / "x.npy").exists()
    pre = str(tmp_path / "pre2")
    assert main(["preshuffle", "--data", raw, "--out", pre] + COMMON) == 0
    assert main(["batches", "--data", pre, "--order", "preshuffled", "--start", "0", "--end", "0",
                 "--batch-size", str(B), "--seq-len", "2048"]) == 2
    assert "pre2.idx: pre-shuffled rows have 17 tokens but seq_len 2048" in capsys.readouterr().err
    assert main(["batches", "--data", str(tmp_path / "missing"), "--start", "0", "--end", "0"]) == 2
    assert "missing.idx: file not found" in capsys.readouterr().err
