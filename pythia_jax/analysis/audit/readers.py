"""The streaming pass of the audit: safetensors, torch ``.bin`` and Orbax checkpoint steps read once,
in chunks of ``CHUNK_BYTES``, hashed (BLAKE2b) and reduced (norms, non-finite counts) per tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from pythia_jax.analysis.audit.report import (
    _LAYER,
    CHUNK_BYTES,
    DIGEST_SIZE,
    Finding,
    Stats,
    StepRecord,
    TensorPrint,
    _some,
)
from pythia_jax.errors import CheckpointError, PythiaJaxError

# ============================================================================ streaming pass
_CODES = {"F16": "<f2", "BF16": "bf16", "F32": "<f4", "F64": "<f8"}
_ST_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _float_values(raw: np.ndarray, code: str) -> np.ndarray | None:
    """The float32/float64 values of a chunk of raw bytes (uint8) stored as ``code``."""
    kind = _CODES.get(code)
    if kind is None:
        return None
    if kind == "bf16":  # bfloat16 = the high half of a float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    x = raw.view(kind)
    return x.astype(np.float32) if kind == "<f2" else x


def _chunk_stats(x: np.ndarray) -> Stats:
    s = Stats(numel=int(x.size))
    if x.size == 0:
        return s
    sumsq = float(np.dot(x, x))
    if math.isfinite(sumsq):
        s.sumsq, s.min, s.max = sumsq, float(x.min()), float(x.max())
        return s
    finite = np.isfinite(x)
    s.nonfinite = int(x.size - np.count_nonzero(finite))
    y = x[finite].astype(np.float64)
    s.sumsq = float(np.dot(y, y))
    if y.size:
        s.min, s.max = float(y.min()), float(y.max())
    return s


class _Hasher:
    """Hash + statistics of a byte stream, the hash on a worker thread while the statistics are
    computed on the caller's (hashlib and numpy both release the GIL on large buffers)."""

    def __init__(self, code: str):
        self.code = code
        self.h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        self.stats: Stats | None = Stats() if code in _CODES else None

    def update(self, raw: np.ndarray, into: Stats | None = None) -> None:
        """Feed the uint8 array ``raw`` (whole elements); ``into``: extra Stats to add to."""
        if self.stats is None:
            self.h.update(raw)
            return
        job = _pool().submit(self.h.update, raw)
        try:
            values = _float_values(raw, self.code)
            s = _chunk_stats(values)
            del values
        finally:
            job.result()
        self.stats.merge(s)
        if into is not None:
            into.merge(s)

    def digest(self) -> str:
        return self.h.hexdigest()


_POOL: Any = None


def _pool() -> Any:
    global _POOL
    if _POOL is None:
        import concurrent.futures
        _POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audit-hash")
    return _POOL


def _group_of(key: str) -> str:
    """Norm group of an HF key: ``layers.<i>`` for a transformer layer, else the module name."""
    m = _LAYER.search(key)
    if m:
        return f"layers.{int(m.group(1))}"
    key = key.removeprefix("gpt_neox.")
    if key in ("embed_out.weight", "lm_head.weight"):
        return "embed_out"
    return key.rsplit(".", 1)[0]


# ---------------------------------------------------------------------------- safetensors
def _read_header(file: Path, size: int) -> tuple[int, dict[str, Any]]:
    """(data start, header entries) of a safetensors file; CheckpointError when malformed."""
    if size < 8:
        raise _Truncated(f"{size} bytes, shorter than the 8-byte header length")
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if 8 + n > size:
            raise _Truncated(f"header says {n} header bytes but the file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return 8 + n, header


class _Truncated(CheckpointError):
    pass


def _safetensors_entries(file: Path, size: int) -> tuple[int, list[tuple[str, str, tuple[int, ...], int, int]]]:
    """(data start, [(key, dtype code, shape, begin, end)] sorted by offset); checks the layout."""
    start, header = _read_header(file, size)
    entries = []
    for key, info in header.items():
        try:
            code, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"malformed header entry for {key!r}") from None
        itemsize = _ST_ITEMSIZE.get(code)
        if itemsize is not None and (end - begin) != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise CheckpointError(f"tensor {key}: {end - begin} bytes for shape {list(shape)} {code}")
        entries.append((key, code, shape, begin, end))
    entries.sort(key=lambda e: (e[3], e[4]))
    pos = 0
    for key, _, _, begin, end in entries:
        if begin != pos or end < begin:
            raise CheckpointError(f"tensor {key} at bytes [{begin}, {end}) of the data section, "
                                  f"expected to start at {pos} (overlapping or gapped layout)")
        pos = end
    if start + pos > size:
        raise _Truncated(f"{size} bytes, the header needs {start + pos}")
    if start + pos < size:
        raise CheckpointError(f"{size - start - pos} trailing bytes after the last tensor")
    return start, entries


