"""GPT-NeoX (DeepSpeed) checkpoint conversion: TP merge, layouts, ZeRO import, jax-to-neox, bad input.

Synthetic checkpoints are built with torch exactly as PYTHIA_FACTS §4 / DeepSpeed lay them out;
the reference for the merged model is a re-implementation of the key mapping and arithmetic of
GPT-NeoX's ``tools/ckpts/convert_neox_to_hf.py`` (``reference_neox_to_hf`` below).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pythia_jax.config import ModelConfig  # noqa: E402
from pythia_jax.convert import hf as hfc  # noqa: E402
from pythia_jax.convert import neox  # noqa: E402
from pythia_jax.errors import CheckpointError, ConfigError, PythiaJaxError  # noqa: E402

LAYER_KEYS_V1 = [
    "input_layernorm.weight", "input_layernorm.bias",
    "attention.query_key_value.weight", "attention.query_key_value.bias",
    "attention.dense.weight", "attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
]
V2_NAMES = {"mlp.dense_h_to_4h": "mlp.linear1", "mlp.dense_4h_to_h": "mlp.linear2"}


# ------------------------------------------------------------------ synthetic NeoX checkpoints
def yml_for(L=2, H=32, heads=4, tp=1, parallel=True, pipe=1, rotary_pct=0.25, **extra):
    yml = {
        "pipe-parallel-size": pipe, "model-parallel-size": tp, "num-layers": L, "hidden-size": H,
        "num-attention-heads": heads, "seq-length": 64, "max-position-embeddings": 64,
        "pos-emb": "rotary", "rotary-pct": rotary_pct, "rotary_emb_base": 10000, "no-weight-tying": True,
        "gpt_j_residual" if parallel else "gpt-j-residual": parallel, "output-layer-parallelism": "column",
        "norm": "layernorm", "layernorm-epsilon": 1.0e-5, "bias-gelu-fusion": True,
        "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "min_lr": 0.0001, "train-iters": 1000, "lr-decay-iters": 1000, "warmup": 0.01,
        "weight-decay": 0.1, "gradient_clipping": 1.0, "make-vocab-size-divisible-by": 128,
    }
    yml.update(extra)
    return yml


def write_yml(step_dir, yml, name="tiny.yml"):
    os.makedirs(os.path.join(step_dir, "configs"), exist_ok=True)
    text = "# Pythia-style config: comments and trailing commas\n{\n"
    for k, v in yml.items():
        text += f'  "{k}": {json.dumps(v)},\n'
    text += "}\n"
    with open(os.path.join(step_dir, "configs", name), "w") as f:
        f.write(text)


def rank_tensors(L, H, V, tp, gen, dtype=torch.float32, convention="v1", F=None):
    """Per TP rank, per layer index: {NeoX key: tensor} with random, rank-distinct values."""
    F = F or 4 * H
    shapes = {
        "input_layernorm.weight": (H,), "input_layernorm.bias": (H,),
        "post_attention_layernorm.weight": (H,), "post_attention_layernorm.bias": (H,),
        "attention.query_key_value.weight": (3 * H // tp, H), "attention.query_key_value.bias": (3 * H // tp,),
        "attention.dense.weight": (H, H // tp), "attention.dense.bias": (H,),
        "mlp.dense_h_to_4h.weight": (F // tp, H), "mlp.dense_h_to_4h.bias": (F // tp,),
        "mlp.dense_4h_to_h.weight": (H, F // tp), "mlp.dense_4h_to_h.bias": (H,),
    }

    def rnd(shape):
        return (torch.randn(shape, generator=gen) * 0.5).to(dtype)

    ranks = []
    for _ in range(tp):
        layers = {0: {"word_embeddings.weight": rnd((V // tp, H))}}
        for i in range(L):
            d = {}
            for key in LAYER_KEYS_V1:
                name = key
                if convention == "v2":
                    for old, new in V2_NAMES.items():
                        name = name.replace(old, new)
                d[name] = rnd(shapes[key])
            d["attention.rotary_emb.inv_freq"] = torch.ones(4)
            layers[i + 2] = d
        layers[L + 3] = {"norm.weight": rnd((H,)), "norm.bias": rnd((H,))}
        layers[L + 4] = {"final_linear.weight": rnd((V // tp, H))}
        ranks.append(layers)
    return ranks


def save_neox(step_dir, ranks, layout="pipeline", engine_extra=None):
    os.makedirs(step_dir, exist_ok=True)
    for t, layers in enumerate(ranks):
        if layout == "pipeline":
            for idx, d in layers.items():
                torch.save(d, os.path.join(step_dir, f"layer_{idx:02d}-model_{t:02d}-model_states.pt"))
            module = None
        else:
            module = OrderedDict((f"sequential.{idx}.{k}", v) for idx, d in layers.items() for k, v in d.items())
        engine = {"module": module, "buffer_names": [], "optimizer": None, "global_steps": 7,
                  "iteration": 7, "skipped_steps": 0, "mp_world_size": len(ranks)}
        engine.update((engine_extra or {}).get(t, {}))
        torch.save(engine, os.path.join(step_dir, f"mp_rank_{t:02d}_model_states.pt"))


def reference_neox_to_hf(step_dir, yml):
    """GPT-NeoX's convert_neox_to_hf.py (neox architecture) re-implemented: key mapping, TP merge
    ops and their order, from its source. Returns the HF state dict it would load (torch)."""
    get = lambda k, d=None: yml.get(k, yml.get(k.replace("-", "_"), d))  # noqa: E731
    mp = get("model-parallel-size")
    sequential = get("pipe-parallel-size", 1) == 0
    L = get("num-layers")

    def load_partitions(layer_idx):
        fmt = "mp_rank_{i:02}_model_states.pt" if sequential else f"layer_{layer_idx:02}-model_{{i:02}}-model_states.pt"
        return [torch.load(os.path.join(step_dir, fmt.format(i=i)), weights_only=False) for i in range(mp)]

    def get_state(sds, key, layer_idx):
        if sequential:
            return [sd["module"][f"sequential.{layer_idx}.{key}"] for sd in sds]
        return [sd[key] for sd in sds]

    first = load_partitions(2)[0]
    keys = first["module"] if sequential else first
    mlp_in = "mlp.dense_h_to_4h" if any("mlp.dense_h_to_4h" in k for k in keys) else "mlp.linear1"
    conv = {"mlp.dense_h_to_4h": mlp_in, "mlp.dense_4h_to_h": mlp_in.replace("dense_h_to_4h", "dense_4h_to_h")
            .replace("linear1", "linear2")}

    def nk(key):  # NeoX key of an HF layer key in this checkpoint's convention
        for old, new in conv.items():
            key = key.replace(old, new)
        return key

    out = {}
    ranks = load_partitions(0)
    out["gpt_neox.embed_in.weight"] = torch.cat(get_state(ranks, "word_embeddings.weight", 0), dim=0)
    for i in range(L):
        if not sequential:
            ranks = load_partitions(i + 2)
        p = f"gpt_neox.layers.{i}."
        for k in ("attention.dense.weight", "mlp.dense_4h_to_h.weight"):
            out[p + k] = torch.cat(get_state(ranks, nk(k), i + 2), dim=1)
        for k in ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
                  "post_attention_layernorm.bias"):
            out[p + k] = sum(get_state(ranks, k, i + 2)) / len(ranks)
        for k in ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "attention.query_key_value.weight",
                  "attention.query_key_value.bias"):
            out[p + k] = torch.cat(get_state(ranks, nk(k), i + 2), dim=0)
        for k in ("mlp.dense_4h_to_h.bias", "attention.dense.bias"):
            out[p + k] = sum(get_state(ranks, nk(k), i + 2))
    if not sequential:
        ranks = load_partitions(L + 3)
    for k, hk in (("norm.weight", "weight"), ("norm.bias", "bias")):
        out[f"gpt_neox.final_layer_norm.{hk}"] = sum(get_state(ranks, k, L + 3)) / len(ranks)
    if not sequential:
        ranks = load_partitions(L + 4)
    out["embed_out.weight"] = torch.cat(get_state(ranks, "final_linear.weight", L + 4), dim=0)
    hf_config = {"rotary_pct": get("rotary-pct", 1.0), "rotary_emb_base": get("rotary-emb-base", 1000.0),
                 "use_parallel_residual": get("gpt-j-residual", False),
                 "layer_norm_eps": get("layernorm-epsilon", 1e-5), "hidden_size": get("hidden-size"),
                 "num_attention_heads": get("num-attention-heads"), "num_hidden_layers": L,
                 "max_position_embeddings": get("max-position-embeddings")}
    return out, hf_config


def build(tmp_path, *, tp=1, layout="pipeline", convention="v1", dtype=torch.float32, L=2, H=32,
          V=96, seed=0, parallel=True):
    step_dir = str(tmp_path / "ckpt" / "global_step7")
    gen = torch.Generator().manual_seed(seed)
    ranks = rank_tensors(L, H, V, tp, gen, dtype, convention)
    save_neox(step_dir, ranks, layout)
    yml = yml_for(L=L, H=H, tp=tp, parallel=parallel, pipe=0 if layout == "sequential" else 1)
    write_yml(step_dir, yml)
    return step_dir, yml, ranks


def assert_same_state(ours: dict, ref: dict):
    assert set(ours) == set(ref)
    for k in ref:
        a, b = ours[k], ref[k].float().numpy()
        assert a.shape == b.shape, k
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)) or np.array_equal(a, b), k


# ------------------------------------------------------------------ NeoX -> params
@pytest.mark.parametrize("tp,layout,convention,dtype", [
    (1, "pipeline", "v1", torch.float32),
    (2, "pipeline", "v1", torch.float32),
    (4, "pipeline", "v2", torch.float32),
    (1, "sequential", "v1", torch.float32),
    (2, "sequential", "v2", torch.float32),
    (4, "sequential", "v1", torch.float32),
    (4, "pipeline", "v1", torch.float16),
])
def test_neox_matches_reference_converter(tmp_path, tp, layout, convention, dtype):
    step_dir, yml, _ = build(tmp_path, tp=tp, layout=layout, convention=convention, dtype=dtype)
    config, params, ckpt = neox.read_neox_checkpoint(step_dir)
    assert (ckpt.tp, ckpt.layout, ckpt.step) == (tp, layout, 7)
    ref, ref_cfg = reference_neox_to_hf(step_dir, yml)
    assert_same_state(hfc.params_to_hf_state_dict(config, params), ref)
    assert config.rotary_pct == ref_cfg["rotary_pct"] and config.rotary_emb_base == 10000
    assert config.use_parallel_residual == ref_cfg["use_parallel_residual"]
    assert (config.num_layers, config.hidden_size, config.num_heads) == (2, 32, 4)
    assert config.vocab_size == 96 and config.intermediate_size == 128
    assert config.hidden_act == "gelu_new"  # bias-gelu-fusion: the tanh GELU NeoX trained with


def test_parent_folder_latest_and_step(tmp_path):
    step_dir, _, _ = build(tmp_path)
    root = os.path.dirname(step_dir)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("global_step7")
    cfg_a, p_a, _ = neox.read_neox_checkpoint(root)
    cfg_b, p_b, _ = neox.read_neox_checkpoint(root, step=7)
    assert cfg_a == cfg_b
    with pytest.raises(CheckpointError, match="global_step8"):
        neox.read_neox_checkpoint(root, step=8)


def test_sequential_residual_tp_takes_one_bias_copy(tmp_path):
    step_dir, yml, ranks = build(tmp_path, tp=2, parallel=False)
    config, params, _ = neox.read_neox_checkpoint(step_dir)
    assert not config.use_parallel_residual
    sd = hfc.params_to_hf_state_dict(config, params)
    np.testing.assert_array_equal(sd["gpt_neox.layers.0.attention.dense.bias"],
                                  ranks[0][2]["attention.dense.bias"].numpy())


# ------------------------------------------------------------------ bad input
def test_mixed_tp_sizes(tmp_path):
    step_dir, _, _ = build(tmp_path, tp=2)
    os.remove(os.path.join(step_dir, "layer_03-model_01-model_states.pt"))
    with pytest.raises(CheckpointError, match="mixed tensor-parallel"):
        neox.read_neox_checkpoint(step_dir)


def test_yml_tp_disagrees_with_files(tmp_path):
    step_dir, yml, _ = build(tmp_path, tp=2)
    yml["model-parallel-size"] = 4
    write_yml(step_dir, yml)
    with pytest.raises(CheckpointError, match="mixed tensor-parallel"):
        neox.read_neox_checkpoint(step_dir)


def test_unrecognisable_folder(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no recognisable GPT-NeoX layout"):
        neox.read_neox_checkpoint(tmp_path / "junk")


def test_missing_yml(tmp_path):
    step_dir, _, _ = build(tmp_path)
    os.remove(os.path.join(step_dir, "configs", "tiny.yml"))
    with pytest.raises(ConfigError, match="no GPT-NeoX yml"):
        neox.read_neox_checkpoint(step_dir)


def test_wrong_shape_and_missing_tensor(tmp_path):
    step_dir, _, ranks = build(tmp_path)
    f = os.path.join(step_dir, "layer_03-model_00-model_states.pt")
    d = dict(ranks[0][3])
    d["attention.dense.weight"] = torch.zeros(32, 31)
    torch.save(d, f)
    with pytest.raises(CheckpointError, match=r"gpt_neox.layers.1.attention.dense.weight.*\[32, 31\]"):
        neox.read_neox_checkpoint(step_dir)
    del d["attention.dense.weight"]
    torch.save(d, f)
    with pytest.raises(CheckpointError, match="missing tensor attention.dense.weight"):
        neox.read_neox_checkpoint(step_dir)


def test_layer_count_mismatch(tmp_path):
    step_dir, yml, _ = build(tmp_path)
    yml["num-layers"] = 3
    write_yml(step_dir, yml)
    with pytest.raises(CheckpointError, match="found 2 transformer layers"):
        neox.read_neox_checkpoint(step_dir)
