"""Intervention runs (the paper's gender-swap case study): a row transform in a step window, its
per-step counts, its record in the checkpoints, and branching a run at step S from another run's
checkpoint (bit-identical without a transform), an HF directory (zero moments) or a bad step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest

from pythia_jax import checkpoint as C
from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.errors import CheckpointError
from pythia_jax.train import loop
from pythia_jax.train.config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig

NUM_STEPS = 8
TINY = ModelConfig(vocab_size=50304, hidden_size=32, num_layers=2, num_heads=2)


def run_cfg(output_dir, data=None, **kw) -> TrainConfig:
    fields = dict(model=TINY, optimizer=OptimizerConfig(max_lr=3e-3, warmup_steps=1), mesh=MeshConfig(data=1),
                  data=data or DataConfig(prefix="demo", order="neox"), output_dir=str(output_dir),
                  num_steps=NUM_STEPS, global_batch=4, seq_length=128, checkpoint_log_until=4,
                  checkpoint_every=0, log_every=1, eval_every=0, progress_bar=False, tensorboard=False,
                  async_checkpointing=False)
    fields.update(kw)
    return TrainConfig(**fields)


def rows(out) -> dict[int, dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def params_of(result):
    return jax.tree.map(np.asarray, result.params)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """8 steps without a transform; checkpoints 0, 1, 2, 4, 8 (with optimizer state)."""
    out = tmp_path_factory.mktemp("baseline")
    return out, loop.train(run_cfg(out), devices=jax.devices()[:1])


SWAP = DataConfig(prefix="demo", order="neox", transform="gender_swap", transform_steps=(4, 8))


def test_branch_from_a_checkpoint_reproduces_the_run_bit_for_bit(baseline, tmp_path):
    out, base = baseline
    branch = loop.train(run_cfg(tmp_path / "b", init_from=str(out), start_step=4), devices=jax.devices()[:1])
    assert sorted(branch.losses) == [5, 6, 7, 8]
    assert all(branch.losses[s] == base.losses[s] for s in branch.losses)  # exact, not close
    for a, b in zip(jax.tree.leaves(params_of(branch)), jax.tree.leaves(params_of(base))):
        np.testing.assert_array_equal(a, b)
    # numbered from S: the branch's own checkpoints are 4 and 8
    assert C.TrainCheckpointer(tmp_path / "b" / "checkpoints").all_steps() == [4, 8]
    record = C.read_run_config(tmp_path / "b")
    assert record["init"]["start_step"] == 4 and record["init"]["adam_moments"] == "source"


def test_intervention_branch_differs_only_by_the_transform(baseline, tmp_path):
    out, base = baseline
    cfg = run_cfg(tmp_path / "swap", data=SWAP, init_from=str(out), start_step=4)
    swapped = loop.train(cfg, devices=jax.devices()[:1])
    log = rows(tmp_path / "swap")
    changed = {s: (r["transform_rows"], r["transform_tokens"]) for s, r in log.items() if "transform_rows" in r}
    # step n's row in metrics.jsonl is the update made with the batch of step n-1
    assert sorted(changed) == [5, 6, 7, 8]
    from pythia_jax.data import demo_data_prefix
    from pythia_jax.data.orders import open_order
    from pythia_jax.data.transforms import apply_to_rows, build_transform

    order = open_order(demo_data_prefix(), "neox", seq_len=128, seed=1234, train_iters=NUM_STEPS,
                       global_batch=4, cache_prefix=str(tmp_path / "maps" / "demo"))
    fn = build_transform("gender_swap")
    for step in range(4, 8):
        _, stats = apply_to_rows(order.read_rows(4 * step, 4 * step + 4), fn)
        assert changed[step + 1] == (stats.rows_changed, stats.tokens_changed)
    assert sum(t for _, t in changed.values()) > 0  # the demo text has pronouns in these steps
    assert swapped.losses[5] != base.losses[5] or changed[5][1] == 0
    record = C.read_run_config(tmp_path / "swap")
    assert record["data"]["transform"] == {"name": "gender_swap", "params": {}, "steps": [4, 8]}
    # resuming the intervention run without its transform is refused, with one line naming the gin
    # bindings that restore it (not the record's dict)
    with pytest.raises(C.RunConfigMismatch, match=r"use DataConfig.transform = 'gender_swap', transform_params = "
                                                  r"\{\} and transform_steps = \(4, 8\); to start a new run"):
        loop.train(run_cfg(tmp_path / "swap", init_from=str(out), start_step=4), devices=jax.devices()[:1])


def test_branch_from_an_hf_directory_starts_adam_from_zero(baseline, tmp_path, caplog):
    out, base = baseline
    from pythia_jax.convert.hf import write_hf_dir

    _, params = C.load_params(out / "checkpoints", step=4)
    write_hf_dir(TINY, params, tmp_path / "hf" / "step4", dtype="float32")
    with caplog.at_level(logging.WARNING):
        branch = loop.train(run_cfg(tmp_path / "b", init_from=str(tmp_path / "hf" / "step4"), start_step=4),
                            devices=jax.devices()[:1])
    assert "zero Adam moments" in caplog.text
    log, base_log = rows(tmp_path / "b"), rows(out)
    assert log[5]["lr"] == pytest.approx(base_log[5]["lr"], rel=1e-6)  # the schedule is at step 4
    assert branch.losses[5] == pytest.approx(base.losses[5], rel=1e-5)  # same weights, same batch
    assert C.read_run_config(tmp_path / "b")["init"]["adam_moments"] == "zero"


def test_a_branch_continues_at_the_step_its_source_folder_names(baseline, tmp_path, caplog):
    """init_from naming a step folder (run/checkpoints/4) branched from step 0 when start_step was
    left 0, and used another step when it named one; a Hub revision folder step<N> was trained on
    another step's rows. Now: the folder's step is used (start_step 0) or must match; a resume of
    such a branch with the same command is accepted."""
    out, base = baseline
    branch = loop.train(run_cfg(tmp_path / "b", init_from=str(out / "checkpoints" / "4")), devices=jax.devices()[:1],
                        max_steps=1)
    assert sorted(branch.losses) == [5] and branch.losses[5] == base.losses[5]
    assert C.read_run_config(tmp_path / "b")["init"]["start_step"] == 4
    resumed = loop.train(run_cfg(tmp_path / "b", init_from=str(out / "checkpoints" / "4")), devices=jax.devices()[:1],
                         max_steps=1)
    assert sorted(resumed.losses) == [6] and resumed.losses[6] == base.losses[6]
    with pytest.raises(CheckpointError, match=r"checkpoints/4 at start_step 2: it is the folder of step 4; set "
                                              r"TrainConfig.start_step = 4"):
        loop.train(run_cfg(tmp_path / "c", init_from=str(out / "checkpoints" / "4"), start_step=2),
                   devices=jax.devices()[:1], max_steps=1)
    from pythia_jax.convert.hf import write_hf_dir

    _, params = C.load_params(out / "checkpoints", step=4)
    write_hf_dir(TINY, params, tmp_path / "revs" / "step4", dtype="float32")
    write_hf_dir(TINY, params, tmp_path / "export", dtype="float32", source={"run": "r", "step": 4})
    for source in (tmp_path / "revs" / "step4", tmp_path / "export"):  # named step<N>, or recorded
        for start, extra in ((2, ""), (0, r" \(to start these weights at step 0, copy them")):
            with pytest.raises(CheckpointError, match=rf"its weights are step 4's .*; set TrainConfig.start_step = 4 "
                                                      rf"to continue it{extra}"):
                loop.train(run_cfg(tmp_path / "d", init_from=str(source), start_step=start),
                           devices=jax.devices()[:1], max_steps=1)
    # the folder of revisions itself: the revision start_step names (it loaded the newest one)
    with pytest.raises(CheckpointError, match=r"revs has no step 2; available: 4"):
        loop.train(run_cfg(tmp_path / "d", init_from=str(tmp_path / "revs"), start_step=2), devices=jax.devices()[:1],
                   max_steps=1)
    branch = loop.train(run_cfg(tmp_path / "f", init_from=str(tmp_path / "revs"), start_step=4),
                        devices=jax.devices()[:1], max_steps=1)
    assert branch.losses[5] == pytest.approx(base.losses[5], rel=1e-5)
    write_hf_dir(TINY, params, tmp_path / "weights", dtype="float32")
    with caplog.at_level(logging.WARNING):
        loop.train(run_cfg(tmp_path / "e", init_from=str(tmp_path / "weights")), devices=jax.devices()[:1], max_steps=1)
    assert "starting from the weights of" in caplog.text and "at step 0: the rows and the LR schedule" in caplog.text


def test_a_branch_records_what_it_changed_against_its_source(baseline, tmp_path):
    """check_resume's accepted changes on a branch (a compute dtype here) were logged as recorded
    but dropped: the branch's record now holds them, from the branch step."""
    out, _ = baseline
    loop.train(run_cfg(tmp_path / "b", model=TINY.replace(dtype="bfloat16"), init_from=str(out), start_step=4),
               devices=jax.devices()[:1], max_steps=1)
    assert C.read_run_config(tmp_path / "b")["changes"] == [
        {"step": 4, "changed": {"ModelConfig.dtype": ["float32", "bfloat16"]}}]


