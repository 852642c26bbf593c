"""The train loop on the bundled Wikipedia data: logging, evaluation, checkpoints on the schedule,
resume, divergence stop, and bad input refused before any compute."""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
import pytest

from pythia_jax import gin_setup
from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.errors import CheckpointError
from pythia_jax.train import builder, loop
from pythia_jax.train.config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig

NUM_STEPS = 6


def loop_config(output_dir, **kw) -> TrainConfig:
    fields = dict(
        model=ModelConfig(vocab_size=50304, hidden_size=32, num_layers=2, num_heads=2),
        optimizer=OptimizerConfig(max_lr=3e-3, warmup_steps=1), mesh=MeshConfig(data=1),
        data=DataConfig(prefix="demo", order="neox", eval_prefix="demo"),
        output_dir=str(output_dir), num_steps=NUM_STEPS, global_batch=4, seq_length=32,
        checkpoint_log_until=0, checkpoint_every=2, log_every=2, eval_every=3, eval_batches=2,
        progress_bar=False, async_checkpointing=False)
    fields.update(kw)
    return TrainConfig(**fields)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, compile_cache):
    out = tmp_path_factory.mktemp("straight")
    result = loop.train(loop_config(out), devices=jax.devices()[:1])
    return out, result


def _records(out):
    def strict(token):
        raise AssertionError(f"metrics.jsonl holds {token}, which is not JSON")

    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=strict) for line in f]


def test_loop_logs_evaluates_and_checkpoints(straight_run):
    out, result = straight_run
    assert result.final_step == NUM_STEPS and result.stopped is None
    train = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, NUM_STEPS + 1))
    assert train[0]["lr"] == 0.0  # the first update runs at lr 0 (GPT-NeoX schedule)
    assert train[1]["lr"] == pytest.approx(3e-3)
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    logged = [r for r in train if "tokens_per_s" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    # no MFU on CPU: its peak is unknown (MFU needs a data-sheet peak or TrainConfig.peak_flops_per_device)
    assert all("mfu" not in r and 0 < r["tokens_per_s_per_chip"] == r["tokens_per_s"] for r in logged)
    evals = [r for r in _records(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and set(result.eval_losses) == {3, 6}
    saved = glob.glob(os.path.join(out, "checkpoints", "[0-9]*"))
    assert sorted(int(os.path.basename(p)) for p in saved) == [0, 2, 4, 6]
    assert glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))


def test_checkpoint_holds_the_trained_params(straight_run):
    from pythia_jax.checkpoint import load_params

    out, result = straight_run
    config, params = load_params(os.path.join(out, "checkpoints"))
    assert config.hidden_size == 32
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(result.params))):
        np.testing.assert_array_equal(np.asarray(a), b)
    _, step0 = load_params(os.path.join(out, "checkpoints"), step=0)
    _, step2 = load_params(os.path.join(out, "checkpoints"), step=2)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(step0), jax.tree.leaves(step2)))


def test_resume_continues_exactly(straight_run, tmp_path, compile_cache):
    out, straight = straight_run
    first = loop.train(loop_config(tmp_path), devices=jax.devices()[:1], max_steps=3)
    assert first.final_step == 3
    assert os.path.isdir(tmp_path / "checkpoints" / "3")  # the stopping step is always saved
    second = loop.train(loop_config(tmp_path), devices=jax.devices()[:1])
    assert second.final_step == NUM_STEPS and set(second.losses) == {4, 5, 6}
    for s in range(1, NUM_STEPS + 1):
        got = first.losses.get(s, second.losses.get(s))
        assert got == straight.losses[s], s
    for a, b in zip(jax.tree.leaves(jax.device_get(second.params)), jax.tree.leaves(jax.device_get(straight.params))):
        np.testing.assert_array_equal(a, b)


def test_divergence_stops_with_checkpoint(tmp_path, compile_cache):
    cfg = loop_config(tmp_path, optimizer=OptimizerConfig(max_lr=1e30, warmup_steps=0),
                      max_nonfinite_steps=2, eval_every=0, checkpoint_every=0)
    with pytest.raises(loop.TrainingDiverged, match="2 non-finite losses in a row") as info:
        loop.train(cfg, devices=jax.devices()[:1])
    message = str(info.value)
    last = int(message.split("(last at step ")[1].split(")")[0])
    saved = message.split("saved ")[1].split(" and stopped")[0]
    assert os.path.isdir(saved)
    # metrics are read one step late: the step already queued when the stop was seen is recorded
    # and saved too (it was skipped as well, so the weights are those of the diverged step)
    assert int(os.path.basename(saved)) in (last, last + 1)
    records = {r["step"]: r for r in _records(tmp_path) if "loss" in r}
    # non-finite values are written as JSON null (strict JSON: json.loads would accept NaN)
    assert records[last]["skipped"] == 2 and records[last]["loss"] is None
    assert max(records) == int(os.path.basename(saved))


