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
