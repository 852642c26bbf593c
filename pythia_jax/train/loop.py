"""The trainer: restore → iterate → step → log → evaluate → checkpoint (``pythia-jax train``).

Output directory layout (``TrainConfig.output_dir``)::

    checkpoints/      Orbax checkpoints on the Pythia schedule (pythia_jax.checkpoint)
    tensorboard/      TensorBoard event files
    metrics.jsonl     one JSON line per step (step, loss, grad_norm, lr, …) and per evaluation;
                      a resume first drops the lines of the steps after the restored one, so
                      every step appears once; NaN/inf are written as null
    train.lock        held by the running ``train`` (host, pid, start time): a second ``train``
                      on the same directory is refused (``pythia_jax.train.run_lock``)
    index_maps/       GPT-NeoX index-map caches (unless DataConfig.cache_dir)
    hf/ (optional)    the final step exported as a Hugging Face directory

When ``output_dir`` is a URL (``gs://…``) only ``checkpoints/`` goes there; the logs and caches go
to a local mirror folder (``local_output_dir``).

A run always resumes from the newest valid checkpoint in ``checkpoints/`` (data iterator included),
so re-running the same command after a crash, SIGKILL or SIGTERM continues exactly where the last
checkpoint left off. Every checkpoint records the run's configuration (:func:`run_config`: data
source, order, seed, batch, sequence length, steps; schedule; model); a resume whose settings
differ is refused with one line (:func:`check_resume`) instead of starting over: a changed data
order or model always, a changed schedule (``num_steps``, optimizer settings) unless
``TrainConfig.allow_schedule_change``; the run's recorded start (``init``) is kept, and a command
naming another start is refused. A failed checkpoint save (e.g. a full disk) stops the run within a
step with ``CheckpointSaveFailed``. ``output_dir`` must be new, empty or a run's folder
(``paths.check_run_dir``), and a start that fails before its first step removes what it created
(``paths.StartFootprint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
from typing import Any

import jax
import numpy as np

from pythia_jax.train.batches import evaluate, make_data_iterator, make_eval_batches
from pythia_jax.train.config import TrainConfig
from pythia_jax.train.distributed import maybe_initialize_distributed, on_tpu_vm
from pythia_jax.train.hooks import (
    CheckpointHook,
    EvalHook,
    MetricsHook,
    PreemptionHook,
    RunState,
    SaveErrorsHook,
    TrainingDiverged,
    TransformStatsHook,
    run_steps,
)
from pythia_jax.train.paths import local_output_dir
from pythia_jax.train.resume import (
    RUN_CONFIG_VERSION,
    _same_neox_rows,  # noqa: F401 - re-exported for tests
    check_resume,
    run_config,
)

logger = logging.getLogger(__name__)

# The trainer's API; the helpers it is built from are re-exported from their modules (batches,
# distributed, resume, paths) so that ``pythia_jax.train.loop.<name>`` keeps working.
__all__ = ["TrainResult", "TrainingDiverged", "train", "export_hf", "RUN_CONFIG_VERSION", "run_config",
           "check_resume", "evaluate", "make_data_iterator", "make_eval_batches", "maybe_initialize_distributed",
           "on_tpu_vm", "local_output_dir"]


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns (host values)."""
    final_step: int
    params: Any  # jax arrays in their training shardings
    losses: dict[int, float]  # step number (1-based: the loss of the batch of step n-1) -> loss
    eval_losses: dict[int, float]
    stopped: str | None = None  # "preempted" when a stop signal ended the run early
    hf_dir: str | None = None


def train(cfg: TrainConfig, *, devices=None, max_steps: int | None = None) -> TrainResult:
    """Run (or resume) training as configured. ``max_steps``: stop after this many steps of this
    invocation (tests, benchmarks); the schedule and data order still follow ``cfg.num_steps``."""
    from pythia_jax.io_utils.interrupts import terminate_as_interrupt
    from pythia_jax.train import run_lock
    from pythia_jax.train.paths import StartFootprint, check_export_dir, check_run_dir

    maybe_initialize_distributed(cfg.distributed)
    check_run_dir(cfg.output_dir)  # not into an HF export or any other folder that is not a run
    _on_every_process(check_export_dir, cfg)  # the final export replaces only an earlier export of this run
    local = local_output_dir(cfg.output_dir)
    # what a failed start (a missing init_from, dataset …) created is removed again (process 0,
    # which holds the lock; local files only: a URL output_dir keeps its checkpoints/ folder)
    footprint = StartFootprint(local) if jax.process_index() == 0 else None
    # One train per run directory: a second one is refused before it touches anything.
    lock = run_lock.acquire(cfg.output_dir, local)
    failed = True
    try:
        # SIGTERM outside the step loop (whose PreemptionGuard saves and stops) is handled as Ctrl-C:
        # a failed start is undone, a final save finishes; one process only (JAX's notifier owns pods')
        with terminate_as_interrupt() if jax.process_count() == 1 else contextlib.nullcontext():
            result = _train(cfg, devices, max_steps, footprint)
        failed = False
        return result
    finally:
        if lock is not None:
            lock.release()
        if failed and footprint is not None:
            footprint.undo()


def _on_every_process(check, cfg: TrainConfig) -> None:
    """Run ``check(cfg)`` on process 0 (whose files the export goes to) and raise its error on every
    process: a refusal seen by process 0 alone left the others waiting at the first collective."""
    from pythia_jax.config import ConfigError

    error = None
    if jax.process_index() == 0:
        try:
            check(cfg)
        except ConfigError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if refused and error is None:
            raise ConfigError("process 0 refused this run's configuration (its log says why); nothing was started")
    if error is not None:
        raise error


