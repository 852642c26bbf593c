"""`pythia-jax preprocess`, `preshuffle` and `batches` through pythia_jax.cli.main."""

import errno
import gzip
import json
import os
import re
import shlex

import numpy as np
import pytest

from pythia_jax.cli import main
from pythia_jax.data.indexed import IndexedDataset, write_indexed_dataset
from pythia_jax.data.orders import open_order
from pythia_jax.data.tokenizer import encode
from pythia_jax.errors import DataError

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
    # a refused run leaves no folder it created (an empty new/sub/ stayed behind)
    assert main(["preprocess", "--input", str(bad), "--output-prefix", str(tmp_path / "new" / "sub" / "o")]) == 2
    assert not (tmp_path / "new").exists()
    # "a.jsonl, b.jsonl" (a space after the comma) names both files
    _write_jsonl(str(tmp_path / "a.jsonl"), TEXTS[:2])
    _write_jsonl(str(tmp_path / "b.jsonl"), TEXTS[2:4])
    assert main(["preprocess", "--input", f"{tmp_path / 'a.jsonl'}, {tmp_path / 'b.jsonl'}",
                 "--output-prefix", str(tmp_path / "ab")]) == 0


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


def test_preshuffle_over_the_other_layout_leaves_only_its_own_data(raw, tmp_path, capsys):
    """Writing a dataset over one of the other layout (one .bin <-> shards, or another shard
    count) removes the replaced dataset's data files: before, the stale seed-7 .bin stayed
    beside the new shards and readers silently used it. A prefix holding both layouts (left
    by hand or an older writer) is refused by readers; shards without an .idx are not replaced."""
    from pythia_jax.data.indexed import IndexedDataset

    def rows(seed):
        order = open_order(raw, "neox", seq_len=SEQ, seed=seed, train_iters=ITERS, global_batch=B)
        return order.read_rows(0, ITERS * B)

    pre = str(tmp_path / "pre" / "document")
    common = [c if c != "1234" else "7" for c in COMMON]
    for layout, seed, args in [("one", 7, common), ("sharded", 1234, COMMON + ["--shards", "3"]),
                               ("sharded", 7, common + ["--shards", "2"]), ("one", 1234, COMMON)]:
        assert main(["preshuffle", "--data", raw, "--out", pre] + args) == 0
        names = sorted(os.listdir(tmp_path / "pre"))
        expected = (["document.bin", "document.idx"] if layout == "one" else
                    [f"document-0000{k}-of-0000{int(args[-1]) - 1}.bin" for k in range(int(args[-1]))]
                    + ["document.idx"])
        assert names == expected, (layout, seed, names)
        got = IndexedDataset(pre)
        np.testing.assert_array_equal(np.stack([got[i] for i in range(len(got))]), rows(seed))
    assert "removing" in capsys.readouterr().err

    (tmp_path / "pre" / "document-00000-of-00000.bin").write_bytes(b"\0" * 8)  # both layouts now
    with pytest.raises(DataError, match="both document.bin and 1 shard file"):
        IndexedDataset(pre)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "d-00000-of-00000.bin").write_bytes(b"\0" * 8)
    assert main(["preshuffle", "--data", raw, "--out", str(stray / "d")] + COMMON) == 2
    assert "without a" in capsys.readouterr().err and sorted(os.listdir(stray)) == ["d-00000-of-00000.bin"]


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


def test_batches_refuses_flags_it_would_ignore(raw, tmp_path, capsys):
    """--decode and --rows only shape what is printed, --step only picks the record of
    --checkpoints, --transform-steps/--transform-param belong to --transform: given where they
    would do nothing, each is one line, before anything is written."""
    out = tmp_path / "x.npy"
    base = ["batches", "--data", raw, "--order", "neox", "--start", "0", "--end", "0"] + COMMON
    for extra, message in (
            (["--out", str(out), "--decode"], "--decode prints the rows as text, --out saves them as token ids; "
                                              "give one of them"),
            (["--out", str(out), "--rows", "2"], "--rows limits the rows printed; --out saves every row"),
            (["--step", "3"], "--step 3 picks the checkpoint whose run record is read; it needs --checkpoints"),
            (["--transform-steps", "0,1"], "--transform-steps need --transform"),
            (["--transform-param", "direction=f2m"], "--transform-param need --transform")):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err == f"pythia-jax batches: error: {message}" or (message in err and "\n" not in err), err
    assert not out.exists()


