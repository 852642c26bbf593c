"""GPT-NeoX (DeepSpeed) checkpoint conversion: TP merge, layouts, ZeRO import, jax-to-neox, bad input.

Synthetic checkpoints are built with torch exactly as GPT-NeoX v1.0 (DeepSpeed's PipelineModule
checkpoints) lays them out;
the reference for the merged model is a re-implementation of the key mapping and arithmetic of
GPT-NeoX's ``tools/ckpts/convert_neox_to_hf.py`` (``reference_neox_to_hf`` below).
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pythia_jax.config import ModelConfig  # noqa: E402
from pythia_jax.convert import hf as hfc  # noqa: E402
from pythia_jax.convert import neox  # noqa: E402
from pythia_jax.errors import CheckpointError, ConfigError  # noqa: E402
from pythia_jax.train import continuation  # noqa: E402

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
        "lr-decay-style": "cosine", "weight-decay": 0.1, "gradient_clipping": 1.0, "make-vocab-size-divisible-by": 128,
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


# ------------------------------------------------------------------ ZeRO optimizer shards
def _fake_deepspeed_classes():
    """Classes pickled under deepspeed's module names (DeepSpeed itself is not installed)."""
    import enum

    scaler_mod = types.ModuleType("deepspeed.runtime.fp16.loss_scaler")
    zero_mod = types.ModuleType("deepspeed.runtime.zero.config")

    class DynamicLossScaler:
        def __init__(self):
            self.cur_scale = 4096.0
    DynamicLossScaler.__module__ = scaler_mod.__name__
    DynamicLossScaler.__qualname__ = "DynamicLossScaler"
    scaler_mod.DynamicLossScaler = DynamicLossScaler

    class ZeroStageEnum(int, enum.Enum):
        optimizer_states = 1
        gradients = 2
    ZeroStageEnum.__module__ = zero_mod.__name__
    ZeroStageEnum.__qualname__ = "ZeroStageEnum"
    zero_mod.ZeroStageEnum = ZeroStageEnum
    mods = {scaler_mod.__name__: scaler_mod, zero_mod.__name__: zero_mod}
    for name in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", "deepspeed.runtime.zero"):
        mods[name] = types.ModuleType(name)
    return mods


def _is_decayed(key):
    return not key.endswith("bias") and "layernorm" not in key and not key.startswith("norm.")


def _is_replicated(key):
    """Tensors every TP rank holds whole: LayerNorms and the row-parallel biases."""
    return "layernorm" in key or key.startswith("norm.") or key in ROW_PARALLEL_BIAS_KEYS


ROW_PARALLEL_BIAS_KEYS = ("attention.dense.bias", "mlp.dense_4h_to_h.bias")


