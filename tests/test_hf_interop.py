"""Hugging Face interop: read/write HF directories, bit-identical round trips, loading the exports
with transformers (no missing/unexpected keys, logits within 1e-5 of JAX), tokenizer files, bad input."""

from __future__ import annotations

import json
import logging
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from pythia_jax.config import ConfigError, ModelConfig  # noqa: E402
from pythia_jax.convert import hf as hfc  # noqa: E402
from pythia_jax.errors import CheckpointError, PythiaJaxError  # noqa: E402

TINY = ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4)


def hf_model(config: ModelConfig, seed: int = 0, dtype=torch.float32):
    """A random transformers GPTNeoXForCausalLM (all tensors non-trivial, biases and norms too)."""
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf_dict()))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.to(dtype).eval()


def hf_state(model) -> dict[str, np.ndarray]:
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    sd["embed_out.weight"] = sd.pop("lm_head.weight")
    return sd


def save_bin(model, directory, shards=1):
    """pytorch_model.bin, or pytorch_model-0000k-of-0000N.bin + pytorch_model.bin.index.json."""
    os.makedirs(directory, exist_ok=True)
    model.config.save_pretrained(directory)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["embed_out.weight"] = sd.pop("lm_head.weight")
    if shards == 1:
        torch.save(sd, os.path.join(directory, "pytorch_model.bin"))
        return
    keys = list(sd)
    weight_map = {}
    for k in range(shards):
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {key: sd[key] for key in keys[k::shards]}
        torch.save(part, os.path.join(directory, name))
        weight_map.update({key: name for key in part})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def read_weights(directory) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory (raw dtype), through safetensors."""
    from safetensors import safe_open
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_quietly(directory):
    """from_pretrained in fp32, returning (model, loading info, every log/warning message)."""
    handler = _Capture()
    tlog = logging.getLogger("transformers")
    tlog.addHandler(handler)
    old = tlog.level
    tlog.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = transformers.GPTNeoXForCausalLM.from_pretrained(
                directory, dtype=torch.float32, output_loading_info=True)
    finally:
        tlog.removeHandler(handler)
        tlog.setLevel(old)
    return model.eval(), info, handler.messages + [str(w.message) for w in caught]


BAD_WORDS = ("missing", "unexpected", "not used", "newly initialized", "not initialized", "mismatch")


def assert_clean_load(info, messages):
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    bad = [m for m in messages if any(w in m.lower() for w in BAD_WORDS)]
    assert not bad, bad


def jax_logits(config, params, tokens):
    from pythia_jax.model import model_from_params
    with jax.default_matmul_precision("highest"):
        return np.asarray(model_from_params(config, params)(np.asarray(tokens, np.int32)))


# ------------------------------------------------------------------ key table
def test_key_table_round_trip_and_aliases():
    model = hf_model(TINY)
    sd = hf_state(model)
    params = hfc.hf_state_dict_to_params(TINY, {**sd, "gpt_neox.layers.0.attention.rotary_emb.inv_freq":
                                                 np.ones(4, np.float32)})
    assert params["layers"]["attention"]["query_key_value"]["kernel"].shape == (2, 32, 96)
    np.testing.assert_array_equal(params["embed_out"]["kernel"], sd["embed_out.weight"].T)
    back = hfc.params_to_hf_state_dict(TINY, params)
    assert list(back) == list(hfc.hf_shapes(TINY))
    for k in sd:
        assert np.array_equal(back[k], sd[k]), k
    # transformers 5.x in-memory name of the head is read too
    sd2 = dict(sd)
    sd2["lm_head.weight"] = sd2.pop("embed_out.weight")
    np.testing.assert_array_equal(hfc.hf_state_dict_to_params(TINY, sd2)["embed_out"]["kernel"],
                                  params["embed_out"]["kernel"])


def test_key_table_errors():
    sd = hf_state(hf_model(TINY))
    bad = dict(sd)
    bad["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"] = np.zeros((32, 100), np.float32)
    with pytest.raises(CheckpointError, match=r"gpt_neox.layers.1.mlp.dense_4h_to_h.weight has shape "
                                              r"\[32, 100\], expected \[32, 128\]"):
        hfc.hf_state_dict_to_params(TINY, bad)
    missing = dict(sd)
    del missing["gpt_neox.final_layer_norm.bias"]
    with pytest.raises(CheckpointError, match="missing tensors: gpt_neox.final_layer_norm.bias"):
        hfc.hf_state_dict_to_params(TINY, missing)
    with pytest.raises(CheckpointError, match="layer 5"):
        hfc.hf_state_dict_to_params(TINY, {**sd, "gpt_neox.layers.5.attention.dense.bias": np.zeros(32)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'foo.weight'"):
        hfc.hf_state_dict_to_params(TINY, {**sd, "foo.weight": np.zeros(3)})


# ------------------------------------------------------------------ reading HF directories
@pytest.mark.parametrize("read_dtype", ["float32", "auto"])
@pytest.mark.parametrize("form", ["single", "sharded", "bin", "bin_sharded", "fp16", "bf16", "bf16_bin"])
def test_read_hf_dir_forms_round_trip_bit_identical(tmp_path, form, read_dtype):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "bf16_bin": torch.bfloat16}.get(form, torch.float32)
    model = hf_model(TINY, dtype=dtype)
    src = tmp_path / "src"
    if "bin" in form:  # transformers 5 no longer writes .bin: write it the way 4.x did
        save_bin(model, src, shards=3 if "sharded" in form else 1)
    else:
        model.save_pretrained(src, **({"max_shard_size": "20KB"} if "sharded" in form else {}))
    if "sharded" in form:
        assert any(n.endswith(".index.json") for n in os.listdir(src))
    config, params = hfc.read_hf_dir(src, dtype=read_dtype)
    assert config == TINY.replace(name=config.name)
    out_dtype = {"fp16": "float16", "bf16": "bfloat16", "bf16_bin": "bfloat16"}.get(form, "float32")
    # auto keeps the stored dtype (bf16 .bin files too: no float32 detour), float32 casts
    kept = hfc.numpy_dtype(out_dtype if read_dtype == "auto" else "float32")
    assert all(v.dtype == kept for v in jax.tree.leaves(params))
    hfc.write_hf_dir(config, params, tmp_path / "out", dtype=out_dtype)
    written = read_weights(tmp_path / "out")
    original = {k: v for k, v in model.state_dict().items()}
    original["embed_out.weight"] = original.pop("lm_head.weight")
    assert set(written) == set(original)
    for k, v in original.items():
        assert written[k].dtype == v.dtype, k
        assert torch.equal(written[k].view(torch.int16 if v.element_size() == 2 else torch.int32),
                           v.contiguous().view(torch.int16 if v.element_size() == 2 else torch.int32)), k


def test_auto_dtype_keeps_each_tensor_and_widens_a_mixed_layer_stack():
    """dtype="auto": every array in its tensors' stored dtype; a layer stack stored in two dtypes
    becomes float32 holding both exactly; absent biases and a tied head follow their weights."""
    sd = hf_state(hf_model(TINY))
    mixed = {k: v.astype(np.float16) for k, v in sd.items()}
    mixed["gpt_neox.final_layer_norm.weight"] = sd["gpt_neox.final_layer_norm.weight"]  # float32
    mixed["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"] = sd["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"]
    params = hfc.hf_state_dict_to_params(TINY, mixed, dtype="auto")
    assert params["embed_in"]["embedding"].dtype == np.float16
    assert params["final_layer_norm"]["scale"].dtype == np.float32
    stack = params["layers"]["mlp"]["dense_h_to_4h"]["kernel"]
    assert stack.dtype == np.float32
    np.testing.assert_array_equal(stack[0], mixed["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].T.astype(np.float32))
    np.testing.assert_array_equal(stack[1], sd["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"].T)
    assert params["layers"]["mlp"]["dense_4h_to_h"]["kernel"].dtype == np.float16

    from pythia_jax.config import HFWeightLayout
    no_bias = {k: v for k, v in mixed.items()
               if not k.endswith(("attention.query_key_value.bias", "attention.dense.bias"))}
    del no_bias["embed_out.weight"]
    params = hfc.hf_state_dict_to_params(TINY, no_bias, dtype="auto",
                                         layout=HFWeightLayout(attention_bias=False, tie_word_embeddings=True))
    bias = params["layers"]["attention"]["query_key_value"]["bias"]
    assert bias.dtype == np.float16 and not bias.any()
    head = params["embed_out"]["kernel"]
    assert head.dtype == np.float16
    np.testing.assert_array_equal(head, mixed["gpt_neox.embed_in.weight"].T)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_may_hold_nonfinite_reads_the_bits_exactly(dtype):
    """The overflow check's fast test agrees with ``np.isfinite`` on the largest finite values,
    subnormals, signed zeros, ±inf and NaN, in contiguous and transposed arrays."""
    import ml_dtypes

    from pythia_jax.host_memory import may_hold_nonfinite

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    info = ml_dtypes.finfo(dt) if dtype == "bfloat16" else np.finfo(dt)
    finite = np.array([[info.max, -info.max, info.smallest_subnormal, -0.0], [0.0, 1.0, -2.5, info.tiny]], dt)
    assert not may_hold_nonfinite(finite) and not may_hold_nonfinite(finite.T)
    assert not may_hold_nonfinite(np.empty((0, 3), dt))
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        a = finite.copy()
        a[1, 2] = bad
        assert may_hold_nonfinite(a) and may_hold_nonfinite(a.T), bad
    big = np.zeros((4100, 1100), dt)  # above the threaded size: blocks checked on the copy pool
    assert not may_hold_nonfinite(big)
    big[-1, -1] = np.inf
    assert may_hold_nonfinite(big) and may_hold_nonfinite(big.T)


def test_casts_beyond_float16_range_are_refused_not_made_inf(tmp_path):
    """A value a narrower dtype cannot hold (|x| > 65504 in float16) is refused with the tensor's
    name on every converter cast: hf-to-jax --dtype float16 of a bf16/fp32 source, jax-to-hf and
    jax-to-neox float16 (one shared tensor stream), and nothing is written. Values the source
    already holds as inf/NaN are not the cast's doing and pass; widening casts never check."""
    from pythia_jax.cli import main

    sd = hf_state(hf_model(TINY))
    sd["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"][3, 4] = 1e6
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.dense_h_to_4h\.weight.*float16"):
        hfc.hf_state_dict_to_params(TINY, sd, dtype="float16")
    params = hfc.hf_state_dict_to_params(TINY, sd)  # float32: fine
    assert hfc.hf_state_dict_to_params(TINY, sd, dtype="bfloat16")["layers"]["mlp"]["dense_h_to_4h"][
        "kernel"].dtype.name == "bfloat16"
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.dense_h_to_4h\.weight.*float16"):
        hfc.write_hf_dir(TINY, params, tmp_path / "hf16", dtype="float16")
    assert not (tmp_path / "hf16").exists()
    with pytest.raises(CheckpointError, match="float16"):
        list(hfc.iter_hf_tensors(TINY, params, np.float16))

    nonfinite = dict(sd)
    nonfinite["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"] = sd["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"].copy()
    nonfinite["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"][3, 4] = np.inf
    nonfinite["gpt_neox.embed_in.weight"] = sd["gpt_neox.embed_in.weight"].copy()
    nonfinite["gpt_neox.embed_in.weight"][0, 0] = np.nan
    kept = hfc.hf_state_dict_to_params(TINY, nonfinite, dtype="float16")
    assert np.isinf(kept["layers"]["mlp"]["dense_h_to_4h"]["kernel"][1, 4, 3])

    src = tmp_path / "bf16"
    model = hf_model(TINY, dtype=torch.bfloat16)
    with torch.no_grad():
        model.gpt_neox.embed_in.weight[0, 0] = 2e5
    model.save_pretrained(src)
    argv = ["convert", "hf-to-jax", str(src), str(tmp_path / "ck"), "--no-progress"]
    assert main(argv + ["--dtype", "float16"]) == 2 and not (tmp_path / "ck").exists()
    assert main(argv) == 0  # auto keeps bfloat16
    assert main(["convert", "jax-to-hf", str(tmp_path / "ck"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()
    assert main(["convert", "jax-to-hf", str(tmp_path / "ck"), str(tmp_path / "out"), "--no-progress",
                 "--dtype", "bfloat16"]) == 0


def test_refused_overflowing_cast_gives_no_numpy_warning(tmp_path, capsys):
    """A bf16 weight of 1e5 cast to float16 is refused in one line, without numpy's "overflow
    encountered in cast" RuntimeWarning first: on the blocked and threaded copies, transposed
    or not, in load_params' cast, and on the command line."""
    import ml_dtypes

    from pythia_jax.checkpoint.restore import cast_tree
    from pythia_jax.cli import main
    from pythia_jax.host_memory import cast_overflow, copy_cast

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would fail the test
        for shape in ((4, 8), (1024, 768)):  # one block; the threaded path
            src = np.zeros(shape, ml_dtypes.bfloat16)
            src[1, 2] = 1e5
            for transpose in (False, True):
                dst = np.empty(shape[::-1] if transpose else shape, np.float16)
                copy_cast(dst, src, transpose)
                assert cast_overflow(dst, src) == 1
        sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_state(hf_model(TINY)).items()}
        sd["gpt_neox.embed_in.weight"][0, 0] = 1e5
        with pytest.raises(CheckpointError, match=r"embed_in\.weight.*float16"):
            hfc.hf_state_dict_to_params(TINY, sd, dtype="float16")
        with pytest.raises(CheckpointError, match="would become inf"):
            cast_tree({"w": sd["gpt_neox.embed_in.weight"]}, lambda k, x: np.float16)

    src = tmp_path / "bf16"
    model = hf_model(TINY, dtype=torch.bfloat16)
    with torch.no_grad():
        model.gpt_neox.embed_in.weight[0, 0] = 1e5
    model.save_pretrained(src)
    capsys.readouterr()
    assert main(["convert", "hf-to-jax", str(src), str(tmp_path / "ck"), "--no-progress", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "RuntimeWarning" not in err and "overflow encountered" not in err
    assert "beyond float16's range" in err


def test_old_buffers_are_ignored(tmp_path):
    from safetensors.torch import save_file
    model = hf_model(TINY)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["embed_out.weight"] = sd.pop("lm_head.weight")
    for i in range(TINY.num_layers):
        sd[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        sd[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        sd[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(1)
    (tmp_path / "old").mkdir()
    save_file(sd, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "old" / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    _, params = hfc.read_hf_dir(tmp_path / "old")
    back = hfc.params_to_hf_state_dict(TINY, params)
    assert set(back) == {k for k in sd if "attention.bias" not in k and "masked_bias" not in k
                         and "inv_freq" not in k}


# ------------------------------------------------------------------ writing HF directories
PARITY_CONFIGS = {
    "parallel_rot025": TINY,
    "sequential_rot05": TINY.replace(use_parallel_residual=False, rotary_pct=0.5, vocab_size=97),
    "rot1_headdim80_oddvocab": ModelConfig(vocab_size=131, hidden_size=160, num_layers=2, num_heads=2,
                                           rotary_pct=1.0),
}


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_export_loads_in_transformers_with_same_logits(tmp_path, name):
    config = PARITY_CONFIGS[name]
    params = hfc.hf_state_dict_to_params(config, hf_state(hf_model(config, seed=3)))
    hfc.write_hf_dir(config, params, tmp_path / "hf", dtype="float32", shard_size="60KB")
    files = os.listdir(tmp_path / "hf")
    assert "model.safetensors.index.json" in files
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hfc.hf_shapes(config))
    assert index["metadata"]["total_size"] == 4 * config.num_params()
    cfg_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg_json["torch_dtype"] == "float32" and cfg_json["eos_token_id"] == 0
    model, info, messages = load_quietly(tmp_path / "hf")
    assert_clean_load(info, messages)
    assert model.config.use_parallel_residual == config.use_parallel_residual
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    ours = jax_logits(config, params, tokens)
    assert np.abs(ours - theirs).max() <= 1e-5


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_export_dtypes(tmp_path, dtype, torch_dtype):
    sd = hf_state(hf_model(TINY))
    params = hfc.hf_state_dict_to_params(TINY, sd)
    hfc.write_hf_dir(TINY, params, tmp_path / "hf", dtype=dtype)
    assert os.listdir(tmp_path / "hf").count("model.safetensors") == 1  # fits in one shard
    weights = read_weights(tmp_path / "hf")
    for k, v in sd.items():
        assert weights[k].dtype == torch_dtype
        assert torch.equal(weights[k], torch.from_numpy(v).to(torch_dtype)), k
    from safetensors import safe_open
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == dtype
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 0
    _, info, messages = load_quietly(tmp_path / "hf")
    assert_clean_load(info, messages)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_streaming_safetensors_writer_matches_library(tmp_path, dtype):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    rng = np.random.default_rng(0)
    np_dtype = hfc.numpy_dtype(dtype)
    arrays = {"b": rng.standard_normal((3, 5)).astype(np_dtype), "a": rng.standard_normal(7).astype(np_dtype),
              "c": rng.standard_normal((2, 1, 4)).astype(np_dtype)}
    n = hfc.write_safetensors(tmp_path / "ours.safetensors", [(k, v.shape) for k, v in arrays.items()],
                              np_dtype, iter(arrays.items()), metadata={"format": "pt"})
    assert n == sum(v.nbytes for v in arrays.values())
    ours = load_file(tmp_path / "ours.safetensors")
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == ["a", "b", "c"]
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    for k, v in arrays.items():
        want = torch.from_numpy(v.astype(np.float32)).to(torch_dtype)
        assert ours[k].dtype == torch_dtype and torch.equal(ours[k], want), k
    save_file({k: torch.from_numpy(v.astype(np.float32)).to(torch_dtype) for k, v in arrays.items()},
              tmp_path / "lib.safetensors")
    lib = load_file(tmp_path / "lib.safetensors")
    assert all(torch.equal(lib[k], ours[k]) for k in arrays)


def test_tokenizer_files(tmp_path):
    params = hfc.hf_state_dict_to_params(TINY, hf_state(hf_model(TINY)))
    hfc.write_hf_dir(TINY, params, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("Hello, I am")["input_ids"] == [12092, 13, 309, 717]
    assert tok.eos_token_id == 0 and tok.bos_token_id == 0
    assert len(tok) == 50277
    assert tok.decode([12092, 13, 309, 717]) == "Hello, I am"


# ------------------------------------------------------------------ bad input
def _good_dir(tmp_path, **save_kwargs):
    src = tmp_path / "src"
    hf_model(TINY).save_pretrained(src, **save_kwargs)
    return src


def test_missing_or_unreadable_config(tmp_path):
    src = _good_dir(tmp_path)
    os.remove(src / "config.json")
    with pytest.raises(ConfigError, match="no config.json"):
        hfc.read_hf_dir(src)
    (src / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .*config.json"):
        hfc.read_hf_dir(src)
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        hfc.read_hf_dir(src)


def test_missing_shard_named_in_index(tmp_path):
    src = _good_dir(tmp_path, max_shard_size="20KB")
    shard = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))[1]
    os.remove(src / shard)
    with pytest.raises(CheckpointError, match=f"names shard.*{shard}"):
        hfc.read_hf_dir(src)


def test_wrong_shape_and_missing_tensor_in_dir(tmp_path):
    from safetensors.torch import save_file
    src = _good_dir(tmp_path)
    sd = read_weights(src)
    sd["gpt_neox.layers.0.attention.query_key_value.weight"] = torch.zeros(95, 32)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor gpt_neox.layers.0.attention."
                                              r"query_key_value.weight has shape \[95, 32\], expected \[96, 32\]"):
        hfc.read_hf_dir(src)
    del sd["gpt_neox.layers.0.attention.query_key_value.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensors: gpt_neox.layers.0.attention.query_key_value.weight"):
        hfc.read_hf_dir(src)
    os.remove(src / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds no HF weights"):
        hfc.read_hf_dir(src)


def test_existing_output_refused_and_overwrite(tmp_path):
    params = hfc.hf_state_dict_to_params(TINY, hf_state(hf_model(TINY)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PythiaJaxError, match="already exists"):
        hfc.write_hf_dir(TINY, params, out)
    assert os.listdir(out) == ["keep.txt"]
    # --overwrite replaces only an HF directory, never an unrelated folder
    with pytest.raises(PythiaJaxError, match="not an HF model directory"):
        hfc.write_hf_dir(TINY, params, out, overwrite=True)
    assert os.listdir(out) == ["keep.txt"]
    os.remove(out / "keep.txt")
    hfc.write_hf_dir(TINY, params, out, dtype="float32")  # an empty folder needs no overwrite
    with pytest.raises(PythiaJaxError, match="already exists"):
        hfc.write_hf_dir(TINY, params, out)
    hfc.write_hf_dir(TINY, params, out, overwrite=True)  # an HF directory is replaced
    assert "model.safetensors" in os.listdir(out)
    assert os.listdir(tmp_path) == ["out"]  # no temporary siblings left


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    params = hfc.hf_state_dict_to_params(TINY, hf_state(hf_model(TINY)))
    real = hfc.copy_cast
    calls = []

    def failing(dst, src, transpose=False):  # dies in the middle of the third shard
        calls.append(dst.shape)
        if len(calls) == 12:
            raise KeyboardInterrupt("simulated interruption")
        return real(dst, src, transpose)

    monkeypatch.setattr(hfc, "copy_cast", failing)
    with pytest.raises(KeyboardInterrupt):
        hfc.write_hf_dir(TINY, params, tmp_path / "out", shard_size="20KB")
    assert len(calls) == 12 and os.listdir(tmp_path) == []
    # the same while overwriting: the old directory survives untouched
    monkeypatch.setattr(hfc, "copy_cast", real)
    hfc.write_hf_dir(TINY, params, tmp_path / "out", dtype="float32")
    before = read_weights(tmp_path / "out")
    calls.clear()
    monkeypatch.setattr(hfc, "copy_cast", failing)
    with pytest.raises(KeyboardInterrupt):
        hfc.write_hf_dir(TINY, params, tmp_path / "out", shard_size="20KB", overwrite=True)
    assert os.listdir(tmp_path) == ["out"]
    after = read_weights(tmp_path / "out")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_params_with_wrong_shape_refused_before_writing(tmp_path):
    params = hfc.hf_state_dict_to_params(TINY, hf_state(hf_model(TINY)))
    params["final_layer_norm"]["bias"] = np.zeros(31, np.float32)
    with pytest.raises(CheckpointError, match="final_layer_norm/bias has shape"):
        hfc.write_hf_dir(TINY, params, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("shape,transpose", [((4099, 1031), True), ((4099, 1031), False), ((3, 2000000), True),
                                             ((2000000, 3), True), ((5, 7), True), ((9,), False), ((), False)])
def test_copy_cast_equals_numpy_on_the_threaded_path(shape, transpose):
    """Large copies are split over threads by source rows; every split must give numpy's answer."""
    rng = np.random.default_rng(0)
    src = rng.standard_normal(shape).astype(np.float16)
    want = (src.T if transpose and src.ndim == 2 else src).astype(np.float32)
    dst = np.full(want.shape, np.nan, np.float32)
    hfc.copy_cast(dst, src, transpose)
    np.testing.assert_array_equal(dst, want)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(4099, 1031), (2053, 129), (530, 64), (8, 16), (7, 3), (100, 40000)])
def test_same_dtype_transposes_move_rows_as_words(dtype, shape, monkeypatch):
    """Same-dtype transposes of narrow rows go through host_memory._transpose_words (8 rows as one
    word per column): numpy's answer on the threaded path, with a tail of rows that is not a multiple
    of 8, into a layer slot of a stacked array and from a non-contiguous source; wide rows (the
    embedding's 40000 columns here) keep the plain blocked copy."""
    import ml_dtypes

    from pythia_jax import host_memory

    calls = []
    real = host_memory._transpose_words
    monkeypatch.setattr(host_memory, "_transpose_words", lambda *a: calls.append(a[2:]) or real(*a))
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    src = np.random.default_rng(0).standard_normal(shape).astype(dt)
    for source in (src, np.asfortranarray(src)):
        stacked = np.zeros((3,) + shape[::-1], dt)
        host_memory.copy_cast(stacked[1], source, transpose=True)
        np.testing.assert_array_equal(stacked[1].view(np.uint8), np.ascontiguousarray(src.T).view(np.uint8))
        assert not stacked[0].any() and not stacked[2].any()
    narrow = 16 * shape[1] * dt.itemsize <= host_memory._WORD_BUDGET and shape[0] >= 8
    assert bool(calls) == narrow, calls
    assert all(lo % 8 == 0 and hi % 8 == 0 for lo, hi in calls)


@pytest.mark.parametrize("dst_shape,src_shape", [((3, 16), (16, 1)), ((5, 16), (16, 4)), ((1, 4, 16), (16, 4)),
                                                 ((4, 8), (16, 4))])
def test_transposes_into_another_shape_behave_as_numpy(dst_shape, src_shape):
    """A destination that is not exactly src.T's shape broadcasts or fails as ``dst[...] = src.T``
    does (the word path, which writes dst's buffer directly, must not leave rows unwritten)."""
    src = np.arange(int(np.prod(src_shape)), dtype=np.float32).reshape(src_shape)
    want = np.zeros(dst_shape, np.float32)
    try:
        want[...] = src.T
    except ValueError:
        with pytest.raises(ValueError):
            hfc.copy_cast(np.zeros(dst_shape, np.float32), src, transpose=True)
        return
    dst = np.zeros(dst_shape, np.float32)
    hfc.copy_cast(dst, src, transpose=True)
    np.testing.assert_array_equal(dst, want)


def test_read_params_are_adopted_by_jax_without_a_copy():
    """read_hf_dir's arrays are 64-byte aligned, so moving them to the CPU device shares the memory
    (pythia_jax.load of an HF folder holds one copy of the model, not two)."""
    import jax

    state = hf_state(hf_model(TINY))
    params = hfc.hf_state_dict_to_params(TINY, state)
    pointers = {id(x): x.ctypes.data for x in jax.tree.leaves(params)}
    assert all(p % 64 == 0 for p in pointers.values())
    before = [x.ctypes.data for x in jax.tree.leaves(params)]
    on_device = hfc.to_device_tree(params)
    after = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(on_device)]
    assert after == before
    assert hfc.aligned_empty((3, 5), np.float16).shape == (3, 5)


# ------------------------------------------------------------------ every GPTNeoXConfig setting that can be run
def _save_variant(tmp_path, hf_overrides, seed=5):
    """A random transformers model of TINY's shape with ``hf_overrides`` saved by transformers."""
    hf = {**TINY.to_hf_dict(), **hf_overrides}
    for key in ("rotary_pct", "rotary_emb_base", "rope_parameters", "pythia_jax_name"):
        if key in hf_overrides.get("_drop", ()):
            del hf[key]
    hf.pop("_drop", None)
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**hf))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.eval()
    model.save_pretrained(tmp_path / "hf")
    return model


HF_VARIANTS = {
    "attention_bias_false": {"attention_bias": False},
    "tied_embeddings": {"tie_word_embeddings": True},
    "both": {"attention_bias": False, "tie_word_embeddings": True},
    "sequential_residual": {"use_parallel_residual": False},
    "layer_norm_eps_1e-3": {"layer_norm_eps": 1e-3},
    "rope_theta_500": {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                                           "partial_rotary_factor": 0.5}, "_drop": ("rotary_pct", "rotary_emb_base")},
    "legacy_rotary_keys_only": {"rotary_pct": 1.0, "rotary_emb_base": 1234, "_drop": ("rope_parameters",)},
    "rope_scaling_null": {"rope_scaling": None},
    "dropout_nonzero": {"attention_dropout": 0.3, "hidden_dropout": 0.2, "classifier_dropout": 0.5},
    "intermediate_size_96": {"intermediate_size": 96},
    "runtime_fields": {"use_cache": False, "is_decoder": True, "initializer_range": 0.5, "bos_token_id": 7,
                       "eos_token_id": [0, 3], "pad_token_id": 1, "max_position_embeddings": 64,
                       "output_hidden_states": True, "chunk_size_feed_forward": 4},
    **{f"hidden_act_{a}": {"hidden_act": a} for a in ("gelu", "gelu_python", "gelu_new", "gelu_fast",
                                                        "gelu_pytorch_tanh", "gelu_accurate", "gelu_python_tanh")},
}


@pytest.mark.parametrize("name", list(HF_VARIANTS))
def test_supported_gptneox_settings_match_transformers_logits(tmp_path, name):
    """Each GPTNeoXConfig setting pythia-jax runs (config.HF_FIELDS 'read'/'weights'/'ignored')
    gives transformers' logits after read_hf_dir (within 1e-5, fp32)."""
    model = _save_variant(tmp_path, dict(HF_VARIANTS[name]))
    config, params = hfc.read_hf_dir(tmp_path / "hf")
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 13))
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    ours = jax_logits(config, params, tokens)
    assert np.abs(ours - theirs).max() <= 1e-5
    if "attention_bias" in name or name == "both":
        assert not params["layers"]["attention"]["query_key_value"]["bias"].any()
    if "tied" in name or name == "both":
        np.testing.assert_array_equal(params["embed_out"]["kernel"], params["embed_in"]["embedding"].T)
    # written back (untied, with biases) it loads in transformers with the same logits
    hfc.write_hf_dir(config, params, tmp_path / "out", dtype="float32")
    back, info, messages = load_quietly(tmp_path / "out")
    assert_clean_load(info, messages)
    with torch.no_grad():
        assert np.abs(back(torch.from_numpy(tokens)).logits.numpy() - theirs).max() <= 1e-5


REFUSED_HF = {
    "rope_linear": ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                                         "partial_rotary_factor": 0.25}}, r"rope_parameters.rope_type='linear'"),
    "rope_dynamic": ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.25}}, r"rope_type='dynamic'"),
    "hidden_act_relu": ({"hidden_act": "relu"}, r"hidden_act='relu'"),
    "hidden_act_quick_gelu": ({"hidden_act": "quick_gelu"}, r"hidden_act='quick_gelu'"),
    "encoder_decoder": ({"is_encoder_decoder": True}, r"is_encoder_decoder=True"),
    "cross_attention": ({"add_cross_attention": True}, r"add_cross_attention=True"),
    "classifier": ({"architectures": ["GPTNeoXForSequenceClassification"]}, r"architectures=\['GPTNeoXFor"),
}