# ---------------------------------------------------------------- undecodable input, I/O failures
def _gz_rows(n=2000):
    return gzip.compress("".join(json.dumps({"text": f"doc {i} " * 40}) + "\n" for i in range(n)).encode())


def _corrupt(data: bytes) -> bytes:
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    bad[len(bad) // 2 + 1] ^= 0xFF
    return bytes(bad)


def _zst_rows(n=2000):
    import zstandard
    return zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": f"doc {i} " * 40}) + "\n" for i in range(n)).encode())


@pytest.mark.parametrize("name, content, expected", [
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
     "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at column 14)"),
    ("number.jsonl", b'{"text": "ok"}\n{"text": 5}\n',
     "number.jsonl:2: the 'text' field is a number (5), expected a string"),
    ("null.jsonl", b'{"text": null}\n', "null.jsonl:1: the 'text' field is null"),
    ("dict.jsonl", b'{"text": {"a": 1}}\n', "dict.jsonl:1: the 'text' field is an object"),
    ("nokey.jsonl", b'{"body": "x"}\n',
     "nokey.jsonl:1: no 'text' field (fields: 'body'); choose the field with --jsonl-key"),
    ("empty.jsonl", b'{"text": ""}\n\n', "empty.jsonl: no non-empty 'text' field in any line"),
    ("notgz.jsonl.gz", b"plain text\n", "notgz.jsonl.gz:1: damaged or truncated compressed data (Not a gzipped file"),
    ("truncated.jsonl.gz", _gz_rows()[:3000], "truncated.jsonl.gz:"),
    ("corrupt.jsonl.gz", _corrupt(_gz_rows()), "corrupt.jsonl.gz:"),
    ("truncated.jsonl.zst", _zst_rows()[:2000], "truncated.jsonl.zst:"),
    ("garbage.jsonl.zst", b"not zstd at all\n", "garbage.jsonl.zst:1: damaged or truncated compressed data"),
    ("surrogate.jsonl", b'{"text": "ok \\ud83d\\ude00"}\n{"text": "bad \\ud800 x"}\n',
     "surrogate.jsonl:2: a \\uD800-\\uDFFF escape without its pair"),
])
def test_preprocess_undecodable_input_is_one_line(tmp_path, capsys, name, content, expected):
    """Undecodable input: one line naming the file and the line, exit 2, nothing written."""
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / name
    path.write_bytes(content)
    assert main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "out" / "o")]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and expected in err[0], err
    if "compressed" in err[0] or name.startswith(("truncated", "corrupt")):
        assert re.search(r":\d+: damaged or truncated compressed data", err[0]), err[0]
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_preprocess_of_a_folder_says_it_is_one(tmp_path, capsys):
    assert main(["preprocess", "--input", str(tmp_path), "--output-prefix", str(tmp_path / "o")]) == 2
    assert f"{tmp_path} is a folder; give the input file(s) inside it" in _one_error_line(capsys)


def test_preprocess_names_the_line_of_a_truncated_gzip(tmp_path):
    """The line named is the first one that could not be read: every line before it decoded."""
    from pythia_jax.errors import DataError
    from pythia_jax.io_utils import iter_jsonl_objects

    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(_gz_rows()[:3000])
    read = []
    with pytest.raises(DataError, match=r"t\.jsonl\.gz:(\d+): damaged or truncated") as e:
        for lineno, _ in iter_jsonl_objects(path):
            read.append(lineno)
    assert f"t.jsonl.gz:{read[-1] + 1}:" in str(e.value) and read == list(range(1, len(read) + 1))


def _error_lines(capsys) -> list[str]:
    """stderr without the progress bars and the progress log lines ('pythia-jax: ...')."""
    return [line for line in capsys.readouterr().err.splitlines()
            if line.strip() and "tokenizing ->" not in line and "pre-shuffling ->" not in line
            and not line.startswith("pythia-jax: ")]