def save_zero(step_dir, master_ranks, dp, form, layout, step, gen, replicated_moments_equal=False):
    """Write model weights (fp16 copies), mp_rank files with param_shapes, and ZeRO-1 shards.

    Follows DeepSpeed's stage-1/2 optimizer: two param groups (weight decay / none), each
    flattened in order, padded to a multiple of 2·dp, split into dp equal partitions; partitions
    saved without the padding; Adam moments as the elastic list or a torch state_dict.
    ``replicated_moments_equal``: replicated tensors get rank 0's moments on every rank (as in a
    real run, where every rank sees the same gradient for them).
    Returns {tp rank: {(idx, key): (exp_avg, exp_avg_sq)}}.
    """
    moments = {}
    fake = _fake_deepspeed_classes()
    assert not any(name in sys.modules for name in fake), "a real deepspeed is imported"
    sys.modules.update(fake)
    try:
        save_neox(step_dir, [{i: {k: v.half() for k, v in d.items()} for i, d in r.items()}
                             for r in master_ranks], layout)
        for t, layers in enumerate(master_ranks):
            prefix = "sequential." if layout == "sequential" else ""
            groups = [[], []]
            for idx, d in layers.items():
                for k, v in d.items():
                    if k.endswith("inv_freq"):
                        continue
                    groups[0 if _is_decayed(k) else 1].append((idx, k, v))
            param_shapes = [OrderedDict((f"{prefix}{i}.{k}", v.shape) for i, k, v in g) for g in groups]
            engine_file = os.path.join(step_dir, f"mp_rank_{t:02d}_model_states.pt")
            engine = torch.load(engine_file, weights_only=False)
            engine.update(param_shapes=param_shapes, iteration=step + 3, global_steps=step + 3,
                          skipped_steps=3, lr_scheduler={"num_iters": step})
            torch.save(engine, engine_file)
            flat, avg, avg_sq, pads = [], [], [], []
            for g in groups:
                v = torch.cat([x.reshape(-1) for _, _, x in g]).float()
                m = torch.randn(v.shape, generator=gen) * 1e-3
                s = torch.rand(v.shape, generator=gen) * 1e-5 + 1e-7
                for (i, k, x), a, b in zip(g, torch.split(m, [x.numel() for _, _, x in g]),
                                           torch.split(s, [x.numel() for _, _, x in g])):
                    if replicated_moments_equal and t > 0 and _is_replicated(k):
                        a.copy_(moments[0][(i, k)][0].reshape(-1))  # (views into m / s)
                        b.copy_(moments[0][(i, k)][1].reshape(-1))
                    moments.setdefault(t, {})[(i, k)] = (a.reshape(x.shape).clone(), b.reshape(x.shape).clone())
                align = 2 * dp
                padded = -(-v.numel() // align) * align
                pad = padded - v.numel()
                z = torch.zeros(pad)
                flat.append(torch.cat([v, z]).chunk(dp))
                avg.append(torch.cat([m, z]).chunk(dp))
                avg_sq.append(torch.cat([s, z]).chunk(dp))
                pads.append(pad)
            for d in range(dp):
                last = d == dp - 1
                paddings = [p if last else 0 for p in pads]
                fp32 = [f[d][: f[d].numel() - p] for f, p in zip(flat, paddings)]
                if form == "elastic":
                    base = [{"exp_avg": a[d][: a[d].numel() - p].clone(),
                             "exp_avg_sq": b[d][: b[d].numel() - p].clone()}
                            for a, b, p in zip(avg, avg_sq, paddings)]
                    extra = {"base_optimizer_state_step": step}
                else:
                    base = {"state": {g: {"step": torch.tensor(float(step)), "exp_avg": avg[g][d].clone(),
                                          "exp_avg_sq": avg_sq[g][d].clone()} for g in range(2)},
                            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": wd,
                                              "params": [g]} for g, wd in enumerate((0.1, 0.0))]}
                    extra = {}
                osd = {"loss_scaler": fake["deepspeed.runtime.fp16.loss_scaler"].DynamicLossScaler(),
                       "dynamic_loss_scale": True, "overflow": False, "clip_grad": 1.0,
                       "base_optimizer_state": base, "single_partition_of_fp32_groups": [x.clone() for x in fp32],
                       "zero_stage": fake["deepspeed.runtime.zero.config"].ZeroStageEnum.optimizer_states,
                       "group_paddings": paddings, "partition_count": [dp, dp], "ds_version": "0.9.0", **extra}
                torch.save({"optimizer_state_dict": osd, "ds_config": {}, "ds_version": "0.9.0"},
                           os.path.join(step_dir, f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt"))
    finally:
        for name in fake:
            sys.modules.pop(name, None)
    return moments


def build_zero(tmp_path, *, tp=1, dp=2, form="elastic", layout="pipeline", step=5, L=2, H=32, V=96,
               replicated_moments_equal=False):
    step_dir = str(tmp_path / "zero" / "global_step8")
    gen = torch.Generator().manual_seed(1)
    master = rank_tensors(L, H, V, tp, gen, torch.float32)
    moments = save_zero(step_dir, master, dp, form, layout, step, gen, replicated_moments_equal)
    yml = yml_for(L=L, H=H, tp=tp, pipe=0 if layout == "sequential" else 1)
    write_yml(step_dir, yml)
    return step_dir, master, moments


def _merged(per_rank, L, rule_bias):
    """Merge {rank: {(idx, key): tensor}} with the NeoX converter rules -> HF state dict (numpy)."""
    tp = len(per_rank)
    out = {}
    get = lambda idx, k: [per_rank[t][(idx, k)] for t in range(tp)]  # noqa: E731
    out["gpt_neox.embed_in.weight"] = torch.cat(get(0, "word_embeddings.weight"))
    for i in range(L):
        p = f"gpt_neox.layers.{i}."
        for k in LAYER_KEYS_V1:
            ts = get(i + 2, k)
            if k in ("attention.dense.weight", "mlp.dense_4h_to_h.weight"):
                out[p + k] = torch.cat(ts, 1)
            elif "layernorm" in k:
                out[p + k] = sum(ts) / tp if tp > 1 else ts[0]
            elif k in ("attention.dense.bias", "mlp.dense_4h_to_h.bias"):
                out[p + k] = (sum(ts) if rule_bias == "sum" else ts[0]) if tp > 1 else ts[0]
            else:
                out[p + k] = torch.cat(ts, 0)
    norm_weight = get(L + 3, "norm.weight")
    out["gpt_neox.final_layer_norm.weight"] = sum(norm_weight) / tp if tp > 1 else norm_weight[0]
    out["gpt_neox.final_layer_norm.bias"] = sum(get(L + 3, "norm.bias")) / tp if tp > 1 else get(L + 3, "norm.bias")[0]
    out["embed_out.weight"] = torch.cat(get(L + 4, "final_linear.weight"))
    return {k: v.float().numpy() for k, v in out.items()}


@pytest.mark.parametrize("tp,dp,form,layout", [
    (1, 2, "elastic", "pipeline"), (1, 3, "torch", "sequential"), (2, 2, "torch", "pipeline"),
    (4, 1, "elastic", "sequential"),
])
def test_zero_master_weights_and_moments(tmp_path, tp, dp, form, layout):
    step_dir, master, moments = build_zero(tmp_path, tp=tp, dp=dp, form=form, layout=layout)
    config, params16, ckpt = neox.read_neox_checkpoint(step_dir)
    state = neox.read_neox_optimizer_state(ckpt, config)
    assert state.step == 5 and state.iteration == 8 and state.scheduler_steps == 5
    flat_master = {t: {(i, k): v for i, d in r.items() for k, v in d.items()} for t, r in enumerate(master)}
    want = _merged(flat_master, 2, "sum")
    got = hfc.params_to_hf_state_dict(config, state.master)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the module weights are the fp16 copies of the same merge
    got16 = hfc.params_to_hf_state_dict(config, params16)
    want16 = _merged({t: {ik: v.half() for ik, v in r.items()} for t, r in flat_master.items()}, 2, "sum")
    for k in want16:
        np.testing.assert_array_equal(got16[k], want16[k], err_msg=k)
    for which, tree in ((0, state.exp_avg), (1, state.exp_avg_sq)):
        per_rank = {t: {ik: ms[which] for ik, ms in moments[t].items()} for t in moments}
        want_m = _merged(per_rank, 2, "first")
        got_m = hfc.params_to_hf_state_dict(config, tree)
        for k in want_m:
            np.testing.assert_array_equal(got_m[k], want_m[k], err_msg=k)


def test_zero_continuation_matches_torch_adamw(tmp_path):
    """One JAX step from the imported ZeRO state equals one torch AdamW step (+ clipping)."""
    import jax

    from pythia_jax.train.optimizer import neox_lr, schedule_count

    step_dir, master, moments = build_zero(tmp_path, tp=1, dp=2, form="torch", step=20)
    config, _, ckpt = neox.read_neox_checkpoint(step_dir)
    params, opt_state, step, meta = continuation.neox_train_state(ckpt, config)
    assert step == 23 and int(schedule_count(opt_state)) == 20 and meta["adam_steps"] == 20
    settings = neox.optimizer_settings(ckpt.yml)
    assert settings == {"max_lr": 0.001, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "min_lr": 0.0001,
                        "weight_decay": 0.1, "clip_norm": 1.0, "total_steps": 1000, "warmup_steps": 10.0,
                        "decay_style": "cosine", "row_parallel_bias_copies": 1}
    from pythia_jax.train.optimizer import build_optimizer
    opt = build_optimizer(**settings)

    rng = np.random.default_rng(0)
    grads_hf = {k: (rng.standard_normal(v.shape) * 0.3).astype(np.float32)
                for k, v in hfc.params_to_hf_state_dict(config, params).items()}
    grads = jax.tree.map(np.asarray, hfc.hf_state_dict_to_params(config, grads_hf))
    with jax.default_matmul_precision("highest"):
        updates, _ = jax.jit(opt.update)(grads, opt_state, params)
        new_params = jax.tree.map(lambda p, u: p + u, params, updates)
    ours = hfc.params_to_hf_state_dict(config, jax.tree.map(np.asarray, new_params))

    # torch AdamW from the checkpoint's own master weights / moments (ground truth of the builder)
    master_hf = _merged({0: {(i, k): v for i, d in master[0].items() for k, v in d.items()}}, 2, "sum")
    moment_hf = [_merged({0: {ik: ms[w] for ik, ms in moments[0].items()}}, 2, "first") for w in (0, 1)]
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in master_hf.items()}
    # NeoX: weight decay on Linear / embedding weights only (not biases, not LayerNorms)
    decayed = lambda k: k.endswith("weight") and "layernorm" not in k and "layer_norm" not in k  # noqa: E731
    decay = [p for k, p in tparams.items() if decayed(k)]
    no_decay = [p for k, p in tparams.items() if not decayed(k)]
    lr = neox_lr(20, 0.001, 0.0001, 10, 1000)
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)
    for k, p in tparams.items():
        topt.state[p] = {"step": torch.tensor(20.0), "exp_avg": torch.from_numpy(moment_hf[0][k].copy()),
                         "exp_avg_sq": torch.from_numpy(moment_hf[1][k].copy())}
        p.grad = torch.from_numpy(grads_hf[k])
    torch.nn.utils.clip_grad_norm_(list(tparams.values()), 1.0)
    topt.step()
    for k, p in tparams.items():
        theirs = p.detach().numpy()
        np.testing.assert_allclose(ours[k], theirs, rtol=2e-6, atol=1e-8, err_msg=k)
        moved = np.abs(theirs - master_hf[k]).max()
        assert moved > 1e-6, k  # the step did move every tensor


