"""What an evaluation result was computed from, and the check that keeps results of different
origins apart when a run is resumed.

Every results row (and every per-example file in the details folder) records its *identity*:

- ``checkpoint``: the folder the checkpoints were read from (``loading.checkpoint_source``);
- ``weights``: the weights of that step (``loading.weights_fingerprint``: a digest of the
  model configuration, dtypes included, and of the checksums the step was saved with);
- ``settings``: what else decides the task's numbers (``task_settings``): ``--limit``, the
  context window, the task data (a digest of the file or of the examples read), the task
  system and lm-eval version, the bootstrap draws, the few-shot items, the memorization sample;
  for memorization also ``rows``, the run's data settings read from that step's run record.

``check_records`` refuses, in one line, a table or details folder that holds results of other
checkpoints, results whose rows lack an identity (written by an older pythia-jax: resuming into
them cannot be proven safe), results of a requested (step, task) computed from other weights or
settings, and results of a requested task computed with other settings at any step (a task's
rows in one table share their settings; only ``rows`` may differ from step to step). Results of
other tasks keep their own settings. A resumed run then skips exactly the (step, task) pairs
whose rows match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from pythia_jax.errors import DataError, PythiaJaxError
from pythia_jax.io_utils import is_url

ID_COLUMNS = ("checkpoint", "weights", "settings")
PER_STEP_KEYS = ("rows",)  # settings that may differ between the steps of one task
LEDGER = "provenance.jsonl"  # the details folder's record of what each file was computed from
_DETAILS_FILE = re.compile(r"^step\d+_.+\.(jsonl|npy)$")


class ProvenanceError(PythiaJaxError):
    """Results of another origin (checkpoints, weights or settings) where a run would resume."""


# ------------------------------------------------------------------------------------- digests
def digest(obj: Any) -> str:
    """``sha256:`` + 16 hex digits of ``obj`` as canonical JSON (dataclasses as dicts)."""
    return "sha256:" + digest_hex(obj)


def digest_hex(obj: Any) -> str:
    """The 16 hex digits of :func:`digest` (for names with their own prefix, e.g. ``ckpt:``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_plain).encode()).hexdigest()[:16]


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    return str(x)


# Files up to this size are named by a hash of all their bytes; larger ones (a tokenized corpus
# given to --ppl-data can be hundreds of GB, read at every start) by their size, modification
# time and the bytes of their first and last MiB.
_WHOLE_FILE_DIGEST_BYTES = 256 << 20
_EDGE_BYTES = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """``sha256:`` + 16 hex digits of a local file's bytes; a URL is named by itself; a file over
    ``_WHOLE_FILE_DIGEST_BYTES`` is named ``stat:`` + a digest of its size, modification time
    (ns) and first and last MiB, without reading the rest (a copy that does not keep the
    modification time is then another file: the safe direction)."""
    text = os.fspath(path)
    if is_url(text):
        return "url:" + text
    h = hashlib.sha256()
    with open(text, "rb") as f:
        info = os.fstat(f.fileno())
        if info.st_size > _WHOLE_FILE_DIGEST_BYTES:
            h.update(f.read(_EDGE_BYTES))
            f.seek(info.st_size - _EDGE_BYTES)
            h.update(f.read(_EDGE_BYTES))
            return "stat:" + digest_hex({"size": info.st_size, "mtime_ns": info.st_mtime_ns,
                                         "edges": h.hexdigest()})
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def _dataset_digest(prefix: str) -> str:
    """The ``.idx`` and ``.bin`` files of an indexed dataset (or a .jsonl file) as one digest."""
    if prefix.endswith(".jsonl"):
        files = [prefix]
    else:
        prefix = prefix[:-4] if prefix.endswith((".idx", ".bin")) else prefix
        files = [prefix + ".idx", prefix + ".bin"]
    missing = [f for f in files if not is_url(f) and not os.path.isfile(f)]
    if missing:
        raise DataError(f"{missing[0]} does not exist (expected an indexed-dataset prefix or a .jsonl file)")
    return digest([file_digest(f) for f in files])


# ------------------------------------------------------------------------------------- settings
def task_settings(name: str, resolved: Any, settings: Any) -> dict[str, Any]:
    """What decides the numbers of task ``name`` (as ``runner.check_tasks`` resolved it) under
    ``settings`` (``runner.EvalSettings``), besides the weights. Memorization's per-step
    ``rows`` are added by the runner from each step's run record."""
    from pythia_jax.eval import generation_tasks

    s = settings
    if name == "perplexity":
        return {"data": _dataset_digest(s.ppl_data), "limit": s.limit, "max_len": s.max_len,
                "text_key": s.ppl_text_key if s.ppl_data.endswith(".jsonl") else None}
    if name == "memorization":
        return {"sample": s.mem_sample, "sample_seed": s.mem_seed if s.mem_sample is not None else None}
    if name == "winobias":
        return {"data": digest(resolved), "limit": s.limit, "split": s.winobias_split,
                "max_new_tokens": s.winobias_max_new_tokens}
    if isinstance(resolved, generation_tasks.TASK_TYPES):
        path = getattr(resolved, "path", None)
        return {"items": digest({k: v for k, v in dataclasses.asdict(resolved).items() if k != "path"}),
                "data": None if path is None else file_digest(path), "limit": s.limit}
    if isinstance(resolved, tuple):  # a zero-shot spec and its examples (native scoring)
        spec, examples = resolved
        return {"system": "native", "spec": digest(spec), "data": digest(examples), "limit": s.limit,
                "max_len": s.max_len}
    from importlib.metadata import version

    from pythia_jax.eval import harness as H
    return {"system": "harness", "lm_eval": version("lm_eval"),
            "data": file_digest(H.default_file(name, s.data_dir)), "limit": s.limit, "max_len": s.max_len,
            "bootstrap_iters": s.bootstrap_iters}


