"""The audit's records and report: per-tensor ``Stats`` / ``TensorPrint``, per-step ``StepRecord``,
``Finding`` and ``AuditReport`` (its table and JSON), ``write_report_json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections import defaultdict
from typing import Any, Sequence

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



def _some(items: Sequence[str], n: int = 4) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


def write_report_json(report: AuditReport, out: str | os.PathLike, tensors: bool = True) -> str:
    """Write ``report.to_json()`` to ``out`` through a hidden temporary sibling and a rename
    (``io_utils.write_text_atomic``; the temporary is removed on any failure). An existing ``out``
    that is not an audit report (a folder, any other file) is refused (``PythiaJaxError``)."""
    from pythia_jax.io_utils import check_output_file, write_text_atomic

    out = os.fspath(out)
    check_output_file(out, "report")
    write_text_atomic(out, json.dumps(report.to_json(tensors=tensors), indent=1) + "\n")
    return out