def test_branch_from_a_params_only_checkpoint_starts_adam_from_zero(baseline, tmp_path, caplog):
    """A checkpoint of this project without optimizer state (``convert hf-to-jax`` without
    --with-optimizer, which keeps a release's float16) branches like an HF directory: the float32
    upcast of its weights, zero Adam moments, warned and recorded."""
    out, base = baseline
    _, params = C.load_params(out / "checkpoints", step=4, host=True)
    half = jax.tree.map(lambda x: x.astype(np.float16), params)
    C.save_params_checkpoint(tmp_path / "ck", 4, TINY, half)
    with caplog.at_level(logging.WARNING):
        loop.train(run_cfg(tmp_path / "b", init_from=str(tmp_path / "ck"), start_step=4),
                   devices=jax.devices()[:1], max_steps=1)
    assert "zero Adam moments" in caplog.text
    _, start = C.load_params(tmp_path / "b" / "checkpoints", step=4, host=True)
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(half)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b.astype(np.float32))
    assert rows(tmp_path / "b")[5]["lr"] == pytest.approx(rows(out)[5]["lr"], rel=1e-6)
    assert C.read_run_config(tmp_path / "b")["init"]["adam_moments"] == "zero"


def test_branch_from_a_fresh_optimizer_state_is_recorded_as_zero_moments(baseline, tmp_path, caplog):
    """``convert hf-to-jax --with-optimizer`` stores a fresh optimizer state: its Adam moments are
    zero, so a branch from it is the same restart as one from an HF directory, and is warned and
    recorded as such (it was recorded as the source's moments)."""
    from pythia_jax.train.continuation import fresh_opt_state

    out, _ = baseline
    _, params = C.load_params(out / "checkpoints", step=4, host=True)
    C.save_params_checkpoint(tmp_path / "ck", 4, TINY, params, opt_state=fresh_opt_state(params, schedule_count=4))
    with caplog.at_level(logging.WARNING):
        loop.train(run_cfg(tmp_path / "b", init_from=str(tmp_path / "ck"), start_step=4),
                   devices=jax.devices()[:1], max_steps=1)
    assert "zero Adam moments" in caplog.text and "fresh one" in caplog.text
    assert C.read_run_config(tmp_path / "b")["init"]["adam_moments"] == "zero"
    assert rows(tmp_path / "b")[5]["lr"] == pytest.approx(rows(out)[5]["lr"], rel=1e-6)


