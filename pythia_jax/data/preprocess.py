"""JSONL -> indexed dataset (as GPT-NeoX's ``tools/preprocess_data.py``), and the pre-shuffled writer.

``preprocess_jsonl(inputs, output_prefix, jsonl_key="text", workers=N)``: reads JSONL files
(plain, ``.gz`` or ``.zst``), skips empty texts (as GPT-NeoX's reader did), tokenizes each
document with the bundled Pythia tokenizer (``encode(text).ids``), appends the EOD id 0, and
writes one uint16 item per document to ``{output_prefix}_{jsonl_key}_document.{bin,idx}``
(GPT-NeoX's naming), in input order, using a multiprocessing pool and a tqdm progress bar.

``write_preshuffled(order, output_prefix, num_rows, shards=None)``: writes rows ``[0, num_rows)``
of an order (normally the GPT-NeoX order of a raw dataset) as a pre-shuffled dataset: one item
of seq_len+1 tokens per row, in training order. With ``shards=K`` the ``.bin`` is split at byte
level into K files ``{prefix}-000NN-of-{K-1:05d}.bin`` beside ``{prefix}.idx`` like the Pythia
release (rows straddle the edges); ``IndexedDataset`` reads them as one stream.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np

from pythia_jax.config import EOD_TOKEN_ID
from pythia_jax.data.indexed import IndexedDatasetWriter, _atomic_path, check_dataset_output, write_index
from pythia_jax.errors import DataError
from pythia_jax.io_utils import is_url, iter_jsonl_objects
from pythia_jax.io_utils.files import check_input_file


def iter_jsonl_texts(paths: Sequence[str], key: str = "text") -> Iterator[str]:
    """The non-empty ``key`` fields of the JSONL files, in order.

    A field that is a list of strings is joined with blank lines (lm_dataformat's paragraph lists).
    Raises DataError naming the file and line for a missing field, a field that is not a string
    (or list of strings), and everything ``iter_jsonl_objects`` refuses (non-UTF-8 bytes, bad JSON,
    a damaged ``.gz`` / ``.zst`` stream).
    """
    for path in paths:
        for line_no, obj in iter_jsonl_objects(path):
            if key not in obj:
                raise DataError(f"{path}:{line_no}: no {key!r} field (fields: {', '.join(map(repr, obj)) or 'none'}); "
                                "choose the field with --jsonl-key")
            text = obj[key]
            if isinstance(text, list) and all(isinstance(t, str) for t in text):
                text = "\n\n".join(text)  # lm_dataformat joined paragraph lists
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_no}: the {key!r} field is {_json_type(text)}, expected a string "
                                "(or a list of strings); fix the line or choose another field with --jsonl-key")
            if text:
                yield text


def _json_type(value) -> str:
    """'a number', 'null', ... for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list holding non-strings"
    return type(value).__name__


_WORKER_TOKENIZER = None
_WORKER_DTYPE = np.dtype(np.uint16)


def best_fitting_dtype(vocab_size: int) -> np.dtype:
    """The token dtype GPT-NeoX picks for a vocabulary (``megatron/data/indexed_dataset.py``
    ``best_fitting_dtype``): uint16 below 65,500 ids (the Pythia tokenizer), else int32."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32)


def _init_worker(tokenizer_path: str | None) -> None:
    global _WORKER_TOKENIZER, _WORKER_DTYPE
    from pythia_jax.data.tokenizer import load_tokenizer
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)
    _WORKER_DTYPE = best_fitting_dtype(_WORKER_TOKENIZER.get_vocab_size(with_added_tokens=True))


def _worker_pool(workers: int, tokenizer_path: str | None):
    """A spawn pool of tokenizer workers that leave Ctrl-C to the parent (which terminates the
    pool). The workers start with SIGINT ignored (an ignored signal stays ignored across exec,
    and Python then installs no KeyboardInterrupt handler), so a Ctrl-C while they import does
    not print a traceback per worker; the parent ignores it only while it starts them."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return multiprocessing.get_context("spawn").Pool(
            workers, initializer=_init_pool_worker, initargs=(tokenizer_path,))
    finally:
        signal.signal(signal.SIGINT, previous)


