"""Finding the steps of a series (HF revisions ``DIR/step<N>/`` or a checkpoint directory) and
auditing them: ``find_series``, ``audit_series``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

from pythia_jax.analysis.audit.findings import analyze
from pythia_jax.analysis.audit.readers import _audit_checkpoint_step, _audit_hf_step
from pythia_jax.analysis.audit.report import _STEP_DIR, AuditReport, Finding, StepRecord, _some
from pythia_jax.errors import PythiaJaxError


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
    from pythia_jax.convert.neox import is_neox_checkpoint

    if is_neox_checkpoint(p):
        raise PythiaJaxError(f"{p} is a GPT-NeoX checkpoint, which audit does not read: convert its steps first "
                             "(pythia-jax convert neox-to-jax) and audit the checkpoint directory")
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
    if steps is None:
        notes += _missing_pythia_steps([s for _, s, _ in entries if s is not None])
    findings = notes + analyze(records, norm_window=norm_window, norm_z=norm_z, norm_min_jump=norm_min_jump)
    return AuditReport(directory=str(directory), layout=layout, steps=records, findings=findings,
                       seconds=time.perf_counter() - t0, bytes_read=sum(r.bytes_read for r in records))


def _missing_pythia_steps(present: list[int]) -> list[Finding]:
    """A series whose steps all lie on the released Pythia schedule (``checkpoint.schedule.
    pythia_steps``: 0, 1, 2, 4, …, 512, 1000, 2000, …, 143000) but lacks some of its steps between
    its first and last: a note naming them (a download or copy that stopped part-way, or a subset
    kept on purpose; a series passed "no problems" without a word)."""
    from pythia_jax.checkpoint.failures import step_list
    from pythia_jax.checkpoint.schedule import pythia_steps

    schedule = pythia_steps()
    have = set(present)
    if len(have) < 2 or not have <= set(schedule):
        return []
    lo, hi = min(have), max(have)
    missing = [s for s in schedule if lo <= s <= hi and s not in have]
    if not missing:
        return []
    return [Finding("missing_steps", "-", f"{len(missing)} step(s) of the Pythia checkpoint schedule between "
                    f"{lo} and {hi} are not in this series: {step_list(missing)}", "note")]
