"""A run directory is never silently mixed, restarted or left with a broken log (issue 15, items 4, 5,
7, 9): a resume under other settings is refused, a second ``train`` is locked out, a failed save
stops the run at once, and ``metrics.jsonl`` holds one strict-JSON row per step."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from pythia_jax import checkpoint as C
from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.errors import PythiaJaxError
from pythia_jax.train import builder, loop, run_lock
from pythia_jax.train.config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from pythia_jax.train.metrics import MetricsLog

REPO = Path(__file__).resolve().parent.parent
NUM_STEPS = 6
TINY = ModelConfig(vocab_size=50304, hidden_size=32, num_layers=2, num_heads=2)


def run_cfg(output_dir, **kw) -> TrainConfig:
    fields = dict(model=TINY, optimizer=OptimizerConfig(max_lr=3e-3, warmup_steps=1), mesh=MeshConfig(data=1),
                  data=DataConfig(prefix="demo", order="neox"), output_dir=str(output_dir),
                  num_steps=NUM_STEPS, global_batch=4, seq_length=32, checkpoint_log_until=0,
                  checkpoint_every=2, log_every=1, eval_every=0, progress_bar=False, tensorboard=False,
                  async_checkpointing=False)
    fields.update(kw)
    return TrainConfig(**fields)


def strict_rows(path) -> list[dict]:
    def refuse(token):
        raise AssertionError(f"{path} holds {token}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def step_dirs(out) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, compile_cache):
    """A run of 6 steps stopped after 3 (checkpoints 0, 2, 3), copied by each test that resumes it."""
    out = tmp_path_factory.mktemp("stopped")
    loop.train(run_cfg(out), devices=jax.devices()[:1], max_steps=3)
    return out


def _no_build(monkeypatch):
    monkeypatch.setattr(builder, "build", lambda *a, **k: (_ for _ in ()).throw(AssertionError("compiled")))


# ------------------------------------------------------------------ item 4: resume refusals
def test_every_checkpoint_records_the_run_configuration(stopped_run):
    for step in (0, 2, 3):
        record = C.read_run_config(stopped_run, step=step)
        assert record["step"] == step
        data = record["data"]
        assert (data["order"], data["seed"], data["global_batch"], data["seq_len"], data["train_iters"],
                data["transform"]) == ("neox", 1234, 4, 32, NUM_STEPS, None)
        assert data["prefix"].endswith("wiki_train") or os.path.exists(data["prefix"] + ".idx")
        assert data["documents"] > 0 and data["tokens"] > data["documents"]
        assert record["schedule"]["num_steps"] == NUM_STEPS and record["schedule"]["max_lr"] == 3e-3
        assert record["schedule"]["warmup_steps"] == 1 and record["schedule"]["decay_steps"] == NUM_STEPS
        assert ModelConfig.from_dict(record["model"]) == TINY
    # the newest step by default; the run folder, the checkpoint root and a step folder all work
    assert C.read_run_config(stopped_run)["step"] == 3
    assert C.read_run_config(stopped_run / "checkpoints")["step"] == 3
    assert C.read_run_config(stopped_run / "checkpoints" / "2")["step"] == 2


@pytest.mark.parametrize("change, setting, old, new", [
    (dict(global_batch=8), "TrainConfig.global_batch", "4", "8"),
    (dict(data=DataConfig(prefix="demo", order="neox", seed=7)), "DataConfig.seed", "1234", "7"),
    (dict(seq_length=16), "TrainConfig.seq_length", "32", "16"),
    (dict(data=DataConfig(prefix="demo", order="preshuffled")), "DataConfig.order", "'neox'", "'preshuffled'"),
    (dict(num_steps=8), "TrainConfig.num_steps", "6", "8"),
    (dict(optimizer=OptimizerConfig(max_lr=1e-3, warmup_steps=1)), "OptimizerConfig.max_lr", "0.003", "0.001"),
    # not in the record before: a resume with another decay style or a fractional warmup went on silently
    (dict(optimizer=OptimizerConfig(max_lr=3e-3, warmup_steps=1, decay_style="linear")),
     "OptimizerConfig.decay_style", "'cosine'", "'linear'"),
    (dict(optimizer=OptimizerConfig(max_lr=3e-3, warmup_steps=1.5)), "OptimizerConfig.warmup_steps", "1.0", "1.5"),
])
def test_resume_with_a_changed_setting_is_refused_not_restarted(stopped_run, tmp_path, monkeypatch, change,
                                                               setting, old, new):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    before = step_dirs(out)
    _no_build(monkeypatch)  # refused before anything is compiled
    with pytest.raises(C.RunConfigMismatch) as info:
        loop.train(run_cfg(out, **change), devices=jax.devices()[:1])
    message = str(info.value)
    assert "\n" not in message and setting in message and old in message and new in message, message
    assert "another output_dir" in message and f"{out / 'checkpoints'}/3" in message
    if setting in ("TrainConfig.num_steps", "OptimizerConfig.max_lr", "OptimizerConfig.decay_style",
                   "OptimizerConfig.warmup_steps"):
        assert "allow_schedule_change" in message and "learning-rate schedule" in message
    if setting == "TrainConfig.num_steps":
        assert "GPT-NeoX index maps" in message
    assert step_dirs(out) == before  # nothing renamed "unusable", nothing written
    assert not (out / "train.lock").exists()  # the lock is released on the way out


def test_resume_with_another_dataset_is_refused(stopped_run, tmp_path, monkeypatch):
    from pythia_jax.data.indexed import IndexedDataset, write_indexed_dataset

    demo = IndexedDataset(DataConfig().resolved_prefix())
    other = str(tmp_path / "other")
    write_indexed_dataset(other, [demo[i] for i in range(len(demo) - 1)], dtype=demo.dtype)
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    _no_build(monkeypatch)
    with pytest.raises(C.RunConfigMismatch, match=r"DataConfig.prefix is .*documents.* but .*other"):
        loop.train(run_cfg(out, data=DataConfig(prefix=other)), devices=jax.devices()[:1])


def test_a_moved_copy_of_the_data_is_accepted(stopped_run, tmp_path, caplog):
    prefix = DataConfig().resolved_prefix()
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, str(tmp_path / "moved") + ext)
    cfg = run_cfg(tmp_path / "run", data=DataConfig(prefix=str(tmp_path / "moved")))
    stored = C.read_run_config(stopped_run)
    with caplog.at_level(logging.WARNING, logger="pythia_jax.train.loop"):
        record = loop.check_resume(stored, loop.run_config(cfg), cfg, 3, "x")
    assert record["data"]["prefix"] == str(tmp_path / "moved") and "instead of" in caplog.text


def test_schedule_change_with_the_flag_continues_and_is_recorded(stopped_run, tmp_path, compile_cache):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    result = loop.train(run_cfg(out, num_steps=8, allow_schedule_change=True), devices=jax.devices()[:1])
    assert result.final_step == 8 and set(result.losses) == {4, 5, 6, 7, 8}
    record = C.read_run_config(out, step=8)
    assert record["schedule"]["num_steps"] == 8 and record["data"]["train_iters"] == 8
    assert record["changes"] == [{"step": 3, "changed": {"TrainConfig.num_steps": [6, 8],
                                                          "OptimizerConfig.decay_steps": [6, 8]}}]
    assert [r["step"] for r in strict_rows(out / "metrics.jsonl")] == list(range(1, 9))


def test_neox_maps_that_move_trained_rows_are_refused_even_with_the_flag(tmp_path):
    from pythia_jax.data.indexed import Index

    tokens = int(Index(DataConfig().resolved_prefix() + ".idx").sizes.sum())
    base = dict(data=DataConfig(prefix="demo", order="neox", cache_dir=str(tmp_path / "maps")))
    assert loop._same_neox_rows(run_cfg(tmp_path, num_steps=8, **base), NUM_STEPS, 3)
    # enough steps for a second epoch: GPT-NeoX shuffles all samples of the maps, so early rows move
    two_epochs = tokens // (32 * 4) + 10
    cfg = run_cfg(tmp_path, num_steps=two_epochs, allow_schedule_change=True, **base)
    assert not loop._same_neox_rows(cfg, NUM_STEPS, 3)
    stored = loop.run_config(run_cfg(tmp_path, **base))
    with pytest.raises(C.RunConfigMismatch, match="changes rows of steps before 3"):
        loop.check_resume(stored, loop.run_config(cfg), cfg, 3, "x")
    with pytest.raises(C.RunConfigMismatch, match="below the checkpoint's step 5"):
        small = run_cfg(tmp_path, num_steps=4, allow_schedule_change=True, **base)
        loop.check_resume(stored, loop.run_config(small), small, 5, "x")


def test_data_iterator_state_of_another_batch_is_a_mismatch_not_corruption(tmp_path):
    """Checkpoints without a run record (older ones): the data iterator's own check is reported
    as a mismatch, and the step stays where it is."""
    from pythia_jax.data.pipeline import make_train_iterator

    prefix = DataConfig().resolved_prefix()
    kw = dict(order="neox", seq_len=32, seed=1234, train_iters=6, cache_prefix=str(tmp_path / "maps" / "m"))
    params = {"w": np.arange(4, dtype=np.float32)}
    with C.TrainCheckpointer(tmp_path / "ck", save_steps=(), async_save=False, model_config=TINY) as ckpt:
        ckpt.save(2, params, None, make_train_iterator(prefix, global_batch=4, start_step=2, **kw), {}, force=True)
    record = C.read_run_config(tmp_path / "ck")
    assert record == {"partial": True, "step": 2, "data": {"order": "neox", "seed": 1234, "global_batch": 4,
                                                           "seq_len": 32, "train_iters": 6}}
    with C.TrainCheckpointer(tmp_path / "ck", save_steps=(), model_config=TINY) as ckpt:
        with pytest.raises(C.RunConfigMismatch, match="global_batch=4.*uses 8"):
            ckpt.restore(None, {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)},
                         data_iterator=make_train_iterator(prefix, global_batch=8, **kw))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name[0].isdigit()) == ["2"]


# ------------------------------------------------------------------ a run's start is its own
@pytest.mark.parametrize("change, asked", [
    (dict(seed=7), "a random init (TrainConfig.seed 7, no init_from)"),
    (dict(init_from="runs/int", start_step=2),
     f"TrainConfig.init_from {os.path.abspath('runs/int')!r} at start_step 2"),  # recorded absolute
])
def test_resume_naming_another_start_is_refused(stopped_run, tmp_path, monkeypatch, change, asked):
    """A resume continues from the run's own checkpoint and never uses init_from / start_step /
    the init seed: a command naming another start is refused (before compiling), not recorded."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    before = step_dirs(out)
    _no_build(monkeypatch)
    with pytest.raises(C.RunConfigMismatch) as info:
        loop.train(run_cfg(out, **change), devices=jax.devices()[:1])
    keep = "TrainConfig.seed = 1234" + ("" if "seed" in change else " and leave init_from / start_step unset")
    assert str(info.value) == (
        f"cannot resume {out / 'checkpoints'}/3: this run started from a random init (TrainConfig.seed 1234, "
        f"no init_from), but the command asks for {asked}, which a resume would not use (it continues from "
        f"the run's own step 3). To continue this run use {keep}; to start from {asked} use a new output_dir")
    assert step_dirs(out) == before


