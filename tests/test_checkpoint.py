"""Checkpoints: Pythia's schedule, round trips, integrity fallback, shape errors, resharding restore."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pythia_jax import checkpoint as C
from pythia_jax.config import ModelConfig
from pythia_jax.errors import CheckpointError

REPO = Path(__file__).resolve().parent.parent
TINY = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2)


def _params(seed: int = 0) -> dict:
    """A params-shaped tree (the canonical names, tiny shapes), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    L, H, F, V = TINY.num_layers, TINY.hidden_size, TINY.intermediate_size, TINY.vocab_size
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {
        "embed_in": {"embedding": f(V, H)},
        "layers": {"attention": {"query_key_value": {"kernel": f(L, H, 3 * H), "bias": f(L, 3 * H)}},
                   "mlp": {"dense_h_to_4h": {"kernel": f(L, H, F), "bias": f(L, F)}}},
        "final_layer_norm": {"scale": f(H), "bias": f(H)},
        "embed_out": {"kernel": f(H, V)},
    }


def _optimizer() -> optax.GradientTransformation:
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask))


def _trained_opt_state(params):
    opt = _optimizer()
    state = opt.init(params)
    grads = jax.tree.map(lambda x: jnp.sin(x) * 0.1, params)
    _, state = opt.update(grads, state, params)
    return state


