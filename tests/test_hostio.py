"""The converters' checkpoint I/O (host mode): uncompressed, and older zstd checkpoints still load."""

from __future__ import annotations

import numpy as np
import pytest

from pythia_jax import checkpoint as C
from pythia_jax.checkpoint import hostio
from pythia_jax.config import ModelConfig
from pythia_jax.errors import CheckpointError

TINY = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2)


def _params() -> dict:
    rng = np.random.default_rng(0)
    # fp16-representable values, as converted from the released fp16 weights
    f = lambda *s: rng.standard_normal(s).astype(np.float16).astype(np.float32)  # noqa: E731
    return {"embed_in": {"embedding": f(64, 16)},
            "layers": {"mlp": {"dense_h_to_4h": {"kernel": f(2, 16, 64)}}}}


def _compressor(directory, step: int, name: str):
    import tensorstore as ts

    spec = {"driver": "zarr", "path": name,
            "kvstore": {"driver": "ocdbt", "base": f"file://{directory}/{step}/params"}}
    return ts.open(spec).result().spec().to_json()["metadata"]["compressor"]


@pytest.mark.parametrize("compressed", [False, True], ids=["default", "zstd-as-before"])
def test_host_mode_round_trip(tmp_path, monkeypatch, compressed):
    if compressed:  # how the converters wrote checkpoints before: they must still load
        monkeypatch.setattr(hostio, "_HOST_COMPRESSION", True)
    params = _params()
    C.save_params_checkpoint(tmp_path, 7, TINY, params)
    codec = _compressor(tmp_path, 7, "layers.mlp.dense_h_to_4h.kernel")
    assert (codec or {}).get("id") == ("zstd" if compressed else None)
    monkeypatch.setattr(hostio, "_HOST_COMPRESSION", False)
    config, loaded = C.load_params(tmp_path, host=True)
    assert config == TINY
    np.testing.assert_array_equal(loaded["embed_in"]["embedding"], params["embed_in"]["embedding"])
    np.testing.assert_array_equal(loaded["layers"]["mlp"]["dense_h_to_4h"]["kernel"],
                                  params["layers"]["mlp"]["dense_h_to_4h"]["kernel"])


def _data_files(step_dir) -> list:
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files under {step_dir}"
    return files


def test_host_restore_maps_local_files(tmp_path):
    """Host restores read local data files through memory maps (no read buffer per chunk)."""
    assert hostio._host_read_context(True).spec.to_json()["file_io_mode"] == {"mode": "memmap"}
    params = _params()
    C.save_params_checkpoint(tmp_path, 3, TINY, params)
    _, loaded = C.load_params(tmp_path, host=True)
    np.testing.assert_array_equal(loaded["layers"]["mlp"]["dense_h_to_4h"]["kernel"],
                                  params["layers"]["mlp"]["dense_h_to_4h"]["kernel"])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["half", "empty"])
def test_host_restore_of_a_cut_data_file_is_a_clear_error(tmp_path, damage, caplog):
    """A data file shorter than its index says (a copy cut short) must give the checkpoint error
    with the reason, not a crash: a memory map read past the end of a file would raise SIGBUS."""
    import logging

    C.save_params_checkpoint(tmp_path, 3, TINY, _params())
    for f in _data_files(tmp_path / "3"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if damage == "half" else b"")
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match="no valid checkpoint step"):
        C.load_params(tmp_path, host=True)
    assert "step 3" in caplog.text and "unreadable checkpoint" in caplog.text, caplog.text


