"""Reporting a failed save in one line: the OS error behind it and which steps are intact.

Orbax logs a failed background save with full tracebacks from several threads; the training
checkpointer reports the failure itself (``CheckpointSaveFailed``), so those records are moved
to DEBUG level by :func:`_quiet_orbax_tracebacks`.
"""

from __future__ import annotations

import errno
import logging
import os

logger = logging.getLogger(__name__)


class _OrbaxTracebackFilter(logging.Filter):
    """Orbax logs a failed save's exception with its full traceback from each of its threads
    (hundreds of lines on stderr). The checkpointer reports such a failure itself, in one line,
    so these records go to this module's logger at DEBUG level instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "orbax" in (record.pathname or ""):
            logger.debug("Orbax: %s", record.getMessage(), exc_info=record.exc_info)
            return False
        return True


_ORBAX_FILTER = _OrbaxTracebackFilter()


def _quiet_orbax_tracebacks() -> None:
    absl_logger = logging.getLogger("absl")  # absl.logging, which Orbax logs through
    if _ORBAX_FILTER not in absl_logger.filters:
        absl_logger.addFilter(_ORBAX_FILTER)


def _failure_reason(error: BaseException) -> str:
    """The OS error behind ``error`` (``No space left on device: <file>``), else its first line."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            where = f" ({e.filename})" if e.filename else ""
            return f"{os.strerror(e.errno)}{where} [errno {errno.errorcode.get(e.errno, e.errno)}]"
        e = e.__cause__ or e.__context__
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:300] + "…"
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def step_list(steps: list[int]) -> str:
    """``0, 1, 2`` or ``0, 1, …, 3000 (154 steps)`` for long lists; ``none`` for none."""
    steps = list(steps)
    if not steps:
        return "none"
    if len(steps) <= 6:
        return ", ".join(str(s) for s in steps)
    return f"{steps[0]}, {steps[1]}, …, {steps[-1]} ({len(steps)} steps)"


_step_list = step_list