def _abstract(tree):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree)


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------ schedule
def test_pythia_steps_are_the_154_released_steps():
    steps = C.pythia_steps()
    assert len(steps) == 154
    assert steps[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert steps[-2:] == [142000, 143000]
    assert all(s % 1000 == 0 for s in steps[11:])
    schedule = C.CheckpointSchedule()
    assert [s for s in range(143_005) if schedule.should_save(s)] == steps


def test_scaled_down_schedule_and_extra_steps():
    assert C.pythia_steps(max_step=200, log_until=16, every=50) == [0, 1, 2, 4, 8, 16, 50, 100, 150, 200]
    sched = C.CheckpointSchedule(max_step=30, log_until=2, every=10, extra_steps=(7,))
    assert sched.steps() == [0, 1, 2, 7, 10, 20, 30]
    assert [s for s in range(40) if sched.should_save(s)] == sched.steps()
    assert C.CheckpointSchedule(max_step=9, log_until=-1, every=3).steps() == [3, 6, 9]


# ------------------------------------------------------------------------------ round trip
def test_save_restore_round_trip_bit_identical(tmp_path):
    params = _params(1)
    opt_state = _trained_opt_state(params)
    sched = C.CheckpointSchedule(max_step=100, log_until=2, every=5)
    with C.TrainCheckpointer(tmp_path / "ckpt", save_steps=sched, model_config=TINY) as ckpt:
        saved = [s for s in range(7) if ckpt.save(s, params, opt_state, {"next_row": s * 8},
                                                 {"loss": 2.5 + s, "tokens": s * 1024})]
        assert saved == [0, 1, 2, 5]
        assert ckpt.save(6, params, None, None, None, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [0, 1, 2, 5, 6]
        assert ckpt.latest_valid_step() == 6
        restored = ckpt.restore(5, {"params": _abstract(params), "opt_state": _abstract(opt_state)})
        with pytest.raises(CheckpointError, match="holds no optimizer state"):
            ckpt.restore(6, {"params": _abstract(params), "opt_state": _abstract(opt_state)})
    assert restored.step == 5
    _assert_trees_equal(restored.params, params)
    _assert_trees_equal(restored.opt_state, opt_state)
    assert isinstance(restored.opt_state[1][0], optax.ScaleByAdamState)
    assert restored.data_state == {"next_row": 40}
    assert restored.metadata == {"loss": 7.5, "tokens": 5120}
    stored_cfg = json.loads((tmp_path / "ckpt" / "model_config.json").read_text())
    assert ModelConfig.from_dict(stored_cfg) == TINY


def test_keep_checkpoints_never_deletes_steps_saved_before_it(tmp_path):
    """A resume that adds keep_checkpoints = 2 to a run saved under keep-all deleted its earlier
    steps at the next save, without a word: the writer is refused, naming the steps. A run saved
    with the same setting (N steps, or N + 1 when stopped between a save and its pruning) opens."""
    params = _params(1)
    with C.TrainCheckpointer(tmp_path / "ckpt", save_steps=range(10), model_config=TINY, async_save=False) as ckpt:
        for s in (0, 1, 2, 4):
            ckpt.save(s, params, None, None, None)
    with pytest.raises(CheckpointError, match=r"holds 4 checkpoint steps \(0, 1, 2, 4\), but keep_checkpoints = 2 "
                                              r"would delete all but the newest 2"):
        C.TrainCheckpointer(tmp_path / "ckpt", save_steps=range(10), model_config=TINY, max_to_keep=2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["0", "1", "2", "4"]
    with C.TrainCheckpointer(tmp_path / "ckpt", save_steps=range(10), model_config=TINY, max_to_keep=3,
                             async_save=False) as ckpt:
        ckpt.save(5, params, None, None, None)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 4, 5]


def test_async_save_survives_donated_arrays(tmp_path):
    params = _params(2)
    expected = jax.tree.map(np.asarray, params)
    ckpt = C.TrainCheckpointer(tmp_path, save_steps=[3], async_save=True)
    assert ckpt.save(3, params)
    # What a donated train step does to the caller's buffers right after save() returns.
    jax.tree.map(lambda x: x.delete(), params)
    ckpt.close()
    cfg_less = C.TrainCheckpointer(tmp_path, save_steps=())
    restored = cfg_less.restore(None, {"params": _abstract(expected)})
    cfg_less.close()
    _assert_trees_equal(restored.params, expected)


def test_load_params_and_save_params_checkpoint(tmp_path):
    params = _params(3)
    C.save_params_checkpoint(tmp_path, 1000, TINY, params, metadata={"source": "test"})
    with pytest.raises(CheckpointError, match="already exists"):
        C.save_params_checkpoint(tmp_path, 1000, TINY, params)
    config, loaded = C.load_params(tmp_path)
    assert config == TINY
    _assert_trees_equal(loaded, params)
    # A step directory works too, and explicit shardings (one for all, or a tree).
    _, loaded = C.load_params(tmp_path / "1000", shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    _assert_trees_equal(loaded, params)
    tree = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params)
    _, loaded = C.load_params(f"file://{tmp_path}", step=1000, shardings=tree)
    _assert_trees_equal(loaded, params)
    assert C.is_checkpoint_dir(tmp_path) and not C.is_checkpoint_dir(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="not a pythia-jax checkpoint"):
        C.load_params(tmp_path / "nothing")


def test_grain_iterator_state_round_trip(tmp_path):
    grain = pytest.importorskip("grain")
    ds = grain.MapDataset.range(100).shuffle(seed=3).batch(4)
    it = iter(ds.to_iter_dataset())
    for _ in range(5):
        next(it)
    params = _params(4)
    with C.TrainCheckpointer(tmp_path, save_steps=[5], async_save=False) as ckpt:
        ckpt.save(5, params, data_state=it)
    expected_next = [np.asarray(next(it)) for _ in range(3)]
    fresh = iter(ds.to_iter_dataset())
    with C.TrainCheckpointer(tmp_path, save_steps=()) as ckpt:
        restored = ckpt.restore(None, {"params": _abstract(params)}, data_iterator=fresh)
    assert restored.data_state is fresh
    assert [np.asarray(next(fresh)).tolist() for _ in range(3)] == [e.tolist() for e in expected_next]
    assert list((tmp_path / "5" / "data_iter").glob("process_0-of-1.json"))


def test_remote_paths_are_not_made_local():
    assert str(C._epath("gs://bucket/run1")) == "gs://bucket/run1"
    assert str(C._epath("file:///tmp/x")) == "/tmp/x"
    assert str(C._epath("relative/dir")) == os.path.abspath("relative/dir")


# ------------------------------------------------------------------------------ integrity
def _write_steps(directory, steps, params):
    with C.TrainCheckpointer(directory, save_steps=steps, model_config=TINY) as ckpt:
        for s in steps:
            ckpt.save(s, jax.tree.map(lambda x, s=s: x + s, params), None, None, {"step": s})


def _restore_latest(directory, params):
    with C.TrainCheckpointer(directory, save_steps=(), model_config=TINY) as ckpt:
        return ckpt.restore(None, {"params": _abstract(params)})


def _data_files(step_dir: Path) -> list[Path]:
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files under {step_dir}"
    return files


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "garble", "metadata", "commit_marker", "tmp_dir"])
def test_damaged_latest_step_falls_back_with_warning(tmp_path, damage, caplog):
    params = _params(5)
    _write_steps(tmp_path, [1, 2], params)
    step2 = tmp_path / "2"
    if damage == "truncate":
        for f in _data_files(step2):
            f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
    elif damage == "garble":  # a few flipped bytes inside the array values: only the checksums see it
        f = max(_data_files(step2), key=lambda p: p.stat().st_size)
        data = bytearray(f.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 4):
            data[i] ^= 0x5A
        f.write_bytes(bytes(data))
    elif damage == "metadata":
        (step2 / "metadata" / "metadata").write_text("{not json")
    elif damage == "commit_marker":
        (step2 / "commit_success.txt").unlink()
    elif damage == "tmp_dir":  # an interrupted save: Orbax never renamed the temporary directory
        step2.rename(tmp_path / "2.orbax-checkpoint-tmp-1234567")
    with caplog.at_level(logging.WARNING, logger="pythia_jax.checkpoint"):
        restored = _restore_latest(tmp_path, params)
    assert restored is not None and restored.step == 1
    _assert_trees_equal(restored.params, jax.tree.map(lambda x: x + 1, params))
    assert restored.metadata == {"step": 1}
    messages = " | ".join(r.getMessage() for r in caplog.records)
    if damage == "tmp_dir":
        assert "interrupted save" in messages
    elif damage == "garble":
        assert "failed its checksum" in messages
    else:
        assert "checkpoint step 2" in messages and "trying an earlier step" in messages
        assert "using checkpoint step 1" in messages  # the decision, in one readable line


