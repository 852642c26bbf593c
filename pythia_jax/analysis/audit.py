"""Audit a series of checkpoints: one streaming pass over every file, a fingerprint per tensor.

A series is either a folder of Hugging Face revisions ``DIR/step<N>/`` (as the Pythia suite
publishes its 154 branches: each an HF ``GPTNeoXForCausalLM`` directory with ``config.json`` and
``model.safetensors`` / ``pytorch_model.bin``, possibly sharded with an index), or a checkpoint
directory of this project (``DIR/<step>/params``, Orbax).

Every tensor's bytes are read once, in chunks of :data:`CHUNK_BYTES`; in the same pass the
chunk is hashed (BLAKE2b, 128-bit digest of the stored bytes, so the fingerprint depends on the
stored dtype) and its float values give the sum of squares, the number of non-finite values and
the min / max. Peak memory is a few chunks for safetensors; a ``.bin`` file is memory-mapped
(PyTorch's zip format) or loaded whole (legacy pickles); an Orbax step is restored to host memory
one step at a time (one float32 model).

Findings (:class:`Finding`, ``kind``):

- ``identical_step``: two steps whose tensors are all byte-identical (e.g. Hub revisions of
  different steps serving the same weights). Steps 0 and 1 are expected to be identical (GPT-NeoX's
  ``AnnealingLR`` warmup, like this project's schedule, gives lr 0 to the first update), so that
  pair is a note;
- ``duplicate_shard``: a weight file whose tensors are byte-identical to a file of another step
  (an out-of-era shard); ``duplicate_tensor``: the same for single tensors (tensors whose values
  are all equal, such as LayerNorm scales still at 1.0 early in training, are not compared);
- ``missing_file``, ``truncated_file``, ``corrupt_file``, ``missing_tensor``, ``shape_mismatch``,
  ``incomplete_step``: a step that cannot be read as a whole model;
- ``config_mismatch``: a step whose architecture differs from the series' most common one
  (execution-only fields such as dtype are ignored);
- ``nonfinite``: NaN or infinite values;
- ``norm_jump``: a step whose parameter norm (whole model, or one layer / embedding) leaves the
  series' local trend, see :func:`norm_outliers`.

``note`` findings (unknown tensors, leftovers of interrupted saves) are reported but do not make
the audit fail.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from pythia_jax.errors import CheckpointError, PythiaJaxError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # bytes hashed / reduced per step of the streaming pass (a multiple of 8)
DIGEST_SIZE = 16       # BLAKE2b digest bytes
_STEP_DIR = re.compile(r"^step(\d+)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

ERROR_KINDS = ("identical_step", "duplicate_shard", "duplicate_tensor", "missing_file", "truncated_file",
               "corrupt_file", "missing_tensor", "shape_mismatch", "incomplete_step", "config_mismatch",
               "nonfinite", "norm_jump")


# ============================================================================ records
@dataclasses.dataclass
class Stats:
    """Running float statistics of a tensor (or a group of tensors): float64 accumulators."""

    numel: int = 0
    sumsq: float = 0.0
    nonfinite: int = 0
    min: float = math.inf
    max: float = -math.inf

    def merge(self, other: "Stats") -> None:
        self.numel += other.numel
        self.sumsq += other.sumsq
        self.nonfinite += other.nonfinite
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @property
    def norm(self) -> float:
        return math.sqrt(self.sumsq)

    @property
    def constant(self) -> bool:
        """All (finite) values equal (and at least one value)."""
        return self.numel > 0 and self.min == self.max


@dataclasses.dataclass
class TensorPrint:
    """Fingerprint of one stored tensor: ``digest`` = BLAKE2b-128 (hex) of its stored bytes;
    ``stats`` is None for non-float tensors."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    file: str
    stats: Stats | None

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        return {"key": self.key, "dtype": self.dtype, "shape": list(self.shape), "digest": self.digest,
                "file": self.file,
                "norm": None if s is None else s.norm, "nonfinite": None if s is None else s.nonfinite}


