#!/usr/bin/env python
"""Training-step speed of pythia-jax against Hugging Face PyTorch, measured in the same run.

One step = forward + backward + gradient clipping + AdamW update (the Pythia recipe) on the same
model shape, batch and sequence length, with the same number of CPU threads.

    python scripts/bench_train.py                       # CPU: pythia-70m shape, seq 128, fp32
    python scripts/bench_train.py --model pythia-160m --seq 256 --batch 4
    python scripts/bench_train.py --model pythia-160m --seq 256 --batch 4 --separate 2   # each side in its own process
    python scripts/bench_train.py --model pythia-410m --seq 256 --batch 2 --layers scan \
        --remat dots_saveable --separate 2                # the fastest CPU setting, each side alone
    python scripts/bench_train.py --gpu                 # GPU: pythia-410m and pythia-1.4b, seq 2048, bf16
    python scripts/bench_train.py --gpu --quick         # GPU: one setting per model (estimated ~4 minutes)

CPU prints step time, tokens/s and the ratio PyTorch time / pythia-jax time (> 1: pythia-jax is
faster), for pythia-jax with its default layer scan and with ``scan_layers=False``
(unrolled). GPU mode prints tokens/s, tokens/s/chip and MFU (model FLOPs as in
``pythia_jax.train.metrics``: 6·(params − V·H) + causal-halved attention, against the device's peak
dense bf16 FLOP/s) for both implementations (PyTorch: bf16 autocast, fp32 master weights, SDPA
attention, fused AdamW) and the peak per-device memory. pythia-jax runs with cuDNN flash attention
inside the step and sweeps the remat policy, micro-batches, the chunked loss (``loss_chunk``) and an
XLA flag set (``GPU_CASES``). Each measurement runs in its own process; the full sweep takes about
10 minutes on one H100, ``--quick`` about 4 (estimates: the GPU mode has not been run yet).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------------------- JAX
def jax_stepper(model_name: str, batch: int, seq: int, dtype: str, remat: str = "none",
                loss_chunk: int = 0, micro_batches: int = 1, attention: str = "auto",
                scan_layers: bool = True):
    """(one_step() -> seconds, compile seconds) for the project's compiled train step."""
    import jax
    import numpy as np

    from pythia_jax.config import ModelConfig
    from pythia_jax.train.builder import build
    from pythia_jax.train.config import MeshConfig, OptimizerConfig, TrainConfig

    model = ModelConfig.preset(model_name, dtype=dtype, remat=remat, loss_chunk=loss_chunk,
                               attention=attention, scan_layers=scan_layers)
    cfg = TrainConfig(model=model, mesh=MeshConfig(data=-1), num_steps=1000, global_batch=batch,
                      seq_length=seq, micro_batches=micro_batches,
                      optimizer=OptimizerConfig(max_lr=1e-4, warmup_steps=0))
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
                   remat: str = "none", **options) -> tuple[list[float], float]:
    """Seconds per step (after ``warmup`` untimed steps) and the compile time; ``options``:
    loss_chunk, micro_batches, attention (see ``jax_stepper``)."""
    one_step, compile_s = jax_stepper(model_name, batch, seq, dtype, remat, **options)
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
    """Both implementations built first, then their steps interleaved (jax, jax unrolled, torch,
    …) so that load from other processes on a shared machine hits all alike; min and median
    reported. pythia-jax runs twice: with the default layer scan and with ``scan_layers=False``
    (the layers unrolled; longer compile, no stacked activation buffers)."""
    import jax
    import torch

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    tokens = args.batch * args.seq
    print(f"CPU: {args.model} shape, batch {args.batch} x seq {args.seq} = {tokens} tokens/step, fp32, "
          f"pythia-jax remat {args.remat!r}, {threads} threads (torch.set_num_threads; "
          f"XLA uses all {os.cpu_count()} cores), "
          f"{args.steps} timed steps each after {args.warmup} warm-up, interleaved; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}\n", flush=True)
    steppers = {}
    compile_s = {}
    layouts = {"scan": True, "unrolled": False}
    labels = list(layouts) if args.layers == "both" else [args.layers]
    for label in labels:
        scan = layouts[label]
        steppers[f"pythia-jax, {label}"], compile_s[label] = jax_stepper(
            args.model, args.batch, args.seq, "float32", remat=args.remat, scan_layers=scan)
    torch_label = f"HF PyTorch (torch {torch.__version__.split('+')[0]})"
    steppers[torch_label] = torch_stepper(args.model, args.batch, args.seq, "cpu", bf16=False)
    for _ in range(args.warmup):
        for step in steppers.values():
            step()
    times = {name: [] for name in steppers}
    for _ in range(args.steps):
        for name, step in steppers.items():
            times[name].append(step())
    print(f"{'implementation (jax ' + jax.__version__ + ')':30s} {'median s':>9s} {'min s':>8s} {'tokens/s':>10s}")
    for name, ts in times.items():
        print(f"{name:30s} {statistics.median(ts):9.3f} {min(ts):8.3f} {tokens / statistics.median(ts):10.0f}")
    t = times[torch_label]
    print()
    for label in labels:
        j = times[f"pythia-jax, {label}"]
        ratio = statistics.median(t) / statistics.median(j)
        print(f"ratio PyTorch / pythia-jax ({label}) step time: median {ratio:.2f}, "
              f"min {min(t) / min(j):.2f}  (> 1 means pythia-jax is faster); compile {compile_s[label]:.1f} s (once)")


