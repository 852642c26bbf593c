"""Exact resume: a run killed (SIGKILL) or stopped (SIGTERM) at a random step and restarted from its
last checkpoint ends with bit-identical parameters and logs the same losses as a straight run.

Each run is a real ``pythia-jax train`` process on the bundled demo data (tiny model, CPU).
Checkpoints are saved every 2 steps, so a kill between two checkpoints makes the restarted run
redo steps: those must reproduce the same losses too.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pythia_jax import checkpoint as C

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
NUM_STEPS = 10


def train_argv(output_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pythia_jax.cli", "train", "--gin_file=configs/demo.gin",
            "--gin.ModelConfig.hidden_size=32", "--gin.ModelConfig.num_layers=2",
            "--gin.ModelConfig.num_heads=2", f"--gin.TrainConfig.num_steps={NUM_STEPS}",
            "--gin.TrainConfig.global_batch=4", "--gin.TrainConfig.seq_length=32",
            "--gin.TrainConfig.eval_every=0", "--gin.TrainConfig.tensorboard=False",
            "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.log_every=1",
            "--gin.TrainConfig.checkpoint_log_until=-1", "--gin.TrainConfig.checkpoint_every=2",
            "--gin.TrainConfig.export_hf=None", f"--gin.TrainConfig.output_dir='{output_dir}'"]


def train_env(cache_dir: Path) -> dict:
    # A shared persistent compilation cache: the restarted runs skip recompiling the train step.
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run_to_end(output_dir: Path, cache_dir: Path) -> str:
    proc = subprocess.run(train_argv(output_dir), env=train_env(cache_dir), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def logged_records(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    # strict JSON (no bare NaN); the last line of a run killed mid-write may be cut: not a row yet
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line, parse_constant=lambda t: pytest.fail(f"{path} holds {t}")))
        except json.JSONDecodeError:
            assert i == len(lines) - 1, f"{path}: line {i + 1} is not JSON: {line!r}"
    return rows


def losses_by_step(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def final_params(output_dir: Path):
    config, params = C.load_params(output_dir / "checkpoints", step=NUM_STEPS)
    return params


def start_and_interrupt(output_dir: Path, cache_dir: Path, sig: int, after_steps: int) -> tuple[int, str]:
    """Start training, send ``sig`` once ``after_steps`` steps are logged; -> (exit code, output)."""
    proc = subprocess.Popen(train_argv(output_dir), env=train_env(cache_dir), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(losses_by_step(logged_records(output_dir))) < after_steps:
            if proc.poll() is not None:
                out = proc.stdout.read()
                pytest.fail(f"training ended before step {after_steps} (rc {proc.returncode}):\n{out[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail("training made no progress")
            time.sleep(0.05)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out


def _shared_root(tmp_path_factory) -> Path:
    """A directory shared by all pytest-xdist workers of this session (the basetemp's parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = _shared_root(tmp_path_factory) / "resume_jax_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def straight_run_dir(tmp_path_factory, cache_dir) -> Path:
    """The uninterrupted reference run, done once per session even with several xdist workers."""
    import fcntl

    root = _shared_root(tmp_path_factory)
    out = root / "resume_straight"
    with open(root / "resume_straight.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "DONE").exists():
            run_to_end(out, cache_dir)
            (out / "DONE").write_text("ok")
    return out


@pytest.fixture(scope="session")
def straight_run(straight_run_dir):
    out = straight_run_dir
    losses = losses_by_step(logged_records(out))
    assert [s for s, _ in losses] == list(range(1, NUM_STEPS + 1))
    return dict(losses), final_params(out)


def assert_same_run(output_dir: Path, straight_run, note: str) -> None:
    reference_losses, reference_params = straight_run
    logged = losses_by_step(logged_records(output_dir))
    # One row per step (the resumed run dropped the interrupted run's rows after its checkpoint),
    # and every logged loss equals the straight run's.
    assert [s for s, _ in logged] == sorted(reference_losses), note
    for step, loss in logged:
        assert loss == reference_losses[step], f"{note}: step {step} loss {loss!r} != {reference_losses[step]!r}"
    params = final_params(output_dir)
    for (path, got), want in zip(C._leaf_paths(params), [v for _, v in C._leaf_paths(reference_params)]):
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype and np.array_equal(got, want), f"{note}: {path} differs"


def test_resume_after_sigkill_is_bit_identical(tmp_path, cache_dir, straight_run):
    # From 5 logged steps on, the step-2 checkpoint is complete (Orbax finishes one async save
    # before starting the next, at step 4), so the restart really resumes.
    # (at most NUM_STEPS - 3: metrics are logged one step late, so the run is a step further along)
    kill_after = random.Random().randint(5, NUM_STEPS - 3)
    note = f"SIGKILL after {kill_after} logged steps"
    rc, out = start_and_interrupt(tmp_path, cache_dir, signal.SIGKILL, kill_after)
    assert rc == -signal.SIGKILL, out[-3000:]
    killed_at = max(s for s, _ in losses_by_step(logged_records(tmp_path)))
    assert killed_at < NUM_STEPS, note
    resumed = run_to_end(tmp_path, cache_dir)
    assert "resumed from" in resumed, resumed[-3000:]
    assert_same_run(tmp_path, straight_run, f"{note} (killed at step {killed_at})")


def test_resume_after_sigterm_saves_exits_cleanly_and_is_bit_identical(tmp_path, cache_dir, straight_run):
    # Metrics are logged one step late (the next step is already queued), so the stop can land up
    # to two steps after the last logged one: leave room before the end of the run.
    stop_after = random.Random().randint(1, NUM_STEPS - 3)
    note = f"SIGTERM after {stop_after} logged steps"
    rc, out = start_and_interrupt(tmp_path, cache_dir, signal.SIGTERM, stop_after)
    assert rc == 0, out[-3000:]
    assert "received SIGTERM" in out, out[-3000:]
    stopped_at = max(s for s, _ in losses_by_step(logged_records(tmp_path)))
    assert stopped_at < NUM_STEPS, note
    # The stop step itself was checkpointed (off the every-2-steps schedule if need be).
    with C.TrainCheckpointer(tmp_path / "checkpoints", save_steps=()) as ckpt:
        assert ckpt.latest_valid_step() == stopped_at
    resumed = run_to_end(tmp_path, cache_dir)
    assert f"resumed from {tmp_path / 'checkpoints'}/{stopped_at}" in resumed, resumed[-3000:]
    assert_same_run(tmp_path, straight_run, f"{note} (stopped at step {stopped_at})")


def test_pythia_jax_load_reads_the_training_checkpoints(straight_run_dir):
    import jax.numpy as jnp

    import pythia_jax

    model = pythia_jax.load(str(straight_run_dir / "checkpoints"))
    assert model.config.hidden_size == 32 and model.config.num_layers == 2
    logits = model(jnp.zeros((1, 4), jnp.int32))
    assert logits.shape == (1, 4, model.config.vocab_size) and bool(jnp.isfinite(logits).all())


def test_checkpoint_of_another_model_shape_is_refused_before_compute(tmp_path, cache_dir):
    from pythia_jax.config import ModelConfig

    other = ModelConfig(vocab_size=50304, hidden_size=64, num_layers=2, num_heads=2)
    C.write_model_config(tmp_path / "checkpoints", other)
    proc = subprocess.run(train_argv(tmp_path), env=train_env(cache_dir), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "holds checkpoints of a different model" in proc.stderr and "hidden_size" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()  # no step ran


def test_preemption_guard_single_process():
    from pythia_jax.train.preemption import PreemptionGuard

    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        signal.raise_signal(signal.SIGTERM)  # handled: the process keeps running
        assert guard.signal_received and guard.should_stop(2) and guard.should_stop(3)
        assert guard.stopped_at == 2 and "SIGTERM" in guard.message and "after step 2" in guard.message
    assert signal.getsignal(signal.SIGTERM) is previous
    manual = PreemptionGuard()
    manual.request_stop()
    assert manual.should_stop(7) and "stop request" in manual.message
