#!/usr/bin/env python
"""Training-step speed of pythia-jax against Hugging Face PyTorch, measured in the same run.

One step = forward + backward + gradient clipping + AdamW update (the Pythia recipe) on the same
model shape, batch and sequence length, with the same number of CPU threads.

    python scripts/bench_train.py                       # CPU: pythia-70m shape, seq 128, fp32
    python scripts/bench_train.py --model pythia-160m --seq 256 --batch 4
    python scripts/bench_train.py --gpu                 # GPU: pythia-410m and pythia-1.4b, seq 2048, bf16

CPU prints step time, tokens/s and the ratio PyTorch time / pythia-jax time (> 1: pythia-jax is
faster). GPU mode prints tokens/s, tokens/s/chip and MFU (model FLOPs as in
``pythia_jax.train.metrics``: 6·(params − V·H) + causal-halved attention, against the device's peak
dense bf16 FLOP/s) for both implementations (PyTorch: bf16 autocast, fp32 master weights, SDPA
attention, fused AdamW). Each measurement runs in its own process; the whole GPU run takes about 3 minutes on one H100.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------------------- JAX
def jax_stepper(model_name: str, batch: int, seq: int, dtype: str, remat: str = "none"):
    """(one_step() -> seconds, compile seconds) for the project's compiled train step."""
    import jax
    import numpy as np

    from pythia_jax.config import ModelConfig
    from pythia_jax.train.builder import build
    from pythia_jax.train.config import MeshConfig, OptimizerConfig, TrainConfig

    model = ModelConfig.preset(model_name, dtype=dtype, remat=remat)
    cfg = TrainConfig(model=model, mesh=MeshConfig(data=-1), num_steps=1000, global_batch=batch,
                      seq_length=seq, optimizer=OptimizerConfig(max_lr=1e-4, warmup_steps=0))
    t0 = time.perf_counter()
    setup = build(cfg, compile_eval=False)
    compile_s = time.perf_counter() - t0
    holder = {"state": setup.init_state()}
    rows = np.random.default_rng(0).integers(0, 50277, (batch, seq + 1)).astype(np.int32)
    batch_arrays = setup.put_batch({"inputs": rows[:, :-1], "labels": rows[:, 1:]})

    def one_step() -> float:
        t = time.perf_counter()
        holder["state"], metrics = setup.train_step(holder["state"], batch_arrays)
        loss = float(jax.block_until_ready(metrics["loss"]))
        assert np.isfinite(loss), loss
        return time.perf_counter() - t

    return one_step, compile_s


def jax_step_times(model_name: str, batch: int, seq: int, steps: int, warmup: int, dtype: str,
                   remat: str = "none") -> tuple[list[float], float]:
    """Seconds per step (after ``warmup`` untimed steps) and the compile time."""
    one_step, compile_s = jax_stepper(model_name, batch, seq, dtype, remat)
    times = [one_step() for _ in range(warmup + steps)][warmup:]
    return times, compile_s


# --------------------------------------------------------------------------------------- PyTorch
def torch_stepper(model_name: str, batch: int, seq: int, device: str, bf16: bool, checkpointing: bool = False):
    """one_step() -> seconds for HF GPTNeoXForCausalLM + clip_grad_norm_ + torch AdamW (masked decay)."""
    import numpy as np
    import torch
    import transformers

    from pythia_jax.config import ModelConfig

    config = ModelConfig.preset(model_name)
    hf_config = transformers.GPTNeoXConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    model = transformers.GPTNeoXForCausalLM(hf_config).to(device=device, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    decay = [p for n, p in model.named_parameters() if n.endswith(".weight") and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith(".weight") and "norm" not in n)]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")
    rows = torch.as_tensor(np.random.default_rng(0).integers(0, 50277, (batch, seq + 1)), device=device)
    inputs, labels = rows[:, :-1], rows[:, 1:]

    def one_step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if device == "cuda":
            torch.cuda.synchronize()
        else:
            loss.item()
        return time.perf_counter() - t

    return one_step


def torch_step_times(model_name: str, batch: int, seq: int, steps: int, warmup: int, device: str,
                     bf16: bool, checkpointing: bool = False) -> list[float]:
    one_step = torch_stepper(model_name, batch, seq, device, bf16, checkpointing)
    return [one_step() for _ in range(warmup + steps)][warmup:]


# ------------------------------------------------------------------------------------------ modes
def run_cpu(args) -> None:
    """Both implementations built first, then their steps interleaved (jax, torch, jax, …) so that
    load from other processes on a shared machine hits both alike; min and median reported."""
    import jax
    import torch

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    tokens = args.batch * args.seq
    print(f"CPU: {args.model} shape, batch {args.batch} x seq {args.seq} = {tokens} tokens/step, fp32, "
          f"{threads} threads (torch.set_num_threads; XLA uses all {os.cpu_count()} cores), "
          f"{args.steps} timed steps each after {args.warmup} warm-up, interleaved\n", flush=True)
    jax_step, compile_s = jax_stepper(args.model, args.batch, args.seq, "float32")
    torch_step = torch_stepper(args.model, args.batch, args.seq, "cpu", bf16=False)
    for _ in range(args.warmup):
        jax_step(), torch_step()
    jt, tt = [], []
    for _ in range(args.steps):
        jt.append(jax_step())
        tt.append(torch_step())
    j, t = statistics.median(jt), statistics.median(tt)
    print(f"{'implementation':28s} {'median s':>9s} {'min s':>8s} {'tokens/s':>10s}")
    print(f"{'pythia-jax (jax ' + jax.__version__ + ')':28s} {j:9.3f} {min(jt):8.3f} {tokens / j:10.0f}")
    label = f"HF PyTorch (torch {torch.__version__.split('+')[0]})"
    print(f"{label:28s} {t:9.3f} {min(tt):8.3f} {tokens / t:10.0f}")
    print(f"\nratio PyTorch / pythia-jax step time: median {t / j:.2f}, min {min(tt) / min(jt):.2f}  "
          f"(> 1 means pythia-jax is faster); pythia-jax compile {compile_s:.1f} s (once)")