@dataclasses.dataclass
class StepRecord:
    """What one pass over one step found."""

    label: str                     # "step1000" (HF revision folder) or "1000" (checkpoint step)
    step: int | None
    path: str
    config: dict[str, Any] | None = None        # architecture fields (ModelConfig.to_dict)
    tensors: dict[str, TensorPrint] = dataclasses.field(default_factory=dict)
    files: dict[str, str] = dataclasses.field(default_factory=dict)   # weight file -> content digest
    groups: dict[str, Stats] = dataclasses.field(default_factory=dict)  # "embed_in", "layers.3", …
    bytes_read: int = 0
    problems: list["Finding"] = dataclasses.field(default_factory=list)

    @property
    def readable(self) -> bool:
        return not any(f.severity == "error" and f.kind not in ("nonfinite", "config_mismatch")
                       for f in self.problems)

    @property
    def norm(self) -> float:
        total = sum(s.sumsq for s in self.groups.values())
        return math.sqrt(total) if self.groups else float("nan")

    def fingerprint(self) -> str:
        """Digest over (key, dtype, shape, tensor digest) of every tensor, in key order."""
        h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        for key in sorted(self.tensors):
            t = self.tensors[key]
            h.update(f"{key}|{t.dtype}|{list(t.shape)}|{t.digest}\n".encode())
        return h.hexdigest()


@dataclasses.dataclass
class Finding:
    kind: str
    step: str
    detail: str
    severity: str = "error"   # "error" (audit fails) or "note"
    other: str | None = None  # the other step of a duplicate

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class AuditReport:
    """Result of :func:`audit_series`. ``ok`` is False when any error finding was made."""

    directory: str
    layout: str          # "hf-revisions", "hf" (one HF directory) or "checkpoint"
    steps: list[StepRecord]
    findings: list[Finding]
    seconds: float
    bytes_read: int

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def kinds(self) -> dict[str, list[str]]:
        """``{step label: sorted kinds of its error findings}``."""
        out: dict[str, set[str]] = defaultdict(set)
        for f in self.errors():
            out[f.step].add(f.kind)
        return {k: sorted(v) for k, v in out.items()}

    def to_json(self, tensors: bool = True) -> dict[str, Any]:
        return {
            "directory": self.directory, "layout": self.layout, "ok": self.ok,
            "seconds": self.seconds, "bytes_read": self.bytes_read,
            "findings": [f.to_json() for f in self.findings],
            "steps": [{"label": r.label, "step": r.step, "path": r.path, "norm": _nan_none(r.norm),
                       "fingerprint": r.fingerprint() if r.tensors else None,
                       "files": r.files, "bytes_read": r.bytes_read,
                       "group_norms": {g: s.norm for g, s in sorted(r.groups.items())},
                       **({"tensors": [t.to_json() for t in r.tensors.values()]} if tensors else {})}
                      for r in self.steps],
        }

    def table(self) -> str:
        """A fixed-width table: one line per step, then one line per finding."""
        kinds = self.kinds()
        lines = [f"{'step':>12s} {'tensors':>7s} {'files':>5s} {'MB read':>9s} {'norm':>12s}  status"]
        for r in self.steps:
            status = ",".join(kinds.get(r.label, [])) or "ok"
            lines.append(f"{r.label:>12s} {len(r.tensors):7d} {len(r.files):5d} {r.bytes_read / 1e6:9.1f} "
                         f"{r.norm:12.4f}  {status}")
        mb = self.bytes_read / 1e6
        lines.append(f"{len(self.steps)} step(s), {mb:.1f} MB in {self.seconds:.2f} s "
                     f"({mb / max(self.seconds, 1e-9):.0f} MB/s)")
        for f in self.findings:
            lines.append(f"[{f.severity}] {f.step}: {f.kind}: {f.detail}")
        if self.ok:
            lines.append("no problems found")
        else:
            lines.append(f"{len(self.errors())} problem(s) found")
        return "\n".join(lines)


def _nan_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


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


def _some(items: Sequence[str], n: int = 4) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


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
        _, params = ckpt.load_params(root, step=step, host=True)
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


