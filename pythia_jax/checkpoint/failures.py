"""Reporting a failed save in one line: the OS error behind it and which steps are intact.

Orbax logs a failed background save with full tracebacks from several threads; the training
checkpointer reports the failure itself (``CheckpointSaveFailed``), so those records are moved
to DEBUG level by :func:`_quiet_orbax_tracebacks`. A failed read of one array leaves Orbax's
sibling reads running on a closed event loop; what they print is moved there too (see
:func:`_quiet_abandoned_reads`).
"""

from __future__ import annotations

import errno
import logging
import os
import sys

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


def _quiet_abandoned_reads() -> None:
    """Route the noise of an abandoned Orbax restore to DEBUG (installed once per process).

    When one array of a step cannot be read (a truncated or damaged file), Orbax's restore
    raises from ``asyncio.gather`` and closes its event loop while the step's other reads are
    still in flight. They then end in ``sys.unraisablehook`` as "Exception ignored in: <coroutine
    _read_array_index_and_device_put>" and, from tensorstore's completion callbacks, as bare
    "RuntimeError: Event loop is closed" tracebacks: dozens of them for the one failure the
    checkpointer already reports in a line and falls back from. Only those two kinds are moved
    to DEBUG; anything else goes to the previous hook.
    """
    if getattr(sys.unraisablehook, "_pythia_jax_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(u) -> None:
        code = getattr(u.object, "cr_code", None)
        if code is not None and "orbax" in code.co_filename and isinstance(u.exc_value, Exception):
            logger.debug("abandoned Orbax read %s: %s", code.co_name, u.exc_value)
            return
        frames, t = [], u.exc_traceback
        while t is not None:
            frames.append(t.tb_frame.f_code.co_name)
            t = t.tb_next
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed" \
                and "call_soon_threadsafe" in frames:
            logger.debug("a read completed after Orbax closed its event loop")
            return
        previous(u)

    hook._pythia_jax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    asyncio_logger = logging.getLogger("asyncio")  # its "Task exception was never retrieved"
    if _ABANDONED_TASK_FILTER not in asyncio_logger.filters:
        asyncio_logger.addFilter(_ABANDONED_TASK_FILTER)


class _AbandonedTaskFilter(logging.Filter):
    """asyncio logs an abandoned Orbax read task at ERROR ("Task exception was never retrieved
    … coro=<async_deserialize() … orbax/…>"), which the CLI showed as "error:" on a run that
    had fallen back and went on; such records go to this module's logger at DEBUG instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Task exception was never retrieved") and "orbax" in message:
            logger.debug("abandoned Orbax task: %s", message.splitlines()[-1][:300])
            return False
        return True


_ABANDONED_TASK_FILTER = _AbandonedTaskFilter()


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
    """Every step up to 12 (``0, 1, 2, 4, 5, 8, 10, 15, 16, 20``, so a message lists the valid
    choices), else the first six and the last three with the count (``0, 1, 2, 4, 8, 16, …,
    142000, 143000 (154 steps)``); ``none`` for none."""
    steps = list(steps)
    if not steps:
        return "none"
    if len(steps) <= 12:
        return ", ".join(str(s) for s in steps)
    return (", ".join(map(str, steps[:6])) + ", …, " + ", ".join(map(str, steps[-3:]))
            + f" ({len(steps)} steps)")


_step_list = step_list