def _rank_slice(key, full, tp, rank):
    """The part of a merged (HF-layout) tensor that NeoX TP rank ``rank`` holds for NeoX key ``key``."""
    if _is_replicated(key):
        return full
    dim = 1 if key in ("attention.dense.weight", "mlp.dense_4h_to_h.weight") else 0
    return torch.chunk(full, tp, dim)[rank]


def _neox_keys(L):
    """(pipeline idx, NeoX key, HF key) of every tensor (v1 names)."""
    out = [(0, "word_embeddings.weight", "gpt_neox.embed_in.weight")]
    out += [(i + 2, k, f"gpt_neox.layers.{i}.{k}") for i in range(L) for k in LAYER_KEYS_V1]
    out += [(L + 3, "norm.weight", "gpt_neox.final_layer_norm.weight"),
            (L + 3, "norm.bias", "gpt_neox.final_layer_norm.bias"),
            (L + 4, "final_linear.weight", "embed_out.weight")]
    return out


def test_zero_tp2_continuation_is_exact_with_row_parallel_bias_copies(tmp_path):
    """TP 2, parallel residual: one JAX step from the imported state equals GPT-NeoX's step, simulated
    rank by rank with torch AdamW (each rank updates its own copy of the row-parallel biases, whose
    sum is the model's bias) and merged with the converter's rules."""
    import jax

    from pythia_jax.train.optimizer import build_optimizer, neox_lr

    tp, L = 2, 2
    step_dir, master, moments = build_zero(tmp_path, tp=tp, dp=2, form="torch", step=20,
                                           replicated_moments_equal=True)
    config, _, ckpt = neox.read_neox_checkpoint(step_dir)
    assert config.use_parallel_residual
    params, opt_state, _, meta = continuation.neox_train_state(ckpt, config)
    settings = neox.optimizer_settings(ckpt.yml, ckpt.tp)
    assert settings["row_parallel_bias_copies"] == 2 and meta["optimizer"]["row_parallel_bias_copies"] == 2

    rng = np.random.default_rng(1)
    grads_hf = {k: (rng.standard_normal(v.shape) * 0.3).astype(np.float32)
                for k, v in hfc.params_to_hf_state_dict(config, params).items()}
    grads = jax.tree.map(np.asarray, hfc.hf_state_dict_to_params(config, grads_hf))

    def jax_step(copies):
        opt = build_optimizer(**{**settings, "row_parallel_bias_copies": copies})
        with jax.default_matmul_precision("highest"):
            updates, _ = jax.jit(opt.update)(grads, opt_state, params)
        return hfc.params_to_hf_state_dict(config, jax.tree.map(lambda p, u: np.asarray(p + u), params, updates))

    # GPT-NeoX: the global norm counts every tensor once (replicated ones on rank 0 only) ...
    norm = float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads_hf.values())))
    coef = min(1.0, 1.0 / (norm + 1e-6))
    lr = neox_lr(20, 0.001, 0.0001, 10, 1000)
    per_rank = {}
    for r in range(tp):  # ... then every rank steps its own tensors with the same AdamW
        tparams, decay, no_decay = {}, [], []
        for idx, key, _hf_key in _neox_keys(L):
            p = torch.nn.Parameter(master[r][idx][key].clone().float())
            tparams[(idx, key)] = p
            (decay if _is_decayed(key) else no_decay).append(p)
        topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=lr, betas=(0.9, 0.95), eps=1e-8)
        for idx, key, hf_key in _neox_keys(L):
            p = tparams[(idx, key)]
            m, v = moments[r][(idx, key)]
            topt.state[p] = {"step": torch.tensor(20.0), "exp_avg": m.clone().float(), "exp_avg_sq": v.clone().float()}
            full = torch.from_numpy(grads_hf[hf_key]) * coef
            p.grad = _rank_slice(key, full, tp, r).contiguous().clone()
        topt.step()
        per_rank[r] = {ik: p.detach() for ik, p in tparams.items()}
    theirs = _merged(per_rank, L, "sum")

    ours = jax_step(2)
    for k in theirs:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=2e-6, atol=1e-7, err_msg=k)
    # without the copies the summed biases move half as far as NeoX moved them
    plain = jax_step(1)
    start = hfc.params_to_hf_state_dict(config, params)
    bias = "gpt_neox.layers.0.attention.dense.bias"
    np.testing.assert_allclose(theirs[bias] - start[bias], 2 * (plain[bias] - start[bias]), rtol=0, atol=5e-7)
    assert not np.allclose(plain[bias], theirs[bias], rtol=1e-6, atol=1e-9)


