"""Anything that reads a run's training rows reads them as that run did (issue 12).

A tiny model is trained (GPT-NeoX order, seed 7, global batch 4, seq_len 64, 150 steps) on a small
dataset in which 3 documents occur 100 times each among 600 documents that occur once, so it
memorizes exactly the rows holding those 3 documents. Memorization from the checkpoint directory
alone (no data flags) must find exactly those rows, read through the trainer's own pipeline; wrong
explicit flags are refused; no index maps but the run's own are used; ``batches --checkpoints`` and
``read_run_data`` give the trainer's rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from pythia_jax.checkpoint import read_run_data, resolve_run_data
from pythia_jax.cli import main as cli_main
from pythia_jax.config import ModelConfig
from pythia_jax.data.run_data import RunDataError, RunDataMismatch

SEQ, BATCH, STEPS, SEED = 64, 4, 150, 7
TINY = ModelConfig(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """{"out": run dir, "prefix": data prefix, "memorable": set of 64-token tuples, "rows": the
    trainer's rows [STEPS·BATCH, SEQ+1] read through its own pipeline}."""
    from pythia_jax.data.indexed import write_indexed_dataset
    from pythia_jax.data.pipeline import make_train_iterator
    from pythia_jax.train import loop
    from pythia_jax.train.config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig

    root = tmp_path_factory.mktemp("memrun")
    rng = np.random.default_rng(0)
    memorable = [rng.integers(2, 500, SEQ) for _ in range(3)]
    docs = [m for m in memorable for _ in range(100)] + [rng.integers(2, 500, SEQ) for _ in range(600)]
    docs = [docs[i].astype(np.uint16) for i in rng.permutation(len(docs))]
    prefix = str(root / "data" / "train")
    os.makedirs(root / "data")
    write_indexed_dataset(prefix, docs)
    out = root / "run"
    cfg = TrainConfig(model=TINY, optimizer=OptimizerConfig(max_lr=1e-2, warmup_steps=5), mesh=MeshConfig(data=1),
                      data=DataConfig(prefix=prefix, order="neox", seed=SEED), output_dir=str(out),
                      num_steps=STEPS, global_batch=BATCH, seq_length=SEQ, checkpoint_log_until=-1,
                      checkpoint_every=75, log_every=50, eval_every=0, progress_bar=False, tensorboard=False,
                      async_checkpointing=False)
    loop.train(cfg, devices=jax.devices()[:1])
    it = make_train_iterator(prefix, order="neox", seq_len=SEQ, global_batch=BATCH, seed=SEED,
                             train_iters=STEPS, process_index=0, process_count=1, num_threads=1,
                             cache_prefix=str(out / "index_maps" / "train"))
    rows = []
    for _ in range(STEPS):
        b = next(it)
        rows.append(np.concatenate([b["inputs"], b["labels"][:, -1:]], axis=1))
    return {"out": out, "prefix": prefix, "memorable": {tuple(m.tolist()) for m in memorable},
            "rows": np.concatenate(rows)}


def _files(*dirs) -> set[str]:
    return {os.path.join(d, f) for top in dirs if os.path.isdir(top) for d, _, fs in os.walk(top) for f in fs}


def test_memorization_from_checkpoints_alone_finds_exactly_the_memorized_rows(run, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHIA_JAX_CACHE", str(tmp_path / "user_cache"))
    watched = (str(run["out"]), os.path.dirname(run["prefix"]), str(tmp_path / "user_cache"))
    before = _files(*watched)
    out = tmp_path / "mem.jsonl"
    details = tmp_path / "details"
    argv = ["eval", "--checkpoints", str(run["out"] / "checkpoints"), "--steps", "75,150",
            "--tasks", "memorization", "--out", str(out), "--details-dir", str(details),
            "--mem-chunk-rows", "128", "--no-progress"]
    assert cli_main(argv) == 0
    assert _files(*watched) == before  # the run's own index maps were used, nothing new was built

    expected = np.array([tuple(r[:64].tolist()) in run["memorable"] for r in run["rows"]])
    assert 100 < expected.sum() < len(expected) - 100  # a real mix of memorized and unseen-before rows
    per_row = np.load(details / "step150_memorization.npy")
    assert per_row["row"].tolist() == list(range(STEPS * BATCH))
    assert per_row["memorized"].tolist() == expected.tolist()
    assert (per_row["score"] == per_row["matched"] / np.float32(32)).all()
    assert (per_row["memorized"] == (per_row["score"] == 1)).all()
    assert per_row["score"][~expected].max() < 0.5
    early = np.load(details / "step75_memorization.npy")  # step 75 has seen rows [0, 300)
    assert early["row"].tolist() == list(range(75 * BATCH))
    assert len(list((details / "step150_memorization.parts").glob("chunk-*.npy"))) == 5  # 600 rows / 128

    table = {(r["step"], r["metric"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert table[(150, "num_memorized")]["value"] == expected.sum()
    assert table[(150, "memorized")]["value"] == pytest.approx(expected.mean())
    assert table[(150, "score")]["value"] == pytest.approx(per_row["score"].astype(np.float64).mean())
    assert table[(150, "score")]["num_examples"] == STEPS * BATCH


@pytest.mark.parametrize("flag,value,setting,recorded", [
    ("--mem-order", "preshuffled", "order", "neox"),
    ("--mem-seq-len", "2048", "seq_len", "64"),
    ("--mem-rows-per-step", "1024", "global_batch", "4"),
    ("--mem-order-seed", "1234", "seed", "7"),
    ("--mem-train-iters", "143000", "train_iters", "150"),
    ("--mem-data", "demo", "data", None),
])
def test_wrong_explicit_flags_are_refused(run, tmp_path, capsys, flag, value, setting, recorded):
    out = tmp_path / "mem.jsonl"
    code = cli_main(["eval", "--checkpoints", str(run["out"] / "checkpoints"), "--steps", "150",
                     "--tasks", "memorization", "--out", str(out), flag, value, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert f"{flag} " in err and f"{setting} = " in err, err
    if recorded is not None:
        assert f"{setting} = {recorded};" in err, err
    assert not out.exists()


def test_agreeing_flags_and_a_moved_copy_are_accepted(run, tmp_path):
    import shutil

    for ext in (".bin", ".idx"):
        shutil.copy(run["prefix"] + ext, tmp_path / f"copy{ext}")
    r = read_run_data(run["out"], 150, data=str(tmp_path / "copy"), order="neox", seq_len=SEQ,
                                 global_batch=BATCH, seed=SEED, train_iters=STEPS)
    assert r.prefix() == str(tmp_path / "copy") and r.rows_seen(150) == 600
    order = r.open_order()
    np.testing.assert_array_equal(r.read_rows(order, np.arange(600)), run["rows"])


def test_run_data_reads_the_trainers_rows_at_every_step(run):
    for step in (75, 150):
        r = read_run_data(run["out"] / "checkpoints", step)
        assert (r.order, r.seed, r.global_batch, r.seq_len, r.train_iters) == ("neox", SEED, BATCH, SEQ, STEPS)
        assert r.cache_prefix == str(run["out"] / "index_maps" / "train")
    order = r.open_order()
    maps = os.listdir(run["out"] / "index_maps")  # sized for the run (GPT-NeoX's 0.5% margin), not Pythia
    assert maps and all(f"_{int(np.ceil(STEPS * BATCH * 1.005))}ns_{SEQ}sl_{SEED}s_" in m for m in maps), maps
    np.testing.assert_array_equal(r.read_rows(order, np.arange(STEPS * BATCH)), run["rows"])


def test_checkpoints_without_a_record_need_every_flag(run, tmp_path):
    from pythia_jax.checkpoint import load_params, save_params_checkpoint

    config, params = load_params(run["out"] / "checkpoints", step=150, host=True)
    bare = tmp_path / "converted"
    save_params_checkpoint(bare, 150, config, params)
    from pythia_jax.eval.runner import MEM_FLAGS

    with pytest.raises(RunDataError, match=r"missing: --mem-order, --mem-seq-len, --mem-rows-per-step$"):
        resolve_run_data(bare, 150, what=MEM_FLAGS, data=run["prefix"])
    with pytest.raises(RunDataError, match=r"missing: --mem-order-seed, --mem-train-iters$"):
        resolve_run_data(bare, 150, what=MEM_FLAGS, data=run["prefix"], order="neox", seq_len=SEQ,
                        global_batch=BATCH)
    r = resolve_run_data(bare, 150, data=run["prefix"], order="neox", seq_len=SEQ, global_batch=BATCH,
                        seed=SEED, train_iters=STEPS, cache_prefix=str(run["out"] / "index_maps" / "train"))
    np.testing.assert_array_equal(r.read_rows(r.open_order(), np.arange(8)), run["rows"][:8])
    with pytest.raises(RunDataMismatch, match=r"--global-batch 8 disagrees with .*global_batch = 4"):
        read_run_data(run["out"], global_batch=8)


def test_batches_from_checkpoints(run, tmp_path, capsys):
    out = tmp_path / "b.npy"
    assert cli_main(["batches", "--checkpoints", str(run["out"]), "--start", "3", "--end", "5",
                     "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), run["rows"][3 * BATCH:6 * BATCH])
    capsys.readouterr()
    assert cli_main(["batches", "--checkpoints", str(run["out"]), "--start", "0", "--end", "0",
                     "--batch-size", "1024", "--out", str(tmp_path / "c.npy")]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 1024 disagrees" in err and "global_batch = 4" in err
    assert not (tmp_path / "c.npy").exists()
    assert cli_main(["batches", "--checkpoints", str(run["out"]), "--start", "149", "--end", "150",
                     "--out", str(tmp_path / "d.npy")]) == 2  # beyond the run's 150 steps
    assert "150 steps" in capsys.readouterr().err
    # a folder that does not exist, or a step that does not: said so (not "missing: --data ..."),
    # the steps there are listed
    for command in (["batches", "--start", "0", "--end", "0"], ["count", "--text", "x", "--at-steps", "1,2",
                                                                "--out", str(tmp_path / "c.csv")]):
        assert cli_main(command + ["--checkpoints", str(tmp_path / "nope")]) == 2
        assert f"the checkpoint folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert cli_main(["batches", "--checkpoints", str(run["out"]), "--step", "7", "--start", "0", "--end", "0"]) == 2
    assert "has no checkpoint step 7; available: " in capsys.readouterr().err


def test_sweep_split_over_hosts_resumes_and_merges(run, tmp_path, monkeypatch):
    from pythia_jax.checkpoint import load_params
    from pythia_jax.eval import memorization as M
    from pythia_jax.eval.generate import Generator
    from pythia_jax.eval.runtime import place_model

    r = read_run_data(run["out"], 75)
    order = r.open_order()
    config, params = load_params(run["out"] / "checkpoints", step=75, host=True)
    gen = Generator(place_model(params, config=config), batch_size=64)
    whole = M.evaluate_memorization(gen, order, 75, batch_size=BATCH, run=r).per_row
    d = tmp_path / "details"
    assert M.sweep_memorization(gen, r, 75, d, order=order, chunk_rows=64, num_hosts=2, host_index=0) is None
    host0 = sorted(p.name for p in Path(M.parts_dir(d, 75)).glob("chunk-*.npy"))
    assert host0 == [f"chunk-{c:06d}.npy" for c in (0, 2, 4)]  # 300 rows: chunks 0..4, even ones here
    merged = M.sweep_memorization(gen, r, 75, d, order=order, chunk_rows=64, num_hosts=2, host_index=1)
    np.testing.assert_array_equal(merged.per_row, whole)
    np.testing.assert_array_equal(np.load(M.merged_path(d, 75)), whole)
    # a rerun scores nothing again
    monkeypatch.setattr(gen, "generate", lambda *a, **k: pytest.fail("a finished chunk was scored again"))
    again = M.sweep_memorization(gen, r, 75, d, order=order, chunk_rows=64)
    np.testing.assert_array_equal(again.per_row, whole)
    with pytest.raises(M.MemorizationError, match=r"chunk_rows: 64 there, 32 now"):
        M.sweep_memorization(gen, r, 75, d, order=order, chunk_rows=32)


def test_count_from_checkpoints_counts_the_runs_rows(run, tmp_path, capsys):
    """``pythia-jax count --checkpoints RUN`` counts over the rows the run trained on (no data flags)."""
    seq = sorted(run["memorable"])[0][:3]
    out = tmp_path / "c.jsonl"
    assert cli_main(["count", "--checkpoints", str(run["out"]), "--ids", ",".join(map(str, seq)),
                     "--at-steps", "75,150", "--out", str(out), "--no-progress"]) == 0
    got = {r["window_end"]: r["cumulative"] for r in map(json.loads, out.read_text().splitlines())}

    def brute(rows):
        return sum(1 for r in rows for i in range(len(r) - 2) if tuple(r[i:i + 3].tolist()) == seq)

    assert got == {75: brute(run["rows"][:300]), 150: brute(run["rows"])} and got[150] > 30
    assert cli_main(["count", "--checkpoints", str(run["out"]), "--ids", "5", "--seq-len", "2048",
                     "--out", str(tmp_path / "d.jsonl")]) == 2
    assert "--seq-len 2048 disagrees" in capsys.readouterr().err


def _with_transform(run, tmp_path, transform):
    """A copy of the run whose record says it trained with ``transform`` (a TransformSpec dict)."""
    import shutil

    copy = tmp_path / "swap"
    shutil.copytree(run["out"], copy)
    for step in ("75", "150"):
        meta = copy / "checkpoints" / step / "metadata" / "metadata"
        doc = json.loads(meta.read_text())
        doc["run_config"]["data"]["transform"] = transform
        meta.write_text(json.dumps(doc))
    return copy


def _refused(capsys, args, *parts):
    code = cli_main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    for part in parts:
        assert part in err, err
    return err


def test_transform_flags_beside_checkpoints_must_agree_with_the_record(run, tmp_path, capsys):
    """--transform / --transform-param / --transform-steps beside --checkpoints are data flags: each
    must equal the run's recorded transform (else one line naming both values), never applied to
    rows the run did not train on that way, nor silently ignored."""
    from pythia_jax.data.transforms import build_transform

    out = tmp_path / "rows.npy"
    base = ["batches", "--checkpoints", str(run["out"]), "--start", "0", "--end", "0", "--out", str(out)]
    _refused(capsys, base + ["--transform", "gender_swap"],
             "--transform gender_swap disagrees with the run recorded in", ": transform = none;")
    _refused(capsys, base + ["--transform-steps", "0,50"],
             "--transform-steps 0,50 disagrees", "transform_steps = none (no transform)")
    swap = _with_transform(run, tmp_path, {"name": "gender_swap", "params": {}, "steps": [75, 150]})
    base = ["batches", "--checkpoints", str(swap), "--start", "74", "--end", "75", "--out", str(out)]
    _refused(capsys, base + ["--transform-steps", "0,50"],
             "--transform-steps 0,50 disagrees with the run recorded in", "transform_steps = 75,150;")
    _refused(capsys, base + ["--transform", "gender_swap_text_2023"],
             "--transform gender_swap_text_2023 disagrees", "transform = gender_swap;")
    _refused(capsys, base + ["--transform", "gender_swap", "--transform-param", "direction=f2m"],
             "--transform-param direction=f2m disagrees", "transform_params = none;")
    assert not out.exists()
    # agreeing flags: the rows the run trained on, the transform in steps 75..149 only
    assert cli_main(base + ["--transform", "gender_swap", "--transform-steps", "75,150"]) == 0
    fn = build_transform("gender_swap")
    rows = run["rows"][74 * BATCH:76 * BATCH].astype(np.uint16)
    want = np.concatenate([rows[:BATCH], np.stack([fn(r) for r in rows[BATCH:]])])
    np.testing.assert_array_equal(np.load(out), want)
    assert "step 75: gender_swap changed" in capsys.readouterr().out
    assert read_run_data(swap, transform="gender_swap", transform_steps=[75, 150]).transform["steps"] == [75, 150]


def test_count_and_batches_refuse_steps_beyond_the_run_and_step_without_checkpoints(run, tmp_path, capsys):
    out = tmp_path / "c.csv"
    _refused(capsys, ["count", "--checkpoints", str(run["out"]), "--ids", "5", "--at-steps", "75,200",
                      "--out", str(out), "--no-progress"], "steps [0, 200): the run has 150 steps (0..149)")
    _refused(capsys, ["count", "--checkpoints", str(run["out"]), "--ids", "5", "--stop", "151",
                      "--out", str(out), "--no-progress"], "steps [0, 151): the run has 150 steps (0..149)")
    assert not out.exists() and not os.path.exists(str(out) + ".parts")
    _refused(capsys, ["batches", "--data", run["prefix"], "--order", "neox", "--batch-size", str(BATCH),
                      "--seq-len", str(SEQ), "--seed", str(SEED), "--train-iters", str(STEPS), "--step", "75",
                      "--start", "0", "--end", "0"], "--step 75 picks the checkpoint", "it needs --checkpoints")
    _refused(capsys, ["count", "--data", run["prefix"], "--ids", "5", "--step", "75", "--out", str(out)],
             "--step 75 picks the checkpoint")
    # without --stop, a recorded run's count stops at its last step
    assert cli_main(["count", "--checkpoints", str(run["out"]), "--ids", "5", "--window", "100",
                     "--out", str(out), "--no-progress"]) == 0
    from pythia_jax.data.count import read_table
    assert sorted({(r["window_start"], r["window_end"]) for r in read_table(str(out))}) == [(0, 100), (100, 150)]