def _init_pool_worker(tokenizer_path: str | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a worker restarted by the pool starts without it
    _init_worker(tokenizer_path)


def encode_document(text: str) -> np.ndarray:
    """Token ids of one document followed by EOD (0), [n+1] in the vocabulary's dtype (uint16
    for the Pythia tokenizer, as GPT-NeoX's ``preprocess_data.py`` writes it)."""
    ids = _WORKER_TOKENIZER.encode(text).ids
    ids.append(EOD_TOKEN_ID)
    out = np.asarray(ids, dtype=np.int64)
    if out.size and out.max() > np.iinfo(_WORKER_DTYPE).max:  # never wrap silently
        raise DataError(f"token id {int(out.max())} does not fit the dataset dtype {_WORKER_DTYPE}")
    return out.astype(_WORKER_DTYPE)


def dataset_prefix(output_prefix: str, jsonl_key: str = "text") -> str:
    """GPT-NeoX's output name: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{jsonl_key}_document"


def preprocess_jsonl(inputs: Sequence[str] | str, output_prefix: str, *, jsonl_key: str = "text",
                     workers: int = 1, tokenizer_path: str | None = None,
                     progress: bool = True, chunksize: int = 32) -> str:
    """Tokenize JSONL documents into an indexed dataset. Returns the dataset prefix.

    Raises DataError (naming the file and line) for undecodable input, see ``iter_jsonl_texts``,
    and when the inputs hold no non-empty document; nothing is written then.
    """
    from tqdm import tqdm
    if isinstance(inputs, str):
        inputs = [p.strip() for p in inputs.split(",") if p.strip()]  # "a.jsonl, b.jsonl" too
    for path in inputs:
        check_input_file(path)
    prefix = dataset_prefix(output_prefix, jsonl_key)
    texts = iter_jsonl_texts(inputs, jsonl_key)
    pool = None
    stop = threading.Event()
    if workers > 1:
        # Pool.imap's feeder thread would read the whole input ahead; a semaphore bounds the
        # documents in flight (GPT-NeoX did the same). The feeder gives up once ``stop`` is set,
        # so that terminating the pool after an error or a Ctrl-C never waits for it.
        in_flight = threading.BoundedSemaphore(max(1024, 64 * chunksize * workers))

        def gated(items):
            for item in items:
                while not in_flight.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                yield item

        def released(results):
            for result in results:
                in_flight.release()
                yield result

    try:
        if workers > 1:
            pool = _worker_pool(workers, tokenizer_path)
            encoded: Iterable[np.ndarray] = released(
                pool.imap(encode_document, gated(texts), chunksize=chunksize))
        else:
            _init_worker(tokenizer_path)
            encoded = (encode_document(t) for t in texts)
        from pythia_jax.data.tokenizer import load_tokenizer
        vocab = load_tokenizer(tokenizer_path).get_vocab_size(with_added_tokens=True)
        with IndexedDatasetWriter(prefix, best_fitting_dtype(vocab)) as writer, \
                tqdm(encoded, desc=f"tokenizing -> {os.path.basename(prefix)}", unit=" docs",
                     disable=not progress) as bar:  # closed (its line ended) on errors too
            documents = 0
            for doc in bar:
                writer.add_document(doc)
                documents += 1
            if documents == 0:  # nothing is written: a 0-document dataset would only fail later
                raise DataError(f"{', '.join(inputs)}: no non-empty {jsonl_key!r} field in any line, so there is "
                                f"no document to write (nothing written); check the input or --jsonl-key")
    except BaseException:  # an error or a Ctrl-C: stop the workers now, nothing is written
        stop.set()
        if pool is not None:
            pool.terminate()
            pool.join()
        raise
    if pool is not None:
        pool.close()
        pool.join()
    return prefix


class _ShardedBinWriter:
    """Writes a byte stream of known total size into K shard files (temp names, renamed at the end)."""

    def __init__(self, prefix: str, total_bytes: int, shards: int):
        if shards < 1:
            raise DataError("shards must be >= 1")
        self.prefix = prefix
        self.shard_bytes = -(-total_bytes // shards) if total_bytes else 1
        self.finals = [f"{prefix}-{k:05d}-of-{shards - 1:05d}.bin" for k in range(shards)]
        self.temps: list[str] = []
        self._k = 0
        self._written = 0  # bytes in the current shard
        try:
            for p in self.finals:
                self.temps.append(_atomic_path(p))
            self._f = open(self.temps[0], "wb")
        except BaseException:
            for tmp in self.temps:
                os.remove(tmp)
            raise

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            room = self.shard_bytes - self._written
            if room == 0 and self._k + 1 < len(self.temps):
                self._f.close()
                self._k += 1
                self._f = open(self.temps[self._k], "wb")
                self._written = 0
                room = self.shard_bytes
            take = len(view) if self._k + 1 == len(self.temps) else min(room, len(view))
            self._f.write(view[:take])
            self._written += take
            view = view[take:]

    def finalize(self) -> list[tuple[str, str]]:
        """Close the shards; return their ``(tmp, final)`` pairs, to be published with the ``.idx``."""
        self._f.close()
        for k in range(self._k + 1, len(self.temps)):
            open(self.temps[k], "wb").close()  # empty trailing shards (tiny data)
        return list(zip(self.temps, self.finals))

    def abort(self) -> None:
        self._f.close()
        for tmp in self.temps:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_preshuffled(order, output_prefix: str, num_rows: int, *, shards: int | None = None,
                      chunk_rows: int = 1024, progress: bool = True) -> str:
    """Write rows [0, num_rows) of ``order`` as a pre-shuffled dataset. Returns the prefix.

    The ``.bin`` file(s) and the ``.idx`` are published together, or not at all on an error;
    the output may not be the order's own dataset, nor replace anything but an indexed dataset.
    """
    from tqdm import tqdm
    if num_rows > len(order):
        raise DataError(f"{order.name}: {num_rows} rows requested, the order has {len(order)}")
    source = getattr(getattr(order, "dataset", None), "prefix", None)
    check_dataset_output(output_prefix, [source] if isinstance(source, str) and not is_url(source) else [])
    width = order.seq_len + 1
    dtype = order.dataset.dtype
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)) or ".", exist_ok=True)
    bar = tqdm(total=num_rows, desc=f"pre-shuffling -> {os.path.basename(output_prefix)}",
               unit=" rows", disable=not progress)
    if shards is None:
        with bar:  # ended before the dataset is published (and on errors)
            with IndexedDatasetWriter(output_prefix, dtype) as writer:
                for a in range(0, num_rows, chunk_rows):
                    rows = order.read_rows(a, min(num_rows, a + chunk_rows))
                    for row in rows:
                        writer.add_document(row)
                    bar.update(len(rows))
                bar.close()
        return output_prefix
    try:
        out = _ShardedBinWriter(output_prefix, num_rows * width * dtype.itemsize, shards)
    except BaseException:
        bar.close()
        raise
    try:
        for a in range(0, num_rows, chunk_rows):
            rows = order.read_rows(a, min(num_rows, a + chunk_rows))
            out.write(np.ascontiguousarray(rows, dtype=dtype.newbyteorder("<")).tobytes())
            bar.update(len(rows))
        pairs = out.finalize()
    except BaseException:
        out.abort()
        raise
    finally:
        bar.close()
    write_index(output_prefix + ".idx", dtype, np.full(num_rows, width, np.int64),
                np.arange(num_rows + 1, dtype=np.int64), with_files=pairs)
    return output_prefix
