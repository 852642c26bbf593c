#!/usr/bin/env python
"""Time and peak memory of HF <-> JAX conversion, next to transformers' own load / save.

A random model of the given preset's shape (default pythia-1.4b) is written as fp16 sharded
safetensors (2GB shards, like the releases). Each measurement then runs in a fresh
subprocess (peak RSS = the process's VmHWM, nothing inherited). Two pairs, each ours against
its transformers peer:

  auto (the default of both):
    ours  hf-to-jax   read_hf_dir(dtype="auto") + write an Orbax checkpoint (fp16, as stored)
                      (the steps of `pythia-jax convert hf-to-jax`)
    peer  load        GPTNeoXForCausalLM.from_pretrained(dir)          (dtype "auto": fp16)
    ours  jax-to-hf   load_params(host=True, dtype=STORED) of that fp16 checkpoint +
                      write_hf_dir(fp16, 2GB shards) (the steps of `pythia-jax convert jax-to-hf`)
    peer  load+save   from_pretrained(dir) + save_pretrained(max_shard_size="2GB")
  float32:
    ours  hf-to-jax   the same with --dtype float32 (an fp32 checkpoint)
    peer  load        from_pretrained(dir, dtype=float32)
    ours  jax-to-hf   from that fp32 checkpoint (the case of a trained run) to fp16 safetensors
    peer  load+save   from_pretrained(float32), .half(), save_pretrained(max_shard_size="2GB")

Our measurements run as the `pythia-jax` command runs (re-executed once with its huge-page
start-up, pythia_jax.process_env); transformers' run without it.
(after one run that touches 2x the fp32 size of memory, so no measurement pays the VM's
first-touch cost; each measurement is repeated --repeat times, the fastest is shown) and prints
times, peaks, the ratio of each peak to the model's fp32 size (issue 14 target: <= 1.25x) and
our/peer time ratios (target <= 1.0x), with the load average before and after.

  python scripts/bench_convert.py [--model pythia-1.4b] [--workdir DIR] [--keep] [--repeat N]
Needs about 3x the fp16 size plus 1.5x the fp32 size of disk (about 17 GB at 1.4b) and RAM for
~1.5x the fp32 size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# --------------------------------------------------------------------------------- workers
class _Phases:
    """Wall time and peak RSS (VmHWM, reset at each phase start via /proc/self/clear_refs) per phase."""

    def __init__(self):
        self.results: dict[str, dict[str, float]] = {}

    def run(self, name: str, fn):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        t0 = time.perf_counter()
        out = fn()
        self.results[name] = {"seconds": time.perf_counter() - t0, "peak_kb": _status_kb("VmHWM"),
                              "end_kb": _status_kb("VmRSS")}
        return out


def _worker(name: str, workdir: str, checkpoint: bool) -> dict:
    """One measurement. ``name`` is ``<what>:<dtype>`` (dtype ``auto`` or ``float32``)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    name, _, dtype = name.partition(":")
    src, ckpt = os.path.join(workdir, "hf_src"), os.path.join(workdir, f"jax_ckpt_{dtype}")
    if name.startswith("ours"):
        import jax
        import orbax.checkpoint  # noqa: F401

        from pythia_jax.checkpoint import STORED, load_params
        from pythia_jax.commands.convert import write_checkpoint
        from pythia_jax.convert.dtypes import defer_widening
        from pythia_jax.convert.hf import read_hf_dir, to_device_tree, write_hf_dir
        jax.numpy.zeros(8).block_until_ready()  # start the runtime: part of the baseline
    elif name.startswith("peer"):
        import torch
        import transformers
        torch.zeros(8).sum()
        peer_dtype = {} if dtype == "auto" else {"dtype": torch.float32}
    baseline = _status_kb("VmRSS")
    ph = _Phases()
    if name == "ours_hf_to_jax":
        if not checkpoint:
            config, params = ph.run("read", lambda: read_hf_dir(src, dtype=dtype))
            params = ph.run("to_jax", lambda: to_device_tree(params))
        else:  # what `pythia-jax convert hf-to-jax` does: read as stored, numpy params straight
            # into the checkpoint, widened to float32 (if asked) as the save writes them
            config, params = ph.run("read", lambda: read_hf_dir(src, dtype="auto"))
            params, save_dtype = defer_widening(params, dtype)
            ph.run("save", lambda: write_checkpoint(ckpt, 0, config, params, None, {"source": "bench"},
                                                    overwrite=True, dtype=save_dtype))
    elif name == "ours_jax_to_hf":
        if checkpoint:  # as jax-to-hf does: the stored dtype, cast tensor by tensor while writing
            config, params = ph.run("load", lambda: load_params(ckpt, host=True, dtype=STORED))
        else:  # JAX params in memory, made from the HF source (not timed as part of the export)
            config, params = read_hf_dir(src, dtype=dtype)
            params = to_device_tree(params)
        ph.run("write", lambda: write_hf_dir(config, params, os.path.join(workdir, "hf_ours"),
                                             dtype="float16", shard_size="2GB", overwrite=True))
    elif name == "warmup":  # touch memory once so the VM has it backed (first touch is slow)
        import numpy as np
        ph.run("touch", lambda: np.ones(int(float(os.environ.get("BENCH_WARMUP_BYTES", "1e9")) // 8)).sum())
    elif name == "peer_load":
        ph.run("load", lambda: transformers.GPTNeoXForCausalLM.from_pretrained(src, **peer_dtype))
    elif name == "peer_load_save":
        model = ph.run("load", lambda: transformers.GPTNeoXForCausalLM.from_pretrained(src, **peer_dtype))

        def save():
            model.half()  # a no-op for the fp16 model of dtype "auto"
            model.save_pretrained(os.path.join(workdir, "hf_peer"), max_shard_size="2GB")
        ph.run("half+save", save)
    else:
        raise SystemExit(f"unknown worker {name}")
    return {"phases": ph.results, "baseline_kb": baseline}


def _run_worker(name: str, workdir: str, checkpoint: bool, warmup_bytes: float = 0) -> dict:
    from pythia_jax.process_env import without_huge_pages

    # ours re-execute with the huge-page start-up of the `pythia-jax` command (see main); the
    # peers run without it (and are kept from adding it), as a user runs transformers
    base = os.environ if name.startswith("ours") else without_huge_pages(os.environ)
    env = dict(base, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               BENCH_WARMUP_BYTES=str(warmup_bytes))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--workdir", workdir]
    if not checkpoint:
        cmd.append("--no-checkpoint")
    # flush the previous run's written files first (untimed), so that no run pays for the
    # write-back of another's dirty pages (each measurement came right after the other side's)
    os.sync()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------- setup
def write_random_hf(config, directory: str, seed: int = 0) -> None:
    """A random fp16 model in the release layout, written tensor by tensor (no full model in RAM)."""
    import numpy as np
    from safetensors.numpy import save_file

    from pythia_jax.convert import hf as hfc

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = hfc.hf_shapes(config)
    shards = hfc.plan_shards(config, "float16", "2GB")
    n = len(shards)
    weight_map, total = {}, 0
    for k, keys in enumerate(shards):
        file = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for key in keys:
            shape = shapes[key]
            if key.endswith("layernorm.weight") or key.endswith("layer_norm.weight"):
                t = np.ones(shape, np.float16)
            else:
                t = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
            tensors[key] = t
            weight_map[key] = file
            total += t.nbytes
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        del tensors
    if n > 1:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = hf_config["dtype"] = "float16"
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    hfc.write_tokenizer_files(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pythia-1.4b", help="preset whose shape to use")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--no-checkpoint", action="store_true",
                        help="measure the conversion to/from JAX params in memory, without writing / "
                             "reading the Orbax checkpoint")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement (the fastest is shown)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker.startswith("ours"):  # as the `pythia-jax convert` command starts
            from pythia_jax.process_env import reexec_with_huge_pages
            reexec_with_huge_pages()
        result = _worker(args.worker, args.workdir, not args.no_checkpoint)
        result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
        print(json.dumps(result))
        return

    from pythia_jax.config import ModelConfig

    config = ModelConfig.preset(args.model)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(workdir, exist_ok=True)
    fp32_gb = config.num_params() * 4 / 1e9
    print(f"model {args.model}: {config.num_params():,} params, fp32 {fp32_gb:.2f} GB, "
          f"fp16 {fp32_gb / 2:.2f} GB; scratch {workdir}")
    try:
        t = time.perf_counter()
        write_random_hf(config, os.path.join(workdir, "hf_src"))
        print(f"wrote random fp16 sharded model in {time.perf_counter() - t:.1f}s: "
              f"{sorted(os.listdir(os.path.join(workdir, 'hf_src')))}")
        results = {}
        checkpoint = not args.no_checkpoint
        # Touch as much memory as the largest run needs first: in a VM the first touch of fresh
        # memory is several times slower, which would otherwise penalise whichever runs first.
        _run_worker("warmup", workdir, checkpoint, warmup_bytes=2.0 * fp32_gb * 1e9)
        pairs = [("auto", "ours_hf_to_jax", "peer_load", "HF->JAX, dtype auto (fp16) vs from_pretrained()"),
                 ("auto", "ours_jax_to_hf", "peer_load_save",
                  "JAX fp16 ckpt->HF fp16 vs from_pretrained()+save_pretrained"),
                 ("float32", "ours_hf_to_jax", "peer_load", "HF->JAX, float32 vs from_pretrained(float32)"),
                 ("float32", "ours_jax_to_hf", "peer_load_save",
                  "JAX fp32 ckpt->HF fp16 vs from_pretrained(float32)+half+save")]
        order = [f"{w}:{d}" for d, ours, peer, _ in pairs for w in (peer, ours)]
        runs = {name: [] for name in order}
        print(f"load average before: {_loadavg()}")
        for _ in range(args.repeat):
            for name in order:
                runs[name].append(_run_worker(name, workdir, checkpoint))
        print(f"load average after: {_loadavg()}")
        for name in order:
            r = min(runs[name], key=lambda x: sum(p["seconds"] for p in x["phases"].values()))
            base = r["baseline_kb"] * 1024 / 1e9
            total = sum(p["seconds"] for p in r["phases"].values())
            peak = max(p["peak_kb"] for p in r["phases"].values()) * 1024 / 1e9
            results[name] = {"seconds": total, "peak_gb": peak}
            every = ", ".join(f"{sum(p['seconds'] for p in x['phases'].values()):.1f}" for x in runs[name])
            print(f"{name:22s} {total:7.1f}s (runs: {every})  peak RSS {peak:6.2f} GB = "
                  f"{peak / fp32_gb:.2f}x fp32 (import baseline {base:.2f} GB; "
                  f"GLIBC_TUNABLES {r.get('glibc_tunables', '')!r})")
            for phase, p in r["phases"].items():
                print(f"    {phase:10s} {p['seconds']:7.1f}s  peak {p['peak_kb'] * 1024 / 1e9:6.2f} GB "
                      f"= {p['peak_kb'] * 1024 / 1e9 / fp32_gb:.2f}x fp32")
        ours_out = os.path.join(workdir, "hf_ours")
        print(f"our export: {sorted(os.listdir(ours_out))}")
        print("ratios (ours / transformers, same run; target time <= 1.0x):")
        for d, ours, peer, what in pairs:
            a, b = results[f"{ours}:{d}"], results[f"{peer}:{d}"]
            print(f"  {what:62s} time {a['seconds'] / b['seconds']:.2f}x   peak RSS "
                  f"{a['peak_gb'] / b['peak_gb']:.2f}x")
        worst = max(r["peak_gb"] for k, r in results.items() if k.startswith("ours"))
        print(f"worst peak of ours: {worst:.2f} GB = {worst / fp32_gb:.2f}x the fp32 size "
              f"(target <= 1.25x): {'OK' if worst <= 1.25 * fp32_gb else 'OVER'}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