def _stream_safetensors(file: Path, record: StepRecord, name: str,
                        on_tensor: Callable[[str, str, tuple, str, Any], None]
                        ) -> None:
    size = file.stat().st_size
    start, entries = _safetensors_entries(file, size)

    def chunks() -> Iterator[tuple[int, bytes]]:
        with open(file, "rb") as fh:
            fh.seek(start)
            for i, (_, _, _, begin, end) in enumerate(entries):
                pos = begin
                while pos < end:
                    n = min(CHUNK_BYTES, end - pos)
                    data = fh.read(n)
                    if len(data) != n:
                        raise _Truncated(f"ended inside tensor {entries[i][0]} (file changed while reading?)")
                    yield i, data
                    pos += n

    from pythia_jax.io_utils import prefetch

    hashers = [_Hasher(code) for _, code, _, _, _ in entries]
    current = -1
    for i, data in prefetch(chunks()):
        while current < i:  # tensors between the previous and this one are empty
            if current >= 0:
                on_tensor(*_done(entries[current], hashers[current]))
            current += 1
        raw = np.frombuffer(data, np.uint8)
        hashers[i].update(raw, record.groups.setdefault(_group_of(entries[i][0]), Stats()))
        record.bytes_read += len(data)
    while current < len(entries):
        if current >= 0:
            on_tensor(*_done(entries[current], hashers[current]))
        current += 1


def _done(entry: tuple, hasher: _Hasher) -> tuple[str, str, tuple, str, Stats | None]:
    key, code, shape, _, _ = entry
    return key, code, shape, hasher.digest(), hasher.stats


# ---------------------------------------------------------------------------- torch .bin
_TORCH_CODES = {"torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float32": "F32", "torch.float64": "F64"}


def _stream_torch_bin(file: Path, record: StepRecord, on_tensor: Callable) -> None:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"auditing {file} needs PyTorch (pip install torch)") from None
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) pickles cannot be memory-mapped
            if "zip" not in str(e).lower() or "central directory" in str(e).lower():
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or truncated file raises many types
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"cannot read it ({type(e).__name__}: {first_line})") from None
    if not isinstance(state, Mapping):
        raise CheckpointError("does not hold a state dict")
    for key in list(state):
        value = state.pop(key)
        if not isinstance(value, torch.Tensor):
            continue
        code = _TORCH_CODES.get(str(value.dtype), str(value.dtype).removeprefix("torch."))
        flat = value.detach().contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
        hasher = _Hasher(code)
        group = record.groups.setdefault(_group_of(key), Stats())
        for s in range(0, raw.size, CHUNK_BYTES):
            hasher.update(raw[s:s + CHUNK_BYTES], group)
        record.bytes_read += int(raw.size)
        on_tensor(key, code, tuple(value.shape), hasher.digest(), hasher.stats)
        del value, flat, raw


# ---------------------------------------------------------------------------- HF step
def _hf_weight_files(path: Path, record: StepRecord) -> tuple[str, list[tuple[str, list[str] | None]]]:
    """(format, [(file name, keys the index lists for it or None)]) of an HF directory, in the
    order ``find_weight_files`` uses; problems are added to ``record``."""
    from pythia_jax.convert import hf

    for index_name, single, fmt in ((hf.SAFE_INDEX, hf.SAFE_WEIGHTS, "safetensors"),
                                    (hf.BIN_INDEX, hf.BIN_WEIGHTS, "bin")):
        index_path = path / index_name
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                by_file: dict[str, list[str]] = defaultdict(list)
                for key, name in weight_map.items():
                    by_file[str(name)].append(str(key))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                record.problems.append(Finding("corrupt_file", record.label,
                                               f"{index_name}: unreadable shard index ({e!r})"))
                return fmt, []
            files = []
            for name in sorted(by_file):
                if not (path / name).is_file():
                    record.problems.append(Finding(
                        "missing_file", record.label,
                        f"{index_name} lists {name} ({len(by_file[name])} tensors) but it does not exist"))
                else:
                    files.append((name, by_file[name]))
            return fmt, files
        if (path / single).is_file():
            return fmt, [(single, None)]
    record.problems.append(Finding("missing_file", record.label,
                                   f"no weights ({hf.SAFE_WEIGHTS}, {hf.SAFE_INDEX}, {hf.BIN_WEIGHTS} "
                                   f"or {hf.BIN_INDEX})"))
    return "", []


