"""io_utils helpers: the prefetching iterator, the input/output containment check, paired publication."""

from __future__ import annotations

import threading
import time

import pytest

from pythia_jax.io_utils import prefetch


def test_prefetch_yields_everything_in_order_one_item_ahead():
    produced = []

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    seen = []
    for item in prefetch(items()):
        time.sleep(0.002)
        assert len(produced) <= item + 3  # at most one item queued and one more being made
        seen.append(item)
    assert seen == list(range(20))


def test_prefetch_reraises_the_producer_error_in_the_consumer():
    def items():
        yield 1
        raise OSError("disk gone (simulated)")

    got = []
    with pytest.raises(OSError, match="simulated"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1]


def test_prefetch_stops_the_producer_when_the_consumer_stops():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    before = threading.active_count()
    it = prefetch(items())
    assert next(it) == 0
    it.close()  # the consumer gives up (e.g. its write failed)
    assert len(produced) <= 3
    assert threading.active_count() == before


def test_check_inputs_both_directions_and_urls(tmp_path):
    from pythia_jax.errors import PythiaJaxError
    from pythia_jax.io_utils import check_inputs

    check_inputs(tmp_path / "a", [tmp_path / "b"])  # siblings are fine
    check_inputs("gs://bucket/run2", ["gs://bucket/run"])  # a common prefix is not containment
    for out, inp, rel in ((tmp_path, tmp_path / "x" / "y", "contains"), (tmp_path / "x" / "y", tmp_path, "is inside"),
                          ("gs://b/run", "gs://b/run/checkpoints", "contains"), ("gs://b/run/", "gs://b/run", "is")):
        with pytest.raises(PythiaJaxError, match=f"{rel} the input"):
            check_inputs(out, [inp])


def test_publish_puts_the_old_pair_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    import os

    from pythia_jax import io_utils

    (tmp_path / "d.bin").write_text("old bin")
    (tmp_path / "d.idx").write_text("old idx")
    real = os.rename
    calls = []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 4:  # two set aside, the new .bin in, then the new .idx fails
            raise OSError(28, "No space left on device (simulated)")
        real(a, b)

    monkeypatch.setattr(io_utils.os, "rename", rename)
    with pytest.raises(OSError), io_utils.atomic_files(tmp_path / "d.bin", tmp_path / "d.idx") as (b, i):
        b.write_text("new bin")
        i.write_text("new idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
    assert (tmp_path / "d.bin").read_text() == "old bin" and (tmp_path / "d.idx").read_text() == "old idx"


def test_write_text_atomic_replaces_whole_files_and_leaves_no_temporaries(tmp_path, monkeypatch):
    from pythia_jax import io_utils

    target = tmp_path / "sub" / "manifest.json"
    io_utils.write_text_atomic(target, "one\ntwo é\n")  # the folder is made
    assert target.read_bytes() == "one\ntwo é\n".encode("utf-8")
    io_utils.write_text_atomic(f"file://{target}", "new")
    assert target.read_text() == "new"

    def broken_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_utils.os, "rename", broken_rename)
    with pytest.raises(OSError, match="No space"):
        io_utils.write_text_atomic(target, "never")
    assert target.read_text() == "new"  # the previous file stays
    assert sorted(p.name for p in target.parent.iterdir()) == ["manifest.json"]