def test_a_resume_keeps_the_recorded_start(tmp_path):
    """The record a resume stores carries the run's own ``init`` forward (the ``adam_moments``
    marker included), whether the command repeats init_from / start_step or leaves them unset;
    other values are refused naming both; a branch's check of its source compares no start."""
    branch = run_cfg(tmp_path / "b", init_from="runs/src", start_step=2)
    init = {"seed": 1234, "init_from": "runs/src", "start_step": 2, "adam_moments": "zero"}
    stored = {**loop.run_config(branch), "init": init, "step": 3}
    same_folder = run_cfg(tmp_path / "b", init_from=os.path.abspath("runs/src") + "/", start_step=2)
    for cfg in (branch, run_cfg(tmp_path / "b"), run_cfg(tmp_path / "b", seed=9), same_folder):
        assert loop.check_resume(stored, loop.run_config(cfg), cfg, 3, "x")["init"] == init
    for source in ("runs/int", "runs/src"):
        asked = f"TrainConfig.init_from {os.path.abspath(source)!r} at start_step 1"
        cfg = run_cfg(tmp_path / "b", init_from=source, start_step=1)
        with pytest.raises(C.RunConfigMismatch) as info:
            loop.check_resume(stored, loop.run_config(cfg), cfg, 3, "x")
        assert str(info.value).startswith(
            f"cannot resume x: this run started from TrainConfig.init_from 'runs/src' at start_step 2, but the "
            f"command asks for {asked}")
        assert "use TrainConfig.init_from = 'runs/src' and start_step = 2 (or leave both unset)" in str(info.value)
        assert loop.check_resume(stored, loop.run_config(cfg), cfg, 1, "src/1", branch=True)["init"] == \
            loop.run_config(cfg)["init"]