def test_zero_bad_shards(tmp_path):
    step_dir, _, _ = build_zero(tmp_path, tp=1, dp=2)
    os.remove(os.path.join(step_dir, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    config, _, ckpt = neox.read_neox_checkpoint(step_dir)
    with pytest.raises(CheckpointError, match="partition_count is 2 but 1"):
        neox.read_neox_optimizer_state(ckpt, config)


# ------------------------------------------------------------------ jax -> NeoX
def _random_tree(config, rng):
    tree = {}
    for path, shape in hfc.param_shapes(config).items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = (rng.standard_normal(shape) * 0.3).astype(np.float32)
    return tree


@pytest.mark.parametrize("config", [
    ModelConfig(vocab_size=50304, hidden_size=16, num_layers=2, num_heads=2, hidden_act="gelu_new"),
    ModelConfig(vocab_size=50400, hidden_size=24, num_layers=3, num_heads=3, use_parallel_residual=False,
                rotary_pct=0.5, rotary_emb_base=20000.0, layer_norm_eps=1e-6),
])
def test_jax_to_neox_round_trip_and_reference_converter(tmp_path, config):
    import yaml

    params = _random_tree(config, np.random.default_rng(0))
    step_dir = neox.write_neox_checkpoint(config, params, tmp_path / "nx", step=1000)
    assert step_dir == str(tmp_path / "nx" / "global_step1000")
    assert (tmp_path / "nx" / "latest").read_text() == "global_step1000"
    # JAX -> NeoX -> JAX is bit-identical, config included
    config2, params2, ckpt = neox.read_neox_checkpoint(tmp_path / "nx")
    assert ckpt.layout == "pipeline" and ckpt.tp == 1 and ckpt.step == 1000
    assert config2.replace(name=config.name) == config
    ours = hfc.params_to_hf_state_dict(config, params)
    back = hfc.params_to_hf_state_dict(config2, params2)
    for k in ours:
        assert np.array_equal(ours[k], back[k]), k
    # GPT-NeoX's own HF converter semantics read the same model from these files and this yml
    (yml_file,) = [os.path.join(step_dir, "configs", n) for n in os.listdir(os.path.join(step_dir, "configs"))]
    with open(yml_file) as f:
        yml = yaml.full_load(f)
    ref, ref_cfg = reference_neox_to_hf(step_dir, yml)
    assert_same_state(ours, ref)
    assert ref_cfg["rotary_pct"] == config.rotary_pct and ref_cfg["rotary_emb_base"] == config.rotary_emb_base
    assert ref_cfg["use_parallel_residual"] == config.use_parallel_residual
    assert ref_cfg["layer_norm_eps"] == config.layer_norm_eps
    # the converter derives the vocabulary from the tokenizer: 50,277 padded to a multiple of
    # make-vocab-size-divisible-by × model-parallel-size; it must give our vocab size
    multiple = yml["make-vocab-size-divisible-by"] * yml["model-parallel-size"]
    assert -(-50277 // multiple) * multiple == config.vocab_size
    assert os.path.isfile(yml["vocab-file"])
    # layer files hold what NeoX's modules hold (rotary inv_freq buffer included)
    layer = torch.load(os.path.join(step_dir, "layer_02-model_00-model_states.pt"), weights_only=True)
    rd = config.rotary_ndims
    np.testing.assert_allclose(layer["attention.rotary_emb.inv_freq"].numpy(),
                               1.0 / config.rotary_emb_base ** (np.arange(0, rd, 2) / rd), rtol=1e-6)


# ------------------------------------------------------------------ the CLI
def cli(*argv):
    from pythia_jax.cli import main
    return main(["convert", *map(str, argv), "--no-progress"])


@pytest.mark.parametrize("direction, flags, message", [
    ("hf-to-jax", ["--hidden-act", "gelu_new"], "--hidden-act does not apply to hf-to-jax (the activation is "
                                               "config.json's hidden_act); it applies to neox-to-jax"),
    ("jax-to-hf", ["--hidden-act", "gelu_new"], "--hidden-act does not apply to jax-to-hf; it applies to neox-to-jax"),
    ("hf-to-jax", ["--shard-size", "1GB"], "--shard-size does not apply to hf-to-jax; it applies to jax-to-hf"),
    ("jax-to-neox", ["--shard-size", "1GB"], "--shard-size does not apply to jax-to-neox; it applies to jax-to-hf"),
    ("hf-to-jax", ["--neox-config", "x.yml"], "--neox-config does not apply to hf-to-jax; it applies to neox-to-jax"),
    ("hf-to-jax", ["--no-optimizer"], "--no-optimizer does not apply to hf-to-jax; it applies to neox-to-jax"),
    ("jax-to-hf", ["--with-optimizer"], "--with-optimizer does not apply to jax-to-hf; it applies to hf-to-jax, "
                                        "neox-to-jax"),
    ("neox-to-jax", ["--all-steps"], "--all-steps does not apply to neox-to-jax; it applies to jax-to-hf"),
    ("neox-to-jax", ["--dtype", "float16"], "--dtype does not apply to neox-to-jax (it stores the module weights"),
    ("jax-to-hf", ["--shard-size", "10XB"], "--shard-size: cannot parse size '10XB'"),
    ("jax-to-hf", ["--shard-size", "0"], "--shard-size: size must be positive"),
    ("neox-to-jax", ["--hidden-act", "relu"], "--hidden-act 'relu' is not a GELU flavour this model runs"),
])
def test_flags_that_do_not_apply_or_bad_values_are_refused_before_any_work(tmp_path, capsys, direction, flags,
                                                                            message):
    """Each direction-specific flag is refused for the other directions (one line naming the flag and
    the directions it applies to) and every value is parsed before the source is looked at: the
    source here does not exist, so any later check would give another error."""
    capsys.readouterr()
    assert cli(direction, tmp_path / "missing", tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_round_trips(tmp_path):
    import transformers
    from safetensors.numpy import load_file

    config = ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf_dict()))
    src = tmp_path / "step1000"
    model.save_pretrained(src)
    original = load_file(src / "model.safetensors")

    assert cli("hf-to-jax", src, tmp_path / "ck") == 0  # step taken from the folder name
    from pythia_jax.checkpoint import TrainCheckpointer, load_params
    cfg, params = load_params(tmp_path / "ck")
    assert cfg.vocab_size == 101
    assert TrainCheckpointer(tmp_path / "ck", save_steps=()).all_steps() == [1000]
    assert cli("jax-to-hf", tmp_path / "ck", tmp_path / "hf", "--dtype", "float32") == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(exported) == set(original)
    assert all(np.array_equal(exported[k], original[k]) for k in original)
    from pythia_jax.eval.loading import available_steps
    assert available_steps(tmp_path / "hf") == [1000]  # the step is recorded: eval reads it as step 1000

    assert cli("jax-to-neox", tmp_path / "ck", tmp_path / "nx") == 0
    assert cli("neox-to-jax", tmp_path / "nx", tmp_path / "ck2") == 0
    assert cli("jax-to-hf", tmp_path / "ck2", tmp_path / "all", "--all-steps", "--dtype", "float32") == 0
    assert os.listdir(tmp_path / "all") == ["step1000"]
    again = load_file(tmp_path / "all" / "step1000" / "model.safetensors")
    assert all(np.array_equal(again[k], original[k]) for k in original)

    # existing outputs are refused (one-line error, exit code 2 from the CLI), --overwrite replaces
    assert cli("jax-to-hf", tmp_path / "ck", tmp_path / "hf") != 0
    assert cli("jax-to-hf", tmp_path / "ck", tmp_path / "hf", "--overwrite") == 0
    assert load_file(tmp_path / "hf" / "model.safetensors")["embed_out.weight"].dtype == np.float16


def test_a_training_run_folder_is_a_checkpoint_source(tmp_path, capsys):
    """convert jax-to-hf / jax-to-neox, generate, pythia_jax.load and checkpoint.load_params take a
    training run's folder and read its checkpoints/ (one resolver, checkpoint.resolve_checkpoint_dir,
    as TrainConfig.init_from and eval do); a run folder without checkpoints says so in one line."""
    import transformers
    from safetensors.numpy import load_file

    import pythia_jax
    from pythia_jax.checkpoint import load_params, resolve_checkpoint_dir
    from pythia_jax.cli import main

    config = ModelConfig(vocab_size=50304, hidden_size=32, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf_dict())).save_pretrained(
        tmp_path / "hf")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert cli("hf-to-jax", tmp_path / "hf", run / "checkpoints", "--step", 7) == 0
    root, step = resolve_checkpoint_dir(run)
    assert os.fspath(root) == os.fspath(run / "checkpoints") and step is None

    assert cli("jax-to-hf", run, tmp_path / "out", "--dtype", "float32") == 0
    original = load_file(tmp_path / "hf" / "model.safetensors")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert all(np.array_equal(exported[k], original[k]) for k in original)
    assert cli("jax-to-neox", run, tmp_path / "nx") == 0
    assert cli("jax-to-hf", run, tmp_path / "all", "--all-steps") == 0
    assert os.listdir(tmp_path / "all") == ["step7"]
    _, a = load_params(run)
    logits = np.asarray(pythia_jax.load(run)(np.zeros((1, 3), np.int32)))
    assert logits.shape == (1, 3, 50304)
    np.testing.assert_array_equal(np.asarray(a["embed_in"]["embedding"]), original["gpt_neox.embed_in.weight"])
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Hello", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("Hello")

    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    assert cli("jax-to-hf", tmp_path / "fresh", tmp_path / "x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a training run folder whose checkpoints/ holds no checkpoint yet" in err[0]


def test_cli_hf_to_jax_with_fresh_optimizer(tmp_path):
    import transformers

    from pythia_jax.checkpoint import TrainCheckpointer
    from pythia_jax.train.optimizer import adam_moments, build_optimizer, schedule_count

    config = ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4)
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf_dict())).save_pretrained(tmp_path / "hf")
    assert cli("hf-to-jax", tmp_path / "hf", tmp_path / "ck", "--with-optimizer", "--step", 3000) == 0
    import jax

    from pythia_jax.model import abstract_params
    abstract = abstract_params(config)
    opt_abstract = jax.eval_shape(build_optimizer().init, abstract)
    with TrainCheckpointer(tmp_path / "ck", save_steps=()) as ck:
        restored = ck.restore(3000, {"params": abstract, "opt_state": opt_abstract})
    assert int(schedule_count(restored.opt_state)) == 3000
    mu, nu, count = adam_moments(restored.opt_state)
    assert int(count) == 0 and all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(mu))


