"""The training checkpointer: saves on a step schedule, failed-save reports, verified restore.

A step directory is written under a temporary name and renamed (local disk) or marked with
``commit_success.txt`` (``gs://``) by Orbax when complete, so an interrupted save is never seen
as a step. :meth:`TrainCheckpointer.restore` without a step walks back from the newest step,
warning about each incomplete or corrupt one, until one restores and verifies.

Multi-host: every process calls every method (Orbax synchronises); JSON items are written by
process 0; grain iterator states are written per process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Mapping

from pythia_jax.checkpoint.failures import _failure_reason, _quiet_abandoned_reads, _quiet_orbax_tracebacks, _step_list
from pythia_jax.checkpoint.hostio import _bounded_io_registry
from pythia_jax.checkpoint.integrity import step_problem
from pythia_jax.checkpoint.items import _save_args
from pythia_jax.checkpoint.layout import (
    _TMP_SUFFIX,
    OPT_STATE,
    PARAMS,
    CheckpointIntegrityError,
    CheckpointSaveFailed,
    _epath,
    _is_primary,
    _sync,
    config_differences,
    read_model_config,
    write_model_config,
)
from pythia_jax.checkpoint.restore import RestoredState, _restore_items
from pythia_jax.checkpoint.schedule import SaveSteps, _as_predicate
from pythia_jax.config import ModelConfig
from pythia_jax.errors import CheckpointError
from pythia_jax.io_utils import is_url

logger = logging.getLogger(__name__)


class TrainCheckpointer:
    """Saves and restores training state on a step schedule with Orbax (local disk or ``gs://``).

    Args:
      directory: checkpoint root (local path, ``file://`` path or ``gs://bucket/path``).
      save_steps: a :class:`CheckpointSchedule`, a collection of steps or a ``step -> bool``
        predicate (default: Pythia's 154 steps).
      async_save: write in a background thread (device→host copy happens before ``save`` returns,
        so the caller may donate/overwrite its arrays afterwards).
      max_to_keep: keep only the newest N steps (default: keep all, as Pythia does). A writer
        opened on a directory already holding more than N + 1 steps raises ``CheckpointError``:
        the next save would delete the older ones (saved under another keep setting) unasked.
      model_config: when given, ``<dir>/model_config.json`` is written (or checked: a directory
        of a different model shape raises ``CheckpointError`` right away).
      io_limit_bytes: when given, the checkpointer works in "host I/O" mode for one-off saves and
        restores (the converters): host arrays (numpy, or one-device CPU jax.Arrays) are written
        straight from memory in chunks of at most 16 MiB, restores to host memory read one array
        at a time, and device arrays move at most this many bytes at a time (must be at least
        the largest array). Peak memory stays near one copy of the tree; the files are ordinary
        checkpoints (chunked), restorable by any checkpointer onto any mesh.
    """

    def __init__(self, directory: str | os.PathLike, *, save_steps: SaveSteps | None = None,
                 async_save: bool = True, max_to_keep: int | None = None,
                 model_config: ModelConfig | None = None, io_limit_bytes: int | None = None):
        import orbax.checkpoint as ocp

        self.directory = _epath(directory)
        self._should_save = _as_predicate(save_steps)
        _quiet_orbax_tracebacks()
        _quiet_abandoned_reads()
        self.model_config = model_config
        if model_config is not None and max_to_keep is not None:
            self._check_keep(max_to_keep)
        if model_config is not None:
            write_model_config(self.directory, model_config)
        # Only a writer (given the model config) removes leftovers of interrupted saves: a reader
        # (load_params, eval) opened beside a running training would delete its save in flight.
        writer = model_config is not None
        if writer:
            self._warn_tmp_dirs()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=writer,
            enable_should_save_is_saving_in_progress_check=False)
        registry = _bounded_io_registry(io_limit_bytes) if io_limit_bytes else None
        self._host_io = registry is not None
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        self._bad_steps: set[int] = set()  # found unusable by restore/latest_valid_step
        self._pending: int | None = None  # step of the last save, until it is confirmed on disk
        self._save_error: BaseException | None = None  # what the background save raised
        self._failed = False  # a failed save was reported (Orbax raises it again on each wait)
        self._error_lock = threading.Lock()
        self._record_background_errors()

    def _check_keep(self, max_to_keep: int) -> None:
        """Refuse to open a writer whose ``max_to_keep`` would delete steps saved before it."""
        from pythia_jax.checkpoint.failures import step_list

        if not self.directory.exists():
            return
        # committed steps only: on gs:// Orbax writes into <step>/ directly, so a save cut short
        # leaves a folder without its commit marker
        remote = is_url(str(self.directory))
        saved = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir()
                       and (not remote or (p / "commit_success.txt").exists()))
        # one more than N: a run with this setting stopped between a save and its pruning
        if len(saved) > max_to_keep + 1:
            raise CheckpointError(
                f"{self.directory} holds {len(saved)} checkpoint steps ({step_list(saved)}), but keep_checkpoints "
                f"= {max_to_keep} would delete all but the newest {max_to_keep} at the next save; keep them "
                "(TrainConfig.keep_checkpoints = None or a larger number) or delete the steps you do not want first")

    # -------------------------------------------------------------- queries
    def should_save(self, step: int) -> bool:
        return bool(self._should_save(int(step)))

    def all_steps(self) -> list[int]:
        """Every step Orbax sees as finalized (valid or not), ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_valid_step(self) -> int | None:
        """Newest step that looks complete (commit marker, readable metadata, all items present).

        Incomplete or unreadable steps are skipped with a warning. Array bytes are verified on
        restore (checksums), not here.
        """
        skipped: list[int] = []
        for step in reversed(self.all_steps()):
            problem = step_problem(self.directory, step)
            if problem is None:
                self._report_fallback(step, skipped)
                return step
            self._bad_steps.add(step)
            skipped.append(step)
            self._report_unusable(step, problem)
        self._report_fallback(None, skipped)
        return None

    def _report_unusable(self, step: int, problem: str) -> None:
        """One readable line: the decision first, then the reason cut to its first line."""
        reason = str(problem).strip().splitlines()[0] if str(problem).strip() else "unknown"
        if len(reason) > 160:
            reason = reason[:157] + "..."
        logger.warning("checkpoint step %d in %s is unusable, trying an earlier step (%s)",
                       step, self.directory, reason)

    def _report_fallback(self, step: int | None, skipped: list[int]) -> None:
        if not skipped:
            return
        newer = ", ".join(map(str, skipped))
        if step is None:
            logger.warning("no usable checkpoint step in %s (unusable: %s)", self.directory, newer)
        else:
            logger.warning("using checkpoint step %d of %s (newer step(s) %s unusable)", step,
                           self.directory, newer)

    # -------------------------------------------------------------- save
    def save(self, step: int, params: Any, opt_state: Any = None, data_state: Any = None,
             metadata: Mapping[str, Any] | None = None, *, force: bool = False,
             params_dtype: Any = None) -> bool:
        """Save the state of ``step`` when the schedule says so (or ``force``). Returns True if saved.

        ``params``/``opt_state``: pytrees of (sharded) arrays. ``data_state`` is a grain
        iterator (``get_state``/``set_state``; saved per process) or a JSON-serialisable document
        (saved once, by process 0: use it for global positions). ``metadata``: a JSON document.
        ``params_dtype`` (host I/O mode, i.e. ``io_limit_bytes``, only): store the params leaves
        it holds exactly (float16 / bfloat16 -> float32) in it, cast as they are written, so no
        widened copy of the tree is made; other leaves are stored as they are.
        Asynchronous unless ``async_save=False``; a step already on disk is not overwritten.
        """
        import orbax.checkpoint as ocp

        step = int(step)
        if not (force or self.should_save(step)):
            return False
        if self._pending is not None:  # Orbax would wait for it anyway: report its failure first
            self._finish(self._pending)
        if step in self._manager.all_steps():
            if step not in self._bad_steps:
                logger.warning("checkpoint step %d already exists in %s (written earlier); not "
                               "overwritten, so this run's state at step %d is not saved", step,
                               self.directory, step)
                return False
            self._quarantine(step)
        args, _ = _save_args(params, opt_state, data_state, metadata, step,
                             host_io=self._host_io, params_dtype=params_dtype)
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as e:  # noqa: BLE001 - e.g. a full disk during a synchronous save
            self._failed = True
            raise self._save_failed(step, e) from e
        if saved:
            self._pending = step
        return bool(saved)

    def check_for_errors(self) -> None:
        """Raise :class:`CheckpointSaveFailed` if the last save failed; cheap, never blocks.

        Call it after every training step: an asynchronous save runs in Orbax's background
        threads, and its failure (e.g. ``No space left on device``) would otherwise surface only
        at the next save. A save counts as finished once Orbax reports no save in progress; its
        error is then collected (``wait_until_finished`` returns at once), and its step must be
        complete on disk (:func:`step_problem`).
        """
        step = self._pending
        if step is None or self._manager.is_saving_in_progress():
            return
        self._finish(step)

    def _finish(self, step: int) -> None:
        """Collect the outcome of the (finished or awaited) save of ``step``; raise if it failed."""
        error: BaseException | None = None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the background save's error, re-raised by Orbax
            error = e
        with self._error_lock:
            error = self._save_error or error
        problem = step_problem(self.directory, step) if error is None else None
        self._pending = None
        if error is not None or problem is not None:
            self._failed = True
            raise self._save_failed(step, error, problem)

    def _record_background_errors(self) -> None:
        """Keep the exception of a failed background save for :meth:`check_for_errors`.

        Orbax's save-finalize thread asks its async checkpointer for errors, logs the one it
        finds and drops it (the step is then left unfinalized), so the error is recorded here as
        it passes. Without this hook (a future Orbax) a failed save is still detected, from the
        directory, only without its reason.
        """
        inner = getattr(self._manager, "_checkpointer", None)
        check = getattr(inner, "check_for_errors", None)
        if check is None:
            return

        def recording_check() -> None:
            try:
                check()
            except BaseException as e:
                with self._error_lock:
                    if self._save_error is None:
                        self._save_error = e
                raise

        try:
            inner.check_for_errors = recording_check
        except AttributeError:  # pragma: no cover - a read-only attribute in another Orbax
            pass

    def _save_failed(self, step: int, error: BaseException | None,
                     problem: str | None = None) -> "CheckpointSaveFailed":
        """The one-line report of a failed save: which step, where, why, which steps are intact."""
        with self._error_lock:
            self._save_error = None
        why = _failure_reason(error) if error is not None else f"the step is not on disk ({problem})"
        try:
            intact = [s for s in self.all_steps() if s != step and step_problem(self.directory, s) is None]
        except Exception:  # noqa: BLE001 - the directory itself may be the problem
            intact = None
        if intact is None:
            kept = "the intact steps could not be listed"
        elif intact:
            kept = (f"intact steps: {_step_list(intact)} (a rerun of the same command resumes from "
                    f"{intact[-1]})")
        else:
            kept = "no intact step (a rerun starts from step 0)"
        return CheckpointSaveFailed(f"saving checkpoint step {step} to {self.directory}/{step} failed: "
                                    f"{why}; {kept}; fix the cause, then rerun (it removes the "
                                    "partial files)")

    def wait_until_finished(self) -> None:
        """Wait for the save in flight, then raise :class:`CheckpointSaveFailed` if it failed."""
        if self._pending is not None:
            self._finish(self._pending)
        else:
            self._wait_quietly()

    def _wait_quietly(self) -> None:
        """Wait for Orbax; a failure already reported (Orbax re-raises it on every wait) is not
        raised again."""
        try:
            self._manager.wait_until_finished()
        except Exception:  # noqa: BLE001
            if not self._failed:
                raise

    def close(self, check: bool = True) -> None:
        """Finish the save in flight and release Orbax's threads; ``check``: report a failed save
        (False: when another error is already on its way)."""
        try:
            if check:
                self.wait_until_finished()
            else:
                self._failed = self._failed or self._pending is not None
                self._wait_quietly()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - the failed save again
                if not self._failed:
                    raise

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(check=exc_type is None)  # never mask the exception already in flight

    # -------------------------------------------------------------- restore
    def restore(self, step: int | None = None, abstract_state: Mapping[str, Any] | None = None, *,
                data_iterator: Any = None, host_params: bool = False) -> RestoredState | None:
        """Restore ``step`` (or the newest valid step) onto the shardings of ``abstract_state``.

        ``abstract_state`` maps ``"params"`` (optionally ``"opt_state"``) to trees of
        ``jax.ShapeDtypeStruct`` with ``sharding`` (e.g. ``jax.eval_shape`` output plus the
        training shardings) or real arrays; each device reads only its slice. Without it,
        params are restored onto the first local device and the optimizer state is skipped.
        ``data_iterator``: the grain iterator to restore into (when grain state was saved).

        With ``step=None``, steps that are incomplete or fail verification are skipped with a
        warning; returns None when no step is usable. A checkpoint whose shapes differ from the
        target raises ``CheckpointError`` at once. ``host_params=True`` (without a params target)
        restores params as numpy arrays (no device copy: the converters' low-memory path).
        """
        if step is not None:
            return self._restore_step(int(step), abstract_state, data_iterator, host_params)
        skipped: list[int] = []
        for candidate in reversed(self.all_steps()):
            problem = step_problem(self.directory, candidate)
            if problem is None:
                try:
                    restored = self._restore_step(candidate, abstract_state, data_iterator, host_params)
                    self._report_fallback(candidate, skipped)
                    return restored
                except CheckpointIntegrityError as e:
                    problem = str(e)
            self._bad_steps.add(candidate)
            skipped.append(candidate)
            self._report_unusable(candidate, problem)
        self._report_fallback(None, skipped)
        return None

    def _restore_step(self, step: int, abstract_state: Mapping[str, Any] | None,
                      data_iterator: Any, host_params: bool = False) -> RestoredState:
        abstract_state = dict(abstract_state or {})
        unknown = set(abstract_state) - {PARAMS, OPT_STATE}
        if unknown:
            raise ValueError(f"abstract_state has unknown keys {sorted(unknown)}; "
                             "expected params/opt_state")
        if self.model_config is not None:
            stored = read_model_config(self.directory)
            if stored is not None and config_differences(stored, self.model_config):
                raise CheckpointError(f"{self.directory}: different model shape: "
                                      + "; ".join(config_differences(stored, self.model_config)))
        return _restore_items(self._manager, self.directory, step, abstract_state, data_iterator,
                              host_params=host_params)

    def _quarantine(self, step: int) -> None:
        """Move an unusable step aside (``<step>.unusable-<time>``, kept for inspection) so it can be re-saved."""
        target = self.directory / f"{step}.unusable-{int(time.time())}"
        if _is_primary():
            (self.directory / str(step)).rename(target)
        _sync(f"pythia_jax_quarantine_{step}")
        logger.warning(f"re-saving step {step}: the unusable copy was moved to {target}")
        self._bad_steps.discard(step)
        self._manager.reload()

    def _warn_tmp_dirs(self) -> None:
        if not self.directory.exists():
            return
        leftovers = sorted(p.name for p in self.directory.iterdir() if _TMP_SUFFIX in p.name)
        if leftovers:
            logger.warning(f"{self.directory}: removing incomplete checkpoint(s) from an interrupted "
                           f"save: {', '.join(leftovers)}")