def test_bad_branches_and_transforms_are_one_line_errors(baseline, tmp_path):
    out, _ = baseline
    with pytest.raises(CheckpointError, match=r"it has no step 3; its steps are 0, 1, 2, 4, 8"):
        loop.train(run_cfg(tmp_path / "b", init_from=str(out), start_step=3), devices=jax.devices()[:1])
    assert not (tmp_path / "b" / "checkpoints").exists() or not C.TrainCheckpointer(
        tmp_path / "b" / "checkpoints").all_steps()
    with pytest.raises(ConfigError, match="unknown transform 'swap_all'"):
        run_cfg(tmp_path / "c", data=DataConfig(prefix="demo", transform="swap_all"))
    with pytest.raises(ConfigError, match="beyond the run's 8 steps"):
        run_cfg(tmp_path / "c", data=DataConfig(prefix="demo", transform="gender_swap", transform_steps=(4, 9)))
    with pytest.raises(ConfigError, match="needs TrainConfig.init_from"):
        run_cfg(tmp_path / "c", start_step=4)
    with pytest.raises(C.RunConfigMismatch) as info:
        loop.train(run_cfg(tmp_path / "d", init_from=str(out), start_step=4, global_batch=8),
                   devices=jax.devices()[:1])
    # the output_dir is new: the advice is how to branch, not "use another output_dir"
    assert str(info.value) == (
        f"cannot branch from {out / 'checkpoints'}/4: TrainConfig.global_batch is 4 in the checkpoint but 8 now "
        "(it changes which rows every step reads). A branch continues the source's rows and model (only the "
        "row transform may change): use TrainConfig.global_batch = 4")
    assert not (tmp_path / "d").exists()  # the failed start left nothing behind