def cpu_case(args) -> None:
    """One CPU measurement in this (fresh) process: ``--case cpu:jax:scan|unrolled`` or
    ``cpu:torch``; prints ``CASE {json}`` with the median and min step time, and the minor page
    faults and system CPU seconds per timed step (``getrusage``)."""
    import json
    import resource

    _, impl, *layout = args.case.split(":")
    threads = args.threads or os.cpu_count()
    if impl == "jax":
        one_step, _ = jax_stepper(args.model, args.batch, args.seq, "float32", remat=args.remat,
                                  scan_layers=layout[0] == "scan")
    else:
        import torch

        torch.set_num_threads(threads)
        one_step = torch_stepper(args.model, args.batch, args.seq, "cpu", bf16=False)
    for _ in range(args.warmup):
        one_step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = [one_step() for _ in range(args.steps)]
    after = resource.getrusage(resource.RUSAGE_SELF)
    print("CASE " + json.dumps({
        "median": statistics.median(times), "min": min(times),
        "faults": (after.ru_minflt - before.ru_minflt) / args.steps,
        "sys_s": (after.ru_stime - before.ru_stime) / args.steps}), flush=True)


def _case_env(case: str) -> dict[str, str]:
    """Each side's environment as its users run it: pythia-jax with what the ``pythia-jax`` command
    sets at start-up (``pythia_jax.process_env``), PyTorch without it (the tunable slows PyTorch's
    step down: 160m alone, 5.8 s against 5.4 s)."""
    from pythia_jax.process_env import without_huge_pages

    env = without_huge_pages(os.environ) if case == "cpu:torch" else dict(os.environ)
    return dict(env, JAX_PLATFORMS="cpu")


