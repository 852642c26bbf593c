"""io_utils helpers that the converters lean on: the prefetching iterator."""

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