def test_resuming_a_branch_keeps_its_start_record(baseline, tmp_path, compile_cache):
    """Every checkpoint of a branch records where its weights came from, resumed or not: the
    same command, or one without init_from / start_step; a resume naming another source or step
    is refused with both values (it would continue from the branch's own step)."""
    out, _ = baseline
    from pythia_jax.convert.hf import write_hf_dir

    _, params = C.load_params(out / "checkpoints", step=4)
    hf = str(write_hf_dir(TINY, params, tmp_path / "hf", dtype="float32"))
    branch = run_cfg(tmp_path / "b", init_from=hf, start_step=4)
    for cfg in (branch, branch, run_cfg(tmp_path / "b")):
        loop.train(cfg, devices=jax.devices()[:1], max_steps=1)
    assert C.TrainCheckpointer(tmp_path / "b" / "checkpoints").all_steps() == [4, 5, 6, 7]
    for step in (4, 5, 6, 7):
        assert C.read_run_config(tmp_path / "b", step=step)["init"] == {
            "seed": 1234, "init_from": hf, "start_step": 4, "adam_moments": "zero"}, step
    with pytest.raises(C.RunConfigMismatch) as info:
        loop.train(run_cfg(tmp_path / "b", init_from=str(out), start_step=2), devices=jax.devices()[:1])
    assert str(info.value).startswith(
        f"cannot resume {tmp_path / 'b' / 'checkpoints'}/7: this run started from TrainConfig.init_from {hf!r} "
        f"at start_step 4, but the command asks for TrainConfig.init_from {str(out)!r} at start_step 2")
    assert C.TrainCheckpointer(tmp_path / "b" / "checkpoints").all_steps() == [4, 5, 6, 7]


