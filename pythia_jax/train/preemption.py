"""Clean stop on SIGTERM (TPU preemption / maintenance events), agreed on by every process.

The train loop polls :meth:`PreemptionGuard.should_stop` once per step; when it returns True the
loop saves a checkpoint of that step and exits with status 0 and :attr:`PreemptionGuard.message`.

Agreement across processes: a signal reaches hosts at different moments, so the local flag is
never used on its own in a multi-process job. On Cloud TPU (where ``jax.distributed`` runs the
preemption sync manager) JAX's own SIGTERM notifier and ``reached_preemption_sync_point(step)``
are used (then this guard installs no SIGTERM handler of its own); elsewhere the flags are
combined by an all-gather every ``sync_every`` steps (the same steps on every process, so all
stop at the same step).

Usage::

    with PreemptionGuard() as guard:
        for step in range(start, end):
            state = train_step(state, batch)
            if guard.should_stop(step):
                checkpointer.save(step + 1, ..., force=True); print(guard.message); return 0
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Iterable

import numpy as np


class PreemptionGuard:
    """Catches termination signals and tells the loop, consistently on all processes, when to stop.

    Args:
      signals: signals to catch (default SIGTERM). SIGINT is left alone so Ctrl-C still
        interrupts immediately.
      sync_every: in multi-process jobs without JAX's preemption service, all-gather the flag
        every this many steps (the collective costs one tiny all-gather).
      use_jax_sync_point: use ``multihost_utils.reached_preemption_sync_point`` when JAX's
        preemption sync manager is running (TPU pods), ``None`` = auto.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), *, sync_every: int = 1,
                 use_jax_sync_point: bool | None = None):
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.signals = tuple(signals)
        self.sync_every = int(sync_every)
        self._use_jax_sync_point = use_jax_sync_point
        self._event = threading.Event()
        self._received: int | None = None
        self._previous: dict[int, object] = {}
        self.stopped_at: int | None = None

    # ------------------------------------------------------------------ install
    def install(self) -> "PreemptionGuard":
        """Install the signal handlers (main thread only; a no-op elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            if sig == signal.SIGTERM and self._jax_sync_point_available():
                continue  # JAX's preemption notifier owns SIGTERM and propagates it to all hosts
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self._received = signum
        self._event.set()

    # ------------------------------------------------------------------ queries
    @property
    def signal_received(self) -> bool:
        """True when this process has received one of the signals (local, not agreed)."""
        return self._event.is_set()

    def request_stop(self) -> None:
        """Set the flag by hand (same effect as receiving a signal on this process, unnamed)."""
        self._event.set()

    def should_stop(self, step: int) -> bool:
        """True when every process should save and stop after ``step``; the same answer everywhere."""
        import jax

        if self.stopped_at is not None:
            return True
        if jax.process_count() == 1:
            stop = self._event.is_set()
        elif self._jax_sync_point_available():
            from jax.experimental import multihost_utils

            stop = bool(multihost_utils.reached_preemption_sync_point(int(step)))
            if stop and self._received is None:
                self._received = signal.SIGTERM
        else:
            stop = self._agree(step)
        if stop:
            self.stopped_at = int(step)
        return stop

    @property
    def message(self) -> str:
        name = signal.Signals(self._received).name if self._received is not None else "a stop request"
        where = f" after step {self.stopped_at}" if self.stopped_at is not None else ""
        return (f"received {name}: saved a checkpoint{where} and stopped cleanly; "
                "run the same command again to resume")

    # ------------------------------------------------------------------ multi-host
    def _agree(self, step: int) -> bool:
        if int(step) % self.sync_every:
            return False
        from jax.experimental import multihost_utils

        # Gather the signal numbers (0: none; -1: request_stop) so every process can name the signal.
        local = self._received if self._received is not None else (-1 if self._event.is_set() else 0)
        signums = np.asarray(multihost_utils.process_allgather(np.asarray(local, np.int32))).ravel()
        if not np.any(signums):
            return False
        if self._received is None and np.max(signums) > 0:
            self._received = int(np.max(signums))
        return True

    def _jax_sync_point_available(self) -> bool:
        if self._use_jax_sync_point is False:
            return False
        try:
            from jax._src import distributed

            return distributed.global_state.preemption_sync_manager is not None
        except (ImportError, AttributeError):
            return False