GPU_CASES = (  # model, global batch (seq 2048), remat of pythia-jax
    ("pythia-410m", 16, "dots_with_no_batch_dims_saveable"),
    ("pythia-1.4b", 8, "dots_with_no_batch_dims_saveable"),
)


def gpu_case(args) -> None:
    """One GPU measurement in this (fresh) process: prints ``CASE {json}``."""
    import json

    impl, name, batch, remat = args.case.split(":")
    batch, seq = int(batch), 2048
    out = {"impl": impl, "model": name, "batch": batch, "remat": remat, "note": ""}
    try:
        if impl == "jax":
            times, compile_s = jax_step_times(name, batch, seq, args.steps, args.warmup, "bfloat16", remat)
            out["note"] = f"compile {compile_s:.0f}s"
        else:
            try:
                times = torch_step_times(name, batch, seq, args.steps, args.warmup, "cuda", bf16=True)
            except Exception as e:  # noqa: BLE001 - out of memory: retry with activation checkpointing
                if "out of memory" not in str(e).lower():
                    raise
                import torch
                torch.cuda.empty_cache()
                times = torch_step_times(name, batch, seq, args.steps, args.warmup, "cuda", bf16=True,
                                         checkpointing=True)
                out["remat"] = "full"
                out["note"] = "gradient checkpointing (OOM without)"
        out["step_s"] = statistics.median(times)
    except Exception as e:  # noqa: BLE001 - report and go on
        out["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
    print("CASE " + json.dumps(out), flush=True)


def run_gpu(args) -> None:
    """Every (implementation, model) in its own process: JAX preallocates GPU memory, and one
    framework's cached memory must not starve the other."""
    import json
    import subprocess

    child_env = dict(os.environ)
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this parent only asks for the device kind
    import jax

    from pythia_jax.config import ModelConfig
    from pythia_jax.train.metrics import flops_per_token, peak_flops_per_device

    devices = jax.devices()
    n = len(devices)
    peak = peak_flops_per_device(args.peak_flops, devices[0])
    if peak is None:
        raise SystemExit(f"no peak FLOP/s known for {devices[0].device_kind}; pass --peak_flops")
    seq = 2048
    print(f"GPU: {n} x {devices[0].device_kind}, peak {peak / 1e12:.0f} TFLOP/s bf16 per chip, seq {seq}, "
          f"bf16 compute with fp32 master weights, median of {args.steps} steps after {args.warmup} warm-up\n",
          flush=True)
    rows = []
    for name, batch, remat in GPU_CASES:
        for impl in ("jax",) + (() if args.no_torch else ("torch",)):
            case = f"{impl}:{name}:{batch}:{remat if impl == 'jax' else 'none'}"
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", case,
                                   "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                  capture_output=True, text=True, env=child_env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("CASE ")]
            if not lines:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                res = {"impl": impl, "model": name, "batch": batch, "remat": remat, "note": f"crashed: {tail[:90]}"}
            else:
                res = json.loads(lines[-1][5:])
            fpt = flops_per_token(ModelConfig.preset(name), seq)
            if res.get("step_s"):
                tps = batch * seq / res["step_s"]
                res.update(tokens_s=tps, tokens_s_chip=tps / n, mfu=tps * fpt / (n * peak))
            rows.append(res)
            print(res, flush=True)
    label = {"jax": "pythia-jax", "torch": "HF PyTorch"}
    print(f"\n{'implementation / model':26s} {'batch':>5s} {'remat':>10s} {'step s':>7s} {'tokens/s':>9s} "
          f"{'tok/s/chip':>10s} {'MFU':>6s}  note")
    for r in rows:
        head = f"{label[r['impl']] + ' ' + r['model']:26s} {r['batch']:5d} {r['remat'][:10]:>10s}"
        if r.get("step_s"):
            print(f"{head} {r['step_s']:7.3f} {r['tokens_s']:9.0f} {r['tokens_s_chip']:10.0f} "
                  f"{r['mfu']:6.1%}  {r['note']}")
        else:
            print(f"{head} {'-':>7s} {'-':>9s} {'-':>10s} {'-':>6s}  {r['note']}")
    for name, *_ in GPU_CASES:
        ours = next((r for r in rows if r["impl"] == "jax" and r["model"] == name and r.get("step_s")), None)
        theirs = next((r for r in rows if r["impl"] == "torch" and r["model"] == name and r.get("step_s")), None)
        if ours and theirs:
            print(f"{name}: pythia-jax / HF PyTorch tokens/s = {ours['tokens_s'] / theirs['tokens_s']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="GPU mode: pythia-410m and pythia-1.4b at seq 2048, bf16")
    p.add_argument("--model", default="pythia-70m", help="CPU mode: preset shape (default pythia-70m)")
    p.add_argument("--seq", type=int, default=128, help="CPU mode: sequence length (default 128)")
    p.add_argument("--batch", type=int, default=8, help="CPU mode: batch size (default 8)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (default: all cores)")
    p.add_argument("--peak_flops", type=float, default=None, help="GPU mode: peak FLOP/s per chip override")
    p.add_argument("--no_torch", action="store_true", help="GPU mode: skip the PyTorch peer")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one GPU measurement
    args = p.parse_args()
    if args.case:
        gpu_case(args)
    elif args.gpu:
        run_gpu(args)
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        run_cpu(args)


if __name__ == "__main__":
    main()