@pytest.mark.parametrize("name", list(REFUSED_HF))
def test_unsupported_gptneox_settings_refused_by_name_before_reading_tensors(tmp_path, name):
    """A setting transformers loads but this model cannot run: ConfigError naming it and its
    value, raised before any tensor is read (so not 'missing tensors')."""
    overrides, pattern = REFUSED_HF[name]
    src = _good_dir(tmp_path)
    hf = json.loads((src / "config.json").read_text())
    hf.update(overrides)
    (src / "config.json").write_text(json.dumps(hf))
    transformers.GPTNeoXConfig.from_pretrained(src)  # transformers accepts the config
    with pytest.raises(ConfigError, match=pattern):
        hfc.read_hf_dir(src)
    os.remove(src / "model.safetensors")  # no weights at all: still the config error, not a weights error
    with pytest.raises(ConfigError, match=pattern):
        hfc.read_hf_dir(src)


ROPE_SPELLINGS = {  # config.json edits: (accepted?, what transformers resolves them to)
    # transformers 4.x wrote both spellings with equal values
    "top_level_agrees": ({"partial_rotary_factor": 0.25, "rope_theta": 10000.0}, True),
    "rope_scaling_agrees": ({"rope_scaling": {"rope_type": "default", "partial_rotary_factor": 0.25}}, True),
    # rope_scaling is read instead of rope_parameters; its missing theta falls back to rotary_emb_base
    "rope_scaling_alone": ({"rope_scaling": {"rope_type": "default", "partial_rotary_factor": 0.5},
                            "rope_parameters": None, "rotary_emb_base": 500}, True),
    # GPTNeoXConfig ignores the top-level keys: reading them would change the model
    "top_level_only": ({"rope_parameters": None, "partial_rotary_factor": 0.5},
                       r"partial_rotary_factor=0.5 but transformers' GPTNeoXConfig uses the default = 0.25 and "
                       r"ignores the top-level key"),
    # transformers reads rope_scaling and drops rope_parameters
    "rope_scaling_disagrees": ({"rope_scaling": {"rope_type": "default", "partial_rotary_factor": 0.5}},
                               r"rope_parameters.partial_rotary_factor=0.25 but transformers' GPTNeoXConfig uses "
                               r"rope_scaling.partial_rotary_factor = 0.5"),
    "theta_disagrees": ({"rope_scaling": {"rope_type": "default", "rope_theta": 500.0}},
                        r"rope_parameters.rope_theta=10000 but .* uses rope_scaling.rope_theta = 500.0"),
}