def _one_error_line(capsys) -> str:
    err = _error_lines(capsys)
    assert len(err) == 1, err
    return err[0]


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_is_one_line_for_batches_and_preprocess(raw, tmp_path, capsys, monkeypatch):
    """An injected ENOSPC (a full disk) while writing: one line naming the output, the reason and the
    fix, exit 2, and no temporary file left behind."""
    from pythia_jax.data.indexed import IndexedDatasetWriter

    out = tmp_path / "b" / "x.npy"
    monkeypatch.setattr(np, "save", _no_space)
    assert main(["batches", "--data", raw, "--order", "neox", "--start", "0", "--end", "0",
                 "--out", str(out)] + COMMON) == 2
    line = _one_error_line(capsys)
    assert line == (f"pythia-jax batches: error: writing {out}: No space left on device; "
                    "free some space or choose another --out")
    assert not (tmp_path / "b").exists()  # no temporary, and not the folder it created
    monkeypatch.undo()

    src = tmp_path / "in.jsonl"
    _write_jsonl(src, TEXTS)
    monkeypatch.setattr(IndexedDatasetWriter, "add_item", _no_space)
    assert main(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "p" / "o")]) == 2
    assert _one_error_line(capsys).endswith(
        "No space left on device; free some space or choose another --output-prefix")
    assert not (tmp_path / "p").exists()  # no temporary, and not the folder it created


@pytest.fixture
def readonly_dir(tmp_path, monkeypatch):
    """A folder nobody may write into. As root, where permission bits do not bind, the kernel's
    answer (EACCES) is injected for paths inside it (os.open, os.mkdir, open for writing)."""
    import builtins

    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    if os.access(d, os.W_OK):
        inside = str(d) + os.sep

        def refuse(path):
            p = os.path.abspath(os.fspath(path))
            if p.startswith(inside):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), p)

        real_open, real_mkdir, real_builtin_open = os.open, os.mkdir, builtins.open

        def os_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real_open(path, flags, *a, **k)

        def mkdir(path, *a, **k):
            refuse(path)
            return real_mkdir(path, *a, **k)

        def builtin_open(file, mode="r", *a, **k):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                refuse(file)
            return real_builtin_open(file, mode, *a, **k)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(builtins, "open", builtin_open)
    yield d
    monkeypatch.undo()
    d.chmod(0o755)


