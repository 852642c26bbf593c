"""Ctrl-C (SIGINT) that is never lost and never leaves a half-written output behind.

Python delivers SIGINT as a ``KeyboardInterrupt`` raised in whatever Python code the main thread
runs at that moment. Two things go wrong for a writer:

- Raised inside a garbage-collector callback (JAX's ``_xla_gc_callback``) or a ``__del__``, the
  exception is printed as "Exception ignored in …" and dropped: the command carries on and
  publishes its output as if nothing happened.
- Raised while the main thread waits on a write that other threads carry out (Orbax/tensorstore),
  it unwinds the main thread while those threads still create files in the temporary folder, so
  its removal can leave files behind.

``watch_interrupts()`` (installed by the CLI around a command) records every SIGINT before raising
it, so ``raise_if_interrupted()`` (called by ``atomic_output_dir`` / ``publish`` before anything is
renamed into place) honours one that was swallowed. ``deferred_interrupts()`` holds SIGINT back
while a multi-threaded write runs (the first Ctrl-C is logged and raised when the write has
returned; a second one raises at once).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Iterator

logger = logging.getLogger(__name__)

_interrupted = threading.Event()
_deferring: list[str] = []  # what the main thread is finishing before it honours Ctrl-C


def _on_sigint(signum: int, frame: Any) -> None:
    first = not _interrupted.is_set()
    _interrupted.set()
    if _deferring and first:
        logger.warning("interrupted: finishing %s before removing it (Ctrl-C again to stop at once)",
                       _deferring[-1])
        return
    raise KeyboardInterrupt


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handler_installed() -> Iterator[bool]:
    """Install ``_on_sigint`` for the block when the main thread runs it and SIGINT has Python's
    default handler (or ours already); yield whether ours is active. The outermost installation
    starts and ends with no interrupt recorded."""
    if not _in_main_thread():
        yield False
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is _on_sigint:
        yield True
        return
    if previous is not signal.default_int_handler:
        yield False  # someone else's handler (a test runner, an embedding program): leave it
        return
    _interrupted.clear()
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield True
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted.clear()


@contextlib.contextmanager
def watch_interrupts() -> Iterator[None]:
    """Record every Ctrl-C of the block (it is raised as usual) for ``raise_if_interrupted``."""
    with _handler_installed():
        yield


def raise_if_interrupted() -> None:
    """``KeyboardInterrupt`` when a Ctrl-C arrived under ``watch_interrupts`` /
    ``deferred_interrupts`` (including one that Python printed as "Exception ignored" and dropped)."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupts(what: str) -> Iterator[None]:
    """Run the block to its end even when Ctrl-C arrives (logged once, naming ``what``), then
    raise ``KeyboardInterrupt``; a second Ctrl-C raises at once. For writes that other threads
    carry out, so that nothing is still writing when the caller removes the temporary output.
    Only in the main thread with Python's default SIGINT handler (else the block runs as is)."""
    with _handler_installed() as active:
        if not active:
            yield
            return
        raise_if_interrupted()  # one already swallowed: do not start the write
        _deferring.append(what)
        try:
            yield
        finally:
            _deferring.pop()
        raise_if_interrupted()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM is handled as Ctrl-C is (``_on_sigint``): recorded, so that one
    Python drops (in a ``__del__``) still stops the caller at its next ``raise_if_interrupted``;
    deferred while a threaded write finishes (``deferred_interrupts``); otherwise raised as
    ``KeyboardInterrupt``, so that cleanup runs instead of the process being killed where it
    stands. Only in the main thread while SIGTERM has its default action (a handler someone
    installed, e.g. JAX's preemption notifier on a TPU pod, is left alone); inner handlers
    (``PreemptionGuard``) take over for their own blocks and restore this one after."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