def _train(cfg: TrainConfig, devices, max_steps: int | None, footprint=None) -> TrainResult:
    """restore or initialise → the step loop with its hooks → the final save and export."""
    from pythia_jax.checkpoint import TrainCheckpointer
    from pythia_jax.train.metrics import MetricsLog, MetricWriter, Throughput, peak_flops_per_device
    from pythia_jax.train.preemption import PreemptionGuard
    from pythia_jax.train.start import restore_or_init

    local = local_output_dir(cfg.output_dir)
    # Cheap checks first: a checkpoint directory of another model shape, or of a run with another
    # data order or schedule, fails before compiling.
    ckpt = TrainCheckpointer(os.path.join(cfg.output_dir, "checkpoints"), save_steps=cfg.checkpoint_schedule(),
                             async_save=cfg.async_checkpointing, max_to_keep=cfg.keep_checkpoints,
                             model_config=cfg.model)
    run = RunState(cfg)
    ok = False
    writer = None
    try:
        # ---- restore or initialise
        restore_or_init(run, ckpt, devices, max_steps)
        metrics_log = MetricsLog(os.path.join(local, "metrics.jsonl"))
        metrics_log.restart_at(run.step)  # the steps after the restored one are redone: one row each
        writer = MetricWriter(os.path.join(local, "tensorboard") if cfg.tensorboard else None, cfg.num_steps,
                              initial_step=run.step, progress_bar=cfg.progress_bar, tensorboard=cfg.tensorboard)
        resumed = run.restored_step is not None
        writer.message(f"{'resumed from ' + str(ckpt.directory) + '/' + str(run.step) if resumed else 'starting'}: "
                       f"{cfg.model.num_params():,} parameters, mesh {dict(run.setup.mesh.shape)}, "
                       f"{cfg.global_batch} x {cfg.seq_length} tokens per step, steps {run.step} -> {cfg.num_steps}")
        checkpoints = CheckpointHook(ckpt, cfg, last_saved=run.restored_step)
        checkpoints.save(run)  # the starting step, when the schedule has it (step 0 of a new run)
        if footprint is not None:
            footprint.keep()  # started: a later failure leaves the run's files (a resume continues)

        # ---- the step loop
        throughput = Throughput(cfg.model, cfg.seq_length, cfg.tokens_per_step, run.setup.num_devices,
                                peak_flops_per_device(cfg.peak_flops_per_device, run.setup.mesh.devices.flat[0]))
        metrics = MetricsHook(cfg, writer, metrics_log, throughput, checkpoints)
        evals = EvalHook(cfg, metrics)
        throughput.start()
        # multi-process jobs without JAX's preemption service agree on a stop every log_every steps
        # (an all-gather each step would make the host wait for the step just queued)
        with PreemptionGuard(sync_every=cfg.log_every) as guard:
            run_steps(run, [TransformStatsHook(), metrics, SaveErrorsHook(ckpt), evals, checkpoints,
                            PreemptionHook(guard, metrics, checkpoints)])

        # ---- finish
        checkpoints.finish(run)
        hf_dir = None
        if cfg.export_hf and run.stopped is None and run.step == cfg.num_steps:
            hf_dir = export_hf(cfg, run.state.params, cfg.export_hf_dir)
        writer.close()
        ok = True
        return TrainResult(final_step=run.step, params=run.state.params, losses=metrics.losses,
                           eval_losses=evals.eval_losses, stopped=run.stopped, hf_dir=hf_dir)
    except KeyboardInterrupt:
        if writer is not None:
            writer.close()  # the progress bar ends its line: the report below starts its own
        _log_interrupt(ckpt, run.step)
        raise
    finally:
        ckpt.close(check=ok)  # an error already on its way is not replaced by a save's


def export_hf(cfg: TrainConfig, params, out_dir: str) -> str | None:
    """Write ``params`` as an HF directory (process 0).

    One process: ``write_hf_dir`` fetches one tensor (one layer's slice) at a time from the
    devices. Several: each array is gathered to the hosts in turn (``process_allgather``), so no
    device ever holds more than one replicated array.
    """
    from pythia_jax.convert.hf import write_hf_dir

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), params)
    if jax.process_index() != 0:
        return None
    from pythia_jax.errors import PythiaJaxError
    from pythia_jax.train.paths import export_record

    try:
        return write_hf_dir(cfg.model, params, out_dir, dtype=cfg.export_dtype, overwrite=True,
                            source=export_record(cfg))
    except OSError as e:  # a full disk names the export, not output_dir (the checkpoints are saved)
        reason = e.strerror or str(e) or type(e).__name__
        hint = ("free some space or choose another TrainConfig.export_hf" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                else "choose another TrainConfig.export_hf")
        raise PythiaJaxError(f"exporting the final step to {out_dir}: {reason}; {hint}, then rerun the same "
                             "command (the run is complete and saved; only the export is written)") from e



def _log_interrupt(ckpt, step: int | None) -> None:
    """Ctrl-C: say how many steps since the newest checkpoint are lost (after a save in flight ends)."""
    if step is None:
        logger.warning("interrupted before the first step; nothing was trained")
        return
    try:
        ckpt.wait_until_finished()
        saved = [s for s in ckpt.all_steps() if s <= step]
    except Exception:  # noqa: BLE001 - the report must not hide the interrupt
        saved = []
    if not saved:
        logger.warning("interrupted at step %d with no checkpoint saved: all %d steps are lost", step, step)
        return
    last = max(saved)
    logger.warning("interrupted at step %d: the newest checkpoint is step %d, so %d step(s) since it are lost; "
                "the same command resumes from step %d", step, last, step - last, last)