def test_a_step_folder_and_another_step_are_refused(tmp_path, capsys):
    """``<root>/3`` with step 5 asked for: which was meant cannot be told (convert jax-to-hf
    wrote step 5's weights for ``.../3 --step 5``); the same step, or either alone, is fine."""
    from pythia_jax.cli import main

    C.save_params_checkpoint(tmp_path, 3, TINY, _params())
    C.save_params_checkpoint(tmp_path, 5, TINY, _params())
    with pytest.raises(CheckpointError, match="is the folder of step 3, but step 5 was asked for"):
        C.load_params(tmp_path / "3", step=5, host=True)
    assert C.resolve_checkpoint_step(tmp_path / "3", 3) == (C.resolve_checkpoint_dir(tmp_path)[0], 3)
    assert C.resolve_checkpoint_step(tmp_path, 5)[1] == 5 and C.resolve_checkpoint_step(tmp_path / "3", None)[1] == 3
    assert main(["convert", "jax-to-hf", str(tmp_path / "3"), str(tmp_path / "hf"), "--step", "5"]) == 2
    assert "is the folder of step 3" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_widening_is_exact_casts_only():
    import ml_dtypes

    from pythia_jax.host_memory import widens

    bf16 = ml_dtypes.bfloat16
    assert widens(np.float16, np.float32) and widens(bf16, np.float32)
    assert not any(widens(a, b) for a, b in [(np.float16, bf16), (bf16, np.float16), (np.float32, np.float32),
                                             (np.float32, np.float16), (np.int32, np.float32)])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_widening_checksums_are_those_of_what_tensorstore_stores(dtype):
    """Every 16-bit pattern (subnormals, inf, quiet and signalling NaNs with their payloads):
    the float32 bits the checksum kernels compute equal tensorstore's cast, which writes a
    widening save (XLA's own conversion would set a signalling NaN's quiet bit, and the
    checkpoint would then fail its checksums); host chunked, host small and on-device paths."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import tensorstore as ts

    from pythia_jax.checkpoint import integrity

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dt)
    stored = ts.open({"driver": "array", "array": np.zeros(x.size, np.float32), "dtype": "float32"}).result()
    ts.cast(stored, dtype).write(x).result()
    bits = stored.read().result().view(np.uint32)
    kernel_bits = jax.jit(lambda b: integrity._float32_bits(b.astype(jnp.uint32), dt))(x.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(kernel_bits), bits)
    want = integrity._host_checksum(bits, chunk=4096)
    assert integrity._host_checksum(x, chunk=4096, widen_to=np.float32) == want  # chunk kernel
    assert integrity._host_checksum(x[:-1], chunk=4096, widen_to=np.float32) == integrity._host_checksum(
        bits[:-1], chunk=4096)  # an odd size
    assert integrity._host_checksum(x, widen_to=np.float32) == want  # one chunk: numpy's cast
    tree = {"a": x.reshape(256, 256), "b": np.ones(3, np.float32)}
    expected = C.tree_checksums({"a": bits.reshape(256, 256), "b": tree["b"]})
    assert C.tree_checksums(tree, widen_to=np.float32) == expected
    assert C.tree_checksums(jax.tree.map(jnp.asarray, tree), widen_to=np.float32) == expected


@pytest.mark.parametrize("chunk_bytes", [None, 1024], ids=["whole", "chunk-by-chunk"])
def test_a_widening_save_stores_what_a_save_of_the_widened_tree_stores(tmp_path, monkeypatch, chunk_bytes):
    """save_params_checkpoint(dtype=float32) of float16 / bfloat16 arrays writes float32 arrays
    equal to the widened values, with the same recorded checksums as a save of the widened tree
    (so restores verify); float32 arrays are stored as they are. Arrays larger than a storage
    chunk are widened one chunk at a time (here forced with 1 KiB chunks: several per array)."""
    import ml_dtypes

    if chunk_bytes:
        monkeypatch.setattr(hostio, "_HOST_CHUNK_BYTES", chunk_bytes)
        writes = []
        real = type(hostio._host_array_handler()).__mro__[1]._open_and_write
        monkeypatch.setattr(type(hostio._host_array_handler()).__mro__[1], "_open_and_write",
                            lambda self, *a: writes.append(a) or real(self, *a))

    from pythia_jax.checkpoint.layout import _INTERNAL_KEY, METADATA

    params = _params()
    mixed = {"embed_in": {"embedding": params["embed_in"]["embedding"].astype(np.float16)},
             "layers": {"mlp": {"dense_h_to_4h": {"kernel": params["layers"]["mlp"]["dense_h_to_4h"][
                 "kernel"].astype(ml_dtypes.bfloat16)}}},
             "extra": np.arange(6, dtype=np.float32)}
    special = [np.inf, -np.inf, np.nan, -0.0, 6e-8, -3e-6, 65504]  # subnormals and extremes too
    mixed["embed_in"]["embedding"].reshape(-1)[:7] = special
    mixed["embed_in"]["embedding"].view(np.uint16).reshape(-1)[7:9] = [0x7C01, 0xFD55]  # signalling NaNs
    mixed["layers"]["mlp"]["dense_h_to_4h"]["kernel"].reshape(-1)[:7] = special
    widened = {"embed_in": {"embedding": mixed["embed_in"]["embedding"].astype(np.float32)},
               "layers": {"mlp": {"dense_h_to_4h": {"kernel": mixed["layers"]["mlp"]["dense_h_to_4h"][
                   "kernel"].astype(np.float32)}}},
               "extra": mixed["extra"]}
    C.save_params_checkpoint(tmp_path / "w", 3, TINY, mixed, dtype=np.float32)
    C.save_params_checkpoint(tmp_path / "p", 3, TINY, widened)

    import json

    def record(root):
        return json.loads((root / "3" / METADATA / "metadata").read_text())[_INTERNAL_KEY]["checksums"]

    assert record(tmp_path / "w") == record(tmp_path / "p")
    if chunk_bytes:  # only the float32 arrays (no cast) were written whole
        assert sorted(a[0].dtype.name for a in writes) == ["float32"] * 4
    assert set(C.stored_dtypes(tmp_path / "w").values()) == {"float32"}
    _, got = C.load_params(tmp_path / "w", host=True, dtype=C.STORED)  # verified against the record
    for a, b in zip(jax_leaves(got), jax_leaves(widened)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))  # bit for bit, NaN too


def test_widening_needs_the_host_mode(tmp_path):
    from pythia_jax.checkpoint.items import _save_args

    with pytest.raises(ValueError, match="host I/O"):
        _save_args(_params(), None, None, {}, 0, host_io=False, params_dtype=np.float32)


def test_defer_widening_casts_only_what_the_save_cannot_widen_exactly():
    import ml_dtypes

    from pythia_jax.convert.dtypes import defer_widening, saved_dtype

    half = {"a": np.ones((2, 3), np.float16), "b": np.ones(4, np.float32)}
    same, save = defer_widening(half, "auto")
    assert same is half and save is None
    kept, save = defer_widening(half, "float32")
    assert kept["a"] is half["a"] and kept["b"] is half["b"] and save == np.float32
    assert saved_dtype(np.float16, save) == np.float32 and saved_dtype(np.float32, None) == np.float32
    bf, save = defer_widening(half, "bf16")  # float16 -> bfloat16 is not exact: cast here
    assert bf["a"].dtype == ml_dtypes.bfloat16 and bf["b"].dtype == ml_dtypes.bfloat16
    big = {"layers": {"w": np.array([1.0, 1e6], np.float32)}}
    with pytest.raises(CheckpointError, match=r"src: params layers/w \(float32\).*beyond float16"):
        defer_widening(big, "float16", "src")


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_a_step_the_checkpoints_lack_is_named_with_the_steps_there(tmp_path):
    """load_params / stored_dtypes / run records of a step that was never saved: one line naming
    the steps there (it was a CheckpointIntegrityError '<root>/51: missing')."""
    for step in (0, 2, 4):
        C.save_params_checkpoint(tmp_path, step, TINY, _params())
    for read in (lambda: C.load_params(tmp_path, step=3, host=True), lambda: C.stored_dtypes(tmp_path, step=3)):
        with pytest.raises(CheckpointError, match=r"has no checkpoint step 3; available: 0, 2, 4$") as e:
            read()
        assert not isinstance(e.value, C.CheckpointIntegrityError)