def test_cli_neox_zero_to_train_state(tmp_path):
    import jax

    from pythia_jax.checkpoint import TrainCheckpointer
    from pythia_jax.model import abstract_params
    from pythia_jax.train.optimizer import adam_moments, build_optimizer, schedule_count

    step_dir, master, moments = build_zero(tmp_path, tp=2, dp=2, form="torch", step=5)
    assert cli("neox-to-jax", os.path.dirname(step_dir), tmp_path / "ck") == 0
    config, _, ckpt = neox.read_neox_checkpoint(step_dir)
    state = neox.read_neox_optimizer_state(ckpt, config)
    abstract = abstract_params(config)
    with TrainCheckpointer(tmp_path / "ck", save_steps=()) as ck:
        assert ck.all_steps() == [8]  # the iteration (3 skipped fp16 steps included)
        restored = ck.restore(8, {"params": abstract,
                                  "opt_state": jax.eval_shape(build_optimizer().init, abstract)})
    mu, nu, count = adam_moments(restored.opt_state)
    assert int(count) == 5 and int(schedule_count(restored.opt_state)) == 5
    for got, want in ((restored.params, state.master), (mu, state.exp_avg), (nu, state.exp_avg_sq)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), b)


def test_cli_bad_input_leaves_no_output(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli("hf-to-jax", tmp_path / "empty", tmp_path / "out") != 0
    assert cli("neox-to-jax", tmp_path / "empty", tmp_path / "out") != 0
    assert cli("jax-to-hf", tmp_path / "empty", tmp_path / "out") != 0
    err = capsys.readouterr().err
    assert "no config.json" in err and "no recognisable GPT-NeoX layout" in err
    assert "not a pythia-jax checkpoint" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_interrupted_neox_conversion_leaves_nothing(tmp_path, monkeypatch):
    step_dir, _, _ = build(tmp_path)
    real = torch.save
    calls = []

    def failing(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 3:
            raise RuntimeError("disk full (simulated)")
        return real(obj, f, *a, **k)

    config, params, _ = neox.read_neox_checkpoint(step_dir)
    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        neox.write_neox_checkpoint(config, params, tmp_path / "nx")
    assert not os.path.exists(tmp_path / "nx")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".nx")]


