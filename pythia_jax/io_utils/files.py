"""Small file helpers: the URL test, size strings, JSONL rows with line numbers (plain, gzip, zstd),
a prefetching iterator and returning freed host memory to the OS."""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import re
from typing import Any, Iterator

from pythia_jax.errors import DataError, PythiaJaxError


def is_url(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` paths (``gs://…``, ``file://…``): read and written through
    tensorstore / ``etils.epath`` rather than the local file system."""
    return "://" in str(path)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from ``"2GB"`` (10^9, as transformers counts), ``"500MiB"``, ``"5e9"`` or an int."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size)
        m = _SIZE.match(text)
        if m and m.group(2).lower() in _UNITS:
            value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        else:
            try:
                value = int(float(text))
            except ValueError:
                raise PythiaJaxError(f"cannot parse size {size!r} (use e.g. 2GB, 500MB, 1GiB)") from None
    if value <= 0:
        raise PythiaJaxError(f"size must be positive, got {size!r}")
    return value


def _open_bytes(path: str) -> io.BufferedIOBase:
    """A binary reader of ``path``, decompressing ``.gz`` / ``.zst`` by extension."""
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rb")
        if path.endswith(".zst") or path.endswith(".zstd"):
            return io.BufferedReader(_ZstdReader(open(path, "rb")))
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


class _ZstdReader(io.RawIOBase):
    """Decompresses a (multi-frame) zstd file; unlike ``stream_reader`` a stream that ends inside a
    frame raises ``zstandard.ZstdError`` instead of ending quietly."""

    def __init__(self, raw: io.BufferedIOBase):
        import zstandard

        self._zstd, self._raw = zstandard, raw
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._buf, self._in_frame, self._done = b"", False, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf and not self._done:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise self._zstd.ZstdError("the data ends inside a zstd frame (truncated file)")
                self._done = True
                break
            while chunk:
                self._in_frame = True
                self._buf += self._obj.decompress(chunk)
                chunk = b""
                if self._obj.eof:  # frame complete; the next one may start in the same chunk
                    self._in_frame = False
                    chunk = self._obj.unused_data
                    self._obj = self._zstd.ZstdDecompressor().decompressobj()
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _decompression_errors() -> tuple[type[BaseException], ...]:
    """What a damaged or truncated compressed stream raises (gzip/zlib, zstandard) besides OSError."""
    import zlib

    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def iter_jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file (plain, ``.gz``, ``.zst``).

    Raises DataError naming the file and the line for: a missing or unreadable file, a damaged or
    truncated ``.gz`` / ``.zst`` stream, a line that is not UTF-8, not JSON or not a JSON object.
    Each line is decoded on its own, so the line named is the one holding the bad bytes.
    """
    path = os.fspath(path)
    check_input_file(path)
    lineno = 0
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                    f"{e.start + 1}); re-encode the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object")
                if "\\u" in line and _has_lone_surrogate(row):  # only a \uD800-\uDFFF escape makes one
                    raise DataError(f"{path}:{lineno}: a \\uD800-\\uDFFF escape without its pair (an unpaired "
                                    "UTF-16 surrogate, not a character: no tokenizer can encode it); fix the line")
                yield lineno, row
    except _decompression_errors() as e:
        what = "damaged or truncated compressed data" if path.endswith((".gz", ".zst", ".zstd")) else "read error"
        reason = getattr(e, "strerror", None) or " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}:{lineno + 1}: {what} ({reason}); check or re-download the file") from None


def check_input_file(path: str | os.PathLike) -> None:
    """``DataError`` unless ``path`` is an existing file (a folder is named as one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder; give the input file(s) inside it")
    if not os.path.isfile(path):
        raise DataError(f"{path}: input file not found")


def _has_lone_surrogate(row: Any) -> bool:
    """True when a string in a parsed JSON value holds an unpaired surrogate (json.loads keeps
    a lone ``\\ud800`` escape as such; UTF-8 cannot encode it)."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def json_safe(value: Any) -> Any:
    """``value`` for strict JSON (``json.dumps(..., allow_nan=False)``), recursively: numpy scalars
    as Python numbers, non-finite floats (NaN, ±inf) as None (JSON ``null``)."""
    import math

    import numpy as np

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def release_free_memory() -> None:
    """Hand memory that glibc's allocator keeps after large frees back to the OS (``malloc_trim``).

    Reading and converting a model frees many large temporary buffers; without this the process
    keeps them (RSS) while the next step (e.g. the Orbax save) allocates more. No-op off glibc.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc with ``malloc_trim``, or None. Looked up once: ``find_library`` starts a subprocess
    (``ldconfig -p``), which cost more than the trim itself when called once per restored array."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - AttributeError off glibc
        return libc
    except (OSError, AttributeError):
        return None


def prefetch(items: Iterator[Any]) -> Iterator[Any]:
    """Yield from ``items``, producing the next item on a background thread while the caller
    works on the current one. Exceptions are re-raised in the caller; stopping early (or an error
    in the caller) stops the producer after at most one more item."""
    import queue
    import threading

    slot: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slot.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                del item
                if stop.is_set():
                    return
            slot.put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            slot.put((done, e))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slot.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
            del item
    finally:
        stop.set()
        while thread.is_alive():  # drain so a blocked put can see the stop flag
            try:
                slot.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()