def _audit_hf_step(path: Path, label: str, step: int | None) -> StepRecord:
    from pythia_jax.config import ConfigError, ModelConfig
    from pythia_jax.convert import hf

    record = StepRecord(label=label, step=step, path=str(path))
    config = None
    if not (path / "config.json").is_file():
        record.problems.append(Finding("missing_file", label, "no config.json"))
    else:
        try:
            config = ModelConfig.from_hf_file(path)
            record.config = _architecture(config)
        except (ConfigError, PythiaJaxError, OSError, ValueError) as e:
            record.problems.append(Finding("corrupt_file", label, f"config.json: {e}"))
    fmt, files = _hf_weight_files(path, record)
    expected = hf.hf_shapes(config) if config is not None else None
    for name, listed in files:
        file = path / name
        file_keys: list[tuple[str, str]] = []

        # called only while this file is read (this iteration), so the loop variables are current
        def on_tensor(key: str, code: str, shape: tuple, digest: str, stats: Stats | None) -> None:
            canonical = hf.KEY_ALIASES.get(key, key)
            record.tensors[canonical] = TensorPrint(canonical, code, tuple(shape), digest, name, stats)  # noqa: B023
            file_keys.append((canonical, f"{code}|{list(shape)}|{digest}"))  # noqa: B023

        try:
            if fmt == "safetensors":
                _stream_safetensors(file, record, name, on_tensor)
            else:
                _stream_torch_bin(file, record, on_tensor)
        except _Truncated as e:
            record.problems.append(Finding("truncated_file", label, f"{name}: {e}"))
            continue
        except CheckpointError as e:
            record.problems.append(Finding("corrupt_file", label, f"{name}: {e}"))
            continue
        except OSError as e:
            record.problems.append(Finding("corrupt_file", label, f"{name}: cannot read ({e})"))
            continue
        h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        for key, desc in sorted(file_keys):
            h.update(f"{key}|{desc}\n".encode())
        record.files[name] = h.hexdigest()
        if listed is not None:
            got = {k for k, _ in file_keys}
            absent = sorted(set(hf.KEY_ALIASES.get(k, k) for k in listed) - got)
            if absent:
                record.problems.append(Finding(
                    "missing_tensor", label, f"the index places {_some(absent)} in {name}, which lacks them"))
    if expected is not None and record.readable:
        _check_expected(record, expected)
    return record


def _check_expected(record: StepRecord, expected: Mapping[str, tuple[int, ...]]) -> None:
    from pythia_jax.convert.hf import is_ignored_key

    missing = [k for k in expected if k not in record.tensors]
    if missing:
        record.problems.append(Finding("missing_tensor", record.label,
                                       f"missing {_some(missing)} (the config needs {len(expected)})"))
    wrong = [f"{k} {list(t.shape)} (config: {list(expected[k])})" for k, t in record.tensors.items()
             if k in expected and tuple(t.shape) != tuple(expected[k])]
    if wrong:
        record.problems.append(Finding("shape_mismatch", record.label, _some(wrong)))
    unknown = [k for k in record.tensors if k not in expected and not is_ignored_key(k)]
    if unknown:
        record.problems.append(Finding("unknown_tensor", record.label,
                                       f"tensors that are not GPT-NeoX weights: {_some(unknown)}", "note"))


def _architecture(config: Any) -> dict[str, Any]:
    from pythia_jax.checkpoint import EXECUTION_FIELDS

    return {k: v for k, v in config.to_dict().items() if k not in EXECUTION_FIELDS}




# ---------------------------------------------------------------------------- checkpoint steps
def _audit_checkpoint_step(root: Path, step: int, config: Any) -> StepRecord:
    from pythia_jax import checkpoint as ckpt

    label = str(step)
    record = StepRecord(label=label, step=step, path=str(root / label),
                        config=_architecture(config) if config is not None else None)
    problem = ckpt.step_problem(root, step)
    if problem is not None:
        record.problems.append(Finding("incomplete_step", label, problem))
        return record
    try:
        _, params = ckpt.load_params(root, step=step, host=True, dtype=ckpt.STORED)  # the stored bytes
    except CheckpointError as e:
        record.problems.append(Finding("corrupt_file", label, str(e)))
        return record
    for path, leaf in _flatten(params):
        arr = np.ascontiguousarray(np.asarray(leaf))
        code = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("float16"): "F16"}.get(
            arr.dtype, "BF16" if arr.dtype.name == "bfloat16" else arr.dtype.name)
        hasher = _Hasher(code)
        stacked = path[0] == "layers" and arr.ndim >= 1
        for i in range(arr.shape[0] if stacked else 1):
            part = arr[i] if stacked else arr
            group = record.groups.setdefault(f"layers.{i}" if stacked else path[0], Stats())
            raw = part.reshape(-1).view(np.uint8)
            for s in range(0, raw.size, CHUNK_BYTES):
                hasher.update(raw[s:s + CHUNK_BYTES], group)
            record.bytes_read += int(raw.size)
        key = "/".join(path)
        record.tensors[key] = TensorPrint(key, code, tuple(arr.shape), hasher.digest(), "params", hasher.stats)
        del arr
    del params
    return record


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k in sorted(tree):
        v = tree[k]
        if isinstance(v, Mapping):
            yield from _flatten(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), v



def plain_hash_seconds(files: Iterable[str | os.PathLike], chunk: int = CHUNK_BYTES) -> tuple[float, int]:
    """(seconds, bytes) to BLAKE2b-hash ``files`` with a plain ``hashlib`` read loop: the
    baseline the audit's throughput is compared with (``scripts/bench_audit.py``)."""
    t0 = time.perf_counter()
    total = 0
    for file in files:
        h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        with open(file, "rb") as f:
            while data := f.read(chunk):
                h.update(data)
                total += len(data)
    return time.perf_counter() - t0, total