# ============================================================================ the series
def find_series(directory: str | os.PathLike) -> tuple[str, list[tuple[str, int | None, Path]]]:
    """(layout, [(label, step, path)]) of a series; ``PythiaJaxError`` when it is none.

    Every ``step<N>`` sub-folder counts, with or without ``config.json`` (a revision that lost its
    files is a finding, not a folder to skip).
    """
    from pythia_jax import checkpoint as ckpt
    from pythia_jax.convert.hf import is_hf_dir

    p = Path(directory)
    if not p.exists():
        raise PythiaJaxError(f"{p} does not exist; pass a folder of step<N>/ HF revisions or a "
                             "pythia-jax checkpoint directory")
    if not p.is_dir():
        raise PythiaJaxError(f"{p} is a file; pass a folder of step<N>/ HF revisions or a "
                             "pythia-jax checkpoint directory")
    if ckpt.is_checkpoint_dir(p):
        root, only = ckpt.resolve_checkpoint_dir(p)
        root = Path(str(root))
        steps = [only] if only is not None else sorted(
            int(c.name) for c in root.iterdir() if c.is_dir() and c.name.isdigit())
        return "checkpoint", [(str(s), s, root / str(s)) for s in steps]
    revisions = sorted((int(m.group(1)), c) for c in p.iterdir()
                       if c.is_dir() and (m := _STEP_DIR.match(c.name)))
    if revisions:
        return "hf-revisions", [(c.name, s, c) for s, c in revisions]
    if is_hf_dir(p) or (p / "config.json").is_file():
        return "hf", [(p.name or str(p), None, p)]
    raise PythiaJaxError(f"{p} holds no checkpoints: expected step<N>/ HF revision folders, an HF "
                         "directory (config.json + weights) or a pythia-jax checkpoint directory "
                         "(model_config.json + <step>/)")


def audit_series(directory: str | os.PathLike, *, steps: Iterable[int] | None = None,
                 norm_window: int = 4, norm_z: float = 6.0, norm_min_jump: float = 0.1,
                 progress: Callable[[StepRecord], None] | None = None) -> AuditReport:
    """Audit every step of ``directory`` (see the module docstring); returns an :class:`AuditReport`.

    ``steps``: only these steps (default: all). ``norm_window``, ``norm_z``, ``norm_min_jump``:
    see :func:`norm_outliers`. ``progress``: called with each step's record when it is done.
    Raises ``PythiaJaxError`` when ``directory`` is not a series (or a wanted step is not there).
    """
    t0 = time.perf_counter()
    layout, entries = find_series(directory)
    if steps is not None:
        wanted = set(int(s) for s in steps)
        have = {s for _, s, _ in entries}
        absent = sorted(wanted - have)
        if absent:
            raise PythiaJaxError(f"{directory} has no step(s) {', '.join(map(str, absent))}; it has "
                                 f"{', '.join(str(s) for s in sorted(x for x in have if x is not None)) or 'none'}")
        entries = [e for e in entries if e[1] in wanted]
    records: list[StepRecord] = []
    notes: list[Finding] = []
    if layout == "checkpoint":
        from pythia_jax import checkpoint as ckpt

        root = entries[0][2].parent if entries else Path(directory)
        leftovers = sorted(c.name for c in root.iterdir() if ".orbax-checkpoint-tmp" in c.name
                           or ".unusable-" in c.name)
        if leftovers:
            notes.append(Finding("leftover", "-", f"interrupted or quarantined saves: {_some(leftovers)}", "note"))
        config = ckpt.read_model_config(root)
        for _label, step, _ in entries:
            records.append(_audit_checkpoint_step(root, step, config))
            if progress:
                progress(records[-1])
    else:
        for label, step, path in entries:
            records.append(_audit_hf_step(path, label, step))
            if progress:
                progress(records[-1])
    findings = notes + analyze(records, norm_window=norm_window, norm_z=norm_z, norm_min_jump=norm_min_jump)
    return AuditReport(directory=str(directory), layout=layout, steps=records, findings=findings,
                       seconds=time.perf_counter() - t0, bytes_read=sum(r.bytes_read for r in records))