def test_readonly_output_folder_is_one_line_for_every_data_writer(raw, tmp_path, readonly_dir, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hello"}\n')
    table = tmp_path / "r.jsonl"
    table.write_text(json.dumps({"step": 0, "task": "piqa", "metric": "acc", "value": 0.5, "stderr": 0.1,
                                 "num_examples": 4}) + "\n")
    commands = {
        "batches": ["batches", "--data", raw, "--order", "neox", "--start", "0", "--end", "0",
                    "--out", str(readonly_dir / "x.npy")] + COMMON,
        "preprocess": ["preprocess", "--input", str(src), "--output-prefix", str(readonly_dir / "o")],
        "preshuffle": ["preshuffle", "--data", raw, "--out", str(readonly_dir / "pre")] + COMMON,
        "plot": ["plot", str(table), "--out", str(readonly_dir / "a.png")],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        line = _one_error_line(capsys)
        assert line.startswith(f"pythia-jax {name}: error: {readonly_dir}"), line
        assert "Permission denied; no permission: choose a location you can write" in line, line
    assert os.listdir(readonly_dir) == []


def test_batches_refuses_bad_numbers_and_points_to_the_fix(raw, tmp_path, capsys):
    for flag, value in [("--batch-size", "0"), ("--batch-size", "-4"), ("--train-iters", "-1"),
                        ("--seq-len", "0"), ("--rows", "0"), ("--start", "-1"), ("--seed", "x")]:
        argv = ["batches", "--data", raw, "--order", "neox", "--start", "0", "--end", "0"] + COMMON + [flag, value]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: expected" in err and repr(value) in err, err
    assert main(["batches", "--data", raw, "--order", "neox", "--start", "3", "--end", "1"] + COMMON) == 2
    assert "--end 1 is before --start 3" in capsys.readouterr().err
    # the usual mistake: a raw document dataset read as pre-shuffled rows
    assert main(["batches", "--data", raw, "--order", "preshuffled", "--start", "0", "--end", "0"] + COMMON) == 2
    err = _one_error_line(capsys)
    assert "look like a raw document dataset" in err and "use --order neox" in err


def _readme_commands(start: str) -> list[list[str]]:
    """The README's shell commands that start with ``start`` (continuation lines joined)."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    text = text.replace("\\\n", " ")
    return [shlex.split(line.split("#")[0]) for line in text.splitlines() if line.strip().startswith(start)]


def test_readme_batches_example_on_the_demo_data_runs_as_written(capsys):
    """The README's `batches --data demo` command, as written: the first rows of configs/demo.gin."""
    from pythia_jax.data import demo_data_prefix

    commands = [c for c in _readme_commands("pythia-jax batches --data demo") if "--transform" not in c]
    assert commands, "the README has no batches example on the demo data"
    for argv in commands:
        assert main(argv[1:]) == 0
        out = capsys.readouterr().out
        assert "=== step 0 row 0 ===" in out and "=== step 0 row 1 ===" in out and "=== step 0 row 2" not in out
    order = open_order(demo_data_prefix(), "neox", seq_len=128, seed=1234, train_iters=200, global_batch=8)
    from pythia_jax.data.tokenizer import decode
    assert decode(order.read_rows(0, 1)[0]) in out


def test_token_dtype_fits_the_vocabulary_as_gpt_neox_chooses():
    """uint16 below 65,500 ids (Pythia), int32 above (GPT-NeoX best_fitting_dtype); never a wrap."""
    import numpy as np

    from pythia_jax.data import preprocess as pp

    assert pp.best_fitting_dtype(50277) == np.uint16
    assert pp.best_fitting_dtype(65500) == np.int32 and pp.best_fitting_dtype(100_000) == np.int32
    pp._init_worker(None)
    assert pp.encode_document("Hello, I am").tolist() == [12092, 13, 309, 717, 0]

    class Big:
        def encode(self, text):
            class E:
                ids = [70000]
            return E()

    old = pp._WORKER_TOKENIZER
    try:
        pp._WORKER_TOKENIZER = Big()
        with pytest.raises(pp.DataError, match="token id 70000 does not fit the dataset dtype uint16"):
            pp.encode_document("x")
        pp._WORKER_DTYPE = pp.best_fitting_dtype(100_000)
        assert pp.encode_document("x").tolist() == [70000, 0]
    finally:
        pp._init_worker(None)
        pp._WORKER_TOKENIZER = old


def _big_jsonl(path, docs: int, bad_line: int | None = None) -> None:
    import random

    rng = random.Random(0)
    words = "the of and he she his her a to Paris 1 2 ünï 😀".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(docs):
            text = " ".join(rng.choice(words) for _ in range(200))
            f.write(json.dumps({"text": text if i + 1 != bad_line else 5}) + "\n")


def _spawned_workers(pid: int) -> list[int]:
    """The multiprocessing spawn workers (children running ``spawn_main``) of process ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and spawned:
            found.append(int(entry))
    return found


def _preprocess_process(tmp_path, src, workers: int = 2):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "pythia_jax.cli", "preprocess", "--input", str(src),
                             "--output-prefix", str(tmp_path / "out" / "o"), "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_preprocess_with_workers_stops_on_ctrl_c_and_on_a_bad_line(tmp_path):
    """--workers 2: a Ctrl-C (SIGINT to the whole process group, as a terminal sends it) exits
    130 with one line and no worker tracebacks, even while the workers are still starting, and
    leaves nothing (it used to hang in the pool's join); a bad line met by the pool's feeder
    is the usual one-line error, exit 2, also without a hang."""
    import signal
    import subprocess
    import time

    src = tmp_path / "big.jsonl"
    _big_jsonl(src, 60_000)
    for delay in (0.05, 3.0):  # after the workers started: while they import; while they tokenize
        proc = _preprocess_process(tmp_path, src)
        deadline = time.monotonic() + 60
        while len(_spawned_workers(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"preprocess --workers 2 did not exit after Ctrl-C at {delay} s") from None
        assert proc.returncode == 130, (delay, err)
        assert "Traceback" not in err and "interrupted" in err, err
        assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    _big_jsonl(bad, 3000, bad_line=2500)
    proc = _preprocess_process(tmp_path, bad)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "bad.jsonl:2500: the 'text' field is a number (5)" in err, err
    assert "Traceback" not in err