def run_cpu_separate(args) -> None:
    """Each implementation in its own fresh process, alternating for ``--separate`` rounds: in one
    process the two frameworks slow each other down (measured: both sides 10-25% slower at 160m
    than alone, whether or not a pause separates their steps)."""
    import json
    import subprocess

    layouts = ["scan", "unrolled"] if args.layers == "both" else [args.layers]
    labels = [f"pythia-jax, {lay}" for lay in layouts] + ["HF PyTorch"]
    cases = [f"cpu:jax:{lay}" for lay in layouts] + ["cpu:torch"]
    print(f"CPU: {args.model} shape, batch {args.batch} x seq {args.seq}, fp32, pythia-jax remat "
          f"{args.remat!r}; each side in its own process, {args.separate} alternating rounds of "
          f"{args.steps} timed steps after {args.warmup} warm-up; GLIBC_TUNABLES pythia-jax "
          f"{_case_env('cpu:jax').get('GLIBC_TUNABLES', '')!r}, PyTorch "
          f"{_case_env('cpu:torch').get('GLIBC_TUNABLES', '')!r}\n", flush=True)
    results: dict[str, list[dict]] = {label: [] for label in labels}
    for _ in range(args.separate):
        for label, case in zip(labels, cases):
            cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--model", args.model,
                   "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--remat", args.remat, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_case_env(case))
            line = [x for x in proc.stdout.splitlines() if x.startswith("CASE ")]
            if proc.returncode or not line:
                raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
            results[label].append(json.loads(line[-1][5:]))
    tokens = args.batch * args.seq
    print(f"{'implementation':30s} {'median s':>9s} {'min s':>8s} {'tokens/s':>10s} "
          f"{'faults/step':>12s} {'sys s/step':>11s}")
    for label, rows in results.items():
        med = statistics.median(r["median"] for r in rows)
        faults, sys_s = (statistics.median(r[k] for r in rows) for k in ("faults", "sys_s"))
        print(f"{label:30s} {med:9.3f} {min(r['min'] for r in rows):8.3f} {tokens / med:10.0f} "
              f"{faults:12.0f} {sys_s:11.2f}")
    theirs = [r["median"] for r in results["HF PyTorch"]]
    print()
    for lay in layouts:
        ours = [r["median"] for r in results[f"pythia-jax, {lay}"]]
        per_round = [t / o for t, o in zip(theirs, ours)]
        print(f"ratio PyTorch / pythia-jax ({lay}) step time: median of process medians "
              f"{statistics.median(theirs) / statistics.median(ours):.2f}, per round "
              f"{', '.join(f'{r:.2f}' for r in per_round)}  (> 1 means pythia-jax is faster)")


# Accelerator sweep (prepared for issue 14, item 4). Each row: model, global batch (seq 2048),
# remat policy, micro-batches, loss_chunk (0 = whole [B, T, V] float32 logits), XLA flag set.
# The chunked loss keeps at most B·chunk·V float32 logits alive (B·512·50k·4 B = 1.6 GiB at B=16
# instead of 6.6 GiB), which is what lets the cheaper remat policies fit.
XLA_FLAG_SETS = {
    "default": "",
    # latency-hiding scheduler + async collectives do not matter on one chip; these do: fewer,
    # larger fusions with cuBLAS(Lt) GEMMs instead of Triton GEMMs for the bf16 matmuls
    "tuned": "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_command_buffer= "
             "--xla_gpu_enable_latency_hiding_scheduler=true",
}
GPU_CASES = (
    # model,        batch, remat,                               micro, loss_chunk, flags
    ("pythia-410m", 16, "dots_with_no_batch_dims_saveable", 1, 0, "default"),   # the earlier setting
    ("pythia-410m", 16, "dots_with_no_batch_dims_saveable", 1, 512, "default"),
    ("pythia-410m", 16, "none", 1, 512, "default"),
    ("pythia-410m", 16, "none", 2, 512, "tuned"),
    ("pythia-1.4b", 8, "dots_with_no_batch_dims_saveable", 1, 0, "default"),    # the earlier setting
    ("pythia-1.4b", 8, "dots_with_no_batch_dims_saveable", 1, 512, "default"),
    ("pythia-1.4b", 8, "dots_saveable", 1, 512, "tuned"),
    ("pythia-1.4b", 16, "dots_with_no_batch_dims_saveable", 2, 512, "tuned"),
)
QUICK_CASES = (GPU_CASES[1], GPU_CASES[5])  # --quick: one setting per model


