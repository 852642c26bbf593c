"""The converters' checkpoint I/O (host mode): uncompressed, and older zstd checkpoints still load."""

from __future__ import annotations

import numpy as np
import pytest

from pythia_jax import checkpoint as C
from pythia_jax.checkpoint import hostio
from pythia_jax.config import ModelConfig

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