@pytest.mark.parametrize("name", list(ROPE_SPELLINGS))
def test_rotary_settings_resolve_as_transformers_or_are_refused(tmp_path, name):
    """The rotary fraction and base come from the spelling transformers reads (rope_scaling, else
    rope_parameters, else the 4.x keys, else the defaults); another spelling in the same file that
    disagrees is refused by name, since transformers ignores it and other readers may not."""
    edits, outcome = ROPE_SPELLINGS[name]
    src = _good_dir(tmp_path)
    hf = json.loads((src / "config.json").read_text())
    for key in ("rotary_pct", "rotary_emb_base"):
        hf.pop(key, None)
    hf.update(edits)
    hf = {k: v for k, v in hf.items() if v is not None}
    (src / "config.json").write_text(json.dumps(hf))
    theirs = transformers.GPTNeoXConfig.from_pretrained(src).rope_parameters
    if outcome is True:
        config = hfc.read_hf_dir(src)[0]
        assert (config.rotary_pct, config.rotary_emb_base) == (theirs["partial_rotary_factor"], theirs["rope_theta"])
    else:
        with pytest.raises(ConfigError, match=outcome):
            hfc.read_hf_dir(src)


def _raw_tensors(directory) -> dict[str, tuple[str, list[int], bytes]]:
    """{key: (safetensors dtype code, shape, the tensor's bytes)} of an HF directory's safetensors."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            data = (directory / name).read_bytes()
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            header.pop("__metadata__", None)
            for key, info in header.items():
                lo, hi = info["data_offsets"]
                out[key] = (info["dtype"], info["shape"], data[8 + n + lo:8 + n + hi])
    return out


def test_cli_hf_to_jax_keeps_the_release_dtype_and_every_reader_gets_float32(tmp_path):
    """convert hf-to-jax (default --dtype auto) of an fp16 release stores fp16: jax-to-hf gives back
    the identical bytes of every tensor; --dtype float32 stores the upcast; every reader of either
    checkpoint gets the same float32 params, whose logits equal transformers' on the fp16 weights
    loaded in float32."""
    from pythia_jax import checkpoint as C
    from pythia_jax.cli import main

    def cli(*argv):
        return main(["convert", *map(str, argv), "--no-progress"])

    src = tmp_path / "release"
    hf_model(TINY, seed=5, dtype=torch.float16).save_pretrained(src)
    assert cli("hf-to-jax", src, tmp_path / "ck16") == 0
    assert set(C.stored_dtypes(tmp_path / "ck16").values()) == {"float16"}
    assert cli("jax-to-hf", tmp_path / "ck16", tmp_path / "back") == 0  # float16 by default
    original, back = _raw_tensors(src), _raw_tensors(tmp_path / "back")
    original["embed_out.weight"] = original.pop("lm_head.weight", original.get("embed_out.weight"))
    assert set(back) == set(original)
    assert all(back[k] == original[k] for k in original)  # dtype, shape and bytes

    assert cli("hf-to-jax", src, tmp_path / "ck32", "--dtype", "float32") == 0
    assert set(C.stored_dtypes(tmp_path / "ck32").values()) == {"float32"}
    _, stored16 = C.load_params(tmp_path / "ck16", host=True, dtype=C.STORED)
    _, host32 = C.load_params(tmp_path / "ck32", host=True)
    for loaded in (C.load_params(tmp_path / "ck16", host=True)[1], C.load_params(tmp_path / "ck16")[1]):
        for a, b, c in zip(jax.tree.leaves(loaded), jax.tree.leaves(host32), jax.tree.leaves(stored16)):
            assert a.dtype == np.float32 and c.dtype == np.float16
            np.testing.assert_array_equal(np.asarray(a), b)
            np.testing.assert_array_equal(np.asarray(a), c.astype(np.float32))

    config, params = C.load_params(tmp_path / "ck16")
    model, info, messages = load_quietly(src)  # from_pretrained(dtype=float32) of the fp16 weights
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(jax_logits(config, params, tokens) - theirs).max() <= 1e-5

    # --dtype auto is for hf-to-jax only; neox-to-jax takes no --dtype (one-line errors, no output)
    assert cli("jax-to-hf", tmp_path / "ck16", tmp_path / "x", "--dtype", "auto") == 2
    assert cli("hf-to-jax", src, tmp_path / "y", "--dtype", "int8") == 2
    assert cli("neox-to-jax", tmp_path / "ck16", tmp_path / "z", "--dtype", "float16") == 2
    assert not any((tmp_path / n).exists() for n in "xyz")


@pytest.mark.parametrize("stored", ["both_different", "both_equal", "head_only"])
def test_tied_config_with_stored_embeddings_reads_as_transformers_loads_it(tmp_path, stored, caplog):
    """tie_word_embeddings: true in config.json, but the weights hold embed_out beside embed_in (or
    only embed_out): the params give transformers' own logits for that directory. Different
    stored values are both kept (transformers does not tie them; one warning), equal ones are
    tied, a lone head fills embed_in. Written back (untied), the logits are the source's."""
    from safetensors.torch import save_file

    untied = hf_model(TINY, seed=7)
    sd = {k: v.clone().contiguous() for k, v in untied.state_dict().items()}
    sd["embed_out.weight"] = sd.pop("lm_head.weight")
    if stored == "both_equal":
        sd["embed_out.weight"] = sd["gpt_neox.embed_in.weight"].clone()
    elif stored == "head_only":
        del sd["gpt_neox.embed_in.weight"]
    src = tmp_path / "src"
    src.mkdir()
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    hf = {**TINY.to_hf_dict(), "tie_word_embeddings": True}
    (src / "config.json").write_text(json.dumps(hf))

    tokens = np.random.default_rng(3).integers(0, TINY.vocab_size, (2, 11))
    reference, _, _ = load_quietly(src)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(tokens)).logits.numpy()
    with caplog.at_level(logging.WARNING, logger="pythia_jax"):
        config, params = hfc.read_hf_dir(src)
    ours = jax_logits(config, params, tokens)
    assert np.abs(ours - theirs).max() <= 1e-5
    head, embed = params["embed_out"]["kernel"], params["embed_in"]["embedding"]
    ours_said = [r.getMessage() for r in caplog.records if r.name.startswith("pythia_jax")]
    warned = [m for m in ours_said if "tie_word_embeddings" in m]
    skipped = [m for m in ours_said if "were skipped" in m]
    assert not skipped
    if stored == "both_different":
        np.testing.assert_array_equal(head, sd["embed_out.weight"].numpy().T)
        assert not np.array_equal(head, embed.T)
        assert len(warned) == 1 and "both are kept" in warned[0]
    else:
        np.testing.assert_array_equal(head, embed.T)
        assert not warned
    hfc.write_hf_dir(config, params, tmp_path / "out", dtype="float32")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    back, info, messages = load_quietly(tmp_path / "out")
    assert_clean_load(info, messages)
    with torch.no_grad():
        assert np.abs(back(torch.from_numpy(tokens)).logits.numpy() - theirs).max() <= 1e-5