def test_latest_valid_step_skips_incomplete(tmp_path, caplog):
    params = _params(6)
    _write_steps(tmp_path, [1, 2, 3], params)
    (tmp_path / "3" / "commit_success.txt").unlink()
    (tmp_path / "2" / "metadata" / "metadata").unlink()
    with C.TrainCheckpointer(tmp_path, save_steps=()) as ckpt, caplog.at_level(logging.WARNING):
        assert ckpt.latest_valid_step() == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("step 3" in m and "commit_success" in m for m in messages), messages
    assert any("step 2" in m and "metadata" in m for m in messages), messages


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_host_io_saves_write_chunked_arrays_that_restore_everywhere(tmp_path, monkeypatch):
    """The converters' save (host I/O mode) writes numpy leaves in chunks of at most
    _HOST_CHUNK_BYTES, checksummed like any step, and the result restores as numpy (one array at
    a time), onto a device, and through the training checkpointer with an optimizer state."""
    monkeypatch.setattr(C.hostio, "_HOST_CHUNK_BYTES", 1024)  # read by the host handler
    params = _params(11)
    host = jax.tree.map(np.asarray, params)
    opt = optax.adam(1e-3).init(params)
    C.save_params_checkpoint(tmp_path, 7, TINY, host, opt_state=opt)
    stored = C._item_tree_metadata(tmp_path, 7, "params")
    for leaf in jax.tree.leaves(stored):
        chunk = leaf.storage.chunk_shape
        assert int(np.prod(chunk)) * 4 <= 1024 or int(np.prod(leaf.shape)) * 4 <= 1024, (leaf.name, chunk)
    assert any(tuple(leaf.storage.chunk_shape) != tuple(leaf.shape) for leaf in jax.tree.leaves(stored))

    _, loaded = C.load_params(tmp_path, host=True)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
    _assert_trees_equal(loaded, params)
    _, loaded = C.load_params(tmp_path)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))
    _assert_trees_equal(loaded, params)
    with pytest.raises(ValueError, match="host=True"):
        C.load_params(tmp_path, host=True, shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    with C.TrainCheckpointer(tmp_path, save_steps=()) as ckpt:  # the training path: StandardRestore
        restored = ckpt.restore(7, {"params": params, "opt_state": opt})
    _assert_trees_equal(restored.params, params)
    _assert_trees_equal(restored.opt_state, opt)

    _assert_corrupt_chunk_refused(tmp_path, 7)  # still caught by the checksums


def _assert_corrupt_chunk_refused(root, step: int) -> None:
    """Flip bytes spread over every data file of ``root/step`` (which file holds chunk data varies
    from run to run); ``load_params`` must then refuse the step."""
    for f in _data_files(root / str(step)):
        blob = bytearray(f.read_bytes())
        for i in range(len(blob) // 4, len(blob), max(1, len(blob) // 4)):
            blob[i] ^= 0x5A
        f.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        C.load_params(root, step=step, host=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoint_is_verified_then_cast_on_every_restore(tmp_path, dtype):
    """A checkpoint stored in float16 / bfloat16 (as ``convert hf-to-jax`` keeps a release) keeps
    its dtype on disk (``stored_dtypes``), is verified against the checksums of its stored bits,
    and restores as the float32 upcast: load_params on host, on a device and onto shardings, and
    the training checkpointer with float32 targets (the ``init_from`` branch); ``dtype=STORED``
    reads it as stored. A corrupt chunk of a half-precision array is caught."""
    from pythia_jax.convert.dtypes import numpy_dtype

    half = jax.tree.map(lambda x: np.asarray(x).astype(numpy_dtype(dtype)), _params(5))
    up = jax.tree.map(lambda x: x.astype(np.float32), half)
    opt = optax.adam(1e-3).init(jax.tree.map(jnp.asarray, up))
    C.save_params_checkpoint(tmp_path, 3, TINY, half, opt_state=opt)
    assert set(C.stored_dtypes(tmp_path).values()) == {dtype}

    _, stored = C.load_params(tmp_path, host=True, dtype=C.STORED)
    assert all(x.dtype == numpy_dtype(dtype) for x in jax.tree.leaves(stored))
    _assert_trees_equal(stored, half)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for kwargs in ({"host": True}, {}, {"shardings": one}):
        _, loaded = C.load_params(tmp_path, **kwargs)
        assert all(x.dtype == np.float32 for x in jax.tree.leaves(loaded)), kwargs
        _assert_trees_equal(loaded, up)
    _, as_bf16 = C.load_params(tmp_path, host=True, dtype="bfloat16")
    assert all(x.dtype.name == "bfloat16" for x in jax.tree.leaves(as_bf16))
    with C.TrainCheckpointer(tmp_path, save_steps=()) as ckpt:
        restored = ckpt.restore(3, {"params": _abstract(up), "opt_state": _abstract(opt)})
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(restored.params))
    _assert_trees_equal(restored.params, up)
    _assert_trees_equal(restored.opt_state, opt)

    _assert_corrupt_chunk_refused(tmp_path, 3)


def test_load_params_refuses_a_cast_that_would_make_inf(tmp_path):
    """load_params(dtype="float16") of a float32 checkpoint holding a value beyond float16's range
    is refused with the array's name (on host and on a device), not returned with an inf."""
    params = jax.tree.map(np.array, _params(2))
    params["embed_in"]["embedding"][1, 2] = -7e4
    C.save_params_checkpoint(tmp_path, 0, TINY, params)
    for kwargs in ({"host": True}, {}):
        with pytest.raises(CheckpointError, match="embed_in/embedding.*float16"):
            C.load_params(tmp_path, dtype="float16", **kwargs)
    _, ok = C.load_params(tmp_path, host=True, dtype="bfloat16")
    assert np.isfinite(ok["embed_in"]["embedding"].astype(np.float32)).all()


def test_load_params_dtype_must_be_a_weight_dtype(tmp_path):
    """load_params(dtype=...) takes None, "stored" or a weight dtype (a name or a numpy/JAX dtype);
    anything else (int8, float64, an alias like 'fp16', the converter's 'auto') is one clear
    error, never an integer cast of the weights or a numpy TypeError."""
    from pythia_jax.config import ConfigError

    C.save_params_checkpoint(tmp_path, 0, TINY, jax.tree.map(np.asarray, _params(1)))
    for bad in ("int8", "float64", "fp16", "auto", np.int32):
        with pytest.raises(ConfigError, match=r"dtype.*'stored'.*float16"):
            C.load_params(tmp_path, host=True, dtype=bad)
    _, p = C.load_params(tmp_path, host=True, dtype=jnp.bfloat16)
    assert {x.dtype.name for x in jax.tree.leaves(p)} == {"bfloat16"}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_valid_step_returns_none(tmp_path, caplog):
    params = _params(7)
    _write_steps(tmp_path, [4], params)
    (tmp_path / "4" / "commit_success.txt").unlink()
    with caplog.at_level(logging.WARNING):
        assert _restore_latest(tmp_path, params) is None
    assert "step 4" in caplog.text
    with pytest.raises(CheckpointError, match="no valid checkpoint step"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        C.load_params(tmp_path)


def test_different_model_shape_is_a_clear_error(tmp_path):
    params = _params(8)
    _write_steps(tmp_path, [1], params)
    bigger = TINY.replace(hidden_size=32)
    with pytest.raises(CheckpointError, match="different model.*hidden_size"):
        C.TrainCheckpointer(tmp_path, save_steps=(), model_config=bigger)
    # Execution-only fields (dtype, remat…) may differ.
    C.TrainCheckpointer(tmp_path, save_steps=(), model_config=TINY.replace(dtype="bfloat16")).close()
    # Shapes are also checked against the restore target before reading any array (no fallback).
    wrong = dict(params, embed_out={"kernel": jnp.zeros((16, 65), jnp.float32)})
    with C.TrainCheckpointer(tmp_path, save_steps=()) as ckpt:
        with pytest.raises(CheckpointError, match=r"embed_out/kernel has shape \(16, 64\).*\(16, 65\)"):
            ckpt.restore(None, {"params": _abstract(wrong)})
        with pytest.raises(CheckpointError, match="no optimizer state"):
            ckpt.restore(1, {"params": _abstract(params), "opt_state": _abstract(_trained_opt_state(params))})


def test_checksums_do_not_depend_on_sharding_or_container():
    params = _params(9)
    a = C.tree_checksums(params)
    b = C.tree_checksums(jax.tree.map(np.asarray, params))
    assert a == b and len(a) == len(jax.tree.leaves(params))
    flipped = jax.tree.map(np.asarray, params)
    flipped["embed_out"]["kernel"] = flipped["embed_out"]["kernel"][:, ::-1]  # a permutation
    assert C.tree_checksums(flipped)["embed_out/kernel"] != a["embed_out/kernel"]



@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "uint8", "bool", "float16"])
def test_host_checksums_equal_the_jitted_ones(dtype):
    """Host arrays are summed in bounded chunks; the values must equal the on-device reduction."""
    rng = np.random.default_rng(3)
    x = np.asarray(jnp.asarray(rng.normal(size=(37, 1000)) * 50).astype(dtype))
    jitted = np.asarray(C._checksum_fn(None)([jnp.asarray(x)]))[0]
    assert list(C._host_checksum(x, chunk=4096)) == [int(v) for v in jitted]  # chunk edges crossed
    assert list(C._host_checksum(x.reshape(-1)[:-1], chunk=4096)) == [  # an odd size (2-byte pairs)
        int(v) for v in np.asarray(C._checksum_fn(None)([jnp.asarray(x.reshape(-1)[:-1])]))[0]]
    assert list(C._host_checksum(x)) == [int(v) for v in jitted]


# ------------------------------------------------------------------------------ resharding
_RESHARD_SCRIPT = textwrap.dedent("""
    import os, sys, json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, {tests!r})
    from test_checkpoint import _params, _trained_opt_state, TINY
    from pythia_jax import checkpoint as C

    mode, directory, mesh_shape = sys.argv[1], sys.argv[2], tuple(json.loads(sys.argv[3]))
    assert jax.device_count() == int(np.prod(mesh_shape)), jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), ("fsdp", "tensor"))
    specs = {{  # FSDP on one axis, Megatron-style tensor split on the other
        "embed_in": {{"embedding": P("tensor", "fsdp")}},
        "layers": {{"attention": {{"query_key_value": {{"kernel": P(None, "fsdp", "tensor"),
                                                       "bias": P(None, "tensor")}}}},
                   "mlp": {{"dense_h_to_4h": {{"kernel": P(None, "fsdp", "tensor"), "bias": P(None, "tensor")}}}}}},
        "final_layer_norm": {{"scale": P("fsdp"), "bias": P()}},
        "embed_out": {{"kernel": P("fsdp", "tensor")}},
    }}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = _params(11)
    opt_state = _trained_opt_state(params)
    # Adam moments sharded like the params, scalars replicated (what the trainer does).
    replicated = jax.tree.map(lambda x: NamedSharding(mesh, P()), opt_state)
    adam_sh = opt_state[1][0]._replace(count=NamedSharding(mesh, P()), mu=shardings, nu=shardings)
    opt_shardings = (replicated[0], (adam_sh,) + tuple(replicated[1][1:]))
    if mode == "save":
        sharded = jax.device_put(params, shardings)
        sharded_opt = jax.device_put(opt_state, opt_shardings)
        with C.TrainCheckpointer(directory, save_steps=[7], model_config=TINY) as ckpt:
            assert ckpt.save(7, sharded, sharded_opt, None, {{"devices": jax.device_count()}})
    else:
        to_abstract = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        abstract = {{"params": jax.tree.map(to_abstract, params, shardings),
                    "opt_state": jax.tree.map(to_abstract, opt_state, opt_shardings)}}
        with C.TrainCheckpointer(directory, save_steps=(), model_config=TINY) as ckpt:
            restored = ckpt.restore(None, abstract)
        assert restored.metadata == {{"devices": 8}}
        for tree, want_tree, sh in ((restored.params, params, shardings),
                                    (restored.opt_state, opt_state, opt_shardings)):
            assert jax.tree.structure(tree) == jax.tree.structure(want_tree)
            for got, want, s in zip(jax.tree.leaves(tree), jax.tree.leaves(want_tree), jax.tree.leaves(sh)):
                assert got.sharding == s, (got.sharding, s)
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    print("OK", mode, mesh_shape)
""")


def _run_devices(tmp_path, n_devices: int, *args: str) -> None:
    script = tmp_path / "reshard.py"
    script.write_text(_RESHARD_SCRIPT.format(tests=str(REPO / "tests")))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "OK" in proc.stdout


@pytest.mark.slow
def test_restore_8_device_checkpoint_on_1_device_and_other_meshes(tmp_path):
    directory = str(tmp_path / "ckpt")
    _run_devices(tmp_path, 8, "save", directory, "[4, 2]")  # written with fsdp=4 x tensor=2
    _run_devices(tmp_path, 8, "restore", directory, "[2, 4]")  # other mesh shape, same devices
    _run_devices(tmp_path, 2, "restore", directory, "[1, 2]")  # fewer devices
    # This process has one device: load_params puts everything on it.
    assert jax.device_count() == 1
    config, params = C.load_params(directory)
    assert config == TINY
    _assert_trees_equal(params, _params(11))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unusable_step_is_moved_aside_when_the_resumed_run_saves_it_again(tmp_path, caplog):
    params = _params(12)
    _write_steps(tmp_path, [1, 2], params)
    (tmp_path / "2" / "metadata" / "metadata").write_text("garbage")
    with C.TrainCheckpointer(tmp_path, save_steps=[2], model_config=TINY) as ckpt:
        with caplog.at_level(logging.WARNING):
            assert ckpt.restore(None, {"params": _abstract(params)}).step == 1
        assert "step 2" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert ckpt.save(2, params, None, None, {"again": True})
        assert "re-saving step 2" in caplog.text
        assert not ckpt.save(2, params)  # a good step is never overwritten
    moved = [p.name for p in tmp_path.iterdir() if p.name.startswith("2.unusable-")]
    assert len(moved) == 1
    restored = _restore_latest(tmp_path, params)
    assert restored.step == 2 and restored.metadata == {"again": True}
    _assert_trees_equal(restored.params, params)


def test_grain_state_of_another_process_count_is_skipped_with_warning(tmp_path, caplog):
    grain = pytest.importorskip("grain")
    ds = grain.MapDataset.range(20).to_iter_dataset()
    it = iter(ds)
    next(it)
    params = _params(13)
    with C.TrainCheckpointer(tmp_path, save_steps=[1], async_save=False) as ckpt:
        ckpt.save(1, params, data_state=it)
    state_dir = tmp_path / "1" / "data_iter"
    (state_dir / "process_0-of-1.json").rename(state_dir / "process_0-of-2.json")  # as if 2 hosts wrote it
    with C.TrainCheckpointer(tmp_path, save_steps=()) as ckpt:
        with caplog.at_level(logging.WARNING):
            restored = ckpt.restore(None, {"params": _abstract(params)}, data_iterator=iter(ds))
        assert "different number of processes" in caplog.text
    assert restored.step == 1 and restored.data_state is None



def test_abandoned_orbax_reads_go_to_debug(monkeypatch, caplog):
    """A step with a cut data file: Orbax abandons the step's other reads on a closed event loop,
    which printed dozens of tracebacks ("Exception ignored in: <coroutine
    _read_array_index_and_device_put>", bare "RuntimeError: Event loop is closed") around the
    one-line fallback warning (seen resuming a demo run past a truncated step). Exactly those two
    kinds go to DEBUG; any other unraisable exception still reaches the previous hook."""
    import asyncio
    import types

    from pythia_jax.checkpoint import failures

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u))
    failures._quiet_abandoned_reads()
    failures._quiet_abandoned_reads()  # installed once
    hook = sys.unraisablehook
    assert getattr(hook, "_pythia_jax_quiet", False)

    def event(value, obj=None):
        return types.SimpleNamespace(exc_type=type(value), exc_value=value, exc_traceback=value.__traceback__,
                                     err_msg=None, object=obj)

    namespace: dict = {}
    exec(compile("async def _read_array_index_and_device_put():\n    pass\n",
                 "/site-packages/orbax/checkpoint/_src/serialization/serialization.py", "exec"), namespace)
    orbax_read = namespace["_read_array_index_and_device_put"]()
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(lambda: None)
    except RuntimeError as e:
        closed = e
    other_coroutine = _other_coroutine()
    with caplog.at_level(logging.DEBUG, logger="pythia_jax.checkpoint.failures"):
        hook(event(Exception("Encountered error while reading array index"), orbax_read))
        hook(event(closed))
        hook(event(RuntimeError("Event loop is closed")))  # not from call_soon_threadsafe
        hook(event(ValueError("mine"), other_coroutine))
    orbax_read.close()
    other_coroutine.close()
    assert [str(u.exc_value) for u in seen] == ["Event loop is closed", "mine"]
    assert "abandoned Orbax read _read_array_index_and_device_put" in caplog.text
    assert "after Orbax closed its event loop" in caplog.text
    # asyncio's "Task exception was never retrieved" for an Orbax read task: DEBUG, not ERROR
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("asyncio").error(
            "Task exception was never retrieved\nfuture: <Task finished coro=<async_deserialize() done, "
            "defined at /x/orbax/checkpoint/_src/serialization/serialization.py:394> exception=Exception()>")
        logging.getLogger("asyncio").error("Task exception was never retrieved\nfuture: <Task mine>")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["Task exception was never retrieved\nfuture: <Task mine>"], errors
    assert "abandoned Orbax task" in caplog.text


async def _other_coroutine():
    pass