# ------------------------------------------------------------------------------------- the check
def check_records(records: Iterable[Mapping[str, Any]], *, where: str, source: str,
                  expected: Mapping[tuple[int, str], tuple[str, dict]], fix: str) -> None:
    """Refuse (``ProvenanceError``, one line ending in ``fix``) records of ``where`` that this
    evaluation must not resume into (see the module docstring).

    ``records``: dicts with ``step``, ``task`` and the ``ID_COLUMNS`` (None where missing).
    ``source``: this evaluation's checkpoint folder. ``expected``: (step, task) -> (weights,
    settings) of every result this evaluation asks for."""
    tasks: dict[str, dict] = {}
    for (_, task), (_, settings) in expected.items():
        tasks.setdefault(task, _shared(settings))
    for r in records:
        if any(r.get(k) is None for k in ID_COLUMNS):
            raise ProvenanceError(
                f"{where} holds results written by an older pythia-jax, which do not record the "
                f"checkpoints, weights and settings they were computed from, so resuming into them cannot "
                f"be proven safe; {fix}")
        step, task = int(r["step"]), str(r["task"])
        if r["checkpoint"] != source:
            raise ProvenanceError(f"{where} holds results of other checkpoints ({r['checkpoint']}; these are "
                                  f"{source}); {fix}")
        if task not in tasks:
            continue  # another task's results keep their own settings
        differs = _differences(_shared(r["settings"]), tasks[task])
        if differs:
            raise ProvenanceError(f"{where} holds {task} results computed with other settings "
                                  f"(step {step}: {differs}); {fix}")
        want = expected.get((step, task))
        if want is None:
            continue
        if r["weights"] != want[0]:
            raise ProvenanceError(
                f"{where} holds step {step} {task} results of other weights than {source} holds for step "
                f"{step} now ({r['weights']} there, {want[0]} now: the checkpoint was replaced); {fix}")
        differs = _differences(r["settings"], want[1])
        if differs:
            raise ProvenanceError(f"{where} holds step {step} {task} results computed with other settings "
                                  f"({differs}); {fix}")


def _shared(settings: Mapping[str, Any]) -> dict:
    return {k: v for k, v in settings.items() if k not in PER_STEP_KEYS}


def _differences(there: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """``"limit: 10 there, 2 now; …"`` for the keys whose values differ ("" when none)."""
    keys = sorted(set(there) | set(now), key=lambda k: (str(there.get(k, "")).startswith(("sha256:", "stat:", "{")), k))
    return "; ".join(f"{k}: {_show(there.get(k))} there, {_show(now.get(k))} now"
                     for k in keys if _canonical(there.get(k)) != _canonical(now.get(k)))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _show(value: Any) -> str:
    text = "none" if value is None else (value if isinstance(value, str) else _canonical(value))
    return text if len(text) <= 160 else text[:157] + "..."


# ------------------------------------------------------------------------------------- details
class DetailsLedger:
    """``<details>/provenance.jsonl``: one line per per-example file written (``file``, ``step``,
    ``task`` and the ``ID_COLUMNS``), checked like the results table, so that a details folder
    never mixes files of other checkpoints or settings."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LEDGER
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break  # a last line cut short by an interruption
                    try:
                        self.records.append(json.loads(line))
                    except ValueError:
                        raise ProvenanceError(f"{self.path}: unreadable line; use another --details-dir") from None

    def check(self, *, source: str, expected: Mapping[tuple[int, str], tuple[str, dict]]) -> None:
        fix = "use another --details-dir"
        if not self.path.exists() and self.folder.is_dir():
            old = sorted(p.name for p in self.folder.iterdir() if _DETAILS_FILE.match(p.name))
            if old:
                raise ProvenanceError(
                    f"{self.folder} holds per-example outputs ({old[0]}, …) without a record of what they were "
                    f"computed from ({LEDGER}: written by an older pythia-jax), so they could be mixed with "
                    f"these results; {fix}")
        check_records(self.records, where=str(self.folder), source=source, expected=expected, fix=fix)

    def add(self, files: Iterable[str | os.PathLike], step: int, task: str, identity: Mapping[str, Any]) -> None:
        """Record that ``files`` (in the folder) hold step ``step``'s ``task`` outputs of ``identity``."""
        lines = [json.dumps({"file": Path(f).name, "step": int(step), "task": task,
                             **{k: identity[k] for k in ID_COLUMNS}}, sort_keys=True) + "\n" for f in files]
        if not lines:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        self.records.extend(json.loads(x) for x in lines)