def _no_compile(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("compiled although the input was bad")

    monkeypatch.setattr("pythia_jax.train.builder.compile_train_step", fail)
    monkeypatch.setattr("pythia_jax.train.builder.compile_eval_step", fail)


def test_checkpoint_of_another_model_refused_before_compute(straight_run, monkeypatch):
    out, _ = straight_run
    _no_compile(monkeypatch)
    monkeypatch.setattr(builder, "build", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    other = loop_config(out, model=ModelConfig(vocab_size=50304, hidden_size=64, num_layers=2, num_heads=2))
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 32 vs current 64"):
        loop.train(other, devices=jax.devices()[:1])


def test_mesh_not_matching_devices_refused_before_compute(tmp_path, monkeypatch):
    _no_compile(monkeypatch)
    with pytest.raises(ConfigError, match="has 2 devices but 1 are available"):
        loop.train(loop_config(tmp_path, mesh=MeshConfig(data=2)), devices=jax.devices()[:1])


def test_unknown_gin_binding_is_an_error(capsys):
    with pytest.raises(ConfigError, match="TrainConfig.*num_stepz"):
        gin_setup.parse(["configs/demo.gin"], ["TrainConfig.num_stepz = 5"])
    with pytest.raises(ConfigError, match="denylisted"):
        gin_setup.parse(["configs/demo.gin"], ["TrainConfig.optimizer = None"])
    from pythia_jax import cli

    assert cli.main(["train", "--gin_file=configs/demo.gin", "--gin.OptimizerConfig.max_rl=1"]) == 2
    err = capsys.readouterr().err
    assert "pythia-jax train: error: bad gin configuration" in err and "max_rl" in err
    assert "Traceback" not in err


def test_gin_builds_the_train_config():
    from pythia_jax.train.config import build_train_config

    gin_setup.parse(["configs/train/pythia-160m.gin"], ["MeshConfig.tensor = 2", "TrainConfig.micro_batches = 4"])
    cfg = build_train_config()
    assert cfg.model.hidden_size == 768 and cfg.model.dtype == "bfloat16"
    assert cfg.optimizer.max_lr == 6e-4 and cfg.min_lr == pytest.approx(6e-5)
    assert cfg.warmup_steps == 1430 and cfg.decay_steps == 143000 and cfg.optimizer.loss_scaling
    assert cfg.mesh.tensor == 2 and cfg.micro_batches == 4 and cfg.global_batch == 1024
    steps = cfg.checkpoint_schedule().steps()
    assert len(steps) == 154 and steps[:3] == [0, 1, 2] and steps[-1] == 143000
    from pythia_jax.train.config import pythia_recipe

    python = pythia_recipe("pythia-160m")  # the same recipe from Python
    assert (python.optimizer.max_lr, python.min_lr, python.warmup_steps, python.decay_steps, python.global_batch,
            python.seq_length, python.num_steps) == (cfg.optimizer.max_lr, cfg.min_lr, cfg.warmup_steps,
                                                     cfg.decay_steps, 1024, 2048, 143000)
    gin_setup.parse(["configs/train/pythia-1b.gin"])
    assert not build_train_config().optimizer.loss_scaling  # pythia-1b trained in bf16
    assert not pythia_recipe("pythia-1b").optimizer.loss_scaling
    # tensor parallelism of the original runs: the row-parallel bias copies (train/optimizer.py)
    from pythia_jax.config import RELEASED_SIZES
    for size in RELEASED_SIZES:
        for suffix in ("", "-deduped"):
            gin_setup.parse([f"configs/train/pythia-{size}{suffix}.gin"])
            want = {"6.9b": 2, "12b": 4}.get(size, 1)
            assert build_train_config().optimizer.row_parallel_bias_copies == want, size + suffix
            assert pythia_recipe(f"pythia-{size}{suffix}").optimizer.row_parallel_bias_copies == want


def test_init_from_hf_directory(tmp_path, compile_cache):
    import pythia_jax
    from pythia_jax.checkpoint import load_params
    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.model import params_to_dict

    cfg = loop_config(tmp_path / "run", init_from=str(tmp_path / "hf"), eval_every=0)
    start = jax.tree.map(np.asarray, params_to_dict(pythia_jax.init(cfg.model, seed=11)))
    write_hf_dir(cfg.model, start, tmp_path / "hf", dtype="float32")
    loop.train(cfg, devices=jax.devices()[:1], max_steps=1)
    _, step0 = load_params(str(tmp_path / "run" / "checkpoints"), step=0)
    for a, b in zip(jax.tree.leaves(step0), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_evaluate_is_the_token_weighted_mean_over_batches():
    """Held-out loss = Σ loss_sum / Σ tokens over all batches."""
    import jax.numpy as jnp

    class Setup:
        put_batch = staticmethod(lambda b: b)
        eval_step = staticmethod(lambda params, b: {"loss_sum": jnp.float32(b["l"]), "tokens": jnp.float32(b["n"])})

    batches = [{"l": 10.0, "n": 4.0}, {"l": 3.0, "n": 1.0}, {"l": 0.0, "n": 5.0}]
    assert loop.evaluate(Setup, None, batches) == pytest.approx(13.0 / 10.0)
    with pytest.raises(ConfigError, match="empty"):
        loop.evaluate(Setup, None, [])
