"""The training loop's per-step jobs, one hook each, and the step loop that calls them.

:func:`run_steps` reads a batch, queues the step on the devices and calls every hook in order;
the order is the loop's contract:

1. :class:`TransformStatsHook` (``on_batch``): the row transform's changes in the batch just read;
2. :class:`MetricsHook`: host side of the *previous* step (metrics are fetched one step late, so
   step n+1 is already queued while the host reads step n's), the log and the divergence stop;
3. :class:`SaveErrorsHook`: a failed background save stops the run within a step;
4. :class:`EvalHook`: the held-out loss every ``eval_every`` steps and at the last step;
5. :class:`CheckpointHook`: a checkpoint when the Pythia schedule says so;
6. :class:`PreemptionHook`: a stop signal (SIGTERM) saves the step and ends the loop.

Every hook gets the :class:`RunState` (the train state, the step number, the data iterator);
``on_end`` is called once after the last step (also after a stop).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from pythia_jax.errors import PythiaJaxError
from pythia_jax.train.config import TrainConfig


class TrainingDiverged(PythiaJaxError):
    """N non-finite losses in a row: the run saved a checkpoint and stopped."""


@dataclasses.dataclass
class RunState:
    """What the loop and its hooks share (filled in by ``train.start.restore_or_init``)."""

    cfg: TrainConfig
    setup: Any = None  # builder.TrainSetup: mesh, shardings, compiled steps
    data_it: Any = None  # this process's checkpointable batch iterator, at ``step``
    state: Any = None  # the TrainState, on the devices
    step: int | None = None  # the newest queued step (None until restored or initialised)
    end: int = 0  # the last step of this invocation (``num_steps`` or ``max_steps`` later)
    record: dict | None = None  # the run record stored in every checkpoint (``train.resume``)
    restored_step: int | None = None  # the checkpoint step the run resumed from (on disk already)
    device_metrics: dict | None = None  # the newest step's metrics, still on the devices
    transform_changes: tuple[int, int] | None = None  # (rows, tokens) the transform changed in the batch
    stopped: str | None = None  # "preempted" once a stop signal ended the loop


class Hook:
    """One job of the loop. Every method is a no-op here; subclasses override what they need."""

    def on_batch(self, run: RunState) -> None:
        """The batch of step ``run.step + 1`` was read; the step is not queued yet."""

    def on_step(self, run: RunState) -> None:
        """Step ``run.step`` was queued (``run.state`` is its result, on the devices). Setting
        ``run.stopped`` ends the loop after this hook."""

    def on_end(self, run: RunState) -> None:
        """The loop ended (last step, ``max_steps`` or a stop)."""


def run_steps(run: RunState, hooks: list[Hook]) -> None:
    """Train from ``run.step`` to ``run.end`` (or a stop), calling ``hooks`` in order at each step."""
    while run.step < run.end:
        batch = run.setup.put_batch(next(run.data_it))
        for hook in hooks:
            hook.on_batch(run)
        run.state, run.device_metrics = run.setup.train_step(run.state, batch)
        run.step += 1
        for hook in hooks:
            hook.on_step(run)
            if run.stopped is not None:
                break
        if run.stopped is not None:
            break
    for hook in hooks:
        hook.on_end(run)


class TransformStatsHook(Hook):
    """(rows, tokens) the row transform changed in each step's global batch (None outside its
    window), read from the data iterator right after the batch and logged with the step."""

    def on_batch(self, run: RunState) -> None:
        from pythia_jax.train.batches import transform_changes

        run.transform_changes = transform_changes(run.data_it, run.step)


def checkpoint_metadata(state, cfg: TrainConfig, record: dict | None = None) -> dict:
    """The host values saved with a checkpoint: the loss-scale state, skipped / non-finite step
    counters, tokens seen, batch shape and (``record``) the run record."""
    ls = jax.device_get(state.loss_scale)
    out = {"loss_scale": {"scale": float(ls.scale), "good_steps": int(ls.good_steps),
                          "hysteresis": int(ls.hysteresis)},
           "skipped": int(jax.device_get(state.skipped)),
           "nonfinite_run": int(jax.device_get(state.nonfinite_run)),
           "tokens_seen": int(jax.device_get(state.step)) * cfg.tokens_per_step,
           "global_batch": cfg.global_batch, "seq_length": cfg.seq_length}
    if record is not None:
        from pythia_jax.checkpoint import RUN_CONFIG_KEY

        out[RUN_CONFIG_KEY] = record
    return out


class CheckpointHook(Hook):
    """Checkpoints on the Pythia schedule (``TrainCheckpointer.should_save``), forced ones (stop,
    divergence, the end of an invocation). A step already saved (or restored from) is not saved
    again; the metadata's host reads happen only when a step is saved."""

    def __init__(self, ckpt, cfg: TrainConfig, last_saved: int | None = None):
        self.ckpt = ckpt
        self.cfg = cfg
        self.last_saved = last_saved

    def save(self, run: RunState, force: bool = False) -> None:
        """Checkpoint ``run.state`` at ``run.step`` when the schedule says so (or ``force``)."""
        if run.step != self.last_saved and (force or self.ckpt.should_save(run.step)):
            self.ckpt.save(run.step, run.state.params, run.state.opt_state, run.data_it,
                           checkpoint_metadata(run.state, self.cfg, run.record), force=force)
            self.last_saved = run.step

    def on_step(self, run: RunState) -> None:
        self.save(run)

    def finish(self, run: RunState) -> None:
        """After the loop: the last step of this invocation is always resumable (unless a stop
        already saved it); waits for the saves in flight."""
        if run.stopped is None:
            self.save(run, force=True)
        self.ckpt.wait_until_finished()