def _tiny_hf(tmp_path):
    import transformers

    config = ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf_dict())).save_pretrained(
        tmp_path / "hf")
    return tmp_path / "hf"


def test_ctrl_c_during_the_checkpoint_write_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the checkpoint is being written, with a writer thread still creating files after
    the main thread was interrupted (as Orbax's / tensorstore's threads do): the write is let
    finish, then the command stops (exit 130) and removes its temporary folder, so nothing is
    left. Before, the removal ran while the thread wrote and the temporary survived."""
    import signal
    import threading

    from pythia_jax.checkpoint.manager import TrainCheckpointer
    from pythia_jax.io_utils import outputs

    src = _tiny_hf(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    real_save, real_remove = TrainCheckpointer.save, outputs._remove
    removed = threading.Event()
    straggler: list[threading.Thread] = []

    def save(self, *args, **kwargs):
        result = real_save(self, *args, **kwargs)
        target = os.path.join(os.fspath(self.directory), "late", "params")

        def write_late():  # a write still in flight: it lands after the removal when that comes first
            removed.wait(timeout=1.0)
            os.makedirs(target, exist_ok=True)
            with open(os.path.join(target, "chunk"), "wb") as f:
                f.write(b"x")

        thread = threading.Thread(target=write_late)
        thread.start()
        straggler.append(thread)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the main thread waits for the writer
        thread.join()
        return result

    def remove(path):
        real_remove(path)
        removed.set()

    monkeypatch.setattr(TrainCheckpointer, "save", save)
    monkeypatch.setattr(outputs, "_remove", remove)
    assert cli("hf-to-jax", src, out / "ck") == 130
    straggler[0].join()
    assert os.listdir(out) == []
    assert "interrupted: finishing the checkpoint write" in capsys.readouterr().err


def test_a_ctrl_c_that_python_drops_still_stops_the_conversion(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt raised inside a garbage-collector callback or __del__ (JAX's
    _xla_gc_callback) is printed as 'Exception ignored' and dropped by Python; the conversion
    then went on and published its output. The CLI records the Ctrl-C: nothing is written, 130."""
    import signal

    from pythia_jax.convert import hf as hf_module

    src = _tiny_hf(tmp_path)
    real_read = hf_module.read_hf_dir

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside __del__

    def read(*args, **kwargs):
        result = real_read(*args, **kwargs)
        Finalised()  # collected at once: its KeyboardInterrupt is swallowed
        return result

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))  # "Exception ignored"
    monkeypatch.setattr(hf_module, "read_hf_dir", read)
    assert cli("hf-to-jax", src, tmp_path / "ck") == 130
    assert dropped == [KeyboardInterrupt]
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    assert "pythia-jax convert: interrupted" in capsys.readouterr().err