def analyze(records: Sequence[StepRecord], *, norm_window: int = 4, norm_z: float = 6.0,
            norm_min_jump: float = 0.1) -> list[Finding]:
    """All findings of a series of step records (ordered by step): each record's own problems,
    then identical steps, duplicate shards / tensors, config disagreements, non-finite values and
    norm jumps."""
    findings: list[Finding] = [f for r in records for f in r.problems]
    usable = [r for r in records if r.tensors]
    order = {r.label: i for i, r in enumerate(records)}
    same_as = _identical_steps(usable, order, findings)

    def related(a: StepRecord, b: StepRecord) -> bool:
        return same_as.get(a.label, a.label) == same_as.get(b.label, b.label)

    covered = _duplicate_shards(usable, related, findings)
    _duplicate_tensors(usable, related, covered, order, findings)
    _config_mismatches(records, findings)
    for r in usable:  # non-finite values
        bad = [f"{k} ({t.stats.nonfinite} of {t.stats.numel})" for k, t in r.tensors.items()
               if t.stats is not None and t.stats.nonfinite]
        if bad:
            findings.append(Finding("nonfinite", r.label, f"NaN/inf values in {_some(bad)}"))
    _norm_jumps(records, usable, same_as, findings, window=norm_window, z=norm_z, min_jump=norm_min_jump)
    findings.sort(key=lambda f: (order.get(f.step, -1), f.kind))
    return findings


def _identical_steps(usable: list[StepRecord], order: dict[str, int], findings: list[Finding]) -> dict[str, str]:
    """Steps whose every tensor equals an earlier step's (equal fingerprints): one finding each;
    returns ``{label: label of the first step of its group}``."""
    same_as: dict[str, str] = {}
    by_print: dict[str, list[StepRecord]] = defaultdict(list)
    for r in usable:
        if r.readable:
            by_print[r.fingerprint()].append(r)
    for group in by_print.values():
        for prev, r in zip(group, group[1:]):
            adjacent = order[r.label] == order[prev.label] + 1
            if (prev.step, r.step) == (0, 1):  # lr(0) = 0: the first update leaves the weights as they are
                findings.append(Finding("identical_step", r.label, f"byte-identical to {prev.label}'s, as "
                                        "expected: GPT-NeoX's warmup starts at lr 0, so the first update "
                                        "does not move the weights", "note", other=prev.label))
            else:
                findings.append(Finding("identical_step", r.label,
                                        f"every tensor is byte-identical to {prev.label}'s"
                                        + ("" if adjacent else " (not adjacent in the series)"),
                                        other=prev.label))
            same_as[r.label] = group[0].label
    return same_as


def _duplicate_shards(usable: list[StepRecord], related, findings: list[Finding]) -> set[tuple[str, str, str]]:
    """Weight files (shards) byte-identical across unrelated steps; returns the (step, other,
    file) triples reported, which the tensor check skips."""
    by_file: dict[tuple[str, str], list[StepRecord]] = defaultdict(list)
    for r in usable:
        for name, digest in r.files.items():
            by_file[(name, digest)].append(r)
    covered: set[tuple[str, str, str]] = set()
    for (name, _), group in by_file.items():
        for r in group:
            others = [o for o in group if o is not r and not related(o, r)]
            if others:
                findings.append(Finding("duplicate_shard", r.label,
                                        f"{name} is byte-identical to {_some([o.label for o in others])}'s "
                                        "(a shard from another step?)", other=others[0].label))
                covered.update((r.label, o.label, name) for o in others)
    return covered


def _duplicate_tensors(usable: list[StepRecord], related, covered: set[tuple[str, str, str]],
                       order: dict[str, int], findings: list[Finding]) -> None:
    """Tensors (same key) byte-identical across unrelated steps, outside the shards already
    reported; constant tensors are skipped."""
    from pythia_jax.convert.hf import is_ignored_key

    dup: dict[tuple[str, str], list[str]] = defaultdict(list)
    by_tensor: dict[tuple[str, str, str], list[StepRecord]] = defaultdict(list)
    for r in usable:
        for key, t in r.tensors.items():
            if is_ignored_key(key) or t.stats is None or t.stats.constant or t.stats.numel == 0:
                continue
            by_tensor[(key, t.dtype, t.digest)].append(r)
    for (key, _, _), group in by_tensor.items():
        for r in group:
            for o in group:
                if o is r or related(o, r) or (r.label, o.label, r.tensors[key].file) in covered:
                    continue
                dup[(r.label, o.label)].append(key)
    for (label, other), keys in sorted(dup.items(), key=lambda kv: (order[kv[0][0]], order[kv[0][1]])):
        findings.append(Finding("duplicate_tensor", label,
                                f"{len(keys)} tensor(s) byte-identical to {other}'s: {_some(sorted(keys))}",
                                other=other))