@pytest.mark.slow  # end to end: two short trainings, two evaluations and a plot
def test_readme_intervention_example_runs_as_written(tmp_path, monkeypatch):
    """The README's worked example, command by command, on a tiny model (gin overrides appended)."""
    import os
    import shlex

    from pythia_jax import cli

    repo = Path(__file__).resolve().parent.parent
    readme = (repo / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Intervention runs", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line.split("#")[0]) for line in section.replace("\\\n", " ").splitlines()
                if line.strip().startswith("pythia-jax")]
    assert [c[1] for c in commands] == ["train", "train", "batches", "eval", "eval", "plot"]
    for name in ("configs", "tests"):
        os.symlink(repo / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    tiny = ["--gin.ModelConfig.hidden_size=16", "--gin.ModelConfig.num_layers=1",
            "--gin.ModelConfig.num_heads=2", "--gin.TrainConfig.global_batch=2",
            "--gin.TrainConfig.seq_length=32", "--gin.TrainConfig.eval_every=0",
            "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.tensorboard=False"]
    extra = {"train": tiny, "batches": ["--rows", "1"], "eval": ["--limit", "2", "--no-progress"], "plot": []}
    for command in commands:
        assert cli.main(command[1:] + extra[command[1]]) == 0, command
    base = [json.loads(line) for line in (tmp_path / "runs/demo/bias.jsonl").read_text().splitlines()]
    swap = [json.loads(line) for line in (tmp_path / "runs/demo-swap/bias.jsonl").read_text().splitlines()]
    for rows in (base, swap):
        assert {r["step"] for r in rows} == {100, 150, 200}
        assert {"winobias", "crows_pairs_gender", "lambada_openai"} <= {r["task"] for r in rows}
    assert (tmp_path / "runs/bias.png").read_bytes()[:4] == b"\x89PNG"
    record = C.read_run_config(tmp_path / "runs/demo-swap")
    assert record["data"]["transform"]["steps"] == [100, 200]
    assert record["init"] == {"seed": 1234, "init_from": os.path.abspath("runs/demo"), "start_step": 100,
                              "adam_moments": "source"}
    # the two runs share everything up to the branch, and differ after it
    b100 = C.load_params(tmp_path / "runs/demo/checkpoints", step=100)[1]
    s100 = C.load_params(tmp_path / "runs/demo-swap/checkpoints", step=100)[1]
    for a, b in zip(jax.tree.leaves(b100), jax.tree.leaves(s100)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_branch_from_a_gpt_neox_zero_checkpoint_imports_master_weights_and_moments(tmp_path):
    """init_from = an original GPT-NeoX checkpoint with ZeRO shards: the run starts at its iteration
    with its fp32 master weights and Adam moments (the state saved at the branch step is theirs)."""
    pytest.importorskip("torch")
    from test_convert import build_zero

    from pythia_jax.convert.neox import read_neox_checkpoint
    from pythia_jax.train.continuation import neox_train_state
    from pythia_jax.train.optimizer import adam_moments, schedule_count

    step_dir, _, _ = build_zero(tmp_path, tp=1, dp=2, form="torch", step=20)
    config, _, ckpt = read_neox_checkpoint(step_dir)
    params, opt_state, iteration, _ = neox_train_state(ckpt, config)
    assert iteration == 23
    cfg = run_cfg(tmp_path / "run", model=config, num_steps=30, seq_length=32, init_from=step_dir,
                  start_step=23)
    loop.train(cfg, devices=jax.devices()[:1], max_steps=0)  # restore/import only, then save
    root = tmp_path / "run" / "checkpoints"
    assert C.TrainCheckpointer(root).all_steps() == [23]
    record = C.read_run_config(root)
    assert record["init"]["adam_moments"] == "source" and record["init"]["start_step"] == 23
    from pythia_jax.train import builder

    setup = builder.build(cfg, jax.devices()[:1], compile_eval=False)
    restored = C.TrainCheckpointer(root).restore(
        step=23, abstract_state={"params": setup.abstract_state.params,
                                 "opt_state": setup.abstract_state.opt_state})
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mu, nu, count = adam_moments(restored.opt_state)
    mu0, nu0, count0 = adam_moments(opt_state)
    for a, b in zip(jax.tree.leaves(mu0) + jax.tree.leaves(nu0), jax.tree.leaves(mu) + jax.tree.leaves(nu)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(count) == int(count0) == 20 and int(schedule_count(restored.opt_state)) == 20
    with pytest.raises(CheckpointError, match="it is iteration 23"):
        loop.train(run_cfg(tmp_path / "run2", model=config, num_steps=30, seq_length=32,
                           init_from=step_dir, start_step=22), devices=jax.devices()[:1], max_steps=0)