_SHARDED_RESTORE = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import pythia_jax
from pythia_jax.convert.hf import read_hf_dir
from pythia_jax.model import abstract_params, params_to_dict

src, ckpt = sys.argv[1], sys.argv[2]
config, want = read_hf_dir(src)
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
def spec(s):
    if len(s.shape) >= 2 and s.shape[-1] % 2 == 0:
        return NamedSharding(mesh, P(*([None] * (len(s.shape) - 1)), "model"))
    return NamedSharding(mesh, P())
shardings = jax.tree.map(spec, abstract_params(config))
model = pythia_jax.load(ckpt, shardings=shardings)
got = params_to_dict(model)
flat_got = jax.tree_util.tree_leaves_with_path(got)
flat_want = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(want))
n_sharded = 0
for path, arr in flat_got:
    w = flat_want[jax.tree_util.keystr(path)]
    assert arr.sharding.is_equivalent_to(spec(arr), arr.ndim), path
    for shard in arr.addressable_shards:  # every device holds exactly its slice
        np.testing.assert_array_equal(np.asarray(shard.data), w[shard.index])
        n_sharded += shard.data.shape != w.shape
assert n_sharded > 0
print("OK", len(flat_got))
"""


@pytest.mark.slow
def test_converted_checkpoint_restores_onto_a_mesh(tmp_path):
    """hf-to-jax output restored with per-device shardings (4 simulated CPU devices)."""
    import subprocess

    import transformers

    config = ModelConfig(vocab_size=104, hidden_size=32, num_layers=2, num_heads=4)
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf_dict())).save_pretrained(tmp_path / "hf")
    assert cli("hf-to-jax", tmp_path / "hf", tmp_path / "ck") == 0
    script = tmp_path / "restore.py"
    script.write_text(_SHARDED_RESTORE)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "hf"), str(tmp_path / "ck")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("OK")


def test_optimizer_settings_keep_annealing_lr_semantics():
    """warmup_iter = warmup · lr_decay_iters stays fractional; a yml without lr-decay-style gets
    GPT-NeoX's default, "linear" (NeoXArgs.lr_decay_style)."""
    yml = {"train-iters": 150, "warmup": 0.01, "optimizer": {"params": {"lr": 1e-3}}}
    s = neox.optimizer_settings(yml)
    assert s["warmup_steps"] == pytest.approx(1.5) and s["decay_style"] == "linear"
    s = neox.optimizer_settings({**yml, "lr-decay-style": "cosine"})
    assert s["decay_style"] == "cosine"