def gpu_case(args) -> None:
    """One GPU measurement in this (fresh) process: prints ``CASE {json}``."""
    import json

    impl, name, batch, remat, micro, chunk, flags = args.case.split(":")
    batch, micro, chunk, seq = int(batch), int(micro), int(chunk), 2048
    out = {"impl": impl, "model": name, "batch": batch, "remat": remat, "micro": micro,
           "loss_chunk": chunk, "flags": flags, "note": ""}
    try:
        if impl == "jax":
            import jax

            # cuDNN flash attention inside the train step: named explicitly, so that a fallback
            # to XLA attention is an error here rather than a silent slowdown
            times, compile_s = jax_step_times(name, batch, seq, args.steps, args.warmup, "bfloat16", remat,
                                              loss_chunk=chunk, micro_batches=micro, attention="cudnn")
            stats = jax.devices()[0].memory_stats() or {}
            out["peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2 ** 30
            out["note"] = f"compile {compile_s:.0f}s"
        else:
            import torch

            try:
                times = torch_step_times(name, batch, seq, args.steps, args.warmup, "cuda", bf16=True)
            except Exception as e:  # noqa: BLE001 - out of memory: retry with activation checkpointing
                if "out of memory" not in str(e).lower():
                    raise
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                times = torch_step_times(name, batch, seq, args.steps, args.warmup, "cuda", bf16=True,
                                         checkpointing=True)
                out["remat"] = "full"
                out["note"] = "gradient checkpointing (OOM without)"
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out["step_s"] = statistics.median(times)
    except Exception as e:  # noqa: BLE001 - report and go on
        out["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
    print("CASE " + json.dumps(out), flush=True)


def run_gpu(args) -> None:
    """Every (implementation, setting) in its own process: JAX preallocates GPU memory, and one
    framework's cached memory must not starve the other. Prints tokens/s, MFU and the peak
    per-device memory of every setting, then the best pythia-jax setting per model against HF."""
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
    cases = QUICK_CASES if args.quick else GPU_CASES
    print(f"GPU: {n} x {devices[0].device_kind}, peak {peak / 1e12:.0f} TFLOP/s bf16 per chip, seq {seq}, "
          f"bf16 compute with fp32 master weights, median of {args.steps} steps after {args.warmup} warm-up, "
          f"{len(cases)} pythia-jax settings\n", flush=True)
    runs = [("jax",) + c for c in cases]
    if not args.no_torch:
        for name in dict.fromkeys(c[0] for c in cases):
            batch = next(c[1] for c in cases if c[0] == name)
            runs.append(("torch", name, batch, "none", 1, 0, "default"))
    rows = []
    for impl, name, batch, remat, micro, chunk, flags in runs:
        env = dict(child_env)
        if impl == "jax" and XLA_FLAG_SETS[flags]:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_FLAG_SETS[flags]).strip()
        case = f"{impl}:{name}:{batch}:{remat}:{micro}:{chunk}:{flags}"
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", case,
                                   "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                  capture_output=True, text=True, env=env, timeout=args.case_timeout)
            stdout, stderr = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            stdout, stderr = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
                f"timed out after {args.case_timeout}s"
        lines = [line for line in stdout.splitlines() if line.startswith("CASE ")]
        if not lines:
            tail = (stderr.strip().splitlines() or ["no output"])[-1]
            res = {"impl": impl, "model": name, "batch": batch, "remat": remat, "micro": micro,
                   "loss_chunk": chunk, "flags": flags, "note": f"crashed: {tail[:90]}"}
        else:
            res = json.loads(lines[-1][5:])
        fpt = flops_per_token(ModelConfig.preset(name), seq)
        if res.get("step_s"):
            tps = batch * seq / res["step_s"]
            res.update(tokens_s=tps, tokens_s_chip=tps / n, mfu=tps * fpt / (n * peak))
        rows.append(res)
        print(res, flush=True)
    label = {"jax": "pythia-jax", "torch": "HF PyTorch"}
    print(f"\n{'implementation / model':26s} {'batch':>5s} {'remat':>12s} {'mb':>2s} {'chunk':>5s} {'flags':>7s} "
          f"{'step s':>7s} {'tokens/s':>9s} {'tok/s/chip':>10s} {'MFU':>6s} {'peak GiB':>8s}  note")
    for r in rows:
        head = (f"{label[r['impl']] + ' ' + r['model']:26s} {r['batch']:5d} {r['remat'][:12]:>12s} "
                f"{r['micro']:2d} {r['loss_chunk']:5d} {r['flags'][:7]:>7s}")
        if r.get("step_s"):
            print(f"{head} {r['step_s']:7.3f} {r['tokens_s']:9.0f} {r['tokens_s_chip']:10.0f} {r['mfu']:6.1%} "
                  f"{r.get('peak_gib', 0):8.1f}  {r['note']}")
        else:
            print(f"{head} {'-':>7s} {'-':>9s} {'-':>10s} {'-':>6s} {'-':>8s}  {r['note']}")
    for name in dict.fromkeys(c[0] for c in cases):
        ours = [r for r in rows if r["impl"] == "jax" and r["model"] == name and r.get("step_s")]
        theirs = next((r for r in rows if r["impl"] == "torch" and r["model"] == name and r.get("step_s")), None)
        if ours:
            best = max(ours, key=lambda r: r["mfu"])
            vs = f", {best['tokens_s'] / theirs['tokens_s']:.2f}x HF PyTorch tokens/s" if theirs else ""
            print(f"{name}: best pythia-jax MFU {best['mfu']:.1%} (batch {best['batch']}, remat {best['remat']}, "
                  f"micro {best['micro']}, loss_chunk {best['loss_chunk']}, flags {best['flags']}, "
                  f"peak {best.get('peak_gib', 0):.1f} GiB/device){vs}")


def main() -> None:
    # what the pythia-jax command does first (pythia_jax.process_env). In one process both sides run
    # under it; with --separate, PyTorch's processes run without it (_case_env)
    from pythia_jax.process_env import reexec_with_huge_pages

    reexec_with_huge_pages()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="GPU mode: pythia-410m and pythia-1.4b at seq 2048, bf16")
    p.add_argument("--model", default="pythia-70m", help="CPU mode: preset shape (default pythia-70m)")
    p.add_argument("--seq", type=int, default=128, help="CPU mode: sequence length (default 128)")
    p.add_argument("--batch", type=int, default=8, help="CPU mode: batch size (default 8)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    p.add_argument("--layers", choices=("scan", "unrolled", "both"), default="both",
                   help="CPU mode: pythia-jax with the layer scan, unrolled (scan_layers=False), or both "
                        "(default; in one process they may disturb each other: compare with single runs)")
    p.add_argument("--remat", default="none",
                   help="CPU mode: pythia-jax's ModelConfig.remat (default 'none', the 70m and 160m train "
                        "configs' setting; 'dots_saveable' keeps only matmul outputs for the backward pass, "
                        "which with the layer scan is the fastest CPU setting measured: 2-14%% faster per "
                        "step at 70m-410m, fewer stacked activation buffers to fill)")
    p.add_argument("--separate", type=int, default=0, metavar="ROUNDS",
                   help="CPU mode: run each side in its own process, alternating, for ROUNDS rounds "
                        "(default 0: both in one process, steps interleaved)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (default: all cores)")
    p.add_argument("--peak_flops", type=float, default=None, help="GPU mode: peak FLOP/s per chip override")
    p.add_argument("--no_torch", action="store_true", help="GPU mode: skip the PyTorch peer")
    p.add_argument("--quick", action="store_true", help="GPU mode: one pythia-jax setting per model")
    p.add_argument("--case_timeout", type=int, default=240, help="GPU mode: seconds per setting (default 240)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one GPU measurement
    args = p.parse_args()
    if args.case and args.case.startswith("cpu:"):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        cpu_case(args)
    elif args.case:
        gpu_case(args)
    elif args.gpu:
        run_gpu(args)
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        run_cpu_separate(args) if args.separate else run_cpu(args)


if __name__ == "__main__":
    main()