def test_a_branch_refusal_says_how_to_branch_not_to_use_another_output_dir(tmp_path):
    source = loop.run_config(run_cfg(tmp_path / "src"))
    for change, start in ((dict(seq_length=16), "cannot branch from src/2: TrainConfig.seq_length is 32 in the "
                                                "checkpoint but 16 now (it changes which rows every step reads)"),
                          (dict(optimizer=OptimizerConfig(max_lr=1e-3, warmup_steps=1)),
                           "cannot branch from src/2: the schedule differs from the source's "
                           "(OptimizerConfig.max_lr 0.003 -> 0.001;")):
        cfg = run_cfg(tmp_path / "new", init_from="src", start_step=2, **change)
        with pytest.raises(C.RunConfigMismatch) as info:
            loop.check_resume(source, loop.run_config(cfg), cfg, 2, "src/2", branch=True)
        message = str(info.value)
        assert message.startswith(start) and "output_dir" not in message and "resume" not in message, message
    assert message.endswith("Set TrainConfig.allow_schedule_change = True to branch with the new schedule, "
                            "or use the source's values")


def test_records_before_the_decay_style_resume_and_a_dtype_change_is_recorded(tmp_path, caplog):
    """A record written before the decay style and the unrounded warmup were stored (warmup_steps
    an int, no decay_style) still resumes under the same settings; a changed compute dtype is
    accepted (an execution choice) but recorded in the run's changes from that step."""
    cfg = run_cfg(tmp_path / "r", optimizer=OptimizerConfig(max_lr=3e-3, warmup=0.1))  # warmup 0.6 steps
    current = loop.run_config(cfg)
    assert current["schedule"]["warmup_steps"] == pytest.approx(0.6) and current["schedule"]["decay_style"] == "cosine"
    old = {**current, "init": current["init"], "schedule": {k: v for k, v in current["schedule"].items()
                                                            if k != "decay_style"}}
    old["schedule"]["warmup_steps"] = 0  # int(0.6), as such records hold it
    assert loop.check_resume(old, current, cfg, 2, "x")["changes"] == []
    bf16 = run_cfg(tmp_path / "r", optimizer=OptimizerConfig(max_lr=3e-3, warmup=0.1),
                   model=TINY.replace(dtype="bfloat16"))
    with caplog.at_level("WARNING"):
        record = loop.check_resume(current, loop.run_config(bf16), bf16, 2, "x")
    assert record["changes"] == [{"step": 2, "changed": {"ModelConfig.dtype": ["float32", "bfloat16"]}}]
    assert "resuming with ModelConfig.dtype 'bfloat16' (was 'float32')" in caplog.text