def test_all_steps_export_resumes_after_an_interruption(tmp_path, capsys, monkeypatch):
    """jax-to-hf --all-steps records in each step folder's config.json what it was written from;
    a rerun after an interruption writes only the missing steps (it refused: 'step0 already
    exists'), but a folder written from other weights or with other settings is still refused."""
    import json

    from pythia_jax.checkpoint import save_params_checkpoint
    from pythia_jax.cli import main
    from pythia_jax.convert import hf as hfc
    from pythia_jax.convert.hf import read_hf_dir

    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2)
    rng = np.random.default_rng(0)
    shapes = {k: v for k, v in hfc.param_shapes(cfg).items()}
    for step in (0, 5, 9):
        params = {}
        for path, shape in shapes.items():
            hfc.set_path(params, path, rng.standard_normal(shape).astype(np.float32))
        save_params_checkpoint(tmp_path / "ck", step, cfg, params)
    argv = ["convert", "jax-to-hf", str(tmp_path / "ck"), str(tmp_path / "out"), "--all-steps", "--no-progress"]

    real = hfc.write_hf_dir
    written = []

    def interrupted_after_one(*a, **k):
        if written:
            raise KeyboardInterrupt
        written.append(real(*a, **k))
        return written[-1]

    monkeypatch.setattr(hfc, "write_hf_dir", interrupted_after_one)
    assert main(argv) == 130
    monkeypatch.setattr(hfc, "write_hf_dir", real)
    assert sorted(os.listdir(tmp_path / "out")) == ["step0"]
    first = (tmp_path / "out" / "step0" / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0
    assert "1 of 3 step folders were already written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == ["step0", "step5", "step9"]
    assert (tmp_path / "out" / "step0" / "model.safetensors").stat().st_mtime_ns == first  # not rewritten
    record = json.loads((tmp_path / "out" / "step9" / "config.json").read_text())["pythia_jax_export"]
    assert record["step"] == 9 and record["dtype"] == "float16" and record["weights"].startswith("ckpt:")
    read_hf_dir(tmp_path / "out" / "step9")  # our reader accepts the record
    assert main(argv) == 0  # a finished export: nothing to do, said so (not "writing the other 0")
    assert "every step folder (3) was already written" in capsys.readouterr().err
    assert main(argv + ["--dtype", "float32"]) == 2  # other settings: refused, nothing replaced
    assert "step0 already exists" in capsys.readouterr().err


def test_neox_to_jax_takes_the_step_the_checkpoint_records(tmp_path, capsys, caplog):
    """A step folder not named global_stepN was written as step 0 (its LR schedule restarted) and
    --step was ignored; a renamed folder gave its new name's step without a word; a `latest`
    naming a missing folder was ignored silently."""
    import logging
    import shutil

    from pythia_jax.checkpoint import TrainCheckpointer, save_params_checkpoint
    from pythia_jax.convert import hf as hfc

    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2)
    rng = np.random.default_rng(0)
    params = {}
    for path, shape in hfc.param_shapes(cfg).items():
        hfc.set_path(params, path, rng.standard_normal(shape).astype(np.float32))
    save_params_checkpoint(tmp_path / "ck", 10, cfg, params)
    assert cli("jax-to-neox", tmp_path / "ck", tmp_path / "nx") == 0
    step_dir = next(p for p in (tmp_path / "nx").iterdir() if p.name.startswith("global_step"))
    assert step_dir.name == "global_step10"

    def steps(out):
        return TrainCheckpointer(out, save_steps=()).all_steps()

    shutil.copytree(step_dir, tmp_path / "mystep")
    assert cli("neox-to-jax", tmp_path / "mystep", tmp_path / "a") == 0 and steps(tmp_path / "a") == [10]
    assert cli("neox-to-jax", tmp_path / "mystep", tmp_path / "b", "--step", "3") == 2
    assert "records iteration 10, but --step 3 was asked for" in capsys.readouterr().err
    shutil.copytree(step_dir, tmp_path / "global_step15")
    with caplog.at_level(logging.WARNING):
        assert cli("neox-to-jax", tmp_path / "global_step15", tmp_path / "c") == 0
    assert steps(tmp_path / "c") == [10] and "records iteration 10, not the 15 of its name" in caplog.text
    (step_dir.parent / "latest").write_text("global_step30")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli("neox-to-jax", step_dir.parent, tmp_path / "d") == 0
    assert "latest names global_step30, which is not there" in caplog.text
    # the output head's file missing: said so (it blamed weight tying, which the yml rules out)
    shutil.copytree(step_dir, tmp_path / "nohead")
    head = max((tmp_path / "nohead").glob("layer_*-model_00-model_states.pt"))
    head.unlink()
    assert cli("neox-to-jax", tmp_path / "nohead", tmp_path / "e") == 2
    assert "the yml says no-weight-tying, so its layer file (after layer_" in capsys.readouterr().err
    # --overwrite of an output holding other steps says which go (they were dropped without a word)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli("neox-to-jax", tmp_path / "mystep", tmp_path / "a", "--overwrite") == 0
        assert cli("jax-to-neox", tmp_path / "ck", step_dir.parent, "--overwrite") == 0
    assert f"--overwrite: {tmp_path / 'a'} holds step(s) 10, which the converted step replaces" in caplog.text
    assert f"--overwrite: {step_dir.parent} holds step(s) 10" in caplog.text