class SaveErrorsHook(Hook):
    """A failed background save (e.g. a full disk) raises ``CheckpointSaveFailed`` within a step."""

    def __init__(self, ckpt):
        self.ckpt = ckpt

    def on_step(self, run: RunState) -> None:
        self.ckpt.check_for_errors()


class MetricsHook(Hook):
    """Host side of each step, one step late: fetch its metrics, record them (``losses``,
    ``metrics.jsonl``), write them every ``log_every`` steps with the throughput; stop with a
    checkpoint after ``max_nonfinite_steps`` non-finite losses in a row (``TrainingDiverged``)."""

    def __init__(self, cfg: TrainConfig, writer, metrics_log, throughput, checkpoints: CheckpointHook):
        self.cfg = cfg
        self.writer = writer
        self.metrics_log = metrics_log
        self.throughput = throughput
        self.checkpoints = checkpoints
        self.losses: dict[int, float] = {}
        # (step, its metrics on device, transform changes), oldest first
        self.in_flight: list[tuple[int, dict, tuple[int, int] | None]] = []

    def on_step(self, run: RunState) -> None:
        self.writer.advance()
        self.in_flight.append((run.step, run.device_metrics, run.transform_changes))
        self.settle(run, keep=1)  # the previous step, while this one runs

    def on_end(self, run: RunState) -> None:
        self.settle(run)

    def settle(self, run: RunState, keep: int = 0) -> None:
        """Record the steps in flight, all but the newest ``keep``; stop on divergence."""
        while len(self.in_flight) > keep:
            done, device_metrics, changed = self.in_flight.pop(0)
            metrics = self._record(run, done, device_metrics, changed)
            if metrics["nonfinite_run"] >= self.cfg.max_nonfinite_steps:
                while self.in_flight:  # the step already queued is recorded and saved too
                    self._record(run, *self.in_flight.pop(0))
                self.checkpoints.save(run, force=True)
                self.checkpoints.ckpt.wait_until_finished()
                raise TrainingDiverged(
                    f"{int(metrics['nonfinite_run'])} non-finite losses in a row (last at step {done}); "
                    f"saved {self.checkpoints.ckpt.directory}/{run.step} and stopped. "
                    "Lower the learning rate or check the data.")

    def _record(self, run: RunState, done: int, device_metrics: dict, changed=None) -> dict[str, float]:
        """Host side of step ``done``: wait for it, then record and log its metrics
        (``changed``: the row transform's (rows, tokens) changed in the step's batch)."""
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        self.throughput.add_steps()
        self.losses[done] = metrics["loss"]
        row = {"step": done, **{k: metrics[k] for k in ("loss", "grad_norm", "lr", "loss_scale",
                                                        "skipped") if k in metrics}}
        if changed is not None:
            row["transform_rows"], row["transform_tokens"] = changed
        if done % self.cfg.log_every == 0 or done == run.end:
            row.update(self.throughput.measure())
            self.writer.write(done, {k: v for k, v in row.items() if k != "step"})
        self.metrics_log.append(row)
        return metrics


class EvalHook(Hook):
    """The held-out loss every ``eval_every`` steps and at ``num_steps`` (after the steps before
    it are recorded; the held-out batches are read once per run and reused)."""

    def __init__(self, cfg: TrainConfig, metrics: MetricsHook):
        self.cfg = cfg
        self.metrics = metrics
        self.eval_losses: dict[int, float] = {}
        self._batches: list[dict] | None = None

    def on_step(self, run: RunState) -> None:
        cfg, step = self.cfg, run.step
        if not (cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.num_steps)):
            return
        from pythia_jax.train.batches import evaluate, make_eval_batches

        self.metrics.settle(run)
        if self._batches is None:
            self._batches = list(make_eval_batches(cfg, run.setup))
        self.eval_losses[step] = evaluate(run.setup, run.state.params, self._batches)
        self.metrics.writer.write(step, {"loss": self.eval_losses[step]}, prefix="eval")
        self.metrics.metrics_log.append({"step": step, "eval_loss": self.eval_losses[step]})
        self.metrics.throughput.start()  # the evaluation is not training time


class PreemptionHook(Hook):
    """A stop signal (``PreemptionGuard``, agreed on by every process): record the steps in
    flight, save this step and end the loop with ``run.stopped = "preempted"``."""

    def __init__(self, guard, metrics: MetricsHook, checkpoints: CheckpointHook):
        self.guard = guard
        self.metrics = metrics
        self.checkpoints = checkpoints

    def on_step(self, run: RunState) -> None:
        if self.guard.should_stop(run.step):
            self.metrics.settle(run)
            self.checkpoints.save(run, force=True)
            self.metrics.writer.message(self.guard.message)
            run.stopped = "preempted"