def test_a_branch_may_change_the_transform_a_resume_may_not(tmp_path):
    """The intervention's rule lives in check_resume: a branch from another run's step may start a
    row transform (the gender-swap case study), a resume of the same run may not."""
    source = loop.run_config(run_cfg(tmp_path / "src"))
    swap = DataConfig(prefix="demo", order="neox", transform="gender_swap", transform_steps=(2, 4))
    cfg = run_cfg(tmp_path / "new", init_from="src", start_step=2, data=swap)
    current = loop.run_config(cfg)
    record = loop.check_resume(source, current, cfg, 2, "src/2", branch=True)
    assert record["data"]["transform"] == current["data"]["transform"] and record["data"]["transform"]
    with pytest.raises(C.RunConfigMismatch, match="the row transform"):
        loop.check_resume({**source, "init": current["init"]}, current, cfg, 2, "x")


def test_sigterm_during_the_start_undoes_it_like_ctrl_c(tmp_path):
    """SIGTERM before the step loop killed the process where it stood (exit 143, no message),
    leaving model_config.json, index_maps/ and the lock behind. It now stops like Ctrl-C: the
    start is undone and KeyboardInterrupt reaches the command (exit 130). In a child process: the
    signal is sent to itself from inside the start."""
    out = tmp_path / "new-run"
    code = textwrap.dedent(f"""
        import os, signal, sys
        import jax
        from pythia_jax.train import loop
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_run_safety import run_cfg

        real = loop._train
        def start_then_term(cfg, *a, **k):
            os.makedirs(os.path.join(cfg.output_dir, "checkpoints"), exist_ok=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return real(cfg, *a, **k)
        loop._train = start_then_term
        try:
            loop.train(run_cfg({str(out)!r}), devices=jax.devices()[:1])
        except KeyboardInterrupt:
            print("interrupted", os.path.exists({str(out)!r}), signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "interrupted False True"


# ------------------------------------------------------------------ what a start may write into
def _hf_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def _file(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, what", [
    (lambda p: _hf_dir(p / "run" / "hf"), "an HF model directory (config.json + weights)"),
    (lambda p: _file(p / "notes" / "a.txt").parent, "a folder of 1 other entries (a.txt)"),
    (lambda p: _file(p / "f.txt"), "an unrelated file"),
])
def test_an_output_dir_that_is_not_a_run_is_refused(tmp_path, monkeypatch, make, what):
    out = make(tmp_path)
    before = sorted(os.listdir(out)) if out.is_dir() else out.read_text()
    _no_build(monkeypatch)
    with pytest.raises(ConfigError) as info:
        loop.train(run_cfg(out), devices=jax.devices()[:1])
    assert str(info.value) == (
        f"TrainConfig.output_dir {out} is {what}, not a training run's folder: a run writes its checkpoints/, "
        "metrics.jsonl and tensorboard/ there; choose a new folder (or an existing run's output_dir to resume it)")
    assert (sorted(os.listdir(out)) if out.is_dir() else out.read_text()) == before
    # what an earlier start leaves (its index maps, a stale lock) is a run's: accepted
    leftovers = tmp_path / "left"
    (leftovers / "index_maps").mkdir(parents=True)
    (leftovers / "train.lock").write_text("")
    with pytest.raises(AssertionError, match="compiled"):  # got past the check, up to the build
        loop.train(run_cfg(leftovers), devices=jax.devices()[:1])


@pytest.mark.parametrize("change", ["no init_from", "no such step", "no dataset", "mesh"])
def test_a_failed_start_leaves_its_output_dir_as_it_was(stopped_run, tmp_path, compile_cache, change):
    """A new output_dir (and its new parents) is removed, an existing one loses only what the
    failed start created; an existing run is never touched (test_resume_with_a_changed_setting…)."""
    kw = {"no init_from": dict(init_from=str(tmp_path / "missing"), start_step=2),
          "no such step": dict(init_from=str(stopped_run), start_step=1),
          "no dataset": dict(data=DataConfig(prefix=str(tmp_path / "missing"))),
          "mesh": dict(mesh=MeshConfig(data=2))}[change]
    new = tmp_path / "new" / "run"
    with pytest.raises(PythiaJaxError):
        loop.train(run_cfg(new, **kw), devices=jax.devices()[:1])
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "empty"
    existing.mkdir()
    (existing / ".keep").write_text("")
    with pytest.raises(PythiaJaxError):
        loop.train(run_cfg(existing, **kw), devices=jax.devices()[:1])
    assert os.listdir(existing) == [".keep"]


# ------------------------------------------------------------------ item 5: the lock
def test_second_train_on_a_locked_directory_is_refused(tmp_path, monkeypatch, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pythia_jax.train import run_lock; "
         f"run_lock.acquire({str(tmp_path)!r}, {str(tmp_path)!r}); print('locked', flush=True); time.sleep(300)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        info = json.loads((tmp_path / "train.lock").read_text())
        assert info["pid"] == holder.pid and info["host"] and info["started"]
        _no_build(monkeypatch)
        with pytest.raises(run_lock.RunDirectoryLocked, match=f"in use by another training run: process {holder.pid}"):
            loop.train(run_cfg(tmp_path), devices=jax.devices()[:1])
        assert not (tmp_path / "checkpoints").exists()  # refused before touching anything
        from pythia_jax import cli

        rc = cli.main(["train", "--gin_file=configs/demo.gin", f"--gin.TrainConfig.output_dir='{tmp_path}'"])
        err = capsys.readouterr().err
        assert rc == 2 and "in use by another training run" in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without cleaning up: its lock is stale, replaced with a warning
    assert (tmp_path / "train.lock").exists()
    with pytest.raises(AssertionError, match="compiled"):  # got past the lock, up to the build
        loop.train(run_cfg(tmp_path), devices=jax.devices()[:1])
    assert not (tmp_path / "train.lock").exists()


def test_stale_and_foreign_locks(tmp_path, caplog):
    path = tmp_path / "train.lock"
    path.write_text(json.dumps({"host": run_lock._holder_info()["host"], "pid": 99999999, "started": "x"}))
    with caplog.at_level(logging.WARNING, logger="pythia_jax.train.run_lock"):
        lock = run_lock.acquire(str(tmp_path), str(tmp_path))
    assert "stale lock" in caplog.text and "99999999" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(run_lock.RunDirectoryLocked, match="in use by another training run"):
        run_lock.acquire(str(tmp_path), str(tmp_path))  # a second holder in the same process too
    lock.release()
    assert not path.exists()
    # a lock file left by another host: not ours to judge
    path.write_text(json.dumps({"host": "some-other-host", "pid": 1, "started": "x"}))
    with pytest.raises(run_lock.RunDirectoryLocked, match="another host: if that run has ended, delete"):
        run_lock.acquire(str(tmp_path), str(tmp_path))


def test_remote_lock_object(tmp_path):
    """The gs:// lock object logic (through etils.epath, exercised here on a local path)."""
    info = run_lock._holder_info()
    remote = run_lock._lock_remote(str(tmp_path / "bucket"), info)
    with pytest.raises(run_lock.RunDirectoryLocked, match="is locked by process"):
        run_lock._lock_remote(str(tmp_path / "bucket"), dict(info, started="later"))
    remote.write_text(json.dumps(dict(info, pid=99999999)))  # a dead process of this host: stale
    run_lock._lock_remote(str(tmp_path / "bucket"), info)


def test_skipped_save_is_logged(tmp_path, caplog):
    params = {"w": np.ones(3, np.float32)}
    with C.TrainCheckpointer(tmp_path, save_steps=[1], async_save=False, model_config=TINY) as ckpt:
        assert ckpt.save(1, params)
        with caplog.at_level(logging.WARNING, logger="pythia_jax.checkpoint"):
            assert not ckpt.save(1, {"w": np.zeros(3, np.float32)})
    assert "step 1 already exists" in caplog.text and "not saved" in caplog.text


# ------------------------------------------------------------------ item 7: failed saves
def _fail_metadata_writes_from(monkeypatch, first_step: int):
    """An OSError(ENOSPC) in Orbax's JSON writer (run in the save's commit thread when async)."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    original = jh.JsonCheckpointHandler._save_fn

    async def full_disk(self, x, directory):
        step = x.get("__checkpoint__", {}).get("step") if isinstance(x, dict) else None
        if step is not None and step >= first_step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, x, directory)

    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", full_disk)


@pytest.mark.parametrize("async_save", [True, False])
def test_failed_save_is_reported_with_step_reason_and_intact_steps(tmp_path, monkeypatch, async_save):
    params = {"w": np.ones(3, np.float32)}
    _fail_metadata_writes_from(monkeypatch, 4)
    ckpt = C.TrainCheckpointer(tmp_path, save_steps=[2, 4], async_save=async_save, model_config=TINY)
    try:
        ckpt.save(2, params)
        ckpt.wait_until_finished()
        with pytest.raises(C.CheckpointSaveFailed) as info:
            ckpt.save(4, params)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # what the train loop does after every step
                ckpt.check_for_errors()
                time.sleep(0.01)
    finally:
        ckpt.close(check=False)
    message = str(info.value)
    assert "\n" not in message and "step 4" in message and f"{tmp_path}/4" in message
    assert "No space left on device" in message and "intact steps: 2" in message, message


def test_full_disk_during_training_stops_within_a_step_with_exit_status_2(tmp_path, monkeypatch, capsys,
                                                                          compile_cache):
    from pythia_jax import cli

    _fail_metadata_writes_from(monkeypatch, 4)
    rc = cli.main(["train", "--gin_file=configs/demo.gin", "--gin.ModelConfig.hidden_size=32",
                   "--gin.ModelConfig.num_layers=2", "--gin.ModelConfig.num_heads=2",
                   "--gin.TrainConfig.num_steps=12", "--gin.TrainConfig.global_batch=4",
                   "--gin.TrainConfig.seq_length=32", "--gin.TrainConfig.eval_every=0",
                   "--gin.TrainConfig.tensorboard=False", "--gin.TrainConfig.progress_bar=False",
                   "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.checkpoint_log_until=-1",
                   "--gin.TrainConfig.checkpoint_every=2", "--gin.TrainConfig.async_checkpointing=True",
                   "--gin.TrainConfig.export_hf=None", f"--gin.TrainConfig.output_dir='{tmp_path}'"])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    line = [x for x in err.splitlines() if "saving checkpoint step 4" in x]
    assert line and "No space left on device" in line[0] and "intact steps: 2" in line[0], err[-3000:]
    assert "Traceback" not in err
    # detected before the next save (step 6): the run did not go on to the end
    logged = [r["step"] for r in strict_rows(tmp_path / "metrics.jsonl")]
    assert max(logged) <= 6, logged
    assert step_dirs(tmp_path) == ["2"] and not (tmp_path / "train.lock").exists()


# ------------------------------------------------------------------ item 9: metrics.jsonl
def test_interrupted_and_resumed_run_logs_each_step_once(tmp_path, compile_cache):
    out = tmp_path / "run"
    loop.train(run_cfg(out), devices=jax.devices()[:1], max_steps=5)  # checkpoints 0, 2, 4, 5
    # what a SIGKILL after step 5 with the last complete checkpoint at 2 leaves behind
    for step in ("4", "5"):
        shutil.rmtree(out / "checkpoints" / step)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.')  # a line cut mid-write
    result = loop.train(run_cfg(out), devices=jax.devices()[:1])
    assert result.final_step == NUM_STEPS and set(result.losses) == {3, 4, 5, 6}
    rows = strict_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
    assert all(r["loss"] == result.losses[r["step"]] for r in rows if r["step"] > 2)


def test_metrics_log_rewrite_and_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 2.0}\n{"step": 2, "eval_loss": 3.0}\n'
                    '{"step": 3, "loss": 1.0}\n')
    log = MetricsLog(str(path), enabled=True)
    assert log.restart_at(2) == 1
    log.append({"step": 3, "loss": float("inf"), "grad_norm": float("nan"), "lr": 0.5})
    assert strict_rows(path) == [{"step": 1, "loss": None}, {"step": 2, "loss": 2.0},
                                 {"step": 2, "eval_loss": 3.0},
                                 {"step": 3, "loss": None, "grad_norm": None, "lr": 0.5}]
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # no temporary left


def test_tensorboard_non_finite_scalars_do_not_warn_at_every_step(tmp_path, caplog):
    """tensorboardX logged 'NaN or Inf found in input tensor.' at every non-finite step (the
    trainer's own line already reports the loss and the skipped counter)."""
    from pythia_jax.train.metrics import MetricWriter

    writer = MetricWriter(str(tmp_path / "tb"), total_steps=3, progress_bar=False, tensorboard=True)
    with caplog.at_level("INFO"):
        for step in (1, 2):
            writer.write(step, {"loss": float("nan"), "skipped": step})
    writer.close()
    assert "NaN or Inf" not in caplog.text and "train step 2: loss nan" in caplog.text
    assert list((tmp_path / "tb").iterdir())  # the scalars were still written