def _config_mismatches(records: Sequence[StepRecord], findings: list[Finding]) -> None:
    """Each step's config compared with the most common architecture of the series."""
    configs = [r for r in records if r.config is not None]
    if not configs:
        return
    common_json, _ = Counter(json.dumps(r.config, sort_keys=True) for r in configs).most_common(1)[0]
    common = json.loads(common_json)
    for r in configs:
        diff = [f"{k} {r.config.get(k)!r} (others: {common.get(k)!r})"
                for k in sorted(set(common) | set(r.config)) if r.config.get(k) != common.get(k)]
        if diff:
            findings.append(Finding("config_mismatch", r.label, "; ".join(diff)))


def _norm_jumps(records: Sequence[StepRecord], usable: list[StepRecord], same_as: dict[str, str],
                findings: list[Finding], *, window: int, z: float, min_jump: float) -> None:
    """Norm jumps of the whole model and of each group, among readable steps with finite values
    (``norm_outliers``); a note when fewer than 4 such steps exist."""
    trend = [r for r in usable if r.readable and r.step is not None
             and not any(t.stats is not None and t.stats.nonfinite for t in r.tensors.values())
             and same_as.get(r.label, r.label) == r.label]
    if len(trend) >= 4:
        jumps: dict[str, list[str]] = defaultdict(list)
        series = {"model": [r.norm for r in trend]}
        for g in sorted(set.intersection(*(set(r.groups) for r in trend))):
            series[g] = [r.groups[g].norm for r in trend]
        for name, values in series.items():
            for i, score in norm_outliers(values, window=window, z=z, min_jump=min_jump):
                jumps[trend[i].label].append(f"{name} {values[i]:.4g} ({score:+.2f} log vs trend)")
        for r in trend:
            if jumps.get(r.label):
                findings.append(Finding("norm_jump", r.label,
                                        f"parameter norm off the series' trend: {_some(jumps[r.label], 6)}"))
    elif len(records) > 1:
        findings.append(Finding("norm_trend", "-", f"only {len(trend)} usable step(s): norm trend not "
                                "checked (needs 4)", "note"))


def norm_outliers(values: Sequence[float], *, window: int = 4, z: float = 6.0,
                  min_jump: float = 0.1) -> list[tuple[int, float]]:
    """Indices of ``values`` (positive norms, in step order) that leave their local trend.

    For each point, its up-to-``window`` neighbours on each side (at least 3 in all) are fitted
    with a Theil–Sen line of log(norm) against position in the series (slope from
    ``scipy.stats.theilslopes``, intercept the median residual: robust to a minority of outliers
    among the neighbours); the point is flagged when its
    log-norm is further from the line than ``max(z · 1.4826 · MAD of the neighbours' residuals,
    min_jump)``. ``min_jump`` (natural log units; 0.1 ≈ 10 %) keeps near-constant series from
    flagging noise. Returns ``[(index, signed log distance)]``.
    """
    from scipy import stats

    x = np.log(np.maximum(np.asarray(values, np.float64), 1e-30))
    n = len(x)
    out = []
    for i in range(n):
        idx = [j for j in range(max(0, i - window), min(n, i + window + 1)) if j != i]
        if len(idx) < 3:
            continue
        t = np.asarray(idx, np.float64)
        slope = float(stats.theilslopes(x[idx], t)[0])
        intercept = float(np.median(x[idx] - slope * t))  # (scipy's median(y) - slope*median(t) is
        # biased when the neighbours are unevenly placed around the point)
        resid = x[idx] - (intercept + slope * t)
        mad = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
        dist = float(x[i] - (intercept + slope * i))
        if abs(dist) > max(z * mad, min_jump):
            out.append((i, dist))
    return out


def write_report_json(report: AuditReport, out: str | os.PathLike, tensors: bool = True) -> str:
    """Write ``report.to_json()`` to ``out`` (written aside, then renamed)."""
    out = os.fspath(out)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report.to_json(tensors=tensors), f, indent=1)
        f.write("\n")
    os.replace(tmp, out)
    return out


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


__all__ = ["AuditReport", "Finding", "StepRecord", "TensorPrint", "Stats", "audit_series", "analyze",
           "find_series", "norm_outliers", "write_report_json", "plain_hash_seconds", "ERROR_KINDS"]
